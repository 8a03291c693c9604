"""Two JAX processes (gloo on localhost, 2 CPU devices each) running `python -m mae_jax.main`.

Covers global batch assembly (the losses equal a single-process run's), a checkpoint written by
both processes, resume by rerunning the same command, and SIGTERM to ONE process making both
save the same step and exit 0 (JAX's preemption sync service, started by
jax.distributed.initialize inside main()).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/tiny.py", "--config.total_steps=200", "--config.log_every=1",
        "--config.checkpoint_every=100", "--config.optimizer.warmup_fraction=0.01",
        "--config.optimizer.lr=3e-3"]


def env_for(cache_dir, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """Losses of the same command in ONE process on 8 devices (data=8)."""
  workdir = tmp_path_factory.mktemp("single")
  proc = subprocess.run([sys.executable, "-m", "mae_jax.main", *TINY, f"--workdir={workdir}",
                         "--stop_at=10"], cwd=REPO, env=env_for(cache_dir, 8), timeout=300,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return losses(workdir)


def losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())}


class Pair:
  """Two main processes of one run; stdout/stderr go to files (no pipe can fill up)."""

  def __init__(self, args, workdir, cache_dir, tag):
    port = portpicker.pick_unused_port()
    self.outs = [workdir.parent / f"{workdir.name}.{tag}.{i}.out" for i in range(2)]
    self.procs = []
    for i in range(2):
      with open(self.outs[i], "w") as out, open(f"{self.outs[i]}.err", "w") as err:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "mae_jax.main", *args, f"--workdir={workdir}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"], cwd=REPO, env=env_for(cache_dir, 2), stdout=out, stderr=err))

  def stdout(self, i):
    return self.outs[i].read_text()

  def wait_for(self, text, timeout=240):
    deadline = time.monotonic() + timeout
    while text not in self.stdout(0):
      assert time.monotonic() < deadline and all(p.poll() is None for p in self.procs), (
          self.stdout(0)[-2000:], pathlib.Path(f"{self.outs[0]}.err").read_text()[-2000:])
      time.sleep(0.1)

  def finish(self, timeout=240):
    try:
      codes = [p.wait(timeout=timeout) for p in self.procs]
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
    results = [json.loads(self.stdout(i).strip().splitlines()[-1]) for i in range(2)]
    errors = [pathlib.Path(f"{o}.err").read_text()[-2000:] for o in self.outs]
    assert codes == [0, 0], errors
    assert [r["process"] for r in results] == [0, 1]
    return results


def test_two_processes_checkpoint_resume_and_sigterm(tmp_path, cache_dir, reference):
  workdir = tmp_path / "run"
  # 1. Global batches + one checkpoint written by both processes.
  first = Pair([*TINY, "--stop_at=3"], workdir, cache_dir, "first").finish()
  assert [(r["step"], r["status"]) for r in first] == [(3, "preempted")] * 2
  assert "4 cpu devices (2 processes)" in (tmp_path / "run.first.0.out").read_text()
  data_files = sorted(p.name for p in (workdir / "checkpoints" / "3" / "data").iterdir()
                      if p.suffix == ".json")
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  # data=4 across 2 processes vs data=8 in one: same rows, reductions grouped differently.
  got = losses(workdir)
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                             rtol=1e-6)

  # 2. The same command resumes; SIGTERM to process 1 only -> both save one step, exit 0.
  second = Pair(TINY, workdir, cache_dir, "second")
  second.wait_for("step 5/")
  second.procs[1].send_signal(signal.SIGTERM)
  results = second.finish()
  steps = {r["step"] for r in results}
  assert len(steps) == 1 and all(r["status"] == "preempted" for r in results), results
  stopped = steps.pop()
  assert 5 <= stopped < 200
  assert "restored step 3" in second.stdout(0)
  assert (workdir / "checkpoints" / str(stopped) / "state").is_dir()
  got = losses(workdir)
  assert sorted(got) == list(range(1, stopped + 1))
  compared = [s for s in range(4, min(stopped, 10) + 1)]
  np.testing.assert_allclose([got[s] for s in compared], [reference[s] for s in compared],
                             rtol=1e-6)
