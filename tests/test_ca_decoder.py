"""The official CA-MAE decoder (model.decoder="official_ca", maes CAMAEDecoder; docs/science.md §1.5):
its size at ViT-S/16, its FLOPs, fewer channels, config errors, and the sharded train step on
the 8 fake CPU devices. Its numbers against PyTorch are in tests/test_weights.py."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import camae_vits16, tiny
from mae_jax import summary
from mae_jax.models import flops, mae
from mae_jax.train import sharding, step


def small(**model):
  c = tiny.get_config()
  c.model.update(dict(channel_agnostic=True, decoder="official_ca", decoder_width=16,
                      decoder_depth=2, decoder_heads=2), **model)
  return c


def test_camae_vits16_has_the_official_decoder_of_10_4_million_parameters():
  s = summary.summarize(camae_vits16.get_config())
  # 6 channels x 2 Blocks (256 wide) 9,477,120 + cross-attention 262,400 + Mlp 525,568 + 3 norms
  # 1,536 + mask token 256 + 6 modality tokens 1,536 + encoder_decoder_proj 98,560 +
  # decoder_pred 65,792; maes' placeholder (256, requires_grad=False) is no parameter here
  assert s["decoder_params"] == 10_432_768
  assert s["encoder_params"] == pytest.approx(21.4e6, abs=0.1e6)


def test_flops_count_the_official_decoder():
  m = camae_vits16.get_config().model
  n, keep, c, d, p = 1536, 384, 6, 256, 16  # tokens of 6 channels x 256 patches
  block = lambda t: 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 2 * t * d * 4 * d * 2
  cross = 2 * n * d * d * 4 + 4 * n * n * d + 2 * n * d * 4 * d * 2  # q, kv (2), proj; Mlp
  decoder = 2 * (keep + 1) * 384 * d + cross + c * 2 * block(256) + 2 * (n + 1) * d * p * p
  f = flops.flops_per_image(m)
  encoder = f["train"] / 3 - decoder
  assert encoder == pytest.approx(2 * n * p * p * 384 + 12 * (
      2 * (keep + 1) * 384 * (1536 + 3 * 384) + 4 * (keep + 1) ** 2 * 384
      + 2 * (keep + 1) * 384 * 384 + 2 * (keep + 1) * 1536 * 384), rel=1e-9)
  assert f["train"] / 1e9 == pytest.approx(90.4, abs=0.05)  # the shared 512 x 8: 408.0


def test_fewer_channels_use_the_first_decoders_and_config_errors():
  cfg = small().model
  with nnx.use_eager_sharding(False):
    model = mae.build_model(cfg)
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 6), dtype=np.uint8)
  key = jax.random.key(1)
  forward = nnx.jit(lambda m, images: m({"image": images}, key))  # eager NNX ops are slow
  loss4, aux4 = forward(model, x[..., :4])
  assert aux4["pred"].shape == (2, 4 * 16, 64) and np.isfinite(float(loss4))
  # the 4-channel decode equals the 6-channel model with stacks/tokens 4 and 5 removed
  cut = small(channels=4).model
  with nnx.use_eager_sharding(False):
    smaller = mae.build_model(cut)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state["decoder"]["modality_tokens"] = state["decoder"]["modality_tokens"][:4]
  state["decoder"]["decoders"] = jax.tree.map(lambda a: a[:4], state["decoder"]["decoders"])
  nnx.update(smaller, state)
  again, _ = forward(smaller, x[..., :4])
  np.testing.assert_allclose(float(again), float(loss4), rtol=1e-6)
  with pytest.raises(ValueError, match="6 channel decoders"):
    model._decode(jnp.zeros((1, 2, 64)), jnp.zeros((1, 7 * 16), jnp.int32), 7)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="needs model.channel_agnostic=True"):
    mae.build_model(small(channel_agnostic=False).model)
  with pytest.raises(ValueError, match="expected one of shared, official_ca"):
    mae.build_model(small(decoder="camae").model)


def test_official_ca_parameters_are_sharded_and_the_step_compiles(devices):
  """camae_vits16 itself: every new parameter has logical names the rules map (fsdp x tensor),
  and the sharded train step lowers; a small official_ca config compiles on data x fsdp x tensor."""
  config = camae_vits16.get_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  _, _, abstract, _ = step.build_state(config, mesh)
  dec = abstract["model"]["decoder"]
  assert dec["q"].sharding.spec == P("fsdp", "tensor")
  assert dec["kv"].sharding.spec == P("fsdp", None, "tensor")
  assert dec["fc2"].sharding.spec == P("tensor", "fsdp")
  qkv = dec["decoders"][1]["qkv"]  # (channels, d, 3, d): the channel axis unsplit
  assert qkv.shape == (6, 256, 3, 256) and qkv.sharding.spec == P(None, "fsdp", None, "tensor")
  assert dec["modality_tokens"].sharding.spec == P(None, "fsdp")
  small_cfg = small(decoder_depth=1)
  small_cfg.update(batch_size=8)
  small_cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(small_cfg.mesh)
  graphdef, tx, abstract, _ = step.build_state(small_cfg, mesh)
  lowered = step.lower_train_step(graphdef, tx, small_cfg, mesh, abstract)
  start = time.perf_counter()
  # as tests/test_compile.py: XLA's optimisation passes are not what is checked, and cost seconds
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    compiled = lowered.compile()
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  assert compiled.memory_analysis() is not None
  print(f"official_ca tiny step compiled in {time.perf_counter() - start:.1f} s")
