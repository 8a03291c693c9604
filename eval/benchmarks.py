"""Map benchmarks: known-relationship recall (EFAAR v1.0) and replicate consistency.

Recall follows EFAAR v1.0 (method.md §4.1): the null is the cosine similarity of every unordered
pair of distinct perturbations, a query pair is in a tail when r_right <= lo or r_left >= hi with
r_left/right = searchsorted(sorted null, q, side) / |null|.

It is computed exactly without holding the N(N-1)/2 null: a query is in the low tail iff
#(null <= q) <= k_lo, i.e. iff q < null_sorted[k_lo], and in the high tail iff #(null < q) >= k_hi,
i.e. iff null_sorted[k_hi - 1] < q. So only a few order statistics of the null are needed, and they
are found by a radix select over the float32 bit patterns while streaming tiles of S.

Identical values: S is defined as the output of one jitted tile function (`similarity_tile`) with a
fixed tile shape, evaluated on the same padded, normalised embeddings. Query similarities are read
from those same tiles and the reference (`reference_recall` / `null_from_tiles`) assembles its null
from them too, so both sides compare bit-identical float32 values.
"""
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
MIN_ENTITIES = 20  # EFAAR MIN_REQ_ENT_CNT
TILE = 2048
_NOKEY = np.uint32(0xFFFFFFFF)  # key of masked entries: above every finite float


class InsufficientEntities(ValueError):
  """A source has too few of its genes in the map to be scored."""


def recall_key(lo, hi) -> str:
  return f"recall_{lo}_{hi}"


def percentile_recall(null, queries, thresholds=THRESHOLDS) -> dict:
  """EFAAR's compute_recall, literally: full sort of the null + searchsorted (the reference core)."""
  null = np.sort(np.asarray(null).ravel())
  q = np.asarray(queries).ravel()
  r_left = np.searchsorted(null, q, side="left") / len(null)
  r_right = np.searchsorted(null, q, side="right") / len(null)
  return {recall_key(lo, hi): float(np.mean((r_right <= lo) | (r_left >= hi)))
          for lo, hi in thresholds}


# ---------------------------------------------------------------------------- similarity tiles

def normalize_rows(embeddings) -> np.ndarray:
  """float32 unit rows; zero rows stay zero (cosine 0 with everything, as sklearn)."""
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings contain NaN or inf")
  norm = np.sqrt(np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64)))
  return (x / np.where(norm > 0, norm, 1.0)[:, None]).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("tile",))
def similarity_tile(xn, i0, j0, n, tile=TILE):
  """S[i0:i0+tile, j0:j0+tile] and monotone uint32 keys; keys of non-null entries (j <= i, j >= n)
  are 0xFFFFFFFF. One compiled function for every tile, so every S entry is computed one way."""
  a = jax.lax.dynamic_slice_in_dim(xn, i0, tile)
  b = jax.lax.dynamic_slice_in_dim(xn, j0, tile)
  s = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  s = jnp.where(s == 0, jnp.float32(0), s)  # -0.0 == 0.0 for sort/searchsorted; one key for both
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  key = bits ^ jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
  i = i0 + jnp.arange(tile)[:, None]
  j = j0 + jnp.arange(tile)[None, :]
  key = jnp.where((j > i) & (j < n), key, jnp.uint32(_NOKEY))
  return s, key


def _key_to_float(key: int) -> np.float32:
  key = np.uint32(key)
  bits = key ^ np.uint32(0x80000000) if key & np.uint32(0x80000000) else ~key
  return np.array([bits], np.uint32).view(np.float32)[0]


