"""mae_jax.compile: topology names, the AOT command on fake CPU devices (and libtpu if present),
and the README block it writes."""
import json
import os
import subprocess
import sys

import pytest

from mae_jax import compile as aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT_KEYS = ("config", "topology", "devices", "mesh", "global_batch", "per_device_bytes",
                 "step_flops")


def run_compile(*args, backend="cpu"):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # Speeds up XLA:CPU compiles (the flax examples' test setting); the sizes and FLOP
             # counts the test checks do not depend on LLVM optimisation.
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return subprocess.run([sys.executable, "-m", "mae_jax.compile", f"--backend={backend}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.mark.parametrize("name,grid,chips,libtpu_name", [
    ("v5p-8", (2, 2, 1), 4, "v5p:2x2x1"),
    ("v5p-128", (4, 4, 4), 64, "v5p:4x4x4"),  # 128 TensorCores = 64 chips
    ("v5p-256", (4, 4, 8), 128, "v5p:4x4x8"),
    ("v5p-512", (4, 8, 8), 256, "v5p:4x8x8"),
    ("v4-64", (2, 4, 4), 32, "v4:2x4x4"),
    ("v4-2048", (8, 8, 16), 1024, "v4:8x8x16"),
    ("v5e-1", (1, 1), 1, "v5e:1x1"),
    ("v5e-8", (2, 4), 8, "v5e:2x4"),
    ("v5litepod-128", (8, 16), 128, "v5e:8x16"),
    ("v6e-256", (16, 16), 256, "v6e:16x16"),
    ("v5p:4x4x12", (4, 4, 12), 192, "v5p:4x4x12"),
])
def test_topology_names_follow_cloud_tpu(name, grid, chips, libtpu_name):
  t = aot.parse_topology(name)
  assert (t.shape, t.chips, t.topology_name) == (grid, chips, libtpu_name)


def test_topology_libtpu_arguments():
  assert aot.parse_topology("v5p-128").libtpu_kwargs() == dict(
      chip_config_name="megacore", wrap=(True, True, True), chips_per_host_bounds=(2, 2, 1))
  assert aot.parse_topology("v4-64").libtpu_kwargs()["wrap"] == (False,) * 3  # 2x4x4: no torus
  assert aot.parse_topology("v5e-128").libtpu_kwargs()["wrap"] == (False, True, False)
  assert aot.parse_topology("v6e-1").libtpu_kwargs()["chips_per_host_bounds"] == (1, 1, 1)
  assert aot.parse_topology("v6e-256").hbm_bytes == 32 * 2 ** 30


@pytest.mark.parametrize("name,says", [
    ("v3-8", "examples: v5p-128"), ("gpu", "unknown TPU topology"),
    ("v5p-12", "counts TensorCores"), ("v5p-4", "power of two >= 8"),
    ("v5e-3", "counts chips"), ("v5p:4x4", "3 axes"),
])
def test_bad_topology_names(name, says):
  with pytest.raises(aot.TopologyError, match=says):
    aot.parse_topology(name)


def test_hbm_overflow_messages():
  # The wordings of libtpu 0.0.42 (tiny at batch 2**20 on v5e-1) and of older releases.
  new = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (324.19G) exceeds available HBM (15.75G).")
  old = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
         "hbm. Used 63.80G of 30.75G hbm. Exceeded hbm capacity by 33.05G.\n\n"
         "Total hbm usage >= 65.05G:\n    reserved          1.25G\n    program          63.80G")
  assert aot._hbm_overflow(new) == int(324.19 * 2 ** 30)
  assert aot._hbm_overflow(old) == int(65.05 * 2 ** 30)
  assert aot._hbm_overflow(old.split("\n")[0]) == int(63.80 * 2 ** 30)
  assert aot._hbm_overflow("INTERNAL: something else") is None


