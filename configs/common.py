"""Shared defaults of every mae_jax config: the paper's recipe (docs/science.md §1-2) in one place.

A model file is one call, e.g. `configs/vitl8.py`: `return common.get_config("L/8")`.
Override anything from the command line: `--config.batch_size=256 --config.mesh.fsdp=8`.
"""
import ml_collections
from ml_collections import config_dict

# name -> (width, depth, heads, mlp_dim, drop_path, lr). Widths/depths/heads from the official
# maes_microscopy constructors (docs/science.md §1.2); lr 1e-4 up to B and 3e-5 for L/G (§2.3).
VARIANTS = {
    "S": (384, 12, 6, 1536, 0.1, 1e-4),
    "B": (768, 12, 12, 3072, 0.1, 1e-4),
    "L": (1024, 24, 16, 4096, 0.3, 3e-5),
    "G": (1664, 48, 16, 8192, 0.6, 3e-5),
}

# The single source of sharding truth (MaxText's logical_axis_rules): logical axis names used by
# the model's parameters and activations -> mesh axes. FSDP shards the model width over `fsdp`;
# tensor parallelism shards heads and the MLP hidden dim over `tensor`; the batch spans data x fsdp.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("length", None),
    ("act_embed", None),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scanned blocks (model.scan_layers): unsplit
    ("conv_in", "fsdp"),  # MU-Net convolution kernels: input channels over fsdp,
    ("conv_out", "tensor"),  # output channels over tensor
)


def get_config(variant="S/16", **overrides):
  """The full training config for `variant` ("S/16", "L/8", ...) with keyword overrides."""
  size, patch = variant.split("/")
  width, depth, heads, mlp_dim, drop_path, lr = VARIANTS[size]
  c = ml_collections.ConfigDict()
  c.name = f"vit{size.lower()}{patch}"
  c.seed = 0
  c.total_steps = 100_000
  c.batch_size = 4096  # global, across all devices and processes
  c.microbatches = 1  # gradient accumulation: the batch is split into this many sequential chunks
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.precision = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
  c.remat = False  # rematerialise each transformer block in the backward pass
  c.dry_run = False  # build the sharded abstract state, lower the step, print memory, exit
  # A run's WORKDIR (or step folder) whose model parameters a NEW run starts from, optimiser fresh:
  # fine-tuning or continued pre-training, e.g. of official weights (python -m mae_jax.weights
  # import). Ignored on resume: the run's own checkpoint wins.
  c.init_from = config_dict.placeholder(str)
  c.peak_tflops_per_device = 0.0  # for MFU; 0 = unknown (MFU is then left out of the metrics)
  # A resume that changes total_steps or the optimizer's lr, warmup_fraction, div_factor or
  # final_div_factor reshapes the one-cycle schedule mid-run (docs/science.md §2.3): refused
  # unless this is True (mae_jax/train/loop.py: write_config).
  c.allow_schedule_change = False

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 fills the devices
  c.sharding_rules = SHARDING_RULES

  c.model = ml_collections.ConfigDict(dict(
      kind="mae",  # the model registry (mae_jax/models/registry.py): "mae" | "munet" | "wsl"
      variant=variant,
      image_size=256,
      patch_size=int(patch),
      channels=6,
      width=width,
      depth=depth,
      num_heads=heads,
      mlp_dim=mlp_dim,
      drop_path=drop_path,
      layerscale_init=1e-4,
      mask_ratio=0.75,
      decoder_width=512,
      decoder_depth=8,
      decoder_heads=16,
      fourier_weight=0.01,  # alpha of L = (1 - alpha) MSE + alpha Fourier-magnitude L1
      channel_agnostic=False,  # CA-MAE (docs/science.md §1.4): shared 1-channel patch embedding
      max_channels=11,  # CA-MAE positional table covers this many channels
      # CA-MAE decoder (docs/science.md §1.5): "shared" (one stack, channel tokens) or
      # "official_ca" (maes CAMAEDecoder: cross-attention, one decoder_depth stack per channel)
      decoder="shared",
      decoder_norm_eps=1e-6,  # official_ca LayerNorms: maes 1e-6, OpenPhenom's nn.LayerNorm 1e-5
      # Encoder and decoder blocks stacked and run by one lax.scan each: the step compiles one
      # block instead of depth of them (README: "Checkpoints from before scanned layers").
      scan_layers=True,
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="lion",  # "lion" (paper) or "adamw"
      lr=lr,
      weight_decay=0.05,
      b1=0.9,
      b2=0.95,
      warmup_fraction=0.1,  # one-cycle: linear warm-up from lr/div_factor, cosine down
      div_factor=25.0,
      final_div_factor=1e4,
      grad_clip_norm=1.0,  # 0 disables clipping
      cycle_momentum=False,  # PyTorch OneCycle also cycles Lion beta1 0.95 -> 0.85 -> 0.95 (docs/science.md §2.3)
  ))

  c.data = ml_collections.ConfigDict(dict(
      manifest=config_dict.placeholder(str),  # unset: in-memory synthetic crops
      num_workers=2,
      augment=False,  # flips / 90-degree rotations of crops
      verify_crc=True,
      skip_corrupt=False,
      dtype="uint8",  # bit depth of the stored sites ("uint8" or "uint16")
  ))

  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c


