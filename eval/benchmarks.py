"""Map benchmarks: known-relationship recall (EFAAR v1.0) and replicate consistency.

Recall follows EFAAR v1.0 (docs/science.md §4.1): the null is the cosine similarity of every unordered
pair of distinct perturbations, a query pair is in a tail when r_right <= lo or r_left >= hi with
r_left/right = searchsorted(sorted null, q, side) / |null|.

It is computed exactly without holding the N(N-1)/2 null: a query is in the low tail iff
#(null <= q) <= k_lo, i.e. iff q < null_sorted[k_lo], and in the high tail iff #(null < q) >= k_hi,
i.e. iff null_sorted[k_hi - 1] < q (k_lo, k_hi from the same float64 divisions). So only a few
order statistics of the null are needed. They are found in one streamed pass over fixed-shape tiles
of the upper triangle of S (a JAX GEMM per tile; the next tile computes while the host counts):
a row sample brackets each wanted order statistic, every tile adds its entry counts per bracket
code and hands over the few entries inside a bracket, and the exact value is read off the sorted
bracket contents. A bracket that misses falls back to an exact radix select (two more passes).
Memory is O(tile + bracket contents), never O(N^2).

Identical values: S is defined as the output of one jitted tile function (`similarity_tile`) with a
fixed tile shape, evaluated on the same padded, normalised embeddings. Query similarities are read
from those same tiles and the reference (`null_from_tiles` + `percentile_recall`) assembles its
null from them too, so both sides compare bit-identical float32 values.
"""
import functools
import itertools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import EvalError

THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
MIN_ENTITIES = 20  # EFAAR MIN_REQ_ENT_CNT


class InsufficientEntities(EvalError):
  """A source has too few of its genes in the map to be scored."""


def recall_key(lo, hi) -> str:
  return f"recall_{lo}_{hi}"


def percentile_recall(null, queries, thresholds=THRESHOLDS) -> dict:
  """EFAAR compute_recall, literally: full sort of the null + searchsorted (the reference core)."""
  null = np.sort(np.asarray(null).ravel())
  q = np.asarray(queries).ravel()
  r_left = np.searchsorted(null, q, side="left") / len(null)
  r_right = np.searchsorted(null, q, side="right") / len(null)
  return {recall_key(lo, hi): float(np.mean((r_right <= lo) | (r_left >= hi)))
          for lo, hi in thresholds}


# ---------------------------------------------------------------------------- similarity tiles

EDGES = 8  # fixed number of bracket edges, so one executable computes every tile


def normalize_rows(embeddings) -> np.ndarray:
  """float32 unit rows; zero rows stay zero (cosine 0 with everything, as sklearn)."""
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise EvalError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise EvalError("embeddings contain NaN or inf")
  norm = np.sqrt(np.einsum("nd,nd->n", x, x))
  return x / np.where(norm > 0, norm, np.float32(1))[:, None]


@functools.partial(jax.jit, static_argnames=("rows", "cols"))
def similarity_tile(xn, i0, j0, n, edges, rows, cols):
  """S[i0:i0+rows, j0:j0+cols] and a uint8 code per entry: the number of `edges` <= S, or 254
  where the entry is not in the null (j <= i or j >= n). Every S entry anywhere in this module
  comes from this one executable (fixed shapes; offsets and edges are runtime values)."""
  a = jax.lax.dynamic_slice_in_dim(xn, i0, rows)
  b = jax.lax.dynamic_slice_in_dim(xn, j0, cols)
  s = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  s = jnp.where(s == 0, jnp.float32(0), s)  # -0.0 and 0.0 are one value for sort/searchsorted
  code = sum((s >= edges[k]).astype(jnp.uint8) for k in range(EDGES))
  i = i0 + jnp.arange(rows)[:, None]
  j = j0 + jnp.arange(cols)[None, :]
  return s, jnp.where((j > i) & (j < n), code, jnp.uint8(254))


@functools.partial(jax.jit, static_argnames=("n",))
def _sample_rows(xn, rows, n):
  return jnp.dot(xn[rows], xn[:n].T, precision=jax.lax.Precision.HIGHEST)


