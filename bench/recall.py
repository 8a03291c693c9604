"""Recall benchmark: exact streaming recall (eval.benchmarks) vs the plain numpy reference.

  python bench/recall.py [--perturbations=17000] [--dims=1024] [--repeats=1] [--no-same_s]

A random map with planted pairs of all five real sources (gene universe = every gene of the
sources, filled up with anonymous labels) is scored, both thresholds, by
  * ours: `relationship_recall` (one shared null, order statistics, no full null held);
  * reference: plain numpy, S = Xn @ Xn.T, null = S[triu], null.sort(), searchsorted;
  * same_s (optional): the same plain sort + searchsorted on our own S tiles, which checks
    exactness on bit-identical cosines (the numpy reference computes S with a different GEMM).
Each side runs in its own fresh process, so `peak_rss_mib` is that side's peak; timings exclude
loading the map. Prints one JSON line per repeat and a summary line (min over repeats).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mae_jax.util import cli  # pylint: disable=wrong-import-position

THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))


def make_map(n, d, seed=0, planted=0.05):
  from mae_jax.data import resources
  pairs = {s: resources.load_relationships(s) for s in resources.SOURCES}
  genes = sorted({g for p in pairs.values() for pair in p for g in pair})
  labels = (genes + [f"RXRX3-{k:05d}" for k in range(max(0, n - len(genes)))])[:n]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  index = {g: k for k, g in enumerate(labels)}
  for p in pairs.values():
    for a, b in (p[k] for k in rng.choice(len(p), int(planted * len(p)), replace=False)):
      if a in index and b in index:
        x[index[b]] += 0.4 * x[index[a]]
  return x, labels


def _ours(x, labels, pairs):
  from eval import benchmarks
  res = benchmarks.relationship_recall(x, labels, pairs, THRESHOLDS)
  return {s: {k: v for k, v in r.items() if k != "entities"} for s, r in res["sources"].items()}, {
      "fallback_ranks": res["fallback_ranks"], "gemm_flops": res["similarity_flops"]}


def _reference(x, labels, pairs):
  from eval.benchmarks import filter_pairs
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = xn @ xn.T
  null = s[np.triu_indices(len(x), 1)]
  t_rank = time.perf_counter()
  null.sort()
  index = {g: k for k, g in enumerate(labels)}
  out = {}
  for src, p in pairs.items():
    i, j = filter_pairs(p, index)
    q = s[i, j]
    r_left = np.searchsorted(null, q, side="left") / len(null)
    r_right = np.searchsorted(null, q, side="right") / len(null)
    out[src] = {"pairs": int(len(i))}
    for lo, hi in THRESHOLDS:
      out[src][f"recall_{lo}_{hi}"] = float(np.mean((r_right <= lo) | (r_left >= hi)))
  return out, {"sort_and_search_seconds": time.perf_counter() - t_rank}


def _same_s(x, labels, pairs):
  from eval import benchmarks
  null, full = benchmarks.null_from_tiles(benchmarks.SimilarityTiles(x))
  index = {g: k for k, g in enumerate(labels)}
  out = {}
  for src, p in pairs.items():
    i, j = benchmarks.filter_pairs(p, index)
    out[src] = {"pairs": int(len(i)), **benchmarks.percentile_recall(null, full[i, j],
                                                                     THRESHOLDS)}
  return out, {}


def child(kind, data_dir):
  from mae_jax.data import resources
  x = np.load(os.path.join(data_dir, "x.npy"))
  with open(os.path.join(data_dir, "labels.json")) as f:
    labels = json.load(f)
  pairs = {s: resources.load_relationships(s) for s in resources.SOURCES}
  run = {"ours": _ours, "reference": _reference, "same_s": _same_s}[kind]
  t0 = time.perf_counter()
  recall, extra = run(x, labels, pairs)
  seconds = time.perf_counter() - t0
  print(json.dumps({"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "recall": recall,
                    **extra}))


def _peak_rss_mib():
  """VmHWM of this process: unlike ru_maxrss it is not floored by the parent's RSS at fork."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(kind, data_dir):
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={kind}",
                         f"--data={data_dir}"], capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"{kind} run failed: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = cli.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--perturbations", type=int, default=17000)
  ap.add_argument("--dims", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--same_s", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--child", choices=["ours", "reference", "same_s"], help=argparse.SUPPRESS)
  ap.add_argument("--data", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.perturbations < 2 or args.dims < 1 or args.repeats < 1:
    ap.error("--perturbations must be >= 2, --dims and --repeats >= 1")
  if args.child:
    return child(args.child, args.data)
  from bench import common
  yard = {"xla_matmul_gflops": round(common.matmul_peak_gflops(), 1),
          "numpy_matmul_gflops": round(common.numpy_matmul_gflops(), 1),
          "device": common.device_description()}
  x, labels = make_map(args.perturbations, args.dims)
  best = {}
  with tempfile.TemporaryDirectory() as tmp:
    np.save(os.path.join(tmp, "x.npy"), x)
    with open(os.path.join(tmp, "labels.json"), "w") as f:
      json.dump(labels, f)
    del x
    for rep in range(args.repeats):  # interleaved, so both sides see similar machine load
      load = os.getloadavg()[0]
      runs = {k: _spawn(k, tmp) for k in ["ours", "reference"] + ["same_s"] * args.same_s}
      common.emit(repeat=rep, **_line(args, runs, load), **yard)
      for k, r in runs.items():
        if k not in best or r["seconds"] < best[k]["seconds"]:
          best[k] = r
  common.emit(summary=True, **_line(args, best, os.getloadavg()[0]), **yard)


def _line(args, runs, load):
  ours, ref = runs["ours"], runs["reference"]
  line = {"bench": "recall", "perturbations": args.perturbations, "dims": args.dims,
          "pairs": sum(r["pairs"] for r in ours["recall"].values()),
          "seconds": round(ours["seconds"], 3), "reference_seconds": round(ref["seconds"], 3),
          "speedup": round(ref["seconds"] / ours["seconds"], 2),
          "identical": ours["recall"] == ref["recall"],
          "peak_rss_mib": round(ours["peak_rss_mib"], 1),
          "reference_peak_rss_mib": round(ref["peak_rss_mib"], 1),
          "reference_sort_and_search_seconds": round(ref["sort_and_search_seconds"], 3),
          "fallback_ranks": ours["fallback_ranks"],
          "gemm_gflop": round(ours["gemm_flops"] / 1e9, 1),
          "reference_gemm_gflop": round(2.0 * args.perturbations ** 2 * args.dims / 1e9, 1)}
  if "same_s" in runs:
    line.update(same_s_seconds=round(runs["same_s"]["seconds"], 3),
                identical_same_s=ours["recall"] == runs["same_s"]["recall"])
  line.update(recall=ours["recall"], load_average=round(load, 2), cpus=os.cpu_count())
  return line


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
