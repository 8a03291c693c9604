r"""Turns a screen on disk into TFRecord shards + .idx indexes + manifest.json.

  python -m data_prep.convert --layout=rxrx1 --root=/data/rxrx1 --out=/data/rxrx1_tfr
  python -m data_prep.convert --layout=rxrx3 --root=synth/ --out=synth_tfr --image_size=512

Layouts (docs/data_layouts.md):
  rxrx1       metadata.csv + images/{experiment}/Plate{plate}/{well}_s{site}_w{1..6}.png, 512² 8-bit
  rxrx3       metadata.csv + images/{experiment_name}/Plate{plate}/{address}_s1_w{1..6}.png,
              2048² 16-bit
  rxrx3_core  *.parquet under --root (rows: __key__, jp2 struct<bytes, path>), 512² 8-bit JPEG-2000,
              joined to metadata_rxrx3_core.csv when present
  loaddata    CellProfiler LoadData CSVs (JUMP Cell Painting): --root is one CSV or a folder of
              them; FileName_Orig<Ch>/PathName_Orig<Ch> per channel of --channels (default
              DNA,ER,RNA,AGP,Mito), Metadata_Plate/Well/Site, --perturbation_column; TIFF (one
              per channel, or one multi-page TIFF per site) or PNG, 8/16-bit, any size
  manifest    a CSV (--root is the CSV or a folder holding sites.csv), one row per site; channel
              columns are --channel_columns, else every column named ch<N> or w<N> (any case), in
              CSV order; paths relative to the CSV; TIFF/PNG, 8/16-bit; the other columns become
              metadata (experiment, plate, well|address, site, perturbation|treatment, gene,
              well_id, perturbation_type, is_control, cell_type, concentration, smiles|SMILES feed
              the standard keys; without is_control, labels ending in "_control" are controls)

Output: OUT/shards/{experiment}_P{plate}-{k:05d}.tfrecord (+ .idx, + .stats.json), sites sorted by
experiment, plate, well, site; OUT/manifest.json is written last. A shard is finished when its
.tfrecord, .idx and .stats.json (which records what went in) exist and match the plan, so
rerunning an interrupted command converts only the rest and gives byte-identical output.
Every file is written under a temporary name and renamed when complete (mae_jax/util/files.py),
so no reader sees half a shard. --out may be an object store (gs://...: etils.epath).

With --runner (DirectRunner, PrismRunner, DataflowRunner, FlinkRunner, SparkRunner; the `beam`
extra) the same shards are written by an Apache Beam pipeline, one shard per element
(data_prep/beam_convert.py); other flags after it are Beam pipeline options:

  python -m data_prep.convert --layout=loaddata --root=gs://b/load_data --out=gs://b/tfr \
      --runner=DataflowRunner --project=P --region=us-central1 --temp_location=gs://b/tmp \
      --setup_file=./setup.py                     (launch/README.md)
"""
import argparse
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time

from data_prep import layouts
from data_prep.layouts import common
from data_prep.layouts.common import ConvertError, Site
# One shard's writing, shared with the Beam pipeline (data_prep/beam_convert.py).
from data_prep.shards import Task, clear_leftovers, finished, out_path, write_shard
from mae_jax.data import records
from mae_jax.util import cli, progress as progress_lib

RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")
PLAN_VERSION = 1


# ---------------------------------------------------------------- planning


def _safe(text: str) -> str:
  """File-name-safe and injective: other characters become +<hex>+."""
  return re.sub(r"[^A-Za-z0-9._-]", lambda m: f"+{ord(m.group()):x}+", text) or "none"


def plan(sites: list[Site], sites_per_shard: int, expect: dict) -> list[Task]:
  """Shards per (experiment, plate), in site order; names are stable across reruns."""
  groups = {}
  for s in sites:
    groups.setdefault((s.experiment, s.plate), []).append(s)
  tasks, owners = [], {}
  for (exp, plate), members in groups.items():
    name = f"{_safe(exp)}_P{_safe(plate)}"
    if owners.setdefault(name, (exp, plate)) != (exp, plate):
      raise ConvertError(f"experiment/plate {owners[name]} and {(exp, plate)} both map to shard "
                         f"name {name}; rename one of them")
    for k in range(math.ceil(len(members) / sites_per_shard)):
      chunk = members[k * sites_per_shard:(k + 1) * sites_per_shard]
      tasks.append(Task(f"shards/{name}-{k:05d}.tfrecord", chunk))
  for t in tasks:
    blob = json.dumps([PLAN_VERSION, t.path, expect, [
        (s.key, s.channels, [common.describe(x) for x in s.sources], s.metadata)
        for s in t.sites]], sort_keys=True, default=str)
    t.digest = hashlib.sha256(blob.encode()).hexdigest()
  return tasks


