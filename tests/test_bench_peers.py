"""bench/peers.py (the PyTorch peers, torch optional), bench/gpu_suite.sh and the MFU peak table."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _json_lines(text):
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_gpu_suite_dry_run_prints_the_plan_and_smokes_on_cpu(tmp_path):
  env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  res = subprocess.run(["bash", str(SUITE)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  plan = [l for l in res.stdout.splitlines() if l.startswith("DRY-RUN: ")]
  for module in ("bench.common", "bench.train_step", "bench.embed", "mae_jax.demo"):
    assert sum(module in l for l in plan) == 1, plan
  assert any("vitl8:bfloat16:" in l and "--steps=5" in l for l in plan), plan
  rows = _json_lines(res.stdout)
  train = [r for r in rows if r.get("model") == "tiny" and "images_per_s" in r]
  assert len(train) == 1 and train[0]["images_per_s"] > 0
  assert train[0]["device_kind"] == "cpu" and train[0]["mfu"] is None
  assert train[0]["device_peak_tflops"] is None
  assert any(r.get("model") == "tiny" and r.get("crops_per_s", 0) > 0 for r in rows)
  saved = _json_lines((tmp_path / "gpu_suite.jsonl").read_text())
  steps = {r["suite_step"]: r["rc"] for r in saved if "suite_step" in r}
  assert steps == {"smoke_common": 0, "smoke_train_step": 0, "smoke_embed": 0,
                   "smoke_demo_flags": 0}, steps


def test_gpu_suite_is_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  res = subprocess.run(["shellcheck", "--shell=bash", str(SUITE)], capture_output=True,
                       text=True, timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr


def test_peers_without_torch_prints_one_skip_line():
  if importlib.util.find_spec("torch") is None:
    command = [sys.executable, "-m", "bench.peers"]
  else:  # hide the installed torch: find_spec sees None in sys.modules as "not installed"
    command = [sys.executable, "-c", "import runpy, sys; sys.modules['torch'] = None; "
               "runpy.run_module('bench.peers', run_name='__main__', alter_sys=True)"]
  res = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  assert [json.loads(l) for l in res.stdout.splitlines()] == [{
      "skipped": "torch is not installed: pip install torch timm (CPU wheels) to time the "
                 "PyTorch peers"}]


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 PCIe", 756), ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362), ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5p", 459),
    ("TPU v6 lite", 918)])
def test_device_peak_tflops_of_known_chips(kind, tflops):
  assert common.device_peak_tflops(kind) == tflops


@pytest.mark.parametrize("kind", ["cpu", "", None, "NVIDIA GeForce GTX 1080"])
def test_device_peak_tflops_is_none_for_cpus_and_unknown_chips(kind):
  assert common.device_peak_tflops(kind) is None


def test_peer_profile_classes_torch_ops():
  """The op classes of --profile (the peer models themselves need torch, which the repo does not
  install: they were run by hand, bench/peers.py)."""
  sys.path.insert(0, str(ROOT))
  try:
    from bench import peers  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(ROOT))
  assert peers.op_class("aten::addmm") == "matmul"
  assert peers.op_class("aten::_fused_adamw_") == "optimizer"
  assert peers.op_class("aten::_fft_r2c") == "fft"
  assert peers.op_class("aten::native_layer_norm_backward") == "layernorm"
  assert peers.op_class("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
  assert peers.op_class("aten::gather") == "gather/index"
