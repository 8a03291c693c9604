"""Training on any mesh, big_vision style: the phases of a run from top to bottom.

    result = train_and_evaluate(config, workdir)   # {"step", "loss", "status", ...}
    result = dry_run(config)                       # sharded abstract state + lowered step

Phases: config and mesh -> data -> sharded abstract state -> restore or init (directly sharded,
under jax.jit) -> one jitted train step over the split NNX state -> loop (metrics, checkpoints,
preemption, NaN guard). The train step (`step.py`) is a pure function of (state, batch, rng);
the loop owns every side effect.
"""
import dataclasses
import functools
import json
import logging
import math
import signal
import time

import jax
from etils import epath

from mae_jax.models import flops, mae
from mae_jax.train import ConfigError, batches, checkpointing, metrics, sharding
from mae_jax.train.step import (batch_shardings, build_state, check_batch, jit_train_step,
                                 lower_train_step, mesh_context)
from mae_jax.util import files


# What the one-cycle learning rate is a function of (optim.one_cycle): a resume that changes one
# of them moves the run to another point of another schedule, so it needs allow_schedule_change.
SCHEDULE_KEYS = ("total_steps", "optimizer.lr", "optimizer.warmup_fraction",
                 "optimizer.div_factor", "optimizer.final_div_factor")


