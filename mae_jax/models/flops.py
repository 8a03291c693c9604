"""The FLOP model of the MAE: counted from the architecture, 2 FLOPs per multiply-accumulate.

Counted: every matmul (patch embedding, fused in-projection, attention scores q k^T and the
weighted sum a v, attention output, MLP, decoder embedding, decoder blocks, prediction head).
Ignored: LayerNorms, softmax, GELU, the FFT of the loss, masking gathers (all O(N d), < 1 %).
A train step is forward + backward = 3 x forward. The MAE forward runs the encoder on the kept
tokens + CLS and the decoder on all tokens + CLS (docs/science.md §1.7). ViT-S/16: train 52.8 GFLOP
per image, embedding 12.4, as an independent count of the same matmuls gives. The MU-Net's and the
DenseNet's convolutions are counted the same way (`_munet_flops`, `densenet.flops_per_image`).
The official CA-MAE decoder (`model.decoder="official_ca"`) runs its shared cross-attention and
MLP on all C*n tokens and each channel's Blocks on that channel's n tokens, without CLS
(`_official_ca_decoder`).
"""


def _encoder_block(n, d, h):
  return 2 * n * d * (h + 3 * d) + 4 * n * n * d + 2 * n * d * d + 2 * n * h * d


def _decoder_block(n, d, h):
  return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * h


def _official_ca_decoder(n_all, n, c, d, depth):
  """maes CAMAEDecoder on n_all = c*n tokens: q, kv, scores, weighted sum, proj, Mlp(d, 4d), then
  `depth` Blocks per channel on its n tokens (docs/science.md §1.5)."""
  cross = 2 * n_all * d * d + 2 * n_all * d * 2 * d + 4 * n_all * n_all * d + 2 * n_all * d * d
  return cross + 4 * n_all * d * 4 * d + c * depth * _decoder_block(n, d, 4 * d)


def tokens(cfg, channels=None):
  """(all patch tokens, kept tokens) of one image; CA-MAE has one token per channel patch."""
  c = cfg.channels if channels is None else channels
  n = (cfg.image_size // cfg.patch_size) ** 2 * (c if cfg.channel_agnostic else 1)
  return n, int(n * (1 - cfg.mask_ratio))


def flops_per_image(cfg, channels=None) -> dict:
  """FLOPs of one image: `train` (fwd + bwd of the training loss) and `embed` (encoder, no masking)."""
  kind = cfg.get("kind", "mae")
  if kind == "munet":
    return _munet_flops(cfg)
  if kind == "wsl":
    # Imported here: this module is plain arithmetic, and the planners that only count FLOPs
    # (mae_jax.experiments, bench) then start without flax.
    from mae_jax.models import densenet  # pylint: disable=g-import-not-at-top
    return densenet.flops_per_image(cfg)
  c = cfg.channels if channels is None else channels
  n, keep = tokens(cfg, c)
  patch_in = cfg.patch_size ** 2 * (1 if cfg.channel_agnostic else c)
  d, dd = cfg.width, cfg.decoder_width
  patch_embed = 2 * n * patch_in * d
  encoder = lambda t: patch_embed + cfg.depth * _encoder_block(t + 1, d, cfg.mlp_dim)
  if cfg.channel_agnostic and cfg.get("decoder", "shared") == "official_ca":
    blocks = _official_ca_decoder(n, n // c, c, dd, cfg.decoder_depth)
  else:
    blocks = cfg.decoder_depth * _decoder_block(n + 1, dd, 4 * dd)
  decoder = 2 * (keep + 1) * d * dd + blocks + 2 * (n + 1) * dd * patch_in
  return dict(train=3 * (encoder(keep) + decoder), embed=encoder(n))


def unet_widths(cfg) -> tuple[int, ...]:
  """MU-Net channels of each encoder level then the bottleneck: base, 2 base, ..., 2^levels base."""
  return tuple(cfg.base_width * 2 ** i for i in range(cfg.levels + 1))


def _munet_flops(cfg) -> dict:
  """MU-Net (models/munet.py): convolutions only, 2 FLOPs per MAC, train = 3 x forward.

  Unlike the ViT MAE the encoder sees the whole (blanked) crop, so masking saves no compute.
  """
  widths, size = unet_widths(cfg), cfg.image_size
  conv = lambda res, k, cin, cout: 2 * res * res * k * k * cin * cout
  block = lambda res, cin, cout: conv(res, 3, cin, cout) + conv(res, 3, cout, cout)
  ins = (cfg.channels + 1,) + widths[:-2]  # + 1: the mask plane
  encoder = sum(block(size >> i, ins[i], widths[i]) for i in range(cfg.levels))
  encoder += block(size >> cfg.levels, widths[-2], widths[-1])
  # A 2x2 stride-2 transposed conv costs one MAC per (output pixel, cin, cout).
  decoder = sum(conv(size >> i, 1, widths[i + 1], widths[i])
                + block(size >> i, 2 * widths[i], widths[i]) for i in range(cfg.levels))
  decoder += conv(size, 1, widths[0], cfg.channels)
  return dict(train=3 * (encoder + decoder), embed=encoder)
