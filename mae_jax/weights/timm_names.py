"""The official PyTorch names and layouts of every MAE parameter (docs/science.md §1.11); numpy only.

    table(model_cfg)                      # [Entry(torch name, NNX path, layout, part), ...]
    canonical(state_dict)                 # official wrapper prefixes stripped -> {name: array}
    LAYOUTS["linear"].to_nnx(w)           # (out, in) -> (in, out), and .to_torch back

Names are the canonical ones of github.com/recursionpharma/maes_microscopy: the encoder in timm
0.9.7 `VisionTransformer` names (`blocks.3.in_proj.weight`, `cls_token`, ...), the decoder in
the names of its `MAEModel` (`decoder.blocks.0.attn.qkv.weight`, `encoder_decoder_proj.weight`,
`decoder_pred.weight`, ...). The encoder of a whole-MAE state dict sits under
`encoder.vit_backbone.`. Every layout change is a transpose or reshape, so both directions are
exact. timm's ParallelScalingBlock adds `cat(zeros(3d), mlp_bias)` to the fused projection whose
output is split [mlp (h) | q | k | v] (docs/science.md §1.3); the model here computes exactly
that, so `mlp_bias` is copied as it is, never re-indexed.
"""
import dataclasses
import re
from typing import Callable

import numpy as np

