"""The model registry: `config.model.kind` -> the NNX module of that masked autoencoder.

Every kind has the same interface, so training, compile and eval need no special case:
`model(images, key) -> (loss, aux)` with aux["mse"], aux["fourier"], and `model.embed(images)`.
"""
import jax.numpy as jnp
from flax import nnx

from mae_jax.models import mae, munet
from mae_jax.util.errors import UserError

MODELS = {"mae": mae.MAE, "munet": munet.MUNet}


class ModelConfigError(UserError, ValueError):
  """A model config naming an unknown kind (a user mistake: one line)."""


def build_model(model_cfg, *, seed=0, dtype=jnp.float32, remat=False):
  kind = model_cfg.get("kind", "mae")  # configs from before the registry are all MAEs
  if kind not in MODELS:
    raise ModelConfigError(f"model.kind={kind!r}: expected one of {', '.join(MODELS)}")
  return MODELS[kind](model_cfg, rngs=nnx.Rngs(seed), dtype=dtype, remat=remat)
