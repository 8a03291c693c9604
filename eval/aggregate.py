"""Wells -> perturbations (docs/science.md §3.3, the RxRx3-core convention).

perturbation = treatment without its "_guide_k" suffix unless the name contains "_control";
compounds are aggregated per (perturbation_type, perturbation, concentration) and labelled
"name@concentration"; control wells are removed; mean (default) or median per perturbation.
"""
import re

import numpy as np
import pandas as pd

from eval import EvalError

_GUIDE = re.compile(r"_guide_?\d+$", re.IGNORECASE)


def canonical_perturbation(treatment) -> str:
  t = str(treatment).strip()
  return t if "_control" in t else _GUIDE.sub("", t)


def _is_compound(meta: pd.DataFrame) -> np.ndarray:
  if "perturbation_type" not in meta:
    return np.zeros(len(meta), bool)
  return meta["perturbation_type"].astype(str).str.upper().str.startswith("COMPOUND").to_numpy()


def map_labels(meta: pd.DataFrame) -> np.ndarray:
  """One label per well: the canonical perturbation, "name@conc" for dosed compounds."""
  pert = meta["perturbation"].map(canonical_perturbation)
  conc = meta["concentration"] if "concentration" in meta else pd.Series(np.nan, meta.index)
  dosed = _is_compound(meta) & conc.notna().to_numpy()
  labels = pert.to_numpy(object).copy()
  labels[dosed] = [f"{p}@{c:g}" for p, c in zip(pert[dosed], conc[dosed])]
  if "perturbation_type" in meta:  # same name under two types: keep them apart
    types = meta["perturbation_type"].astype(str).to_numpy()
    pairs = pd.DataFrame({"label": labels, "type": types}).drop_duplicates()
    clash = set(pairs["label"][pairs["label"].duplicated()])
    for k in np.flatnonzero(np.isin(labels, list(clash))):
      labels[k] = f"{types[k]}:{labels[k]}"
  return labels.astype(str)


def control_mask(meta: pd.DataFrame, control: str = "EMPTY_control") -> tuple:
  """(wells whose perturbation is `control`, how they were found); falls back to `is_control`."""
  pert = meta["perturbation"].map(canonical_perturbation).to_numpy()
  mask = pert == control
  if mask.any() or "is_control" not in meta:
    return mask, f"perturbation == {control}"
  return meta["is_control"].to_numpy(bool), "is_control column"


def excluded_from_map(meta: pd.DataFrame, control: str = "EMPTY_control") -> np.ndarray:
  """Control wells of every kind: the control label, any "*_control" name, is_control rows."""
  pert = meta["perturbation"].map(canonical_perturbation)
  out = (pert == control).to_numpy() | pert.str.contains("_control", regex=False).to_numpy()
  out |= pert.str.lower().isin(["nan", "", "none"]).to_numpy()
  if "is_control" in meta:
    out |= meta["is_control"].to_numpy(bool)
  return out


def aggregate(x: np.ndarray, labels, how: str = "mean") -> tuple:
  """(sorted unique labels, (P, D) float32 mean or median of the rows of each label)."""
  if how not in ("mean", "median"):
    raise EvalError(f"aggregation must be mean or median, got {how!r}")
  labels = np.asarray(labels).astype(str)
  uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
  order = np.argsort(inv, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  xs = np.asarray(x)[order]
  if how == "mean":
    out = np.add.reduceat(xs.astype(np.float64), starts, axis=0) / counts[:, None]
  else:
    out = np.stack([np.median(g, axis=0) for g in np.split(xs, starts[1:])])
  return uniq, out.astype(np.float32)


def aggregate_wells(x, meta: pd.DataFrame, control="EMPTY_control", how="mean",
                    perturbation_types=None) -> tuple:
  """Wells -> (labels, map, per-label well counts); controls dropped, optional type filter."""
  keep = ~excluded_from_map(meta, control)
  if perturbation_types:
    if "perturbation_type" not in meta:
      raise EvalError("perturbation_types given but the metadata has no perturbation_type")
    wanted = {t.upper() for t in perturbation_types}
    keep &= meta["perturbation_type"].astype(str).str.upper().isin(wanted).to_numpy()
  if not keep.any():
    raise EvalError("no non-control wells left to aggregate")
  labels = map_labels(meta)[keep]
  uniq, out = aggregate(np.asarray(x)[keep], labels, how)
  return uniq, out, np.unique(labels, return_counts=True)[1]