def get_small_config(name, *, image_size, depth, decoder_width, drop_path, lr, **overrides):
  """A small ViT MAE for 2 CPU cores (tests, the demo): width 64, 2 heads, patch 8, a one-block
  decoder, AdamW, no data workers. Blocks stay per layer: scanning a few small blocks saves no
  compile time and no step time beyond noise on 2 CPU cores (configs/demo.py)."""
  c = get_config("S/16", name=name, **overrides)
  c.model.update(image_size=image_size, patch_size=8, width=64, depth=depth, num_heads=2,
                 mlp_dim=256, drop_path=drop_path, decoder_width=decoder_width, decoder_depth=1,
                 decoder_heads=2, scan_layers=False)
  c.optimizer.update(name="adamw", lr=lr, weight_decay=0.05)
  c.data.num_workers = 0
  return c


# MU-Net size -> base width (channels of the first level; each level doubles them). 4 levels and a
# bottleneck as in the original U-Net (Ronneberger et al. 2015); docs/science.md §1.9.
MUNET_WIDTHS = {"M": 64, "L": 128}


def get_munet_config(size="M", **overrides):
  """The MU-Net masked autoencoder `size` ("M" or "L") with the ViT recipe's optimiser and data."""
  c = get_config("S/16")
  c.name = f"munet_{size.lower()}"
  c.model = ml_collections.ConfigDict(dict(
      kind="munet",
      variant=f"MU-Net-{size}",
      image_size=256,
      patch_size=16,  # masking grid; the paper studied patch 8 and 16 and ratio 25 % and 75 %
      channels=6,
      base_width=MUNET_WIDTHS[size],
      levels=4,
      norm_groups=32,  # GroupNorm groups (batch-independent: no cross-device statistics)
      mask_ratio=0.75,
      fourier_weight=0.01,
      embed_levels="bottleneck",  # or "all": pooled features of every level, concatenated
  ))
  c.optimizer.lr = 1e-4
  for key, value in overrides.items():
    c[key] = value
  return c


def get_wsl_config(**overrides):
  """The weakly supervised baseline: torchvision's DenseNet-161 with a 6-channel stem, trained to
  classify each crop's perturbation label (docs/science.md §1.10), with the MAE recipe's optimiser
  family (Lion, one-cycle) and data pipeline."""
  c = get_config("S/16")
  c.name = "wsl_densenet161"
  c.model = ml_collections.ConfigDict(dict(
      kind="wsl",
      variant="DenseNet-161",
      image_size=256,
      channels=6,
      growth_rate=48,  # torchvision densenet161: growth 48, blocks 6/12/36/24, 96 stem features,
      block_config=(6, 12, 36, 24),
      num_init_features=96,
      bn_size=4,  # bottleneck width = bn_size x growth
      # Classes of the label vocabulary: a run on a manifest sets it from the data (WORKDIR/
      # labels.json). The default, for summaries and compiles, is RxRx1's 1,139 siRNAs (1,108
      # treatments + 30 positive controls + 1 negative), the classic WSL task on these images.
      num_classes=1139,
      label_smoothing=0.0,  # torch CrossEntropyLoss(label_smoothing=...)
  ))
  c.wsl = ml_collections.ConfigDict(dict(
      label_key="gene",  # the records' metadata field to classify: "gene" or "perturbation" (guide)
      controls="class",  # control sites: "class" (their label is a class) or "exclude"
  ))
  c.optimizer.lr = 1e-4
  for key, value in overrides.items():
    c[key] = value
  return c
