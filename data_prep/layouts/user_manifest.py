"""A user's own screen: a CSV with one row per site and one image path per channel column.

Channel columns are those named by --channel_columns, else every column whose whole name is
`ch` or `w` followed by digits (ch1, ch2, ... or w1, w2, ..., any case), in CSV order. Paths are
relative to the CSV's folder (absolute paths work too); TIFF or PNG, 8- or 16-bit, one channel
per file. All other columns become metadata; those in ALIASES feed the standard keys.
"""
import os
import re

from data_prep.layouts import common
from data_prep.layouts.common import ConvertError, Site

SITES_CSV = "sites.csv"
CHANNEL_RE = re.compile(r"(ch|w)\d+", re.IGNORECASE)
# standard key -> CSV columns that may hold it, first present wins.
ALIASES = {
    "well_id": ("well_id",), "experiment": ("experiment", "experiment_name"),
    "plate": ("plate",), "well": ("well", "address"), "site": ("site",),
    "perturbation": ("perturbation", "treatment"), "gene": ("gene",),
    "perturbation_type": ("perturbation_type",), "is_control": ("is_control",),
    "cell_type": ("cell_type",), "concentration": ("concentration",),
    "smiles": ("smiles", "SMILES"),
}
TRUE, FALSE = {"1", "true", "t", "yes", "y"}, {"0", "false", "f", "no", "n", ""}


def channel_columns(header, requested=None, csv_path=""):
  if requested:
    missing = [c for c in requested if c not in header]
    if missing:
      raise ConvertError(f"{csv_path}: --channel_columns names unknown columns "
                         f"{', '.join(missing)}; the CSV has: {', '.join(header)}")
    return list(requested)
  found = [c for c in header if CHANNEL_RE.fullmatch(c)]
  if not found:
    raise ConvertError(f"{csv_path}: no channel columns (ch1, ch2, ... or w1, w2, ...) and no "
                       f"--channel_columns; the CSV has: {', '.join(header)}")
  return found


def list_manifest(root: str, channel_cols=None):
  csv_path = os.path.join(root, SITES_CSV) if os.path.isdir(root) else root
  header, rows = common.read_csv(csv_path)
  channels = channel_columns(header, channel_cols, csv_path)
  used = {k: next((c for c in cols if c in header and c not in channels), None)
          for k, cols in ALIASES.items()}
  extras = [c for c in header if c not in channels and c not in used.values()]
  base = os.path.dirname(os.path.abspath(csv_path))
  sites, lines = [], []
  for line, r in rows:
    std = {k: r[c].strip() for k, c in used.items() if c}
    where = f"{csv_path} line {line}"
    std["site"] = common.parse_int(std.get("site") or "1", f"{where} column {used['site']}")
    flag = std.get("is_control", "").lower()
    if used["is_control"] and flag not in TRUE | FALSE:
      raise ConvertError(f"{where} column is_control: {flag!r}, expected true/false/1/0/yes/no")
    # Without an is_control column, RxRx3's convention: labels such as EMPTY_control.
    std["is_control"] = flag in TRUE if used["is_control"] else std.get(
        "perturbation", "").endswith("_control")
    if not std.get("well_id"):
      std["well_id"] = ("_".join(std.get(k, "") for k in ("experiment", "plate", "well"))
                        if std.get("well") else f"row{line}")
    md = common.make_metadata([(c, r[c]) for c in extras], **std)
    sources = []
    for c in channels:
      if not r[c].strip():
        raise ConvertError(f"{where}: empty path in channel column {c}")
      sources.append(os.path.normpath(os.path.join(base, r[c].strip())))
    key = f"{md['well_id']}_s{md['site']}"
    sites.append(Site(key, md["experiment"], md["plate"], tuple(channels), tuple(sources), md))
    lines.append(line)
  common.check_unique(sites, lines, csv_path)
  common.check_sources(sites, common.FileIndex())
  return sorted(sites, key=Site.sort_key)
