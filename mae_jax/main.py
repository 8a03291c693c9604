r"""Pre-trains an MAE: `python -m mae_jax.main --config=configs/NAME.py --workdir=DIR`.

Rerunning the same command resumes from the newest checkpoint in DIR, on any mesh:

  python -m mae_jax.main --config=configs/vits16.py --workdir=/tmp/run \
      --config.batch_size=256 --config.mesh.fsdp=4
  python -m mae_jax.main --config=configs/vitg8.py --workdir=/tmp/g8 --config.dry_run=True

Multi-process: on TPU pods and under SLURM `jax.distributed.initialize()` finds its peers by
itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
The last line on stdout is one JSON object: {"step", "loss", "status", ...}.
"""
import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from mae_jax.util import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) of the run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 for an explicit multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "true", "false"],
    "jax.distributed.initialize() with cluster auto-detection: 'auto' does it under SLURM with "
    "several tasks or on a multi-host TPU slice (detected from the environment).")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Stop after this step with a checkpoint and "
                                "status 'preempted' (a time-boxed job); rerun to continue.")
_DRY_RUN_COMPILE = flags.DEFINE_bool("dry_run_compile", False, "With --config.dry_run=True, "
                                     "also compile the step and report XLA's memory analysis.")


def _initialize_distributed():
  """jax.distributed.initialize when asked to or when a cluster is detected (never at import)."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise cli.UserError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               initialization_timeout=120)
  elif _DISTRIBUTED.value == "true" or (_DISTRIBUTED.value == "auto" and _cluster_detected()):
    jax.distributed.initialize()  # SLURM / TPU pod / GKE: JAX finds its peers itself


def _cluster_detected() -> bool:
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
  tpu_hosts = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  return slurm or tpu_hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise cli.UserError("--config is required, e.g. --config=configs/tiny.py")
  if not config.dry_run and not _WORKDIR.value:
    raise cli.UserError("--workdir is required")
  _initialize_distributed()
  # pylint: disable-next=g-import-not-at-top
  from mae_jax.train import batches, loop, metrics
  logging.info("config file %s", config_flags.get_config_filename(flags.FLAGS["config"]))
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  for key, value in overrides.items():
    logging.info("override %s = %r", key, value)
  changes = batches.match_manifest(config, given=set(overrides))
  if changes:
    metrics.print_primary(f"from the manifest {config.data.manifest}: {', '.join(changes)} "
                          f"(--config.KEY=VALUE keeps your own)")
  # A user mistake found on the way (ConfigError, MeshError, RecordError, ...) is a
  # cli.UserError: cli.run shows it as one line.
  if config.dry_run:
    result = loop.dry_run(config, compile_step=_DRY_RUN_COMPILE.value)
  else:
    result = loop.train_and_evaluate(config, _WORKDIR.value, stop_at=_STOP_AT.value)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    result["process"] = jax.process_index()
  print(json.dumps(result), flush=True)
  if result["status"] == "nan":
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
