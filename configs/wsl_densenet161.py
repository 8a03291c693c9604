"""WSL DenseNet-161: the weakly supervised baseline of Kraus et al. (docs/science.md §1.10)."""
from configs import common


def get_config(arg=None):
  del arg
  return common.get_wsl_config()
