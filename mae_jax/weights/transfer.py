"""The two directions as functions (the command's in-process entry) and what training calls.

    result = import_weights("model.safetensors", config, "runs/phenom")   # checkpoint at step 0
    result = export_weights("runs/phenom", "out/model.safetensors", "timm")
    params, report = load_params("model.safetensors", config.model)      # e.g. for init_from
    tokens = encoder_tokens(model, images)                                 # timm forward_features
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mae_jax.models import mae, registry
from mae_jax.train import checkpointing
from mae_jax.util import files
from mae_jax.weights import state_dicts
from mae_jax.weights import timm_names as tn
from mae_jax.weights.convert import FORMATS, WeightsError, from_params, to_params

IMPORT_STEP = 0


def load_params(path, model_cfg, *, encoder_only: bool = False, init=None, seed: int = 0):
  """(params pure dict for `model_cfg` in its scan_layers layout, report) from an official file.

  The function a training run calls to start from official weights: put the result in place of
  the initial state["model"] (device_put onto that leaf's sharding); with `encoder_only`, pass the
  run's freshly initialised params as `init` so that the decoder keeps them.
  """
  return to_params(state_dicts.read_state_dict(path), model_cfg, encoder_only=encoder_only,
                   init=init, seed=seed)


def save_state(directory, params, step: int = IMPORT_STEP):
  """Writes {"model": params, "step"} as the "state" item of step `step` under `directory`
  (WORKDIR/checkpoints), with the StandardSave layout of `checkpointing.Checkpointer`, so that
  `checkpointing.load_for_eval` (which reads only state["model"]) restores it. No data item and
  no optimiser state: it is a starting point, not a run to resume."""
  device = jax.local_devices()[0]
  state = {"model": jax.tree.map(lambda a: jax.device_put(jnp.asarray(a), device), params),
           "step": jax.device_put(jnp.asarray(step, jnp.int32), device)}
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(epath.Path(directory), options=options, item_names=("state",))
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()


def _write_config(workdir, config):
  """config.json as the train loop writes it (mae_jax/train/loop.py: write_config, mesh as set)."""
  workdir.mkdir(parents=True, exist_ok=True)
  files.write(workdir / checkpointing.CONFIG_FILE,
              json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + "\n")


def save_random_init(config, workdir, seed: int = 0) -> str:
  """WORKDIR/{config.json, checkpoints/0}: the config's model at random init, no training.

  `eval.embed` and `eval.recall --ckpt` read it as any run's checkpoint (benchmarks and tests of
  the embedding path). Parameters only: a model with BatchNorm keeps its initial statistics.
  """
  with nnx.use_eager_sharding(False):
    model = registry.build_model(config.model, seed=seed)
  workdir = epath.Path(workdir)
  _write_config(workdir, config)
  save_state(checkpointing.checkpoint_dir(workdir), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return str(workdir)


def import_weights(src, config, workdir, *, encoder_only: bool = False) -> dict:
  """Official state dict `src` -> WORKDIR/{config.json, checkpoints/0/state}; the result JSON."""
  if config.model.get("kind", "mae") != "mae":
    raise WeightsError(f"model.kind={config.model.kind!r}: official weights exist for the ViT "
                       f"MAE only")
  workdir = epath.Path(workdir)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise WeightsError(f"{ckpt_dir} already holds checkpoints: import into a new workdir")
  path = state_dicts.resolve_file(src)
  raw = state_dicts.read_state_dict(path)
  params, report = to_params(raw, config.model, encoder_only=encoder_only, seed=config.seed)
  _write_config(workdir, config)
  save_state(ckpt_dir, params)
  wrapped = any(k.startswith(("encoder.", "decoder", "model.", "module.")) for k in raw)
  return dict(workdir=str(workdir), checkpoint=str(ckpt_dir / str(IMPORT_STEP)), step=IMPORT_STEP,
              source=str(path), source_format="maes_microscopy" if wrapped else "timm",
              source_tensors=len(raw), config=config.get("name"),
              scan_layers=bool(config.model.get("scan_layers", False)),
              encoder_only=encoder_only, **report)


def export_weights(ckpt, to, fmt: str = "timm", *, step: int | None = None) -> dict:
  """A checkpoint (WORKDIR, checkpoints/ or a step folder) -> `to` (.safetensors file, or a
  folder: config.json + model.safetensors + README.md); the result JSON."""
  if fmt not in FORMATS:
    raise WeightsError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  folder = state_dicts.is_folder_target(to)
  if not folder and not str(to).endswith(".safetensors"):
    raise WeightsError(f"--to={to}: a .safetensors file, or a folder (ending in /) for the "
                       f"Hugging Face-style folder")
  _, step_dir = checkpointing.resolve(ckpt, step)
  model, config = checkpointing.load_for_eval(ckpt, step=step, dtype=jnp.float32)
  if config.model.get("kind", "mae") != "mae":
    raise WeightsError(f"model.kind={config.model.kind!r}: official weights exist for the ViT "
                       f"MAE only")
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  sd, notes = from_params(params, config.model, fmt)
  metadata = {"mae_jax_format": fmt, "mae_jax_checkpoint": str(step_dir)}
  if folder:
    written = state_dicts.write_folder(to, sd, hf_config(config, fmt), model_card(config, fmt),
                                       metadata)
  else:
    state_dicts.write_safetensors(to, sd, metadata)
    written = [str(to)]
  return dict(to=str(to), files=written, format=fmt, checkpoint=str(step_dir),
              step=int(step_dir.name), tensors=len(sd),
              parameters=int(sum(v.size for k, v in sd.items()
                                 if not k.endswith((tn.POS_EMBED, tn.DECODER_POS,
                                                    tn.PLACEHOLDER)))),
              notes=notes)


def timm_kwargs(model_cfg) -> dict:
  """The timm 0.9.7 VisionTransformer kwargs of the encoder (maes `vit_*_256` constructors)."""
  m = model_cfg
  return dict(img_size=m.image_size, patch_size=m.patch_size,
              in_chans=m.channels, embed_dim=m.width, depth=m.depth,
              num_heads=m.num_heads, mlp_ratio=m.mlp_dim / m.width, num_classes=0, fc_norm=None,
              class_token=True, global_pool="token", init_values=m.layerscale_init,
              qkv_bias=False, qk_norm=True, drop_path_rate=m.drop_path,
              block_fn="timm.models.vision_transformer.ParallelScalingBlock")


def hf_config(config, fmt: str) -> dict:
  m = config.model
  out = dict(architecture="MAE" if fmt == "maes_microscopy" else "VisionTransformer",
             state_dict_format=fmt, library="timm==0.9.7", timm_kwargs=timm_kwargs(m),
             positional_embedding="fixed 2-D sin-cos (maes generate_2d_sincos_pos_embeddings)",
             channel_agnostic=bool(m.channel_agnostic), max_in_chans=int(m.max_channels),
             input="uint8 (B, C, H, W) / 255, then per-crop per-channel InstanceNorm2d (eps 1e-5)",
             mae_jax_config=json.loads(config.to_json_best_effort()))
  if fmt == "maes_microscopy" and tn.official_ca(m):  # maes CAMAEDecoder's constructor arguments
    out["decoder"] = dict(type="CAMAEDecoder", embed_dim=m.decoder_width, depth=m.decoder_depth,
                          num_heads=m.decoder_heads, num_modalities=m.channels,
                          tokens_per_modality=(m.image_size // m.patch_size) ** 2, mlp_ratio=4.0,
                          qkv_bias=True, layer_norm_eps=float(m.get("decoder_norm_eps", 1e-6)),
                          mask_ratio=m.mask_ratio, fourier_loss_weight=m.fourier_weight)
  elif fmt == "maes_microscopy" and not m.channel_agnostic:
    out["decoder"] = dict(embed_dim=m.decoder_width, depth=m.decoder_depth,
                          num_heads=m.decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                          mask_ratio=m.mask_ratio, fourier_loss_weight=m.fourier_weight)
  return out


def model_card(config, fmt: str) -> str:
  m = config.model
  kind = "CA-MAE" if m.channel_agnostic else "MAE"
  kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(m).items() if k != "block_fn")
  prefix = "encoder.vit_backbone." if fmt == "maes_microscopy" else ""
  ca = f" and channel_agnostic_vit(model, max_in_chans={m.max_channels})" if m.channel_agnostic else ""
  train_config = json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True)
  return f"""---
