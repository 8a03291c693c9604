"""PyTorch state dicts on disk: read .safetensors (numpy, no torch) or .pth/.pt/.bin (torch), write
.safetensors or a Hugging Face-style folder.

    sd = read_state_dict("model.safetensors")   # {name: np.ndarray}; a folder: its model file
    write_safetensors("out.safetensors", sd, metadata={"format": "pt"})
    write_folder("out/", sd, config_json, card_text)

OpenPhenom's `model.safetensors` is in fact a `torch.save` zip of {"state_dict": ...}; such a
file is read through torch when torch is installed and refused with one line otherwise.
"""
import json
import os
import pathlib

import numpy as np

from mae_jax.util import files
from mae_jax.weights.convert import WeightsError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
WRAPPERS = ("state_dict", "model", "module")  # {"state_dict": {...}} as torch.save'd by trainers


def _torch_magic(path) -> bool:
  with open(path, "rb") as f:
    head = f.read(4)
  return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # zip (torch.save) or pickle


def resolve_file(path) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise WeightsError(f"{path} does not exist")
  if path.is_dir():
    for name in FOLDER_FILES:
      if (path / name).is_file():
        return path / name
    raise WeightsError(f"{path} is a folder without {' or '.join(FOLDER_FILES)}")
  return path


def read_state_dict(path) -> dict:
  """{name: np.ndarray} of a .safetensors (numpy only) or torch file (needs torch)."""
  path = resolve_file(path)
  if path.suffix == ".safetensors" and not _torch_magic(path):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(str(path)))
    except (SafetensorError, TypeError, ValueError) as e:  # bf16 has no numpy dtype
      raise WeightsError(f"{path}: not readable as safetensors with numpy: {e}") from None
  if path.suffix not in TORCH_SUFFIXES + (".safetensors",):
    raise WeightsError(f"{path}: expected a .safetensors, {', '.join(TORCH_SUFFIXES)} file")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    what = ("a torch.save file despite its .safetensors name (as OpenPhenom's is)"
            if path.suffix == ".safetensors" else "a PyTorch file")
    raise WeightsError(f"{path} is {what}: install torch (pip install torch) to read it, or "
                       f"convert it to .safetensors where torch is") from None
  with open(path, "rb") as f:  # a file object: torch >= 2.14 hands a *.safetensors path to safetensors
    obj = torch.load(f, map_location="cpu", weights_only=True)
  while isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in WRAPPERS:
    obj = next(iter(obj.values()))
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]  # a trainer checkpoint: {"state_dict", "optimizer", "epoch", ...}
  if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
    raise WeightsError(f"{path}: not a state dict of tensors (a pickled module or a trainer "
                       f"checkpoint with more than a state dict?)")
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
          for k, v in obj.items()}


def write_safetensors(path, state_dict: dict, metadata: dict | None = None):
  """Atomic .safetensors of float32 contiguous arrays ("format": "pt" as torch's writer sets)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
  files.write(path, save(arrays, metadata=meta))


def is_folder_target(to) -> bool:
  """`--to=FOLDER/` (a trailing separator, or an existing folder) asks for the HF-style folder."""
  text = os.fspath(to)
  return text.endswith(("/", os.sep)) or pathlib.Path(text).is_dir()


def write_folder(folder, state_dict: dict, config: dict, card: str, metadata=None):
  """FOLDER/{config.json, model.safetensors, README.md}."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  write_safetensors(folder / "model.safetensors", state_dict, metadata)
  files.write(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
  files.write(folder / "README.md", card)
  return [str(folder / n) for n in ("config.json", "model.safetensors", "README.md")]
