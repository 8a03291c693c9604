"""DenseNet-161, the weakly supervised baseline (mae_jax/models/densenet.py), vs torchvision."""
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mae_jax.models import densenet, mae

# tests/data/densenet161_torchvision_params.txt: torchvision.models.densenet161(num_classes=1000)
# .named_parameters() (= its state_dict without the BatchNorm buffers), in order, as "name dims";
# generated from torchvision's DenseNet definition with the stem conv's input channels 3 -> 6. Its 3-channel total is torchvision's
# 28,681,000 (DenseNet161_Weights.IMAGENET1K_V1.meta["num_params"]).
TORCHVISION_DENSENET161 = (pathlib.Path(__file__).parent / "data" /
                           "densenet161_torchvision_params.txt").read_text()
FEATURES, FEATURE_DIM = 26_486_112, 2208


def densenet161_cfg(**kw):
  return ml_collections.ConfigDict({**dict(
      channels=6, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, bn_size=4,
      num_classes=1000, image_size=256, label_smoothing=0.0), **kw})


def tiny_cfg(**kw):
  return densenet161_cfg(**{**dict(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                   num_classes=5, image_size=32), **kw})


def build(cfg, abstract=False):
  with nnx.use_eager_sharding(False):
    make = lambda: densenet.DenseNetWSL(cfg, rngs=nnx.Rngs(0))
    return nnx.eval_shape(make) if abstract else make()


def ours(name):
  """torchvision parameter name -> our NNX state path."""
  *mods, leaf = name.split(".")
  if mods == ["classifier"]:
    return ("classifier",) if leaf == "weight" else ("classifier_bias",)
  assert mods[0] == "features", name
  path = []
  for m in mods[1:]:
    if m.startswith("denseblock"):
      path += ["blocks", int(m[len("denseblock"):]) - 1]
    elif m.startswith("denselayer"):
      path.append(int(m[len("denselayer"):]) - 1)
    elif m.startswith("transition"):
      path += ["transitions", int(m[len("transition"):]) - 1]
    else:
      path.append(m)
  is_norm = "norm" in path[-1]
  path.append({"weight": "scale" if is_norm else "kernel", "bias": "bias"}[leaf])
  return tuple(path)


def torch_to_ours_shape(name, shape):
  if len(shape) == 4:  # conv OIHW -> HWIO
    o, i, kh, kw = shape
    return (kh, kw, i, o)
  if name == "classifier.weight":  # Linear (out, in) -> (in, out)
    return shape[::-1]
  return shape


def test_every_parameter_shape_is_torchvisions_and_the_counts():
  """(1) Layer for layer torchvision's DenseNet-161 (6-channel stem); (2) 26,486,112 feature
  parameters (BatchNorm scale + bias included, running statistics not) and 2,208-d features."""
  model = build(densenet161_cfg(), abstract=True)
  params = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  expected = {}
  for line in TORCHVISION_DENSENET161.strip().splitlines():
    name, dims = line.split()
    shape = tuple(int(d) for d in dims.split(","))
    expected[ours(name)] = torch_to_ours_shape(name, shape)
  assert len(expected) == 484
  assert params == expected
  # Every BatchNorm's running mean and variance (torch buffers of the norm's width) are
  # BatchStats, not Params.
  stats = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  norms = {p[:-1]: s for p, s in expected.items() if p[-1] == "scale"}
  assert stats == {n + (k,): s for n, s in norms.items() for k in ("mean", "var")}
  head = {("classifier",), ("classifier_bias",)}
  assert sum(int(np.prod(s)) for p, s in params.items() if p not in head) == FEATURES
  assert model.num_features == FEATURE_DIM
  images = jax.ShapeDtypeStruct((2, 64, 64, 6), jnp.uint8)
  assert nnx.eval_shape(lambda m, x: m.embed(x), model, images).shape == (2, FEATURE_DIM)


