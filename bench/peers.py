"""Our ViT-S/16 MAE train step and embedding against their PyTorch peers, in one command.

  python -m bench.peers [--batch=16] [--embed_batch=32] [--threads=2] [--steps=3]
                        [--seconds=10] [--jax_python=PATH] [--profile]
                        [--peers=facebookresearch_mae,maes_microscopy]

Run it with a python that has torch and timm (`pip install torch timm`, CPU wheels; torch is not a
dependency of the repo: without it this prints one "skipped" line and exits 0), e.g.
  PYTHONPATH=. /path/to/torch_venv/bin/python -m bench.peers --jax_python=.venv/bin/python
The peers run in this process, on the CPU, with torch pinned to --threads (inter-op 1) and the
same glibc malloc settings as ours (mae_jax/util/host_memory.py; MAE_JAX_MALLOC=system: neither's).
Ours run as subprocesses (`bench.train_step`, `bench.embed`, JAX_PLATFORMS=cpu) of --jax_python
(default: this python when it can import jax), one after the other and before the peers: torch
and XLA:CPU in one process fight over the same cores.

The peers, written from the upstream code's description (not copied), ViT-S/16 on 256x256x6 crops:
  facebookresearch_mae  github.com/facebookresearch/mae models_mae.py: timm `Block` encoder (qkv
                        bias), CLS, fixed 2-D sin-cos positions, random masking of 75 % by argsort
                        of noise + gather, a 512 x 8 (16 heads) decoder of timm Blocks, MSE on the
                        removed patches.
  maes_microscopy       github.com/recursionpharma/maes_microscopy vit.py / mae_modules.py /
                        loss.py: SelfStandardize (InstanceNorm2d), timm `ParallelScalingBlock`
                        encoder (qk-norm, no qkv bias, LayerScale 1e-4, drop path to 0.1), the same
                        masking and 512 x 8 decoder, loss (1 - a) MSE + a |FFT2| L1, a = 0.01,
                        per p x p patch of each channel as mae_jax/models/mae.py computes it
                        (docs/science.md §2.2).
Both step with AdamW (b 0.9/0.95, wd 0.05, torch's fused kernel where it exists), denormals
flushed to zero as in XLA:CPU. Our vits16 step
uses Lion and clips the gradient norm: elementwise passes over 48 M parameters, < 1 % of the step.

JSON lines: the torch 2048^2 float32 matmul yardstick (best of 5); per peer {"peer", "what": "train"
| "embed", "batch", "images_per_s" | "crops_per_s", "gflops_per_s", "fraction_of_peak", "threads"},
with OUR FLOP model (mae_jax/models/flops.py, computed by --jax_python) so that rates compare one to
one; our benches' lines with "peer": "mae_jax"; a summary {"summary": true, "train_ratio",
"embed_ratio" (ours / best peer), "train_fraction_of_peak" (ours), "best_peer_train",
"best_peer_embed"}.
Train = forward + backward + optimizer.step() + zero_grad(set_to_none=True), best of --steps after a
warm-up step; embed = the encoder on all 256 patches, mean of the patch tokens, inference_mode.
--profile instead times nothing: one train step of each peer under torch.profiler, self time per
op class as {"peer", "op_class", "ms", "share"}.
"""
import functools
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import warnings

from bench import common
from mae_jax.util import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
FBMAE, MAES = "facebookresearch_mae", "maes_microscopy"
PEERS = (FBMAE, MAES)
SKIP = "torch is not installed: pip install torch timm (CPU wheels) to time the PyTorch peers"
OP_CLASSES = ("matmul", "attention", "layernorm", "fft", "optimizer", "gather/index", "other")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
              "aten::matmul", "aten::addmv", "aten::mv")


