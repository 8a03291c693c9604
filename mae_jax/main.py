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

from absl import app, flags
from absl import logging as absl_logging
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


class _QuietOrbax(logging.Filter):
  """Orbax logs every save phase at INFO; keep its warnings and errors (and everything at -v 1)."""

  def filter(self, record):
    return (record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
            or absl_logging.get_verbosity() > 0)


def main(argv):
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise cli.UserError("--config is required, e.g. --config=configs/tiny.py")
  if not config.dry_run and not _WORKDIR.value:
    raise cli.UserError("--workdir is required")
  _initialize_distributed()
  from mae_jax.train import ConfigError, checkpointing, loop, sharding  # pylint: disable=g-import-not-at-top
  errors = (ConfigError, sharding.MeshError, checkpointing.CheckpointError)
  logging.info("config file %s", config_flags.get_config_filename(flags.FLAGS["config"]))
  for key, value in config_flags.get_override_values(flags.FLAGS["config"]).items():
    logging.info("override %s = %r", key, value)
  try:
    if config.dry_run:
      result = loop.dry_run(config, compile_step=_DRY_RUN_COMPILE.value)
    else:
      result = loop.train_and_evaluate(config, _WORKDIR.value, stop_at=_STOP_AT.value)
  except errors as e:
    raise cli.UserError(str(e)) from None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    result["process"] = jax.process_index()
  print(json.dumps(result), flush=True)
  if result["status"] == "nan":
    sys.exit(1)


def run():
  """cli.run(main), parsing the flags once: a second parse (inside app.run) re-defines every
  `--config.KEY` override flag and fails with "defined twice" (reported to the lead for cli.py)."""
  app.define_help_flags()
  try:
    argv = flags.FLAGS(sys.argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    cli.fail(cli.one_line(e), 2)

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      cli.fail(cli.one_line(e), 2)
    except (cli.UserError, OSError) as e:  # OSError: also a config file that failed to load
      cli.fail(cli.one_line(e))
    except Exception as e:  # pylint: disable=broad-except
      from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
      if isinstance(e, input_pipeline.InputError):
        cli.fail(cli.one_line(e))
      raise

  app.run(guarded, flags_parser=lambda _: argv)


if __name__ == "__main__":
  run()