def test_tiny_forward_backward_loss_accuracy_and_batchnorm_modes():
  """(3) Loss = hand cross-entropy (with and without label smoothing), accuracy, gradients;
  train mode updates the running statistics (torch's momentum), eval mode and embed use them."""
  cfg = tiny_cfg(label_smoothing=0.1)
  model = build(cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, (4, 32, 32, 6)).astype(np.uint8))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  # Train-mode logits depend on the batch only (and update the running statistics of their own
  # copy): the hand cross-entropy's input, and the labels: the first two samples labelled with
  # their argmax, the other two with another class.
  train_logits = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s, copy=True).logits(x))
  logits = train_logits(params, stats, images)
  top = np.asarray(jnp.argmax(logits, -1))
  labels = np.array([top[0], top[1], (top[2] + 1) % 5, (top[3] + 2) % 5], np.int32)

  @jax.jit
  def step(params, stats, batch):
    def loss_fn(p):
      # copy: fresh BatchStat Variables at grad's trace level, which train mode may update.
      m = nnx.merge(graphdef, p, stats, copy=True)
      loss, aux = m(batch, jax.random.key(0))
      # Still in train mode: embed must use (and leave) the running statistics just updated.
      return loss, (aux, m.embed(batch["image"]), nnx.state(m, nnx.BatchStat))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (aux, emb, new_stats)), grads = step(params, stats, dict(image=images, label=labels))
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
  nll = -logp[np.arange(4), labels]
  np.testing.assert_allclose(float(aux["cross_entropy"]), nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(loss), (0.9 * nll - 0.1 * logp.mean(-1)).mean(), rtol=1e-5)
  assert float(aux["accuracy"]) == 0.5
  for path, g in nnx.to_flat_state(grads):
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path
  # Running statistics of the stem's BatchNorm: 0.9 * (0, 1) + 0.1 * the batch's (mean,
  # unbiased variance) of the conv0 output; every BatchStat moved.
  y = np.asarray(model.conv0(mae.standardize(images)), np.float64).reshape(-1, 16)
  new = nnx.merge(graphdef, params, new_stats)
  np.testing.assert_allclose(np.asarray(new.norm0.mean), 0.1 * y.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.norm0.var), 0.9 + 0.1 * y.var(0, ddof=1), rtol=1e-4)
  for (path, a), (_, b) in zip(nnx.to_flat_state(stats), nnx.to_flat_state(new_stats)):
    assert not np.allclose(np.asarray(a), np.asarray(b)), path
  # Eval mode normalises by the running statistics: the stem's output is the hand-normalised
  # one, a sample's logits no longer depend on the rest of the batch (in train mode they do),
  # and the statistics stay put.
  new.eval()
  assert all(m.use_running_average for _, m in nnx.iter_modules(new)
             if isinstance(m, densenet.BatchNorm))
  y32 = jnp.asarray(y.reshape(4, 16, 16, 16), jnp.float32)
  want = (y32 - new.norm0.mean[...]) / jnp.sqrt(new.norm0.var[...] + 1e-5)
  np.testing.assert_allclose(np.asarray(new.norm0(y32)), np.asarray(want), rtol=1e-5, atol=1e-5)
  eval_def = nnx.graphdef(new)

  @jax.jit
  def eval_logits(params, stats, x):
    m = nnx.merge(eval_def, params, stats, copy=True)
    return m.logits(x), nnx.state(m, nnx.BatchStat)

  other = images.at[1:].set(255 - images[1:])
  first, kept = eval_logits(params, new_stats, images)
  second, _ = eval_logits(params, new_stats, other)
  np.testing.assert_allclose(np.asarray(first[0]), np.asarray(second[0]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(logits[0]), train_logits(params, stats, other)[0], atol=1e-3)
  jax.tree.map(np.testing.assert_array_equal, new_stats, kept)
  # embed uses the running statistics even in train mode: the features behind the eval logits.
  assert emb.shape == (4, new.num_features)
  np.testing.assert_allclose(np.asarray(emb @ new.classifier[...] + new.classifier_bias[...]),
                             np.asarray(first), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="DenseNet"):
    new.embed(images, pooling="cls")


def test_flop_model_matches_xla_within_10_percent():
  """(4) flops_per_image against XLA's count of the compiled loss forward and embedding."""
  cfg = tiny_cfg(growth_rate=16, num_init_features=32, image_size=64, num_classes=10)
  graphdef, state = nnx.split(build(cfg, abstract=True))
  batch = dict(image=jax.ShapeDtypeStruct((1, 64, 64, 6), jnp.uint8),
               label=jax.ShapeDtypeStruct((1,), jnp.int32))
  fwd = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, None)[0])
  emb = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))
  xla = [fwd.lower(state, batch).compile().cost_analysis()["flops"],
         emb.lower(state, batch["image"]).compile().cost_analysis()["flops"]]
  flops = densenet.flops_per_image(cfg)
  assert abs(flops["train"] / 3 / xla[0] - 1) < 0.10, (flops, xla)
  assert abs(flops["embed"] / xla[1] - 1) < 0.10, (flops, xla)
