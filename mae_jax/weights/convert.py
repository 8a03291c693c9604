"""Official PyTorch state dicts <-> the MAE's NNX parameters (docs/science.md §1.11).

    params, report = to_params(state_dict, config.model)         # every tensor accounted for
    params, report = to_params(sd, config.model, encoder_only=True, init=fresh_params)
    state_dict, notes = from_params(params, config.model, "timm")  # or "maes_microscopy"

`params` is the pure dict of the model's nnx.Param state (`nnx.state(model, nnx.Param)
.to_pure_dict()`) in the layout `model_cfg.scan_layers` asks for (stacked or per-layer blocks,
`mae.relayout`). Every mistake is a WeightsError with one line: a tensor whose shape disagrees
with the config (both shapes named), a depth that differs, source tensors with no place in the
model, model parameters the source leaves empty, a positional table that is not the fixed one.
"""
import jax
import ml_collections
import numpy as np
from flax import nnx

from mae_jax.models import mae
from mae_jax.util.errors import UserError
from mae_jax.weights import timm_names as tn

FORMATS = ("timm", "maes_microscopy")
POS_TOLERANCE = 1e-4  # float32 sin/cos differ by platform; a learned table differs by far more
SHOW = 8  # names listed in one error line before "... and N more"


class WeightsError(UserError, ValueError):
  """Weights that do not fit the config, or a file that cannot be read (one line)."""


def _listing(names) -> str:
  names = list(names)
  more = f" ... and {len(names) - SHOW} more" if len(names) > SHOW else ""
  return ", ".join(names[:SHOW]) + more + f" ({len(names)} in all)"


def _describe(m) -> str:
  ca = ", channel_agnostic=True" if m.channel_agnostic else ""
  ca += ", decoder='official_ca'" if tn.official_ca(m) else ""
  return (f"model.width={m.width}, depth={m.depth}, num_heads={m.num_heads}, "
          f"mlp_dim={m.mlp_dim}, patch_size={m.patch_size}, channels={m.channels}, "
          f"image_size={m.image_size}, decoder_width={m.decoder_width}, "
          f"decoder_depth={m.decoder_depth}{ca}")


def _check_mae(model_cfg):
  if model_cfg.get("kind", "mae") != "mae":
    raise WeightsError(f"model.kind={model_cfg.kind!r}: official weights exist for the ViT MAE "
                       f"only (model.kind='mae')")


def abstract_params(model_cfg) -> dict:
  """The model's parameter shapes as a pure dict of ShapeDtypeStructs, per-layer blocks."""
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.scan_layers = False
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: mae.build_model(cfg))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _check_depth(names, head, want, key, source):
  have = tn.block_indices(names, head)
  if have and have != list(range(want)):
    first = next(source[n] for n in names if n.startswith(f"{head}{have[-1]}."))
    raise WeightsError(f"{first}: the source has {len(have)} blocks ({head}{have[0]} ... "
                       f"{head}{have[-1]}), the config has {key}={want}")


def _check_shapes(sd, source, rows, shapes, model_cfg):
  for row in rows:
    if row.name not in sd:
      continue
    shape = _get(shapes, row.path).shape
    want = tn.LAYOUTS[row.layout].torch_shape(shape if row.channel is None else shape[1:])
    have = tuple(sd[row.name].shape)
    if have == want:
      continue
    hint = ""
    if row.name == "patch_embed.proj.weight" and (have[1] == 1) != bool(model_cfg.channel_agnostic):
      hint = (" (a channel-agnostic CA-MAE patch embedding: set model.channel_agnostic=True)"
              if have[1] == 1 else " (a standard MAE patch embedding, not CA-MAE)")
    raise WeightsError(f"{source[row.name]}: source shape {have}, the config expects {want}{hint} "
                       f"[{_describe(model_cfg)}]")


