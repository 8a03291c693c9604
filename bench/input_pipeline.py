"""Input pipeline throughput: random crops per second from TFRecord shards of sites.

Writes a temporary dataset (default 256 sites of 512²×6 uint8), then times the
training pipeline with 1 and 2 grain workers (plus 0 = in-process) producing
batches of 256² crops. Its yardstick, measured in the same run, is a bare
single-process loop doing the same work (read + CRC, decode, crop, stack) with no
grain. Prints one JSON line per configuration; the last line compares the best
rate with the train step's need (--need_images_per_s) and the 2,000 crops/s goal.

  python bench/input_pipeline.py [--sites=256] [--need_images_per_s=...]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from absl import flags
import numpy as np

from mae_jax import input_pipeline
from mae_jax import records

GOAL_CROPS_PER_S = 2000.0


def write_dataset(out_dir, sites, size, channels, shards, seed=0):
  rng = np.random.default_rng(seed)
  names = [f"w{c + 1}" for c in range(channels)]
  entries, per_shard = [], -(-sites // shards)
  for s in range(shards):
    path = f"shard-{s:03d}.tfrecord"
    with records.ShardWriter(os.path.join(out_dir, path)) as w:
      for i in range(s * per_shard, min(sites, (s + 1) * per_shard)):
        image = rng.integers(0, 256, (size, size, channels), np.uint8)
        w.write(image, names, {"site": i, "well": f"A{i % 24 + 1:02d}"})
    entries.append({"path": path, "records": w.count})
  return records.write_manifest(out_dir, {
      "layout": "bench", "shards": entries, "num_records": sites,
      "image_shape": [size, size, channels], "channels": names, "dtype": "uint8"})


def bare_loop(manifest, crop, batch, batches, seed=0):
  """The batch function alone in one process, no grain: the per-core yardstick."""
  _, source = input_pipeline.open_dataset(manifest)
  rng = np.random.default_rng(seed)
  order = rng.permutation(batch * batches) % len(source)
  draw, crop_batch = input_pipeline.DrawCrop(), input_pipeline.CropBatch(source, crop)
  start = time.perf_counter()
  for b in range(batches):
    crop_batch([draw(i, rng) for i in order[b * batch:(b + 1) * batch]])
  return time.perf_counter() - start


def time_pipeline(manifest, workers, crop, batch, batches, threads):
  it = input_pipeline.train_iterator(manifest, global_batch_size=batch, crop_size=crop,
                                     num_workers=workers, read_threads=threads)
  try:
    start = time.perf_counter()
    next(it)  # Spawning workers and filling buffers is not throughput.
    startup = time.perf_counter() - start
    for _ in range(3):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      shape = next(it)["image"].shape
    seconds = time.perf_counter() - start
  finally:
    it.close()
  assert shape == (batch, crop, crop, 6) or shape[0] == batch, shape
  return seconds, startup


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sites", type=int, default=256)
  parser.add_argument("--site_size", type=int, default=512)
  parser.add_argument("--channels", type=int, default=6)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--crop", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=60, help="timed batches per run")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--need_images_per_s", type=float, default=None,
                      help="train-step speed (ViT-S/16 images/s) the pipeline must feed")
  parser.add_argument("--data_dir", default=None, help="reuse/keep the dataset here")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags in its workers (grain #1355).

  data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_input_")
  try:
    manifest = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(manifest):
      start = time.perf_counter()
      os.makedirs(data_dir, exist_ok=True)
      write_dataset(data_dir, args.sites, args.site_size, args.channels, args.shards)
      print(json.dumps({"dataset": data_dir, "sites": args.sites,
                        "site_shape": [args.site_size, args.site_size, args.channels],
                        "write_s": round(time.perf_counter() - start, 2)}), flush=True)
    crops = args.batch * args.batches
    seconds = bare_loop(manifest, args.crop, args.batch, args.batches)
    print(json.dumps({"workers": "bare_loop", "crops_per_s": round(crops / seconds, 1),
                      "batch": args.batch, "crop": args.crop, "seconds": round(seconds, 3),
                      "note": "yardstick: same work, one process, no grain"}), flush=True)
    best = 0.0
    for workers in [int(w) for w in args.workers.split(",")]:
      seconds, startup = time_pipeline(manifest, workers, args.crop, args.batch,
                                       args.batches, args.read_threads)
      rate = crops / seconds
      best = max(best, rate)
      print(json.dumps({"workers": workers, "crops_per_s": round(rate, 1),
                        "batch": args.batch, "crop": args.crop, "batches": args.batches,
                        "seconds": round(seconds, 3), "startup_s": round(startup, 2),
                        "read_threads": args.read_threads, "cpus": os.cpu_count()}),
            flush=True)
    summary = {"best_crops_per_s": round(best, 1), "goal_crops_per_s": GOAL_CROPS_PER_S,
               "meets_goal": best >= GOAL_CROPS_PER_S,
               "need_images_per_s": args.need_images_per_s}
    if args.need_images_per_s:
      summary["meets_need"] = best >= args.need_images_per_s
      summary["headroom"] = round(best / args.need_images_per_s, 2)
    print(json.dumps(summary), flush=True)
  finally:
    if args.data_dir is None:
      shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
