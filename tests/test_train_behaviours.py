"""`python -m mae_jax.main` behaviours beyond tests/test_train.py: a real SIGTERM followed by a
rerun equals the uninterrupted run, a resume on fewer devices or another process count with the
grain source, a NaN stop through the command, and grain workers with a corrupt record skipped.

The runs use test_train.py's flags and compilation cache, so most of them compile nothing new.
"""
import json
import math
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.data import input_pipeline
from mae_jax.util import cli
from test_train import REPO, TINY, losses, main_env, result_of, run_main
from test_train import manifest  # noqa: F401  (the fixture: 24 sites in 2 shards)

STEPS = 8  # every run stops here (--stop_at): the schedule stays that of total_steps=200


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, manifest):
  """Losses of an uninterrupted run to STEPS on 8 devices."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = run_main([*TINY, f"--config.data.manifest={manifest}", f"--workdir={workdir}",
                   f"--stop_at={STEPS}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  return losses(workdir)


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory, cache_dir, manifest):
  """The same command without --stop_at, stopped by a real SIGTERM once step 2 is logged.

  Returns (workdir, step it stopped at); tests copy the workdir before they rerun in it.
  """
  workdir = tmp_path_factory.mktemp("sigterm")
  err = workdir.parent / f"{workdir.name}.stderr"
  with open(err, "w") as stderr:  # a file: a pipe nobody reads could fill up and block the run
    proc = subprocess.Popen([sys.executable, "-m", "mae_jax.main", *TINY,
                             f"--config.data.manifest={manifest}", f"--workdir={workdir}"],
                            cwd=REPO, env=main_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    lines = []
    try:
      for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
          proc.send_signal(signal.SIGTERM)
          break
      lines += proc.communicate(timeout=120)[0].splitlines()
    finally:
      proc.kill()
  assert proc.returncode == 0, err.read_text()[-3000:]
  result = json.loads(lines[-1])
  assert result["status"] == "preempted", result
  stopped = result["step"]
  # The signal lands within a step or two; STEPS leaves room for a slow machine.
  assert 2 <= stopped < STEPS, stopped
  assert sorted(losses(workdir)) == list(range(1, stopped + 1))
  assert (workdir / "checkpoints" / str(stopped) / "data" / "process_0-of-1.json").is_file()
  return workdir, stopped


def _copy(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run"


def test_sigterm_then_rerun_equals_the_uninterrupted_run(sigtermed, reference, tmp_path,
                                                        cache_dir, manifest):
  """Same mesh, grain iterator restored from the SIGTERM checkpoint: equal bit for bit."""
  workdir, stopped = sigtermed
  workdir = _copy(workdir, tmp_path)
  proc = run_main([*TINY, f"--config.data.manifest={manifest}", f"--workdir={workdir}",
                   f"--stop_at={STEPS}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"restored step {stopped} from" in proc.stdout
  assert result_of(proc)["loss"] == reference[STEPS]
  assert losses(workdir) == reference


def test_resume_on_fewer_devices_continues_the_data(sigtermed, reference, tmp_path, cache_dir,
                                                    manifest):
  """8 -> 4 devices, one process: grain's state file (one per process) still fits, so the run
  continues with the very batches of the reference. The gradient all-reduce over 4 shards
  instead of 8 reorders float sums: the losses agree to float32 rounding, not bit for bit."""
  workdir, stopped = sigtermed
  workdir = _copy(workdir, tmp_path)
  proc = subprocess.run([sys.executable, "-m", "mae_jax.main", *TINY,
                         f"--config.data.manifest={manifest}", f"--workdir={workdir}",
                         f"--stop_at={STEPS}"], cwd=REPO, env=main_env(cache_dir, devices=4),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 4 cpu devices" in proc.stdout and f"restored step {stopped} from" in proc.stdout
  assert json.loads((workdir / "config.json").read_text())["mesh"]["data"] == 4
  got = losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert all(got[s] == reference[s] for s in range(1, stopped + 1))  # the first run's records
  resumed = range(stopped + 1, STEPS + 1)
  np.testing.assert_allclose([got[s] for s in resumed], [reference[s] for s in resumed],
                             rtol=1e-6, atol=0)


def test_resume_with_another_process_count_is_a_one_line_refusal(sigtermed, tmp_path,
                                                                 cache_dir, manifest):
  """grain keeps one iterator file per process (process_<i>-of-<n>.json). The checkpoint is
  renamed to what a 2-process run writes (tests/test_multiprocess.py checks those names), and
  this 1-process resume must refuse in one line, leaving the workdir as it was."""
  workdir, stopped = sigtermed
  workdir = _copy(workdir, tmp_path)
  data = workdir / "checkpoints" / str(stopped) / "data"
  shutil.copy(data / "process_0-of-1.json", data / "process_1-of-2.json")
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  before = (workdir / "metrics.jsonl").read_text()
  proc = run_main([*TINY, f"--config.data.manifest={manifest}", f"--workdir={workdir}",
                   f"--stop_at={STEPS}"], cache_dir)
  assert proc.returncode == cli.USAGE and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("mae_jax.main: error: ") and "process_0-of-2.json" in last, last
  assert "2 processes" in last and "this run has 1" in last, last
  assert (workdir / "metrics.jsonl").read_text() == before
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(stopped)]


def test_nan_loss_through_the_command(tmp_path, cache_dir):
  """AdamW at lr 1e30 moves every parameter by ~1e28 in step 1: step 2's loss overflows."""
  proc = run_main([*TINY, "--config.optimizer.lr=1e30", "--config.checkpoint_every=1",
                   f"--workdir={tmp_path}"], cache_dir)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  result = result_of(proc)
  assert result["status"] == "nan" and not math.isfinite(result["loss"]), result
  nan_step = result["step"]
  assert 2 <= nan_step <= 5, result
  assert f"non-finite loss {result['loss']} at step {nan_step}" in proc.stderr
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == result["last_checkpoint"] == nan_step - 1, (steps, result)
  assert all((tmp_path / "checkpoints" / str(s) / "state").is_dir() for s in steps)
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").open()]
  assert [r["step"] for r in logged] == list(range(1, nan_step))
  assert all(math.isfinite(r["loss"]) for r in logged)


