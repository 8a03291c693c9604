r"""Official PyTorch weights in and out of mae_jax checkpoints (docs/interfaces.md §1).

    python -m mae_jax.weights import --from=PATH --config=configs/NAME.py --workdir=DIR \
        [--encoder_only] [--config.K=V ...]
    python -m mae_jax.weights export --ckpt=DIR --to=model.safetensors [--format=timm|maes_microscopy]
    python -m mae_jax.weights export --ckpt=DIR --to=FOLDER/ [--format=...]   # HF-style folder

import: a PyTorch state dict (.safetensors read with numpy; .pth/.pt/.bin need torch) in the
maes_microscopy / timm names, with or without the `encoder.vit_backbone.`, `model.`, `encoder.`
prefixes, becomes an Orbax checkpoint of step 0 in DIR (+ DIR/config.json) that
`python -m eval.recall --ckpt=DIR` embeds with. Every tensor must find its place and every
parameter must be filled; `--encoder_only` fills the encoder and keeps the decoder at its
initialisation (a CA-MAE with model.decoder=shared always: the official CAMAEDecoder maps onto
model.decoder=official_ca only).
export: the checkpoint's parameters as the PyTorch code loads them, float32.
The last stdout line is one JSON object.
"""
import json

from absl import flags
from ml_collections import config_flags

from mae_jax.util import cli

COMMANDS = ("import", "export")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (configs/*.py) to import "
                                          "into.", lock_config=True)
_FROM = flags.DEFINE_string("from", None, "import: the PyTorch state dict (.safetensors, .pth, "
                            ".pt, .bin, or a folder with model.safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", None, "import: the new workdir.")
_ENCODER_ONLY = flags.DEFINE_bool("encoder_only", False, "import: fill the encoder only; the "
                                  "decoder keeps its initialisation (seed config.seed).")
_CKPT = flags.DEFINE_string("ckpt", None, "export: a WORKDIR, its checkpoints/ or a step folder.")
_STEP = flags.DEFINE_integer("step", None, "export: the step (default: the newest).")
_TO = flags.DEFINE_string("to", None, "export: FILE.safetensors, or FOLDER/ for config.json + "
                          "model.safetensors + README.md.")
_FORMAT = flags.DEFINE_enum("format", "timm", ["timm", "maes_microscopy"], "export: 'timm' (the "
                            "encoder as timm's VisionTransformer) or 'maes_microscopy' (the MAE "
                            "as maes' MAEModel: encoder.vit_backbone.*, decoder.*, ...).")


def _require(**values):
  missing = [f"--{k}" for k, v in values.items() if v in (None, "")]
  if missing:
    raise cli.UserError(f"{' and '.join(missing)} required (see --help)")


def main(argv):
  args = argv[1:]
  if len(args) != 1 or args[0] not in COMMANDS:
    got = " ".join(args) or "nothing"
    raise cli.UserError(f"expected one command, import or export, got {got} (see --help)")
  from mae_jax import weights  # pylint: disable=g-import-not-at-top  (jax after flag parsing)
  if args[0] == "import":
    _require(**{"from": flags.FLAGS["from"].value, "config": _CONFIG.value,
                "workdir": _WORKDIR.value})
    result = weights.import_weights(flags.FLAGS["from"].value, _CONFIG.value, _WORKDIR.value,
                                    encoder_only=_ENCODER_ONLY.value)
  else:
    _require(ckpt=_CKPT.value, to=_TO.value)
    result = weights.export_weights(_CKPT.value, _TO.value, _FORMAT.value, step=_STEP.value)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
