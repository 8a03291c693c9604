"""CellProfiler LoadData CSVs, as JUMP Cell Painting publishes them (docs/data_layouts.md §4b).

One row per site: FileName_Orig<Channel> + PathName_Orig<Channel> per channel, Metadata_Plate,
Metadata_Well, Metadata_Site (and usually Metadata_Source / Metadata_Batch). --root is one CSV or a
folder whose *.csv files (recursively, e.g. one load_data.csv per plate) are read together.
Channels are taken in --channels order (default the five Cell Painting stains). A site stored as
one multi-page TIFF names the same file for every channel; Frame_Orig<Channel> gives each
channel's page (CellProfiler's own column), else the page is the channel's position in --channels.
"""
import os

from data_prep.layouts import common
from data_prep.layouts.common import ConvertError, Site, TiffPage

# Cell Painting's five stains in JUMP's column names (cpg0016: OrigDNA, OrigER, OrigRNA, OrigAGP,
# OrigMito; Brightfield planes are OrigBrightfield / OrigHighZBF / OrigLowZBF).
DEFAULT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
REQUIRED = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
EXPERIMENT_COLUMNS = ("Metadata_Batch", "Metadata_Source")  # first present names the experiment
FILE_PREFIXES = ("FileName_", "PathName_", "Frame_", "Series_", "URL_")


def _csvs(root: str) -> list[str]:
  if not os.path.isdir(root):
    return [root]
  found = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                 if f.lower().endswith(".csv"))
  if not found:
    raise ConvertError(f"{root}: no LoadData CSV (*.csv) in this folder")
  return found


def _is_control(row: dict, perturbation: str) -> bool:
  # JUMP's metadata marks negative controls control_type=negcon (DMSO for compounds); without
  # that column, DMSO or RxRx3's `*_control` labels.
  kind = row.get("Metadata_control_type")
  if kind is not None:
    return kind.strip().lower() == "negcon"
  return perturbation.upper() == "DMSO" or perturbation.endswith("_control")


def list_loaddata(root: str, channels=None, perturbation_column: str | None = None) -> list[Site]:
  channels = tuple(channels or DEFAULT_CHANNELS)
  if len(set(channels)) != len(channels):
    raise ConvertError(f"--channels={','.join(channels)}: a channel is named twice")
  sites, lines, keys = [], [], set()
  for csv_path in _csvs(root):
    header, rows = common.read_csv(csv_path)
    wanted = [f"{p}Orig{c}" for c in channels for p in ("FileName_", "PathName_")]
    missing = [c for c in (*REQUIRED, *wanted) if c not in header]
    if missing:
      found = sorted(h[len("FileName_Orig"):] for h in header if h.startswith("FileName_Orig"))
      raise ConvertError(f"{csv_path}: missing columns {', '.join(missing)} (--channels="
                         f"{','.join(channels)}; the CSV's channels: {', '.join(found) or 'none'})")
    if perturbation_column and perturbation_column not in header:
      raise ConvertError(f"{csv_path}: --perturbation_column={perturbation_column} is not a "
                         f"column; Metadata columns: "
                         f"{', '.join(h for h in header if h.startswith('Metadata_'))}")
    exp_col = next((c for c in EXPERIMENT_COLUMNS if c in header), None)
    extras = [h for h in header if h not in REQUIRED and h != exp_col and h != perturbation_column
              and not h.startswith(FILE_PREFIXES)]
    base = os.path.dirname(os.path.abspath(csv_path)) if not common.is_remote(csv_path) else (
        csv_path.rsplit("/", 1)[0])
    for line, r in rows:
      where = f"{csv_path} line {line}"
      experiment = r[exp_col].strip() if exp_col else ""
      plate, well = r["Metadata_Plate"].strip(), r["Metadata_Well"].strip()
      site = common.parse_int(r["Metadata_Site"].strip() or "1", f"{where} column Metadata_Site")
      perturbation = r[perturbation_column].strip() if perturbation_column else ""
      md = common.make_metadata(
          [(c, r[c]) for c in extras], well_id="_".join(x for x in (experiment, plate, well) if x),
          experiment=experiment, plate=plate, well=well, site=site, perturbation=perturbation,
          is_control=_is_control(r, perturbation))
      paths = []
      for c in channels:
        name, folder = r[f"FileName_Orig{c}"].strip(), r[f"PathName_Orig{c}"].strip()
        if not name:
          raise ConvertError(f"{where}: empty FileName_Orig{c}")
        paths.append(common.join(common.join(base, folder) if folder else base, name))
      sources = tuple(paths)
      if len(set(paths)) < len(paths):  # one multi-page TIFF for the whole site
        frames = [r.get(f"Frame_Orig{c}", "").strip() for c in channels]
        pages = [common.parse_int(f, f"{where} column Frame_Orig{c}") if f else i
                 for i, (c, f) in enumerate(zip(channels, frames))]
        sources = tuple(TiffPage(p, k) for p, k in zip(paths, pages))
      key = f"{md['well_id']}_s{site}"
      if key in keys:
        raise ConvertError(f"{where}: site {key} appears twice")
      keys.add(key)
      sites.append(Site(key, experiment, plate, channels, sources, md))
      lines.append(line)
  common.check_sources(sites, common.FileIndex())
  return sorted(sites, key=Site.sort_key)
