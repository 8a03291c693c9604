"""Compile time and FLOPs of the same train step with scanned and with unrolled blocks.

  python -m bench.compile_time [--config=configs/vitl16.py] [--batch=8] [--devices=8]
                               [--fsdp=-1] [--remat]

One process, fake CPU devices (XLA_FLAGS is set before jax is imported), the real train step
(bench/train_step.py's, jit_train_step) lowered over the sharded abstract state and compiled,
first with model.scan_layers=True, then False. One JSON line per layout: lower_s, compile_s,
seconds (both), xla_step_flops (XLA's cost analysis, per device x devices) and
analytical_step_flops (mae_jax/models/flops.py x batch); then a summary line.

XLA's cost analysis counts the body of a while loop once, whatever its trip count, so the scanned
step's raw count holds one encoder and one decoder layer. The summary counts it per trip: the
FLOPs of one layer are what unrolling that scan by 2 (mae.SCAN_UNROLL) adds to the count, and
the scanned total is raw + (depth - 1) x one encoder layer + (decoder_depth - 1) x one decoder
layer; that is set against the unrolled step's count (two more compiles of the scanned step).
"""
import importlib
import os
import pathlib
import sys
import time

from bench import common
from mae_jax.util import cli


def load_config(spec: str):
  """configs/NAME.py or NAME -> that config."""
  name = pathlib.Path(spec).stem
  if importlib.util.find_spec(f"configs.{name}") is None:
    raise ValueError(f"--config: no config configs/{name}.py")
  return importlib.import_module(f"configs.{name}").get_config()


def compile_step(config, devices, unroll=None) -> dict:
  """Lowers and compiles the train step of `config` on `devices`: seconds and XLA's FLOPs."""
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  from mae_jax.train import sharding, step as step_lib  # pylint: disable=g-import-not-at-top
  mae.SCAN_UNROLL.clear()
  mae.SCAN_UNROLL.update(unroll or {})
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  t0 = time.perf_counter()
  graphdef, tx, abstract, _ = step_lib.build_state(config, mesh)
  lowered = step_lib.lower_train_step(graphdef, tx, config, mesh, abstract)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mae.SCAN_UNROLL.clear()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(lower_s=lower_s, compile_s=compile_s, mesh=dict(mesh.shape),
              xla_step_flops=float(cost.get("flops", 0.0)) * len(devices))


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/vitl16.py", help="configs/NAME.py or NAME")
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
  parser.add_argument("--fsdp", type=int, default=-1,
                      help="mesh fsdp size (-1: all devices); data takes the rest")
  parser.add_argument("--remat", action="store_true", help="config.remat=True")
  parser.add_argument("--threads", type=int, default=0, help="XLA:CPU threads (0: all)")
  args = parser.parse_args(argv)
  if args.devices < 1 or args.batch < 1:
    parser.error("--devices and --batch must be >= 1")
  if "jax" in sys.modules:
    parser.error("run as `python -m bench.compile_time`: jax must not be imported yet")
  if args.threads:
    common.configure_threads(args.threads)
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={args.devices}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.models import flops  # pylint: disable=g-import-not-at-top
  # Compiles are what this measures: a persistent cache set in the environment
  # (JAX_COMPILATION_CACHE_DIR) would time a cache read, and its executables carry no cost analysis.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    config = load_config(args.config)
  except ValueError as e:
    parser.error(str(e))
  config.update(batch_size=args.batch, remat=args.remat)
  config.mesh.update(data=-1 if args.fsdp != -1 else 1, fsdp=args.fsdp, tensor=1)
  devices = jax.devices()[:args.devices]
  m = config.model
  analytical = flops.flops_per_image(m)["train"] * args.batch
  rows = {}
  for scan in (True, False):  # scanned first: it does not profit from a warm process
    config.model.scan_layers = scan
    r = compile_step(config, devices)
    rows[scan] = r
    common.emit(bench="compile_time", config=config.name, scan_layers=scan, batch=args.batch,
                devices=args.devices, mesh=r["mesh"], remat=args.remat,
                lower_s=round(r["lower_s"], 1), compile_s=round(r["compile_s"], 1),
                seconds=round(r["lower_s"] + r["compile_s"], 1),
                xla_step_flops=r["xla_step_flops"], analytical_step_flops=analytical)
  # One layer of each scan: what unrolling it by 2 adds to XLA's count.
  config.model.scan_layers = True
  base = rows[True]["xla_step_flops"]
  layer = {name: compile_step(config, devices, {name: 2})["xla_step_flops"] - base
           for name in ("blocks", "decoder_blocks")}
  per_trip = base + (m.depth - 1) * layer["blocks"] + (m.decoder_depth - 1) * layer[
      "decoder_blocks"]
  scanned_s = rows[True]["lower_s"] + rows[True]["compile_s"]
  unrolled_s = rows[False]["lower_s"] + rows[False]["compile_s"]
  unrolled_flops = rows[False]["xla_step_flops"]
  common.emit(bench="compile_time_summary", config=config.name,
              speedup=round(unrolled_s / scanned_s, 2),
              scanned_s=round(scanned_s, 1), unrolled_s=round(unrolled_s, 1),
              xla_flops_unrolled=unrolled_flops, xla_flops_scanned_raw=base,
              xla_flops_encoder_layer=layer["blocks"],
              xla_flops_decoder_layer=layer["decoder_blocks"],
              xla_flops_scanned_per_trip=per_trip,
              flops_ratio_scanned_to_unrolled=round(per_trip / unrolled_flops, 5),
              analytical_step_flops=analytical,
              xla_unrolled_to_analytical=round(unrolled_flops / analytical, 4),
              device=common.device_description())


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
