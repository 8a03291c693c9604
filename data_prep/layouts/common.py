"""What every layout reader shares: the `Site` record, CSV and image reading, checks, errors."""
import csv
import dataclasses
import io
import os
import re
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from mae_jax.util.errors import UserError

# Written in this order, so that records of every layout have the same feature layout.
STANDARD_KEYS = ("well_id", "experiment", "plate", "well", "site", "perturbation", "gene",
                 "perturbation_type", "is_control", "cell_type", "concentration", "smiles")


class ConvertError(UserError, ValueError):
  """A mistake in the user's data or flags; the message is one line naming file/site/field."""


class TiffPage(NamedTuple):
  """One channel stored as a page of a multi-page TIFF holding the whole site (a LoadData CSV
  whose channels name one file with Frame_Orig<Channel> pages, docs/data_layouts.md §4b)."""
  path: str
  page: int


class ParquetRef(NamedTuple):
  """One channel image stored as a JPEG-2000 cell in a parquet file (RxRx3-core)."""
  path: str
  row: int
  key: str


@dataclasses.dataclass
class Site:
  """One site (field of view) of a screen: where its channel images are and what it is."""
  key: str                      # unique within the screen, e.g. RxRx1's site_id
  experiment: str
  plate: str
  channels: tuple[str, ...]
  sources: tuple[Any, ...]      # per channel: a file path or a ParquetRef
  metadata: dict[str, Any]      # STANDARD_KEYS first, then the layout's extra columns

  def sort_key(self):
    m = self.metadata
    return (natural_key(self.experiment), natural_key(self.plate), well_key(m["well"]),
            m["site"], self.key)


def natural_key(text: str):
  """'Plate10' after 'Plate9'; digits compare as numbers."""
  return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
               for t in re.split(r"(\d+)", text) if t)


def well_key(address: str):
  """Plate order of addresses: rows A..Z before AA..AF (1536-well plates), then the column."""
  m = re.fullmatch(r"([A-Za-z]*)(\d*)(.*)", address)
  letters, digits, rest = m.groups()
  return (len(letters), letters.upper(), int(digits) if digits else -1, rest)


def make_metadata(extras: Sequence[tuple[str, Any]] = (), **standard) -> dict[str, Any]:
  unknown = set(standard) - set(STANDARD_KEYS)
  assert not unknown, unknown
  md = {k: standard.get(k, "") for k in STANDARD_KEYS}
  md["site"] = int(md["site"] or 1)
  md["is_control"] = bool(md["is_control"])
  for k, v in extras:
    md.setdefault(k, v)
  return md


def describe(source) -> str:
  if isinstance(source, ParquetRef):
    return f"{source.path} row {source.row} ({source.key})"
  if isinstance(source, TiffPage):
    return f"{source.path} page {source.page}"
  return str(source)


def is_remote(path) -> bool:
  """gs://, s3://, ...: read through etils.epath (which grain and orbax already bring)."""
  return "://" in str(path)


