"""ViT building blocks of the MAE (Flax NNX): sin-cos tables, ParallelScalingBlock, decoder Block.

Every parameter carries logical axis names (see `configs/common.py: SHARDING_RULES`); the model
itself knows nothing of meshes. Compute runs in `dtype` (float32 or bfloat16) with float32
parameters; LayerNorms, softmax statistics and the residual stream stay float32.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

LN_EPS = 1e-6  # every LayerNorm of the official model, including qk-norm (docs/science.md §1.3)
xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def constrain(x, names):
  """Sharding constraint by logical names; a no-op outside a mesh (tests, summary, eval on 1 CPU)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spmd.apply_rules(names, spmd.get_logical_axis_rules()))


def param(rngs, init, shape, names, dtype=jnp.float32):
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def sincos_2d(width: int, grid: int, cls: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos table (grid*grid [+1 zero CLS row], width), 'ij' grid flattened row-major.

  Each quarter of the width is [sin(h w), cos(h w), sin(w w), cos(w w)] with frequencies
  w_i = 10000^(-i / (width/4)) (docs/science.md §1.4).
  """
  assert width % 4 == 0, width
  omega = 10000.0 ** (-np.arange(width // 4) / (width // 4))
  h, w = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  h, w = h.reshape(-1, 1) * omega, w.reshape(-1, 1) * omega
  table = np.concatenate([np.sin(h), np.cos(h), np.sin(w), np.cos(w)], axis=1)
  if cls:
    table = np.concatenate([np.zeros((1, width)), table])
  return table.astype(np.float32)


class LayerNorm(nnx.Module):
  """Affine LayerNorm over the last axis, computed in float32."""

  def __init__(self, dim, *, rngs, names=("norm",)):
    self.scale = param(rngs, ones, (dim,), names)
    self.bias = param(rngs, zeros, (dim,), names)

  @functools.partial(jax.named_call, name="layernorm")
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale + self.bias


@functools.partial(jax.named_call, name="gelu")
def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # the exact erf form, as timm's nn.GELU


def drop_path(x, rate, key):
  """Stochastic depth: drops the whole residual branch of a sample with probability `rate`.

  `rate` is a Python float (per-layer blocks) or a traced scalar (scanned layers: one rate per
  layer); a traced 0 keeps every sample, so the result is the same either way.
  """
  if key is None or (isinstance(rate, float) and rate == 0.0):
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def gpu_attention_implementation(q):
  """`jax.nn.dot_product_attention`'s implementation on a GPU for queries like `q`.

  'cudnn' (flash attention: the (N, N) scores never reach memory) where cuDNN's fused kernel
  takes the operands: an NVIDIA GPU of compute capability >= 8.0, bfloat16 or float16, head_dim a
  multiple of 8 up to 128. Else 'xla', which materialises the scores: a ViT-L/8 MAE step at batch
  128 then asks for ~125 GiB (measured on an H200). jax's default (implementation=None) is 'xla'.
  MAE_JAX_ATTENTION=xla forces 'xla' (docs/interfaces.md §5).
  """
  if os.environ.get("MAE_JAX_ATTENTION", "").lower() == "xla":
    return "xla"
  capability = getattr(jax.devices()[0], "compute_capability", None)  # None on ROCm
  fits = (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
          and capability is not None
          and tuple(int(c) for c in capability.split(".")[:2]) >= (8, 0))
  return "cudnn" if fits else "xla"


@functools.partial(jax.named_call, name="attention")  # named ops: bench/profile_step.py
def attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v over (B, N, H, hd) heads, stats in float32."""
  if jax.default_backend() == "gpu":
    return jax.nn.dot_product_attention(
        q, k, v, implementation=gpu_attention_implementation(q)).astype(q.dtype)
  # Train-step throughput: divide by the softmax sums AFTER the AV product, i.e. on
  # (B, N, H, hd) instead of (B, H, N, N). Same math; on XLA:CPU it takes ~38 % off attention's
  # forward + backward (ViT-S/16 MAE step: 0.55 -> 0.59 of the matmul yardstick).
  scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                      preferred_element_type=jnp.float32)
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(-1).transpose(0, 2, 1)[..., None]).astype(q.dtype)


