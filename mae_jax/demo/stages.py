"""Bookkeeping of mae_jax.demo's resumable stages: stage timer, atomic JSON and well files,
subprocess stages. Every writer goes through util.files.atomic_open, so an interrupted stage
leaves nothing that a rerun would mistake for finished work."""
import json
import os
import resource
import subprocess
import sys
import time

from mae_jax.util import cli, files


PREFIX = "demo"  # the application whose stages log (mae_jax.experiments sets its own)


def log(msg):
  print(f"{PREFIX}: {msg}", file=sys.stderr, flush=True)


def write_json(path, obj):
  files.write(path, json.dumps(obj, indent=1))


def read_json(path):
  with open(path) as f:
    return json.load(f)


def _cpu_seconds():
  """CPU seconds of this process and its finished children (rendering, conversion workers)."""
  usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
  return sum(u.ru_utime + u.ru_stime for u in usage)


class Timer:
  """Wall and CPU seconds of each stage as first run, kept across reruns, plus the machine load.

  Stages whose output lies in the run's folder (or that have none) are timed in RUN/timings.json,
  the others (screen, shards, baselines: shared by every run in DIR) in DIR/timings.json, so a
  report adds up its own run's stages and the shared ones it used.
  """

  def __init__(self, out, run_dir):
    self.run_dir = os.path.join(os.path.abspath(run_dir), "")
    self.paths = {"shared": os.path.join(out, "timings.json"),
                  "run": os.path.join(run_dir, "timings.json")}
    self.books = {k: read_json(p) if os.path.exists(p) else {"stages": {}}
                  for k, p in self.paths.items()}
    self.start = time.time()

  def stage(self, name, done, fn):
    """Runs fn() unless `done` (a path) exists; returns whether it ran."""
    if done is not None and os.path.exists(done):
      log(f"{name}: reusing {done}")
      return False
    log(f"{name}: running")
    t0, c0 = time.time(), _cpu_seconds()
    fn()
    which = "run" if done is None or os.path.abspath(done).startswith(self.run_dir) else "shared"
    book = self.books[which]
    if done is None and name in book["stages"]:
      return True  # a stage that always runs (and reuses its parts) keeps its first timing
    book["stages"][name] = round(time.time() - t0, 1)
    book.setdefault("stages_cpu", {})[name] = round(_cpu_seconds() - c0, 1)
    book.setdefault("load", {})[name] = round(os.getloadavg()[0], 2)
    write_json(self.paths[which], book)
    log(f"{name}: {time.time() - t0:.0f} s (load average {os.getloadavg()[0]:.1f})")
    return True

  def summary(self):
    """Timings of the stages as first run (a rerun that reuses them reports the same)."""
    merged = lambda key: {k: v for b in self.books.values() for k, v in b.get(key, {}).items()}
    stages, cpu = merged("stages"), merged("stages_cpu")
    load = list(merged("load").values()) or [os.getloadavg()[0]]
    total = sum(stages.values())
    return {"this_invocation_s": round(time.time() - self.start, 1), "stages_s": stages,
            "stages_total_s": round(total, 1), "stages_cpu_s": cpu,
            "cpu_s": round(sum(cpu.values()), 1), "cpus": os.cpu_count(),
            "cpu_share": round(sum(cpu.values()) / max(total, 1e-9) / (os.cpu_count() or 1), 3),
            "load_average": {"min": min(load), "max": max(load),
                             "mean": round(sum(load) / len(load), 2)}}


def use_compile_cache(out):
  """XLA's persistent compilation cache in OUT/.jax_cache, so a rerun (or a resumed run) skips
  the compiles; a cache the caller set (JAX_COMPILATION_CACHE_DIR, as the tests do) is kept."""
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_module(args, what):
  """python -m args..., its stderr streamed through; returns its last stdout line as JSON."""
  cmd = [sys.executable, "-m"] + list(args)
  log(" ".join(cmd[2:]))
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  last_err = ""
  for line in proc.stderr:
    sys.stderr.write(line)
    if line.strip():
      last_err = line.strip()
  stdout = proc.stdout.read()
  if proc.wait():
    raise cli.UserError(f"{what} failed: {last_err}")
  return json.loads(stdout.strip().splitlines()[-1])


def save_wells(path, emb, meta):
  import numpy as np  # pylint: disable=g-import-not-at-top
  with files.atomic_open(path, "wb") as f:
    np.savez(f, emb=np.asarray(emb, np.float32), meta=np.array(meta.to_csv(index=False)))


def load_wells(path):
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  with np.load(path) as z:
    return z["emb"], pd.read_csv(io.StringIO(str(z["meta"])), keep_default_na=False)
