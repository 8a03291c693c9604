"""The evaluation (eval/) against references written from the definitions in plain numpy.

Definitions (docs/science.md §3.4, §3.5, §4.1): EFAAR v1.0 known-relationship recall on cosine
similarities with the all-pairs upper-triangle null; EFAAR `tvn_on_controls` (StandardScaler ->
PCA -> StandardScaler fitted on controls, then per-batch CORAL with 0.5 I); the OpenPhenom card's
PCA-CenterScale; proxbias arm centring on unexpressed genes (zFPKM < -3, arms with > 20 of them).
The reference side shares no code with eval/: no normalize_rows, similarity tiles, filter_pairs,
standardize or pca_components; float64 numpy throughout.
"""
import numpy as np
import pandas as pd
import pytest

from eval import benchmarks, correct, recall
from mae_jax.data import resources


# ------------------------------------------------------------------------------ references

def ref_recall(x, labels, pairs, lo, hi):
  """EFAAR v1.0: cosine S; null = S[i, j] for every i < j; query pairs sorted by name, self
  pairs and duplicates dropped, both genes in the map; in a tail iff
  searchsorted(null, q, 'right') / |null| <= lo or searchsorted(null, q, 'left') / |null| >= hi."""
  x = np.asarray(x, np.float64)
  norms = np.sqrt((x ** 2).sum(axis=1))
  s = (x @ x.T) / np.outer(norms, norms)
  null = np.sort(s[np.triu_indices(len(x), 1)])
  row = {g: k for k, g in enumerate(labels)}
  uniq = sorted({tuple(sorted((a, b))) for a, b in pairs if a != b and a in row and b in row})
  q = np.array([s[row[a], row[b]] for a, b in uniq])
  r_left = np.searchsorted(null, q, side="left") / len(null)
  r_right = np.searchsorted(null, q, side="right") / len(null)
  return float(np.mean((r_right <= lo) | (r_left >= hi))), len(uniq)


def ref_scaler(x, fit):
  """sklearn StandardScaler fitted on x[fit]: biased std, a zero std left as 1."""
  mu, sd = x[fit].mean(axis=0), x[fit].std(axis=0)
  return (x - mu) / np.where(sd > 0, sd, 1.0)


def ref_pca(x_fit, k):
  """(mean, the k eigenvectors of the covariance with the LARGEST eigenvalues, descending)."""
  mean = x_fit.mean(axis=0)
  xc = x_fit - mean
  w, v = np.linalg.eigh(xc.T @ xc / len(x_fit))
  return mean, v[:, np.argsort(w)[::-1][:k]]


def ref_inv_sqrt(c):
  w, v = np.linalg.eigh(c)
  return (v / np.sqrt(w)) @ v.T


def ref_tvn(x, ctrl, batches, k, coral=True, reg=0.5):
  x = ref_scaler(np.asarray(x, np.float64), ctrl)
  mean, comps = ref_pca(x[ctrl], k)
  y = ref_scaler((x - mean) @ comps, ctrl)
  if coral:
    for b in np.unique(batches):
      rows = batches == b
      yc = y[rows & ctrl]
      cov = np.cov(yc, rowvar=False, ddof=1) + reg * np.eye(k)
      y[rows] = y[rows] @ ref_inv_sqrt(cov)
  return y


def ref_pca_centerscale(x, ctrl, batches, k):
  x = np.asarray(x, np.float64)
  mean, comps = ref_pca(x[ctrl], k)
  y = (x - mean) @ comps
  for b in np.unique(batches):
    rows = np.flatnonzero(batches == b)
    fit = ctrl[rows] if ctrl[rows].sum() >= 2 else np.ones(len(rows), bool)
    y[rows] = ref_scaler(y[rows], fit)
  return y


def assert_equal_up_to_column_signs(got, want, atol):
  """PCA fixes each component only up to its sign: compare column by column."""
  assert got.shape == want.shape
  for j in range(want.shape[1]):
    sign = 1.0 if got[:, j] @ want[:, j] >= 0 else -1.0
    np.testing.assert_allclose(got[:, j], sign * want[:, j], atol=atol,
                               err_msg=f"component {j}")


def screen(rng, d, per_batch, controls_per_batch, n_batches=3):
  """Wells with a clear variance spectrum and per-batch shifts and anisotropic scalings."""
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  spectrum = np.geomspace(4.0, 0.25, d)
  xs, ctrl, batch = [], [], []
  for b in range(n_batches):
    z = rng.standard_normal((per_batch, d)) * spectrum @ q
    xs.append(z * rng.uniform(0.5, 2.0, d) + rng.standard_normal(d) * 3)
    c = np.zeros(per_batch, bool)
    c[rng.choice(per_batch, controls_per_batch, replace=False)] = True
    ctrl.append(c)
    batch += [f"exp-{b}"] * per_batch
  return np.concatenate(xs).astype(np.float32), np.concatenate(ctrl), np.array(batch)


# ------------------------------------------------------------------------------------ recall

