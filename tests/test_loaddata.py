"""JUMP-style screens: a CellProfiler LoadData CSV of 1080² 16-bit TIFFs (5 Cell Painting channels)
converts as it is, trains a CA-MAE step, embeds with a centred grid of whole tiles (or a padded
one); a 6-channel model refuses the 5-channel manifest at startup (docs/data_layouts.md §4b)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tifffile
from flax import nnx

from data_prep import convert
from data_prep.layouts import ConvertError, loaddata
from eval import embed
from mae_jax.data import input_pipeline, records
from mae_jax.util import cli
from test_train import REPO, TINY, main_env, result_of

SIZE = 1080  # a JUMP site (cpg0016): not a multiple of any crop or tile size
CHANNELS = loaddata.DEFAULT_CHANNELS
HEAD = ["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Site",
        "Metadata_JCP2022"]


def _site(rng):
  return rng.integers(0, 65536, (SIZE, SIZE, len(CHANNELS)), dtype=np.uint16)


def write_jump(root, rng):
  """2 plates x 2 wells x 1 site, one load_data.csv per plate as JUMP publishes them: plate BR1
  one TIFF per channel (relative PathName), plate BR2 one 5-page TIFF per site (Frame_Orig*)."""
  images = {}
  for plate, multipage in (("BR1", False), ("BR2", True)):
    folder = os.path.join(root, plate)
    os.makedirs(os.path.join(folder, "images"))
    cols = HEAD + [f"{p}Orig{c}" for c in CHANNELS for p in ("FileName_", "PathName_")]
    cols += [f"Frame_Orig{c}" for c in CHANNELS] if multipage else []
    lines = [",".join(cols)]
    for well, compound in (("A01", "JCP2022_033924"), ("B02", "JCP2022_000001")):
      img = images[f"2021_Batch1_{plate}_{well}_s1"] = _site(rng)
      row = ["source_4", "2021_Batch1", plate, well, "1", compound]
      if multipage:
        name = f"r{well}f01.ome.tiff"
        tifffile.imwrite(os.path.join(folder, "images", name), np.moveaxis(img, -1, 0))
        row += [x for _ in CHANNELS for x in (name, "images")]
        row += [str(k) for k in range(len(CHANNELS))]
      else:
        for k, c in enumerate(CHANNELS):
          name = f"r{well}f01-ch{k + 1}.tiff"
          tifffile.imwrite(os.path.join(folder, "images", name), img[..., k])
          row += [name, "images"]
      lines.append(",".join(row))
    with open(os.path.join(folder, "load_data.csv"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return images


@pytest.fixture(scope="module")
def jump(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("jump")
  images = write_jump(str(tmp / "screen"), np.random.default_rng(0))
  out = str(tmp / "tfr")
  summary = convert.convert("loaddata", str(tmp / "screen"), out, workers=1, sites_per_shard=2,
                            perturbation_column="Metadata_JCP2022")
  return tmp, out, images, summary


def test_loaddata_converts_1080_sites_as_they_are(jump):
  _, out, images, summary = jump
  assert summary["image_shape"] == [SIZE, SIZE, 5] and summary["dtype"] == "uint16"
  assert summary["num_records"] == 4 and summary["shards"] == 2
  manifest = records.read_manifest(out)
  assert manifest["channels"] == list(CHANNELS)
  source = records.IndexedTFRecordSource(records.shard_paths(out, manifest))
  for i in range(len(source)):
    site = records.decode_site(source[i])
    key = f"{site['metadata']['well_id']}_s{site['metadata']['site']}"
    np.testing.assert_array_equal(site["image"], images[key])  # every pixel, both layouts
    md = site["metadata"]
    assert md["experiment"] == "2021_Batch1" and md["Metadata_Source"] == "source_4"
    assert md["perturbation"] in ("JCP2022_033924", "JCP2022_000001")
  # Training crops stay inside the site; evaluation tiles a centred grid (or pads, by flag).
  draw = (0, 0.999999, 0.999999, 0)
  assert input_pipeline.crop_site(images[key], draw, 256).shape == (256, 256, 5)
  whole = list(input_pipeline.eval_tiles(out, tile_size=256, batch_size=64))
  padded = list(input_pipeline.eval_tiles(out, tile_size=256, batch_size=128, pad=True))
  assert np.bincount(whole[0]["site"]).tolist() == [16] * 4  # 4x4 of 256 in 1080, 28 px margins
  assert np.bincount(padded[0]["site"]).tolist() == [25] * 4  # 5x5, zero-padded
  first = images["2021_Batch1_BR1_A01_s1"]
  np.testing.assert_array_equal(whole[0]["image"][0], first[28:284, 28:284])
  assert padded[0]["image"][0][:100, :100].max() == 0  # the top-left tile starts in the padding
  np.testing.assert_array_equal(padded[0]["image"][0][100:, 100:], first[:156, :156])


def test_loaddata_errors_are_one_line(tmp_path):
  root = tmp_path / "s"
  write_jump(str(root), np.random.default_rng(1))
  with pytest.raises(ConvertError, match="missing columns FileName_OrigBrightfield"):
    loaddata.list_loaddata(str(root), ("DNA", "Brightfield"))
  with pytest.raises(ConvertError, match="--perturbation_column=Metadata_pert is not a column"):
    loaddata.list_loaddata(str(root), None, "Metadata_pert")


def test_ca_mae_trains_and_embeds_a_jump_screen(jump, cache_dir, devices):
  tmp, out, _, _ = jump
  workdir = tmp / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", *TINY, "--config.model.channel_agnostic=True",
       f"--config.data.manifest={out}", f"--workdir={workdir}", "--stop_at=1"],
      cwd=REPO, env=main_env(cache_dir), capture_output=True, text=True, timeout=300)
  result = result_of(proc)
  assert result["status"] == "preempted" and result["step"] == 1, proc.stderr[-3000:]
  assert "model.channels=5" in proc.stdout and "data.dtype=uint16" in proc.stdout
  assert np.isfinite(result["loss"])
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # compile time
  try:
    with nnx.use_eager_sharding(False):
      wells, meta = embed.embed_wells(str(workdir), out, batch_size=512, progress=False)
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  assert wells.shape[0] == 4 and np.isfinite(wells).all()
  assert meta["tiles"].tolist() == [(SIZE // 32) ** 2] * 4  # 33x33 whole tiles of 32 a site


def test_six_channel_model_refuses_a_five_channel_manifest(jump, cache_dir):
  _, out, _, _ = jump
  proc = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", *TINY, "--config.model.channels=6",
       f"--config.data.manifest={out}", "--config.dry_run=True"],
      cwd=REPO, env=main_env(cache_dir), capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.USAGE, proc.stderr[-3000:]
  err = [line for line in proc.stderr.strip().splitlines() if "error" in line]
  assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert err[0].startswith("mae_jax.main: error: ") and "5 channels (DNA,ER,RNA,AGP,Mito)" in err[0]
  assert "model.channels=6" in err[0] and "not channel-agnostic" in err[0]
