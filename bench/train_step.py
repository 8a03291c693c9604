"""Train-step throughput of real MAE configs on one device, against a matmul yardstick.

  python -m bench.train_step [--runs=vits16:float32:16,vits16:bfloat16:16,vitb16:float32:8]
                             [--steps=3] [--threads=2] [--scan_layers=config|true|false]

One JSON line per run: model, precision, batch, images_per_s, gflops_per_s (the FLOP model of
mae_jax/models/flops.py: fwd + bwd, 2 FLOPs per MAC), peak_gflops_per_s (a jitted 2048^2 matmul of the
same dtype measured in this process right before and after the run, bench/common.py),
fraction_of_peak, step_s (best of --steps), compile_s, scan_layers (blocks scanned or not),
device_kind, device_peak_tflops (the chip's dense bf16 spec peak, bench/common.py:
DEVICE_PEAK_TFLOPS; None on a CPU or an unlisted chip) and mfu = gflops_per_s / 1000 /
device_peak_tflops (None then). On an accelerator the 2048^2 matmul yardstick is bound by
dispatch, not by the chip, so there mfu is the figure to read.
The step is the real one (masking, encoder, decoder, Fourier loss, backward, clipping, Lion or
AdamW update) on a 1-device mesh with a fixed uint8 batch already on the device.
"""
import importlib
import time

from bench import common
from mae_jax.util import cli

DEFAULT_RUNS = "vits16:float32:16,vits16:bfloat16:16,vitb16:float32:8"


def parse_runs(text):
  runs = []
  for item in text.split(","):
    parts = item.split(":")
    if len(parts) != 3 or parts[1] not in ("float32", "bfloat16") or not parts[2].isdigit():
      raise ValueError(f"--runs: expected CONFIG:float32|bfloat16:BATCH, got {item!r}")
    runs.append((parts[0], parts[1], int(parts[2])))
  return runs


def build(name, precision, batch, scan_layers=None):
  """(compiled train step, (state, batch, rng), config, compile seconds) of configs/`name`.

  The real step (bench/profile_step.py profiles the same one) on a 1-device mesh, with a fixed
  random uint8 batch already on the device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.train import sharding, step as step_lib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  config.update(batch_size=batch, precision=precision)
  if scan_layers is not None:
    config.model.scan_layers = scan_layers
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = sharding.normalize_rules(config.sharding_rules)
  graphdef, tx, abstract, init = step_lib.build_state(config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  high = {"image": 256, "label": config.model.get("num_classes", 1)}  # pixels; class ids
  rows = np.random.default_rng(0)
  with step_lib.mesh_context(mesh, rules):
    state = init()
    data = {k: jax.device_put(rows.integers(0, high[k], a.shape, dtype=a.dtype), a.sharding)
            for k, a in step_lib.abstract_batch(config, mesh).items()}
    rng = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
    start = time.perf_counter()
    step = step_lib.jit_train_step(graphdef, tx, config, mesh, shardings).lower(
        state, data, rng).compile()
    compile_s = time.perf_counter() - start
  return step, (state, data, rng), config, compile_s


def measure(name, precision, batch, steps, scan_layers=None):
  """(best seconds per step, compile seconds, config) of the jitted train step.

  Best of `steps` timed steps, like the best-of-5 matmul yardstick: on a shared machine the
  minimum is the least disturbed sample of both.
  """
  import jax  # pylint: disable=g-import-not-at-top
  step, (state, data, rng), config, compile_s = build(name, precision, batch, scan_layers)
  state, metrics = step(state, data, rng)  # warm-up
  jax.block_until_ready(metrics)
  best = float("inf")
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, data, rng)
    jax.block_until_ready((state, metrics))
    best = min(best, time.perf_counter() - start)
  return best, compile_s, config


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default=DEFAULT_RUNS,
                      help="comma-separated CONFIG:PRECISION:BATCH (configs/CONFIG.py)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
  parser.add_argument("--threads", type=int, default=2, help="XLA:CPU / BLAS threads (0: all)")
  parser.add_argument("--scan_layers", choices=("config", "true", "false"), default="config",
                      help="run the blocks as one scan (true) or unrolled (false)")
  args = parser.parse_args(argv)
  try:
    runs = parse_runs(args.runs)
  except ValueError as e:
    parser.error(str(e))
  for name, _, _ in runs:
    if importlib.util.find_spec(f"configs.{name}") is None:
      parser.error(f"--runs: no config configs/{name}.py")
  if args.steps < 1 or args.threads < 0:
    parser.error("--steps must be >= 1 and --threads >= 0")
  if args.threads:
    common.configure_threads(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.models import flops  # pylint: disable=g-import-not-at-top
  kind = jax.devices()[0].device_kind
  spec_tflops = common.device_peak_tflops(kind)
  for name, precision, batch in runs:
    before = common.matmul_peak_gflops(precision)  # the yardstick right before and after
    scan = None if args.scan_layers == "config" else args.scan_layers == "true"
    step_s, compile_s, config = measure(name, precision, batch, args.steps, scan)
    peak = max(before, common.matmul_peak_gflops(precision))
    gflops = batch * flops.flops_per_image(config.model)["train"] / step_s / 1e9
    common.emit(model=name, precision=precision, batch=batch, images_per_s=round(batch / step_s, 3),
                gflops_per_s=round(gflops, 1), peak_gflops_per_s=round(peak, 1),
                fraction_of_peak=round(gflops / peak, 3), step_s=round(step_s, 3),
                compile_s=round(compile_s, 1), threads=args.threads,
                scan_layers=bool(config.model.get("scan_layers", False)),
                device=common.device_description(), device_kind=kind,
                device_peak_tflops=spec_tflops,
                mfu=round(gflops / 1000 / spec_tflops, 4) if spec_tflops else None)


if __name__ == "__main__":
  cli.run(main, absl_flags=False, keep_freed_memory=True)
