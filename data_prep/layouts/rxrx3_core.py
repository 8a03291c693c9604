"""RxRx3-core: parquet shards with one JPEG-2000 channel image per row (docs/data_layouts.md §3).

Rows carry `__key__` = "{experiment}/Plate{plate}/{address}_s1_{channel}" and `jp2` =
struct{bytes, path}; six rows make a site. Wells join `metadata_rxrx3_core.csv` when present.
"""
import bisect
import collections
import glob
import os
import re

from PIL import features
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.layouts import common
from data_prep.layouts import rxrx
from data_prep.layouts.common import ConvertError, ParquetRef, Site

METADATA_CSV = "metadata_rxrx3_core.csv"
KEY_RE = re.compile(r"([^/]+)/Plate([^/]+)/([A-Za-z]+\d+)_s(\d+)_w?(\d+)")
KEY_FORMAT = "{experiment}/Plate{plate}/{address}_s{site}_{channel}"


def _check_jp2_support():
  if not features.check("jpg_2000"):
    raise ConvertError("this Pillow has no JPEG-2000 support (PIL.features.check('jpg_2000') is "
                       "False); install a Pillow wheel built with OpenJPEG")


def _image_column(path: str, schema: pa.Schema):
  """The binary column that holds the jp2 bytes: `jp2.bytes` (HF Image struct) or `jp2`."""
  names = schema.names
  if "__key__" not in names or "jp2" not in names:
    missing = [c for c in ("__key__", "jp2") if c not in names]
    raise ConvertError(f"{path}: missing columns {', '.join(missing)}; expected columns: __key__, "
                       f"jp2 (struct<bytes, path>); found: {', '.join(names)}")
  t = schema.field("jp2").type
  if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
    return ("jp2", "bytes")
  if pa.types.is_binary(t) or pa.types.is_large_binary(t):
    return ("jp2",)
  raise ConvertError(f"{path}: column jp2 has type {t}, expected struct<bytes: binary, "
                     "path: string>")


def list_rxrx3_core(root: str, metadata: str | None = None):
  _check_jp2_support()
  files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
  if not files:
    raise ConvertError(f"no *.parquet files under {root} (expected e.g. "
                       "data/train-00000-of-00035.parquet)")
  planes = collections.defaultdict(dict)  # (experiment, plate, address, site) -> {channel: ref}
  for path in files:
    try:
      pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
      raise ConvertError(f"cannot read parquet file {path}: {' '.join(str(e).split())}") from None
    _image_column(path, pf.schema_arrow)
    for row, key in enumerate(pf.read(columns=["__key__"]).column(0).to_pylist()):
      m = KEY_RE.fullmatch(key or "")
      if not m:
        raise ConvertError(f"{path} row {row}: __key__ {key!r} does not match {KEY_FORMAT}")
      exp, plate, address, site, channel = m.groups()
      slot = planes[(exp, plate, address, int(site))]
      name = f"w{int(channel)}"
      if name in slot:
        raise ConvertError(f"__key__ {key!r} appears twice: {common.describe(slot[name])} and "
                           f"{path} row {row}")
      slot[name] = ParquetRef(path, row, key)

  channels = tuple(sorted({c for slot in planes.values() for c in slot}, key=common.natural_key))
  csv_path = metadata or os.path.join(root, METADATA_CSV)
  rows = {}
  if metadata or os.path.exists(csv_path):
    rows = {r["well_id"]: r for _, r in common.read_csv(csv_path, rxrx.RXRX3_COLUMNS)[1]}

  sites = []
  for (exp, plate, address, site), slot in planes.items():
    where = f"{exp}/Plate{plate}/{address}_s{site}"
    missing = [c for c in channels if c not in slot]
    if missing:
      raise ConvertError(f"site {where}: no parquet row for channel {', '.join(missing)} "
                         f"(other sites have {', '.join(channels)})")
    well_id = f"{exp}_{plate}_{address}"
    if rows:
      if well_id not in rows:
        raise ConvertError(f"site {where}: well {well_id} has no row in {csv_path}")
      md = rxrx.rxrx3_metadata(rows[well_id], site)
    else:
      md = common.make_metadata(well_id=well_id, experiment=exp, plate=plate, well=address,
                                site=site, is_control=False)
    sources = tuple(slot[c] for c in channels)
    sites.append(Site(f"{well_id}_s{site}", exp, plate, channels, sources, md))
  return sorted(sites, key=Site.sort_key)


class ParquetCache:
  """Reads jp2 cells row group by row group, keeping the last few groups (reads are in order)."""

  def __init__(self, max_groups: int = 2):
    self._files = {}
    self._groups = collections.OrderedDict()
    self._max = max_groups

  def get(self, ref: ParquetRef) -> bytes:
    if ref.path not in self._files:
      pf = pq.ParquetFile(ref.path)
      starts = [0]
      for i in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
      self._files[ref.path] = (pf, starts, _image_column(ref.path, pf.schema_arrow))
    pf, starts, column = self._files[ref.path]
    group = bisect.bisect_right(starts, ref.row) - 1
    gkey = (ref.path, group)
    if gkey not in self._groups:
      table = pf.read_row_group(group, columns=["jp2"])
      arr = table.column(0).combine_chunks()
      if len(column) == 2:
        arr = arr.field("bytes")
      self._groups[gkey] = arr
      while len(self._groups) > self._max:
        self._groups.popitem(last=False)
    self._groups.move_to_end(gkey)
    value = self._groups[gkey][ref.row - starts[group]].as_py()
    if value is None:
      raise ConvertError(f"{common.describe(ref)}: empty jp2 cell")
    return value