@functools.cache
def _peer_class():
  """The peer model class; torch and timm are imported here only (they are optional)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():  # timm 0.9.7 on a new torch: torch.jit deprecation notes
    warnings.simplefilter("ignore")
    from timm.layers import PatchEmbed  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from timm.models.vision_transformer import Block, ParallelScalingBlock

  def sincos(width, grid):
    """(1, grid^2, width) fixed table, laid out as mae_jax/models/vit.py: sincos_2d (no CLS row)."""
    omega = 10000.0 ** (-torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    h, w = h.reshape(-1, 1) * omega, w.reshape(-1, 1) * omega
    return torch.cat([h.sin(), h.cos(), w.sin(), w.cos()], dim=1).float()[None]

  class PeerMAE(nn.Module):
    """A ViT MAE as `kind` (FBMAE or MAES) builds it; depth and size are arguments for tests."""

    def __init__(self, kind, *, depth=12, decoder_depth=8, image_size=256, patch=16, channels=6,
                 width=384, heads=6, decoder_width=512, decoder_heads=16, mask_ratio=0.75):
      super().__init__()
      self.kind, self.patch, self.mask_ratio = kind, patch, mask_ratio
      self.fourier_weight = 0.01 if kind == MAES else 0.0
      grid = image_size // patch
      norm = functools.partial(nn.LayerNorm, eps=1e-6)  # both upstreams use eps 1e-6
      self.patch_embed = PatchEmbed(image_size, patch, channels, width)  # Conv2d(k = s = p)
      self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
      self.register_buffer("pos", sincos(width, grid), persistent=False)
      if kind == MAES:  # vit_small_patch16_256: stochastic depth rising linearly to 0.1
        self.blocks = nn.ModuleList(
            ParallelScalingBlock(width, heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=True,
                                 init_values=1e-4, drop_path=rate, norm_layer=norm)
            for rate in torch.linspace(0, 0.1, depth).tolist())
      else:
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True,
                                          norm_layer=norm) for _ in range(depth))
      self.norm = norm(width)
      self.decoder_embed = nn.Linear(width, decoder_width)
      self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_width) * 0.02)
      self.register_buffer("decoder_pos", sincos(decoder_width, grid), persistent=False)
      self.decoder_blocks = nn.ModuleList(Block(decoder_width, decoder_heads, mlp_ratio=4.0,
                                                qkv_bias=True, norm_layer=norm)
                                          for _ in range(decoder_depth))
      self.decoder_norm = norm(decoder_width)
      self.decoder_pred = nn.Linear(decoder_width, patch * patch * channels)

    def _standardize(self, images):
      # maes: SelfStandardize = InstanceNorm2d without affine; fbmae takes normalised input.
      return F.instance_norm(images, eps=1e-5) if self.kind == MAES else images

    def _encode(self, tokens):
      x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
      for block in self.blocks:
        x = block(x)
      return self.norm(x)

    def _patchify(self, x):
      """(B, C, H, W) -> (B, L, p*p*C), channel fastest: the target layout of fbmae and ours."""
      b, c, h, w = x.shape
      p = self.patch
      x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
      return x.reshape(b, (h // p) * (w // p), p * p * c)

    def _loss(self, pred, target, mask):
      per_token = (pred - target).square().mean(-1)
      if self.fourier_weight:  # |FFT2| of every p x p patch of each channel, as ours
        b, l, f = pred.shape
        spectrum = lambda t: torch.fft.fft2(  # pylint: disable=g-long-lambda
            t.reshape(b, l, self.patch, self.patch, -1), dim=(2, 3)).abs()
        fourier = (spectrum(pred) - spectrum(target)).abs().reshape(b, l, f).mean(-1)
        per_token = (1 - self.fourier_weight) * per_token + self.fourier_weight * fourier
      return (per_token * mask).sum() / mask.sum()

    def forward(self, images):
      """The training loss of a batch (B, C, H, W)."""
      x = self._standardize(images)
      tokens = self.patch_embed(x) + self.pos
      b, l, d = tokens.shape
      keep = int(l * (1 - self.mask_ratio))
      # random masking: the `keep` tokens of lowest noise stay; ids_restore undoes the shuffle
      ids_shuffle = torch.argsort(torch.rand(b, l), dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
      mask = torch.ones(b, l)
      mask[:, :keep] = 0
      mask = torch.gather(mask, 1, ids_restore)  # 1 = removed, in patch order
      y = self.decoder_embed(self._encode(kept))
      y_patches = torch.cat([y[:, 1:], self.mask_token.expand(b, l - keep, -1)], dim=1)
      y_patches = torch.gather(y_patches, 1, ids_restore[..., None].expand(-1, -1, y.shape[-1]))
      y = torch.cat([y[:, :1], y_patches + self.decoder_pos], dim=1)  # CLS position is zero
      for block in self.decoder_blocks:
        y = block(y)
      pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
      return self._loss(pred, self._patchify(x), mask)

    def embed(self, images):
      """(B, width): the encoder on all patches, mean of the patch tokens (no CLS), as ours."""
      tokens = self.patch_embed(self._standardize(images)) + self.pos
      return self._encode(tokens)[:, 1:].mean(dim=1)

  return PeerMAE


def build_peer(name, seed=0, **sizes):
  """A peer model (train mode) and its AdamW; `sizes` shrink it for tests (depth=1, ...)."""
  import torch  # pylint: disable=g-import-not-at-top
  if name not in PEERS:
    raise ValueError(f"unknown peer {name!r}: expected one of {', '.join(PEERS)}")
  torch.manual_seed(seed)
  model = _peer_class()(name, **sizes)
  kwargs = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  try:  # one fused kernel over all tensors (torch >= 2.4 on CPU): the fastest AdamW torch has
    opt = torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(model.parameters(), **kwargs)
  return model, opt


def train_step(model, opt, images):
  loss = model(images)
  loss.backward()
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss


def _images(batch, size=256, channels=6, seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _best(fn, repeats):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def torch_matmul_gflops(n=2048, repeats=5):
  """Best-of-`repeats` GFLOP/s of torch's n x n float32 matmul (the peers' yardstick)."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b  # pylint: disable=pointless-statement
  return 2.0 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def time_peer(name, args):
  """(train seconds per step, embed seconds per batch, embed calls) of one peer."""
  import torch  # pylint: disable=g-import-not-at-top
  model, opt = build_peer(name)
  images = _images(args.batch)
  train_step(model, opt, images)  # warm-up: allocator, oneDNN primitives
  train_s = _best(lambda: train_step(model, opt, images), args.steps)
  model.eval()  # no drop path when embedding
  images = _images(args.embed_batch)
  with torch.inference_mode():
    model.embed(images)
    calls, start, embed_s = 0, time.perf_counter(), float("inf")
    while time.perf_counter() - start < args.seconds or calls < 3:  # as bench/embed.py
      embed_s = min(embed_s, _best(lambda: model.embed(images), 1))
      calls += 1
  return train_s, embed_s, calls