@pytest.fixture(scope="module")
def tiny_cpu():
  proc = run_compile("--config=configs/tiny.py", "--topology=v5e-8", "--config.mesh.data=2",
                     "--config.mesh.fsdp=-1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def test_command_on_fake_cpu_devices(tiny_cpu):
  r = json.loads(tiny_cpu.stdout.strip().splitlines()[-1])
  assert set(CONTRACT_KEYS) <= set(r)
  assert (r["config"], r["topology"], r["topology_name"]) == ("tiny", "v5e-8", "v5e:2x4")
  assert r["backend"] == "cpu-fake-devices" and r["devices"] == 8
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert (r["global_batch"], r["per_device_batch"]) == (16, 2)
  # Memory: the donated state is counted once and is part of the arguments.
  assert r["per_device_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                   + r["temp_bytes"])
  assert 0 < r["alias_bytes"] <= r["state_bytes_per_device"] <= r["argument_bytes"]
  assert r["per_device_bytes"] < 64 * 2 ** 20 and r["fits"] is None  # no HBM verdict on XLA:CPU
  # XLA also counts LayerNorms, softmax, the FFT loss and the optimiser: same order of magnitude.
  assert r["step_flops"] == pytest.approx(r["step_flops_per_device"] * 8)
  assert 0.5 < r["step_flops"] / r["analytical_step_flops"] < 5
  assert r["compile_s"] > 0 and r["libtpu"] is None
  assert "memory and FLOPs reflect XLA:CPU" in tiny_cpu.stderr
  assert "mesh data 2 x fsdp 4 x tensor 1" in tiny_cpu.stdout


def test_readme_block_from_command_output(tiny_cpu, tmp_path):
  row = json.loads(tiny_cpu.stdout.strip().splitlines()[-1])
  row["command"] = "python -m mae_jax.compile --config=configs/tiny.py --topology=v5e-8"
  block = aot.scaling_block([row])
  assert "| `tiny` | v5e-8 (8) | 2 x 4 x 1 | 16 (2) | float32 | " in block
  assert "| ? (XLA:CPU) |" in block
  assert "XLA:CPU on fake devices" in block and row["command"] in block

  readme = tmp_path / "README.md"
  readme.write_text("# mae_jax\n\n## Scaling up\n\n<!-- scaling:begin (regenerate) -->\nold\n"
                    "<!-- scaling:end -->\n\n## After\nkept\n")
  aot.write_readme(readme, block)
  aot.write_readme(readme, block)  # idempotent
  text = readme.read_text()
  assert "\nold\n" not in text and text.count(block) == 1 and text.endswith("## After\nkept\n")
  assert "<!-- scaling:begin (regenerate) -->\n" in text

  bare = tmp_path / "BARE.md"
  bare.write_text("# mae_jax\n")
  aot.write_readme(bare, block)
  assert bare.read_text() == (f"# mae_jax\n\n## Scaling up\n\n<!-- scaling:begin -->\n{block}\n"
                              "<!-- scaling:end -->\n")
  assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("args,says", [
    (("--config=configs/tiny.py", "--topology=v3-8"), "unknown TPU topology"),
    (("--config=configs/tiny.py", "--topology=v5e-8", "--config.mesh.data=3"), "mesh:"),
    (("--config=configs/tiny.py", "--topology=v5e-8", "--config.batch_size=12"),
     "batch_size 12 must be divisible by 8"),
    (("--topology=v5e-8",), "--config and --topology are required"),
    (("--config=configs/nope.py", "--topology=v5e-8"), "configs/nope.py"),
    (("--config=configs/tiny.py", "--topology=v5e-8", "--config.mesh.dta=1"),
     "unknown config key 'dta'"),
])
def test_user_mistakes_give_one_line(args, says):
  proc = run_compile(*args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mae_jax.compile: error: "), proc.stderr
  assert says in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.skipif(aot.libtpu_version() is None, reason="libtpu (pip install 'mae_jax[aot]') "
                    "is not installed")
def test_command_with_libtpu():
  proc = run_compile("--config=configs/tiny.py", "--topology=v5p-8", backend="tpu")
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["backend"] == "tpu" and r["device_kind"].startswith("TPU v5") and r["devices"] == 4
  assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["libtpu"]
  assert 0 < r["per_device_bytes"] < r["hbm_bytes"] and r["fits"] is True
  assert 0.5 < r["step_flops"] / r["analytical_step_flops"] < 5


@pytest.mark.skipif(aot.libtpu_version() is None, reason="libtpu (pip install 'mae_jax[aot]') "
                    "is not installed")
def test_libtpu_refusal_is_an_answer():
  proc = run_compile("--config=configs/tiny.py", "--topology=v5e-1", "--config.batch_size=1048576",
                     backend="tpu")
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["fits"] is False and r["per_device_bytes"] > r["hbm_bytes"] and r["step_flops"] is None
  assert "DOES NOT FIT" in proc.stdout and "RESOURCE_EXHAUSTED" in r["error"]
