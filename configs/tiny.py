"""A tiny MAE that trains in well under a second per step on CPU: for tests and smoke runs."""
from configs import common


def get_config(arg=None):
  del arg
  c = common.get_config("S/16", name="tiny", total_steps=20, batch_size=16, log_every=5,
                        checkpoint_every=10, keep_checkpoints=2)
  c.model.update(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=256,
                 drop_path=0.1, decoder_width=32, decoder_depth=1, decoder_heads=2)
  c.optimizer.update(name="adamw", lr=1e-3, weight_decay=0.05)
  c.data.num_workers = 0
  return c
