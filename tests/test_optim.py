"""mae_jax/train/optim.py against the published update rules and the one-cycle closed form.

Lion: Chen et al. 2023 ("Symbolic Discovery of Optimization Algorithms"), as timm and docs/science.md
§2.3 write it: u = sign(b1 m + (1 - b1) g); theta <- theta - lr (u + wd theta);
m <- b2 m + (1 - b2) g. AdamW: Loshchilov & Hutter (decoupled weight decay) with bias-corrected
Adam moments, the decay scaled by the scheduled lr as in PyTorch/timm:
theta <- theta - lr (m_hat / (sqrt(v_hat) + eps) + wd theta). Gradients are first clipped to a
global norm (PyTorch clip_grad_norm_). The references are plain float64 numpy.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from mae_jax.train import optim


def opt_cfg(**kw):
  c = tiny.get_config().optimizer
  c.update(**kw)
  return c


def params0():
  """A tiny pytree shaped like the model's: a kernel, a bias and a LayerNorm scale."""
  rng = np.random.RandomState(0)
  return {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
          "norm": {"scale": 1.0 + 0.1 * rng.normal(size=(4,))}}


def grads_seq(steps):
  """Gradients whose global norm changes from step to step (so clipping matters); the norm
  scale gets none, so only weight decay moves it."""
  rng = np.random.RandomState(1)
  out = []
  for t in range(steps):
    s = 3.0 if t % 2 == 0 else 0.2
    out.append({"dense": {"kernel": s * rng.normal(size=(3, 4)), "bias": s * rng.normal(size=(4,))},
                "norm": {"scale": np.zeros(4)}})
  return out


def leaves(tree):
  return [np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]


def ref_lr(cfg, total, t):
  """One-cycle from its definition: linear from lr/div to lr over round(f T) steps, then a half
  cosine from lr to lr/div/final_div over the remaining steps."""
  peak, start = cfg.lr, cfg.lr / cfg.div_factor
  end = start / cfg.final_div_factor
  w = max(1, round(cfg.warmup_fraction * total))
  if t < w:
    return start + (peak - start) * t / w
  return end + (peak - end) * (1 + math.cos(math.pi * min(1.0, (t - w) / (total - w)))) / 2


def ref_beta1(cfg, total, t):
  """PyTorch OneCycleLR(cycle_momentum=True): cosine 0.95 -> 0.85 in warm-up, back to 0.95."""
  w = max(1, round(cfg.warmup_fraction * total))
  cos = lambda a, b, f: b + (a - b) * (1 + math.cos(math.pi * f)) / 2
  return cos(0.95, 0.85, t / w) if t < w else cos(0.85, 0.95, min(1.0, (t - w) / (total - w)))


def clip(g, max_norm):
  if max_norm <= 0:
    return g
  norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in g))
  return [v * min(1.0, max_norm / norm) for v in g]


def ref_lion(cfg, total, grads, cycle=False):
  theta, m = leaves(params0()), [np.zeros_like(v) for v in leaves(params0())]
  for t, g in enumerate(grads):
    g = clip(leaves(g), cfg.grad_clip_norm)
    lr, b1 = ref_lr(cfg, total, t), ref_beta1(cfg, total, t) if cycle else cfg.b1
    u = [np.sign(b1 * mi + (1 - b1) * gi) for mi, gi in zip(m, g)]
    theta = [th - lr * (ui + cfg.weight_decay * th) for th, ui in zip(theta, u)]
    m = [cfg.b2 * mi + (1 - cfg.b2) * gi for mi, gi in zip(m, g)]
  return theta


def ref_adamw(cfg, total, grads, eps=1e-8):
  theta = leaves(params0())
  m, v = [np.zeros_like(x) for x in theta], [np.zeros_like(x) for x in theta]
  for t, g in enumerate(grads):
    g = clip(leaves(g), cfg.grad_clip_norm)
    lr = ref_lr(cfg, total, t)
    m = [cfg.b1 * mi + (1 - cfg.b1) * gi for mi, gi in zip(m, g)]
    v = [cfg.b2 * vi + (1 - cfg.b2) * gi ** 2 for vi, gi in zip(v, g)]
    mh = [mi / (1 - cfg.b1 ** (t + 1)) for mi in m]
    vh = [vi / (1 - cfg.b2 ** (t + 1)) for vi in v]
    theta = [th - lr * (a / (np.sqrt(b) + eps) + cfg.weight_decay * th)
             for th, a, b in zip(theta, mh, vh)]
  return theta


def run(tx, grads):
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params0())
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
      *tx.update(g, s, p)))
  for g in grads:
    params, state = step(params, state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g))
  return leaves(params)


def close(got, want, rtol=2e-5, atol=2e-6):
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def differs(a, b, by=1e-4):
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b)) > by


