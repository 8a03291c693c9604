r"""Pre-trains an MAE: `python -m mae_jax.main --config=configs/NAME.py --workdir=DIR`.

Rerunning the same command resumes from the newest checkpoint in DIR, on any mesh:

  python -m mae_jax.main --config=configs/vits16.py --workdir=/tmp/run \
      --config.batch_size=256 --config.mesh.fsdp=4
  python -m mae_jax.main --config=configs/vitg8.py --workdir=/tmp/g8 --config.dry_run=True

Multi-process: on TPU pods and under SLURM `jax.distributed.initialize()` finds its peers by
itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
The last line on stdout is one JSON object: {"step", "loss", "status", ...}.
"""
import logging
import sys

from absl import flags
from ml_collections import config_flags

from mae_jax.train import distributed
from mae_jax.util import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) of the run.")
distributed.define_flags()
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Stop after this step with a checkpoint and "
                                "status 'preempted' (a time-boxed job); rerun to continue.")
_DRY_RUN_COMPILE = flags.DEFINE_bool("dry_run_compile", False, "With --config.dry_run=True, "
                                     "also compile the step and report XLA's memory analysis.")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise cli.UserError("--config is required, e.g. --config=configs/tiny.py")
  if not config.dry_run and not _WORKDIR.value:
    raise cli.UserError("--workdir is required")
  distributed.initialize()
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
  cli.print_result(result)
  if result["status"] == "nan":
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, keep_freed_memory=True)
