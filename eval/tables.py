"""Reading embedding tables (parquet / CSV / NPZ) and well metadata into one standard form.

Standard well metadata columns (as `eval.embed.embed_wells` returns them): well_id, experiment,
plate, well, perturbation, gene, perturbation_type, is_control, concentration, smiles.
RxRx3 / RxRx3-core metadata (experiment_name, address, treatment, SMILES, ...) is renamed to
them; OpenPhenom tables (`well_id`, `feature_0 ... feature_383`) are mean-reduced per well_id.
Profile tables (pycytominer / JUMP: `Metadata_*` columns, `emb_*` or CellProfiler features) are
read through `eval/profiles.py`; a `Metadata_*` column is never a feature.
"""
import os
import re

import numpy as np
import pandas as pd

from eval import EvalError
from eval import profiles

STANDARD = ("well_id", "experiment", "plate", "well", "perturbation", "gene",
            "perturbation_type", "is_control", "concentration", "smiles")
# lower-cased source name -> standard name
RENAME = {"experiment_name": "experiment", "address": "well", "treatment": "perturbation",
          "smiles": "smiles", "well_address": "well", "plate_id": "plate",
          "gene_symbol": "gene", "sirna": "perturbation", "label": "perturbation"}
_FEATURE = re.compile(r"^(feature|feat|emb|embedding|dim|f)_?(\d+)$", re.IGNORECASE)
_NPZ_MATRIX = ("embeddings", "features", "X", "x", "emb")


class TableError(EvalError):
  """A user file is missing, unreadable or lacks an expected field (message is one line)."""


def normalise_columns(df: pd.DataFrame) -> pd.DataFrame:
  """Renames known columns to the standard names (case-insensitive) and fills derivable ones."""
  mapping = {}
  for c in df.columns:
    low = str(c).strip().lower()
    name = RENAME.get(low, low if low in STANDARD else None)
    if name and name not in mapping.values() and name not in df.columns.drop(c):
      mapping[c] = name
  df = df.rename(columns=mapping)
  if "perturbation" not in df and "gene" in df:
    df["perturbation"] = df["gene"]
  if "perturbation" in df:
    df["perturbation"] = df["perturbation"].astype(str).str.strip()
  if "concentration" in df:
    df["concentration"] = pd.to_numeric(df["concentration"], errors="coerce")
  if "is_control" in df:
    df["is_control"] = df["is_control"].map(_truthy).astype(bool)
  return df


def _truthy(v) -> bool:
  if isinstance(v, str):
    return v.strip().lower() in ("1", "true", "t", "yes", "y")
  return bool(v) if v == v else False  # NaN -> False


def _feature_columns(df: pd.DataFrame, path) -> list:
  """feature_0 / emb_0000 ... columns; else CellProfiler measurements (Cells_, Cytoplasm_,
  Nuclei_, Image_); else every numeric column that is no known metadata. Never Metadata_*."""
  numeric = lambda cols: [c for c in cols if pd.api.types.is_numeric_dtype(df[c])]
  columns = [c for c in df.columns if not profiles.is_metadata(c)]
  named = [c for c in columns if _FEATURE.match(str(c))]
  if named:
    return sorted(named, key=lambda c: int(_FEATURE.match(str(c)).group(2)))
  measured = numeric(profiles.cellprofiler_features(columns))
  if measured:
    return measured
  known = {c for c in columns if str(c).lower() in STANDARD or str(c).lower() in RENAME}
  rest = numeric([c for c in columns if c not in known])
  if not rest:
    raise TableError(f"{path}: no feature columns (expected feature_0, emb_0000, ..., "
                     "CellProfiler Cells_/Cytoplasm_/Nuclei_/Image_ columns or other numeric "
                     "columns that are not Metadata_*)")
  return rest


def read_table(path) -> tuple:
  """(features (R, D) float32, DataFrame of the other columns) from parquet, CSV/TSV or NPZ."""
  path = os.fspath(path)
  parts = os.path.isdir(path) and any(n.endswith(".parquet") for n in os.listdir(path))
  if not (os.path.isfile(path) or parts):
    raise TableError(f"{path}: file not found (or a folder without .parquet parts)")
  low = path.lower()
  try:
    if parts:  # eval.embed --out=DIR: its parquet parts, read in order as one table
      from eval import parts as parts_lib
      df = pd.concat([pd.read_parquet(p) for p in parts_lib.list_parts(path)],
                     ignore_index=True)
    elif low.endswith(".npz"):
      return _read_npz(path)
    elif low.endswith((".parquet", ".pq")):
      df = pd.read_parquet(path)
    elif low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
      df = pd.read_csv(path, sep="\t" if ".tsv" in low else ",")
    else:
      raise TableError(f"{path}: unknown table format (expected .parquet, .csv, .tsv or .npz)")
  except EvalError:  # already one line
    raise
  except Exception as e:  # pyarrow / pandas parse errors
    raise TableError(f"{path}: cannot read table: {str(e).splitlines()[0]}") from None
  cols = _feature_columns(df, path)
  x = df[cols].to_numpy(np.float32)
  meta = df.drop(columns=cols).reset_index(drop=True)
  meta.attrs["feature_names"] = [str(c) for c in cols]
  return x, meta


