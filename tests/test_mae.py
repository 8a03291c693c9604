"""The MAE of mae_jax/models/mae.py against the paper's definitions and plain-numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.special import erf

from configs import common, tiny
from mae_jax.models import mae, vit
from mae_jax import summary


@pytest.fixture(autouse=True)
def no_mesh():
  with nnx.use_eager_sharding(False):
    yield


def small(**model):
  c = tiny.get_config()
  c.model.update(**model)
  return c


def images(shape, dtype=np.uint8, seed=0):
  hi = np.iinfo(dtype).max
  return jnp.asarray(np.random.RandomState(seed).randint(0, hi, shape).astype(dtype))


def smooth_images(n, size=32, channels=6, seed=0):
  """Learnable crops: a few low-frequency waves per channel (white noise cannot be inpainted)."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[:size, :size] / size
  f = rng.uniform(0.5, 2.0, (n, channels, 2, 1, 1))
  ph = rng.uniform(0, 2 * np.pi, (n, channels, 1, 1))
  x = np.sin(2 * np.pi * (f[:, :, 0] * yy + f[:, :, 1] * xx) + ph)
  return jnp.asarray((127.5 * (1 + x)).transpose(0, 2, 3, 1).astype(np.uint8))


@pytest.mark.parametrize("patch,total,kept", [(16, 256, 64), (8, 1024, 256)])
def test_token_counts_after_masking(patch, total, kept):
  cfg = small(image_size=256, patch_size=patch, width=32, depth=1, mlp_dim=128, decoder_width=32)
  model = mae.build_model(cfg.model)
  seen = []
  original = model.blocks[0].__class__.__call__
  model.blocks[0].__class__.__call__ = lambda self, x, *a, **k: seen.append(x.shape) or original(self, x, *a, **k)
  try:
    _, aux = nnx.jit(lambda m, x: m({"image": x}, jax.random.key(0)))(model, images((2, 256, 256, 6)))
  finally:
    model.blocks[0].__class__.__call__ = original
  assert seen == [(2, kept + 1, 32)]  # kept patch tokens + CLS reach the encoder
  assert aux["mask"].shape == (2, total) and np.all(aux["mask"].sum(1) == total - kept)
  ids_keep, ids_restore, mask = mae.random_masking(jax.random.key(1), 3, total, 0.75)
  assert ids_keep.shape == (3, kept)
  # the kept ids are exactly the unmasked positions, and restore inverts the shuffle
  for b in range(3):
    assert set(np.asarray(ids_keep[b])) == set(np.flatnonzero(np.asarray(mask[b]) == 0))


def test_loss_zero_for_perfect_reconstruction_and_blind_to_visible_tokens():
  rng = np.random.RandomState(0)
  target = jnp.asarray(rng.normal(size=(2, 16, 8 * 8 * 6)).astype(np.float32))
  mask = jnp.asarray((rng.rand(2, 16) < 0.75).astype(np.float32))
  loss, mse, fourier = mae.reconstruction_loss(target, target, mask, 8, 0.01)
  assert float(loss) == float(mse) == float(fourier) == 0.0
  noisy = target + jnp.asarray(rng.normal(size=target.shape).astype(np.float32))
  base = mae.reconstruction_loss(noisy, target, mask, 8, 0.01)[0]
  visible_only = jnp.where(mask[..., None] == 0, noisy + 100.0, noisy)
  assert float(mae.reconstruction_loss(visible_only, target, mask, 8, 0.01)[0]) == pytest.approx(float(base))
  assert float(base) > 0.5


@pytest.mark.parametrize("p", [8, 5, 1])  # even and odd patches: the half spectrum's weights
def test_fourier_term_matches_numpy_reference(p):
  rng = np.random.RandomState(1)
  c = 6
  pred, target = rng.normal(size=(2, 2, 5, p * p * c)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], np.float32)
  _, mse, fourier = mae.reconstruction_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), p, 0.01)
  per_token = np.zeros((2, 5))
  for b in range(2):
    for t in range(5):
      for ch in range(c):  # channels are fastest inside a token: (row, col, channel)
        fp = np.abs(np.fft.fft2(pred[b, t].reshape(p, p, c)[:, :, ch]))
        ft = np.abs(np.fft.fft2(target[b, t].reshape(p, p, c)[:, :, ch]))
        per_token[b, t] += np.abs(fp - ft).mean() / c
  assert float(fourier) == pytest.approx((per_token * mask).sum() / mask.sum(), rel=1e-5)
  ref_mse = (np.square(pred - target).mean(-1) * mask).sum() / mask.sum()
  assert float(mse) == pytest.approx(ref_mse, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_standardize_per_crop_per_channel(dtype):
  x = np.asarray(images((3, 32, 32, 6), dtype)).astype(np.float64)
  x[1, ..., 2] *= 0.1  # a dim channel is standardised the same way
  x = x.astype(dtype)
  z = np.asarray(mae.standardize(jnp.asarray(x)))
  np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-4)
  std = z.std(axis=(1, 2))
  np.testing.assert_allclose(np.delete(std.ravel(), 1 * 6 + 2), 1.0, atol=1e-3)
  # InstanceNorm's eps (1e-5 on the [0, 1] scale) damps only the nearly flat channel, exactly so:
  scaled = x[1, ..., 2] / np.iinfo(dtype).max
  assert std[1, 2] == pytest.approx(np.sqrt(scaled.var() / (scaled.var() + 1e-5)), rel=1e-4)


