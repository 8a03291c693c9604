"""Test setup: 8 fake CPU devices before jax is imported, so sharding is really exercised.

Compiles run with fewer XLA passes (JAX_DISABLE_MOST_OPTIMIZATIONS, inherited by every command a
test starts): the tests check what a program computes, and comparisons run both sides under the
same setting; the suite compiles many small programs, and full compiles made its most
compile-bound modules ~45 % slower (295 s vs 203 s on 2 cores). A test about the optimised program
itself takes the `full_compiles` fixture. For the same reason the training and embedding commands
the tests start keep glibc's malloc (MAE_JAX_MALLOC=system): their single-arena setting
(mae_jax/util/host_memory.py) makes compiles ~20 % slower and only pays back over real steps;
tests/test_host_memory.py checks the setting itself.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("MAE_JAX_MALLOC", "system")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

# Grain 0.2.18 reads absl flags in mp_prefetch outside app.run (grain #1355).
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import pytest  # noqa: E402


CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, jax.devices()
  return jax.devices()


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
  """One persistent-compilation-cache folder for every command a test runs in a subprocess.

  Shared by the xdist workers (the run's base folder holds each worker's own), and exported, so
  every command inherits it: the suite's commands compile the same tiny programs again and again
  (the same train step in tests/test_train.py, test_train_behaviours.py, test_model_kinds.py ...),
  and a module's worker is not known in advance. The tests themselves compile in-process, cold.
  """
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "mae_jax_compile_cache"
  path.mkdir(exist_ok=True)
  with pytest.MonkeyPatch.context() as mp:
    for name, value in zip(CACHE_ENV, (str(path), "0", "0")):
      mp.setenv(name, value)
    yield path


@pytest.fixture
def full_compiles():
  """In-process compiles with every XLA pass (restored afterwards)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
  """Under `-n N`, each test module runs on one worker (xdist's loadscope), so a module fixture
  that runs a whole command (tests/test_experiments.py, tests/test_demo.py) runs once, not once
  per worker."""
  if any(str(a).startswith("--dist") for a in config.invocation_params.args):
    return  # the user chose a distribution mode
  if getattr(config.option, "dist", "no") == "load":  # the controller (-n N sets "load")
    config.option.dist = "loadscope"