library_name: timm
tags: [masked-autoencoder, microscopy, cell-painting, mae_jax]
---
# {config.get("name", "mae")}: {kind} ViT ({m.width} wide, {m.depth} blocks, patch {m.patch_size})

Exported by `python -m mae_jax.weights export` from a mae_jax checkpoint, in the
`{fmt}` naming of github.com/recursionpharma/maes_microscopy (timm 0.9.7 ParallelScalingBlock,
qk-norm, LayerScale, fixed 2-D sin-cos positions). Parameters are float32.

## Load in PyTorch

```python
import timm.models.vision_transformer as vit  # timm==0.9.7
from safetensors.torch import load_file
model = vit.VisionTransformer({kwargs},
                              block_fn=vit.ParallelScalingBlock)
# then, as maes_microscopy's vit.py: sincos_positional_encoding_vit(model){ca}
sd = load_file("model.safetensors")
model.load_state_dict({{k[len("{prefix}"):]: v for k, v in sd.items() if k.startswith("{prefix}")}})
```

Input: raw uint8 crops (B, C, {m.image_size}, {m.image_size}) divided by 255, then standardised
per crop and channel (InstanceNorm2d, eps 1e-5). Embedding: the mean of the patch tokens of
`forward_features` (after the final LayerNorm).

## Training config (mae_jax)

```json
{train_config}
```
"""


def encoder_tokens(model, images):
  """The encoder's final tokens (B, 1 + L, d), CLS first, after the final LayerNorm: what timm's
  `forward_features` returns for the same raw crops (B, H, W, C)."""
  tokens, _, _ = model._tokens(mae.standardize(jnp.asarray(images)))  # pylint: disable=protected-access
  return model.norm(model._encode(tokens))  # pylint: disable=protected-access
