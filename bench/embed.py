"""Embedding throughput of an MAE encoder (what `eval.recall --ckpt` spends its time on).

    python -m bench.embed [--config=vits16] [--batch=32] [--threads=2] [--precision=float32]

Prints JSON lines: the machine's matmul peak measured in this process, then
{"model", "batch", "crops_per_s", "gflops_per_s", "peak_gflops_per_s", "fraction_of_peak"} where the
FLOPs come from `mae_jax/models/flops.py` (2 per multiply-accumulate, norms and softmax not counted).
"""
import importlib
import time

from bench import common
from mae_jax.util import cli


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="vits16", help="a config module name in configs/")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--seconds", type=float, default=20.0, help="time spent measuring")
  args = p.parse_args(argv)
  common.configure_threads(args.threads)

  import jax
  import numpy as np
  from flax import nnx
  from mae_jax.models import flops, mae, registry

  peak = common.matmul_peak_gflops(args.precision)
  common.emit(yardstick="matmul", dtype=args.precision, peak_gflops_per_s=peak,
              device=common.device_description())

  config = importlib.import_module(f"configs.{args.config}").get_config()
  with nnx.use_eager_sharding(False):
    model = registry.build_model(config.model, dtype=mae.compute_dtype(args.precision))
  graphdef, state = nnx.split(model)
  embed = jax.jit(lambda state, x: nnx.merge(graphdef, state).embed(x))
  m = config.model
  images = jax.device_put(np.random.default_rng(0).integers(
      0, 255, (args.batch, m.image_size, m.image_size, m.channels), dtype=np.uint8))
  embed(state, images).block_until_ready()  # compile

  calls, start = 0, time.perf_counter()
  best = float("inf")
  while time.perf_counter() - start < args.seconds or calls < 3:
    t = time.perf_counter()
    embed(state, images).block_until_ready()
    best = min(best, time.perf_counter() - t)
    calls += 1
  crops_per_s = args.batch / best
  gflops = flops.flops_per_image(m)["embed"] / 1e9 * crops_per_s
  common.emit(model=args.config, precision=args.precision, batch=args.batch, threads=args.threads,
              crops_per_s=crops_per_s, seconds_per_batch=best, calls=calls, gflops_per_s=gflops,
              peak_gflops_per_s=peak, fraction_of_peak=gflops / peak)


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