class ParallelScalingBlock(nnx.Module):
  """timm ParallelScalingBlock as trained by Kraus et al. (docs/science.md §1.3).

  One fused input projection W_in (d, h + 3d) feeds the MLP and attention in parallel; its output
  is split [mlp_in (h) | q (d) | k (d) | v (d)]. With qkv_bias=False timm's fused bias is
  [0 (3d) || mlp_bias (h)], i.e. the trainable bias covers columns 3d .. h+3d-1: the last h-3d MLP
  columns plus q, k and v. This is reproduced exactly so timm weights port 1:1. qk-norm is a
  LayerNorm over head_dim shared across heads; ONE LayerScale multiplies the sum of both branches;
  GELU is the exact erf form.
  """

  def __init__(self, dim, heads, mlp_dim, layerscale_init, *, rngs, dtype=jnp.float32):
    self.heads, self.mlp_dim, self.dtype = heads, mlp_dim, dtype
    self.norm = LayerNorm(dim, rngs=rngs)
    self.in_proj = param(rngs, xavier, (dim, mlp_dim + 3 * dim), ("embed", "mlp"))
    self.mlp_bias = param(rngs, zeros, (mlp_dim,), ("mlp",))
    self.q_norm = LayerNorm(dim // heads, rngs=rngs)
    self.k_norm = LayerNorm(dim // heads, rngs=rngs)
    self.attn_out = param(rngs, xavier, (dim, dim), ("heads", "embed"))
    self.attn_out_bias = param(rngs, zeros, (dim,), ("norm",))
    self.mlp_out = param(rngs, xavier, (mlp_dim, dim), ("mlp", "embed"))
    self.mlp_out_bias = param(rngs, zeros, (dim,), ("norm",))
    self.gamma = param(rngs, nnx.initializers.constant(layerscale_init), (dim,), ("norm",))

  def __call__(self, x, drop_rate=0.0, key=None):
    b, n, d = x.shape
    h, dt = self.mlp_dim, self.dtype
    bias = jnp.concatenate([jnp.zeros((3 * d,), dt), self.mlp_bias[...].astype(dt)])
    z = self.norm(x).astype(dt) @ self.in_proj[...].astype(dt) + bias
    m = constrain(z[..., :h], ("batch", "length", "mlp"))
    heads = lambda t: constrain(t.reshape(b, n, self.heads, d // self.heads),
                                ("batch", "length", "heads", None))
    q = self.q_norm(heads(z[..., h:h + d])).astype(dt)
    k = self.k_norm(heads(z[..., h + d:h + 2 * d])).astype(dt)
    a = attention(q, k, heads(z[..., h + 2 * d:])).reshape(b, n, d)
    a = a @ self.attn_out[...].astype(dt) + self.attn_out_bias[...].astype(dt)
    m = gelu(m) @ self.mlp_out[...].astype(dt) + self.mlp_out_bias[...].astype(dt)
    branch = (a + m).astype(jnp.float32) * self.gamma
    return x + drop_path(branch, drop_rate, key)


class Block(nnx.Module):
  """Pre-norm transformer block of the decoder (timm Block: qkv bias, no LayerScale)."""

  def __init__(self, dim, heads, mlp_dim, *, rngs, dtype=jnp.float32):
    self.heads, self.dtype = heads, dtype
    self.norm1 = LayerNorm(dim, rngs=rngs)
    self.qkv = param(rngs, _qkv_init, (dim, 3, dim), ("embed", None, "heads"))
    self.qkv_bias = param(rngs, zeros, (3, dim), (None, "heads"))
    self.proj = param(rngs, xavier, (dim, dim), ("heads", "embed"))
    self.proj_bias = param(rngs, zeros, (dim,), ("norm",))
    self.norm2 = LayerNorm(dim, rngs=rngs)
    self.fc1 = param(rngs, xavier, (dim, mlp_dim), ("embed", "mlp"))
    self.fc1_bias = param(rngs, zeros, (mlp_dim,), ("mlp",))
    self.fc2 = param(rngs, xavier, (mlp_dim, dim), ("mlp", "embed"))
    self.fc2_bias = param(rngs, zeros, (dim,), ("norm",))

  def __call__(self, x):
    b, n, d = x.shape
    dt = self.dtype
    y = self.norm1(x).astype(dt)
    qkv = jnp.einsum("bnd,dke->bnke", y, self.qkv[...].astype(dt)) + self.qkv_bias[...].astype(dt)
    q, k, v = (qkv[:, :, i].reshape(b, n, self.heads, d // self.heads) for i in range(3))
    a = attention(q, k, v).reshape(b, n, d) @ self.proj[...].astype(dt) + self.proj_bias[...].astype(dt)
    x = x + a.astype(jnp.float32)
    y = self.norm2(x).astype(dt)
    h = gelu(y @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt))
    h = constrain(h, ("batch", "length", "mlp"))
    return x + (h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)).astype(jnp.float32)


def _qkv_init(key, shape, dtype):
  d, k, e = shape
  return xavier(key, (d, k * e), dtype).reshape(shape)


def linear(rngs, din, dout, names):
  """(kernel, bias) of a plain Linear layer with logical names."""
  return param(rngs, xavier, (din, dout), names), param(rngs, zeros, (dout,), names[1:])


@functools.partial(jax.named_call, name="patchify")
def patchify(x, p):
  """(B, H, W, C) -> (B, (H/p)(W/p), p*p*C): row-major patches, (row, col, channel) inside."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, h, w=None):
  """The inverse of patchify: (B, (H/p)(W/p), p*p*C) -> (B, H, W, C), W = H unless given.

  Only reshapes, so numpy arrays stay numpy (the demo's figures use it outside jax)."""
  w = h if w is None else w
  b, _, d = x.shape
  x = x.reshape(b, h // p, w // p, p, p, d // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, d // (p * p))