def open_file(path: str, mode: str = "r"):
  """open(), or etils.epath for an object store, so a screen may live in a bucket."""
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).open(mode, **({} if "b" in mode else {"encoding": "utf-8-sig"}))
  return open(path, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8-sig"}))


def join(base: str, path: str) -> str:
  """`path` relative to `base` (absolute paths and URLs stay as they are), normalised."""
  if is_remote(path) or os.path.isabs(path):
    return path if is_remote(path) else os.path.normpath(path)
  if is_remote(base):
    return base.rstrip("/") + "/" + path
  return os.path.normpath(os.path.join(base, path))


def parse_int(value: str, what: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ConvertError(f"{what}: {value!r} is not an integer") from None


# ---------------------------------------------------------------- CSV


def read_csv(path: str, expected: Sequence[str] | None = None, exact: bool = True):
  """Returns (header, [(line_number, row dict)]); checks the header against `expected`."""
  if not (os.path.isfile(path) or is_remote(path) and _remote_exists(path)):
    raise ConvertError(f"missing metadata file {path}")
  with open_file(path) as f:
    reader = csv.DictReader(f)
    header = list(reader.fieldnames or [])
    if not header:
      raise ConvertError(f"{path}: empty file, expected a CSV header")
    if expected is not None:
      missing = [c for c in expected if c not in header]
      unknown = [c for c in header if c not in expected] if exact else []
      if missing or unknown:
        parts = ([f"missing columns {', '.join(missing)}"] if missing else []) + (
            [f"unknown columns {', '.join(unknown)}"] if unknown else [])
        raise ConvertError(f"{path}: {'; '.join(parts)}; expected columns: {', '.join(expected)}")
    if len(set(header)) != len(header):
      dup = sorted({c for c in header if header.count(c) > 1})
      raise ConvertError(f"{path}: duplicate columns {', '.join(dup)}")
    rows = []
    for row in reader:
      if None in row or None in row.values():
        got = len(header) + len(row.get(None, [])) - list(row.values()).count(None)
        raise ConvertError(f"{path} line {reader.line_num}: expected {len(header)} fields, "
                           f"got {got}")
      rows.append((reader.line_num, row))
  if not rows:
    raise ConvertError(f"{path}: no data rows")
  return header, rows


def _remote_exists(path: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).exists()


class FileIndex:
  """Existence checks by listing each folder once (millions of stat calls are slow on NFS)."""

  def __init__(self):
    self._listings: dict[str, frozenset[str] | None] = {}

  def folder_exists(self, folder: str) -> bool:
    return self._listing(folder) is not None

  def exists(self, path: str) -> bool:
    listing = self._listing(os.path.dirname(path))
    return listing is not None and os.path.basename(path) in listing

  def _listing(self, folder):
    if folder not in self._listings:
      try:
        if is_remote(folder):
          from etils import epath  # pylint: disable=g-import-not-at-top
          self._listings[folder] = frozenset(p.name for p in epath.Path(folder).iterdir())
        else:
          self._listings[folder] = frozenset(os.listdir(folder or "."))
      except (FileNotFoundError, NotADirectoryError):
        self._listings[folder] = None
    return self._listings[folder]


def check_sources(sites: Sequence[Site], files: FileIndex):
  for site in sites:
    for channel, path in zip(site.channels, site.sources):
      path = path.path if isinstance(path, TiffPage) else path
      if not files.exists(path):
        raise ConvertError(f"missing channel file {path} (channel {channel} of site {site.key})")


def check_unique(sites: Sequence[Site], lines: Sequence[int], where: str):
  seen = {}
  for site, line in zip(sites, lines):
    if site.key in seen:
      raise ConvertError(f"{where}: site {site.key} appears twice (lines {seen[site.key]} and "
                         f"{line})")
    seen[site.key] = line


# ---------------------------------------------------------------- images


def _from_pil(im: Image.Image, what: str) -> np.ndarray:
  if im.mode == "L":
    return np.asarray(im, dtype=np.uint8)
  if im.mode.startswith("I;16"):
    return np.asarray(im).astype(np.uint16)
  if im.mode == "I":  # some 16-bit files open as 32-bit; keep them if the values fit
    a = np.asarray(im)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ConvertError(f"{what}: 32-bit values outside 0..65535; expected 8- or 16-bit")
    return a.astype(np.uint16)
  raise ConvertError(f"{what}: image mode {im.mode}, expected one 8- or 16-bit grayscale "
                     "channel per file")


def _tiff_plane(a: np.ndarray, what: str) -> np.ndarray:
  a = a.reshape([d for d in a.shape if d != 1] if a.ndim > 2 else a.shape)
  if a.ndim != 2:
    raise ConvertError(f"{what}: shape {a.shape}, expected one 2-D channel per file (or per "
                       "page of a multi-page TIFF)")
  if a.dtype not in (np.uint8, np.uint16):
    raise ConvertError(f"{what}: dtype {a.dtype}, expected 8- or 16-bit unsigned integers")
  return a


def read_plane(source, parquet=None) -> np.ndarray:
  """One channel image as a 2-D uint8/uint16 array."""
  what = describe(source)
  try:
    if isinstance(source, ParquetRef):
      with Image.open(io.BytesIO(parquet.get(source))) as im:
        return _from_pil(im, what)
    path = source.path if isinstance(source, TiffPage) else source
    f = open_file(path, "rb") if is_remote(path) else path
    if path.lower().endswith((".tif", ".tiff")):
      import tifffile  # pylint: disable=g-import-not-at-top
      if isinstance(source, TiffPage):
        with tifffile.TiffFile(f) as tif:
          if not 0 <= source.page < len(tif.pages):
            raise ConvertError(f"{what}: the file has {len(tif.pages)} pages")
          return _tiff_plane(tif.pages[source.page].asarray(), what)
      return _tiff_plane(tifffile.imread(f), what)
    with Image.open(f) as im:
      return _from_pil(im, what)
  except ConvertError:
    raise
  except (OSError, ValueError, SyntaxError, KeyError, Image.DecompressionBombError) as e:
    msg = " ".join(str(e).split())
    raise ConvertError(f"cannot read image {what}: {msg}") from None


def fmt(plane: np.ndarray) -> str:
  return f"{'x'.join(map(str, plane.shape))} {plane.dtype}"


def stack_site(site: Site, planes: Sequence[np.ndarray]) -> np.ndarray:
  """HWC image; every channel must have the first channel's size and bit depth."""
  ref = planes[0]
  for channel, source, p in zip(site.channels, site.sources, planes):
    if p.shape != ref.shape or p.dtype != ref.dtype:
      raise ConvertError(
          f"site {site.key}: channel {channel} ({describe(source)}) is {fmt(p)} but channel "
          f"{site.channels[0]} ({describe(site.sources[0])}) is {fmt(ref)}")
  return np.stack(planes, axis=-1)
