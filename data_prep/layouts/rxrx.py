"""RxRx1 and RxRx3: metadata.csv + one PNG per channel (docs/data_layouts.md §1-2)."""
import os
import sys

from data_prep.layouts import common
from data_prep.layouts.common import ConvertError, Site

RXRX1_COLUMNS = ("site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well",
                 "site", "well_type", "sirna", "sirna_id")
RXRX3_COLUMNS = ("well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES",
                 "concentration", "perturbation_type", "cell_type")
CHANNELS = tuple(f"w{c}" for c in range(1, 7))


def _finish(sites, lines, csv_path, files, skip_missing_plates):
  """Drops sites of absent plate folders (if asked), checks every channel file, sorts."""
  if skip_missing_plates:
    keep = [files.folder_exists(os.path.dirname(s.sources[0])) for s in sites]
    dropped = {(s.experiment, s.plate) for s, k in zip(sites, keep) if not k}
    if dropped:
      print(f"convert: skipping {keep.count(False)} sites of {len(dropped)} plates with no image "
            "folder (--skip_missing_plates)", file=sys.stderr)
    sites = [s for s, k in zip(sites, keep) if k]
    lines = [n for n, k in zip(lines, keep) if k]
    if not sites:
      raise ConvertError(f"{csv_path}: none of its plates has an image folder")
  common.check_unique(sites, lines, csv_path)
  common.check_sources(sites, files)
  return sorted(sites, key=Site.sort_key)


def list_rxrx1(root: str, metadata: str | None = None, skip_missing_plates: bool = False):
  """RxRx1: images/{experiment}/Plate{plate}/{well}_s{site}_w{1..6}.png, 512² 8-bit."""
  csv_path = metadata or os.path.join(root, "metadata.csv")
  _, rows = common.read_csv(csv_path, RXRX1_COLUMNS)
  sites, lines = [], []
  for line, r in rows:
    site = common.parse_int(r["site"], f"{csv_path} line {line} column site")
    folder = os.path.join(root, "images", r["experiment"], f"Plate{r['plate']}")
    md = common.make_metadata(
        [("site_id", r["site_id"]), ("dataset", r["dataset"]), ("well_type", r["well_type"]),
         ("sirna", r["sirna"]), ("sirna_id", r["sirna_id"])],
        well_id=r["well_id"], experiment=r["experiment"], plate=r["plate"], well=r["well"],
        site=site, perturbation=r["sirna"], perturbation_type="siRNA",
        # Positive controls are strong phenotypes, not a baseline: only negatives are controls.
        is_control=r["well_type"] == "negative_control", cell_type=r["cell_type"])
    sources = tuple(os.path.join(folder, f"{r['well']}_s{site}_{c}.png") for c in CHANNELS)
    sites.append(Site(r["site_id"], r["experiment"], r["plate"], CHANNELS, sources, md))
    lines.append(line)
  return _finish(sites, lines, csv_path, common.FileIndex(), skip_missing_plates)


def rxrx3_metadata(r: dict, site: int = 1) -> dict:
  """Standard metadata of one row of an RxRx3 / RxRx3-core metadata CSV."""
  return common.make_metadata(
      well_id=r["well_id"], experiment=r["experiment_name"], plate=r["plate"], well=r["address"],
      site=site, perturbation=r["treatment"], gene=r["gene"],
      perturbation_type=r["perturbation_type"], is_control=r["treatment"].endswith("_control"),
      cell_type=r["cell_type"], concentration=r["concentration"], smiles=r["SMILES"])


def list_rxrx3(root: str, metadata: str | None = None, skip_missing_plates: bool = False):
  """RxRx3: images/{experiment_name}/Plate{plate}/{address}_s1_w{1..6}.png, 2048² 16-bit."""
  csv_path = metadata or os.path.join(root, "metadata.csv")
  _, rows = common.read_csv(csv_path, RXRX3_COLUMNS)
  sites, lines = [], []
  for line, r in rows:
    folder = os.path.join(root, "images", r["experiment_name"], f"Plate{r['plate']}")
    sources = tuple(os.path.join(folder, f"{r['address']}_s1_{c}.png") for c in CHANNELS)
    sites.append(Site(r["well_id"], r["experiment_name"], r["plate"], CHANNELS, sources,
                      rxrx3_metadata(r)))
    lines.append(line)
  return _finish(sites, lines, csv_path, common.FileIndex(), skip_missing_plates)
