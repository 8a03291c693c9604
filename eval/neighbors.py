"""Nearest genes of a map and its most similar unannotated pairs: `python -m eval.neighbors`.

  python -m eval.neighbors --map=EVAL_DIR --gene=POLR2A [--k=20]
  python -m eval.neighbors --map=EVAL_DIR --top_pairs=N [--withheld=CSV] [--out=DIR]

Reads the gene_embeddings.npz that `eval.recall` writes (eval/explore.py: load_map).
--gene: the gene's k nearest genes by cosine similarity and, for each pair, the sources that
annotate it (the same loader and files as recall). --top_pairs: the N most similar gene pairs
that no source annotates, the map's candidate discoveries. With --withheld (a CSV with
entity1,entity2, e.g. the synthetic screen's ground_truth/withheld_pairs.csv, found beside
--annotations_dir automatically), it also reports the precision of those N pairs against the
withheld pairs, with the precision of N random unannotated pairs beside it (docs/science.md §4.5).

Prints a table; writes DIR/neighbors_GENE.csv or DIR/top_pairs.csv and a .json of the same rows
(DIR: --out, default the map folder). The last stdout line is that JSON.
"""
import csv
import json
import os

import numpy as np

from eval import EvalError
from eval import explore
from mae_jax.data import resources
from mae_jax.util import cli, files

WITHHELD_FILE = "withheld_pairs.csv"
_CHUNK = 1024


def _known(sources, annotations_dir):
  return {s: set(resources.load_relationships(s, annotations_dir)) for s in sources}


def nearest(labels, x, gene, k, sources, annotations_dir=None):
  """Rows {rank, gene, cosine, sources} of `gene`'s k nearest genes."""
  labels = np.asarray(labels).astype(str)
  hits = np.flatnonzero(labels == gene)
  if not len(hits):
    close = [g for g in labels if g.upper() == gene.upper()]
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise EvalError(f"gene {gene!r} is not in the map ({len(labels):,} genes){hint}")
  xn = explore.unit_rows(x)
  sim = xn @ xn[hits[0]]
  sim[hits[0]] = -np.inf
  order = np.argsort(-sim, kind="stable")[:min(k, len(labels) - 1)]
  names = [gene] + labels[order].tolist()  # row 0 of annotate: the gene against names[1:]
  bits = explore.annotate(names, np.arange(1, len(names))[None, :], sources, annotations_dir)[0]
  return [{"rank": r + 1, "gene": g, "cosine": round(float(sim[j]), 4),
           "sources": [s for b, s in enumerate(sources) if bits[r] >> b & 1]}
          for r, (g, j) in enumerate(zip(names[1:], order))]


def _annotated_keys(labels, known):
  index = {g: k for k, g in enumerate(labels)}
  n = len(labels)
  keys = set()
  for pairs in known.values():
    for a, b in pairs:
      i, j = index.get(a), index.get(b)
      if i is not None and j is not None and i != j:
        keys.add(min(i, j) * n + max(i, j))
  return keys


def top_pairs(labels, x, n, sources, annotations_dir=None):
  """The n most similar pairs (i < j) that no source annotates: rows {rank, gene1, gene2,
  cosine}, best first. Scans the upper triangle in row chunks, keeping a running top list."""
  labels = np.asarray(labels).astype(str)
  known = _annotated_keys(labels, _known(sources, annotations_dir))
  xn = explore.unit_rows(x)
  m = len(labels)
  extra = len(known) + n  # enough candidates that n survive removing annotated pairs
  best_key, best_sim = np.empty(0, np.int64), np.empty(0, np.float32)
  for a in range(0, m, _CHUNK):
    rows = np.arange(a, min(a + _CHUNK, m))
    s = xn[rows] @ xn.T
    s[np.arange(len(rows))[:, None] >= np.arange(m)[None, :] - a] = -np.inf  # j <= i
    flat = s.ravel()
    take = min(extra, flat.size)
    top = np.argpartition(-flat, take - 1)[:take]
    top = top[np.isfinite(flat[top])]
    keys = (rows[top // m]) * m + top % m
    best_key = np.concatenate([best_key, keys])
    best_sim = np.concatenate([best_sim, flat[top]])
    if len(best_key) > extra:
      keep = np.argpartition(-best_sim, extra - 1)[:extra]
      best_key, best_sim = best_key[keep], best_sim[keep]
  order = np.lexsort((best_key, -best_sim))
  out = []
  for t in order:
    if int(best_key[t]) in known:
      continue
    i, j = divmod(int(best_key[t]), m)
    out.append({"rank": len(out) + 1, "gene1": str(labels[i]), "gene2": str(labels[j]),
                "cosine": round(float(best_sim[t]), 4)})
    if len(out) == n:
      break
  return out, known


def read_pairs(path):
  """Sorted-name pairs of a CSV with entity1,entity2 (or gene1,gene2) columns."""
  if not os.path.isfile(path):
    raise EvalError(f"{path}: no such withheld-pairs file")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    cols = next(((a, b) for a, b in (("entity1", "entity2"), ("gene1", "gene2"))
                 if a in (reader.fieldnames or []) and b in reader.fieldnames), None)
    if cols is None:
      raise EvalError(f"{path}: expected columns entity1,entity2; got {reader.fieldnames}")
    return {(min(r[cols[0]], r[cols[1]]), max(r[cols[0]], r[cols[1]])) for r in reader}


def withheld_precision(rows, labels, known, withheld, seed=0):
  """Precision of the top pairs against `withheld`, and of as many random unannotated pairs."""
  labels = np.asarray(labels).astype(str)
  m = len(labels)
  present = set(labels)
  held = {p for p in withheld if p[0] in present and p[1] in present}
  hits = sum((r["gene1"], r["gene2"]) in held or (r["gene2"], r["gene1"]) in held for r in rows)
  unannotated = m * (m - 1) // 2 - len(known)
  rng = np.random.default_rng(seed)
  draws = 0
  random_hits = 0
  want = max(len(rows), 1000)  # a steadier random baseline than N draws
  while draws < want:
    i, j = rng.integers(0, m, 2)
    if i == j or min(i, j) * m + max(i, j) in known:
      continue
    draws += 1
    a, b = sorted((labels[i], labels[j]))
    random_hits += (a, b) in held
  return {"n": len(rows), "hits": int(hits),
          "precision": round(hits / len(rows), 4) if rows else None,
          "withheld_pairs_in_map": len(held),
          "random_precision": round(random_hits / draws, 4),
          "expected_random_precision": round(len(held) / unannotated, 4) if unannotated else None,
          "random_draws": draws}


def _print_table(rows, cols):
  width = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) if rows else len(c) for c in cols}
  print("  ".join(c.ljust(width[c]) for c in cols))
  for r in rows:
    print("  ".join(_cell(r[c]).ljust(width[c]) for c in cols))