# Wrappers the official code (and the usual trainers) put around the names, outermost first:
# Lightning / torch.compile / DDP, then maes `MAEModel.encoder` (`MAEEncoder.vit_backbone`).
OUTER_PREFIXES = ("model.", "_orig_mod.", "module.")
ENCODER_PREFIXES = ("encoder.vit_backbone.", "vit_backbone.", "encoder.")
DECODER_NAMES = re.compile(r"^(decoder\.|decoder_pred\.|encoder_decoder_proj\.)")
# The fixed sin-cos tables (maes `generate_2d_sincos_pos_embeddings`, requires_grad=False): no
# parameter here, so they are checked on import and regenerated on export.
POS_EMBED, DECODER_POS = "pos_embed", "decoder.pos_embeddings"
# CAMAEDecoder's all-zero CLS slot (requires_grad=False): checked and regenerated like the tables.
PLACEHOLDER = "decoder.placeholder"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a PyTorch tensor is stored in the NNX parameter (and back); both exact."""
  to_nnx: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple], tuple]  # NNX shape -> the PyTorch shape


def _qkv_to_nnx(w, parts=3):  # timm Attention.qkv (3d, d) -> (d, 3, d): output k*d+e is [:, k, e]
  return w.T.reshape(w.shape[1], parts, w.shape[0] // parts)


LAYOUTS = {
    "same": Layout(lambda a: a, lambda a: a, lambda s: tuple(s)),
    # nn.Linear weight (out, in) -> kernel (in, out)
    "linear": Layout(lambda w: w.T, lambda w: w.T, lambda s: (s[1], s[0])),
    # Conv2d (d, C, p, p) -> (p, p, C, d): the kernel over patchified pixels (row, col, channel)
    "conv": Layout(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1),
                   lambda s: (s[3], s[2], s[0], s[1])),
    "qkv": Layout(_qkv_to_nnx, lambda w: w.reshape(w.shape[0], -1).T,
                  lambda s: (s[1] * s[2], s[0])),
    # maes CrossAttention.kv (2d, d) -> (d, 2, d), as qkv
    "kv": Layout(lambda w: _qkv_to_nnx(w, 2), lambda w: w.reshape(w.shape[0], -1).T,
                 lambda s: (s[1] * s[2], s[0])),
    # a (1, 1, d) token -> one row (d,) of a stacked parameter
    "token": Layout(lambda t: t.reshape(-1), lambda t: t.reshape(1, 1, -1), lambda s: (1, 1) + tuple(s)),
    "qkv_bias": Layout(lambda b: b.reshape(3, -1), lambda b: b.reshape(-1), lambda s: (s[0] * s[1],)),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str  # canonical PyTorch name
  path: tuple  # path in the NNX parameter pure dict (per-layer blocks)
  layout: str
  part: str  # "encoder" or "decoder"
  channel: int | None = None  # the row of a parameter stacked over channels (official_ca decoder)


def _norm(torch_name, path):
  return [(f"{torch_name}.weight", path + ("scale",), "same"),
          (f"{torch_name}.bias", path + ("bias",), "same")]


ENCODER_TOP = [("cls_token", ("cls_token",), "same"),
               ("patch_embed.proj.weight", ("patch_embed",), "conv"),
               ("patch_embed.proj.bias", ("patch_bias",), "same"),
               *_norm("norm", ("norm",))]
ENCODER_BLOCK = [*_norm("in_norm", ("norm",)),
                 ("in_proj.weight", ("in_proj",), "linear"),
                 ("mlp_bias", ("mlp_bias",), "same"),
                 *_norm("q_norm", ("q_norm",)), *_norm("k_norm", ("k_norm",)),
                 ("attn_out_proj.weight", ("attn_out",), "linear"),
                 ("attn_out_proj.bias", ("attn_out_bias",), "same"),
                 ("mlp_out_proj.weight", ("mlp_out",), "linear"),
                 ("mlp_out_proj.bias", ("mlp_out_bias",), "same"),
                 ("ls.gamma", ("gamma",), "same")]
DECODER_TOP = [("encoder_decoder_proj.weight", ("decoder_embed",), "linear"),
               ("encoder_decoder_proj.bias", ("decoder_embed_bias",), "same"),
               ("decoder.mask_token", ("mask_token",), "same"),
               *_norm("decoder.norm", ("decoder_norm",)),
               ("decoder_pred.weight", ("decoder_pred",), "linear"),
               ("decoder_pred.bias", ("decoder_pred_bias",), "same")]
DECODER_BLOCK = [*_norm("norm1", ("norm1",)),
                 ("attn.qkv.weight", ("qkv",), "qkv"), ("attn.qkv.bias", ("qkv_bias",), "qkv_bias"),
                 ("attn.proj.weight", ("proj",), "linear"), ("attn.proj.bias", ("proj_bias",), "same"),
                 *_norm("norm2", ("norm2",)),
                 ("mlp.fc1.weight", ("fc1",), "linear"), ("mlp.fc1.bias", ("fc1_bias",), "same"),
                 ("mlp.fc2.weight", ("fc2",), "linear"), ("mlp.fc2.bias", ("fc2_bias",), "same")]


# maes CAMAEDecoder (model.decoder="official_ca", mae_jax/models/ca_decoder.py): its parameters
# under "decoder"; modality tokens and per-channel Blocks are rows of channel-stacked parameters.
CA_DECODER_TOP = [("decoder.mask_token", ("decoder", "mask_token",), "same"),
                  ("decoder.cross_attention.q.weight", ("decoder", "q"), "linear"),
                  ("decoder.cross_attention.kv.weight", ("decoder", "kv"), "kv"),
                  ("decoder.cross_attention.proj.weight", ("decoder", "proj"), "linear"),
                  ("decoder.cross_attention.proj.bias", ("decoder", "proj_bias"), "same"),
                  ("decoder.mlp.fc1.weight", ("decoder", "fc1"), "linear"),
                  ("decoder.mlp.fc1.bias", ("decoder", "fc1_bias"), "same"),
                  ("decoder.mlp.fc2.weight", ("decoder", "fc2"), "linear"),
                  ("decoder.mlp.fc2.bias", ("decoder", "fc2_bias"), "same"),
                  *_norm("decoder.context_norm", ("decoder", "context_norm")),
                  *_norm("decoder.query_norm", ("decoder", "query_norm")),
                  *_norm("decoder.out_norm", ("decoder", "out_norm"))]


def _ca_decoder_rows(model_cfg) -> list:
  rows = [Entry(n, p, l, "decoder") for n, p, l in DECODER_TOP[:2] + CA_DECODER_TOP]
  rows += [Entry(f"decoder.modality_tokens.{m}", ("decoder", "modality_tokens"), "token",
                 "decoder", m) for m in range(model_cfg.channels)]
  rows += [Entry(f"decoder.decoders.{m}.{i}.{n}", ("decoder", "decoders", i) + p, l, "decoder", m)
           for m in range(model_cfg.channels) for i in range(model_cfg.decoder_depth)
           for n, p, l in DECODER_BLOCK]
  return rows + [Entry(n, p, l, "decoder") for n, p, l in DECODER_TOP[5:]]  # decoder_pred


def official_ca(model_cfg) -> bool:
  return bool(model_cfg.channel_agnostic) and model_cfg.get("decoder", "shared") == "official_ca"


def table(model_cfg) -> list:
  """Every parameter of the ViT MAE `model_cfg` with its PyTorch name, in state-dict order.

  The shared CA-MAE decoder (one stack with channel tokens, docs/science.md §1.5) has no
  official counterpart, so for it only the encoder is listed; model.decoder="official_ca" is
  maes' CAMAEDecoder and maps tensor by tensor.
  """
  rows = [Entry(n, p, l, "encoder") for n, p, l in ENCODER_TOP[:3]]
  rows += [Entry(f"blocks.{i}.{n}", ("blocks", i) + p, l, "encoder")
           for i in range(model_cfg.depth) for n, p, l in ENCODER_BLOCK]
  rows += [Entry(n, p, l, "encoder") for n, p, l in ENCODER_TOP[3:]]
  if official_ca(model_cfg):
    return rows + _ca_decoder_rows(model_cfg)
  if model_cfg.channel_agnostic:
    return rows
  rows += [Entry(n, p, l, "decoder") for n, p, l in DECODER_TOP[:3]]
  rows += [Entry(f"decoder.blocks.{i}.{n}", ("decoder_blocks", i) + p, l, "decoder")
           for i in range(model_cfg.decoder_depth) for n, p, l in DECODER_BLOCK]
  rows += [Entry(n, p, l, "decoder") for n, p, l in DECODER_TOP[3:]]
  return rows


def _strip(name, prefixes):
  for prefix in prefixes:
    if name.startswith(prefix):
      return name[len(prefix):], prefix
  return name, ""


def canonical(state_dict: dict) -> tuple[dict, dict]:
  """({canonical name: array}, {canonical name: the name in the file}).

  Strips the wrappers of OUTER_PREFIXES, then the encoder wrappers of ENCODER_PREFIXES (a
  decoder name keeps its `decoder.` / `decoder_pred.` / `encoder_decoder_proj.` head). Two file
  names with one canonical name raise ValueError.
  """
  out, source = {}, {}
  for name, value in state_dict.items():
    key = name
    while True:
      key, prefix = _strip(key, OUTER_PREFIXES)
      if not prefix:
        break
    if not DECODER_NAMES.match(key):
      key, _ = _strip(key, ENCODER_PREFIXES)
    if key in out:
      raise ValueError(f"{source[key]!r} and {name!r} are the same tensor {key!r} once the "
                       f"wrapper prefixes are stripped")
    out[key], source[key] = value, name
  return out, source


def block_indices(names, head: str) -> list:
  """The block numbers `head`N.… present among `names` (head "blocks." or "decoder.blocks.")."""
  pattern = re.compile(re.escape(head) + r"(\d+)\.")
  return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def official_sincos(dim: int, grid: int, modalities: int = 1, cls: bool = True) -> np.ndarray:
  """maes `generate_2d_sincos_pos_embeddings` in its float32 arithmetic: (1, [1+] M*grid², dim).

  Frequencies, positions and products in float32 as the PyTorch code computes them; sin and cos
  of each float32 argument rounded once from float64. Equal to the PyTorch table to within one
  float32 ulp (its sin/cos differ by platform); `vit.sincos_2d` is the same table in float64.
  """
  quarter = dim // 4
  omega = np.float32(1.0) / np.float32(10000.0) ** (np.arange(quarter, dtype=np.float32)
                                                    / np.float32(quarter))
  pos = np.arange(grid, dtype=np.float32)
  h, w = np.meshgrid(pos, pos, indexing="ij")
  h = np.outer(h.ravel(), omega.astype(np.float32)).astype(np.float64)
  w = np.outer(w.ravel(), omega.astype(np.float32)).astype(np.float64)
  table = np.concatenate([np.sin(h), np.cos(h), np.sin(w), np.cos(w)], axis=1).astype(np.float32)
  table = np.tile(table, (modalities, 1))
  if cls:
    table = np.concatenate([np.zeros((1, dim), np.float32), table])
  return table[None]


def fixed_tables(model_cfg) -> dict:
  """{name: table} of the fixed positional tables an official state dict of `model_cfg` holds."""
  grid = model_cfg.image_size // model_cfg.patch_size
  if official_ca(model_cfg):  # + CAMAEDecoder's table, tiled over its num_modalities channels
    return {POS_EMBED: official_sincos(model_cfg.width, grid, model_cfg.max_channels),
            PLACEHOLDER: np.zeros((1, 1, model_cfg.decoder_width), np.float32),
            DECODER_POS: official_sincos(model_cfg.decoder_width, grid, model_cfg.channels)}
  if model_cfg.channel_agnostic:  # tiled over max_in_chans channels, sliced to the input
    return {POS_EMBED: official_sincos(model_cfg.width, grid, model_cfg.max_channels)}
  return {POS_EMBED: official_sincos(model_cfg.width, grid),
          DECODER_POS: official_sincos(model_cfg.decoder_width, grid)}