class SimilarityTiles:
  """Covers the upper triangle of the cosine-similarity matrix with fixed-shape tiles."""

  def __init__(self, embeddings, rows: int = 1024, cols: int = 2048):
    xn = normalize_rows(embeddings)
    self.n = n = len(xn)
    align = lambda v: max(128, -(-v // 128) * 128)
    self.rows, self.cols = min(rows, align(n)), min(cols, align(n))
    # Column windows of row block r0 start at r0, r0 + cols, ... until past n.
    self.windows = [(r0, c0) for r0 in range(0, n, self.rows) for c0 in range(r0, n, self.cols)]
    pad = max(i0 + self.rows for i0, _ in self.windows) + self.cols - n
    self.xn = jnp.asarray(np.pad(xn, ((0, pad), (0, 0))))

  @property
  def null_size(self) -> int:
    return self.n * (self.n - 1) // 2

  @property
  def flops(self) -> int:
    """Multiply-add FLOPs of one pass over all tiles."""
    return 2 * len(self.windows) * self.rows * self.cols * int(self.xn.shape[1])

  def dispatch(self, w: int, edges=None):
    """Starts computing window w (asynchronously); returns device arrays (s, code)."""
    e = np.full(EDGES, np.inf, np.float32)
    if edges is not None:
      e[:len(edges)] = edges
    i0, j0 = self.windows[w]
    return similarity_tile(self.xn, i0, j0, self.n, e, rows=self.rows, cols=self.cols)

  def tile(self, w: int, edges=None):
    """(s, code) of window w as numpy arrays."""
    s, code = self.dispatch(w, edges)
    return np.asarray(s), np.asarray(code)

  def stream(self, edges=None):
    """Yields (w, s, code) for every window, computing the next one while the caller works."""
    pending = self.dispatch(0, edges)
    for w in range(len(self.windows)):
      nxt = self.dispatch(w + 1, edges) if w + 1 < len(self.windows) else None
      yield w, np.asarray(pending[0]), np.asarray(pending[1])
      pending = nxt

  def locate(self, i, j):
    """(window, local row, local col) of entries (i, j), i < j."""
    r0 = (i // self.rows) * self.rows
    k = (j - r0) // self.cols
    first = {}
    for w, (a, _) in enumerate(self.windows):
      first.setdefault(a, w)
    w = np.array([first[v] for v in r0.tolist()], np.int64) + k
    return w, i - r0, j - r0 - k * self.cols

  def sample_rows(self, rows):
    """Cosines of a few rows against all others (only for choosing brackets)."""
    return np.asarray(_sample_rows(self.xn, jnp.asarray(rows), self.n))


def null_from_tiles(tiles: SimilarityTiles):
  """The full upper-triangle null as the reference sees it, assembled from the same tiles."""
  full = np.zeros((tiles.n, tiles.n + tiles.cols), np.float32)
  for w, s, _ in tiles.stream():
    i0, j0 = tiles.windows[w]
    full[i0:i0 + tiles.rows, j0:j0 + tiles.cols] = s[:tiles.n - i0]
  full = full[:, :tiles.n]
  return full[np.triu_indices(tiles.n, 1)], full


def _rank_cutoffs(m: int, lo: float, hi: float):
  """k_lo = max k with k/m <= lo (-1 if none); k_hi = min k with k/m >= hi (m+1 if none).

  Uses the same float64 division as the reference so boundary cases agree exactly."""
  k_lo = min(max(int(np.floor(lo * m)), -1), m)
  while k_lo < m and (k_lo + 1) / m <= lo:
    k_lo += 1
  while k_lo >= 0 and k_lo / m > lo:
    k_lo -= 1
  k_hi = min(max(int(np.ceil(hi * m)), 0), m + 1)
  while k_hi > 0 and (k_hi - 1) / m >= hi:
    k_hi -= 1
  while k_hi <= m and k_hi / m < hi:
    k_hi += 1
  return k_lo, k_hi


def needed_ranks(m: int, thresholds=THRESHOLDS) -> list:
  """The order statistics of an m-element null that decide recall at these thresholds."""
  ranks = set()
  for lo, hi in thresholds:
    k_lo, k_hi = _rank_cutoffs(m, lo, hi)
    ranks |= {k_lo} if 0 <= k_lo < m else set()
    ranks |= {k_hi - 1} if 1 <= k_hi <= m else set()
  return sorted(ranks)


def _tail_recall(q, stats, m, thresholds) -> dict:
  """Recall from order statistics: low tail iff q < null[k_lo], high tail iff null[k_hi-1] < q."""
  out = {}
  for lo, hi in thresholds:
    k_lo, k_hi = _rank_cutoffs(m, lo, hi)
    low = q < stats[k_lo] if 0 <= k_lo < m else np.full(q.shape, k_lo >= m)
    high = stats[k_hi - 1] < q if 1 <= k_hi <= m else np.full(q.shape, k_hi <= 0)
    out[recall_key(lo, hi)] = float(np.mean(low | high)) if len(q) else float("nan")
  return out


def _brackets(tiles: SimilarityTiles, ranks, sample_rows=256, groups=8, width=10.0):
  """Disjoint [a, b) value intervals that very likely hold null_sorted[r] for every rank r.

  Estimated from the cosines of a few random rows; the half-width is `width` standard errors
  of the quantile, measured across row groups (rows of a real map are far from independent)."""
  m, n = tiles.null_size, tiles.n
  rows = np.sort(np.random.default_rng(0).choice(n, min(n, sample_rows), replace=False))
  s = tiles.sample_rows(rows)
  keep = np.ones(s.shape, bool)
  keep[np.arange(len(rows)), rows] = False  # self-pairs are not in the null
  p = (np.asarray(ranks, np.float64) + 0.5) / m
  pooled = _quantiles(s[keep], p)
  g = min(groups, len(rows))
  per_group = np.stack([_quantiles(v[k], p) for v, k in
                        zip(np.array_split(s, g), np.array_split(keep, g))])
  se = per_group.std(axis=0, ddof=1) / np.sqrt(g) if g > 1 else np.abs(pooled)
  half = width * se + 1e-6
  iv = sorted(zip(pooled - half, pooled + half))
  merged = [list(iv[0])]
  for a, b in iv[1:]:
    if a <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], b)
    else:
      merged.append([a, b])
  while len(merged) > EDGES // 2:  # many thresholds: join the closest brackets
    k = int(np.argmin([merged[t + 1][0] - merged[t][1] for t in range(len(merged) - 1)]))
    merged[k:k + 2] = [[merged[k][0], merged[k + 1][1]]]
  return np.array(merged, np.float32).ravel()


def _quantiles(v, p):
  """Nearest-rank quantiles of a float32 sample, by one partition (no float64 copy)."""
  k = np.clip(np.round(p * (len(v) - 1)).astype(np.int64), 0, len(v) - 1)
  return np.partition(v, k)[k].astype(np.float64)


def _stream(tiles, ranks, query_tiles, n_queries, edges, cap):
  """One pass over all tiles: query values, counts per code, values inside the brackets."""
  qvals = np.empty(n_queries, np.float32)
  counts = np.zeros(EDGES + 1, np.int64)
  inside, extracted = [], 0
  even = range(0, len(edges) + 1, 2)
  for w, s, code in tiles.stream(edges):
    if w in query_tiles:
      li, lj, pos = query_tiles[w]
      qvals[pos] = s[li, lj]
    for c in even:
      counts[c] += np.count_nonzero(code == c)
    if extracted <= cap:
      odd = (code & 1).view(bool)
      vals, codes = s[odd], code[odd]
      extracted += len(vals)
      inside.append((vals, codes))
  if extracted > cap:
    return qvals, None
  vals = np.concatenate([v for v, _ in inside])
  codes = np.concatenate([c for _, c in inside])
  out = {}
  for c in range(1, len(edges), 2):
    out[c] = np.sort(vals[codes == c])
    counts[c] = len(out[c])
  cum = np.concatenate([[0], np.cumsum(counts)])
  stats = {}
  for r in ranks:
    c = int(np.searchsorted(cum, r, side="right")) - 1
    if c % 2 == 1:  # r falls inside a bracket: exact
      stats[r] = out[c][r - cum[c]]
  return qvals, stats


def _radix_select(tiles: SimilarityTiles, ranks):
  """Exact null_sorted[r] by a two-pass 16+16-bit radix select over float keys (the fallback)."""
  def keys():
    for _, s, code in tiles.stream():
      bits = s.view(np.uint32)
      key = bits ^ np.where(bits >> 31 == 1, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
      yield key[code != 254]
  hist = np.zeros(1 << 16, np.int64)
  for k in keys():
    hist += np.bincount(k >> 16, minlength=1 << 16)
  cum = np.cumsum(hist)
  bins = {r: int(np.searchsorted(cum, r, side="right")) for r in ranks}
  low = {b: np.zeros(1 << 16, np.int64) for b in set(bins.values())}
  for k in keys():
    for b in low:
      low[b] += np.bincount(k[(k >> 16) == b] & 0xFFFF, minlength=1 << 16)
  out = {}
  for r, b in bins.items():
    below = int(cum[b - 1]) if b else 0
    lo16 = int(np.searchsorted(np.cumsum(low[b]), r - below, side="right"))
    out[r] = _key_to_float((b << 16) | lo16)
  return out


def _key_to_float(key: int) -> np.float32:
  key = np.uint32(key)
  bits = key ^ np.uint32(0x80000000) if key & np.uint32(0x80000000) else ~key
  return np.array([bits], np.uint32).view(np.float32)[0]


def null_order_statistics(tiles: SimilarityTiles, ranks, query_tiles=None, n_queries=0,
                          cap=1 << 25):
  """Exact {r: null_sorted[r]} and the query values, with one streamed pass in the usual case.

  Bracket the wanted order statistics from a row sample, then stream every tile once, counting
  entries per bracket code and keeping only the entries inside the brackets. A rank whose
  bracket missed (or brackets holding more than `cap` entries) is resolved exactly by a
  radix select, which streams the tiles twice more."""
  ranks = sorted(set(int(r) for r in ranks))
  edges = _brackets(tiles, ranks) if ranks else np.zeros(0, np.float32)
  qvals, stats = _stream(tiles, ranks, query_tiles or {}, n_queries, edges, cap)
  missed = [r for r in ranks if stats is None or r not in stats]
  stats = dict(stats or {})
  if missed:
    stats.update(_radix_select(tiles, missed))
  return stats, qvals, len(missed)


# ----------------------------------------------------------------------------- recall

def filter_pairs(pairs, index: Mapping[str, int]):
  """EFAAR filter_relationships + map filter: sorted names, no self-pairs, unique, both in map.

  Labels are unique, so deduplicating index pairs is deduplicating name pairs. Returns (i, j)
  int64 arrays with i < j (rows of the map), sorted."""
  pairs = list(pairs)
  if not pairs:
    return np.empty(0, np.int64), np.empty(0, np.int64)
  cols = []
  for names in zip(*pairs):
    names = names if all(type(v) is str for v in names) else [str(v) for v in names]
    cols.append(np.fromiter(map(index.get, names, itertools.repeat(-1)), np.int64, len(names)))
  ij = np.stack(cols[:2], axis=1)
  ij = ij[(ij >= 0).all(axis=1) & (ij[:, 0] != ij[:, 1])]
  n = max(len(index), 1)
  key = np.unique(ij.min(axis=1) * n + ij.max(axis=1))
  return key // n, key % n


def check_labels(labels) -> dict:
  """label -> row; duplicate labels raise (EFAAR v1.0 builds this check but never raises it)."""
  labels = [str(x) for x in labels]
  index = {lab: k for k, lab in enumerate(labels)}
  if len(index) != len(labels):
    dup = sorted({x for x in labels if labels.count(x) > 1})[:5]
    raise EvalError(f"map labels must be unique; duplicated: {', '.join(dup)}")
  return index


def relationship_recall(embeddings, labels, pairs_by_source: Mapping[str, Sequence],
                        thresholds=THRESHOLDS, min_entities=MIN_ENTITIES, strict=False,
                        tile_shape=(1024, 2048)) -> dict:
  """Recall of several sources against one shared all-pairs null (EFAAR v1.0, exact).

  A source with fewer than `min_entities` distinct genes among its in-map pairs is reported as
  {"pairs", "entities", "skipped": reason}, or raises InsufficientEntities when `strict`."""
  index = check_labels(labels)
  emb = np.asarray(embeddings)
  if emb.ndim != 2 or len(emb) != len(index):
    raise EvalError(f"embeddings shape {emb.shape} does not match {len(index)} labels")
  if len(index) < 2:
    raise EvalError("recall needs at least 2 perturbations")
  tiles = SimilarityTiles(emb, *tile_shape)
  m = tiles.null_size
  sources, queries, offset = {}, {}, 0
  for src, pairs in pairs_by_source.items():
    i, j = filter_pairs(pairs, index)
    entities = len(np.union1d(i, j))
    if entities < max(min_entities, 2):
      reason = f"{entities} of its genes in the map, fewer than {max(min_entities, 2)}"
      if strict:
        raise InsufficientEntities(f"source {src}: {reason}")
      sources[src] = {"pairs": int(len(i)), "entities": entities, "skipped": reason}
      continue
    queries[src] = (i, j, np.arange(offset, offset + len(i)))
    offset += len(i)
  query_tiles = _group_by_window(tiles, queries.values())
  ranks = needed_ranks(m, thresholds)
  stats, qvals, missed = null_order_statistics(tiles, ranks, query_tiles, offset)
  for src, (i, j, pos) in queries.items():
    q = qvals[pos]
    out = {"pairs": int(len(i)), "entities": int(len(np.union1d(i, j)))}
    out.update(_tail_recall(q, stats, m, thresholds))
    sources[src] = out
  return {"n_perturbations": len(index), "null_pairs": m, "fallback_ranks": missed,
          "similarity_flops": tiles.flops * (1 + 2 * (missed > 0)),
          "sources": {s: sources[s] for s in pairs_by_source}}


def _group_by_window(tiles, query_sets):
  """{window: (local_i, local_j, positions)}: query values are read from the null's own tiles."""
  empty = [np.empty(0, np.int64)]
  i = np.concatenate([q[0] for q in query_sets] + empty)
  j = np.concatenate([q[1] for q in query_sets] + empty)
  pos = np.concatenate([q[2] for q in query_sets] + empty)
  w, li, lj = tiles.locate(i, j)
  order = np.argsort(w, kind="stable")
  ids, starts = np.unique(w[order], return_index=True)
  return {int(k): (li[sel], lj[sel], pos[sel])
          for k, sel in zip(ids, np.split(order, starts[1:]))}


# ------------------------------------------------------------------------ replicate consistency

def replicate_consistency(embeddings, perturbations, negative_controls, alpha=0.05) -> dict:
  """EFAAR v1.0 consistency (docs/science.md §4.2): per perturbation, the mean pairwise cosine among
  its replicates (>= 2); p = 1 - searchsorted(null, x, 'left') / |null| against the same
  statistic of the negative-control perturbations; reports the fraction with p <= alpha.

  Uses sum_{a<b} x_a.x_b = (|sum x|^2 - sum |x|^2) / 2 on unit rows, so no pair is enumerated."""
  x = normalize_rows(embeddings).astype(np.float64)
  labels = np.asarray(perturbations).astype(str)
  if len(labels) != len(x):
    raise EvalError(f"{len(labels)} perturbation labels for {len(x)} embeddings")
  uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
  order = np.argsort(inv, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  sums = np.add.reduceat(x[order], starts, axis=0)
  sq = np.add.reduceat(np.einsum("nd,nd->n", x, x)[order], starts)
  k = counts.astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    stat = (np.einsum("pd,pd->p", sums, sums) - sq) / (k * (k - 1))
  neg = np.isin(uniq, list(map(str, negative_controls)))
  ok = counts >= 2
  null = np.sort(stat[neg & ok])
  tested = stat[~neg & ok]
  base = {"perturbations": int(len(tested)), "null_perturbations": int(len(null)), "alpha": alpha}
  if len(null) == 0 or len(tested) == 0:
    return {**base, "skipped": "needs negative-control and test perturbations with >= 2 "
            "replicates each"}
  p = 1.0 - np.searchsorted(null, tested, side="left") / len(null)
  return {**base, "fraction_consistent": float(np.mean(p <= alpha)),
          "median_replicate_cosine": float(np.median(tested))}
