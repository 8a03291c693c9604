"""Image-based profiles as the profiling ecosystem writes them (pycytominer, JUMP Cell Painting).

A profile table has `Metadata_*` columns (never features) and feature columns: `emb_0000 ...`
for embeddings, CellProfiler measurements (`Cells_*`, `Cytoplasm_*`, `Nuclei_*`, `Image_*`) for
JUMP's published profiles. `write_wells` / `write_map` write ours that way (parquet, read back by
`eval.recall --embeddings`, by pycytominer and by copairs); `standardise` turns the `Metadata_*`
columns of any such table into the standard well columns of `eval/tables.py` and keeps the
originals, so that `--control_query "Metadata_pert_type == 'negcon'"` and
`--batch_key=Metadata_Plate` see the names the user knows (docs/interfaces.md §3).
"""
import numpy as np
import pandas as pd

from eval import EvalError

METADATA_PREFIX = "Metadata_"
CELLPROFILER_PREFIXES = ("Cells_", "Cytoplasm_", "Nuclei_", "Image_")
FEATURE_PREFIX = "emb_"
# Metadata_X -> standard well column (eval/tables.py STANDARD), first present wins
FROM_METADATA = {"Metadata_Well_ID": "well_id", "Metadata_Experiment": "experiment",
                 "Metadata_Batch": "experiment", "Metadata_Plate": "plate",
                 "Metadata_Well": "well", "Metadata_Perturbation": "perturbation",
                 "Metadata_Gene": "gene", "Metadata_Perturbation_Type": "perturbation_type",
                 "Metadata_Concentration": "concentration", "Metadata_SMILES": "smiles",
                 "Metadata_Cell_Type": "cell_type"}
# the perturbation of a profile row: the first present of these that is not empty (row by row,
# so a compound without a gene symbol keeps its own name)
PERTURBATION_KEYS = ("Metadata_Symbol", "Metadata_Gene", "gene", "perturbation")
WELL_KEYS = ("Metadata_Source", "experiment", "plate", "well")  # what identifies a well
NEGCON, TREATMENT = "negcon", "trt"
_TO_METADATA = {"experiment": ["Metadata_Batch", "Metadata_Experiment"],
                "plate": ["Metadata_Plate"], "well": ["Metadata_Well"],
                "site_count": ["Metadata_Site_Count"], "perturbation": ["Metadata_Perturbation"],
                "gene": ["Metadata_Gene"], "perturbation_type": ["Metadata_Perturbation_Type"],
                "concentration": ["Metadata_Concentration"], "smiles": ["Metadata_SMILES"],
                "cell_type": ["Metadata_Cell_Type"]}


def is_metadata(column) -> bool:
  return str(column).startswith(METADATA_PREFIX)


def is_profile_table(df: pd.DataFrame) -> bool:
  return any(is_metadata(c) for c in df.columns)


def cellprofiler_features(columns) -> list:
  return [c for c in columns if str(c).startswith(CELLPROFILER_PREFIXES)]


def feature_names(dim: int) -> list:
  return [f"{FEATURE_PREFIX}{k:04d}" for k in range(dim)]


# ----------------------------------------------------------------------------------- writing

def _profile_frame(x, meta: pd.DataFrame) -> pd.DataFrame:
  x = np.asarray(x, np.float32)
  out = {}
  for col in meta.columns:
    names = _TO_METADATA.get(col)
    if names is None:
      name = col if is_metadata(col) else METADATA_PREFIX + str(col).title().replace(" ", "_")
      names = [name]
    for name in names:
      out.setdefault(name, meta[col].to_numpy())
  df = pd.DataFrame(out)
  features = pd.DataFrame(x, columns=feature_names(x.shape[1]))
  return pd.concat([df.reset_index(drop=True), features], axis=1)


