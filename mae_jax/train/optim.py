"""Optimiser and learning-rate schedule of the paper (docs/science.md §2.3): Lion + one-cycle cosine.

    tx = make_optimizer(config.optimizer, config.total_steps)
    lr = one_cycle(config.optimizer, config.total_steps)(step)

One-cycle, as VC describes it ("one-cycle cosine, 10 % linear warm-up"): the learning rate rises
linearly over `warmup_fraction` of the steps from lr/div_factor to lr, then follows a half cosine
down to lr/div_factor/final_div_factor. (PyTorch's OneCycleLR with anneal_strategy="cos" shapes
the warm-up as a cosine too; both start and end at the same values.)

beta1 cycling. PyTorch's OneCycleLR also has cycle_momentum=True by default, which for Lion moves
beta1 from 0.95 down to 0.85 during the warm-up and back up to 0.95 during the decay, overriding
the configured b1 (docs/science.md §2.3, §7). Whether the authors meant that is unknown, so it is OFF
by default: beta1 stays `optimizer.b1`. `optimizer.cycle_momentum=True` (when a config defines
that key) or `make_optimizer(..., cycle_momentum=True)` replicates it exactly, with the momentum
schedule mirroring the lr schedule (cosine in both phases, as PyTorch does for momentum).
"""
import jax.numpy as jnp
import optax

BASE_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95  # PyTorch OneCycleLR defaults


def _phases(opt_cfg, total_steps: int):
  warmup = max(1, int(round(float(opt_cfg.warmup_fraction) * total_steps)))
  return warmup, max(1, total_steps - warmup)


def one_cycle(opt_cfg, total_steps: int):
  """step -> learning rate: linear warm-up, then cosine to lr / div_factor / final_div_factor."""
  peak = float(opt_cfg.lr)
  start = peak / float(opt_cfg.div_factor)
  end = start / float(opt_cfg.final_div_factor)
  warmup, decay = _phases(opt_cfg, total_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    up = start + (peak - start) * jnp.clip(step / warmup, 0.0, 1.0)
    t = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    down = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup, up, down)

  return schedule


def one_cycle_momentum(opt_cfg, total_steps: int):
  """step -> beta1 of OneCycleLR(cycle_momentum=True): 0.95 -> 0.85 (warm-up) -> 0.95 (cosine)."""
  warmup, decay = _phases(opt_cfg, total_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    anneal = lambda start, end, t: end + (start - end) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    up = anneal(MAX_MOMENTUM, BASE_MOMENTUM, jnp.clip(step / warmup, 0.0, 1.0))
    down = anneal(BASE_MOMENTUM, MAX_MOMENTUM, jnp.clip((step - warmup) / decay, 0.0, 1.0))
    return jnp.where(step < warmup, up, down)

  return schedule


def make_optimizer(opt_cfg, total_steps: int, cycle_momentum: bool | None = None):
  """Gradient clipping (global norm; 0 disables) followed by Lion or AdamW on the one-cycle lr.

  Weight decay applies to every trained parameter, as the official code does (no no-decay group).
  """
  name = str(opt_cfg.name).lower()
  if cycle_momentum is None:
    cycle_momentum = bool(opt_cfg.get("cycle_momentum", False))
  lr = one_cycle(opt_cfg, total_steps)
  b1 = one_cycle_momentum(opt_cfg, total_steps) if cycle_momentum else float(opt_cfg.b1)
  kw = dict(learning_rate=lr, b1=b1, b2=float(opt_cfg.b2),
            weight_decay=float(opt_cfg.weight_decay))
  if name == "lion":
    inner = optax.inject_hyperparams(optax.lion)(**kw) if cycle_momentum else optax.lion(**kw)
  elif name == "adamw":
    if cycle_momentum:
      raise ValueError("optimizer.cycle_momentum is implemented for lion only")
    inner = optax.adamw(**kw)
  else:
    raise ValueError(f"optimizer.name must be 'lion' or 'adamw', got {opt_cfg.name!r}")
  clip = float(opt_cfg.grad_clip_norm)
  return optax.chain(optax.clip_by_global_norm(clip), inner) if clip > 0 else inner