def _flip_pixel(shard, record):
  """Flips one pixel bit of `record`: the record still parses, only its CRC tells."""
  offset, length = np.load(f"{shard}.idx")[record]
  with open(shard, "r+b") as f:
    f.seek(int(offset + length) - 100)  # inside the image bytes, which end the payload
    byte = f.read(1)[0]
    f.seek(int(offset + length) - 100)
    f.write(bytes([byte ^ 1]))


def test_grain_worker_skips_a_corrupt_record_and_metrics_count_it(tmp_path, cache_dir,
                                                                   manifest):
  data = tmp_path / "data"
  shutil.copytree(manifest.parent, data)
  _flip_pixel(data / "shard-0.tfrecord", 5)
  flags = [*TINY, f"--config.data.manifest={data / 'manifest.json'}",
           "--config.data.num_workers=1", "--config.data.skip_corrupt=True"]
  proc = run_main([*flags, f"--workdir={tmp_path / 'run'}", f"--stop_at={STEPS}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(1 grain workers)" in proc.stdout
  result = result_of(proc)
  assert result["step"] == STEPS and math.isfinite(result["loss"])
  # One worker yields the in-process stream, so the counts are known batch by batch.
  it = input_pipeline.train_iterator(data / "manifest.json", global_batch_size=16,
                                     crop_size=32, skip_corrupt=True)
  expected = np.cumsum([int(next(it)["num_skipped"]) for _ in range(STEPS)])
  assert expected[-1] >= 2  # 128 crops of 24 records: the bad one comes up in most epochs
  logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
  assert [r.get("skipped_records", 0) for r in logged] == expected.tolist()

  # Without skip_corrupt the same record stops the run in one line naming shard and offset.
  proc = run_main([*flags[:-1], f"--workdir={tmp_path / 'strict'}", f"--stop_at={STEPS}"],
                  cache_dir)
  assert proc.returncode == cli.USAGE and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # (grain's resource tracker may warn about shared memory after it, hence no "last line")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("mae_jax.main: error: ")]
  assert len(errors) == 1 and "shard-0.tfrecord: byte offset" in errors[0], proc.stderr[-3000:]
  assert "payload crc mismatch" in errors[0]
