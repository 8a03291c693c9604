"""Official PyTorch weights in and out (docs/science.md §1.11, docs/interfaces.md §1).

    python -m mae_jax.weights import --from=model.safetensors --config=configs/vits16.py --workdir=DIR
    python -m mae_jax.weights export --ckpt=DIR --to=model.safetensors [--format=timm|maes_microscopy]

Modules: `timm_names` (the name and layout of every tensor, numpy only), `convert` (state dict
<-> NNX parameters, every tensor accounted for), `state_dicts` (files), `transfer` (the
commands as functions; `load_params` for a run that starts from official weights).
"""
from mae_jax.weights.convert import FORMATS, WeightsError, from_params, to_params
from mae_jax.weights.state_dicts import read_state_dict, write_safetensors
from mae_jax.weights.transfer import encoder_tokens, export_weights, import_weights, load_params

__all__ = ["FORMATS", "WeightsError", "encoder_tokens", "export_weights", "from_params",
           "import_weights", "load_params", "read_state_dict", "to_params", "write_safetensors"]