class SimilarityTiles:
  """Upper-triangle tiles of the cosine-similarity matrix of a map."""

  def __init__(self, embeddings, tile: int | None = None):
    xn = normalize_rows(embeddings)
    self.n = len(xn)
    self.tile = tile or min(TILE, max(128, -(-self.n // 128) * 128))
    self.blocks = -(-self.n // self.tile)
    pad = self.blocks * self.tile - self.n
    self.xn = jnp.asarray(np.pad(xn, ((0, pad), (0, 0))))

  @property
  def null_size(self) -> int:
    return self.n * (self.n - 1) // 2

  def tiles(self):
    """Yields (bi, bj, s, key) as numpy arrays for every tile with bj >= bi."""
    for bi in range(self.blocks):
      for bj in range(bi, self.blocks):
        s, key = similarity_tile(self.xn, bi * self.tile, bj * self.tile, self.n, tile=self.tile)
        yield bi, bj, np.asarray(s), np.asarray(key)


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


def _order_statistics(tiles: SimilarityTiles, ranks, query_tiles):
  """Exact null_sorted[r] for each rank r (two-pass 16+16-bit radix select) and query values.

  query_tiles: {(bi, bj): (local_i, local_j, positions)}; returns (values by rank, query values)."""
  ranks = sorted(set(int(r) for r in ranks))
  n_queries = sum(len(p) for _, _, p in query_tiles.values())
  qvals = np.empty(n_queries, np.float32)
  hi_hist = np.zeros(1 << 16, np.int64)
  for bi, bj, s, key in tiles.tiles():
    if (bi, bj) in query_tiles:
      li, lj, pos = query_tiles[bi, bj]
      qvals[pos] = s[li, lj]
    hi_hist += np.bincount((key >> 16).ravel(), minlength=1 << 16)
  hi_hist[-1] -= tiles.blocks * (tiles.blocks + 1) // 2 * tiles.tile ** 2 - tiles.null_size
  if not ranks:
    return {}, qvals
  cum = np.cumsum(hi_hist)
  bins = {r: int(np.searchsorted(cum, r, side="right")) for r in ranks}
  wanted = sorted(set(bins.values()))
  lo_hist = {b: np.zeros(1 << 16, np.int64) for b in wanted}
  for _, _, _, key in tiles.tiles():
    top = key >> 16
    for b in wanted:
      lo_hist[b] += np.bincount((key[top == b] & 0xFFFF), minlength=1 << 16)
  out = {}
  for r in ranks:
    b = bins[r]
    below = int(cum[b - 1]) if b else 0
    low = int(np.searchsorted(np.cumsum(lo_hist[b]), r - below, side="right"))
    out[r] = _key_to_float((b << 16) | low)
  return out, qvals


# ----------------------------------------------------------------------------- recall

def filter_pairs(pairs, index: Mapping[str, int]):
  """EFAAR filter_relationships + map filter: sorted names, no self-pairs, unique, both in map.

  Returns (i, j) int arrays with i < j (row indices of the map)."""
  seen = set()
  for a, b in pairs:
    a, b = str(a), str(b)
    if a == b or a not in index or b not in index:
      continue
    seen.add((a, b) if a < b else (b, a))
  ij = np.array(sorted((min(index[a], index[b]), max(index[a], index[b])) for a, b in seen),
                np.int64).reshape(-1, 2)
  return ij[:, 0], ij[:, 1]


def check_labels(labels) -> dict:
  """label -> row; duplicate labels raise (EFAAR v1.0 builds this check but never raises it)."""
  labels = [str(x) for x in labels]
  index = {lab: k for k, lab in enumerate(labels)}
  if len(index) != len(labels):
    dup = sorted({x for x in labels if labels.count(x) > 1})[:5]
    raise ValueError(f"map labels must be unique; duplicated: {', '.join(dup)}")
  return index


def relationship_recall(embeddings, labels, pairs_by_source: Mapping[str, Sequence],
                        thresholds=THRESHOLDS, min_entities=MIN_ENTITIES, strict=False,
                        tile=None) -> dict:
  """Recall of several sources against one shared all-pairs null.

  A source with fewer than `min_entities` of its genes among its in-map pairs is reported as
  {"pairs": n, "skipped": reason} (or raises InsufficientEntities when strict)."""
  index = check_labels(labels)
  emb = np.asarray(embeddings)
  if emb.ndim != 2 or len(emb) != len(index):
    raise ValueError(f"embeddings shape {emb.shape} does not match {len(index)} labels")
  if len(index) < 2:
    raise ValueError("recall needs at least 2 perturbations")
  tiles = SimilarityTiles(emb, tile)
  m = tiles.null_size
  sources, queries, offset = {}, {}, 0
  for src, pairs in pairs_by_source.items():
    i, j = filter_pairs(pairs, index)
    entities = len(np.union1d(i, j))
    if entities < min_entities:
      reason = f"{entities} of its genes in the map, fewer than {min_entities}"
      if strict:
        raise InsufficientEntities(f"source {src}: {reason}")
      sources[src] = {"pairs": int(len(i)), "entities": entities, "skipped": reason}
      continue
    queries[src] = (i, j, np.arange(offset, offset + len(i)))
    offset += len(i)
  cut = {(lo, hi): _rank_cutoffs(m, lo, hi) for lo, hi in thresholds}
  ranks = [k for k_lo, _ in cut.values() if 0 <= k_lo < m for k in [k_lo]]
  ranks += [k_hi - 1 for _, k_hi in cut.values() if 1 <= k_hi <= m]
  query_tiles = _group_by_tile(queries.values(), tiles.tile)
  stats, qvals = _order_statistics(tiles, ranks, query_tiles)
  for src, (i, j, pos) in queries.items():
    q = qvals[pos]
    out = {"pairs": int(len(i)), "entities": int(len(np.union1d(i, j)))}
    for (lo, hi), (k_lo, k_hi) in cut.items():
      low = np.ones_like(q, bool) if k_lo >= m else (q < stats[k_lo] if k_lo >= 0 else q < -np.inf)
      high = np.ones_like(q, bool) if k_hi <= 0 else (
          stats[k_hi - 1] < q if k_hi <= m else q > np.inf)
      out[recall_key(lo, hi)] = float(np.mean(low | high))
    sources[src] = out
  return {"n_perturbations": len(index), "null_pairs": m,
          "sources": {s: sources[s] for s in pairs_by_source}}


def _group_by_tile(query_sets, tile):
  """{(bi, bj): (local_i, local_j, positions)} so query values are read from the null's tiles."""
  i = np.concatenate([q[0] for q in query_sets] + [np.empty(0, np.int64)])
  j = np.concatenate([q[1] for q in query_sets] + [np.empty(0, np.int64)])
  pos = np.concatenate([q[2] for q in query_sets] + [np.empty(0, np.int64)])
  tile_id = (i // tile) * (1 << 32) + j // tile
  order = np.argsort(tile_id, kind="stable")
  ids, starts = np.unique(tile_id[order], return_index=True)
  groups = {}
  for t_id, sel in zip(ids.tolist(), np.split(order, starts[1:])):
    groups[t_id >> 32, t_id & 0xFFFFFFFF] = (i[sel] % tile, j[sel] % tile, pos[sel])
  return groups


def known_relationship_recall(embeddings: np.ndarray, labels: Sequence[str],
                              pairs: Sequence[tuple], thresholds=THRESHOLDS,
                              min_entities=MIN_ENTITIES) -> dict:
  """{"pairs": int, "recall_{lo}_{hi}": float, ...} for one source (EFAAR v1.0, exact).

  Raises ValueError on duplicate labels and InsufficientEntities (a ValueError) when fewer than
  `min_entities` genes of the in-map pairs are present."""
  res = relationship_recall(embeddings, labels, {"source": pairs}, thresholds, min_entities,
                            strict=True)["sources"]["source"]
  res.pop("entities")
  return res


def reference_recall(embeddings, labels, pairs, thresholds=THRESHOLDS, tile=None) -> dict:
  """Plain reference on the same S tiles: materialise the full null, sort, searchsorted."""
  index = check_labels(labels)
  tiles = SimilarityTiles(embeddings, tile)
  i, j = filter_pairs(pairs, index)
  null, s_full = null_from_tiles(tiles, keep_matrix=True)
  out = {"pairs": int(len(i))}
  out.update(percentile_recall(null, s_full[i, j], thresholds))
  return out


def null_from_tiles(tiles: SimilarityTiles, keep_matrix=False):
  """The full upper-triangle null (and optionally the N x N matrix) from the same tiles."""
  t, n = tiles.tile, tiles.n
  full = np.zeros((tiles.blocks * t,) * 2, np.float32)
  for bi, bj, s, _ in tiles.tiles():
    full[bi * t:(bi + 1) * t, bj * t:(bj + 1) * t] = s
  full = full[:n, :n]
  iu = np.triu_indices(n, 1)
  null = full[iu]
  return (null, full) if keep_matrix else null