def _read_npz(path):
  with np.load(path, allow_pickle=False) as z:
    key = next((k for k in _NPZ_MATRIX if k in z.files and z[k].ndim == 2), None)
    if key is None:
      raise TableError(f"{path}: no 2-D array named one of {', '.join(_NPZ_MATRIX)}")
    x = np.asarray(z[key], np.float32)
    cols = {k: z[k] for k in z.files if k != key and z[k].ndim == 1 and len(z[k]) == len(x)}
  if "labels" in cols:
    cols.setdefault("perturbation", cols.pop("labels"))
  return x, pd.DataFrame({k: (v.astype(str) if v.dtype.kind in "SUO" else v)
                          for k, v in cols.items()})


def mean_by_well(x: np.ndarray, df: pd.DataFrame) -> tuple:
  """Mean-reduces rows sharing a well_id (e.g. tiles or sites), keeping the first metadata row."""
  ids = df["well_id"].astype(str).to_numpy()
  uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
  if len(uniq) == len(ids):
    return x, df
  order = np.argsort(inv, kind="stable")
  counts = np.bincount(inv, minlength=len(uniq))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  sums = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
  return (sums / counts[:, None]).astype(np.float32), df.iloc[first].reset_index(drop=True)


def read_csv(path, **kwargs) -> pd.DataFrame:
  """A CSV/TSV as a DataFrame, with one-line errors naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TableError(f"{path}: file not found")
  try:
    return pd.read_csv(path, sep="\t" if ".tsv" in path.lower() else ",", **kwargs)
  except Exception as e:
    raise TableError(f"{path}: cannot read CSV: {str(e).splitlines()[0]}") from None


def read_metadata(path) -> pd.DataFrame:
  df = normalise_columns(read_csv(path, dtype={"well_id": str}))
  if "well_id" not in df:
    raise TableError(f"{path}: metadata has no well_id column")
  return df


def load_embeddings(path, metadata=None, perturbation_key=None) -> tuple:
  """(x, meta, level, warnings): level "wells" (meta has well columns) or "perturbations" (a map).

  With a metadata CSV the table is joined on well_id (wells without metadata are dropped, with a
  count in the warnings list); without one the table's own columns are the metadata. A profile
  table (Metadata_* columns) or an explicit `perturbation_key` goes through
  `profiles.standardise`. meta.attrs["feature_names"] names the feature columns."""
  x, df = read_table(path)
  names = np.asarray(df.attrs.get("feature_names", []), object)
  finite = np.isfinite(x).all(axis=0)
  notes = []
  if not finite.all():  # CellProfiler columns often have NaNs; nothing downstream takes them
    if not finite.any():
      raise TableError(f"{path}: every feature column has missing or infinite values")
    notes.append(f"{int((~finite).sum())} of {len(finite)} feature columns have missing or "
                 "infinite values and are dropped")
    x, names = x[:, finite], names[finite]
  x, df, level, warnings = _load(path, x, df, metadata, perturbation_key)
  df.attrs["feature_names"] = [str(n) for n in names]
  return x, df, level, notes + warnings


def _load(path, x, df, metadata, perturbation_key):
  if profiles.is_profile_table(df) or perturbation_key:
    df = profiles.standardise(normalise_columns(df), perturbation_key,
                              required=metadata is None)
  df = normalise_columns(df)
  warnings = []
  if "well_id" in df:
    df["well_id"] = df["well_id"].astype(str)
    x, df = mean_by_well(x, df)
    if metadata is not None:
      meta = read_metadata(metadata)
      meta["well_id"] = meta["well_id"].astype(str)
      meta = meta.drop_duplicates("well_id").set_index("well_id")
      found = df["well_id"].isin(meta.index).to_numpy()
      if not found.any():
        raise TableError(f"{metadata}: none of the {len(df)} well_ids of {path} are in it")
      if not found.all():
        warnings.append(f"{int((~found).sum())} wells of {os.path.basename(os.fspath(path))} "
                        "have no metadata and are dropped")
      own = [c for c in df.columns if c != "well_id" and c not in meta.columns]
      df = df.loc[found, ["well_id"] + own].join(meta, on="well_id").reset_index(drop=True)
      x = x[found]
    if "perturbation" not in df:
      raise TableError(f"{metadata or path}: no perturbation column (treatment, perturbation, "
                       "gene or label) for the wells")
    return x, df, "wells", warnings
  if metadata is not None:
    raise TableError(f"{path}: has no well_id column to join with {metadata}")
  if "perturbation" not in df:
    raise TableError(f"{path}: needs a well_id column (well embeddings) or a perturbation / "
                     "gene / label column (a map)")
  return x, df, "perturbations", warnings