def _check_table(sd, source, name, want, model_cfg):
  if name not in sd:
    return None
  have = np.asarray(sd[name], np.float32)
  if have.shape != want.shape:
    channels = f", max_channels={model_cfg.max_channels}" if model_cfg.channel_agnostic else ""
    raise WeightsError(f"{source[name]}: source shape {have.shape}, the config expects "
                       f"{want.shape} (the fixed sin-cos table of model.image_size="
                       f"{model_cfg.image_size}, patch_size={model_cfg.patch_size}{channels})")
  err = float(np.max(np.abs(have - want)))
  if name == tn.PLACEHOLDER and err:
    raise WeightsError(f"{source[name]}: not zero; maes' CAMAEDecoder keeps this CLS slot at zero "
                       f"(requires_grad=False)")
  if not err <= POS_TOLERANCE:
    raise WeightsError(f"{source[name]}: differs from the fixed 2-D sin-cos table by up to "
                       f"{err:.3g}; learned positional embeddings are not supported "
                       f"(docs/science.md §1.4)")
  return err


def to_params(state_dict: dict, model_cfg, *, encoder_only: bool = False, init=None,
              seed: int = 0):
  """(NNX params pure dict in model_cfg's layout, report) from an official state dict.

  `state_dict`: {name: array} in timm or maes_microscopy names, with or without the wrappers'
  prefixes. With `encoder_only` the source's decoder tensors are skipped and the decoder comes
  from `init` (a params pure dict of this config, either layout) or a fresh initialisation with
  `seed`; a CA-MAE with the shared decoder needs it (the official CAMAEDecoder maps only onto
  model.decoder="official_ca", docs/science.md §1.5).
  """
  _check_mae(model_cfg)
  sd, source = tn.canonical(state_dict)
  notes = []
  if "fc_norm.weight" in sd and "norm.weight" not in sd:  # timm global_pool="avg" (OpenPhenom)
    for leaf in ("weight", "bias"):
      if f"fc_norm.{leaf}" in sd:
        sd[f"norm.{leaf}"] = sd.pop(f"fc_norm.{leaf}")
        source[f"norm.{leaf}"] = source.pop(f"fc_norm.{leaf}")
    notes.append("fc_norm (timm global_pool='avg') became the encoder's final LayerNorm, applied "
                 "per token before pooling here (docs/science.md §7)")
  decoder_names = [n for n in sd if tn.DECODER_NAMES.match(n)]
  skipped = decoder_names if encoder_only else []
  official_ca = tn.official_ca(model_cfg)
  if model_cfg.channel_agnostic and not official_ca and not encoder_only:
    has = f" (the source has {len(decoder_names)} decoder tensors)" if decoder_names else ""
    raise WeightsError(f"CA-MAE: the official CAMAEDecoder has no counterpart in the shared CA-MAE "
                       f"decoder (model.decoder='shared', docs/science.md §1.5){has}: set "
                       f"model.decoder='official_ca' (and its decoder_width, decoder_depth, "
                       f"decoder_heads), or import with --encoder_only, which keeps the decoder "
                       f"at its initialisation")
  rows = [r for r in tn.table(model_cfg) if not (encoder_only and r.part == "decoder")]
  shapes = abstract_params(model_cfg)

  _check_depth(sd, "blocks.", model_cfg.depth, "model.depth", source)
  if not encoder_only and official_ca:  # one Block stack per channel: decoders.{channel}.{block}
    _check_depth(sd, "decoder.decoders.", model_cfg.channels, "model.channels", source)
    _check_depth(sd, "decoder.decoders.0.", model_cfg.decoder_depth, "model.decoder_depth", source)
  elif not encoder_only:
    _check_depth(sd, "decoder.blocks.", model_cfg.decoder_depth, "model.decoder_depth", source)
  _check_shapes(sd, source, rows, shapes, model_cfg)
  tables = tn.fixed_tables(model_cfg)
  pos_error = {}
  for name, want in tables.items():
    if tn.DECODER_NAMES.match(name) and encoder_only:
      continue
    err = _check_table(sd, source, name, want, model_cfg)
    if err is not None:
      pos_error[name] = err

  wanted = {r.name for r in rows} | set(pos_error)
  unmapped = [n for n in sd if n not in wanted and n not in skipped]
  unfilled = [r.name for r in rows if r.name not in sd]
  if unmapped or unfilled:
    parts = []
    if unmapped:
      parts.append(f"source tensors with no place in the model: "
                   f"{_listing(source[n] for n in unmapped)}")
    if unfilled:
      hint = ""
      if not decoder_names and all(tn.DECODER_NAMES.match(n) for n in unfilled):
        hint = " (an encoder-only state dict: import with --encoder_only to keep the decoder at init)"
      parts.append(f"model parameters the source does not fill: {_listing(unfilled)}{hint}")
    raise WeightsError("; ".join(parts))

  params, converted, stacked = {}, {}, {}
  for row in rows:
    value = np.asarray(sd[row.name])
    if value.dtype != np.float32:
      converted[str(value.dtype)] = converted.get(str(value.dtype), 0) + 1
      value = value.astype(np.float32)
    value = np.ascontiguousarray(tn.LAYOUTS[row.layout].to_nnx(value))
    if row.channel is None:
      _set(params, row.path, value)
    else:  # one channel's row of a parameter stacked over channels
      stacked.setdefault(row.path, {})[row.channel] = value
  for path, channels in stacked.items():
    _set(params, path, np.stack([channels[m] for m in range(len(channels))]))
  notes += [f"{n} {dtype} tensors converted to float32" for dtype, n in converted.items()]
  decoder = "imported"
  if encoder_only:
    if init is None:
      with nnx.use_eager_sharding(False):
        init = nnx.to_pure_dict(nnx.state(mae.build_model(model_cfg, seed=seed), nnx.Param))
      decoder = f"initialised (seed {seed})"
    else:
      decoder = "kept from the given initial parameters"
    init = mae.relayout(jax.tree.map(np.asarray, init), scan=False)
    for path, leaf in jax.tree_util.tree_leaves_with_path(init):
      keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
      try:
        _get(params, keys)
      except KeyError:
        _set(params, keys, np.asarray(leaf))
  _check_complete(params, shapes)
  params = mae.relayout(params, scan=bool(model_cfg.get("scan_layers", False)))
  report = dict(tensors=len(rows), decoder=decoder, skipped=len(skipped),
                positional_tables={source[k]: v for k, v in pos_error.items()}, notes=notes)
  return params, report