def recall_map(rng, n=90, d=12, n_related=30):
  """Rows with norms spread over four decades; pairs (2k, 2k+1) range from strongly similar to
  strongly opposite in direction, whatever their norms."""
  labels = [f"G{k:03d}" for k in range(n)]
  x = rng.standard_normal((n, d))
  for k, w in enumerate(np.linspace(-2.0, 2.0, n_related)):
    x[2 * k + 1] = w * x[2 * k] + rng.standard_normal(d)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  x *= 10.0 ** rng.uniform(-2, 2, (n, 1))
  related = [(labels[2 * k], labels[2 * k + 1]) for k in range(n_related)]
  unrelated = [tuple(labels[i] for i in rng.choice(n, 2, replace=False)) for _ in range(15)]
  # as annotation files come: reversed duplicates, self pairs, genes outside the map
  noise = [(b, a) for a, b in related[:6]] + [(labels[3], labels[3]), (labels[0], "NOT_IN_MAP")]
  return x.astype(np.float32), labels, related + unrelated + noise


def test_recall_is_efaar_recall_on_cosines_with_unequal_norms():
  x, labels, pairs = recall_map(np.random.default_rng(0))
  other = pairs[::3]
  res = benchmarks.relationship_recall(x, labels, {"CORUM": pairs, "HuMAP": other},
                                       min_entities=2)
  n = len(labels)
  assert res["n_perturbations"] == n and res["null_pairs"] == n * (n - 1) // 2
  by_map = recall.score_map(labels, x, pairs_by_source={"CORUM": pairs}, arm_correction=False,
                            min_entities=2)
  for src, src_pairs in (("CORUM", pairs), ("HuMAP", other)):
    for lo, hi in ((0.05, 0.95), (0.1, 0.9)):
      want, n_pairs = ref_recall(x, labels, src_pairs, lo, hi)
      assert res["sources"][src]["pairs"] == n_pairs
      assert res["sources"][src][f"recall_{lo}_{hi}"] == pytest.approx(want, abs=1e-12), (src, lo)
      if src == "CORUM":
        assert by_map["sources"]["CORUM"][f"recall_{lo}_{hi}"] == pytest.approx(want, abs=1e-12)
  # the data can tell cosines from dot products: normalising the rows changes the answer a lot
  want, _ = ref_recall(x, labels, pairs, 0.1, 0.9)
  dots = ref_recall_dot(x, labels, pairs, 0.1, 0.9)
  assert want > 0.5 and abs(want - dots) > 0.2, (want, dots)


def ref_recall_dot(x, labels, pairs, lo, hi):
  """The same recall on raw dot products (what an unnormalised implementation would score)."""
  x = np.asarray(x, np.float64)
  s = x @ x.T
  null = np.sort(s[np.triu_indices(len(x), 1)])
  row = {g: k for k, g in enumerate(labels)}
  uniq = sorted({tuple(sorted((a, b))) for a, b in pairs if a != b and a in row and b in row})
  q = np.array([s[row[a], row[b]] for a, b in uniq])
  r_left = np.searchsorted(null, q, side="left") / len(null)
  r_right = np.searchsorted(null, q, side="right") / len(null)
  return float(np.mean((r_right <= lo) | (r_left >= hi)))


def test_recall_is_invariant_to_row_scaling():
  """Cosine recall sees directions only: rescaling every row by any positive factor is a no-op."""
  rng = np.random.default_rng(1)
  x, labels, pairs = recall_map(rng)
  a = benchmarks.relationship_recall(x, labels, {"CORUM": pairs}, min_entities=2)
  scaled = x * (10.0 ** rng.uniform(-3, 3, (len(x), 1))).astype(np.float32)
  b = benchmarks.relationship_recall(scaled, labels, {"CORUM": pairs}, min_entities=2)
  assert a["sources"] == b["sources"]


# --------------------------------------------------------------------------------------- TVN

@pytest.mark.parametrize("controls,coral", [(150, False), (150, True), (8, True)],
                         ids=["all_components", "all_components_coral", "guarded_coral"])