def probe(layout: str, site: Site, image_size: int, declared: dict | None = None,
          flag: int | None = None) -> dict:
  """Size and bit depth every site must have, from the flags, the screen's own metadata
  (`declared`: layouts.declared_format) and the first site; `flag` is the --image_size given."""
  image = next(layouts.iter_images([site]))[1]
  h, w, c = image.shape
  where = f"site {site.key} ({common.describe(site.sources[0])})"
  if declared and flag and flag != declared["image_size"] and (h, w) != (flag, flag):
    size = declared["image_size"]
    raise ConvertError(f"--image_size={flag} but {declared['path']} says this screen's sites are "
                       f"{size}x{size} (and {where} is {h}x{w}): drop --image_size to use the "
                       f"screen's own size")
  if declared and image.dtype.name != declared["dtype"]:
    raise ConvertError(f"{where}: {image.dtype}, but {declared['path']} says the screen is "
                       f"{declared['dtype']}")
  if image_size and (h, w) != (image_size, image_size):
    raise ConvertError(f"{where}: {h}x{w}, expected {image_size}x{image_size} "
                       f"(--image_size={image_size}; 0 accepts any size)")
  # --image_size=0: any height and width (JUMP's 1080², say), stored as they are; training crops
  # and evaluation tiles fit inside (docs/data_layouts.md "Any image size").
  real_dtype = layouts.REAL_DTYPE[layout]
  if image_size == layouts.REAL_SIZE[layout] and real_dtype and image.dtype.name != real_dtype:
    raise ConvertError(f"{where}: {image.dtype}, but real {layout} sites of {h}x{w} are "
                       f"{real_dtype}")
  return {"shape": [h, w, c], "dtype": image.dtype.name, "channels": list(site.channels),
          "ref": site.key, "ref_source": common.describe(site.sources[0])}


# ---------------------------------------------------------------- worker processes


_counter = None
_writing = False


def _on_sigterm(*_):
  # Pool.terminate() (after another worker failed) sends SIGTERM: unwinding through Python lets
  # ShardWriter remove its .tmp; an idle worker just leaves.
  if _writing:
    sys.exit(1)
  os._exit(0)  # pylint: disable=protected-access


def _init_worker(counter):
  global _counter
  _counter = counter
  signal.signal(signal.SIGTERM, _on_sigterm)


def _count_site():
  with _counter.get_lock():
    _counter.value += 1


def _pool_task(task, out, expect):
  global _writing
  _writing = True
  try:
    return write_shard(task, out, expect, _count_site)
  finally:
    _writing = False


# ---------------------------------------------------------------- the whole conversion


def _run(tasks, out, expect, workers, bar) -> list[dict]:
  if workers <= 1 or len(tasks) <= 1:
    return [write_shard(t, out, expect, lambda: bar.update(1)) for t in tasks]
  ctx = multiprocessing.get_context("spawn")  # fork after pyarrow has threads is unsafe
  counter = ctx.Value("q", 0)
  start = bar.n
  with ctx.Pool(min(workers, len(tasks)), _init_worker, (counter,)) as pool:
    pending = {i: pool.apply_async(_pool_task, (t, out, expect)) for i, t in enumerate(tasks)}
    results = {}
    while pending:
      next(iter(pending.values())).wait(0.2)
      for i in [i for i, r in pending.items() if r.ready()]:
        results[i] = pending.pop(i).get()  # re-raises a worker's error here, at once
      bar.update(start + counter.value - bar.n)
    pool.close()  # let idle workers exit on their own; terminate() is for the error path
    pool.join()
  return [results[i] for i in range(len(tasks))]


