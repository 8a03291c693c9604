"""Channel-agnostic MAE (CA-MAE) ViT-S/16, the OpenPhenom family (docs/science.md §1.4-1.5)."""
from configs import common


def get_config(arg=None):
  del arg
  return common.get_config("S/16", name="camae_vits16", **{"model.channel_agnostic": True})
