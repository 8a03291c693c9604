"""The model registry: `config.model.kind` -> the NNX module of that model.

Every kind has the same interface, so training, compile and eval need no special case:
`model(batch, key) -> (loss, aux)` with `batch = {"image": crops}` (+ `"label"` for the
classifiers that `takes_labels`), scalar aux entries the kind's own metrics (reconstruction
`mse`/`fourier`, or `cross_entropy`/`accuracy`), and `model.embed(images)`.
"""
import jax.numpy as jnp
from flax import nnx

from mae_jax.models import densenet, mae, munet
from mae_jax.util.errors import UserError

MODELS = {"mae": mae.MAE, "munet": munet.MUNet, "wsl": densenet.DenseNetWSL}
LABELLED = {"wsl"}  # kinds trained on each crop's perturbation label (weak supervision)


class ModelConfigError(UserError, ValueError):
  """A model config naming an unknown kind (a user mistake: one line)."""


def kind(model_cfg) -> str:
  name = model_cfg.get("kind", "mae")  # configs from before the registry are all MAEs
  if name not in MODELS:
    raise ModelConfigError(f"model.kind={name!r}: expected one of {', '.join(MODELS)}")
  return name


def takes_labels(model_cfg) -> bool:
  return kind(model_cfg) in LABELLED


def build_model(model_cfg, *, seed=0, dtype=jnp.float32, remat=False):
  return MODELS[kind(model_cfg)](model_cfg, rngs=nnx.Rngs(seed), dtype=dtype, remat=remat)
