"""The FLOP model of the MAE: counted from the architecture, 2 FLOPs per multiply-accumulate.

Counted: every matmul (patch embedding, fused in-projection, attention scores q k^T and the
weighted sum a v, attention output, MLP, decoder embedding, decoder blocks, prediction head).
Ignored: LayerNorms, softmax, GELU, the FFT of the loss, masking gathers (all O(N d), < 1 %).
A train step is forward + backward = 3 x forward. The MAE forward runs the encoder on the kept
tokens + CLS and the decoder on all tokens + CLS (method.md §1.7). These match the peer harness'
figures (jax_stack.md §G): ViT-S/16 train 52.8 GFLOP per image, embedding 12.4.
"""


def _encoder_block(n, d, h):
  return 2 * n * d * (h + 3 * d) + 4 * n * n * d + 2 * n * d * d + 2 * n * h * d


def _decoder_block(n, d, h):
  return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * h


def tokens(cfg, channels=None):
  """(all patch tokens, kept tokens) of one image; CA-MAE has one token per channel patch."""
  c = cfg.channels if channels is None else channels
  n = (cfg.image_size // cfg.patch_size) ** 2 * (c if cfg.channel_agnostic else 1)
  return n, int(n * (1 - cfg.mask_ratio))


def flops_per_image(cfg, channels=None) -> dict:
  """FLOPs of one image: `train` (fwd + bwd of the masked MAE) and `embed` (encoder, no masking)."""
  c = cfg.channels if channels is None else channels
  n, keep = tokens(cfg, c)
  patch_in = cfg.patch_size ** 2 * (1 if cfg.channel_agnostic else c)
  d, dd = cfg.width, cfg.decoder_width
  patch_embed = 2 * n * patch_in * d
  encoder = lambda t: patch_embed + cfg.depth * _encoder_block(t + 1, d, cfg.mlp_dim)
  decoder = (2 * (keep + 1) * d * dd + cfg.decoder_depth * _decoder_block(n + 1, dd, 4 * dd)
             + 2 * (n + 1) * dd * patch_in)
  return dict(train=3 * (encoder(keep) + decoder), embed=encoder(n))
