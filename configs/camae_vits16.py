"""Channel-agnostic MAE (CA-MAE) ViT-S/16, the OpenPhenom family (docs/science.md §1.4-1.5).

The decoder is the official CAMAEDecoder at maes' defaults (width 256, 2 blocks per channel,
16 heads); `--config.model.decoder=shared --config.model.decoder_width=512
--config.model.decoder_depth=8` gives the one shared decoder instead (docs/science.md §1.5).
"""
from configs import common


def get_config(arg=None):
  del arg
  return common.get_config("S/16", name="camae_vits16", **{
      "model.channel_agnostic": True, "model.decoder": "official_ca", "model.decoder_width": 256,
      "model.decoder_depth": 2, "model.decoder_heads": 16})
