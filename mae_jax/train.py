"""MAE pre-training on any mesh, big_vision style: the phases of a run from top to bottom.

    result = train_and_evaluate(config, workdir)   # {"step", "loss", "status", ...}
    result = dry_run(config)                       # sharded abstract state + lowered step

Phases: config and mesh -> data -> sharded abstract state -> restore or init (directly sharded,
under jax.jit) -> one jitted train step over the split NNX state -> loop (metrics, checkpoints,
preemption, NaN guard). The train step is a pure function of (state, batch, rng); the loop owns
every side effect.
"""
import contextlib
import json
import logging
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from mae_jax import checkpointing, flops, mae, optim, sharding


class ConfigError(ValueError):
  """A config that cannot run on the present devices (a user mistake: one line)."""


def _is_primary():
  return jax.process_index() == 0


def _print(*args):
  if _is_primary():
    print(*args, flush=True)


# -- data ---------------------------------------------------------------------------------------
class SyntheticCrops:
  """In-memory 6-channel crops: smooth random textures, a pure function of (seed, step, row).

  Used when `data.manifest` is unset. Every row is generated from its global position, so the
  batches are identical on any mesh or process count and a resumed run sees the same data.
  Duck-types the grain iterator protocol (get_state / set_state) for the checkpoint.
  """

  def __init__(self, config, batch_sharding):
    m = config.model
    self.shape = (config.batch_size, m.image_size, m.image_size, m.channels)
    self.dtype = np.dtype(config.data.dtype)
    self.seed, self.sharding, self.next_step = int(config.seed), batch_sharding, 1

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    _, size, _, channels = self.shape
    u = np.arange(size, dtype=np.float32) / size
    out = np.empty((stop - start, size, size, channels), self.dtype)
    top = np.iinfo(self.dtype).max
    for i, row in enumerate(range(start, stop)):
      rng = np.random.default_rng([self.seed, step, row])
      freq = rng.uniform(0.5, 4.0, (2, 3, channels))  # 3 separable waves per channel
      phase = rng.uniform(0, 2 * np.pi, (2, 3, channels))
      fy = np.sin(2 * np.pi * freq[0] * u[:, None, None] + phase[0])  # (H, 3, C)
      fx = np.sin(2 * np.pi * freq[1] * u[:, None, None] + phase[1])
      image = np.einsum("ykc,xkc->yxc", fy, fx) / 3.0  # in [-1, 1]
      out[i] = np.round((image + 1.0) * 0.5 * top).astype(self.dtype)
    return out

  def __next__(self) -> jax.Array:
    step = self.next_step
    self.next_step += 1
    rows = lambda index: self.rows(step, *index[0].indices(self.shape[0])[:2])
    return jax.make_array_from_callback(self.shape, self.sharding, rows)

  def get_state(self) -> bytes:
    return json.dumps({"source": "synthetic", "next_step": self.next_step}).encode()

  def set_state(self, state: bytes):
    self.next_step = int(json.loads(state)["next_step"])

  def start_prefetch(self):  # called by grain's checkpoint handler after a restore
    pass


class GrainBatches:
  """Global batches from the grain pipeline: each process feeds its slice of the batch."""

  def __init__(self, config, batch_sharding):
    from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    d, m = config.data, config.model
    self.shape = (config.batch_size, m.image_size, m.image_size, m.channels)
    rows = {idx[0].indices(config.batch_size)[:2]
            for idx in batch_sharding.addressable_devices_indices_map(self.shape).values()}
    if sum(stop - start for start, stop in rows) != config.batch_size // jax.process_count():
      raise ConfigError(f"mesh {dict(batch_sharding.mesh.shape)}: every process must hold its "
                        f"own 1/{jax.process_count()} of the batch (keep the tensor axis within "
                        f"a process), got rows {sorted(rows)}")
    self.iterator = input_pipeline.train_iterator(
        d.manifest, global_batch_size=config.batch_size, crop_size=m.image_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=d.num_workers, augment=d.augment,
        verify_crc=d.verify_crc, skip_corrupt=d.skip_corrupt, expect_channels=m.channels,
        expect_dtype=d.dtype)
    self.sharding, self.skipped = batch_sharding, 0

  def __next__(self) -> jax.Array:
    batch = next(self.iterator)
    self.skipped += int(batch.pop("num_skipped", 0))
    return jax.make_array_from_process_local_data(self.sharding, batch["image"], self.shape)

  def close(self):
    if hasattr(self.iterator, "close"):
      self.iterator.close()


