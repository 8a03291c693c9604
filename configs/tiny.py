"""A tiny MAE that trains in well under a second per step on CPU: for tests and smoke runs."""
from configs import common


def get_config(arg=None):
  del arg
  return common.get_small_config("tiny", image_size=32, depth=2, decoder_width=32, drop_path=0.1,
                                 lr=1e-3, total_steps=20, batch_size=16, log_every=5,
                                 checkpoint_every=10, keep_checkpoints=2)
