"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

    ckpt = Checkpointer(workdir / "checkpoints", save_every=1000, keep=3)
    state, data_iter = ckpt.restore(ckpt.latest_step(), abstract_state, data_iter)
    ckpt.save(step, state, data_iter)              # async; returns whether it saved
    if ckpt.reached_preemption(step): ...          # SIGTERM on any process -> same step on all
    ckpt.close()                                   # waits; background errors surface here

    model, config = load_for_eval("WORKDIR")       # or WORKDIR/checkpoints or a step folder

Layout (docs/interfaces.md §3): `checkpoints/<step>/{state/, data/process_<i>-of-<n>.json}`. A restore
takes an abstract target carrying the NEW mesh's shardings, so a run can resume on another mesh
or device count. The data item needs the same process count (grain keeps one file per process).
This file is the only place that knows Orbax's V0 API, so moving to `ocp.v1` touches nothing else.
"""
import json
import logging

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax.models import mae, registry

from mae_jax.train import sharding
from mae_jax.util.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError, ValueError):
  """A checkpoint path or config that cannot be used (a user mistake: one line)."""


def checkpoint_dir(workdir) -> epath.Path:
  path = epath.Path(workdir) / CHECKPOINT_DIR
  return path if "://" in str(path) else epath.Path(path).absolute()  # Orbax wants absolute


class Checkpointer:
  """Orbax V0 `CheckpointManager` with the items ("state", "data")."""

  def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_every)), max_to_keep=max(1, int(keep)),
        enable_async_checkpointing=async_save, create=True)
    self.directory = epath.Path(directory)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data"))

  def latest_step(self):
    return self._mngr.latest_step()

  def all_steps(self):
    """Steps of finished checkpoints on disk (the manager's memory may still list a failed one)."""
    return sorted(self._mngr.all_steps(read=True))

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves (state, data iterator) if `step` is due (or `force`); False if not saved.

    The device->host copy happens before this returns, so the caller may donate `state` to the
    next step right away; the write finishes in the background.
    """
    if step in self._mngr.all_steps():  # e.g. a final or preemption save on an interval step
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return self._mngr.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, data_iter=None):
    """(state, data_iter) at `step`; `abstract_state` carries the target shardings.

    Without `data_iter` only the train state is read (the synthetic source needs no state).
    """
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      self._check_data_processes(step)
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], (restored["data"] if data_iter is not None else None)

  def _check_data_processes(self, step: int):
    """Refuses, in one line, a resume whose process count differs from the saving run's: grain
    keeps one iterator file per process and would fail deep inside Orbax with a traceback."""
    folder = self.directory / str(step) / "data"
    count = jax.process_count()
    if (folder / f"process_{jax.process_index()}-of-{count}.json").exists():
      return
    saved = sorted(p.name for p in folder.glob("process_*-of-*.json")) if folder.exists() else []
    counts = {name.rsplit("-of-", 1)[1].removesuffix(".json") for name in saved}
    by = f"{counts.pop()} processes" if len(counts) == 1 else "another process count"
    raise CheckpointError(f"{folder}: the data iterator of step {step} was saved by {by} "
                          f"({', '.join(saved) or 'no iterator files'}); this run has {count}: "
                          f"resume with that process count (the device count may change) or "
                          f"use a new workdir")

  def stacked_layers(self, step: int, model_cfg) -> bool | None:
    """Whether the checkpoint of `step` stores stacked blocks (model.scan_layers) or per-layer."""
    return stacked_layers(self.directory / str(step) / "state", model_cfg)

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any process got a preemption notice."""
    return self._mngr.reached_preemption(step)

  def check_for_errors(self):
    """Raises the error of a finished background save, if any (never swallowed).

    The manager's own check only covers the async writer; a failed finalisation (rename,
    commit) is kept by its finalize thread and re-raised by wait_until_finished, which returns
    at once when no save is in flight.
    """
    self._mngr.check_for_errors()
    if not self._mngr.is_saving_in_progress():
      self._mngr.wait_until_finished()

  def wait_until_finished(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.close()


# -- evaluation ---------------------------------------------------------------------------------
def resolve(ckpt_path, step: int | None = None):
  """(workdir, step folder) for a WORKDIR, its checkpoints/ folder or one step folder."""
  path = epath.Path(ckpt_path)
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if (path / CONFIG_FILE).exists():
    workdir, steps_dir = path, path / CHECKPOINT_DIR
  elif path.name == CHECKPOINT_DIR:
    workdir, steps_dir = path.parent, path
  elif path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
    return path.parent.parent, path
  else:
    raise CheckpointError(f"{path} is neither a run's WORKDIR (with {CONFIG_FILE}), its "
                          f"{CHECKPOINT_DIR}/ folder, nor a step folder inside it")
  steps = sorted(int(p.name) for p in steps_dir.iterdir()
                 if p.name.isdigit() and (p / "state").exists()) if steps_dir.exists() else []
  if not steps:
    raise CheckpointError(f"no finished checkpoint in {steps_dir}")
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} in {steps_dir}; have {steps}")
  return workdir, steps_dir / str(step if step is not None else steps[-1])


def read_config(workdir) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"{path} is missing: evaluation rebuilds the model from it")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def stacked_layers(state_dir, model_cfg) -> bool | None:
  """Whether a saved train state (a step's state/ folder) has stacked blocks, read from Orbax's
  tree metadata: per-layer blocks are saved as {"blocks": {"0": ..., "1": ...}}. None for a
  model without transformer blocks (MU-Net, the DenseNet, whose "blocks" are dense blocks).

  The checkpoint itself says, not config.json: a run converted on resume keeps its older,
  per-layer steps beside the newer stacked ones.
  """
  if registry.kind(model_cfg) != "mae":
    return None
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(epath.Path(state_dir))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  blocks = tree["model"].get("blocks")
  return None if blocks is None else not all(str(k).isdigit() for k in blocks)


