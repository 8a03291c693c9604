"""The masked autoencoder of Kraus et al. (arXiv 2309.16064) in one file, after facebookresearch/mae.

    loss, aux = model({"image": images}, key)   # training: mask, encode, decode, loss
    emb = model.embed(images)               # evaluation: no masking, mean of patch tokens

`images` are raw uint8/uint16 crops (B, H, W, C). Each crop is self-standardised per channel
(instance norm, eps 1e-5) and the reconstruction target is the standardised image (docs/science.md §2.1).
The loss is (1 - a) masked MSE + a Fourier-magnitude L1, a = 0.01 (§2.2), averaged over the removed
tokens only. `channel_agnostic=True` gives CA-MAE (§1.4): one shared 1-channel patch embedding,
channel-major tokens, any channel count <= max_channels, every (channel, patch) token masked and
decoded on its own; its decoder is `model.decoder`: "shared" (one stack with channel tokens) or
"official_ca" (maes CAMAEDecoder, mae_jax/models/ca_decoder.py; docs/science.md §1.5).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mae_jax.models import ca_decoder, vit
from mae_jax.models.vit import constrain, param

DECODERS = ("shared", "official_ca")  # model.decoder (docs/science.md §1.5)
IN_EPS = 1e-5  # InstanceNorm2d default (biased variance)
LAYERS = "layers"  # logical name of the stacked-layer axis of scanned blocks
# lax.scan's unroll per block stack ("blocks", "decoder_blocks"), default 1. XLA's cost analysis
# counts a loop body once; bench/compile_time.py unrolls 2 to measure one layer's FLOPs.
SCAN_UNROLL = {}
ACT = ("batch", "length", "act_embed")  # logical axes of the residual stream between blocks


def standardize(images):
  """Per-crop, per-channel standardisation of raw pixels to float32 (mean 0, std 1)."""
  x = images.astype(jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / float(jnp.iinfo(images.dtype).max)  # the official /255 (scale of 16-bit alike)
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + IN_EPS)


@functools.partial(jax.named_call, name="masking")
def random_masking(key, batch, length, mask_ratio):
  """Per-sample random masking by argsort of uniform noise (facebookresearch/mae).

  Returns (ids_keep (B, keep), ids_restore (B, L), mask (B, L) with 1 = removed).
  """
  keep = int(length * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(jax.random.uniform(key, (batch, length)), axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.take_along_axis((jnp.arange(length) >= keep).astype(jnp.float32)[None].repeat(batch, 0),
                             ids_restore, axis=1)
  return ids_shuffle[:, :keep], ids_restore, mask


@functools.partial(jax.named_call, name="reconstruction_loss")
def reconstruction_loss(pred, target, mask, patch, fourier_weight):
  """(1 - a) MSE + a |FFT2| L1 per token, each a mean over the removed tokens.

  Tokens are (B, L, p*p*C) with channels fastest; the Fourier term is a 2-D FFT of every p x p
  channel patch (the sensible reading of the official view-based code, docs/science.md §2.2).
  """
  mse = jnp.square(pred - target).mean(-1)
  b, l, f = pred.shape
  # The patches are real, so |FFT2| is mirror-symmetric, |X[u, v]| = |X[-u, -v]|: the half
  # spectrum of rfft2 holds every value, columns 1 .. p/2 - 1 standing for two (half the FFT
  # work; equal to the full fft2 mean up to float rounding, tests/test_mae.py).
  spectrum = lambda t: jnp.abs(jnp.fft.rfft2(t.reshape(b, l, patch, patch, f // patch ** 2),
                                             axes=(2, 3)))
  twice = np.full(patch // 2 + 1, 2.0, np.float32)
  twice[0] = 1.0
  if patch % 2 == 0:
    twice[-1] = 1.0  # column p/2 is its own mirror
  fourier = (jnp.abs(spectrum(pred) - spectrum(target)) * twice[:, None]).sum((2, 3, 4)) / f
  denom = jnp.maximum(mask.sum(), 1.0)
  mse, fourier = (mse * mask).sum() / denom, (fourier * mask).sum() / denom
  return (1 - fourier_weight) * mse + fourier_weight * fourier, mse, fourier


class MAE(nnx.Module):
  """ViT MAE encoder (ParallelScalingBlocks) + 512x8 decoder; CA-MAE by `channel_agnostic`
  (with the official CAMAEDecoder by `decoder="official_ca"`)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, remat=False):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it is part of the static graphdef
    self.cfg, self.dtype = cfg, dtype
    self.remat = bool(remat)  # recompute each block in the backward pass (see _block)
    p, d, dd = cfg.patch_size, cfg.width, cfg.decoder_width
    self.grid = cfg.image_size // p
    self.ca = bool(cfg.channel_agnostic)
    kind = cfg.get("decoder", "shared")
    if kind not in DECODERS:
      raise ValueError(f"model.decoder={kind!r}: expected one of {', '.join(DECODERS)}")
    if kind == "official_ca" and not self.ca:
      raise ValueError("model.decoder='official_ca' is the CA-MAE decoder: it needs "
                       "model.channel_agnostic=True")
    self.official_ca = kind == "official_ca"
    in_ch = 1 if self.ca else cfg.channels
    # Patch embedding = Conv(k = s = p) written as a matmul over patchified pixels.
    self.patch_embed = param(rngs, _patch_init, (p, p, in_ch, d), (None, None, None, "embed"))
    self.patch_bias = param(rngs, vit.zeros, (d,), ("norm",))
    self.cls_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, d), (None, None, "embed"))
    rates = np.linspace(0.0, cfg.drop_path, cfg.depth).tolist()
    self.drop_rates = tuple(rates)
    # scan_layers: every block's parameters stacked on a leading "layers" axis, run by one
    # lax.scan (MaxText's scan_layers, big_vision's Encoder(scan=True)): one block to compile.
    # A config without the key (a run from before scanned layers) means per-layer blocks.
    self.scan = bool(cfg.get("scan_layers", False))
    self.blocks = self._stack(lambda r: vit.ParallelScalingBlock(
        d, cfg.num_heads, cfg.mlp_dim, cfg.layerscale_init, rngs=r, dtype=dtype), cfg.depth, rngs)
    self.norm = vit.LayerNorm(d, rngs=rngs)
    self.decoder_embed, self.decoder_embed_bias = vit.linear(rngs, d, dd, ("embed", "mlp"))
    if self.official_ca:  # maes CAMAEDecoder: mask token, modality tokens, per-channel stacks
      self.decoder = ca_decoder.CAMAEDecoder(cfg, rngs=rngs, dtype=dtype)
    else:
      self.mask_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, dd), (None, None, "mlp"))
      if self.ca:  # a learned modality token per channel tells the decoder which channel to paint
        self.channel_token = param(rngs, vit.zeros, (cfg.max_channels, dd), (None, "mlp"))
      self.decoder_blocks = self._stack(lambda r: vit.Block(dd, cfg.decoder_heads, 4 * dd, rngs=r,
                                                            dtype=dtype), cfg.decoder_depth, rngs)
      self.decoder_norm = vit.LayerNorm(dd, rngs=rngs)
    out = p * p * in_ch
    self.decoder_pred, self.decoder_pred_bias = vit.linear(rngs, dd, out, ("mlp", None))

  # -- tokens -------------------------------------------------------------------------------------
  def _tokens(self, x):
    """Standardised (B, H, W, C) -> (patch tokens + positions (B, L, d), pixel targets (B, L, F))."""
    p, c = self.cfg.patch_size, x.shape[-1]
    if self.ca:  # channel-major: all patches of channel 0, then channel 1, ...
      if c > self.cfg.max_channels:
        raise ValueError(f"CA-MAE takes at most {self.cfg.max_channels} channels, got {c}")
      x = jnp.moveaxis(x, -1, 1).reshape(-1, x.shape[1], x.shape[2], 1)
    elif c != self.cfg.channels:
      raise ValueError(f"model expects {self.cfg.channels} channels, got {c}")
    target = vit.patchify(x, p)
    grid = x.shape[1] // p
    if self.ca:
      target = target.reshape(-1, c * grid * grid, p * p)
    w = self.patch_embed[...].reshape(-1, self.cfg.width).astype(self.dtype)
    tokens = target.astype(self.dtype) @ w + self.patch_bias[...].astype(self.dtype)
    pos = vit.sincos_2d(self.cfg.width, grid, cls=False)
    pos = np.tile(pos, (c, 1)) if self.ca else pos
    return tokens.astype(jnp.float32) + pos, target, c

  def _encode(self, tokens, key=None, drop_key=None, upto=None):
    b = tokens.shape[0]
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.cfg.width))  # CLS position is zero
    x = constrain(jnp.concatenate([cls, tokens], axis=1), ("batch", "length", "act_embed"))
    if drop_key is None or not any(self.drop_rates):  # no stochastic depth: no per-layer inputs
      return self._run("blocks", x, upto=upto)
    keys = jax.random.split(drop_key, self.cfg.depth)
    if self.scan:  # rates and keys are scanned inputs, one row per layer
      return self._run("blocks", x, jnp.asarray(self.drop_rates, jnp.float32), keys, upto=upto)
    return self._run("blocks", x, self.drop_rates, keys, upto=upto)

  def _decode(self, x, ids_restore, channels):
    dt = self.dtype
    x = x.astype(dt) @ self.decoder_embed[...].astype(dt) + self.decoder_embed_bias[...].astype(dt)
    b, l = ids_restore.shape
    mask_token = (self.decoder if self.official_ca else self).mask_token
    fill = jnp.broadcast_to(mask_token[...].astype(dt), (b, l + 1 - x.shape[1], x.shape[2]))
    y = jnp.concatenate([x[:, 1:], fill], axis=1)
    with jax.named_scope("masking"):
      y = jnp.take_along_axis(y, ids_restore[..., None], axis=1)  # unshuffle to patch order
    if self.official_ca:  # positions and modality tokens are added inside; no final LayerNorm
      y = self.decoder(jnp.concatenate([x[:, :1], y], axis=1).astype(jnp.float32), channels)
      pred = y.astype(dt) @ self.decoder_pred[...].astype(dt) + self.decoder_pred_bias[...].astype(dt)
      return pred[:, 1:].astype(jnp.float32)
    grid = self.grid if not self.ca else int(round((l // channels) ** 0.5))
    pos = vit.sincos_2d(self.cfg.decoder_width, grid, cls=False)
    if self.ca:
      pos = np.tile(pos, (channels, 1)) + jnp.repeat(self.channel_token[...][:channels], grid * grid, 0)
    y = jnp.concatenate([x[:, :1], y], axis=1).astype(jnp.float32)
    y = y + jnp.concatenate([jnp.zeros((1, y.shape[-1])), pos])[None]
    y = self._run("decoder_blocks", y)
    y = self.decoder_norm(y).astype(dt)
    pred = y @ self.decoder_pred[...].astype(dt) + self.decoder_pred_bias[...].astype(dt)
    return pred[:, 1:].astype(jnp.float32)

  def _stack(self, make, n, rngs):
    """n blocks `make(rngs)`: an nnx.List, or with `scan` one block of stacked parameters.

    nnx.vmap over split rngs gives each layer its own initialisation and prepends the logical
    axis "layers" to every parameter's names (configs/common.py maps it to no mesh axis).
    """
    if not self.scan:
      return nnx.List([make(rngs) for _ in range(n)])
    create = nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    return nnx.split_rngs(splits=n)(create)(rngs)

  def _run(self, name, x, *per_layer, upto=None):
    """x through the blocks `name` up to `upto`; `per_layer`: one entry per layer (rate, key)."""
    blocks = getattr(self, name)
    if not self.scan:
      for i, blk in enumerate(list(blocks)[:upto]):
        x = self._block(blk, x, *(a[i] for a in per_layer))
      return x
    if upto is not None:  # an intermediate block (embed): scan over the first `upto` layers only
      graphdef, state = nnx.split(blocks)
      blocks = nnx.merge(graphdef, jax.tree.map(lambda a: a[:upto], state))
      per_layer = tuple(a[:upto] for a in per_layer)
    # XLA cannot fuse a loop body's intermediate values away across the loop boundary as it does
    # in an unrolled step, so without remat the scan keeps only the matmul outputs (dots_saveable:
    # the backward recomputes LayerNorms, casts, softmax and GELU; same matmul FLOPs, half the
    # memory of keeping everything: ViT-S/16 on v5p-32 33 GiB, not 62). remat keeps nothing.
    # prevent_cse=False: inside a scan CSE cannot undo the remat (jax.checkpoint's docs). The
    # carry is constrained on the way in and out, as MaxText constrains every layer's input:
    # without it the TPU compiler's sharding propagation through the loop replicated the batch
    # under FSDP (ViT-L/8, remat, v5p-128: 1.2 TiB per device instead of tens of GiB).
    policy = None if self.remat else jax.checkpoint_policies.dots_saveable
    body = nnx.remat(lambda blk, y, *a: constrain(blk(constrain(y, ACT), *a), ACT), policy=policy,
                     prevent_cse=False)
    scan = nnx.scan(body, in_axes=(0, nnx.Carry) + (0,) * len(per_layer), out_axes=nnx.Carry,
                    unroll=SCAN_UNROLL.get(name, 1),
                    transform_metadata={nnx.PARTITION_NAME: LAYERS})
    return scan(blocks, x, *per_layer)

  def _block(self, blk, x, *args):
    """blk(x, *args), rematerialised when `remat` (saves the activation memory of big models).

    Non-array arguments (the drop rate) are closed over so they stay static under jax.checkpoint.
    """
    if not self.remat:
      return blk(x, *args)
    return nnx.remat(lambda b, y: b(y, *args))(blk, x)

  # -- public -------------------------------------------------------------------------------------
  def __call__(self, batch, key, *, mask_ratio=None):
    """Training forward on batch["image"]: (loss, aux) with aux = mse, fourier, pred, target, mask."""
    mask_key, drop_key = jax.random.split(key)
    x = standardize(batch["image"])
    tokens, target, c = self._tokens(x)
    ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
    ids_keep, ids_restore, mask = random_masking(mask_key, tokens.shape[0], tokens.shape[1], ratio)
    with jax.named_scope("masking"):
      tokens = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
    latent = self.norm(self._encode(tokens, drop_key=drop_key))
    pred = self._decode(latent, ids_restore, c)
    p = self.cfg.patch_size
    loss, mse, fourier = reconstruction_loss(pred, target, mask, p, self.cfg.fourier_weight)
    return loss, dict(mse=mse, fourier=fourier, pred=pred, target=target, mask=mask)

  def embed(self, images, *, pooling="mean", block=None):
    """Embedding without masking: mean of patch tokens (default) or CLS, after block `block`.

    block=None (or the depth) uses the final block followed by the encoder's LayerNorm; an earlier
    block (1-based, as in "block 15 of 24") returns that block's raw tokens.
    """
    depth = self.cfg.depth
    upto = None if block in (None, depth) else int(block)
    if upto is not None and not 1 <= upto <= depth:
      raise ValueError(f"block must be in 1..{depth}, got {block}")
    tokens, _, _ = self._tokens(standardize(images))
    x = self._encode(tokens, upto=upto)
    if upto is None:
      x = self.norm(x)
    if pooling == "cls":
      return x[:, 0]
    if pooling != "mean":
      raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    return x[:, 1:].mean(axis=1)


def _patch_init(key, shape, dtype):
  p, q, c, d = shape  # xavier-uniform on the flattened conv weight, as the MAE recipe does
  return vit.xavier(key, (p * q * c, d), dtype).reshape(shape)


def build_model(model_cfg, *, seed=0, dtype=jnp.float32, remat=False) -> MAE:
  return MAE(model_cfg, rngs=nnx.Rngs(seed), dtype=dtype, remat=remat)


def compute_dtype(precision: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[precision]


def relayout(tree, scan: bool):
  """`tree` with every parameter-shaped dict in it (parameters, optimiser moments) converted to
  stacked blocks (`scan`) or per-layer blocks: {"blocks": {0: {...}, 1: {...}}} <->
  {"blocks": {... each with a leading layer axis}}, and the same for "decoder_blocks".

  Exact both ways (a stack, an index), so a run resumes in the other layout with its Lion or AdamW
  moments intact: elementwise optimisers treat a stacked tensor as its layers side by side.
  """
  def convert(node):
    if not (isinstance(node, dict) and "blocks" in node):
      return node
    node = dict(node)
    for name in ("blocks", "decoder_blocks"):
      if name not in node:  # model.decoder="official_ca" has per-channel stacks instead
        continue
      layers = node[name]
      per_layer = all(str(k).isdigit() for k in layers)
      if scan and per_layer:
        node[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[k] for k in
                                                              sorted(layers, key=int)))
      elif not scan and not per_layer:
        depth = jax.tree.leaves(layers)[0].shape[0]
        node[name] = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(depth)}
    return node

  return jax.tree.map(convert, tree, is_leaf=lambda t: isinstance(t, dict) and "blocks" in t)
