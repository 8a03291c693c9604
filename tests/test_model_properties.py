"""Properties of the MAE (mae_jax/models/mae.py) checked against plain-numpy definitions.

The references follow facebookresearch/mae and the maes_microscopy code as docs/science.md
§1.4-§1.6 and §3.1 describe them (Kraus et al., arXiv 2309.16064): patches in row-major order
with (row, col, channel) inside a token, fixed 2-D sin-cos positions, the CLS token first, masked
slots filled with the mask token and put back in patch order before the decoder adds positions.
Nothing on the reference side calls the model's own helpers (patchify, sincos_2d, standardize).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mae_jax.models import mae

LN_EPS = 1e-6  # every LayerNorm of the official model (timm ViT default)


@pytest.fixture(autouse=True)
def no_mesh():
  with nnx.use_eager_sharding(False):
    yield


def build(**model):
  c = tiny.get_config()
  c.model.update(**model)
  return mae.build_model(c.model, seed=3)


def images(n, seed=0, size=32, channels=6):
  return np.random.RandomState(seed).randint(0, 256, (n, size, size, channels)).astype(np.uint8)


def arr(v):
  return np.asarray(v[...], np.float64)


# --------------------------------------------------------------------------- numpy definitions

def ref_standardize(x):
  """uint8 -> /255 -> per crop, per channel mean 0 / biased std 1 (InstanceNorm2d, eps 1e-5)."""
  x = np.asarray(x, np.float64) / 255.0
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = ((x - mean) ** 2).mean(axis=(1, 2), keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5)


def ref_patches(x, p):
  """(B, H, W, C) -> (B, L, p*p*C): patches in row-major order, (row, col, channel) inside."""
  b, h, w, c = x.shape
  out = np.empty((b, (h // p) * (w // p), p * p * c))
  for r in range(h // p):
    for q in range(w // p):
      out[:, r * (w // p) + q] = x[:, r * p:(r + 1) * p, q * p:(q + 1) * p, :].reshape(b, -1)
  return out


def ref_sincos(width, grid):
  """docs/science.md §1.4: [sin(h w), cos(h w), sin(x w), cos(x w)], w_i = 10000^(-4i / width)."""
  rows = []
  for r in range(grid):
    for q in range(grid):
      omega = 10000.0 ** (-np.arange(width // 4) / (width // 4))
      rows.append(np.concatenate([np.sin(r * omega), np.cos(r * omega),
                                  np.sin(q * omega), np.cos(q * omega)]))
  return np.array(rows)


def ref_ln(x, ln):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + LN_EPS) * arr(ln.scale) + arr(ln.bias)


def zero(blocks, names, layer=None):
  """Sets parameters `names` of one layer (or all) to 0, for per-layer or scanned blocks."""
  if isinstance(blocks, nnx.List):
    for blk in (list(blocks) if layer is None else [blocks[layer]]):
      for name in names:
        v = getattr(blk, name)
        v[...] = jnp.zeros_like(v[...])
  else:  # scan_layers: one block whose parameters have a leading layer axis
    for name in names:
      v = getattr(blocks, name)
      v[...] = v[...].at[slice(None) if layer is None else layer].set(0.0)


def make_blocks_identity(model):
  """LayerScale 0 in every encoder block and zero output projections in every decoder block:
  each block then returns its input exactly, so every token is processed on its own."""
  zero(model.blocks, ["gamma"])
  zero(model.decoder_blocks, ["proj", "proj_bias", "fc2", "fc2_bias"])


def randomise(model, seed=0):
  """Non-trivial norms, biases and tokens, so a mix-up of any of them shows."""
  rng = np.random.RandomState(seed)
  for v in (model.norm.bias, model.decoder_norm.bias, model.decoder_embed_bias,
            model.decoder_pred_bias, model.patch_bias, model.mask_token, model.cls_token):
    v[...] = jnp.asarray(rng.normal(0.0, 0.5, v[...].shape), jnp.float32)
  for v in (model.norm.scale, model.decoder_norm.scale):
    v[...] = jnp.asarray(rng.uniform(0.5, 1.5, v[...].shape), jnp.float32)


def ref_encoder_tokens(model, x):
  """Patch tokens after the (identity) encoder blocks and the final LayerNorm, patch order."""
  p, d = model.cfg.patch_size, model.cfg.width
  tok = ref_patches(ref_standardize(x), p) @ arr(model.patch_embed).reshape(-1, d)
  tok = tok + arr(model.patch_bias) + ref_sincos(d, model.cfg.image_size // p)
  return ref_ln(tok, model.norm)


def ref_identity_prediction(model, x, mask):
  """Per-token prediction with identity blocks: a visible patch is decoded from its own encoder
  token, a removed one from the mask token, each plus the decoder position of ITS patch."""
  dd = model.cfg.decoder_width
  vis = ref_encoder_tokens(model, x) @ arr(model.decoder_embed) + arr(model.decoder_embed_bias)
  filled = np.where(np.asarray(mask)[..., None] == 1, arr(model.mask_token)[0], vis)
  y = ref_ln(filled + ref_sincos(dd, model.cfg.image_size // model.cfg.patch_size),
             model.decoder_norm)
  return y @ arr(model.decoder_pred) + arr(model.decoder_pred_bias)


# Per-layer blocks and scanned (stacked) blocks must behave the same.
SCAN = pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
forward = nnx.jit(lambda m, x, key, ratio: m({"image": x}, key, mask_ratio=ratio), static_argnums=3)
embed = nnx.jit(lambda m, x, **kw: m.embed(x, **kw), static_argnames=("pooling", "block"))


# ------------------------------------------------------------------------------------ tests

def test_decoder_puts_every_prediction_on_its_own_patch():
  """With identity blocks a token's prediction depends only on its patch and position, so the
  model's output must equal the per-patch reference at every position for any mask. Without the
  unshuffle by ids_restore the decoder would add patch j's position to whichever token was
  shuffled into slot j."""
  model = build(drop_path=0.0)
  make_blocks_identity(model)
  randomise(model)
  x = images(3, seed=1)
  for seed in (0, 1):
    _, aux = forward(model, jnp.asarray(x), jax.random.key(seed), 0.75)
    mask = np.asarray(aux["mask"])
    assert mask.shape == (3, 16) and np.all(mask.sum(1) == 12)  # 1 = removed
    want = ref_identity_prediction(model, x, mask)
    np.testing.assert_allclose(np.asarray(aux["pred"]), want, rtol=1e-4, atol=1e-4)
    # the target is the standardised image's own patches, in the same order
    np.testing.assert_allclose(np.asarray(aux["target"]), ref_patches(ref_standardize(x), 8),
                               rtol=1e-5, atol=1e-5)


def test_prediction_depends_on_a_patchs_own_visibility_only():
  """Identity blocks: a patch visible under two different masks gets the same prediction, and so
  does a patch removed under both (mask token + its position); one visible under one mask and
  removed under the other does not."""
  model = build(drop_path=0.0)
  make_blocks_identity(model)
  randomise(model, seed=1)
  x = jnp.asarray(images(6, seed=2))
  _, a = forward(model, x, jax.random.key(10), 0.75)
  _, b = forward(model, x, jax.random.key(11), 0.75)
  ma, mb = np.asarray(a["mask"]), np.asarray(b["mask"])
  pa, pb = np.asarray(a["pred"]), np.asarray(b["pred"])
  same = ma == mb
  assert ((ma == 0) & same).sum() >= 3 and (~same).sum() >= 3
  np.testing.assert_allclose(pa[same], pb[same], rtol=1e-5, atol=1e-5)
  assert np.abs(pa[~same] - pb[~same]).max(axis=-1).min() > 1e-3


def test_mask_ratio_zero_prediction_does_not_depend_on_the_key():
  """mask_ratio 0 keeps every token; the key only shuffles them and the encoder (attention) is
  permutation-equivariant, so after the unshuffle the prediction is key-independent. The loss
  averages over removed tokens only, so with none removed it is 0."""
  model = build(drop_path=0.0)  # stochastic depth would use the key for real
  x = jnp.asarray(images(2, seed=3))
  preds = []
  for seed in (0, 1, 2):
    loss, aux = forward(model, x, jax.random.key(seed), 0.0)
    assert float(loss) == 0.0 and not np.asarray(aux["mask"]).any()
    preds.append(np.asarray(aux["pred"]))
  assert np.abs(preds[0]).max() > 0.1
  for p in preds[1:]:
    np.testing.assert_allclose(p, preds[0], rtol=1e-4, atol=1e-5)


def test_embedding_pooling_from_definitions():
  """Identity blocks: the encoder output is LN(patch token + position) per patch and LN(CLS);
  mean pooling is the mean over the patch tokens only (not the CLS), CLS pooling is token 0."""
  model = build(drop_path=0.0)
  make_blocks_identity(model)
  randomise(model, seed=2)
  x = images(3, seed=4)
  tokens = ref_encoder_tokens(model, x)
  cls = ref_ln(arr(model.cls_token)[0, 0], model.norm)
  np.testing.assert_allclose(np.asarray(embed(model, jnp.asarray(x))), tokens.mean(1),
                             rtol=1e-4, atol=1e-5)
  got_cls = np.asarray(embed(model, jnp.asarray(x), pooling="cls"))
  np.testing.assert_allclose(got_cls, np.broadcast_to(cls, got_cls.shape), rtol=1e-4, atol=1e-5)
  with_cls = (tokens.sum(1) + cls) / (tokens.shape[1] + 1)
  assert np.abs(with_cls - tokens.mean(1)).max() > 1e-2  # the check above can tell them apart


@SCAN
def test_block_depth_is_the_default_and_earlier_blocks_are_unnormed(scan):
  """block=depth is the default (last block + final LayerNorm); block=k < depth is block k's raw
  output. With block 2 of 2 made the identity, the final output is LN(block 1's output)."""
  model = build(drop_path=0.0, scan_layers=scan)
  randomise(model, seed=3)
  x = jnp.asarray(images(3, seed=5))
  for pooling in ("mean", "cls"):
    np.testing.assert_array_equal(np.asarray(embed(model, x, pooling=pooling, block=2)),
                                  np.asarray(embed(model, x, pooling=pooling)))
  zero(model.blocks, ["gamma"], layer=1)
  raw_cls = np.asarray(embed(model, x, pooling="cls", block=1), np.float64)
  np.testing.assert_allclose(np.asarray(embed(model, x, pooling="cls")),
                             ref_ln(raw_cls, model.norm), rtol=1e-4, atol=1e-5)
  assert np.abs(ref_ln(raw_cls, model.norm) - raw_cls).max() > 0.1  # block 1 is not normed
