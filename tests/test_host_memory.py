"""mae_jax/util/host_memory.py: step-bound commands keep freed big buffers in the process, so a
step's temporaries (XLA:CPU mallocs and frees GBs per train step, on its own threads) do not
page-fault again every step; MAE_JAX_MALLOC=system and a user's own allocator leave glibc as
it is."""
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

from mae_jax.util import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]

# A step-bound command (cli.run with keep_freed_memory, as mae_jax.main) that allocates, fills
# and frees a 64 MiB buffer on a new thread, like an XLA:CPU worker, and prints the page faults of
# the last of three such "steps".
PROBE = textwrap.dedent("""
    import resource, threading
    import numpy as np
    from mae_jax.util import cli

    def step(out):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      buffer = np.ones(64 << 20, np.uint8)  # every page written, as XLA's outputs are
      del buffer
      out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    def main(argv):
      faults = []
      for _ in range(3):
        worker = threading.Thread(target=step, args=(faults,))
        worker.start()
        worker.join()
      print(faults[-1])

    cli.run(main, [], absl_flags=False, keep_freed_memory=True)
""")


def _faults_per_step(**env):
  environ = {k: v for k, v in os.environ.items() if k != "MAE_JAX_MALLOC"}  # conftest's opt-out
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**environ, **env},
                       capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_commands_reuse_freed_big_buffers_without_page_faults():
  # 64 MiB is at least 32 faults in any page size (4 KiB: 16384; 2 MiB huge pages: 32).
  assert _faults_per_step(MAE_JAX_MALLOC="system") >= 32
  assert _faults_per_step() <= 8


def test_a_chosen_allocator_is_left_alone():
  assert not host_memory.user_chose_allocator({})
  assert not host_memory.user_chose_allocator({"LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": ""})
  assert host_memory.user_chose_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
  assert host_memory.user_chose_allocator({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
  assert host_memory.user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert host_memory.user_chose_allocator({"MAE_JAX_MALLOC": "system"})
