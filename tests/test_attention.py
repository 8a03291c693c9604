"""vit.attention: the CPU path against the textbook softmax, and which GPU path each input takes."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import vit


def test_cpu_attention_equals_the_textbook_softmax():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 7, 3, 16))  # (B, N, H, hd), cross-attention shapes: 7 queries
  k = jax.random.normal(kk, (2, 5, 3, 16))  # ... over 5 keys
  v = jax.random.normal(kv, (2, 5, 3, 16))
  scores = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), np.asarray(k)) / np.sqrt(16)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", weights, np.asarray(v))
  np.testing.assert_allclose(np.asarray(jax.jit(vit.attention)(q, k, v)), want, rtol=2e-5,
                             atol=2e-6)
  xla = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(vit.attention(q, k, v)), np.asarray(xla), rtol=2e-5,
                             atol=2e-6)


@pytest.mark.parametrize("capability, dtype, head_dim, env, want", [
    ("9.0", jnp.bfloat16, 64, "", "cudnn"),  # H100 / H200, the ViT heads (64) ...
    ("8.0", jnp.float16, 32, "", "cudnn"),  # ... A100, the decoder heads (32)
    ("9.0", jnp.float32, 64, "", "xla"),  # cuDNN's flash kernel takes no float32
    ("9.0", jnp.bfloat16, 12, "", "xla"),  # head_dim not a multiple of 8
    ("9.0", jnp.bfloat16, 256, "", "xla"),  # head_dim over 128
    ("7.5", jnp.bfloat16, 64, "", "xla"),  # pre-Ampere
    (None, jnp.bfloat16, 64, "", "xla"),  # a GPU without CUDA compute capability (ROCm)
    ("9.0", jnp.bfloat16, 64, "xla", "xla"),  # MAE_JAX_ATTENTION=xla
])
def test_gpu_attention_implementation(monkeypatch, capability, dtype, head_dim, env, want):
  device = types.SimpleNamespace()
  if capability is not None:
    device.compute_capability = capability
  monkeypatch.setattr(jax, "devices", lambda *a, **k: [device])
  monkeypatch.setenv("MAE_JAX_ATTENTION", env)
  q = jax.ShapeDtypeStruct((2, 257, 16, head_dim), dtype)
  assert vit.gpu_attention_implementation(q) == want
