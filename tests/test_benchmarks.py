"""Recall (EFAAR v1.0) and replicate consistency: anchors and exactness against a full sort."""
import numpy as np
import pytest

from eval import benchmarks as B

ANCHOR = ((0.1, 0.9), (0.2, 0.8))


def _order_statistic_recall(null, queries, thresholds):
  """The rank/recall core of the fast path on an explicit null: a few order statistics."""
  null = np.asarray(null).ravel()
  q = np.asarray(queries, null.dtype).ravel()
  ranks = B.needed_ranks(len(null), thresholds)
  part = np.partition(null, ranks) if ranks else null
  return B._tail_recall(q, {r: part[r] for r in ranks}, len(null), thresholds)


def _reference_recall(x, labels, pairs, tile_shape):
  """The plain reference on the same S tiles: the whole null, np.sort, searchsorted."""
  i, j = B.filter_pairs(pairs, B.check_labels(labels))
  null, full = B.null_from_tiles(B.SimilarityTiles(x, *tile_shape))
  return {"pairs": int(len(i)), **B.percentile_recall(null, full[i, j])}


def test_reference_anchor():
  # EFAAR's unit test: null [1..5], queries [1, 5].
  expected = {"recall_0.1_0.9": 0.0, "recall_0.2_0.8": 1.0}
  assert B.percentile_recall([1, 2, 3, 4, 5], [1, 5], ANCHOR) == expected
  assert _order_statistic_recall([1., 2, 3, 4, 5], [1, 5], ANCHOR) == expected
  assert _order_statistic_recall([5., 3, 1, 2, 4], [5, 1], ANCHOR) == expected


def test_order_statistic_core_matches_sort_with_ties():
  rng = np.random.default_rng(1)
  thresholds = ((0.05, 0.95), (0.1, 0.9), (0.2, 0.8), (0.0, 1.0), (0.5, 0.5))
  for m in (1, 2, 7, 20, 101, 1000):
    null = rng.integers(0, 6, m).astype(np.float32)  # heavy ties
    q = np.concatenate([rng.integers(-1, 7, 50), null[:5]]).astype(np.float32)
    assert _order_statistic_recall(null, q, thresholds) == B.percentile_recall(
        null, q, thresholds)


def test_rank_cutoffs_match_float_division():
  for m in (1, 3, 10, 20, 99, 1000, 144491500):
    for lo, hi in ((0.05, 0.95), (0.1, 0.9), (0.0, 1.0), (1 / 3, 2 / 3)):
      k_lo, k_hi = B._rank_cutoffs(m, lo, hi)
      for k in {0, 1, k_lo - 1, k_lo, k_lo + 1, k_hi - 1, k_hi, k_hi + 1, m - 1, m}:
        if 0 <= k <= m:
          assert (k / m <= lo) == (k <= k_lo)
          assert (k / m >= hi) == (k >= k_hi)


def _planted_map(rng, n, d, n_pairs=300):
  x = rng.standard_normal((n, d)).astype(np.float32)
  labels = [f"G{k}" for k in range(n)]
  pairs = [(labels[a], labels[b]) for a, b in rng.integers(0, n, (n_pairs, 2))]
  for k in range(0, min(n, 60) - 1, 2):  # planted related pairs (and anti-related ones)
    x[k + 1] = (1 if k % 4 else -1) * x[k] + 0.3 * rng.standard_normal(d)
    pairs.append((labels[k + 1], labels[k]))
  pairs += [(labels[0], labels[0]), ("G0", "NOT_IN_MAP"), (labels[3], labels[2])]  # filtered
  return x, labels, pairs


@pytest.mark.parametrize("n,d,shape", [(40, 8, (128, 128)), (700, 24, (128, 256)),
                                       (1500, 16, (256, 512))])
def test_recall_equals_full_sort_on_same_similarities(n, d, shape):
  rng = np.random.default_rng(n)
  x, labels, pairs = _planted_map(rng, n, d)
  x[5] = x[4]  # exact ties in S
  x[7] = 0.0   # a zero vector: cosine 0 with everything
  res = B.relationship_recall(x, labels, {"S": pairs}, tile_shape=shape)["sources"]["S"]
  ref = _reference_recall(x, labels, pairs, shape)
  assert res["pairs"] == ref["pairs"]
  for key in ("recall_0.05_0.95", "recall_0.1_0.9"):
    assert res[key] == ref[key]
  # the planted pairs make recall clearly higher than the 10 % / 20 % chance level
  assert res["recall_0.1_0.9"] > 0.2


def test_order_statistics_exact_and_fallback():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((600, 12)).astype(np.float32)
  x[10:40] = x[0]  # a large atom of cosine exactly 1
  tiles = B.SimilarityTiles(x, 128, 256)
  null, _ = B.null_from_tiles(tiles)
  assert len(null) == tiles.null_size
  srt = np.sort(null)
  ranks = [0, 1, 17, len(null) // 2, len(null) - 1] + B.needed_ranks(len(null))
  for cap in (1 << 25, 0):  # cap 0 forces the radix-select fallback for every rank
    stats, _, missed = B.null_order_statistics(tiles, ranks, cap=cap)
    assert all(stats[r] == srt[r] for r in ranks)
    if cap == 0:
      assert missed == len(set(ranks))


def test_sources_share_one_null_and_small_sources_skip():
  rng = np.random.default_rng(4)
  x, labels, pairs = _planted_map(rng, 300, 16)
  tiny = [(labels[0], labels[1]), (labels[2], labels[3])]
  res = B.relationship_recall(x, labels, {"A": pairs, "B": tiny})
  assert res["n_perturbations"] == 300 and res["null_pairs"] == 300 * 299 // 2
  assert "skipped" in res["sources"]["B"] and res["sources"]["B"]["entities"] == 4
  single = B.relationship_recall(x, labels, {"A": pairs}, strict=True)["sources"]["A"]
  assert set(single) == {"pairs", "entities", "recall_0.05_0.95", "recall_0.1_0.9"}
  assert single == res["sources"]["A"]
  with pytest.raises(B.InsufficientEntities, match="fewer than 20"):
    B.relationship_recall(x, labels, {"B": tiny}, strict=True)


def test_duplicate_labels_raise():
  x = np.eye(30, dtype=np.float32)
  labels = [f"G{k}" for k in range(29)] + ["G3"]
  with pytest.raises(ValueError, match="unique.*G3"):
    B.relationship_recall(x, labels, {"S": [("G1", "G2")]})


def test_replicate_consistency():
  rng = np.random.default_rng(5)
  d, wells, labels = 32, [], []
  for g in range(40):  # 20 negative controls: pure noise; 20 genes: a shared direction + noise
    center = rng.standard_normal(d) * (0 if g < 20 else 1.0)
    for _ in range(4):
      wells.append(center + 0.5 * rng.standard_normal(d))
      labels.append(f"G{g}")
  x = np.array(wells, np.float32)
  res = B.replicate_consistency(x, labels, [f"G{g}" for g in range(20)])
  assert res["perturbations"] == 20 and res["null_perturbations"] == 20
  assert res["fraction_consistent"] == 1.0
  # the closed form equals the explicit mean pairwise cosine
  xn = B.normalize_rows(x[:4]).astype(np.float64)
  explicit = np.mean([xn[a] @ xn[b] for a in range(4) for b in range(a)])
  one = B.replicate_consistency(x[:8], labels[:8], ["G1"])
  assert one["median_replicate_cosine"] == pytest.approx(explicit, abs=1e-6)
  assert "skipped" in B.replicate_consistency(x, labels, [])