# What may differ between the run a model was trained in and a run starting from it (init_from):
# regularisation, masking and loss weights; everything else shapes the parameters.
NOT_SHAPING = ("drop_path", "mask_ratio", "fourier_weight", "label_smoothing", "embed_levels")
# Model keys added after runs were saved without them, with the value those runs' models used.
ADDED_MODEL_KEYS = {"decoder": "shared", "decoder_norm_eps": 1e-6}


def restore_model(ckpt_path, abstract_state, model_cfg) -> dict:
  """{"model"[, "stats"]} of another run's checkpoint (WORKDIR, checkpoints/ or a step folder),
  placed with the shardings of `abstract_state` (this run's): `config.init_from`.

  The saved model settings must equal this config's but for NOT_SHAPING ones, and the blocks be
  stored the same way (model.scan_layers); otherwise one line says which.
  """
  workdir, step_dir = resolve(ckpt_path)
  saved = read_config(workdir).model.to_dict()
  ours = model_cfg.to_dict()
  saved["scan_layers"] = stacked_layers(step_dir / "state", model_cfg)
  if saved["scan_layers"] is None:
    saved["scan_layers"] = ours.get("scan_layers")
  saved = {**{k: v for k, v in ADDED_MODEL_KEYS.items() if k in ours}, **saved}
  diff = sorted(k for k in set(saved) | set(ours) if k not in NOT_SHAPING
                and json.dumps(saved.get(k)) != json.dumps(ours.get(k)))
  if diff:
    raise CheckpointError(f"init_from={ckpt_path}: its model differs from this config in "
                          + ", ".join(f"model.{k} ({saved.get(k)!r} there, {ours.get(k)!r} here)"
                                      for k in diff))
  target = {k: abstract_state[k] for k in ("model", "stats") if k in abstract_state}
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return {k: restored[k] for k in target}


def load_for_eval(ckpt_path, *, step: int | None = None, mesh: Mesh | None = None, dtype=None):
  """(model with restored parameters, run config) from a WORKDIR, checkpoints/ or a step folder.

  Only the model's variables are read: parameters and BatchNorm statistics, no optimiser state. They land replicated on `mesh`
  (default: a 1-device mesh of the first local device); compute runs in `dtype` (default: the
  run's `precision`). The result is ready for `model.embed(images)`.
  """
  workdir, step_dir = resolve(ckpt_path, step)
  config = read_config(workdir)
  stacked = stacked_layers(step_dir / "state", config.model)
  if stacked is not None:
    config.model.scan_layers = stacked  # this step's layout, whatever config.json says now
  rules = sharding.normalize_rules(config.sharding_rules)
  mesh = mesh or Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  dtype = dtype or mae.compute_dtype(config.get("precision", "float32"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: registry.build_model(config.model, seed=0, dtype=dtype))
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  replicated = NamedSharding(mesh, P())
  place = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree.to_pure_dict())
  target = {"model": place(params)}
  if jax.tree.leaves(stats):  # BatchNorm running statistics (train state "stats", step.py)
    target["stats"] = place(stats)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  logging.info("restored model parameters of %s (no optimiser state)", step_dir)
  model = nnx.merge(graphdef, restored["model"], restored.get("stats", {}))
  return model, config