def test_tvn_matches_its_definition(controls, coral):
  """With 450 controls for 12 dims every component is kept (the columns' order is still
  checked); with 24 controls for 16 dims the guard keeps the 12 largest-variance ones."""
  d = 12 if controls > 10 else 16
  x, ctrl, batch = screen(np.random.default_rng(2), d, per_batch=300, controls_per_batch=controls)
  k = min(d, int(ctrl.sum()) // 2)
  got, info = correct.tvn(x, ctrl, batch, coral=coral)
  assert info["components"] == k and got.shape == (len(x), k)
  want = ref_tvn(x, ctrl, batch, k, coral)
  assert_equal_up_to_column_signs(np.asarray(got, np.float64), want, atol=2e-3)
  if not coral:  # controls whitened, components in descending order of raw control variance
    np.testing.assert_allclose(np.cov(got[ctrl], rowvar=False, ddof=0), np.eye(k), atol=2e-3)


def test_pca_keeps_the_top_eigenvectors_of_the_control_covariance():
  rng = np.random.default_rng(3)
  x, ctrl, _ = screen(rng, 16, per_batch=100, controls_per_batch=8)
  fit = np.asarray(x[ctrl], np.float64)
  mean, comps = correct.pca_components(x[ctrl])
  assert comps.shape == (16, 12)
  ref_mean, ref_comps = ref_pca(fit, 12)
  np.testing.assert_allclose(mean, ref_mean, atol=1e-5)
  np.testing.assert_allclose(comps @ comps.T, ref_comps @ ref_comps.T, atol=1e-4)
  variance = lambda v: ((fit - ref_mean) @ v).var(axis=0)
  assert np.all(np.diff(variance(np.asarray(comps, np.float64))) < 0)  # descending


def test_pca_centerscale_matches_its_definition():
  """PCA fitted on the controls of all batches; per batch a StandardScaler fitted on that
  batch's controls (on all of its wells where it has fewer than 2: the documented fallback)."""
  x, ctrl, batch = screen(np.random.default_rng(4), 12, per_batch=200, controls_per_batch=60)
  one = np.flatnonzero((batch == "exp-2") & ctrl)
  ctrl[one[1:]] = False  # exp-2 keeps a single control well
  k = min(12, int(ctrl.sum()) // 2)
  got, info = correct.pca_centerscale(x, ctrl, batch)
  assert info["components"] == k == 12 and info["batches"] == 3
  assert_equal_up_to_column_signs(np.asarray(got, np.float64),
                                  ref_pca_centerscale(x, ctrl, batch, k), atol=2e-3)


# ------------------------------------------------------------------------------ arm centring

def arm_screen(rng, offset_scale, d=8, controls=40):
  """Two experiments, one well per gene per experiment: 30 genes on chr1p (24 unexpressed),
  12 on chr19q (too few for an arm mean); an arm-wide offset on every chr1p well."""
  by_arm = {}
  for g, a in sorted(resources.gene_arms().items()):
    by_arm.setdefault(a, []).append(g)
  arm_a, arm_b = by_arm["chr1p"][:30], by_arm["chr19q"][:12]
  genes = arm_a + arm_b
  expr = {g: (-5.0 if k < 24 else 2.0) for k, g in enumerate(arm_a)}
  expr.update({g: -5.0 for g in arm_b})
  pheno = {g: rng.standard_normal(d) for g in genes}
  offset = rng.standard_normal(d) * offset_scale
  noise = np.random.default_rng(99)  # the same well noise with and without the offset
  rows, feats = [], []
  for e in ("exp-1", "exp-2"):
    scale, shift = rng.uniform(0.5, 2.0, d), rng.standard_normal(d) * 3
    wells = ["EMPTY_control"] * controls + genes
    for w, g in enumerate(wells):
      signal = np.zeros(d) if g == "EMPTY_control" else pheno[g] + (g in arm_a) * offset
      feats.append((signal + noise.standard_normal(d)) * scale + shift)
      rows.append({"experiment": e, "well_id": f"{e}_{w}", "perturbation": g})
  pairs = [(genes[k], genes[k + 1]) for k in range(0, len(genes) - 1, 2)]
  return np.array(feats, np.float32), pd.DataFrame(rows), genes, arm_a, expr, pairs


def test_arm_centring_in_the_pipeline_removes_a_planted_arm_offset():
  """score_wells (TVN + CORAL, aggregate, arm centring on unexpressed genes) on a screen with an
  offset planted on every chr1p gene gives the same map as the same screen without it, and
  equals the uncentred map minus the mean of chr1p's unexpressed genes (chr19q untouched)."""
  rngs = [np.random.default_rng(5), np.random.default_rng(5)]
  x, meta, genes, arm_a, expr, pairs = arm_screen(rngs[0], offset_scale=5.0)
  x0, meta0, *_ = arm_screen(rngs[1], offset_scale=0.0)
  opts = dict(pairs_by_source={"CORUM": pairs}, expression=expr, min_entities=2,
              batch_key="experiment")
  res = recall.score_wells(x, meta, **opts)
  info = res["arm_correction"]
  assert info["mode"] == "unexpressed" and info["arms_corrected"] == 1
  assert info["genes_corrected"] == 30
  assert info["arm_mates_before"] > 0.5 and abs(info["arm_mates_after"]) < 0.2
  labels = list(res["_map"]["labels"])
  assert sorted(labels) == sorted(genes)
  got = np.asarray(res["_map"]["embeddings"], np.float64)
  clean = recall.score_wells(x0, meta0, **opts)
  assert list(clean["_map"]["labels"]) == labels
  np.testing.assert_allclose(got, clean["_map"]["embeddings"], atol=1e-3)  # offset gone
  raw = recall.score_wells(x, meta, **{**opts, "arm_correction": False})
  uncentred = np.asarray(raw["_map"]["embeddings"], np.float64)
  on_a = np.isin(labels, arm_a)
  basis = np.isin(labels, [g for g in arm_a if expr[g] < -3])
  assert basis.sum() == 24
  want = uncentred.copy()
  want[on_a] -= uncentred[basis].mean(axis=0)
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_array_equal(got[~on_a], uncentred[~on_a])
  # the offset is really there before centring: chr1p genes share a large common vector
  assert np.linalg.norm(uncentred[on_a].mean(axis=0)) > 3 * np.linalg.norm(got[on_a].mean(0))
