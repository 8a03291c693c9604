"""Input pipeline throughput: random crops per second from TFRecord shards of sites.

Writes a temporary dataset (default 256 sites of 512²×6 uint8), then times the
training pipeline with 1 and 2 grain workers (plus 0 = reader threads in the
main process) producing batches of 32 crops of 256². Its yardstick, measured in
the same run, is the batch function alone in one thread without grain (read +
CRC, decode, crop into the batch). Every line also gives the CPU time per crop
of all processes, which stays meaningful when other jobs share the machine.
The last line compares the best rate with the 2,000 crops/s goal and, with
--need_images_per_s, with the train step's appetite.

  python bench/input_pipeline.py [--sites=256] [--need_images_per_s=...]
"""
import json
import os
import shutil
import tempfile
import time

from absl import flags
import numpy as np

from mae_jax.data import input_pipeline
from mae_jax.data import records
from mae_jax.util import cli

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


def bare_loop(manifest, crop, batch, batches, verify_crc, seed=0):
  """The batch function alone in one process, no grain: the per-core yardstick."""
  _, source = input_pipeline.open_dataset(manifest, verify_crc=verify_crc)
  draws = input_pipeline.ShuffledDraws(len(source), seed)
  crop_batch = input_pipeline.CropBatch(source, crop)
  start = time.perf_counter()
  for b in range(batches):
    crop_batch([draws[i] for i in range(b * batch, (b + 1) * batch)])
  return time.perf_counter() - start


def cpu_seconds():
  """CPU time of this process and its children (grain workers) so far."""
  times = os.times()
  total, me = times.user + times.system, str(os.getpid())
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if fields[1] == me:
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  return total


def time_pipeline(manifest, workers, crop, batch, batches, threads, verify_crc):
  it = input_pipeline.train_iterator(manifest, global_batch_size=batch, crop_size=crop,
                                     num_workers=workers, read_threads=threads,
                                     verify_crc=verify_crc)
  try:
    start = time.perf_counter()
    next(it)  # Spawning workers and filling buffers is not throughput.
    startup = time.perf_counter() - start
    for _ in range(3):
      next(it)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
      shape = next(it)["image"].shape
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  finally:
    it.close()
  assert shape[:3] == (batch, crop, crop), shape
  return seconds, cpu, startup


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sites", type=int, default=256)
  parser.add_argument("--site_size", type=int, default=512)
  parser.add_argument("--channels", type=int, default=6)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--crop", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=60, help="timed batches per run")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--read_threads", default="2",
                      help="comma-separated reader threads per process")
  parser.add_argument("--verify_crc", type=int, default=1)
  parser.add_argument("--need_images_per_s", type=float, default=None,
                      help="train-step speed (ViT-S/16 images/s) the pipeline must feed")
  parser.add_argument("--data_dir", default=None,
                      help="keep the dataset here, or reuse the one already there")
  args = parser.parse_args(argv)
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
    cpu = time.process_time()
    seconds = bare_loop(manifest, args.crop, args.batch, args.batches, bool(args.verify_crc))
    cpu = time.process_time() - cpu
    print(json.dumps({"yardstick": "bare_loop", "crops_per_s": round(crops / seconds, 1),
                      "cpu_ms_per_crop": round(1e3 * cpu / crops, 3),
                      "batch": args.batch, "crop": args.crop, "seconds": round(seconds, 3),
                      "loadavg_1m": round(os.getloadavg()[0], 2),
                      "note": "yardstick: the batch function alone, one thread, no grain"}),
          flush=True)
    best = (0.0, None, None)
    for workers in [int(w) for w in args.workers.split(",")]:
      for threads in [int(t) for t in args.read_threads.split(",")]:
        seconds, cpu, startup = time_pipeline(manifest, workers, args.crop, args.batch,
                                              args.batches, threads, bool(args.verify_crc))
        rate = crops / seconds
        best = max(best, (rate, workers, threads))
        # cpu_ms_per_crop counts the main process and the workers: on a shared
        # machine it tells the cost where crops_per_s only tells the share we got.
        print(json.dumps({"workers": workers, "crops_per_s": round(rate, 1),
                          "cpu_ms_per_crop": round(1e3 * cpu / crops, 3),
                          "batch": args.batch, "crop": args.crop, "batches": args.batches,
                          "seconds": round(seconds, 3), "startup_s": round(startup, 2),
                          "read_threads": threads, "verify_crc": bool(args.verify_crc),
                          "cpus": os.cpu_count(),
                          "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    summary = {"best_crops_per_s": round(best[0], 1), "best_workers": best[1],
               "best_read_threads": best[2], "goal_crops_per_s": GOAL_CROPS_PER_S,
               "meets_goal": best[0] >= GOAL_CROPS_PER_S,
               "loadavg_1m": round(os.getloadavg()[0], 2)}
    if args.need_images_per_s:  # The train step's appetite, e.g. ViT-S/16 images/s.
      summary.update(need_images_per_s=args.need_images_per_s,
                     meets_need=best[0] >= args.need_images_per_s,
                     headroom=round(best[0] / args.need_images_per_s, 2))
    print(json.dumps(summary), flush=True)
  finally:
    if args.data_dir is None:
      shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