def test_sincos_table():
  t = vit.sincos_2d(16, 4)
  assert t.shape == (17, 16) and np.all(t[0] == 0)
  # row-major 'ij' grid: token 1 is (h=0, w=1): the h quarter equals token 0's, the w quarter differs
  np.testing.assert_allclose(t[2, :8], t[1, :8])
  np.testing.assert_allclose(t[1 + 4, 8:], t[1, 8:])
  np.testing.assert_allclose(t[1, 4:8], 1.0)  # cos(0)


def test_parallel_scaling_block_matches_timm_layout():
  """A plain-numpy timm ParallelScalingBlock with the fused [mlp | q | k | v] weight and bias layout."""
  d, heads, h = 16, 2, 64
  blk = vit.ParallelScalingBlock(d, heads, h, 0.5, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  for var in (blk.mlp_bias, blk.attn_out_bias, blk.mlp_out_bias, blk.norm.bias, blk.q_norm.scale):
    var[...] = jnp.asarray(rng.normal(size=var.shape).astype(np.float32))
  x = rng.normal(size=(2, 5, d)).astype(np.float32)
  out = np.asarray(blk(jnp.asarray(x)))

  def ln(v, s, b):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6) * s + b

  p = {k: np.asarray(v[...]) for k, v in nnx.state(blk, nnx.Param).flat_state()
       for k in ["/".join(map(str, k))]}
  y = ln(x, p["norm/scale"], p["norm/bias"])
  z = y @ p["in_proj"] + np.concatenate([np.zeros(3 * d), p["mlp_bias"]])  # timm's fused bias
  m, q, k, v = z[..., :h], z[..., h:h + d], z[..., h + d:h + 2 * d], z[..., h + 2 * d:]
  split = lambda t: t.reshape(2, 5, heads, d // heads).transpose(0, 2, 1, 3)
  q = ln(split(q), p["q_norm/scale"], p["q_norm/bias"])
  k = ln(split(k), p["k_norm/scale"], p["k_norm/bias"])
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  s = np.exp(s - s.max(-1, keepdims=True))
  a = (s / s.sum(-1, keepdims=True)) @ split(v)
  a = a.transpose(0, 2, 1, 3).reshape(2, 5, d) @ p["attn_out"] + p["attn_out_bias"]
  gelu = 0.5 * m * (1 + erf(m / np.sqrt(2)))  # the exact erf GELU
  mlp = gelu @ p["mlp_out"] + p["mlp_out_bias"]
  np.testing.assert_allclose(out, x + p["gamma"] * (a + mlp), rtol=2e-4, atol=2e-5)


def test_camae_embedding_is_channel_permutation_invariant_for_any_channel_count():
  model = mae.build_model(small(channel_agnostic=True).model)
  embed = nnx.jit(lambda m, x: m.embed(x))
  for c in (1, 4, 6, 11):
    x = images((2, 32, 32, c), seed=c)
    perm = np.random.RandomState(c).permutation(c)
    e, ep = embed(model, x), embed(model, x[..., perm])
    assert e.shape == (2, 64)
    np.testing.assert_allclose(np.asarray(e), np.asarray(ep), atol=1e-5)
  loss, aux = nnx.jit(lambda m, x: m({"image": x}, jax.random.key(0)))(model, images((2, 32, 32, 4)))
  assert aux["pred"].shape == (2, 4 * 16, 64) and np.isfinite(float(loss))  # per-channel p*p tokens
  with pytest.raises(ValueError, match="at most 11"):
    model.embed(images((1, 32, 32, 12)))


def test_embed_pooling_and_blocks():
  model = mae.build_model(small().model)
  x = images((3, 32, 32, 6))
  embed = nnx.jit(lambda m, x, **kw: m.embed(x, **kw), static_argnames=("pooling", "block"))
  assert embed(model, x).shape == (3, 64)
  assert embed(model, x, pooling="cls", block=1).shape == (3, 64)
  assert not np.allclose(embed(model, x, block=1), embed(model, x, block=2))
  with pytest.raises(ValueError):
    embed(model, x, block=3)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_gradients_finite(precision):
  model = mae.build_model(small().model, dtype=mae.compute_dtype(precision))
  x = images((4, 32, 32, 6))
  grads = nnx.jit(nnx.grad(lambda m: m({"image": x}, jax.random.key(0))[0]))(model)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert all(g.dtype == jnp.float32 for g in leaves)  # parameters (and so gradients) stay fp32
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_tiny_model_loss_falls_on_fixed_data():
  cfg = small()
  model = mae.build_model(cfg.model)
  opt = nnx.Optimizer(model, optax.adamw(5e-3), wrt=nnx.Param)
  x = smooth_images(8)

  @nnx.jit
  def step(model, opt, key):
    loss, grads = nnx.value_and_grad(lambda m: m({"image": x}, key)[0])(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, jax.random.key(0))) for _ in range(40)]  # fixed data and masks
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_summary_parameter_counts_of_the_model_zoo():
  expected = {"S/16": 21.9, "B/16": 86.2, "B/8": 85.3, "L/16": 303.8, "L/8": 302.6, "G/8": 1841.7}
  for variant, millions in expected.items():
    s = summary.summarize(common.get_config(variant))
    assert abs(s["encoder_params"] / 1e6 - millions) < 0.1, (variant, s["encoder_params"])
    assert 25e6 < s["decoder_params"] < 27e6
  s = summary.summarize(common.get_config("S/16"))
  assert s["tokens"] == 256 and s["kept_tokens"] == 64
  assert s["train_gflops_per_image"] == pytest.approx(52.8, abs=0.1)  # docs/science.md §1.7
  assert s["embed_gflops_per_image"] == pytest.approx(12.4, abs=0.1)


