"""Behaviours of data_prep.convert and eval.embed that tests/test_convert.py and the eval tests
leave out: --limit, --metadata, plates absent on disk, SIGTERM in the middle of a conversion,
and the tile -> site averaging and last-batch padding of embed_manifest."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from data_prep import convert
from eval import embed
from mae_jax.data import records
from mae_jax.models import mae
from mae_jax.util import cli
from test_convert import REPO, RXRX1_CSV, S, make_rxrx1, read_back, snapshot

# The sites of RXRX1_CSV in the converter's order (experiment, plate, well, site).
SORTED = ["HUVEC-01_1_B02_1", "HUVEC-01_1_B02_2", "HUVEC-01_1_B03_1", "HUVEC-01_1_O23_1",
          "HUVEC-01_2_C10_1", "HUVEC-24_1_B02_1", "HUVEC-24_1_B02_2", "U2OS-01_4_M23_2"]
KW = dict(workers=1, sites_per_shard=2, image_size=S, progress="off")


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  """The RxRx1 screen of test_convert.py (8 sites, 5 shards of <= 2 sites) and its conversion."""
  root = tmp_path_factory.mktemp("screen") / "rxrx1"
  make_rxrx1(root)
  out = root.parent / "reference"
  convert.convert("rxrx1", str(root), str(out), **KW)
  return root, snapshot(out)


def _site_ids(out):
  return [s["metadata"]["site_id"] for s in read_back(out)[1]]


def _cli_error(capsys, *argv):
  """The one stderr line of a refused `python -m data_prep.convert` (through cli.run)."""
  with pytest.raises(SystemExit) as e:
    cli.run(convert.main, ["--progress=off", *argv], absl_flags=False)
  err = capsys.readouterr().err
  assert e.value.code == cli.USAGE and err.count("\n") == 1 and "Traceback" not in err, err
  return err


def test_limit_takes_the_first_sites_and_a_full_rerun_completes_it(screen, tmp_path):
  root, reference = screen
  out = tmp_path / "out"
  limited = convert.convert("rxrx1", str(root), str(out), limit=3, **KW)
  manifest, _ = read_back(out)
  assert limited["num_records"] == manifest["num_records"] == 3
  assert _site_ids(out) == SORTED[:3]  # the first sites in sorted order, not CSV order
  assert manifest["convert_flags"]["limit"] == 3
  assert [s["path"] for s in manifest["shards"]] == [
      "shards/HUVEC-01_P1-00000.tfrecord", "shards/HUVEC-01_P1-00001.tfrecord"]
  # Without the limit: the full first shard is kept, the cut second one (1 of its 2 sites) is
  # rewritten, and the result is the uninterrupted conversion byte for byte.
  full = convert.convert("rxrx1", str(root), str(out), **KW)
  assert (full["shards_skipped"], full["shards_written"]) == (1, 4)
  assert snapshot(out) == reference


def test_metadata_flag_replaces_the_root_csv(screen, tmp_path, capsys):
  root, _ = screen
  rows = [l for l in RXRX1_CSV.splitlines()[1:] if not l.startswith("HUVEC-01")]
  csv = tmp_path / "subset.csv"
  csv.write_text("\n".join([RXRX1_CSV.splitlines()[0], *rows]) + "\n")
  root = shutil.copytree(root, tmp_path / "rxrx1",  # without ROOT/metadata.csv: not read
                         ignore=shutil.ignore_patterns("metadata.csv"))
  out = tmp_path / "out"
  assert convert.main(["--layout=rxrx1", f"--root={root}", f"--out={out}", f"--metadata={csv}",
                       "--image_size=256", "--workers=1", "--progress=off"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["num_records"] == 3 and summary["shards"] == 2
  assert _site_ids(out) == SORTED[5:]
  assert read_back(out)[0]["experiments"] == ["HUVEC-24", "U2OS-01"]
  # Without --metadata the missing ROOT/metadata.csv is the one-line error.
  err = _cli_error(capsys, "--layout=rxrx1", f"--root={root}", f"--out={tmp_path / 'out2'}")
  assert f"missing metadata file {root / 'metadata.csv'}" in err
  err = _cli_error(capsys, "--layout=manifest", f"--root={csv}", f"--out={out}",
                   f"--metadata={csv}")
  assert "--metadata does not apply to --layout=manifest" in err


def test_plates_missing_on_disk_fail_or_are_skipped_and_counted(screen, tmp_path, capsys):
  root, _ = screen
  root = shutil.copytree(root, tmp_path / "rxrx1")
  shutil.rmtree(root / "images" / "HUVEC-01" / "Plate2")  # a partial download: site C10_1
  args = ["--layout=rxrx1", f"--root={root}", "--image_size=256", "--workers=1"]
  err = _cli_error(capsys, *args, f"--out={tmp_path / 'strict'}")
  assert "Plate2/C10_s1_w1.png" in err and "HUVEC-01_2_C10_1" in err
  assert not (tmp_path / "strict").exists()

  out = tmp_path / "out"
  assert convert.main([*args, f"--out={out}", "--skip_missing_plates", "--progress=off"]) == 0
  captured = capsys.readouterr()
  assert ("convert: skipping 1 sites of 1 plates with no image folder (--skip_missing_plates)"
          in captured.err)
  summary = json.loads(captured.out.strip().splitlines()[-1])
  assert summary["num_records"] == 7 and summary["shards"] == 3  # one per plate left
  assert _site_ids(out) == [s for s in SORTED if s != "HUVEC-01_2_C10_1"]
  assert not list((out / "shards").glob("HUVEC-01_P2*"))

  # No plate at all: an error, after the note of what was skipped.
  shutil.rmtree(root / "images")
  with pytest.raises(SystemExit) as e:
    cli.run(convert.main, [*args, f"--out={tmp_path / 'none'}", "--skip_missing_plates"],
            absl_flags=False)
  err = capsys.readouterr().err
  assert e.value.code == cli.USAGE and "Traceback" not in err, err
  assert err.strip().splitlines()[-1] == (
      f"data_prep.convert: error: {root / 'metadata.csv'}: none of its plates has an image "
      "folder"), err
  assert not (tmp_path / "none").exists()


def _reader_opened(fifo, proc, timeout=60):
  """Opens `fifo` for writing once the converter has opened it for reading (ENXIO until then);
  the reader then blocks on that channel file, in the middle of its shard."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
      if e.errno != errno.ENXIO:
        raise
    assert proc.poll() is None and time.monotonic() < deadline, f"exit code {proc.poll()}"
    time.sleep(0.02)


