"""DenseNet-161, the weakly supervised (WSL) baseline of Kraus et al. (arXiv 2309.16064), in NNX.

    loss, aux = model(batch, key)         # training: classify the perturbation (siRNA) label
    emb = model.embed(images)             # evaluation: pooled 2,208-d features

The architecture is torchvision's `densenet161` (Huang et al. 2017, DenseNet-BC): growth rate
48, blocks (6, 12, 36, 24), 96 stem features, bottleneck width 4 x growth, BatchNorm + ReLU
before every convolution, transitions halving the channels then 2x2 average pooling, a 7x7
stride-2 stem with 3x3 stride-2 max pooling and a final BatchNorm. Only the stem takes the
crop's 6 channels instead of 3: 26,486,112 feature parameters, 2,208-d features, then a
Linear(2208, num_classes) classifier. Layer for layer the shapes are torchvision's (kernels
HWIO instead of OIHW), so its weights port by transposition (tests/test_densenet.py).

Convolutions run in `dtype` with float32 parameters; BatchNorm statistics are float32.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mae_jax.models import mae, vit
from mae_jax.models.vit import constrain, param

BN_EPS = 1e-5  # torch.nn.BatchNorm2d default
BN_DECAY = 0.9  # torch momentum 0.1: running = 0.9 running + 0.1 batch
# torchvision's init: kaiming_normal_ (fan_in, gain sqrt 2, untruncated) for convolutions; the
# classifier keeps torch's Linear default U(+-1/sqrt(fan_in)) with a zero bias.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
CONV_NAMES = (None, None, "conv_in", "conv_out")
DIMS = ("NHWC", "HWIO", "NHWC")


class Conv(nnx.Module):
  """Bias-free k x k convolution with torch's explicit symmetric padding (k // 2)."""

  def __init__(self, cin, cout, k, *, rngs, dtype, stride=1, names=CONV_NAMES):
    self.dtype, self.stride, self.pad = dtype, stride, k // 2
    self.kernel = param(rngs, conv_init, (k, k, cin, cout), names)

  def __call__(self, x):
    # Explicit padding, not "SAME": for the stride-2 stem SAME pads (2, 3) on even sizes where
    # torch pads (3, 3), which would shift every feature map by one pixel.
    pad = ((self.pad, self.pad),) * 2
    return jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                        (self.stride,) * 2, pad, dimension_numbers=DIMS)


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm2d over (N, H, W) in float32; `model.train()` / `model.eval()` switch it.

  Training mode normalises by the batch statistics and updates the running ones; evaluation mode
  (`use_running_average=True`, set by `model.eval()` as for nnx.BatchNorm) uses the running ones.
  Under jit with a batch sharded over devices the plain mean over axis 0 is already the GLOBAL
  batch mean (XLA inserts the all-reduce), so unlike pmap-style code no axis_name is needed.
  (With gradient accumulation they are the statistics of each microbatch, as in torch.)
  The running variance is updated with the unbiased batch variance, as torch does (nnx.BatchNorm
  uses the biased one); normalisation itself uses the biased one, as both do.
  """

  def __init__(self, channels, *, rngs):
    self.scale = param(rngs, vit.ones, (channels,), ("conv_out",))
    self.bias = param(rngs, vit.zeros, (channels,), ("conv_out",))
    self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), out_sharding=("conv_out",))
    self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), out_sharding=("conv_out",))
    self.use_running_average = False

  def __call__(self, x, use_running_average=None):
    frozen = self.use_running_average if use_running_average is None else use_running_average
    x = x.astype(jnp.float32)
    if frozen:
      mean, var = self.mean[...], self.var[...]
    else:
      mean = x.mean(axis=(0, 1, 2))
      var = jnp.square(x - mean).mean(axis=(0, 1, 2))
      n = x.size // x.shape[-1]
      unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
      self.mean[...] = BN_DECAY * self.mean[...] + (1 - BN_DECAY) * jax.lax.stop_gradient(mean)
      self.var[...] = BN_DECAY * self.var[...] + (1 - BN_DECAY) * unbiased
    return (x - mean) * (jax.lax.rsqrt(var + BN_EPS) * self.scale[...]) + self.bias[...]


def bn_relu(norm, x, frozen, dtype):
  return jax.nn.relu(norm(x, frozen)).astype(dtype)


class DenseLayer(nnx.Module):
  """BN-ReLU-Conv1x1 (bn_size * growth) -> BN-ReLU-Conv3x3 (growth): the new feature maps."""

  def __init__(self, cin, growth, bn_size, *, rngs, dtype):
    self.dtype = dtype
    self.norm1 = BatchNorm(cin, rngs=rngs)
    self.conv1 = Conv(cin, bn_size * growth, 1, rngs=rngs, dtype=dtype)
    self.norm2 = BatchNorm(bn_size * growth, rngs=rngs)
    self.conv2 = Conv(bn_size * growth, growth, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x, frozen=None):
    y = self.conv1(bn_relu(self.norm1, x, frozen, self.dtype))
    return self.conv2(bn_relu(self.norm2, y, frozen, self.dtype))


class Transition(nnx.Module):
  """BN-ReLU-Conv1x1 to half the channels, then 2x2 stride-2 average pooling."""

  def __init__(self, cin, cout, *, rngs, dtype):
    self.dtype = dtype
    self.norm = BatchNorm(cin, rngs=rngs)
    self.conv = Conv(cin, cout, 1, rngs=rngs, dtype=dtype)

  def __call__(self, x, frozen=None):
    y = self.conv(bn_relu(self.norm, x, frozen, self.dtype))
    # torch AvgPool2d(2, 2) floors odd sizes, as a VALID window does.
    y = jax.lax.reduce_window(y.astype(jnp.float32), 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                              "VALID")
    return (y * 0.25).astype(self.dtype)


def max_pool_3x3_s2(x):
  """torch MaxPool2d(3, stride=2, padding=1): padding (-inf) never wins the max."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  # A Python -inf, not an array: only a literal init is recognised as max-pooling, which has a
  # gradient; reduce_window with a general init value has none.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


