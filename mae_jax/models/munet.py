"""MU-Net: the convolutional masked autoencoder of Kraus et al. (arXiv 2309.16064, §3), a U-Net.

    loss, aux = model({"image": images}, key)   # training: mask patches, reconstruct, MAE loss
    emb = model.embed(images)             # evaluation: no masking, pooled bottleneck features

The paper names MU-Net-M and -L without publishing the layers; this is the textbook U-Net
(Ronneberger et al. 2015) with the choices the field makes today (docs/science.md §1.9):
  * Masking as the ViT MAE does it (`mae.random_masking` on the patch grid); removed patches are
    blanked and a binary mask plane is concatenated to the input. Dense convolutions rather than
    SparK's sparse ones: they run at full speed on every accelerator, and the mask plane tells
    the network which zeros are missing pixels.
  * Per level two 3x3 convolutions, each GroupNorm (batch-independent, so no cross-device
    statistics) + GELU; 2x2 max-pool down, 2x2 transposed convolution up, skip connections by
    concatenation, a 1x1 head to the input channels.
  * The loss is exactly the ViT MAE's (`mae.reconstruction_loss`: masked MSE + Fourier term on
    the removed patches only), on the same self-standardised crops.
  * The embedding is the global-average-pooled bottleneck (default) or, with
    `embed_levels="all"`, the pooled features of every encoder level and the bottleneck.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mae_jax.models import mae, vit
from mae_jax.models.flops import unet_widths as level_widths
from mae_jax.models.vit import constrain, param

GN_EPS = 1e-5  # torch.nn.GroupNorm default
he = nnx.initializers.he_normal()  # fan-in scaled for GELU/ReLU convolutions


class Conv(nnx.Module):
  """k x k convolution (stride 1, same padding) or, with `transpose`, a 2x2 stride-2 upsampling."""

  def __init__(self, cin, cout, k, *, rngs, dtype, transpose=False, split=(True, True)):
    # split: whether the (input, output) channels are sharded. Not the crop's 6 (+ mask) input
    # channels nor the head's 6 outputs: they divide no mesh axis, and those kernels are tiny.
    self.dtype, self.transpose = dtype, transpose
    names = tuple(n if s else None for n, s in zip(("conv_in", "conv_out"), split))
    self.kernel = param(rngs, he, (k, k, cin, cout), (None, None) + names)
    self.bias = param(rngs, vit.zeros, (cout,), names[1:])

  def __call__(self, x):
    w = self.kernel[...].astype(self.dtype)
    dims = ("NHWC", "HWIO", "NHWC")
    if self.transpose:
      y = jax.lax.conv_transpose(x.astype(self.dtype), w, (2, 2), "VALID", dimension_numbers=dims)
    else:
      y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (1, 1), "SAME",
                                       dimension_numbers=dims)
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, channels of a group), statistics in float32."""

  def __init__(self, channels, groups, *, rngs):
    self.groups = min(groups, channels)
    self.scale = param(rngs, vit.ones, (channels,), ("conv_out",))
    self.bias = param(rngs, vit.zeros, (channels,), ("conv_out",))

  def __call__(self, x):
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + GN_EPS)
    return g.reshape(b, h, w, c) * self.scale + self.bias


class ConvBlock(nnx.Module):
  """(3x3 conv -> GroupNorm -> GELU) twice: one U-Net level."""

  def __init__(self, cin, cout, groups, *, rngs, dtype, stem=False):
    self.conv1 = Conv(cin, cout, 3, rngs=rngs, dtype=dtype, split=(not stem, True))
    self.norm1 = GroupNorm(cout, groups, rngs=rngs)
    self.conv2 = Conv(cout, cout, 3, rngs=rngs, dtype=dtype)
    self.norm2 = GroupNorm(cout, groups, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x):
    x = jax.nn.gelu(self.norm1(self.conv1(x)), approximate=False).astype(self.dtype)
    x = jax.nn.gelu(self.norm2(self.conv2(x)), approximate=False).astype(self.dtype)
    return constrain(x, ("batch", None, None, None))