def _cell(v):
  return ";".join(v) if isinstance(v, list) else f"{v:.4f}" if isinstance(v, float) else str(v)


def _write(out_dir, stem, rows, cols, summary):
  os.makedirs(out_dir, exist_ok=True)
  with files.atomic_open(os.path.join(out_dir, stem + ".csv"), "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(cols)
    w.writerows([[_cell(r[c]) for c in cols] for r in rows])
  with files.atomic_open(os.path.join(out_dir, stem + ".json"), "w") as f:
    json.dump(summary, f, indent=1)


def _auto_withheld(annotations_dir):
  """ground_truth/withheld_pairs.csv beside a synthetic screen's ground_truth/annotations."""
  if not annotations_dir:
    return None
  path = os.path.join(os.path.dirname(os.path.abspath(annotations_dir)), WITHHELD_FILE)
  return path if os.path.isfile(path) else None


def run(f) -> dict:
  if not f.map:
    raise EvalError("--map=EVAL_DIR is required (the folder eval.recall --out wrote)")
  if bool(f.gene) == bool(f.top_pairs):
    raise EvalError("give exactly one of --gene=SYMBOL or --top_pairs=N")
  if f.k < 1 or (f.top_pairs is not None and f.top_pairs < 0):
    raise EvalError("--k and --top_pairs must be positive")
  labels, x, result = explore.load_map(f.map)
  sources = list(f.sources or (result.get("settings") or {}).get("sources") or resources.SOURCES)
  out_dir = f.out or f.map
  if f.gene:
    rows = nearest(labels, x, f.gene, f.k, sources, f.annotations_dir)
    cols = ["rank", "gene", "cosine", "sources"]
    _print_table(rows, cols)
    summary = {"gene": f.gene, "k": len(rows), "sources": sources, "neighbors": rows}
    stem = f"neighbors_{f.gene}"
  else:
    rows, known = top_pairs(labels, x, f.top_pairs, sources, f.annotations_dir)
    cols = ["rank", "gene1", "gene2", "cosine"]
    _print_table(rows, cols)
    summary = {"top_pairs": len(rows), "sources": sources, "annotated_pairs_in_map": len(known),
               "pairs": rows}
    withheld = f.withheld or _auto_withheld(f.annotations_dir)
    if withheld:
      held = read_pairs(withheld)
      summary["withheld"] = {"file": withheld, **withheld_precision(rows, labels, known, held)}
      w = summary["withheld"]
      print(f"precision@{w['n']} against withheld pairs: {w['precision']} "
            f"({w['hits']} hits; random unannotated pairs: {w['random_precision']})")
    stem = "top_pairs"
  _write(out_dir, stem, rows, cols, summary)
  summary["out"] = os.path.join(out_dir, stem + ".csv")
  return summary


def _define_flags():
  from absl import flags
  flags.DEFINE_string("map", None, "eval directory holding gene_embeddings.npz (eval.recall --out)")
  flags.DEFINE_string("gene", None, "gene whose nearest genes to list")
  flags.DEFINE_integer("k", 20, "nearest genes to list with --gene")
  flags.DEFINE_integer("top_pairs", None, "list the N most similar pairs that no source annotates")
  flags.DEFINE_string("withheld", None, "CSV of withheld pairs (entity1,entity2) to score the top "
                      "pairs against; default: withheld_pairs.csv beside --annotations_dir")
  flags.DEFINE_list("sources", None, "annotation sources (default: those recall.json scored)")
  flags.DEFINE_string("annotations_dir", None, "folder with {source}.txt annotation files")
  flags.DEFINE_string("out", None, "folder for the CSV/JSON (default: --map)")


def main(argv):
  from absl import flags
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.print_result(run(flags.FLAGS))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