def _manifest(layout, root, sites, tasks, stats, expect, flags) -> dict:
  n = sum(s["pixels"] for s in stats)
  channels = len(expect["channels"])
  total = [sum(s["sum"][c] for s in stats) for c in range(channels)]
  total_sq = [sum(s["sumsq"][c] for s in stats) for c in range(channels)]
  types = {}
  for s in sites:
    t = s.metadata["perturbation_type"]
    types[t] = types.get(t, 0) + 1
  return {
      "layout": layout,
      "shards": [{"path": t.path, "records": s["records"]} for t, s in zip(tasks, stats)],
      "num_records": sum(s["records"] for s in stats),
      "image_shape": expect["shape"],
      "channels": expect["channels"],
      "dtype": expect["dtype"],
      "channel_stats": {
          "mean": [t / n for t in total],
          "std": [math.sqrt((n * q - t * t) / (n * n)) for t, q in zip(total, total_sq)],
          "min": [min(s["min"][c] for s in stats) for c in range(channels)],
          "max": [max(s["max"][c] for s in stats) for c in range(channels)],
          "pixels_per_channel": n,
      },
      "num_wells": len({s.metadata["well_id"] for s in sites}),
      "experiments": sorted({s.experiment for s in sites}, key=common.natural_key),
      "source_root": root if common.is_remote(root) else os.path.abspath(root),
      "counts": {
          "sites": len(sites),
          "wells": len({s.metadata["well_id"] for s in sites}),
          "plates": len({(s.experiment, s.plate) for s in sites}),
          "experiments": len({s.experiment for s in sites}),
          "controls": sum(bool(s.metadata["is_control"]) for s in sites),
          "perturbations": len({s.metadata["perturbation"] for s in sites} - {""}),
          "perturbation_types": dict(sorted(types.items())),
      },
      "convert_flags": flags,
  }


def convert(layout: str, root: str, out: str, workers: int = 1, sites_per_shard: int = 256,
            image_size: int | None = None, limit: int = 0, metadata: str | None = None,
            channel_columns=None, skip_missing_plates: bool = False,
            progress: str = "auto", progress_every: float = 30.0, channels=None,
            perturbation_column: str | None = None, runner: str | None = None,
            beam_args=()) -> dict:
  """Converts (or finishes converting) a screen; returns the summary printed by the CLI.

  With workers > 1 it starts `spawn` processes, so a calling script needs the usual
  `if __name__ == "__main__":` guard. With a Beam `runner` the unfinished shards are written by
  data_prep/beam_convert.py (`beam_args`: Beam pipeline options) and `workers` is unused; the
  shards and manifest are byte-identical either way.
  """
  t0 = time.time()
  if not (common.is_remote(root) or os.path.exists(root)):
    raise ConvertError(f"--root {root}: no such file or folder")
  # An explicit --image_size wins; else the screen's own metadata, else the layout's real size.
  declared, flag = layouts.declared_format(layout, root), image_size
  if image_size is None:
    image_size = declared["image_size"] if declared else layouts.REAL_SIZE[layout] or 0
  sites = layouts.list_sites(layout, root, metadata, channel_columns, skip_missing_plates,
                             channels, perturbation_column)
  if limit:
    sites = sites[:limit]
  if not sites:
    raise ConvertError(f"{root}: no sites found for layout {layout}")
  expect = probe(layout, sites[0], image_size, declared, flag)
  tasks = plan(sites, sites_per_shard, expect)

  out_path(out, "shards").mkdir(parents=True, exist_ok=True)
  stats = [finished(t, out) for t in tasks]
  todo = [i for i, s in enumerate(stats) if s is None]
  for i in todo:  # leftovers of a killed run; ShardWriter would overwrite most of them anyway
    clear_leftovers(tasks[i], out)
  done_sites = sum(len(t.sites) for t, s in zip(tasks, stats) if s)
  if runner:
    from data_prep import beam_convert  # pylint: disable=g-import-not-at-top
    new = beam_convert.run([tasks[i] for i in todo], out, expect, runner, beam_args)
  else:
    # A bar on a terminal, else a line every `progress_every` s (mae_jax/util/progress.py).
    bar = progress_lib.Progress(len(sites), initial=done_sites, unit="site",
                                desc="data_prep.convert", mode=progress, every=progress_every)
    try:
      new = _run([tasks[i] for i in todo], out, expect, workers, bar)
    finally:
      bar.close()
  for i, s in zip(todo, new):
    stats[i] = s
  flags = {"image_size": image_size, "sites_per_shard": sites_per_shard, "limit": limit}
  path = records.write_manifest(out, _manifest(layout, root, sites, tasks, stats, expect, flags))
  seconds = time.time() - t0
  written = len(sites) - done_sites
  return {"manifest": path, "layout": layout, "num_records": len(sites),
          "num_wells": len({s.metadata["well_id"] for s in sites}), "shards": len(tasks),
          "shards_written": len(todo), "shards_skipped": len(tasks) - len(todo),
          "image_shape": expect["shape"], "dtype": expect["dtype"], "runner": runner or "local",
          "seconds": round(seconds, 3), "sites_per_s": round(written / max(seconds, 1e-9), 2)}


# ---------------------------------------------------------------- CLI


def _nonneg(text):
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"{value} is negative")
  return value


def _positive(text):
  value = _nonneg(text)
  if value == 0:
    raise argparse.ArgumentTypeError("must be at least 1")
  return value


