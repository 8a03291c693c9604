"""Keep freed host memory in the process, so XLA:CPU's big buffers do not page-fault every step.

XLA:CPU mallocs a step's temporaries and outputs (GBs for a ViT-S/16 MAE step at batch 16: the
scanned blocks' saved activations alone are ~1 GB) and frees them when the step ends. glibc serves
every block above its mmap threshold (at most 32 MiB) with a fresh mmap() and unmaps it on free,
so each step touches its buffers' pages for the first time again: measured 0.63 M minor page
faults (2.5 GB) per train step, which the kernel zero-fills one 4 KiB page at a time. With the
three settings below the same step faults 0 pages and takes 8.46 s instead of 9.66 s (the step
of bench/train_step.py, best of 3, 2 cores), at the same peak RSS (3.2 GB): freed blocks go back
to one heap and are reused by the next step.

  M_MMAP_MAX = 0            big blocks come from the heap, not from mmap()
  M_TRIM_THRESHOLD = 2 GiB  the heap keeps up to 2 GiB of freed top memory instead of returning it
  M_ARENA_MAX = 1           one heap: XLA's worker threads would otherwise get per-thread arenas
                            of at most 64 MiB, whose big requests fall back to mmap() again

They apply to threads created afterwards, so commands whose time goes into jitted steps (training
mae_jax.main, eval.embed and the step benchmarks) set them before jax starts its backend
(mae_jax.util.cli.run(..., keep_freed_memory=True)). The price: one arena serialises the
compiler threads' small mallocs, so compiling costs more (the tiny + ViT-S/16 train steps: 16.0
-> 19.3 s, mean of 5 runs each, 2 cores), which a ViT-S/16 step's ~1 s saving repays after a
few steps; compile-bound commands (mae_jax.compile, the demo and the study with their many short
runs, the test suite) keep glibc's defaults. PyTorch's CPU tensors come from the same glibc
malloc, so bench/peers.py times the PyTorch peers under the same settings.

Only glibc has mallopt; elsewhere (macOS, musl), when the user chose an allocator (LD_PRELOAD of
jemalloc / tcmalloc, glibc.malloc tunables in GLIBC_TUNABLES) or set MAE_JAX_MALLOC=system,
nothing changes.
"""
import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))


def user_chose_allocator(environ=os.environ) -> bool:
  return ("malloc" in environ.get("LD_PRELOAD", "")
          or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")
          or environ.get("MAE_JAX_MALLOC") == "system")


def keep_freed_memory() -> bool:
  """Applies SETTINGS to this process's glibc malloc; True if it did."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
    return False
  libc = ctypes.CDLL(None)  # the C library this process already uses
  return all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