def op_class(name):
  """The OP_CLASSES entry of a profiler event name."""
  low = name.lower()
  if "adam" in low or "_foreach" in low or low.startswith("optimizer."):
    return "optimizer"
  if "scaled_dot_product" in low or "softmax" in low or "attention" in low:
    return "attention"
  if "layer_norm" in low:
    return "layernorm"
  if "fft" in low:
    return "fft"
  if name in MATMUL_OPS or "convolution" in low or low == "aten::conv2d":  # patch embed = matmul
    return "matmul"
  if any(k in low for k in ("gather", "index", "scatter", "sort", "take_along")):
    return "gather/index"
  return "other"


def profile_peer(name, batch):
  """Self CPU time per op class of one train step (after a warm-up step)."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  model, opt = build_peer(name)
  images = _images(batch)
  train_step(model, opt, images)
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    train_step(model, opt, images)
  totals = dict.fromkeys(OP_CLASSES, 0.0)
  for event in prof.key_averages():  # self times add up to the step without double counting
    totals[op_class(event.key)] += event.self_cpu_time_total / 1e3
  whole = sum(totals.values()) or 1.0
  for cls, ms in totals.items():
    common.emit(peer=name, op_class=cls, ms=round(ms, 1), share=round(ms / whole, 4), batch=batch)


def _run_ours(python, module_args, what):
  """Our bench as a subprocess of `python` on the CPU: its JSON lines, tagged as ours."""
  command = [python, "-m", *module_args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the peers run on the CPU here, so ours do
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    raise cli.UserError(f"{' '.join(module_args[:1])} under {python} failed: {last}")
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  return [{"peer": "mae_jax", "what": what, **row} for row in rows]


def our_flops(python):
  """{"train", "embed"} FLOPs per image of vits16 from mae_jax/models/flops.py, via `python`."""
  code = ("import json; from configs import vits16; from mae_jax.models import flops; "
          "print(json.dumps(flops.flops_per_image(vits16.get_config().model)))")
  proc = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    raise cli.UserError(f"cannot compute our FLOP model under {python}: {last}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16, help="train-step batch")
  p.add_argument("--embed_batch", type=int, default=32, help="embedding batch")
  p.add_argument("--threads", type=int, default=2, help="torch / XLA:CPU threads")
  p.add_argument("--steps", type=int, default=3, help="timed train steps (best of)")
  p.add_argument("--seconds", type=float, default=10.0, help="time spent measuring each embedding")
  p.add_argument("--jax_python", default=None,
                 help="python that runs our benches (default: this one, when it imports jax)")
  p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of the peers")
  p.add_argument("--profile", action="store_true",
                 help="profile one train step of each peer by op class instead of timing")
  args = p.parse_args(argv)
  peers = [name for name in args.peers.split(",") if name]
  if not peers or any(name not in PEERS for name in peers):
    p.error(f"--peers: expected names from {', '.join(PEERS)}, got {args.peers!r}")
  if min(args.batch, args.embed_batch, args.threads, args.steps) < 1 or args.seconds <= 0:
    p.error("--batch, --embed_batch, --threads and --steps must be >= 1, --seconds > 0")
  if any(importlib.util.find_spec(m) is None for m in ("torch", "timm")):
    common.emit(skipped=SKIP)
    return 0
  python = args.jax_python or (sys.executable if importlib.util.find_spec("jax") else None)
  if not args.profile:
    if python is None:
      p.error("this python cannot import jax: pass --jax_python=PATH, a python that runs the "
              "repository (e.g. .venv/bin/python)")
    if shutil.which(python) is None:
      p.error(f"--jax_python: {python} is not an executable")
    flops = our_flops(python)
    ours = _run_ours(python, ["bench.train_step", f"--runs=vits16:float32:{args.batch}",
                              f"--threads={args.threads}", f"--steps={args.steps}"], "train")
    ours += _run_ours(python, ["bench.embed", "--config=vits16", f"--batch={args.embed_batch}",
                               f"--threads={args.threads}", f"--seconds={args.seconds}"], "embed")

  import torch  # pylint: disable=g-import-not-at-top
  # Denormals flushed to zero, as XLA's CPU client runs every computation (TensorFlow's
  # convention): AdamW's second moment of tiny gradients turns denormal, and x86 computes with
  # those tens of times slower (fused AdamW over this ViT-S/16 MAE, 2 threads: 1-2 s a step once
  # its moments held real gradients, 0.08 s with random ones). Set before the first parallel
  # region: OpenMP workers copy the flag from the thread that starts them, and only then.
  torch.set_flush_denormal(True)
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)
  if args.profile:
    for name in peers:
      profile_peer(name, args.batch)
    return 0

  peak = torch_matmul_gflops()
  common.emit(yardstick="torch_matmul", dtype="float32", n=2048, peak_gflops_per_s=round(peak, 2),
              threads=args.threads, torch=torch.__version__)
  rates = {"train": {}, "embed": {}}
  for name in peers:
    train_s, embed_s, calls = time_peer(name, args)
    for what, batch, seconds, key in (("train", args.batch, train_s, "images_per_s"),
                                      ("embed", args.embed_batch, embed_s, "crops_per_s")):
      rate = batch / seconds
      gflops = rate * flops[what] / 1e9
      rates[what][name] = rate
      extra = {"calls": calls} if what == "embed" else {"step_s": round(seconds, 3)}
      common.emit(peer=name, what=what, batch=batch, **{key: round(rate, 3)},
                  gflops_per_s=round(gflops, 2), fraction_of_peak=round(gflops / peak, 3),
                  threads=args.threads, **extra)
  for row in ours:
    common.emit(**row)
  train = next(r for r in ours if r["what"] == "train" and "images_per_s" in r)
  embed = next(r for r in ours if r["what"] == "embed" and "crops_per_s" in r)
  best_train = max(rates["train"], key=rates["train"].get)
  best_embed = max(rates["embed"], key=rates["embed"].get)
  common.emit(summary=True,
              train_ratio=round(train["images_per_s"] / rates["train"][best_train], 3),
              embed_ratio=round(embed["crops_per_s"] / rates["embed"][best_embed], 3),
              train_fraction_of_peak=train["fraction_of_peak"], best_peer_train=best_train,
              best_peer_embed=best_embed, threads=args.threads)
  return 0


if __name__ == "__main__":
  cli.run(main, absl_flags=False, keep_freed_memory=True)
