"""MU-Net, the U-Net masked autoencoder (mae_jax/models/munet.py): sizes, loss, embeddings, FLOPs.

Training, resume, eval and compile of every kind: tests/test_model_kinds.py.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from configs import common
from mae_jax.models import flops, registry

def tiny_model_cfg(**kw):
  c = common.get_munet_config("M").model
  c.update({**dict(image_size=32, patch_size=8, base_width=8, levels=2, norm_groups=4), **kw})
  return c


def build(cfg, seed=0):
  with nnx.use_eager_sharding(False):
    return registry.build_model(cfg, seed=seed)


@pytest.mark.parametrize("size,params", [("M", 31_046_150), ("L", 124_138_502)])
def test_munet_sizes(size, params):
  """The parameter counts docs/science.md §1.9 states (4 levels, base width 64 / 128)."""
  cfg = common.get_munet_config(size).model
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: registry.build_model(cfg))
  assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))) \
      == params


def test_loss_only_on_removed_patches_and_embeddings():
  model = build(tiny_model_cfg())
  images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 6)).astype(np.uint8)
  loss, aux = model({"image": images}, jax.random.key(1))
  assert aux["pred"].shape == aux["target"].shape == (2, 16, 8 * 8 * 6)
  assert float(aux["mask"].mean()) == 0.75 and np.isfinite(float(loss))
  # Changing the pixels of a visible patch's prediction target does not move the loss; the
  # prediction of a removed patch does (the loss reads removed patches only).
  mask = np.asarray(aux["mask"])
  kept, removed = np.argwhere(mask == 0)[0], np.argwhere(mask == 1)[0]
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  base = mae.reconstruction_loss(aux["pred"], aux["target"], aux["mask"], 8, 0.01)[0]
  for (b, t), changes in ((kept, False), (removed, True)):
    pred = np.asarray(aux["pred"]).copy()
    pred[b, t] += 1.0
    moved = mae.reconstruction_loss(pred, aux["target"], aux["mask"], 8, 0.01)[0]
    assert bool(abs(float(moved) - float(base)) > 1e-4) == changes
  assert model.embed(images).shape == (2, 32)  # bottleneck = 8 * 2^2 channels
  every = build(tiny_model_cfg(embed_levels="all"))
  assert every.embed(images).shape == (2, 8 + 16 + 32)
  with pytest.raises(ValueError, match="MU-Net"):
    model.embed(images, pooling="cls")


def test_mask_ratio_zero_does_not_depend_on_the_key():
  model = build(tiny_model_cfg(mask_ratio=0.0))
  images = np.random.default_rng(1).integers(0, 255, (2, 32, 32, 6)).astype(np.uint8)
  a = model({"image": images}, jax.random.key(0), mask_ratio=0.0)[1]["pred"]
  b = model({"image": images}, jax.random.key(7), mask_ratio=0.0)[1]["pred"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flop_model_matches_xla_within_10_percent():
  cfg = tiny_model_cfg(image_size=64, base_width=16, levels=3)
  graphdef, state = nnx.split(build(cfg))
  images = jax.ShapeDtypeStruct((1, 64, 64, 6), np.uint8)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)({"image": x}, jax.random.key(0))[0])
  emb = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))
  xla = [f.lower(state, images).compile().cost_analysis()["flops"] for f in (fwd, emb)]
  ours = flops.flops_per_image(cfg)
  assert abs(ours["train"] / 3 / xla[0] - 1) < 0.10, (ours, xla)
  assert abs(ours["embed"] / xla[1] - 1) < 0.10, (ours, xla)
