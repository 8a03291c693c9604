"""One shard of a conversion: write it, or tell that it is finished (docs/data_layouts.md §5).

Shared by the local processes of data_prep/convert.py and the Beam workers of
data_prep/beam_convert.py, so a shard's bytes do not depend on what wrote it.
"""
import dataclasses
import json
import os
import pathlib

import numpy as np

from data_prep import layouts
from data_prep.layouts import common
from data_prep.layouts.common import ConvertError, Site
from mae_jax.data import records
from mae_jax.util import files

STATS_SUFFIX = ".stats.json"


@dataclasses.dataclass
class Task:
  path: str                # shard path relative to --out
  sites: list[Site]
  digest: str = ""         # of everything that goes into the shard; stored in its .stats.json


def _check(site: Site, image: np.ndarray, expect: dict):
  if list(image.shape) != expect["shape"] or image.dtype.name != expect["dtype"]:
    got = f"{'x'.join(map(str, image.shape))} {image.dtype}"
    want = f"{'x'.join(map(str, expect['shape']))} {expect['dtype']}"
    raise ConvertError(f"site {site.key} ({common.describe(site.sources[0])}) is {got} but site "
                       f"{expect['ref']} ({expect['ref_source']}) is {want}; all sites must match")


def _channel_stats(hist: np.ndarray) -> dict:
  """Exact integer sums from per-channel histograms (so reruns give identical floats)."""
  out = {"pixels": int(hist[0].sum()), "sum": [], "sumsq": [], "min": [], "max": []}
  for h in hist:
    nz = np.flatnonzero(h)
    counts = [int(n) for n in h[nz]]
    values = [int(v) for v in nz]
    out["sum"].append(sum(n * v for n, v in zip(counts, values)))
    out["sumsq"].append(sum(n * v * v for n, v in zip(counts, values)))
    out["min"].append(values[0] if values else 0)
    out["max"].append(values[-1] if values else 0)
  return out


def write_shard(task: Task, out: str, expect: dict, on_site=None) -> dict:
  path = os.path.join(out, task.path)
  bins = 1 << (8 * np.dtype(expect["dtype"]).itemsize)
  hist = np.zeros((expect["shape"][2], bins), np.int64)
  with records.ShardWriter(path) as writer:
    for site, planes in layouts.iter_planes(task.sites):
      image = common.stack_site(site, planes)
      _check(site, image, expect)
      for c, plane in enumerate(planes):
        hist[c] += np.bincount(plane.ravel(), minlength=bins)
      writer.write(image, site.channels, site.metadata)
      if on_site:
        on_site()
    stats = {"digest": task.digest, "records": writer.count, **_channel_stats(hist)}
    # Written before the writer renames the shard: a finished shard always has its stats.
    files.write(path + STATS_SUFFIX, json.dumps(stats, sort_keys=True))
  return stats


def out_path(out: str, relative: str = ""):
  """A path under --out: pathlib locally, etils.epath on an object store (gs://...)."""
  if common.is_remote(out):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(out) / relative
  return pathlib.Path(out) / relative


def finished(task: Task, out: str) -> dict | None:
  path = out_path(out, task.path)
  if not (path.is_file() and path.with_name(path.name + ".idx").is_file()):
    return None
  try:
    stats = json.loads(path.with_name(path.name + STATS_SUFFIX).read_text())
  except (OSError, ValueError):
    return None
  ok = stats.get("digest") == task.digest and stats.get("records") == len(task.sites)
  return stats if ok else None


def clear_leftovers(task: Task, out: str) -> None:
  """Removes the temporary files a killed writer of `task` left (PATH.tmp.PID, ...)."""
  path = out_path(out, task.path)
  for f in path.parent.glob(path.name + ".*"):
    if ".tmp" in f.name[len(path.name):]:
      f.unlink(missing_ok=True)  # a stopping writer may remove or rename it meanwhile
