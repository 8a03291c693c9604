"""Readers for screens on disk: each layout lists its sites (sorted), and `iter_images` loads them.

    sites = layouts.list_sites("rxrx1", "/data/rxrx1")
    for site, image in layouts.iter_images(sites):  # image: HWC uint8/uint16
      ...
"""
from data_prep.layouts.common import ConvertError, ParquetRef, Site, STANDARD_KEYS  # noqa: F401
from data_prep.layouts import common
from data_prep.layouts import rxrx
from data_prep.layouts import rxrx3_core
from data_prep.layouts import user_manifest

LAYOUTS = ("rxrx1", "rxrx3", "rxrx3_core", "manifest")
# The real site size and bit depth of each layout (docs/data_layouts.md); None: the user's choice.
REAL_SIZE = {"rxrx1": 512, "rxrx3": 2048, "rxrx3_core": 512, "manifest": None}
REAL_DTYPE = {"rxrx1": "uint8", "rxrx3": "uint16", "rxrx3_core": "uint8", "manifest": None}


def list_sites(layout: str, root: str, metadata: str | None = None,
               channel_columns=None, skip_missing_plates: bool = False) -> list[Site]:
  if layout == "rxrx1":
    return rxrx.list_rxrx1(root, metadata, skip_missing_plates)
  if layout == "rxrx3":
    return rxrx.list_rxrx3(root, metadata, skip_missing_plates)
  if layout == "rxrx3_core":
    return rxrx3_core.list_rxrx3_core(root, metadata)
  if layout == "manifest":
    return user_manifest.list_manifest(root, channel_columns)
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