def wells_frame(x, meta: pd.DataFrame, control: str = "EMPTY_control") -> pd.DataFrame:
  """Well embeddings + `eval.embed` metadata as a profile table (Metadata_* then emb_*).

  Metadata_pert_type is negcon for control wells (the `control` label or is_control), trt
  otherwise; well_id is left out (Plate + Well, with Batch, identify a well)."""
  from eval import aggregate as agg
  meta = meta.reset_index(drop=True)
  negcon = np.zeros(len(meta), bool)
  if "perturbation" in meta:
    negcon |= agg.control_mask(meta, control)[0]
  if "is_control" in meta:
    negcon |= meta["is_control"].fillna(False).to_numpy(bool)
  keep = meta.drop(columns=[c for c in ("well_id", "is_control", "site", "tiles") if c in meta])
  df = _profile_frame(x, keep)
  at = int(np.sum([is_metadata(c) for c in df.columns]))
  df.insert(at, "Metadata_pert_type", np.where(negcon, NEGCON, TREATMENT))
  return df


def map_frame(labels, x) -> pd.DataFrame:
  """A gene-level map (one row per perturbation) as a profile table."""
  labels = np.asarray(labels).astype(str)
  return _profile_frame(x, pd.DataFrame({"perturbation": labels, "gene": labels}))


def write_parquet(df: pd.DataFrame, path):
  """Writes `df` as parquet atomically (a failure leaves no half-written file)."""
  from mae_jax.util import files
  with files.atomic_open(path, "wb") as f:
    df.to_parquet(f, index=False)


# ----------------------------------------------------------------------------------- reading

def standardise(df: pd.DataFrame, perturbation_key=None, required=True) -> pd.DataFrame:
  """Adds the standard well columns (tables.STANDARD) derived from `Metadata_*` ones.

  The originals stay. The perturbation is `perturbation_key` (one column, or several
  comma-separated, coalesced row by row) or the first present of PERTURBATION_KEYS; a well_id
  is composed from WELL_KEYS when the table has none (several site rows of a well are then
  averaged into one by tables.mean_by_well)."""
  df = df.copy()
  for src, dst in FROM_METADATA.items():
    if src in df and dst not in df:
      df[dst] = df[src]
  keys = [k.strip() for k in str(perturbation_key).split(",")] if perturbation_key else None
  if keys:
    missing = [k for k in keys if k not in df]
    if missing:
      raise EvalError(f"perturbation key {', '.join(missing)} not in the table (columns: "
                      f"{_listing(df.columns)})")
  else:
    keys = [k for k in PERTURBATION_KEYS if k in df]
    if not keys and not required:  # the perturbation comes from a metadata CSV joined later
      keys = None
    elif not keys:
      raise EvalError(f"no perturbation column ({', '.join(PERTURBATION_KEYS)}); name one with "
                      f"--perturbation_key (columns: {_listing(df.columns)})")
  if keys:
    df["perturbation"] = _coalesce(df, keys)
  if "well_id" not in df and {"plate", "well"} <= set(df.columns):
    parts = [df[k].astype(str) for k in WELL_KEYS if k in df]
    well_id = parts[0]
    for p in parts[1:]:
      well_id = well_id + "_" + p
    df["well_id"] = well_id
  return df


def _coalesce(df, keys) -> pd.Series:
  out = pd.Series(np.nan, index=df.index, dtype=object)
  for k in keys:
    v = df[k].astype(object)
    empty = v.isna() | v.astype(str).str.strip().isin(["", "nan", "None"])
    out = out.where(out.notna(), v.where(~empty))
  return out.fillna("").astype(str)


def _listing(columns, n=12) -> str:
  names = [str(c) for c in columns if not str(c).startswith(CELLPROFILER_PREFIXES + (
      FEATURE_PREFIX,))]
  return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def query_mask(meta: pd.DataFrame, query: str) -> np.ndarray:
  """Rows of `meta` matching a pandas query, e.g. "Metadata_pert_type == 'negcon'"."""
  try:
    hit = meta.eval(query)
  except Exception as e:  # pandas raises many kinds for a bad expression
    raise EvalError(f"control query {query!r}: {str(e).splitlines()[0]}") from None
  hit = np.asarray(hit)
  if hit.dtype != bool or hit.shape != (len(meta),):
    raise EvalError(f"control query {query!r} is not a condition on the rows")
  return hit