def test_sigterm_mid_conversion_stops_the_workers_and_a_rerun_completes(screen, tmp_path):
  """`kill` of the command while its 2 workers write shards: the workers stop too, no
  half-written shard is left under a final name, and a rerun gives the uninterrupted output.

  FIFOs in place of two channel files hold both workers inside the last two shards (one with a
  site written, one with none), so the signal lands at a known point: the first three shards
  are finished and no worker is between tasks.
  """
  root = shutil.copytree(screen[0], tmp_path / "rxrx1")
  convert.convert("rxrx1", str(root), str(tmp_path / "reference"), **KW)
  reference = snapshot(tmp_path / "reference")  # manifest.json names this root
  images = root / "images"
  fifos = {images / "HUVEC-24" / "Plate1" / "B02_s2_w3.png": "HUVEC-24_P1-00000",
           images / "U2OS-01" / "Plate4" / "M23_s2_w1.png": "U2OS-01_P4-00000"}
  pngs = {path: path.read_bytes() for path in fifos}
  for path in fifos:
    path.unlink()
    os.mkfifo(path)
  out, shards = tmp_path / "out", tmp_path / "out" / "shards"
  proc = subprocess.Popen(
      [sys.executable, "-m", "data_prep.convert", "--layout=rxrx1", f"--root={root}",
       f"--out={out}", "--image_size=256", "--sites_per_shard=2", "--workers=2"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  writers = []
  try:
    for path in fifos:
      writers.append(_reader_opened(path, proc))
    for shard in fifos.values():
      assert [n for n in os.listdir(shards) if n.startswith(f"{shard}.tfrecord.tmp")], shard
    proc.send_signal(signal.SIGTERM)
    # The workers inherited stdout and stderr: both close only when every process has exited.
    stdout, stderr = proc.communicate(timeout=60)
  finally:
    for fd in writers:
      os.close(fd)  # end of file for a worker still reading, so nothing hangs
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM and stdout == "", stderr
  assert stderr.strip().splitlines()[-1] == (
      "convert: interrupted; rerun the same command to resume"), stderr
  assert not (out / "manifest.json").exists()
  names = sorted(os.listdir(shards))
  assert not [n for n in names if ".tmp" in n], names
  finished = ["HUVEC-01_P1-00000", "HUVEC-01_P1-00001", "HUVEC-01_P2-00000"]
  assert names == sorted(f"{s}.tfrecord{x}" for s in finished for x in ("", ".idx", ".stats.json"))
  for shard in finished:  # each one whole: records, index and stats agree
    stats = json.loads((shards / f"{shard}.tfrecord.stats.json").read_text())
    source = records.IndexedTFRecordSource([str(shards / f"{shard}.tfrecord")])
    assert len(source) == stats["records"] == np.load(shards / f"{shard}.tfrecord.idx").shape[0]
    assert all(records.decode_site(source[i])["image"].shape == (S, S, 6)
               for i in range(len(source)))

  for path, png in pngs.items():
    path.unlink()
    path.write_bytes(png)
  again = convert.convert("rxrx1", str(root), str(out), **KW)
  assert (again["shards_skipped"], again["shards_written"]) == (3, 2)
  assert snapshot(out) == reference


# -- eval.embed ---------------------------------------------------------------------------------
def _write_sites(out, n_sites, height, width, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n_sites, height, width, 6), dtype=np.uint8)
  channels = [f"w{i}" for i in range(1, 7)]
  with records.ShardWriter(str(out / "sites.tfrecord")) as writer:
    for i, image in enumerate(images):
      writer.write(image, channels, {"well_id": f"P1_W{i // 2}", "site": i % 2 + 1})
  path = records.write_manifest(out, {
      "layout": "test", "shards": [{"path": "sites.tfrecord", "records": n_sites}],
      "num_records": n_sites, "image_shape": [height, width, 6], "channels": channels,
      "dtype": "uint8"})
  return path, images


def test_embed_manifest_averages_tiles_to_sites_and_pads_the_last_batch(tmp_path, devices):
  """6 sites of 64x72: a centred 2x2 grid of 32x32 tiles each (x from 4), 24 tiles in all.

  Batches of 8 divide the 24 tiles; batches of 16 leave a last batch of 8 padded to 16.
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # compile time
  try:
    with nnx.use_eager_sharding(False):  # plain arrays, as load_for_eval's are replicated
      model = mae.build_model(tiny.get_config().model)
    path, images = _write_sites(tmp_path, n_sites=6, height=64, width=72)
    exact, meta = embed.embed_manifest(model, path, batch_size=8, progress=False)
    padded, meta16 = embed.embed_manifest(model, path, batch_size=16, progress=False)
    tiles = np.stack([image[y:y + 32, x:x + 32] for image in images
                      for y in (0, 32) for x in (4, 36)])
    graphdef, state = nnx.split(model)
    by_hand = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s).embed(t))(state, tiles))
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  assert exact.shape == padded.shape == (6, by_hand.shape[1]) and exact.dtype == np.float32
  per_site = by_hand.reshape(6, 4, -1)
  assert not np.allclose(per_site[:, 0], per_site[:, 1], atol=1e-3)  # the tiles differ
  np.testing.assert_allclose(exact, per_site.mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(padded, exact, rtol=1e-6, atol=1e-7)
  assert meta == meta16
  assert [(m["well_id"], m["site"]) for m in meta] == [
      (f"P1_W{i // 2}", i % 2 + 1) for i in range(6)]
