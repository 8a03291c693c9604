"""MU-Net-M: the U-Net masked autoencoder of Kraus et al. (docs/science.md §1.9)."""
from configs import common


def get_config(arg=None):
  del arg
  return common.get_munet_config("M")
