"""Shared helpers for bench/*.py: JSON-line output and the in-process yardstick.

Every benchmark divides its own rate by `matmul_peak_gflops()` measured in the
same process, so numbers from different machines (a 2-core laptop, an H100, a
TPU host) are comparable as a fraction of what that machine can do.

Thread pinning has to happen before numpy or jax is imported, because OpenBLAS
sizes its pool when it is loaded and XLA sizes its CPU pools when the backend
is created. So a benchmark script starts with

  from bench import common
  common.configure_threads(2)   # before `import jax` / `import numpy`
  import jax

and is run from the repository root as `python -m bench.NAME`. This module
imports numpy and jax only inside functions for the same reason.
"""
import json
import os
import resource
import sys
import time

from mae_jax.util import cli

# What jax 0.10.2's XLA:CPU honours (checked on the 2-core dev box):
# - PJRT_NPROC (then NPROC) sizes the CPU client's intra-op and dispatch pools
#   (xla/pjrt DefaultThreadPoolSize); PJRT_NPROC=1 halved the 2048^2 matmul rate.
# - `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1` in
#   XLA_FLAGS is accepted but changed nothing measurable in 0.10.2; it is still
#   set for n == 1 because older jaxlibs (the classic runtime) obey it.
_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_SINGLE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false",
                            "intra_op_parallelism_threads=1")


def emit(**kv):
  """Prints one JSON object on one line and flushes (numpy scalars allowed)."""
  print(json.dumps(kv, default=_jsonable), flush=True)


def _jsonable(x):
  if hasattr(x, "tolist"):  # numpy / jax scalars and arrays
    return x.tolist()
  return str(x)


def configure_threads(n):
  """Pins XLA:CPU and the BLAS/OpenMP pools to `n` threads via env variables.

  Must run before numpy or jax is imported (their pools read the environment
  once); raises RuntimeError otherwise rather than silently measuring with the
  default thread count.

  Args:
    n: number of threads, >= 1.

  Returns:
    dict of the environment variables that were set.
  """
  env = thread_env(n)
  loaded = [m for m in ("jax", "numpy") if m in sys.modules]
  if loaded:
    raise RuntimeError(
        f"configure_threads({n}) must be called before importing "
        f"{' and '.join(loaded)}: thread pools are sized when they load")
  os.environ.update(env)
  return env


def thread_env(n) -> dict:
  """The environment variables that pin a (child) process's XLA:CPU and BLAS pools to `n`."""
  n = int(n)
  if n < 1:
    raise ValueError(f"configure_threads: n must be >= 1, got {n}")
  env = {"PJRT_NPROC": str(n)}
  env.update({var: str(n) for var in _BLAS_VARS})
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.lstrip("-").startswith(("xla_cpu_multi_thread_eigen",
                                            "intra_op_parallelism_threads"))]
  if n == 1:
    flags += _SINGLE_THREAD_XLA_FLAGS
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def matmul_peak_gflops(dtype="float32", n=2048, repeats=5):
  """Best-of-`repeats` GFLOP/s of a jitted n x n @ n x n matmul on device 0.

  The first call (compile + one run) is warm-up and not timed. 2 n^3 FLOPs
  per product. On a GPU/TPU a 2048^2 product lasts tens of microseconds, so
  dispatch overhead shows; pass n=8192 there for a rate closer to the chip's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, (n, n), jnp.float32).astype(dtype),
                     device)
  b = jax.device_put(jax.random.normal(k2, (n, n), jnp.float32).astype(dtype),
                     device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = _best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2.0 * n**3 / best / 1e9


def numpy_matmul_gflops(n=2048, repeats=5, dtype="float32"):
  """Best-of-`repeats` GFLOP/s of numpy's (OpenBLAS) n x n matmul."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n)).astype(dtype)
  b = rng.standard_normal((n, n)).astype(dtype)
  a @ b  # pylint: disable=pointless-statement
  best = _best_seconds(lambda: a @ b, repeats)
  return 2.0 * n**3 / best / 1e9


def _best_seconds(fn, repeats):
  best = float("inf")
  for _ in range(max(1, int(repeats))):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def peak_rss_mib():
  """Peak resident set size of this process so far, in MiB."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return rss / (2**20 if sys.platform == "darwin" else 2**10)


def device_description():
  """`platform:device_kind x count`, e.g. 'gpu:NVIDIA H100 80GB HBM3 x1'."""
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()
  return f"{d[0].platform}:{d[0].device_kind} x{len(d)}"


# Dense bfloat16 peak TFLOP/s per chip from the vendors' public spec sheets (NVIDIA's give the 2:4
# sparse figure, twice the dense one), for the MFU of an accelerator run. Keys are
# matched as case-insensitive substrings of jax's device_kind, the longest match winning, so
# "TPU v5 lite" (v5e) is not read as "TPU v5" (v5p) and "NVIDIA H100 PCIe" not as "NVIDIA H100".
DEVICE_PEAK_TFLOPS = {
    "NVIDIA B200": 2250,
    "NVIDIA H200": 989,
    "NVIDIA H200 NVL": 835,
    "NVIDIA GH200": 989,
    "NVIDIA H100": 989,
    "NVIDIA H100 80GB HBM3": 989,
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA A100": 312,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-SXM4-40GB": 312,
    "NVIDIA L40S": 362,
    "NVIDIA L4": 121,
    "TPU v2": 45,
    "TPU v3": 123,
    "TPU v4": 275,
    "TPU v4 lite": 138,  # v4i
    "TPU v5": 459,  # v5p reports "TPU v5" or "TPU v5p"
    "TPU v5p": 459,
    "TPU v5 lite": 197,  # v5e
    "TPU v6 lite": 918,  # v6e (Trillium)
}


def device_peak_tflops(device_kind):
  """Dense bf16 peak TFLOP/s of one chip of `device_kind` (jax's Device.device_kind), or None
  when it is not in DEVICE_PEAK_TFLOPS (a CPU, an unlisted chip)."""
  kind = str(device_kind or "").lower()
  hits = [key for key in DEVICE_PEAK_TFLOPS if key.lower() in kind]
  # "NVIDIA L4" would also match "NVIDIA L40S": the longest key wins, and it must end where a
  # word of the kind ends (no digit or letter right after it).
  hits = [key for key in hits if not kind[kind.index(key.lower()) + len(key):][:1].isalnum()]
  return float(DEVICE_PEAK_TFLOPS[max(hits, key=len)]) if hits else None


def main(argv=None):
  """`python -m bench.common [--threads=N] [--n=2048]`: this machine's yardsticks."""
  parser = cli.ArgumentParser(description=main.__doc__)
  parser.add_argument("--threads", type=int, default=0,
                      help="pin XLA:CPU and BLAS to N threads (0: leave as is)")
  parser.add_argument("--n", type=int, default=2048, help="matrix size")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  if args.threads < 0 or args.n < 1 or args.repeats < 1:
    parser.error("--threads must be >= 0, --n and --repeats >= 1")
  if args.threads:
    configure_threads(args.threads)
  for dtype in ("float32", "bfloat16"):
    emit(bench="matmul_peak", dtype=dtype, n=args.n,
         gflops_per_s=round(matmul_peak_gflops(dtype, args.n, args.repeats), 4),
         device=device_description())
  emit(bench="numpy_matmul", dtype="float32", n=args.n,
       gflops_per_s=round(numpy_matmul_gflops(args.n, args.repeats), 4),
       peak_rss_mib=round(peak_rss_mib(), 1))


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
