"""The sharded train state and the jitted train step: a pure function of (state, batch, rng).

    graphdef, tx, abstract, init = build_state(config, mesh)   # allocates nothing
    state = init()                                             # created directly sharded
    train_step = jit_train_step(graphdef, tx, config, mesh, shardings)
    state, metrics = train_step(state, images, rng)            # state donated
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

  The state is a pytree of plain arrays {"model": the MAE's Params as a pure dict (nnx.merge
  takes it back), "opt": optax state, "step"}: no NNX Variables cross the jit boundary, which
  would cost ~1 ms of host time per parameter and step to re-wrap. `init()` creates it directly
  sharded under jax.jit (no replicated copy first). Optimiser moments get their parameter's
  sharding; scalars are replicated.
  """
  rules = sharding.normalize_rules(config.sharding_rules)
  dtype = mae.compute_dtype(config.precision)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  build = lambda: registry.build_model(config.model, seed=config.seed, dtype=dtype,
                                       remat=config.remat)

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


def lower_train_step(graphdef, tx, config, mesh, abstract):
  """The jitted train step lowered over the sharded abstract state and an abstract batch and
  key: allocates nothing (dry runs, compiles for a TPU topology without the hardware)."""
  rules = sharding.normalize_rules(config.sharding_rules)
  m = config.model
  images = jax.ShapeDtypeStruct((config.batch_size, m.image_size, m.image_size, m.channels),
                                jnp.dtype(config.data.dtype),
                                sharding=sharding.batch_sharding(mesh, rules))
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  with mesh_context(mesh, rules):
    return jit_train_step(graphdef, tx, config, mesh, shardings).lower(abstract, images, key)


def check_batch(config, mesh):
  """(per-device batch, shards): the global batch must split evenly over shards x microbatches."""
  rules = sharding.normalize_rules(config.sharding_rules)
  shards, micro = sharding.batch_shards(mesh, rules), int(config.microbatches)
  if micro < 1 or config.batch_size % (shards * micro):
    raise ConfigError(f"batch_size {config.batch_size} must be divisible by {shards} batch "
                      f"shards (mesh data x fsdp) x {micro} microbatches")
  return config.batch_size // shards, shards
