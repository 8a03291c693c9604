r"""Model summary from abstract shapes: parameters, tokens, FLOPs per image, memory estimate.

    python -m mae_jax.summary --config=configs/vitl8.py [--config.model.patch_size=16 ...]
    python -m mae_jax.summary --zoo=README.md   # regenerate the README's model-zoo table

Nothing is allocated (`nnx.eval_shape`), so even ViT-G/8 takes seconds. FLOPs follow the model
documented in `mae_jax/models/flops.py`. The last stdout line is one JSON object (docs/interfaces.md §1).
"""
import json
import pathlib
import re
import sys

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mae_jax.util import cli, files

from mae_jax.models import flops, registry



def define_flags():
  # Defined only when run as a command, so that importing `summarize` defines no flags.
  config_flags.DEFINE_config_file("config", None, "Model config file.", lock_config=True)
  flags.DEFINE_string("zoo", None, "Rewrite the model-zoo table of this README and exit.")

ZOO_CONFIGS = ("vits16", "vitb16", "vitb8", "vitl16", "vitl8", "vitg8", "camae_vits16", "munet_m",
               "munet_l", "wsl_densenet161")


def summarize(config) -> dict:
  """Counts encoder / decoder parameters and derives tokens, FLOPs and memory of `config`.

  The WSL classifier's "encoder" is its feature extractor and its "decoder" the classifier
  (the head over `model.num_classes` labels); it masks nothing and has no tokens.
  """
  m = config.model
  kind = registry.kind(m)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: registry.build_model(m))
  counts = {"encoder": 0, "decoder": 0}
  head = {"mae": r"\.?(decoder|mask_token|channel_token)", "munet": r"\.?(up|head)",
          "wsl": r"\.?classifier"}[kind]
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
    counts["decoder" if re.match(head, _key(path[0])) else "encoder"] += int(np.prod(leaf.shape))
  if kind == "mae":
    n, keep = flops.tokens(m)
  elif kind == "munet":  # the patches of the masking grid and how many stay visible
    n = (m.image_size // m.patch_size) ** 2
    keep = int(n * (1 - m.mask_ratio))
  else:
    n = keep = 0
  f = flops.flops_per_image(m)
  params = counts["encoder"] + counts["decoder"]
  moments = 1 if config.optimizer.name == "lion" else 2
  width, depth, heads = {
      "mae": lambda: (m.width, m.depth, m.num_heads),
      # MU-Net: channels of the first level, levels; DenseNet: stem features, dense layers.
      "munet": lambda: (m.base_width, m.levels, None),
      "wsl": lambda: (m.num_init_features, sum(m.block_config), None)}[kind]()
  row = {
      "config": config.get("name", m.variant),
      "variant": m.variant,
      "encoder_params": counts["encoder"],
      "decoder_params": counts["decoder"],
      "image_size": m.image_size,
      "patch_size": m.get("patch_size"),
      "channels": m.channels,
      "kind": kind,
      "channel_agnostic": bool(m.get("channel_agnostic", False)),
      "width": width,
      "depth": depth,
      "heads": heads,
      "tokens": n,
      "kept_tokens": keep,
      "mask_ratio": m.get("mask_ratio", 0.0),
      "train_gflops_per_image": f["train"] / 1e9,
      "embed_gflops_per_image": f["embed"] / 1e9,
      # fp32 parameters + optimiser moments (Lion keeps one, AdamW two); activations not included.
      "state_gib": params * 4 * (1 + moments) / 2 ** 30,
  }
  if kind == "wsl":
    row["num_classes"] = m.num_classes
  return row


def _key(k):
  return str(getattr(k, "key", getattr(k, "name", k)))


def zoo_table(rows) -> str:
  lines = ["| config | encoder | decoder | patch | tokens (kept) | train GFLOP/img | embed GFLOP/img | params+opt GiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:  # WSL: encoder = features, decoder = classifier; no patches, nothing masked
    tokens = f"{r['tokens']} ({r['kept_tokens']})" if r["tokens"] else "—"
    lines.append(f"| `{r['config']}` | {r['encoder_params'] / 1e6:,.1f} M | {r['decoder_params'] / 1e6:,.1f} M "
                 f"| {r['patch_size'] or '—'} | {tokens} | {r['train_gflops_per_image']:,.1f} "
                 f"| {r['embed_gflops_per_image']:,.1f} | {r['state_gib']:.2f} |")
  return "\n".join(lines)


def write_zoo(readme: pathlib.Path):
  import importlib
  rows = [summarize(importlib.import_module(f"configs.{name}").get_config()) for name in ZOO_CONFIGS]
  files.rewrite_block(readme, "zoo", zoo_table(rows))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  zoo, config = flags.FLAGS.zoo, flags.FLAGS.config
  if zoo:
    rows = write_zoo(pathlib.Path(zoo))
    print(json.dumps({"zoo": [r["config"] for r in rows], "readme": zoo}))
    return
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/vits16.py")
  s = summarize(config)
  parts = (f"features {s['encoder_params']:,}, classifier {s['decoder_params']:,} params "
           f"({s['num_classes']:,} classes)" if s["kind"] == "wsl" else
           f"encoder {s['encoder_params'] / 1e6:,.1f} M, decoder {s['decoder_params'] / 1e6:,.1f} M "
           f"params; {s['tokens']} tokens ({s['kept_tokens']} kept)")
  print(f"{s['config']}: {parts}; "
        f"{s['train_gflops_per_image']:,.1f} GFLOP/image per train step, "
        f"{s['embed_gflops_per_image']:,.1f} GFLOP/image to embed", file=sys.stderr)
  print(json.dumps(s))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
