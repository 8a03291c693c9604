"""The WSL DenseNet at demo scale: the weakly supervised baseline beside the demo's ViT MAE
(configs/demo.py), same recipe and crops.

64² crops; DenseNet-BC with growth 16, blocks 3/6/12/8, 32 stem features (642,908 parameters
with 200 classes; the classes come from the screen's genes): 0.19 GFLOP per crop and train step,
3x the demo ViT's 0.063.
"""
from configs import common, demo


def get_config(arg=None):
  del arg
  c = demo.get_config()
  wsl = common.get_wsl_config()
  c.name = "wsl_demo"
  c.model, c.wsl = wsl.model, wsl.wsl
  c.model.update(variant="DenseNet demo", image_size=64, growth_rate=16,
                 block_config=(3, 6, 12, 8), num_init_features=32, num_classes=200)
  return c
