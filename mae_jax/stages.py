"""Bookkeeping of mae_jax.demo's resumable stages: stage timer, atomic JSON and well files,
subprocess stages. Every writer goes through a temporary file and os.replace, so an interrupted
stage leaves nothing that a rerun would mistake for finished work."""
import json
import os
import resource
import subprocess
import sys
import time

from mae_jax import cli


def log(msg):
  print(f"demo: {msg}", file=sys.stderr, flush=True)


def write_json(path, obj):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def _cpu_seconds():
  """CPU seconds of this process and its finished children (rendering, conversion workers)."""
  usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
  return sum(u.ru_utime + u.ru_stime for u in usage)


class Timer:
  """Wall seconds of each stage, kept across reruns in DIR/timings.json, plus the machine load."""

  def __init__(self, out):
    self.path = os.path.join(out, "timings.json")
    self.data = read_json(self.path) if os.path.exists(self.path) else {"stages": {}}
    self.start = time.time()
    self.load = [os.getloadavg()[0]]

  def stage(self, name, done, fn):
    """Runs fn() unless `done` (a path) exists; returns whether it ran."""
    if done is not None and os.path.exists(done):
      log(f"{name}: reusing {done}")
      return False
    log(f"{name}: running")
    t0, c0 = time.time(), _cpu_seconds()
    fn()
    if done is None and name in self.data["stages"]:
      return True  # a stage that always runs (and reuses its parts) keeps its first timing
    self.data["stages"][name] = round(time.time() - t0, 1)
    self.data.setdefault("stages_cpu", {})[name] = round(_cpu_seconds() - c0, 1)
    self.load.append(os.getloadavg()[0])
    write_json(self.path, self.data)
    log(f"{name}: {time.time() - t0:.0f} s (load average {os.getloadavg()[0]:.1f})")
    return True

  def summary(self):
    wall, cpu = time.time() - self.start, _cpu_seconds()
    return {"this_invocation_s": round(wall, 1), "stages_s": self.data["stages"],
            "stages_total_s": round(sum(self.data["stages"].values()), 1),
            "stages_cpu_s": self.data.get("stages_cpu", {}),
            "cpu_s": round(cpu, 1), "cpus": os.cpu_count(),
            "cpu_share": round(cpu / max(wall, 1e-9) / (os.cpu_count() or 1), 3),
            "load_average": {"min": min(self.load), "max": max(self.load),
                             "mean": round(sum(self.load) / len(self.load), 2)}}


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
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, emb=np.asarray(emb, np.float32), meta=np.array(meta.to_csv(index=False)))
  os.replace(tmp, path)


def load_wells(path):
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  with np.load(path) as z:
    return z["emb"], pd.read_csv(io.StringIO(str(z["meta"])), keep_default_na=False)


def plain(v):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  raise TypeError(f"not JSON serialisable: {type(v).__name__}")
