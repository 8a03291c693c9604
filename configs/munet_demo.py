"""MU-Net at demo scale: the U-Net MAE beside the demo's ViT (configs/demo.py), same recipe.

64² crops, patch 8, mask 0.75, 3 levels from base width 16 (484,102 parameters). A U-Net
convolves the whole crop at full resolution, so even this small one costs 0.89 GFLOP per crop
and train step, 14x the demo ViT's 0.063: wider ones do not train in minutes on 2 CPU cores.
"""
from configs import common, demo


def get_config(arg=None):
  del arg
  c = demo.get_config()
  c.name = "munet_demo"
  c.model = common.get_munet_config("M").model
  c.model.update(variant="MU-Net demo", image_size=64, patch_size=8, base_width=16, levels=3,
                 norm_groups=8)
  return c