def max_pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MUNet(nnx.Module):
  """U-Net masked autoencoder; `model(batch, key)` and `model.embed(images)` as `mae.MAE`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, remat=False):
    cfg = ml_collections.FrozenConfigDict(cfg)
    if cfg.image_size % (2 ** cfg.levels) or cfg.image_size % cfg.patch_size:
      raise ValueError(f"image_size {cfg.image_size} must be divisible by 2^levels "
                       f"({2 ** cfg.levels}) and by patch_size {cfg.patch_size}")
    self.cfg, self.dtype, self.remat = cfg, dtype, bool(remat)
    widths, g = level_widths(cfg), cfg.norm_groups
    ins = (cfg.channels + 1,) + widths[:-2]  # + 1: the mask plane
    self.down = nnx.List([ConvBlock(i, o, g, rngs=rngs, dtype=dtype, stem=not n)
                          for n, (i, o) in enumerate(zip(ins, widths[:-1]))])
    self.bottleneck = ConvBlock(widths[-2], widths[-1], g, rngs=rngs, dtype=dtype)
    self.up = nnx.List([Conv(widths[i + 1], widths[i], 2, rngs=rngs, dtype=dtype, transpose=True)
                        for i in reversed(range(cfg.levels))])
    self.up_blocks = nnx.List([ConvBlock(2 * widths[i], widths[i], g, rngs=rngs, dtype=dtype)
                               for i in reversed(range(cfg.levels))])
    self.head = Conv(widths[0], cfg.channels, 1, rngs=rngs, dtype=dtype, split=(True, False))

  def _run(self, blk, x):
    return nnx.remat(lambda b, y: b(y))(blk, x) if self.remat else blk(x)

  def _encode(self, x):
    """(skip features of every level, bottleneck features)."""
    skips = []
    for blk in self.down:
      x = self._run(blk, x)
      skips.append(x)
      x = max_pool(x)
    return skips, self._run(self.bottleneck, x)

  def _inputs(self, x, pixel_mask):
    return jnp.concatenate([x * (1.0 - pixel_mask), pixel_mask], axis=-1).astype(self.dtype)

  def __call__(self, batch, key, *, mask_ratio=None):
    """Training forward: (loss, aux) with aux = mse, fourier, pred, target, mask (as the MAE)."""
    cfg, p = self.cfg, self.cfg.patch_size
    x = constrain(mae.standardize(batch["image"]), ("batch", None, None, None))
    b, h, w, _ = x.shape
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    _, _, mask = mae.random_masking(key, b, (h // p) * (w // p), ratio)
    pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(b, h // p, w // p, 1), p, 1), p, 2)
    skips, y = self._encode(self._inputs(x, pixel_mask))
    for up, blk, skip in zip(self.up, self.up_blocks, reversed(skips)):
      y = self._run(blk, jnp.concatenate([up(y), skip], axis=-1))
    pred = vit.patchify(self.head(y).astype(jnp.float32), p)
    target = vit.patchify(x, p)
    loss, mse, fourier = mae.reconstruction_loss(pred, target, mask, p, cfg.fourier_weight)
    return loss, dict(mse=mse, fourier=fourier, pred=pred, target=target, mask=mask)

  def embed(self, images, *, pooling="mean", block=None):
    """Pooled features without masking: the bottleneck, or every level with `embed_levels=all`.

    `pooling` and `block` exist for the ViT's interface; a U-Net has no CLS token or blocks.
    """
    if pooling != "mean" or block is not None:
      raise ValueError("MU-Net embeddings are mean-pooled conv features (no --pooling=cls or "
                       "--block)")
    x = mae.standardize(images)
    skips, y = self._encode(self._inputs(x, jnp.zeros(x.shape[:3] + (1,), x.dtype)))
    feats = skips + [y] if self.cfg.embed_levels == "all" else [y]
    return jnp.concatenate([f.astype(jnp.float32).mean(axis=(1, 2)) for f in feats], axis=-1)

