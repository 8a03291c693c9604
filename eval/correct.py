"""Batch correction on control wells (TVN, CORAL, PCA-CenterScale) and chromosome-arm centring.

TVN follows EFAAR `tvn_on_controls` (docs/science.md §3.4); PCA-CenterScale follows the OpenPhenom
card; arm centring follows proxbias `arm_centering` (§3.5). Heavy algebra (covariances, eigh,
projections) runs in JAX in float32; per-batch work is padded to a few row buckets so it compiles
a handful of times, not once per batch.

Guard (docs/science.md §6): whitening with about as many control wells as dimensions amplifies noise
directions, so the PCA keeps at most n_controls / `min_controls_per_dim` components (and none
whose control variance is numerically zero), with a warning on stderr when that cuts anything.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval import EvalError

MIN_CONTROLS_PER_DIM = 2.0  # docs/science.md §6: 1.25 controls per dim failed, 2.5 worked
CORAL_REG = 0.5             # EFAAR adds 0.5 * I to every batch covariance
UNEXPRESSED_ZFPKM = -3.0    # proxbias: genes with zFPKM < -3 are "not expressed"
MIN_ARM_GENES = 20          # an arm needs strictly more basis genes than this
_HI = jax.lax.Precision.HIGHEST


def warn(msg: str):
  print(f"warning: {msg}", file=sys.stderr)


def _bucket(n: int) -> int:
  return max(256, 1 << int(np.ceil(np.log2(max(n, 1)))))


def _pad(x: np.ndarray) -> tuple:
  """Rows padded to a power-of-two bucket, and a 0/1 weight per row."""
  n = len(x)
  b = _bucket(n)
  w = np.zeros(b, np.float32)
  w[:n] = 1
  return np.pad(np.asarray(x, np.float32), ((0, b - n), (0, 0))), w


@jax.jit
def _moments(x, w):
  """Weighted mean, biased variance and covariance (sum of squares) of the rows with w = 1."""
  n = jnp.sum(w)
  mean = jnp.dot(w, x, precision=_HI) / n
  xc = (x - mean) * w[:, None]
  ss = jnp.dot(xc.T, xc, precision=_HI)
  return mean, jnp.diagonal(ss) / n, ss


@jax.jit
def _affine(x, shift, m):
  return jnp.dot(x - shift, m, precision=_HI)


def moments(x: np.ndarray):
  """(mean, biased variance, n x covariance) of the rows of x, computed in JAX."""
  mean, var, ss = _moments(*_pad(x))
  return np.asarray(mean), np.asarray(var), np.asarray(ss)


def affine(x: np.ndarray, shift, m) -> np.ndarray:
  """(x - shift) @ m in JAX, padded to a row bucket."""
  xp, _ = _pad(x)
  return np.array(_affine(xp, jnp.asarray(shift, jnp.float32), jnp.asarray(m, jnp.float32)))[
      :len(x)]


def standardize(x, fit_rows):
  """sklearn StandardScaler fitted on x[fit_rows]: biased std, zero std left as 1."""
  mean, var, _ = moments(x[fit_rows])
  sd = np.sqrt(var)
  sd = np.where(sd > 0, sd, 1.0)
  return affine(x, mean, np.diag(1.0 / sd))


def pca_components(x_fit, min_controls_per_dim=MIN_CONTROLS_PER_DIM, what="controls"):
  """(mean, components (D, k)) of a PCA fitted on x_fit, k capped by the guard (docs/science.md §6)."""
  n, d = x_fit.shape
  mean, _, ss = moments(x_fit)
  evals, evecs = jnp.linalg.eigh(jnp.asarray(ss, jnp.float32))
  evals, evecs = np.asarray(evals)[::-1], np.asarray(evecs)[:, ::-1]
  supported = int(n / min_controls_per_dim)
  nonzero = int(np.sum(evals > max(evals[0], 0) * 1e-6))
  k = max(1, min(d, supported, nonzero))
  if k < d:
    warn(f"{n} {what} for {d} dimensions: keeping {k} principal components (at most "
         f"{min_controls_per_dim:g} {what} per component and none with zero variance)")
  return mean, evecs[:, :k]


def _control_rows(is_control, what):
  rows = np.flatnonzero(is_control)
  if len(rows) < 2:
    raise EvalError(f"{what} needs at least 2 control wells, found {len(rows)}")
  return rows


def tvn(x, is_control, batches=None, coral=True, reg=CORAL_REG,
        min_controls_per_dim=MIN_CONTROLS_PER_DIM):
  """Typical variation normalisation on controls, optionally with per-batch CORAL.

  1. StandardScaler fitted on all control rows; 2. PCA (all supported components) fitted on
  the controls; 3. StandardScaler on the control scores, so the controls are whitened
  (mean 0, biased covariance I); 4. with `coral`, every row of batch b is multiplied by
  (cov(controls_b, ddof=1) + reg * I)^(-1/2), with no re-centring.
  Returns (corrected (N, k) float32, info dict)."""
  x = np.asarray(x, np.float32)
  is_control = np.asarray(is_control, bool)
  rows = _control_rows(is_control, "TVN")
  x = standardize(x, rows)
  mean, comps = pca_components(x[rows], min_controls_per_dim)
  x = affine(x, mean, comps)
  x = standardize(x, rows)
  info = {"method": "tvn", "components": int(comps.shape[1]), "controls": int(len(rows))}
  if coral and batches is not None:
    x, info["coral"] = coral_align(x, is_control, batches, reg)
  return x, info


def coral_align(x, is_control, batches, reg=CORAL_REG):
  """x[b] @ (cov(controls_b, ddof=1) + reg I)^(-1/2) per batch (EFAAR's CORAL step).

  Given whitened controls with batch covariance C_b, the batch's controls end with covariance
  C_b (C_b + reg I)^(-1): same eigenvectors, eigenvalues l / (l + reg) (not I)."""
  x = np.array(x, np.float32)
  batches = np.asarray(batches)
  skipped, done = [], 0
  for b in np.unique(batches):
    in_b = batches == b
    ctrl = np.flatnonzero(in_b & is_control)
    if len(ctrl) < 2:
      skipped.append(str(b))
      continue
    _, _, ss = moments(x[ctrl])
    x[in_b] = affine(x[in_b], np.zeros(x.shape[1]), inverse_sqrt(ss / (len(ctrl) - 1), reg))
    done += 1
  if skipped:
    warn(f"CORAL skipped {len(skipped)} batch(es) with fewer than 2 controls: "
         f"{', '.join(skipped[:5])}")
  return x, {"batches": done, "skipped_batches": skipped}


def inverse_sqrt(cov, reg=0.0) -> np.ndarray:
  """(cov + reg I)^(-1/2) of a symmetric PSD matrix, by eigh in JAX."""
  c = jnp.asarray(cov, jnp.float32)
  evals, evecs = jnp.linalg.eigh(c + reg * jnp.eye(c.shape[0], dtype=c.dtype))
  evals = jnp.maximum(evals, jnp.finfo(jnp.float32).tiny)
  return np.asarray((evecs * jax.lax.rsqrt(evals)) @ evecs.T)


def pca_centerscale(x, is_control, batches, min_controls_per_dim=MIN_CONTROLS_PER_DIM):
  """PCA on the controls of all batches, then per batch a StandardScaler fitted on that batch's
  controls (all of its rows, with a warning, where it has fewer than 2)."""
  x = np.asarray(x, np.float32)
  is_control = np.asarray(is_control, bool)
  rows = np.flatnonzero(is_control)
  if len(rows) < 2:
    warn("no control wells: PCA-CenterScale fitted on all wells")
    rows, is_control = np.arange(len(x)), np.ones(len(x), bool)
  mean, comps = pca_components(x[rows], min_controls_per_dim)
  x = affine(x, mean, comps)
  batches = np.zeros(len(x), int) if batches is None else np.asarray(batches)
  fallback = []
  for b in np.unique(batches):
    in_b = np.flatnonzero(batches == b)
    fit = in_b[is_control[in_b]]
    if len(fit) < 2:
      fallback.append(str(b))
      fit = in_b
    x[in_b] = standardize(x[in_b], np.searchsorted(in_b, fit))
  if fallback:
    warn(f"PCA-CenterScale: {len(fallback)} batch(es) without 2 controls scaled on all their "
         f"wells: {', '.join(fallback[:5])}")
  return x, {"method": "pca_centerscale", "components": int(comps.shape[1]),
             "controls": int(len(rows)), "batches": int(len(np.unique(batches)))}


# ----------------------------------------------------------------------- chromosome arms

def arm_correct(labels, x, arms: dict, expression: dict | None = None,
                threshold=UNEXPRESSED_ZFPKM, min_genes=MIN_ARM_GENES):
  """Subtract from every gene on an arm the mean of that arm's basis genes.

  Basis: genes with zFPKM < threshold when `expression` is given (proxbias), else every gene of
  the map on that arm (the fallback of docs/science.md §3.5). Arms need more than `min_genes` basis
  genes; other rows (compounds, genes without an arm) are left unchanged."""
  x = np.array(x, np.float32)
  labels = [str(v) for v in labels]
  by_arm = {}
  for k, g in enumerate(labels):
    if g in arms:
      by_arm.setdefault(arms[g], []).append(k)
  corrected = genes = 0
  for rows in by_arm.values():
    basis = rows if expression is None else [
        k for k in rows if labels[k] in expression and expression[labels[k]] < threshold]
    if len(basis) > min_genes:
      x[rows] -= x[basis].mean(axis=0, dtype=np.float64).astype(np.float32)
      corrected += 1
      genes += len(rows)
  return x, {"mode": "all_genes" if expression is None else "unexpressed",
             "arms_with_genes": len(by_arm), "arms_corrected": corrected,
             "genes_corrected": genes}


def arm_mates_cosine(labels, x, arms: dict, related=frozenset()) -> float:
  """Mean cosine over pairs of map genes on the same arm that are not in `related` (a set of
  name pairs): the proximity bias that arm centring should remove."""
  labels = [str(v) for v in labels]
  xn = np.asarray(x, np.float64)
  xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-30)
  row = {g: k for k, g in enumerate(labels) if g in arms}
  by_arm = {}
  for g, k in row.items():
    by_arm.setdefault(arms[g], []).append(k)
  total, count = 0.0, 0
  for rows in by_arm.values():
    s = xn[rows].sum(axis=0)
    total += (s @ s - np.sum(xn[rows] ** 2)) / 2  # sum over pairs without listing them
    count += len(rows) * (len(rows) - 1) // 2
  for a, b in {tuple(sorted(p)) for p in related}:
    if a != b and a in row and b in row and arms[a] == arms[b]:
      total -= xn[row[a]] @ xn[row[b]]
      count -= 1
  return float(total / count) if count else float("nan")
