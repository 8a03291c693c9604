"""ViT-S/16 MAE on 256x256x6 crops (docs/science.md §1.2)."""
from configs import common


def get_config(arg=None):
  del arg
  return common.get_config("S/16")
