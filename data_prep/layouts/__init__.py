"""Readers for screens on disk: each layout lists its sites (sorted), and `iter_images` loads them.

    sites = layouts.list_sites("rxrx1", "/data/rxrx1")
    for site, image in layouts.iter_images(sites):  # image: HWC uint8/uint16
      ...
"""
import json
import os

from data_prep.layouts.common import ConvertError, ParquetRef, Site, STANDARD_KEYS  # noqa: F401
from data_prep.layouts import common
from data_prep.layouts import loaddata
from data_prep.layouts import rxrx
from data_prep.layouts import rxrx3_core
from data_prep.layouts import user_manifest

LAYOUTS = ("rxrx1", "rxrx3", "rxrx3_core", "manifest", "loaddata")
# The real site size and bit depth of each layout (docs/data_layouts.md); None: the user's choice
# (LoadData: JUMP sites are 1080² 16-bit, other screens differ).
REAL_SIZE = {"rxrx1": 512, "rxrx3": 2048, "rxrx3_core": 512, "manifest": None, "loaddata": None}
REAL_DTYPE = {"rxrx1": "uint8", "rxrx3": "uint16", "rxrx3_core": "uint8", "manifest": None,
              "loaddata": None}
# A screen that states its own site size and bit depth: data_prep.synthetic writes them into
# ROOT/ground_truth/screen.json (docs/data_layouts.md §6); convert uses them over REAL_SIZE.
SCREEN_METADATA = os.path.join("ground_truth", "screen.json")


def declared_format(layout: str, root: str) -> dict | None:
  """{"image_size", "dtype", "path"} that the screen's own metadata states, or None."""
  path = os.path.join(root, SCREEN_METADATA)
  if not os.path.isdir(root) or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path}: unreadable screen metadata ({e}); remove it or fix it") from None
  if not isinstance(meta, dict) or meta.get("layout", layout) != layout:
    return None
  size, bits = meta.get("image_size"), meta.get("bit_depth")
  if not (isinstance(size, int) and size > 0) or bits not in (8, 16):
    raise ConvertError(f"{path}: expected a positive integer image_size and bit_depth 8 or 16, "
                       f"got {size!r} and {bits!r}")
  return {"image_size": size, "dtype": f"uint{bits}", "path": path}


def list_sites(layout: str, root: str, metadata: str | None = None,
               channel_columns=None, skip_missing_plates: bool = False, channels=None,
               perturbation_column: str | None = None) -> list[Site]:
  if layout == "rxrx1":
    return rxrx.list_rxrx1(root, metadata, skip_missing_plates)
  if layout == "rxrx3":
    return rxrx.list_rxrx3(root, metadata, skip_missing_plates)
  if layout == "rxrx3_core":
    return rxrx3_core.list_rxrx3_core(root, metadata)
  if layout == "manifest":
    return user_manifest.list_manifest(root, channel_columns)
  if layout == "loaddata":
    return loaddata.list_loaddata(root, channels, perturbation_column)
  raise ConvertError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def iter_planes(sites):
  """Yields (site, [2-D array per channel]) in order."""
  cache = rxrx3_core.ParquetCache()
  for site in sites:
    yield site, [common.read_plane(src, cache) for src in site.sources]


def iter_images(sites):
  """Yields (site, HWC array), checking channels agree in size and bit depth."""
  for site, planes in iter_planes(sites):
    yield site, common.stack_site(site, planes)
