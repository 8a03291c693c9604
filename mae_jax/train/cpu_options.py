"""XLA:CPU compile options of the embedding pass, chosen by measurement (bench/embed.py).

jaxlib 0.10's XLA:CPU hands LayerNorm + matmul and softmax + matmul fusions to YNNPACK, which
runs the ViT encoder's forward about 1.5x slower than XLA's own dot emitter on our shapes
(ViT-S/16, batch 32, 2 cores: 6.5 -> 9.7 crops/s; bench/profile_step.py shows the fused
`ynn_fusion` ops). The train step is indifferent to it (9.38 vs 9.43 s per step), and plain large
matmuls are faster with YNNPACK, so only the embedding jits turn it off. Other backends, and a
jaxlib without the option, compile as usual.
"""
import functools

import jax

EMBED_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK library fusions


@functools.cache
def _accepted() -> bool:
  """Whether this jaxlib knows the options (a newer one may rename them)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=EMBED_OPTIONS).lower(1.0).compile()
    return True
  except Exception:  # pylint: disable=broad-except  # XlaRuntimeError / ValueError by version
    return False


def jit_embed(fn, **kwargs):
  """jax.jit(fn) of an embedding pass, with EMBED_OPTIONS on CPU."""
  if jax.default_backend() == "cpu" and _accepted():
    kwargs["compiler_options"] = EMBED_OPTIONS
  return jax.jit(fn, **kwargs)
