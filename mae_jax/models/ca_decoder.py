"""The official CA-MAE decoder (maes_microscopy `mae_modules.CAMAEDecoder`), `model.decoder="official_ca"`.

    y = CAMAEDecoder(cfg, rngs=rngs)(tokens, channels)   # (B, 1 + C*n, D) in and out, CLS first

The input is the decoder-width token sequence after the mask tokens are put back in patch order
(CLS first, then channel-major patches, n = grid² per channel). As the official module does:

1. add the fixed 2-D sin-cos table tiled over the channels (zero for CLS) and a learned modality
   token per channel (the CLS gets the all-zero `placeholder`, which is no parameter here);
2. ONE shared cross-attention (8 heads, q and kv without bias, as maes' `CrossAttention`):
   queries = `query_norm` of one channel's tokens, keys/values = `context_norm` of ALL channels'
   tokens (CLS excluded); its output replaces the tokens (no residual), then a shared timm Mlp
   with a residual: a + Mlp(out_norm(a));
3. per channel its own stack of `decoder_depth` timm Blocks (qkv bias, MLP x4); no final
   LayerNorm ("we decided to drop the last layer norm");
4. the channels' tokens are concatenated back in channel-major order behind the unchanged CLS.

Every query attends to the same context with the same weights, so step 2 for all channels at once
is one attention of the C*n tokens over themselves; the per-channel stacks run as one nnx.vmap
over the channel axis (parameters stacked on a leading axis of `model.channels`, logical name
"layers", i.e. unsharded). With fewer input channels than `model.channels` the first stacks and
modality tokens are used (the official module is hard-wired to its `num_modalities`).
docs/science.md §1.5.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models import vit
from mae_jax.models.vit import param

CROSS_HEADS = 8  # maes CrossAttention's default; CAMAEDecoder does not pass num_heads to it
STACK = "layers"  # logical name of the per-channel stack axis (configs/common.py: unsplit)


class LayerNorm(vit.LayerNorm):
  """vit.LayerNorm with the decoder's eps (maes default 1e-6; OpenPhenom passes nn.LayerNorm, 1e-5)."""

  def __init__(self, dim, eps, *, rngs):
    super().__init__(dim, rngs=rngs)
    self.eps = float(eps)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale + self.bias


class CAMAEDecoder(nnx.Module):
  """maes CAMAEDecoder: shared cross-attention into all channels, one Block stack per channel."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d, self.dtype = cfg.decoder_width, dtype
    self.channels, self.eps = cfg.channels, float(cfg.get("decoder_norm_eps", vit.LN_EPS))
    if d % CROSS_HEADS or d % cfg.decoder_heads:
      raise ValueError(f"model.decoder='official_ca': decoder_width={d} must be divisible by the "
                       f"{CROSS_HEADS} cross-attention heads and decoder_heads={cfg.decoder_heads}")
    self.mask_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, d), (None, None, "embed"))
    self.modality_tokens = param(rngs, vit.zeros, (cfg.channels, d), (None, "embed"))
    self.q = param(rngs, vit.xavier, (d, d), ("embed", "heads"))
    self.kv = param(rngs, _kv_init, (d, 2, d), ("embed", None, "heads"))
    self.proj, self.proj_bias = vit.linear(rngs, d, d, ("heads", "embed"))
    self.fc1, self.fc1_bias = vit.linear(rngs, d, 4 * d, ("embed", "mlp"))
    self.fc2, self.fc2_bias = vit.linear(rngs, 4 * d, d, ("mlp", "embed"))
    self.context_norm = LayerNorm(d, self.eps, rngs=rngs)
    self.query_norm = LayerNorm(d, self.eps, rngs=rngs)
    self.out_norm = LayerNorm(d, self.eps, rngs=rngs)

    def block(r):  # a timm Block with this decoder's LayerNorm eps
      b = vit.Block(d, cfg.decoder_heads, 4 * d, rngs=r, dtype=dtype)
      b.norm1, b.norm2 = LayerNorm(d, self.eps, rngs=r), LayerNorm(d, self.eps, rngs=r)
      return b

    # decoders[i]: block i of every channel's stack, stacked on a leading channel axis
    stacked = nnx.vmap(block, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: STACK})
    self.decoders = nnx.List([nnx.split_rngs(splits=cfg.channels)(stacked)(rngs)
                            for _ in range(cfg.decoder_depth)])

  def _linear(self, x, w, b=None):
    y = x.astype(self.dtype) @ w[...].astype(self.dtype)
    return y if b is None else y + b[...].astype(self.dtype)

  def __call__(self, x, channels):
    """(B, 1 + channels*n, D) float32 tokens (CLS first) -> the same shape, float32."""
    b, length, d = x.shape
    if channels > self.channels:
      raise ValueError(f"model.decoder='official_ca' has {self.channels} channel decoders "
                       f"(model.channels), got {channels} channels")
    n = (length - 1) // channels
    grid = int(round(n ** 0.5))
    pos = np.tile(vit.sincos_2d(d, grid, cls=False), (channels, 1))
    cls, x = x[:, :1], x[:, 1:] + pos + jnp.repeat(self.modality_tokens[...][:channels], n, axis=0)
    heads = lambda t: t.reshape(b, -1, CROSS_HEADS, d // CROSS_HEADS)
    q = heads(self._linear(self.query_norm(x), self.q))
    kv = jnp.einsum("bnd,dke->bnke", self.context_norm(x).astype(self.dtype),
                    self.kv[...].astype(self.dtype))
    a = vit.attention(q, heads(kv[:, :, 0]), heads(kv[:, :, 1])).reshape(b, -1, d)
    a = self._linear(a, self.proj, self.proj_bias).astype(jnp.float32)
    h = jax.nn.gelu(self._linear(self.out_norm(a), self.fc1, self.fc1_bias), approximate=False)
    a = a + self._linear(h, self.fc2, self.fc2_bias).astype(jnp.float32)
    y = a.reshape(b, channels, n, d)
    for layer in self.decoders:
      if channels < self.channels:  # the first `channels` stacks
        graphdef, state = nnx.split(layer)
        layer = nnx.merge(graphdef, jax.tree.map(lambda t: t[:channels], state))
      y = nnx.vmap(lambda blk, t: blk(t), in_axes=(0, 1), out_axes=1)(layer, y)
    return jnp.concatenate([cls, y.reshape(b, channels * n, d)], axis=1)  # CLS + 0 + placeholder 0


def _kv_init(key, shape, dtype):
  d, k, e = shape  # xavier-uniform on the (d, 2d) matrix, as the MAE recipe's Linear init
  return vit.xavier(key, (d, k * e), dtype).reshape(shape)
