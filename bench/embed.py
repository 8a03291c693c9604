"""Embedding throughput of an MAE encoder (what `eval.recall --ckpt` spends its time on).

    python -m bench.embed [--config=vits16] [--batch=32] [--threads=2] [--precision=float32]
    python -m bench.embed --processes=1,2 [--sites=48] [--threads=2]

Prints JSON lines: the machine's matmul peak measured in this process, then
{"model", "batch", "crops_per_s", "gflops_per_s", "peak_gflops_per_s", "fraction_of_peak"} where the
FLOPs come from `mae_jax/models/flops.py` (2 per multiply-accumulate, norms and softmax not counted).

With --processes, the real command instead: `python -m eval.embed` of the config's model at random
init on a screen of random 2x2-tile sites, run as 1, 2, ... processes on localhost
(jax.distributed, --threads shared out among them), one line per count: {"processes",
"crops_per_s_per_process", "crops_per_s" (their sum, after each process's first batch),
"wall_s" (launch to last exit: start-up, restore and compile included), "fraction_of_peak" (of
this process's matmul yardstick on all --threads), "scaling" (crops_per_s over the 1-process
figure)}.
"""
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import common
from mae_jax.util import cli


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="vits16", help="a config module name in configs/")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--threads", type=int, default=2, help="XLA:CPU / BLAS threads (0: all)")
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--seconds", type=float, default=20.0, help="time spent measuring")
  p.add_argument("--processes", default=None, help="comma-separated process counts of eval.embed")
  p.add_argument("--sites", type=int, default=48, help="sites of the --processes screen")
  args = p.parse_args(argv)
  if args.threads:
    common.configure_threads(args.threads)
  if args.processes:
    return scaling(args, [int(n) for n in args.processes.split(",")])

  import jax
  import numpy as np
  from flax import nnx
  from mae_jax.models import flops, mae, registry
  from mae_jax.train import cpu_options

  peak = common.matmul_peak_gflops(args.precision)
  common.emit(yardstick="matmul", dtype=args.precision, peak_gflops_per_s=peak,
              device=common.device_description())

  config = importlib.import_module(f"configs.{args.config}").get_config()
  with nnx.use_eager_sharding(False):
    model = registry.build_model(config.model, dtype=mae.compute_dtype(args.precision))
  graphdef, state = nnx.split(model)
  embed = cpu_options.jit_embed(lambda state, x: nnx.merge(graphdef, state).embed(x))
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


def scaling(args, counts):
  import numpy as np
  import portpicker
  from mae_jax.data import records
  from mae_jax.models import flops
  from mae_jax.weights import transfer
  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.precision = args.precision
  size, channels = config.model.image_size, config.model.channels
  with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    with records.ShardWriter(os.path.join(tmp, "screen.tfrecord")) as w:
      for i in range(args.sites):  # 2 sites a well, a 2x2 grid of tiles a site
        w.write(rng.integers(0, 255, (2 * size, 2 * size, channels), np.uint8),
                [f"w{c + 1}" for c in range(channels)],
                {"well_id": f"well{i // 2}", "experiment": "e1", "plate": "1",
                 "well": f"A{i // 2:02d}", "site": i % 2 + 1, "perturbation": f"g{i // 4}",
                 "gene": f"g{i // 4}", "is_control": False})
    manifest = records.write_manifest(tmp, {
        "format": records.FORMAT, "layout": "bench", "num_records": args.sites,
        "shards": [{"path": "screen.tfrecord", "records": args.sites}],
        "image_shape": [2 * size, 2 * size, channels], "dtype": "uint8",
        "channels": [f"w{c + 1}" for c in range(channels)], "num_wells": args.sites // 2,
        "channel_stats": {"mean": [127.0] * channels, "std": [73.0] * channels}})
    ckpt = transfer.save_random_init(config, os.path.join(tmp, "run"))
    gflop = flops.flops_per_image(config.model)["embed"] / 1e9
    peak = common.matmul_peak_gflops(args.precision)  # all --threads of this machine
    base = None
    for n in counts:
      env = dict(os.environ, **(common.thread_env(max(args.threads // n, 1)) if args.threads else {}))
      port = portpicker.pick_unused_port()
      command = [sys.executable, "-m", "eval.embed", f"--ckpt={ckpt}", f"--manifest={manifest}",
                 f"--out={os.path.join(tmp, f'wells_{n}')}", f"--batch_size={args.batch}"]
      if n > 1:
        command += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}"]
      start = time.perf_counter()
      procs = [subprocess.Popen(command + ([f"--process_id={i}"] if n > 1 else []), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(n)]
      outs = [p.communicate() for p in procs]
      wall = time.perf_counter() - start
      failed = [err.strip().splitlines()[-1:] for p, (_, err) in zip(procs, outs) if p.returncode]
      if failed:
        raise cli.UserError(f"eval.embed with {n} processes failed: {failed[0]}")
      results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
      rates = [r["crops_per_s"] for r in results]
      if n == 1:
        base = sum(rates)
      common.emit(model=args.config, precision=args.precision, batch=args.batch, processes=n,
                  threads_per_process=max(args.threads // n, 1) if args.threads else None,
                  sites=args.sites, crops=sum(r["crops"] for r in results), crops_per_s_per_process=rates,
                  crops_per_s=sum(rates), wall_s=wall, peak_gflops_per_s=peak,
                  fraction_of_peak=sum(rates) * gflop / peak,
                  scaling=sum(rates) / base if base else None)


if __name__ == "__main__":
  cli.run(main, absl_flags=False, keep_freed_memory=True)
