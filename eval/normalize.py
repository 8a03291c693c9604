"""pycytominer's profile normalisations and feature selection, in numpy (docs/science.md §3.4).

`mad_robustize`: per batch, (x - median of its controls) / (1.4826 MAD of its controls + 1e-18),
pycytominer `normalize(method="mad_robustize")` (`RobustMAD`). `spherize`: ZCA whitening fitted
on controls, pycytominer `normalize(method="spherize")` (`Spherize`, its default "ZCA-cor":
standardised first; or plain "ZCA"; epsilon, center=True) — one transform per batch
or one for all rows; unlike TVN + CORAL (eval/correct.py) there is no PCA across batches and no
alignment of one batch's control covariance to another's. `feature_select`: pycytominer
`feature_select` operations run in sequence, each on the features the previous ones kept.
tests/test_profiles.py checks all three against pycytominer itself.
"""
import numpy as np

from eval import EvalError
from eval.correct import warn

MAD_SCALE = 1.4826          # MAD of a normal sample -> its standard deviation
MAD_EPSILON = 1e-18         # pycytominer RobustMAD default
SPHERIZE_EPSILON = 1e-6     # pycytominer Spherize default
SPHERIZE_METHODS = ("ZCA-cor", "ZCA")  # pycytominer normalize's default first
OPERATIONS = ("variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist")
MIN_VARIANCE = 1e-6         # pycytominer variance_threshold default
CORRELATION_THRESHOLD = 0.9
NA_CUTOFF = 0.05


def _groups(n, batches):
  if batches is None:
    return [np.arange(n)]
  batches = np.asarray(batches)
  return [np.flatnonzero(batches == b) for b in np.unique(batches)]


def _per_batch(name, x, is_control, batches, fit_apply):
  """`fit_apply(fit_rows, rows)` on each batch, fitted on its controls (on all its wells when it
  has fewer than 2, with a warning): (float32 result, {"batches", "fitted_on_all_wells"})."""
  x = np.asarray(x, np.float64)
  is_control = np.asarray(is_control, bool)
  out = np.empty_like(x)
  groups, fallback = _groups(len(x), batches), 0
  for rows in groups:
    fit = rows[is_control[rows]]
    if len(fit) < 2:
      fit, fallback = rows, fallback + 1
    out[rows] = fit_apply(x[fit], x[rows])
  if fallback:
    warn(f"{name}: {fallback} batch(es) with fewer than 2 controls fitted on all their wells")
  return out.astype(np.float32), {"batches": len(groups), "fitted_on_all_wells": fallback}


def mad_robustize(x, is_control, batches=None, epsilon=MAD_EPSILON):
  """Per batch: (x - median(controls)) / (1.4826 MAD(controls) + epsilon), float64 inside."""
  def fit_apply(fit, rows):
    median = np.nanmedian(fit, axis=0)
    mad = MAD_SCALE * np.nanmedian(np.abs(fit - median), axis=0)
    return (rows - median) / (mad + epsilon)

  out, info = _per_batch("mad_robustize", x, is_control, batches, fit_apply)
  return out, {"method": "mad_robustize", **info}


def spherize_transform(fit, epsilon=SPHERIZE_EPSILON, method="ZCA-cor"):
  """(mean, W) of pycytominer's Spherize fitted on the rows of `fit`: x -> (x - mean) @ W.

  W = S V diag(sqrt(n - 1) / (s + epsilon)) V^T from the SVD of the centred rows, standardised
  first for "ZCA-cor" (S = diag(1 / biased std); identity for "ZCA"); s: singular values, with
  n <= d the missing ones repeat the last of rank r, as pycytominer does."""
  if method not in SPHERIZE_METHODS:
    raise EvalError(f"spherize method must be one of {', '.join(SPHERIZE_METHODS)}, got {method!r}")
  fit = np.asarray(fit, np.float64)
  n, d = fit.shape
  mean = fit.mean(axis=0)
  scale = np.ones(d)
  if method == "ZCA-cor":
    sd = fit.std(axis=0)
    if np.any(sd == 0):
      raise EvalError("spherize (ZCA-cor): a feature is constant on the controls; drop it with "
                      "--feature_select=variance_threshold")
    scale = 1.0 / sd
  xc = (fit - mean) * scale
  r = np.linalg.matrix_rank(xc)
  if not (r == d or r == n - 1):
    raise EvalError(f"spherize: the {n} control rows of {d} features have rank {r}; remove "
                    "constant or duplicated features (--feature_select=variance_threshold,"
                    "correlation_threshold)")
  _, s, vt = np.linalg.svd(xc, full_matrices=True)
  if n <= d:
    s = np.concatenate([s[:r], np.repeat(s[r - 1], d - r)])
  w = (vt / (s + epsilon)[:, None]).T * np.sqrt(n - 1)
  return mean, scale[:, None] * (w @ vt)