TOTAL, STEPS = 20, 8  # warm-up = round(0.2 * 20) = 4 steps: the 8 updates span both phases


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_lion_matches_its_update_rule(clip_norm):
  cfg = opt_cfg(name="lion", lr=1e-2, weight_decay=0.5, b1=0.9, b2=0.95, warmup_fraction=0.2,
                grad_clip_norm=clip_norm)
  grads = grads_seq(STEPS)
  got = run(optim.make_optimizer(cfg, TOTAL), grads)
  close(got, ref_lion(cfg, TOTAL, grads))
  # every parameter decays, the LayerNorm scale included (no no-decay group, as the official code)
  decay = np.prod([1 - ref_lr(cfg, TOTAL, t) * 0.5 for t in range(STEPS)])
  np.testing.assert_allclose(got[-1], leaves(params0())[-1] * decay, rtol=1e-5)
  # the test can see the weight decay and the clipping it checks
  assert differs(got, ref_lion(opt_cfg(**{**cfg, "weight_decay": 0.0}), TOTAL, grads))
  if clip_norm:
    assert differs(got, ref_lion(opt_cfg(**{**cfg, "grad_clip_norm": 0.0}), TOTAL, grads))


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_adamw_matches_its_update_rule(clip_norm):
  cfg = opt_cfg(name="adamw", lr=1e-2, weight_decay=0.5, b1=0.9, b2=0.95, warmup_fraction=0.2,
                grad_clip_norm=clip_norm)
  grads = grads_seq(STEPS)
  got = run(optim.make_optimizer(cfg, TOTAL), grads)
  close(got, ref_adamw(cfg, TOTAL, grads))
  decay = np.prod([1 - ref_lr(cfg, TOTAL, t) * 0.5 for t in range(STEPS)])
  np.testing.assert_allclose(got[-1], leaves(params0())[-1] * decay, rtol=1e-5)
  assert differs(got, ref_adamw(opt_cfg(**{**cfg, "weight_decay": 0.0}), TOTAL, grads))
  if clip_norm:
    assert differs(got, ref_adamw(opt_cfg(**{**cfg, "grad_clip_norm": 0.0}), TOTAL, grads))


def test_one_cycle_values_at_named_steps():
  cfg = opt_cfg(lr=1e-4, div_factor=25.0, final_div_factor=1e4, warmup_fraction=0.1)
  total = 1000
  lr = optim.one_cycle(cfg, total)
  start, end = 1e-4 / 25, 1e-4 / 25 / 1e4
  named = {0: start,                                   # first update: lr / div_factor
           50: (start + 1e-4) / 2,                     # half-way up the linear warm-up
           100: 1e-4,                                  # end of warm-up: the peak
           550: (1e-4 + end) / 2,                      # middle of the cosine
           999: end + (1e-4 - end) * (1 + math.cos(math.pi * 899 / 900)) / 2,  # last update
           1000: end}                                  # lr / div / final_div
  for step, want in named.items():
    assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step
    assert ref_lr(cfg, total, step) == pytest.approx(want, rel=1e-12), step
  values = np.array([float(lr(t)) for t in range(total + 1)])
  assert np.all(np.diff(values[:101]) > 0) and np.all(np.diff(values[100:]) < 0)
  # float32 cos near pi: absolute error ~1e-12, i.e. 1e-8 of the peak
  np.testing.assert_allclose(values, [ref_lr(cfg, total, t) for t in range(total + 1)],
                             rtol=1e-5, atol=1e-10)


def test_cycle_momentum_beta1_and_lion_updates():
  cfg = opt_cfg(name="lion", lr=1e-2, weight_decay=0.05, b1=0.9, b2=0.95, warmup_fraction=0.2,
                grad_clip_norm=1.0, cycle_momentum=True)
  beta1 = optim.one_cycle_momentum(cfg, TOTAL)
  named = {0: 0.95, 2: 0.90, 4: 0.85, 12: 0.90, 20: 0.95}  # warm-up is steps 0..4 of 20
  for step, want in named.items():
    assert float(beta1(step)) == pytest.approx(want, abs=1e-6), step
    assert ref_beta1(cfg, TOTAL, step) == pytest.approx(want, abs=1e-12), step
  assert not bool(opt_cfg().cycle_momentum)  # off by default: beta1 stays optimizer.b1
  grads = grads_seq(STEPS)
  got = run(optim.make_optimizer(cfg, TOTAL), grads)
  close(got, ref_lion(cfg, TOTAL, grads, cycle=True))
  assert differs(got, ref_lion(cfg, TOTAL, grads, cycle=False), by=1e-6)
  # the config key and the explicit argument agree
  explicit = run(optim.make_optimizer(opt_cfg(**{**cfg, "cycle_momentum": False}), TOTAL,
                                      cycle_momentum=True), grads)
  close(explicit, got, rtol=0, atol=0)
  with pytest.raises(ValueError, match="lion only"):
    optim.make_optimizer(opt_cfg(name="adamw", cycle_momentum=True), TOTAL)
