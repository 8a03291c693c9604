"""bench/common.py: JSON lines, the in-process matmul yardstick, thread pinning."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_emit_prints_one_json_line(capsys):
  common.emit(model="vits16", images_per_s=np.float32(12.5), batch=np.int64(8),
              shape=np.zeros((2,), np.int32))
  out = capsys.readouterr().out
  assert out.count("\n") == 1
  assert json.loads(out) == {"model": "vits16", "images_per_s": 12.5, "batch": 8,
                             "shape": [0, 0]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_peak_is_a_positive_rate(dtype):
  gflops = common.matmul_peak_gflops(dtype, n=128, repeats=2)
  assert math.isfinite(gflops) and gflops > 0


def test_numpy_rate_and_peak_rss():
  assert common.numpy_matmul_gflops(n=128, repeats=2) > 0
  assert 10 < common.peak_rss_mib() < 64 * 1024


def test_configure_threads_refuses_after_jax_import():
  assert "jax" in sys.modules  # conftest imported it
  with pytest.raises(RuntimeError, match="before importing jax"):
    common.configure_threads(2)
  with pytest.raises(ValueError):
    common.configure_threads(0)


def test_configure_threads_in_a_fresh_process():
  code = (
      "import os, sys, json; sys.path.insert(0, '.'); from bench import common\n"
      "env = common.configure_threads(1)\n"
      "print(json.dumps({k: os.environ[k] for k in env}))\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=60,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert res.returncode == 0, res.stderr
  env = json.loads(res.stdout)
  assert env["PJRT_NPROC"] == env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"
  flags = env["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=2" in flags
  assert "--xla_cpu_multi_thread_eigen=false" in flags


def test_cli_prints_json_lines_and_rejects_bad_flags():
  res = subprocess.run([sys.executable, "-m", "bench.common", "--threads=1", "--n=64",
                        "--repeats=1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  rows = [json.loads(l) for l in res.stdout.splitlines()]
  assert [r["bench"] for r in rows] == ["matmul_peak", "matmul_peak", "numpy_matmul"]
  assert all(r["gflops_per_s"] > 0 for r in rows)
  bad = subprocess.run([sys.executable, "-m", "bench.common", "--n=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert bad.stderr.startswith("bench.common: error: --threads must be >= 0"), bad.stderr