def spatial_sizes(size):
  """Feature-map side of the stem conv, then of dense blocks 1.. (torch's floor arithmetic)."""
  stem = (size + 2 * 3 - 7) // 2 + 1
  block = (stem + 2 - 3) // 2 + 1
  return stem, block


class DenseNetWSL(nnx.Module):
  """DenseNet-161 (torchvision) with a `channels`-channel stem and a `num_classes` classifier.

  Besides its Params the model holds BatchStats (running statistics) that a train-mode forward
  updates: a functional train step splits them off, merges them inside the loss function
  (`nnx.merge(..., copy=True)`, so that the updates happen at the gradient's trace level) and
  returns the updated ones with the loss.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, remat=False):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it is part of the static graphdef
    self.cfg, self.dtype, self.remat = cfg, dtype, bool(remat)
    k, f = cfg.growth_rate, cfg.num_init_features
    # The stem's input channels (6) stay unsplit: they divide no fsdp axis, and the kernel is tiny.
    self.conv0 = Conv(cfg.channels, f, 7, rngs=rngs, dtype=dtype, stride=2,
                      names=(None, None, None, "conv_out"))
    self.norm0 = BatchNorm(f, rngs=rngs)
    blocks, transitions = [], []
    for i, n in enumerate(cfg.block_config):
      blocks.append(nnx.List([DenseLayer(f + j * k, k, cfg.bn_size, rngs=rngs, dtype=dtype)
                              for j in range(n)]))
      f += n * k
      if i != len(cfg.block_config) - 1:  # compression 0.5 (DenseNet-BC)
        transitions.append(Transition(f, f // 2, rngs=rngs, dtype=dtype))
        f //= 2
    self.blocks, self.transitions = nnx.List(blocks), nnx.List(transitions)
    self.norm5 = BatchNorm(f, rngs=rngs)
    self.num_features = f
    self.classifier = param(rngs, linear_init, (f, cfg.num_classes), ("embed", None))
    self.classifier_bias = param(rngs, vit.zeros, (cfg.num_classes,), (None,))

  def _layer(self, layer, x, frozen):
    if self.remat:  # recompute each dense layer in the backward pass (torch's memory_efficient)
      return nnx.remat(lambda m, y: m(y, frozen))(layer, x)
    return layer(x, frozen)

  def features(self, images, frozen=None):
    """Raw crops -> (B, num_features) float32: global average of ReLU(norm5(...)).

    `frozen` overrides the BatchNorms' mode (True: running statistics); None keeps it.
    """
    if images.shape[-1] != self.cfg.channels:
      raise ValueError(f"model expects {self.cfg.channels} channels, got {images.shape[-1]}")
    x = constrain(mae.standardize(images), ("batch", None, None, None))
    x = max_pool_3x3_s2(bn_relu(self.norm0, self.conv0(x), frozen, self.dtype))
    for i, block in enumerate(self.blocks):
      for layer in block:
        x = jnp.concatenate([x, self._layer(layer, x, frozen).astype(self.dtype)], axis=-1)
      x = constrain(x, ("batch", None, None, None))
      if i < len(self.transitions):
        x = self.transitions[i](x, frozen)
    # torchvision's forward: F.relu after the final BatchNorm, then adaptive average pooling.
    return jax.nn.relu(self.norm5(x, frozen)).mean(axis=(1, 2))

  def logits(self, images, frozen=None):
    return self.features(images, frozen) @ self.classifier[...] + self.classifier_bias[...]

  def __call__(self, batch, key=None):
    """(loss, aux): label-smoothed cross-entropy; aux = plain cross-entropy and accuracy.

    `key` exists for the shared interface: with torchvision's drop_rate 0 nothing is random.
    Label smoothing as torch's CrossEntropyLoss(label_smoothing=a): (1 - a) one-hot + a / K.
    """
    del key
    logits = self.logits(batch["image"])
    labels = batch["label"]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    a = float(self.cfg.label_smoothing)
    loss = ((1 - a) * nll - a * logp.mean(-1)).mean()
    accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
    return loss, dict(cross_entropy=nll.mean(), accuracy=accuracy)

  def batch_statistics(self, images):
    """AdaBN (Li et al. 2016): every BatchNorm's statistics of `images` alone (batch mean and
    unbiased variance, train mode), as a pure dict shaped like the model's BatchStats.

    Overwrites this model's running statistics: call it on a copy (`nnx.merge(..., copy=True)`).
    From zero running statistics one train-mode update leaves (1 - decay) x the batch's.
    """
    for _, module in nnx.iter_modules(self):
      if isinstance(module, BatchNorm):
        module.mean[...] = jnp.zeros_like(module.mean[...])
        module.var[...] = jnp.zeros_like(module.var[...])
    self.features(images, frozen=False)
    return jax.tree.map(lambda v: v / (1 - BN_DECAY),
                        nnx.state(self, nnx.BatchStat).to_pure_dict())

  def embed(self, images, *, pooling="mean", block=None):
    """The WSL embedding: pooled features after the final BatchNorm + ReLU, running statistics.

    `pooling` and `block` exist for the ViT's interface; a DenseNet has no CLS token or blocks.
    """
    if pooling != "mean" or block is not None:
      raise ValueError("DenseNet embeddings are mean-pooled final features (no --pooling=cls or "
                       "--block)")
    return self.features(images, frozen=True)


def flops_per_image(cfg) -> dict:
  """FLOPs of one image, 2 per multiply-accumulate: convolutions and the classifier.

  `train` = 3 x the forward with the classifier (forward + backward); `embed` = the forward of
  the features. Ignored: BatchNorm, ReLU, pooling, concatenation (O(pixels x channels) each,
  a few % of DenseNet-161's 1x1 convolutions).
  """
  k, f, b = cfg.growth_rate, cfg.num_init_features, cfg.bn_size
  conv = lambda side, kk, cin, cout: 2 * side * side * kk * kk * cin * cout
  stem, side = spatial_sizes(cfg.image_size)
  total = conv(stem, 7, cfg.channels, f)
  for i, n in enumerate(cfg.block_config):
    for j in range(n):
      total += conv(side, 1, f + j * k, b * k) + conv(side, 3, b * k, k)
    f += n * k
    if i != len(cfg.block_config) - 1:
      total += conv(side, 1, f, f // 2)  # at the block's resolution, before the pooling
      f, side = f // 2, side // 2
  classifier = 2 * f * cfg.num_classes
  return dict(train=3 * (total + classifier), embed=total)
