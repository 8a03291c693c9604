"""The demo's MAE recipe: a small ViT sized for minutes of CPU (`python -m mae_jax.demo`).

Where the CPU-seconds go (jax_stack.md §G; measured on the 2-core machine): every embedding pass
of the 512² x 6 sites of the default screen costs the encoder FLOPs of the whole screen, and the
demo embeds it once per evaluated checkpoint. Patch 16 on 128² crops gives a 16 x 16 token grid
per site at a quarter of patch 8's tokens; a 128-wide, 4-deep encoder keeps the embedding
dimension below the control wells per experiment that TVN whitens on (method.md §11) and a
one-block 64-wide decoder keeps most of each step in the encoder. `total_steps` and
`checkpoint_every` are placeholders: the demo sets them from the measured step time and budget.
"""
from configs import common


def get_config(arg=None):
  del arg
  c = common.get_config("S/16", name="demo", total_steps=1000, batch_size=128, log_every=10,
                        checkpoint_every=250, keep_checkpoints=16)
  c.model.update(image_size=128, patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=512,
                 drop_path=0.0, decoder_width=64, decoder_depth=1, decoder_heads=2,
                 mask_ratio=0.75)
  c.optimizer.update(name="adamw", lr=1.5e-3, weight_decay=0.05, b1=0.9, b2=0.95,
                     warmup_fraction=0.05)
  c.data.update(dtype="uint16", num_workers=0)
  return c
