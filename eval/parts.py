"""A well table written in parts, one per process (`eval.embed --out=DIR` under jax.distributed).

  DIR/wells-00000-of-00002.parquet   process 0's wells (profile table, eval/profiles.py)
  DIR/wells-00000-of-00002.json      written after its parquet: the part is complete, with the
                                     settings it was embedded with (a rerun skips it only when
                                     they are the same) and its counts
  DIR/index.json                     written by process 0 once every part is complete

Processes split the screen by wells, never inside one (a well's embedding is the mean of its
sites), in manifest order and balanced by site count, so the parts read in order are the
one-process table row for row.
"""
import json
import os
import re

import numpy as np
from etils import epath

from eval import EvalError

PART = re.compile(r"^wells-(\d{5})-of-(\d{5})\.parquet$")
INDEX = "index.json"


def part_name(index: int, count: int) -> str:
  return f"wells-{index:05d}-of-{count:05d}.parquet"


def marker_path(part_path) -> str:
  return os.fspath(part_path)[:-len(".parquet")] + ".json"


def well_ids(site_meta) -> list:
  """Each site's well: its `well_id`, else experiment_plate_well."""
  return [str(m.get("well_id") or f"{m.get('experiment', '')}_{m.get('plate', '')}_"
                                   f"{m.get('well', '')}") for m in site_meta]


def split_sites(site_meta, count: int) -> list:
  """`count` arrays of site indices: whole wells, in order of first appearance, balanced by sites.

  A well goes to the process whose share of the screen's sites its middle site falls in.
  """
  wells = well_ids(site_meta)
  order = {w: i for i, w in enumerate(dict.fromkeys(wells))}
  codes = np.array([order[w] for w in wells], np.int64)
  sizes = np.bincount(codes, minlength=len(order))
  middle = np.cumsum(sizes) - sizes / 2
  owner = np.minimum((middle * count / max(len(wells), 1)).astype(np.int64), count - 1)
  ranked = np.argsort(codes, kind="stable")  # sites grouped by well, wells in first-seen order
  return [ranked[owner[codes[ranked]] == p] for p in range(count)]


def finished(part_path, settings: dict) -> dict | None:
  """The marker of a complete part embedded with `settings`, else None.

  A part embedded with other settings (another checkpoint, pooling, ...) is a user mistake:
  mixing them would make one table of two embeddings.
  """
  marker = epath.Path(marker_path(part_path))
  if not (marker.exists() and epath.Path(part_path).exists()):
    return None
  done = json.loads(marker.read_text())
  if done.get("settings") != settings:
    changed = sorted(k for k in set(settings) | set(done.get("settings", {}))
                     if settings.get(k) != done.get("settings", {}).get(k))
    raise EvalError(f"{part_path}: embedded with other settings ({', '.join(changed)}); "
                    f"use a new --out folder")
  return done


def write_marker(part_path, settings: dict, counts: dict):
  from mae_jax.util import files
  with files.atomic_open(marker_path(part_path), "w") as f:
    json.dump({"part": os.path.basename(part_path), "settings": settings, **counts}, f,
              indent=1)


def write_index(folder, count: int) -> dict:
  """DIR/index.json: every part with its counts (process 0, once all parts are complete)."""
  from mae_jax.util import files
  parts = [json.loads(epath.Path(marker_path(os.path.join(folder, part_name(i, count))))
                     .read_text()) for i in range(count)]
  index = {"parts": [p["part"] for p in parts], "processes": count,
           "wells": sum(p["wells"] for p in parts), "sites": sum(p["sites"] for p in parts),
           "settings": parts[0]["settings"], "per_part": parts}
  with files.atomic_open(os.path.join(folder, INDEX), "w") as f:
    json.dump(index, f, indent=1)
  return index


def list_parts(folder) -> list:
  """The parquet parts of `folder` in order; one line naming what is missing if incomplete."""
  names = sorted(p.name for p in epath.Path(folder).iterdir() if p.name.endswith(".parquet"))
  numbered = [PART.match(n) for n in names]
  if names and all(numbered):
    counts = {int(m.group(2)) for m in numbered}
    if len(counts) > 1:
      raise EvalError(f"{folder}: parts of {len(counts)} different runs "
                      f"({', '.join(sorted(f'-of-{c:05d}' for c in counts))}); keep one")
    (count,) = counts
    missing = sorted(set(range(count)) - {int(m.group(1)) for m in numbered})
    if missing:
      raise EvalError(f"{folder}: {len(missing)} of {count} parts missing "
                      f"({part_name(missing[0], count)}…): a process of eval.embed did not "
                      f"finish; rerun it with the same flags")
  return [os.path.join(os.fspath(folder), n) for n in names]