def spherize(x, is_control, batches=None, epsilon=SPHERIZE_EPSILON, method="ZCA-cor"):
  """ZCA whitening fitted on each batch's controls (or on all controls when batches is None)."""
  def fit_apply(fit, rows):
    mean, w = spherize_transform(fit, epsilon, method)
    return (rows - mean) @ w

  out, info = _per_batch("spherize", x, is_control, batches, fit_apply)
  return out, {"method": "spherize", "epsilon": epsilon, "zca": method, **info}


def feature_select(x, operations, names=None, rows=None, *, min_variance=MIN_VARIANCE,
                   threshold=CORRELATION_THRESHOLD, na_cutoff=NA_CUTOFF, blocklist=()):
  """(kept column indices, info) after pycytominer's `feature_select` operations in order.

  `rows`: the samples the statistics use (pycytominer's `samples`; default all rows)."""
  unknown = [op for op in operations if op not in OPERATIONS]
  if unknown:
    raise EvalError(f"feature selection {', '.join(unknown)} unknown; choose from "
                    f"{', '.join(OPERATIONS)}")
  x = np.asarray(x, np.float64)
  if rows is not None:
    x = x[rows]
  names = [f"{k}" for k in range(x.shape[1])] if names is None else [str(n) for n in names]
  keep = np.arange(x.shape[1])
  dropped = {}
  for op in operations:
    sub = x[:, keep]
    if op == "variance_threshold":
      out = np.nanvar(sub, axis=0) < min_variance
    elif op == "drop_na_columns":
      out = np.isnan(sub).mean(axis=0) > na_cutoff
    elif op == "blocklist":
      if not blocklist:
        raise EvalError("feature selection blocklist needs a blocklist file (one feature name a "
                        "line, e.g. pycytominer's data/blocklist_features.txt)")
      out = np.isin(np.asarray(names, object)[keep], list(blocklist))
    else:
      out = _correlated(sub, threshold)
    dropped[op] = int(out.sum())
    keep = keep[~out]
  if not len(keep):
    raise EvalError(f"feature selection {', '.join(operations)} dropped every feature")
  return keep, {"operations": list(operations), "features_before": len(names),
                "features_after": int(len(keep)), "dropped": dropped}


def _correlated(x, threshold) -> np.ndarray:
  """pycytominer correlation_threshold: of each pair with Pearson r > threshold (signed), drop
  the feature with the larger sum of |r| over all features."""
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.corrcoef(x.T)
  r = np.atleast_2d(r)
  order = np.argsort(np.nansum(np.abs(r), axis=0), kind="stable")
  rank = np.empty(len(order), int)
  rank[order] = np.arange(len(order))
  a, b = np.nonzero(np.tril(np.nan_to_num(r, nan=-np.inf) > threshold, k=-1))
  out = np.zeros(x.shape[1], bool)
  out[np.where(rank[a] > rank[b], a, b)] = True
  return out


def read_blocklist(path) -> list:
  """Feature names, one a line (a first line "blocklist" is a header, as pycytominer's file)."""
  from eval import tables
  try:
    with open(path) as f:
      lines = [v.strip() for v in f if v.strip()]
  except OSError as e:
    raise tables.TableError(f"{path}: cannot read blocklist: {e.strerror}") from None
  return lines[1:] if lines and lines[0].lower() == "blocklist" else lines