# -- state and step -----------------------------------------------------------------------------
@contextlib.contextmanager
def mesh_context(mesh, rules):
  """The mesh and rules every trace needs (activation constraints resolve through them).

  Eager sharding is off: parameter placement comes from explicit in/out shardings, and flax's
  eager path inspects `.sharding` of every traced variable write, which costs jax a walk of the
  whole jaxpr each time (quadratic tracing: 50 s to lower ViT-G/8 instead of a few).
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
    yield


def build_state(config, mesh):
  """(graphdef, optimiser, abstract state with the mesh's shardings, init fn); allocates nothing.

  The state is a pytree of plain arrays {"model": the MAE's Params as a pure dict (nnx.merge
  takes it back), "opt": optax state, "step"}: no NNX Variables cross the jit boundary, which
  would cost ~1 ms of host time per parameter and step to re-wrap. `init()` creates it directly
  sharded under jax.jit (no replicated copy first). Optimiser moments get their parameter's
  sharding; scalars are replicated.
  """
  rules = sharding.normalize_rules(config.sharding_rules)
  dtype = mae.compute_dtype(config.precision)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  build = lambda: mae.build_model(config.model, seed=config.seed, dtype=dtype, remat=config.remat)

  def create():
    params = nnx.state(build(), nnx.Param).to_pure_dict()
    return dict(model=params, opt=tx.init(params), step=jnp.zeros((), jnp.int32))

  with mesh_context(mesh, rules):
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError(f"the train state holds Params only; the model also has {rest}")
    param_shardings = nnx.get_named_sharding(params, mesh).to_pure_dict()
  params = params.to_pure_dict()
  opt = jax.eval_shape(tx.init, params)
  repl = sharding.replicated(mesh)
  shardings = dict(model=param_shardings, step=repl, opt=optax.tree_map_params(
      tx, lambda _, s: s, opt, param_shardings, transform_non_params=lambda _: repl))
  abstract = dict(model=params, opt=opt, step=jax.ShapeDtypeStruct((), jnp.int32))
  init = jax.jit(create, out_shardings=shardings)
  return graphdef, tx, sharding.with_shardings(abstract, shardings), init


def split_microbatches(images, micro: int, batch_axes):
  """(B, ...) -> (micro, B / micro, ...) where every device keeps its own rows (no transfer)."""
  b = images.shape[0]
  chunks = images.reshape(b // micro, micro, *images.shape[1:]).swapaxes(0, 1)
  spec = jax.sharding.PartitionSpec(None, batch_axes or None)
  return jax.lax.with_sharding_constraint(chunks, spec)


def make_train_step(graphdef, tx, config, batch_axes=("data", "fsdp")):
  """train_step(state, images, rng) -> (state, metrics): one optimiser update.

  rng is the run's seed key; the step folds in its own counter, so the masks of step s are the
  same in any run that reaches step s. With `microbatches` > 1 the gradients of sequential
  chunks are averaged (lax.scan), trading time for activation memory.
  """
  micro = int(config.microbatches)
  lr_fn = optim.one_cycle(config.optimizer, config.total_steps)

  def loss_fn(params, images, key):
    loss, aux = nnx.merge(graphdef, params)(images, key)
    return loss, (aux["mse"], aux["fourier"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, images, rng):
    params, step = state["model"], state["step"]
    rng = jax.random.fold_in(rng, step)
    if micro == 1:
      (loss, (mse, fourier)), grads = grad_fn(params, images, rng)
    else:
      def accumulate(carry, xs):
        chunk, i = xs
        (l, (m, f)), g = grad_fn(params, chunk, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, l, m, f)), None

      zeros = (jax.tree.map(jnp.zeros_like, params),) + (jnp.zeros((), jnp.float32),) * 3
      chunks = split_microbatches(images, micro, batch_axes)
      total, _ = jax.lax.scan(accumulate, zeros, (chunks, jnp.arange(micro)))
      grads, loss, mse, fourier = jax.tree.map(lambda t: t / micro, total)
    updates, opt_state = tx.update(grads, state["opt"], params)
    metrics = dict(loss=loss, mse=mse, fourier=fourier, grad_norm=optax.tree.norm(grads),
                   lr=lr_fn(step))
    return dict(model=optax.apply_updates(params, updates), opt=opt_state, step=step + 1), metrics

  return train_step


def jit_train_step(graphdef, tx, config, mesh, state_shardings):
  rules = sharding.normalize_rules(config.sharding_rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = make_train_step(graphdef, tx, config, sharding.batch_axes(rules))
  repl = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch_sh, repl),
                 out_shardings=(state_shardings, repl), donate_argnums=0)


def check_batch(config, mesh):
  """(per-device batch, shards): the global batch must split evenly over shards x microbatches."""
  rules = sharding.normalize_rules(config.sharding_rules)
  shards, micro = sharding.batch_shards(mesh, rules), int(config.microbatches)
  if micro < 1 or config.batch_size % (shards * micro):
    raise ConfigError(f"batch_size {config.batch_size} must be divisible by {shards} batch "
                      f"shards (mesh data x fsdp) x {micro} microbatches")
  return config.batch_size // shards, shards


# -- metrics ------------------------------------------------------------------------------------
class MetricsLog:
  """metrics.jsonl + TensorBoard (tb/) + a progress line; written by process 0 only.

  On resume, records after the restored step (logged by the interrupted run) are dropped so the
  file holds one record per logged step.
  """

  def __init__(self, workdir: epath.Path, start_step: int, total_steps: int):
    self.total, self.writer, self.path = total_steps, None, workdir / "metrics.jsonl"
    self.lines = []
    if not _is_primary():
      return
    if self.path.exists():
      self.lines = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l)["step"] <= start_step]
    self._rewrite()
    self.local = "://" not in str(self.path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    try:  # gs:// needs google-cloud-storage, s3:// boto3
      self.writer = SummaryWriter(str(workdir / "tb"))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"TensorBoard cannot write to {workdir / 'tb'}: {e}") from None

  def _rewrite(self):
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in self.lines))
    tmp.replace(self.path)

  def last_loss(self):
    return json.loads(self.lines[-1])["loss"] if self.lines else None

  def write(self, record: dict):
    if not _is_primary():
      return
    line = json.dumps(record)
    self.lines.append(line)
    if self.local:
      with self.path.open("a") as f:
        f.write(line + "\n")
    else:  # object stores cannot append
      self._rewrite()
    for key, value in record.items():
      if key != "step":
        self.writer.add_scalar(key, value, record["step"])
    self.writer.flush()
    rate = f" {record['images_per_s']:.1f} img/s {record['step_time_s']:.3f} s/step" \
        if "images_per_s" in record else ""
    mfu = f" mfu {record['mfu']:.3f}" if "mfu" in record else ""
    print(f"step {record['step']}/{self.total} loss {record['loss']:.5f} mse "
          f"{record['mse']:.5f} fourier {record['fourier']:.4f} lr {record['lr']:.3g} "
          f"grad_norm {record['grad_norm']:.3f}{rate}{mfu}", flush=True)

  def close(self):
    if self.writer is not None:
      self.writer.close()


# -- run ----------------------------------------------------------------------------------------
def write_config(config, workdir: epath.Path, resuming: bool, mesh=None):
  """WORKDIR/config.json (atomic; mesh sizes resolved); a resumed run must keep its model."""
  path = workdir / checkpointing.CONFIG_FILE
  resolved = json.loads(config.to_json_best_effort())
  if mesh is not None:
    resolved["mesh"] = {axis: int(mesh.shape[axis]) for axis in sharding.MESH_AXES}
  if resuming and path.exists():
    old = json.loads(path.read_text())
    if old.get("model") != resolved["model"]:
      diff = sorted(k for k in set(old.get("model", {})) | set(resolved["model"])
                    if old.get("model", {}).get(k) != resolved["model"].get(k))
      raise ConfigError(f"{path}: the checkpoints in {workdir} were trained with other model "
                        f"settings ({', '.join('model.' + k for k in diff)}); use a new workdir")
    changed = sorted(k for k in resolved if old.get(k) != resolved[k])
    if changed:
      logging.warning("resuming with changed config keys: %s", ", ".join(changed))
  if _is_primary():
    tmp = workdir / (checkpointing.CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


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
  _print(describe(config, mesh))
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except ImportError as e:  # e.g. gs:// without gcsfs (etils.epath goes through fsspec)
    raise ConfigError(f"workdir {workdir}: {e}") from None
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    save_every=config.checkpoint_every,
                                    keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  write_config(config, workdir, resuming=latest is not None, mesh=mesh)

  batch_sh = sharding.batch_sharding(mesh, rules)
  data = None
  try:
    with mesh_context(mesh, rules):
      # Data.
      if config.data.manifest:
        data = GrainBatches(config, batch_sh)
        _print(f"data: {config.data.manifest} ({config.data.num_workers} grain workers)")
      else:
        data = SyntheticCrops(config, batch_sh)
        _print("data: data.manifest is unset -> in-memory SYNTHETIC 6-channel crops "
               "(smooth random textures, deterministic by step)")
      checkpointable = data.iterator if isinstance(data, GrainBatches) else data

      # State: restore onto this mesh, or initialise directly sharded.
      graphdef, tx, abstract, init = build_state(config, mesh)
      shardings = jax.tree.map(lambda a: a.sharding, abstract)
      if latest is not None:
        state, restored = ckpt.restore(latest, abstract,
                                       checkpointable if isinstance(data, GrainBatches) else None)
        if isinstance(data, GrainBatches):
          data.iterator = restored
        else:
          data.next_step = latest + 1
        _print(f"restored step {latest} from {ckpt.directory}")
      else:
        state = init()
      start = int(latest or 0)
      train_step = jit_train_step(graphdef, tx, config, mesh, shardings)
      rng = jax.jit(lambda: jax.random.key(config.seed), out_shardings=sharding.replicated(mesh))()
      log = MetricsLog(workdir, start, config.total_steps)
      try:
        result = _loop(config, mesh, state, train_step, data, checkpointable, rng, ckpt, log,
                       start, stop_at)
      finally:
        log.close()
      per_device, _ = check_batch(config, mesh)
      return dict(result, global_batch=config.batch_size, per_device_batch=per_device,
                  mesh=dict(mesh.shape))
  finally:
    if isinstance(data, GrainBatches):
      data.close()
    ckpt.close()  # waits for background saves; their errors propagate from here


def _loop(config, mesh, state, train_step, data, checkpointable, rng, ckpt, log, start, stop_at):
  total = int(config.total_steps)
  train_flops = flops.flops_per_image(config.model)["train"]
  peak = float(config.peak_tflops_per_device) * 1e12 * mesh.size
  loss, status, step = log.last_loss(), "done", start
  if stop_at is not None and stop_at <= start:
    _print(f"already at step {start} >= stop_at {stop_at}: nothing to do")
    return dict(step=start, loss=loss, status="preempted")
  sigterm = _SigtermFlag()
  window = None  # (time, step) once the first (compiling) step has finished
  try:
    for step in range(start + 1, total + 1):
      state, metrics = train_step(state, next(data), rng)
      preempted = ckpt.reached_preemption(step) or sigterm.raised or step == stop_at
      save = preempted or step == total or step % config.checkpoint_every == 0
      if not (save or step % config.log_every == 0 or window is None):
        continue
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
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
        log.write(record)
      if save:
        ckpt.check_for_errors()
        ckpt.save(step, state, checkpointable, force=True)
      if preempted:
        ckpt.wait_until_finished()
        _print(f"stopping at step {step} ({'stop_at' if step == stop_at else 'preemption'}); "
               f"checkpoint saved")
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
  rules = sharding.normalize_rules(config.sharding_rules)
  _print(describe(config, mesh))
  t0 = time.perf_counter()
  graphdef, tx, abstract, _ = build_state(config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  m = config.model
  images = jax.ShapeDtypeStruct((config.batch_size, m.image_size, m.image_size, m.channels),
                                np.dtype(config.data.dtype),
                                sharding=sharding.batch_sharding(mesh, rules))
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  with mesh_context(mesh, rules):
    lowered = jit_train_step(graphdef, tx, config, mesh, shardings).lower(abstract, images, key)
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
  _print(f"{config.name}: {result['params'] / 1e6:.1f}M parameters; per device: parameters "
         f"{result['param_bytes_per_device'] / gib:.3f} GiB, optimiser "
         f"{result['opt_bytes_per_device'] / gib:.3f} GiB; lowered in {lower_s:.1f} s")
  return result
