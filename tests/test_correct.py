"""TVN / CORAL / PCA-CenterScale on controls, and chromosome-arm centring."""
import numpy as np
import pytest

from eval import correct as C
from mae_jax.data import resources


def _screen(rng, n_batches=3, per_batch=400, d=16, ctrl_frac=0.5):
  """Wells with a per-batch shift and per-batch anisotropic scaling (a plate effect)."""
  xs, ctrl, batch = [], [], []
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  for b in range(n_batches):
    scale = np.diag(rng.uniform(0.5, 2.0, d))
    z = rng.standard_normal((per_batch, d)) @ mix @ scale + rng.standard_normal(d) * 3
    xs.append(z)
    ctrl.append(rng.random(per_batch) < ctrl_frac)
    batch += [f"exp-{b}"] * per_batch
  return (np.concatenate(xs).astype(np.float32), np.concatenate(ctrl), np.array(batch))


def _cov(x, ddof):
  return np.cov(np.asarray(x, np.float64), rowvar=False, ddof=ddof)


def test_tvn_whitens_controls():
  x, ctrl, batch = _screen(np.random.default_rng(0))
  y, info = C.tvn(x, ctrl, batch, coral=False)
  assert info["components"] == x.shape[1]
  c = y[ctrl].astype(np.float64)
  np.testing.assert_allclose(c.mean(axis=0), 0, atol=1e-4)
  np.testing.assert_allclose(_cov(c, ddof=0), np.eye(x.shape[1]), atol=2e-3)


def test_tvn_coral_true_property():
  """CORAL multiplies batch b by (C_b + 0.5 I)^(-1/2): the batch's controls end with covariance
  C_b (C_b + 0.5 I)^(-1) = I - 0.5 (C_b + 0.5 I)^(-1), i.e. eigenvalues l / (l + 0.5) < 1, not
  I; and the rows are not re-centred."""
  x, ctrl, batch = _screen(np.random.default_rng(1))
  z, _ = C.tvn(x, ctrl, batch, coral=False)
  y, info = C.tvn(x, ctrl, batch, coral=True)
  assert info["coral"]["batches"] == 3
  d = x.shape[1]
  for b in np.unique(batch):
    in_b = batch == b
    cb = _cov(z[in_b & ctrl], ddof=1)
    w, v = np.linalg.eigh(cb + 0.5 * np.eye(d))
    m = (v / np.sqrt(w)) @ v.T
    np.testing.assert_allclose(y[in_b], z[in_b] @ m, atol=2e-4)
    after = _cov(y[in_b & ctrl], ddof=1)
    np.testing.assert_allclose(after, np.eye(d) - 0.5 * np.linalg.inv(cb + 0.5 * np.eye(d)),
                               atol=2e-4)
    assert np.linalg.eigvalsh(after).max() < 1.0
    assert np.abs(y[in_b & ctrl].mean(axis=0)).max() > 1e-2  # per-batch means stay
  # CORAL brings the batches' control covariances closer together
  spread = lambda arr: np.std([_cov(arr[(batch == b) & ctrl], 1) for b in np.unique(batch)],
                              axis=0).mean()
  assert spread(y) < spread(z)


def test_tvn_guard_caps_components(capsys):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((300, 64)).astype(np.float32)
  ctrl = np.zeros(300, bool)
  ctrl[:80] = True  # 80 controls for 64 dims: only 40 components are supported
  y, info = C.tvn(x, ctrl, None)
  assert info["components"] == 40 and y.shape == (300, 40)
  assert "keeping 40 principal components" in capsys.readouterr().err
  np.testing.assert_allclose(_cov(y[ctrl], 0), np.eye(40), atol=2e-3)
  with pytest.raises(ValueError, match="at least 2 control"):
    C.tvn(x, np.zeros(300, bool))


def test_pca_centerscale_per_batch_controls():
  x, ctrl, batch = _screen(np.random.default_rng(3))
  y, info = C.pca_centerscale(x, ctrl, batch)
  assert info["batches"] == 3
  for b in np.unique(batch):
    c = y[(batch == b) & ctrl].astype(np.float64)
    np.testing.assert_allclose(c.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(c.std(axis=0), 1, atol=1e-4)


def test_arm_correction_removes_arm_bias():
  rng = np.random.default_rng(4)
  arms = resources.gene_arms()
  by_arm = {}
  for g, a in sorted(arms.items()):
    by_arm.setdefault(a, []).append(g)
  big, small = by_arm["chr1p"][:60], by_arm["chr17p"][:15]
  labels = big + small + ["CPD@1.0"]
  d = 24
  bias = {"chr1p": rng.standard_normal(d) * 2, "chr17p": rng.standard_normal(d) * 2}
  x = rng.standard_normal((len(labels), d)).astype(np.float32)
  x[:60] += bias["chr1p"]
  x[60:75] += bias["chr17p"]
  expr = {g: (-5.0 if k % 2 == 0 else 2.0) for k, g in enumerate(big)}  # 30 unexpressed
  y, info = C.arm_correct(labels, x, arms, expr)
  assert info == {"mode": "unexpressed", "arms_with_genes": 2, "arms_corrected": 1,
                  "genes_corrected": 60}
  np.testing.assert_allclose(y[:60], x[:60] - x[:60:2].mean(axis=0), atol=1e-5)
  np.testing.assert_array_equal(y[60:], x[60:])  # small arm and the compound untouched
  assert abs(C.arm_mates_cosine(labels[:60], y[:60], arms)) < 0.1
  assert C.arm_mates_cosine(labels[:60], x[:60], arms) > 0.5
  # without expression: the all-gene fallback; arms need > 20 genes
  y2, info2 = C.arm_correct(labels, x, arms, None)
  assert info2["mode"] == "all_genes" and info2["arms_corrected"] == 1
  np.testing.assert_allclose(y2[:60].mean(axis=0), 0, atol=1e-5)


def test_arm_mates_excludes_related_pairs():
  arms = {"A": "chr1p", "B": "chr1p", "C": "chr1p", "D": "chr2q"}
  x = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
  assert C.arm_mates_cosine("ABCD", x, arms) == pytest.approx(1 / 3)
  assert C.arm_mates_cosine("ABCD", x, arms, {("B", "A")}) == pytest.approx(0.0)