def _stop_like_ctrl_c(signum, frame):
  # `kill` or a scheduler's SIGTERM stops the command as Ctrl-C does: the pool terminates its
  # workers, whose own handler removes their half-written shards. Killed outright instead, the
  # main process would leave its workers converting on, orphaned. Later SIGTERMs are ignored
  # while that cleanup runs.
  del frame
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  raise KeyboardInterrupt(signum)


def main(argv=None) -> int:
  """The command line; a user mistake raises a cli.UserError (cli.run shows it as one line)."""
  p = cli.ArgumentParser(prog="python -m data_prep.convert", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layout", required=True, choices=layouts.LAYOUTS)
  p.add_argument("--root", required=True, help="the screen's folder (manifest: the CSV or folder)")
  p.add_argument("--out", required=True, help="output folder (shards/ and manifest.json)")
  p.add_argument("--workers", type=_positive, default=os.cpu_count() or 1,
                 help="parallel processes, one shard each (default: all cores)")
  p.add_argument("--sites_per_shard", type=_positive, default=256)
  p.add_argument("--image_size", type=_nonneg, default=None,
                 help="expected square site size; default the size the screen's own metadata "
                      "states (ROOT/ground_truth/screen.json of data_prep.synthetic), else the "
                      "layout's real size (rxrx1 512, "
                      "rxrx3 2048, rxrx3_core 512; manifest and loaddata 0). 0 accepts any "
                      "height and width (JUMP: 1080x1080). At the real size the real bit depth "
                      "is checked too (rxrx1/rxrx3_core 8-bit, rxrx3 16-bit); otherwise all "
                      "sites must simply agree")
  p.add_argument("--limit", type=_nonneg, default=0, help="convert only the first N sites")
  p.add_argument("--metadata", default=None,
                 help="metadata CSV instead of ROOT/metadata.csv (rxrx1, rxrx3) or "
                      "ROOT/metadata_rxrx3_core.csv (rxrx3_core)")
  p.add_argument("--channel_columns", default=None,
                 help="manifest layout: comma-separated channel-path columns, in channel order")
  p.add_argument("--channels", default=None,
                 help="loaddata layout: comma-separated channel names, in the order stored, "
                      "each read from FileName_Orig<NAME> / PathName_Orig<NAME> (default "
                      "DNA,ER,RNA,AGP,Mito; add Brightfield for JUMP's sixth plane)")
  p.add_argument("--perturbation_column", default=None,
                 help="loaddata layout: the CSV column that names each well's perturbation "
                      "(e.g. Metadata_JCP2022 after joining JUMP's metadata)")
  p.add_argument("--runner", default=None, choices=RUNNERS,
                 help="write the shards with an Apache Beam pipeline on this runner (pip "
                      "install '.[beam]'); the flags it does not know are passed to Beam as "
                      "pipeline options (--project, --region, --temp_location, "
                      "--direct_num_workers, ...; launch/README.md). Default: local processes")
  p.add_argument("--skip_missing_plates", action="store_true",
                 help="rxrx1/rxrx3: drop metadata rows whose plate folder is absent (partial "
                      "downloads) instead of failing")
  p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                 help="progress on stderr: a tqdm bar (auto: when stderr is a terminal; "
                      "otherwise a line with done/total, rate and ETA every 30 s)")
  args, beam_args = p.parse_known_args(argv)
  if beam_args and not args.runner:
    p.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need "
            f"--runner)")
  cols = [c.strip() for c in args.channel_columns.split(",")] if args.channel_columns else None
  channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
  if (channels or args.perturbation_column) and args.layout != "loaddata":
    p.error("--channels and --perturbation_column apply to --layout=loaddata only")
  if cols is not None and args.layout != "manifest":
    p.error("--channel_columns applies to --layout=manifest only")
  if args.metadata and args.layout == "manifest":
    p.error("--metadata does not apply to --layout=manifest (its CSV is --root)")
  previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
  try:
    summary = convert(args.layout, args.root, args.out, args.workers, args.sites_per_shard,
                      args.image_size, args.limit, args.metadata, cols,
                      args.skip_missing_plates, args.progress, channels=channels,
                      perturbation_column=args.perturbation_column, runner=args.runner,
                      beam_args=beam_args)
  except KeyboardInterrupt as e:
    print("convert: interrupted; rerun the same command to resume", file=sys.stderr)
    return 128 + (e.args[0] if e.args else signal.SIGINT)
  finally:
    signal.signal(signal.SIGTERM, previous)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  # Run through the package module so that pickled tasks name data_prep.convert, not __main__.
  from data_prep import convert as _convert  # pylint: disable=g-import-not-at-top
  cli.run(_convert.main, absl_flags=False)
