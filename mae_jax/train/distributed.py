"""Joining a multi-process JAX job: the flags and the `jax.distributed.initialize` call that
`mae_jax.main` and `eval.embed` share (launch/README.md shows the SLURM and TPU-pod setups).

On TPU pods and under SLURM `jax.distributed.initialize()` finds its peers by itself; elsewhere
pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""
import os

from absl import flags

from mae_jax.util import cli


def define_flags():
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0 for an explicit multi-process run.")
  flags.DEFINE_integer("num_processes", None, "Processes of the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_enum(
      "distributed", "auto", ["auto", "true", "false"],
      "jax.distributed.initialize() with cluster auto-detection: 'auto' does it under SLURM with "
      "several tasks or on a multi-host TPU slice (detected from the environment).")


def initialize(f=flags.FLAGS):
  """jax.distributed.initialize when asked to or when a cluster is detected (never at import)."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = [f.coordinator_address, f.num_processes, f.process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise cli.UserError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                               initialization_timeout=120)
  elif f.distributed == "true" or (f.distributed == "auto" and cluster_detected()):
    jax.distributed.initialize()  # SLURM / TPU pod / GKE: JAX finds its peers itself


def cluster_detected() -> bool:
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
  tpu_hosts = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  return slurm or tpu_hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env