def _key(tree: dict, dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def write_config(config, workdir: epath.Path, resuming: bool, mesh=None, step=None):
  """WORKDIR/config.json (atomic; mesh sizes resolved); a resumed run must keep its model, and
  past step 0 (`step`: the one restored) its learning-rate schedule unless
  `allow_schedule_change` (docs/interfaces.md §2)."""
  path = workdir / checkpointing.CONFIG_FILE
  resolved = json.loads(config.to_json_best_effort())
  if mesh is not None:
    resolved["mesh"] = {axis: int(mesh.shape[axis]) for axis in sharding.MESH_AXES}
  if resuming and path.exists():
    old = json.loads(path.read_text())
    # scan_layers is how the blocks are stored, not what they compute: the restore converts
    # (_restore). A config.json from before scanned layers lacks it: those runs were unrolled.
    old_model = {"scan_layers": False, **old.get("model", {})}
    diff = sorted(k for k in set(old_model) | set(resolved["model"])
                  if k != "scan_layers" and old_model.get(k) != resolved["model"].get(k))
    if diff:
      raise ConfigError(f"{path}: the checkpoints in {workdir} were trained with other model "
                        f"settings ({', '.join('model.' + k for k in diff)}); use a new workdir")
    reshaped = [f"{k} {_key(old, k)} -> {_key(resolved, k)}" for k in SCHEDULE_KEYS
                if _key(old, k) is not None and _key(old, k) != _key(resolved, k)]
    if reshaped and step != 0 and not config.get("allow_schedule_change", False):
      raise ConfigError(f"{path}: resuming with {', '.join(reshaped)} would reshape the one-cycle "
                        f"schedule mid-run (docs/science.md §2.3); pass "
                        f"--config.allow_schedule_change=True to do so, or use a new workdir")
    changed = sorted(k for k in resolved if k not in ("model", "allow_schedule_change")
                     and old.get(k) != resolved[k])
    changed += ["model.scan_layers"] * (old_model["scan_layers"] != resolved["model"].get(
        "scan_layers", False))
    if changed:
      logging.warning("resuming with changed config keys: %s", ", ".join(changed))
  if metrics.is_primary():
    files.write(path, json.dumps(resolved, indent=2, sort_keys=True) + "\n")


class _SigtermFlag:
  """Single-process preemption notice (multi-process runs use JAX's preemption sync service)."""

  def __init__(self):
    self.raised, self.previous = False, None
    if jax.process_count() == 1:
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the end of this step")
    self.raised = True

  def restore(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def describe(config, mesh):
  per_device, shards = check_batch(config, mesh)
  return (f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices "
          f"({jax.process_count()} processes); global batch {config.batch_size} = {shards} "
          f"shards x {per_device} per device ({config.microbatches} microbatches of "
          f"{per_device // config.microbatches}); {config.precision} compute")


def train_and_evaluate(config, workdir, *, stop_at: int | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns {"step", "loss", "status", ...}.

  `workdir` may be local or an object store path: gs:// works with gcsfs (WORKDIR files,
  through etils.epath), tensorstore (Orbax) and google-cloud-storage (TensorBoard) installed.

  status: "done" (total_steps reached), "preempted" (SIGTERM on any process, or `stop_at`
  reached: a checkpoint of that step is written first) or "nan" (non-finite loss: stops
  without saving, so the last checkpoint is the last good state).
  """
  # Config and mesh.
  workdir = epath.Path(workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.normalize_rules(config.sharding_rules)
  metrics.print_primary(describe(config, mesh))
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except ImportError as e:  # e.g. gs:// without gcsfs (etils.epath goes through fsspec)
    raise ConfigError(f"workdir {workdir}: {e}") from None
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    save_every=config.checkpoint_every,
                                    keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  record_ids = batches.record_labels(config, workdir)  # sets a classifier's model.num_classes
  write_config(config, workdir, resuming=latest is not None, mesh=mesh, step=latest)

  data = None
  try:
    with mesh_context(mesh, rules):
      # Data.
      data, what = batches.make_batches(config, batch_shardings(config, mesh), record_ids)
      metrics.print_primary(what)

      # State: restore onto this mesh, or initialise directly sharded.
      graphdef, tx, abstract, init = build_state(config, mesh)
      shardings = jax.tree.map(lambda a: a.sharding, abstract)
      if latest is not None:
        state, restored = _restore(ckpt, latest, config, mesh, abstract,
                                   data.iterator if data.restores_iterator else None)
        data.resume(latest, restored)
        metrics.print_primary(f"restored step {latest} from {ckpt.directory}")
      else:
        state = init()
        if config.get("init_from"):
          state.update(checkpointing.restore_model(config.init_from, abstract, config.model))
          metrics.print_primary(f"model parameters from {config.init_from} (optimiser fresh)")
      run = _Run(config=config, mesh=mesh, data=data, ckpt=ckpt, start=int(latest or 0),
                 stop_at=stop_at, train_step=jit_train_step(graphdef, tx, config, mesh, shardings),
                 rng=jax.jit(lambda: jax.random.key(config.seed),
                             out_shardings=sharding.replicated(mesh))(),
                 log=metrics.MetricsLog(workdir, int(latest or 0), config.total_steps))
      try:
        result = _loop(run, state)
      finally:
        run.log.close()
      per_device, _ = check_batch(config, mesh)
      return dict(result, global_batch=config.batch_size, per_device_batch=per_device,
                  mesh=dict(mesh.shape))
  finally:
    if data is not None:
      data.close()
    ckpt.close()  # waits for background saves; their errors propagate from here


def _restore(ckpt, step: int, config, mesh, abstract, data_iter):
  """ckpt.restore onto `abstract`; a checkpoint whose blocks are stored the other way (stacked
  for scan_layers, or per layer as before scanned layers) is restored as it is, then converted
  (parameters and optimiser moments) and placed with the new shardings.
  """
  stacked = ckpt.stacked_layers(step, config.model)  # None: a model without transformer blocks
  if stacked is None or stacked == bool(config.model.get("scan_layers", False)):
    return ckpt.restore(step, abstract, data_iter)
  saved = config.copy_and_resolve_references()
  saved.model.scan_layers = stacked
  state, data = ckpt.restore(step, build_state(saved, mesh)[2], data_iter)
  convert = functools.partial(mae.relayout, scan=not stacked)  # no donation: shapes change
  state = jax.jit(convert, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(state)
  metrics.print_primary(f"converted the checkpoint of step {step} from "
                        f"{'stacked' if stacked else 'per-layer'} blocks to the config's "
                        f"model.scan_layers={not stacked}")
  return state, data


@dataclasses.dataclass
class _Run:
  """What the step loop works with (everything but the state, which it threads through)."""
  config: object
  mesh: object
  train_step: object
  data: batches.Batches
  rng: jax.Array
  ckpt: checkpointing.Checkpointer
  log: metrics.MetricsLog
  start: int
  stop_at: int | None


def _loop(run: _Run, state) -> dict:
  config, ckpt = run.config, run.ckpt
  total = int(config.total_steps)
  train_flops = flops.flops_per_image(config.model)["train"]
  peak = float(config.peak_tflops_per_device) * 1e12 * run.mesh.size
  loss, status, step = run.log.last_loss(), "done", run.start
  if run.stop_at is not None and run.stop_at <= run.start:
    metrics.print_primary(f"already at step {run.start} >= stop_at {run.stop_at}: nothing to do")
    return dict(step=run.start, loss=loss, status="preempted")
  sigterm = _SigtermFlag()
  window = None  # (time, step) once the first (compiling) step has finished
  try:
    for step in range(run.start + 1, total + 1):
      state, step_metrics = run.train_step(state, next(run.data), run.rng)
      preempted = ckpt.reached_preemption(step) or sigterm.raised or step == run.stop_at
      save = preempted or step == total or step % config.checkpoint_every == 0
      if not (save or step % config.log_every == 0 or window is None):
        continue
      values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      loss = values["loss"]
      if not math.isfinite(loss):
        logging.error("non-finite loss %s at step %d: stopping; the last checkpoint (step %s) "
                      "is the last good state", loss, step, ckpt.latest_step())
        return dict(step=step, loss=loss, status="nan", last_checkpoint=ckpt.latest_step())
      now = time.perf_counter()
      if step % config.log_every == 0:
        record = dict(step=step, **values)
        if window is not None and step > window[1]:
          dt = (now - window[0]) / (step - window[1])
          record.update(step_time_s=dt, images_per_s=config.batch_size / dt,
                        gflops_per_s=config.batch_size * train_flops / dt / 1e9)
          if peak > 0:
            record["mfu"] = config.batch_size * train_flops / dt / peak
        if run.data.skipped:
          record["skipped_records"] = run.data.skipped
        run.log.write(record)
      if save:
        ckpt.check_for_errors()
        ckpt.save(step, state, run.data.iterator, force=True)
      if preempted:
        ckpt.wait_until_finished()
        why = "stop_at" if step == run.stop_at else "preemption"
        metrics.print_primary(f"stopping at step {step} ({why}); checkpoint saved")
        status = "preempted"
        break
      window = (time.perf_counter(), step)
  finally:
    sigterm.restore()
  ckpt.wait_until_finished()
  return dict(step=step, loss=loss, status=status)


# -- dry run ------------------------------------------------------------------------------------
def dry_run(config, *, compile_step: bool = False) -> dict:
  """Builds the sharded abstract state and lowers (optionally compiles) the train step.

  Nothing of the model is allocated; prints per-device parameter and optimiser memory.
  """
  mesh = sharding.make_mesh(config.mesh)
  metrics.print_primary(describe(config, mesh))
  t0 = time.perf_counter()
  graphdef, tx, abstract, _ = build_state(config, mesh)
  lowered = lower_train_step(graphdef, tx, config, mesh, abstract)
  lower_s = time.perf_counter() - t0
  count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
  result = dict(
      step=0, loss=None, status="dry_run", config=config.name, mesh=dict(mesh.shape),
      devices=jax.device_count(), global_batch=config.batch_size,
      params=count(abstract["model"]),
      param_bytes_per_device=sharding.per_device_bytes(abstract["model"]),
      opt_bytes_per_device=sharding.per_device_bytes(abstract["opt"]),
      lower_s=round(lower_s, 2))
  if compile_step:
    t0 = time.perf_counter()
    mem = lowered.compile().memory_analysis()
    result.update(compile_s=round(time.perf_counter() - t0, 2))
    if mem is not None:
      result.update(argument_bytes=mem.argument_size_in_bytes,
                    output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes)
  gib = 2.0 ** 30
  metrics.print_primary(f"{config.name}: {result['params'] / 1e6:.1f}M parameters; per device: parameters "
         f"{result['param_bytes_per_device'] / gib:.3f} GiB, optimiser "
         f"{result['opt_bytes_per_device'] / gib:.3f} GiB; lowered in {lower_s:.1f} s")
  return result
