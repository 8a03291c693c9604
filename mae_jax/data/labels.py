"""The classes of a weakly supervised (WSL) run: each site's perturbation label, from its records.

    names, controls = site_labels(source, "gene", manifest_path)   # one entry per record
    vocab = vocabulary(names, controls, label_key="gene", controls="class")
    ids = encode(names, controls, vocab, where)        # int32 class per record; -1: not trained on

The vocabulary is built once, at the start of a run, and kept in WORKDIR/labels.json (`save`,
`load`): a resumed run keeps its classes even if the screen grows. The label is any metadata
field of the records (`gene` by default, or `perturbation` for the guide / siRNA, as the
RxRx1 WSL baselines classify siRNAs). Control sites (`is_control`, else a label ending in
"_control", as data_prep.convert decides) are either classes like any other label
(`controls="class"`) or not trained on (`"exclude"`).
"""
from __future__ import annotations

import collections
import json

import numpy as np

from mae_jax.util import files
from mae_jax.util.errors import UserError

CONTROLS = ("class", "exclude")


class LabelError(UserError, ValueError):
  """Labels that cannot be read or do not fit the run's vocabulary (one line)."""


def site_labels(source, label_key: str, where) -> tuple[list[str], np.ndarray]:
  """(label of every record, whether it is a control) from the records' metadata."""
  names, controls = [], np.zeros(len(source), bool)
  for i in range(len(source)):
    meta = source.metadata(i)
    if label_key not in meta:
      raise LabelError(f"{where}: record {i} ({meta.get('well_id', 'no well_id')}) has no "
                       f"metadata field {label_key!r} for wsl.label_key; it has "
                       f"{', '.join(sorted(meta)) or 'none'}")
    name = str(meta[label_key])
    names.append(name)
    flag = meta.get("is_control")
    controls[i] = bool(flag) if flag not in (None, "") else name.endswith("_control")
  return names, controls


def vocabulary(names, controls, *, label_key: str, controls_mode: str) -> dict:
  """{"label_key", "controls", "classes": sorted labels, "counts": records per class}."""
  if controls_mode not in CONTROLS:
    raise LabelError(f"wsl.controls={controls_mode!r}: expected one of {', '.join(CONTROLS)}")
  keep = [n for n, c in zip(names, controls) if controls_mode == "class" or not c]
  counts = collections.Counter(keep)
  classes = sorted(counts)
  if len(classes) < 2:
    raise LabelError(f"wsl.label_key={label_key!r}: {len(classes)} class(es) to train on; a "
                     f"classifier needs at least 2")
  return dict(label_key=label_key, controls=controls_mode, classes=classes,
              counts=[counts[c] for c in classes])


def encode(names, controls, vocab: dict, where) -> np.ndarray:
  """int32 class id of every record; -1 for excluded controls. A label outside the vocabulary
  (a resumed run on another screen) is an error naming it."""
  index = {name: i for i, name in enumerate(vocab["classes"])}
  excluded = vocab["controls"] == "exclude"
  ids = np.full(len(names), -1, np.int32)
  for i, (name, control) in enumerate(zip(names, controls)):
    if excluded and control:
      continue
    if name not in index:
      raise LabelError(f"{where}: record {i} has label {name!r}, which is not one of the "
                       f"{len(index)} classes this run was started with; use a new workdir")
    ids[i] = index[name]
  return ids


def save(path, vocab: dict) -> None:
  files.write(path, json.dumps(vocab, indent=1) + "\n")


def load(path) -> dict:
  try:
    vocab = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise LabelError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(vocab, dict) or not isinstance(vocab.get("classes"), list):
    raise LabelError(f"{path}: field 'classes': expected the list of class labels")
  return vocab