def test_unpatchify_inverts_patchify():
  x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
  tokens = vit.patchify(jnp.asarray(x), 4)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(vit.unpatchify(np.asarray(tokens), 4, 8, 12), x)
  # Token k is the patch at (row, col) = divmod(k, W/p), its values (row, col, channel) inside.
  np.testing.assert_array_equal(np.asarray(tokens)[1, 4], x[1, 4:8, 4:8].ravel())


def _fft2_loss(pred, target, mask, p, a):
  """The loss as first written: both full fft2 spectra (the reference of the rfft2 path)."""
  b, l, f = pred.shape
  spectrum = lambda t: jnp.abs(jnp.fft.fft2(t.reshape(b, l, p, p, f // p ** 2), axes=(2, 3)))
  fourier = jnp.abs(spectrum(pred) - spectrum(target)).reshape(b, l, f).mean(-1)
  mse = jnp.square(pred - target).mean(-1)
  denom = jnp.maximum(mask.sum(), 1.0)
  return (1 - a) * (mse * mask).sum() / denom + a * (fourier * mask).sum() / denom


def test_rfft_loss_and_gradient_equal_the_full_fft():
  rng = np.random.RandomState(2)
  for p in (16, 8, 3):
    pred, target = (jnp.asarray(rng.normal(size=(2, 7, p * p * 6)), jnp.float32) for _ in "ab")
    mask = jnp.asarray(rng.randint(0, 2, (2, 7)), jnp.float32)
    new = jax.value_and_grad(lambda x: mae.reconstruction_loss(x, target, mask, p, 0.5)[0])(pred)
    ref = jax.value_and_grad(lambda x: _fft2_loss(x, target, mask, p, 0.5))(pred)
    np.testing.assert_allclose(new[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(new[1], ref[1], rtol=1e-5, atol=1e-7)


def test_embedding_compiled_without_ynnpack_fusions_is_the_same(full_compiles):
  from mae_jax.train import cpu_options  # pylint: disable=g-import-not-at-top
  cfg = tiny.get_config().model
  with nnx.use_eager_sharding(False):
    model = mae.build_model(cfg, seed=3)
  graphdef, state = nnx.split(model)
  fn = lambda s, x: nnx.merge(graphdef, s).embed(x)
  images = jnp.asarray(np.random.RandomState(0).randint(0, 255, (4, cfg.image_size, cfg.image_size,
                                                                 cfg.channels)), jnp.uint8)
  optimised = cpu_options.jit_embed(fn)
  assert "ynn_fusion" not in optimised.lower(state, images).compile().as_text()
  np.testing.assert_allclose(optimised(state, images), jax.jit(fn)(state, images), rtol=1e-5,
                             atol=1e-6)