def _check_complete(params, shapes):
  """Bug guard: the assembled tree has exactly the model's parameters, shapes and float32."""
  got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
  want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), shapes)
  assert got == want, "the mapping tables do not cover the model exactly"


def from_params(params, model_cfg, fmt: str = "timm"):
  """({PyTorch name: float32 array}, notes) for the official code; exact inverse of to_params.

  "timm": the encoder as timm's VisionTransformer state dict (maes `vit_*_256` constructors);
  "maes_microscopy": the whole MAE as maes' MAEModel (`encoder.vit_backbone.*`, `decoder.*`,
  `encoder_decoder_proj.*`, `decoder_pred.*`); for a CA-MAE with the shared decoder the encoder
  only, since that decoder
  has no official counterpart. The fixed sin-cos tables are written as the official code makes
  them (`timm_names.official_sincos`).
  """
  _check_mae(model_cfg)
  if fmt not in FORMATS:
    raise WeightsError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  params = mae.relayout(jax.tree.map(np.asarray, params), scan=False)
  rows = tn.table(model_cfg)
  tables = tn.fixed_tables(model_cfg)
  notes = []
  if fmt == "timm":
    rows = [r for r in rows if r.part == "encoder"]
    tables = {tn.POS_EMBED: tables[tn.POS_EMBED]}
    notes.append("encoder only (timm VisionTransformer names)")
  elif model_cfg.channel_agnostic and not tn.official_ca(model_cfg):
    notes.append("encoder only: the shared CA-MAE decoder has no counterpart in the official "
                 "CAMAEDecoder (docs/science.md §1.5)")
  out = {}
  for row in rows:
    value = np.asarray(_get(params, row.path), np.float32)
    value = value if row.channel is None else value[row.channel]
    out[row.name] = np.ascontiguousarray(tn.LAYOUTS[row.layout].to_torch(value))
  out.update(tables)
  if fmt == "maes_microscopy":
    out = {(k if tn.DECODER_NAMES.match(k) else "encoder.vit_backbone." + k): v
           for k, v in out.items()}
  return out, notes
