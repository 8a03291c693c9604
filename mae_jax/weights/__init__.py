"""Official PyTorch weights in and out (docs/science.md §1.11, docs/interfaces.md §1).

    python -m mae_jax.weights import --from=model.safetensors --config=configs/vits16.py --workdir=DIR
    python -m mae_jax.weights export --ckpt=DIR --to=model.safetensors [--format=timm|maes_microscopy]

Modules: `timm_names` (the name and layout of every tensor, numpy only), `convert` (state dict
<-> NNX parameters, every tensor accounted for), `state_dicts` (files), `transfer` (the
commands as functions; `load_params` for a run that starts from official weights).
"""
import importlib

_HOME = {"FORMATS": "convert", "WeightsError": "convert", "from_params": "convert",
         "to_params": "convert", "read_state_dict": "state_dicts",
         "write_safetensors": "state_dicts", "encoder_tokens": "transfer",
         "export_weights": "transfer", "import_weights": "transfer", "load_params": "transfer"}
__all__ = sorted(_HOME)


def __getattr__(name):
  """The names above, imported on first use (PEP 562): `python -m mae_jax.weights --help` and
  its flag errors then answer without importing jax."""
  if name not in _HOME:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
