"""The sharded train state and the jitted train step: a pure function of (state, batch, rng).

    graphdef, tx, abstract, init = build_state(config, mesh)   # allocates nothing
    state = init()                                             # created directly sharded
    train_step = jit_train_step(graphdef, tx, config, mesh, shardings)
    state, metrics = train_step(state, batch, rng)             # state donated
"""
import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mae_jax.models import mae, registry
from mae_jax.train import ConfigError, optim, sharding


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

  The state is a pytree of plain arrays {"model": the model's Params as a pure dict (nnx.merge
  takes it back), "opt": optax state, "step"}, plus "stats" (the BatchStats, e.g. BatchNorm
  running statistics) for models that have them: no NNX Variables cross the jit boundary, which
  would cost ~1 ms of host time per parameter and step to re-wrap. `init()` creates it directly
  sharded under jax.jit (no replicated copy first). Optimiser moments get their parameter's
  sharding; scalars are replicated.
  """
  rules = sharding.normalize_rules(config.sharding_rules)
  dtype = mae.compute_dtype(config.precision)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  build = lambda: registry.build_model(config.model, seed=config.seed, dtype=dtype,
                                       remat=config.remat)

  def with_stats(state, stats):
    return dict(state, stats=stats) if jax.tree.leaves(stats) else state

  def create():
    model = build()
    params = nnx.state(model, nnx.Param).to_pure_dict()
    return with_stats(dict(model=params, opt=tx.init(params), step=jnp.zeros((), jnp.int32)),
                      nnx.state(model, nnx.BatchStat).to_pure_dict())

  with mesh_context(mesh, rules):
    graphdef, params, stats, rest = nnx.split(nnx.eval_shape(build), nnx.Param, nnx.BatchStat,
                                              ...)
    if jax.tree.leaves(rest):
      raise ValueError(f"the train state holds Params and BatchStats only; the model also has "
                       f"{rest}")
    param_shardings = nnx.get_named_sharding(params, mesh).to_pure_dict()
    stat_shardings = nnx.get_named_sharding(stats, mesh).to_pure_dict()
  params = params.to_pure_dict()
  opt = jax.eval_shape(tx.init, params)
  repl = sharding.replicated(mesh)
  shardings = with_stats(dict(model=param_shardings, step=repl, opt=optax.tree_map_params(
      tx, lambda _, s: s, opt, param_shardings, transform_non_params=lambda _: repl)),
                         stat_shardings)
  abstract = with_stats(dict(model=params, opt=opt, step=jax.ShapeDtypeStruct((), jnp.int32)),
                        stats.to_pure_dict())
  init = jax.jit(create, out_shardings=shardings)
  return graphdef, tx, sharding.with_shardings(abstract, shardings), init


def batch_shardings(config, mesh) -> dict:
  """The sharding of each array of a batch: its rows split over the batch axes (data x fsdp).

  Every kind reads "image" (B, H, W, C) crops; the classifiers (`registry.takes_labels`) also
  the (B,) int32 "label" of each crop.
  """
  rules = sharding.normalize_rules(config.sharding_rules)
  out = {"image": sharding.batch_sharding(mesh, rules)}
  if registry.takes_labels(config.model):
    out["label"] = sharding.batch_sharding(mesh, rules, ndim=1)
  return out


def abstract_batch(config, mesh) -> dict:
  """A global batch as sharded ShapeDtypeStructs (lowering without data)."""
  m, b = config.model, config.batch_size
  shapes = {"image": ((b, m.image_size, m.image_size, m.channels), jnp.dtype(config.data.dtype)),
            "label": ((b,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=s)
          for k, s in batch_shardings(config, mesh).items()}


def split_microbatches(x, micro: int, batch_axes):
  """(B, ...) -> (micro, B / micro, ...) where every device keeps its own rows (no transfer)."""
  b = x.shape[0]
  chunks = x.reshape(b // micro, micro, *x.shape[1:]).swapaxes(0, 1)
  spec = jax.sharding.PartitionSpec(None, batch_axes or None)
  return jax.lax.with_sharding_constraint(chunks, spec)


def make_train_step(graphdef, tx, config, batch_axes=("data", "fsdp")):
  """train_step(state, batch, rng) -> (state, metrics): one optimiser update.

  rng is the run's seed key; the step folds in its own counter, so the masks of step s are the
  same in any run that reaches step s. With `microbatches` > 1 the gradients of sequential
  chunks are averaged (lax.scan), trading time for activation memory; BatchStats are updated
  chunk after chunk, as torch does under gradient accumulation. The metrics are the loss, the
  model's scalar aux terms (registry), the gradient norm and the learning rate.
  """
  micro = int(config.microbatches)
  lr_fn = optim.one_cycle(config.optimizer, config.total_steps)

  def loss_fn(params, stats, batch, key):
    # copy: fresh BatchStat Variables at the gradient's trace level, which a train-mode forward
    # (BatchNorm) may update; they come back as the new running statistics.
    model = nnx.merge(graphdef, params, stats, copy=True)
    loss, aux = model(batch, key)
    scalars = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    return loss, (scalars, nnx.state(model, nnx.BatchStat).to_pure_dict())

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch, rng):
    params, stats, step = state["model"], state.get("stats", {}), state["step"]
    rng = jax.random.fold_in(rng, step)
    if micro == 1:
      (loss, (aux, stats)), grads = grad_fn(params, stats, batch, rng)
    else:
      chunks = jax.tree.map(lambda x: split_microbatches(x, micro, batch_axes), batch)

      def accumulate(carry, xs):
        total, stats = carry
        chunk, i = xs
        (l, (a, stats)), g = grad_fn(params, stats, chunk, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, total, (g, l, a)), stats), None

      (l, (a, _)), g = jax.eval_shape(grad_fn, params, stats,
                                      jax.tree.map(lambda c: c[0], chunks), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g, l, a))
      (total, stats), _ = jax.lax.scan(accumulate, (zeros, stats), (chunks, jnp.arange(micro)))
      grads, loss, aux = jax.tree.map(lambda t: t / micro, total)
    with jax.named_scope("optimizer"):  # op names that bench/profile_step.py classifies by
      updates, opt_state = tx.update(grads, state["opt"], params)
      new = dict(model=optax.apply_updates(params, updates), opt=opt_state, step=step + 1)
    metrics = dict(loss=loss, **aux, grad_norm=optax.tree.norm(grads), lr=lr_fn(step))
    if "stats" in state:
      new["stats"] = stats
    return new, metrics

  return train_step


def jit_train_step(graphdef, tx, config, mesh, state_shardings):
  rules = sharding.normalize_rules(config.sharding_rules)
  step = make_train_step(graphdef, tx, config, sharding.batch_axes(rules))
  repl = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings(config, mesh), repl),
                 out_shardings=(state_shardings, repl), donate_argnums=0)


def lower_train_step(graphdef, tx, config, mesh, abstract):
  """The jitted train step lowered over the sharded abstract state and an abstract batch and
  key: allocates nothing (dry runs, compiles for a TPU topology without the hardware)."""
  rules = sharding.normalize_rules(config.sharding_rules)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  with mesh_context(mesh, rules):
    return jit_train_step(graphdef, tx, config, mesh, shardings).lower(
        abstract, abstract_batch(config, mesh), key)


def check_batch(config, mesh):
  """(per-device batch, shards): the global batch must split evenly over shards x microbatches."""
  rules = sharding.normalize_rules(config.sharding_rules)
  shards, micro = sharding.batch_shards(mesh, rules), int(config.microbatches)
  if micro < 1 or config.batch_size % (shards * micro):
    raise ConfigError(f"batch_size {config.batch_size} must be divisible by {shards} batch "
                      f"shards (mesh data x fsdp) x {micro} microbatches")
  return config.batch_size // shards, shards
