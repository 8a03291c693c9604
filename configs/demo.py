"""The demo's MAE recipe: a small ViT sized for minutes of CPU (`python -m mae_jax.demo`).

Why these numbers (measured on the 2-core machine, default synthetic screen; docs/science.md §6):
  * Patch 8 on 64² crops. With patch 16 on 128² crops the content of a removed patch is almost
    unpredictable from its neighbours (predicting each removed patch by the mean of the visible
    neighbouring patches: MSE 0.936 against 0.939 for the crop mean), so the loss gives little
    learnable signal per step and the MAE stayed at the mean predictor for hundreds of steps.
    Patch 8 makes the task learnable sooner (0.89 x the mean predictor's loss after 600 steps of
    32 crops, against 0.96 for patch 16 at the same optimiser settings).
  * Batch 32 at a peak learning rate of 3e-3 (AdamW, one-cycle): at a fixed number of crops,
    more optimiser steps got the loss moving earlier than batch 128 at 1.5e-3.
  * Width 64, depth 4: embedding the 64 tiles of every 512² site costs the encoder FLOPs of the
    whole screen once per evaluated checkpoint, about 2 GFLOP per site here (128 wide: 7.5);
    64 dimensions also stay well below the control wells per experiment that TVN whitens on
    (docs/science.md §6). A one-block decoder of the same width keeps the step cheap.
  * Per-layer blocks (get_small_config: scan_layers=False), the layout the README's results were
    trained with: scanning the 4 small blocks changed the step by less than this shared
    machine's noise (scanned 0.075 s, per-layer 0.077 s, best of 60 interleaved steps) and the
    compile time by under a second.
`total_steps` and `checkpoint_every` are placeholders: the demo sets them from the measured step
time and the budget.
"""
from configs import common


def get_config(arg=None):
  del arg
  c = common.get_small_config("demo", image_size=64, depth=4, decoder_width=64, drop_path=0.0,
                              lr=3e-3, total_steps=1000, batch_size=32, log_every=20,
                              checkpoint_every=250, keep_checkpoints=16)
  c.optimizer.warmup_fraction = 0.05
  c.data.dtype = "uint16"
  return c
