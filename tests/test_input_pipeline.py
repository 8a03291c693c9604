"""Tests for mae_jax.data.input_pipeline: determinism, exact resume, process slices, corruption."""
import json
import os

import numpy as np
import pytest

from mae_jax.data import input_pipeline
from mae_jax.data import records

NUM_SITES, HEIGHT, WIDTH, CROP = 24, 20, 24, 8


def _site(i):
  """Channel 0 = site id, 1 = row, 2 = column: every crop tells where it came from."""
  rows, cols = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
  return np.stack([np.full_like(rows, i), rows, cols], -1).astype(np.uint8)


def _write_dataset(out_dir, num_sites=NUM_SITES, shards=3):
  os.makedirs(out_dir, exist_ok=True)
  entries, per_shard = [], num_sites // shards
  for s in range(shards):
    path = f"shard-{s}.tfrecord"
    with records.ShardWriter(os.path.join(out_dir, path)) as w:
      for i in range(s * per_shard, (s + 1) * per_shard):
        w.write(_site(i), ["w1", "w2", "w3"], {"site": i, "well": f"B{i:02d}"})
    entries.append({"path": path, "records": w.count})
  return records.write_manifest(out_dir, {
      "layout": "test", "shards": entries, "num_records": num_sites,
      "image_shape": [HEIGHT, WIDTH, 3], "channels": ["w1", "w2", "w3"], "dtype": "uint8"})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  return _write_dataset(str(tmp_path_factory.mktemp("data")))


def _take(it, n):
  return [next(it)["image"] for _ in range(n)]


def _site_ids(batches):
  return [int(crop[0, 0, 0]) for batch in batches for crop in batch]


def test_batches_are_crops_of_sites_and_deterministic(manifest):
  batches = _take(input_pipeline.train_iterator(manifest, global_batch_size=4,
                                                crop_size=CROP, seed=3), 6)
  again = _take(input_pipeline.train_iterator(manifest, global_batch_size=4,
                                              crop_size=CROP, seed=3), 6)
  other = _take(input_pipeline.train_iterator(manifest, global_batch_size=4,
                                              crop_size=CROP, seed=4), 6)
  for batch in batches:
    assert batch.shape == (4, CROP, CROP, 3) and batch.dtype == np.uint8
    for crop in batch:
      y, x = int(crop[0, 0, 1]), int(crop[0, 0, 2])
      np.testing.assert_array_equal(crop, _site(int(crop[0, 0, 0]))[y:y + CROP, x:x + CROP])
  np.testing.assert_array_equal(np.stack(batches), np.stack(again))
  assert not np.array_equal(np.stack(batches), np.stack(other))
  # Crop offsets vary: the pipeline doesn't always take the same corner.
  offsets = {(int(c[0, 0, 1]), int(c[0, 0, 2])) for b in batches for c in b}
  assert len(offsets) > 10


def test_two_process_slices_cover_each_epoch_exactly_once(manifest):
  per_process = NUM_SITES // 2 // 2  # Batches per process per epoch (local batch 2).
  streams = []
  for process in range(2):
    it = input_pipeline.train_iterator(manifest, global_batch_size=4, crop_size=CROP,
                                       seed=7, process_index=process, process_count=2)
    streams.append([_site_ids(_take(it, per_process)) for _ in range(2)])
  for epoch in range(2):
    ids0, ids1 = streams[0][epoch], streams[1][epoch]
    assert not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == list(range(NUM_SITES))
  # Every epoch is reshuffled.
  assert streams[0][0] + streams[1][0] != streams[0][1] + streams[1][1]
  # The two processes' crops are not placed alike (draws are keyed globally).
  first = [input_pipeline.train_iterator(manifest, global_batch_size=4, crop_size=CROP,
                                         seed=7, process_index=p, process_count=2)
           for p in range(2)]
  a, b = (np.stack(_take(it, per_process))[..., 1:] for it in first)
  assert not np.array_equal(a, b)


@pytest.mark.parametrize("process_index", [0, 1])
def test_resume_is_exact_without_workers(manifest, process_index):
  kwargs = dict(global_batch_size=4, crop_size=CROP, seed=1, augment=True,
                process_index=process_index, process_count=2)
  it = input_pipeline.train_iterator(manifest, **kwargs)
  _take(it, 5)  # Crosses an epoch boundary on the way (6 local batches per epoch).
  state = json.loads(json.dumps(it.get_state()))  # Checkpoints store it as JSON.
  expected = _take(it, 4)
  resumed = input_pipeline.train_iterator(manifest, **kwargs)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(expected))


def test_two_workers_resume_exactly_and_match_in_process(manifest):
  kwargs = dict(global_batch_size=4, crop_size=CROP, seed=2)
  in_process = _take(input_pipeline.train_iterator(manifest, **kwargs), 7)
  it = input_pipeline.train_iterator(manifest, num_workers=2, **kwargs)
  try:
    first = _take(it, 3)
    state = it.get_state()
    rest = _take(it, 4)
  finally:
    it.close()
  np.testing.assert_array_equal(np.stack(first + rest), np.stack(in_process))
  resumed = input_pipeline.train_iterator(manifest, num_workers=2, **kwargs)
  try:
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(rest))
  finally:
    resumed.close()


def _dihedral(window):
  return [np.rot90(window, k) for k in range(4)] + [np.rot90(window, k)[:, ::-1]
                                                    for k in range(4)]


def test_augment_applies_all_dihedral_maps(manifest):
  it = input_pipeline.train_iterator(manifest, global_batch_size=8, crop_size=CROP,
                                     augment=True)
  maps = set()
  for crop in np.concatenate(_take(it, 6)):
    y, x = int(crop[..., 1].min()), int(crop[..., 2].min())
    window = _site(int(crop[0, 0, 0]))[y:y + CROP, x:x + CROP]
    matches = [k for k, w in enumerate(_dihedral(window)) if np.array_equal(w, crop)]
    assert matches
    maps.add(matches[0])
  assert maps == set(range(8))


def _flip_image_byte(manifest, site):
  """Flips one pixel's bit: the record still parses, only its CRC tells."""
  path = os.path.join(os.path.dirname(manifest), "shard-0.tfrecord")
  offset, length = np.load(path + ".idx")[site]
  with open(path, "r+b") as f:
    payload = os.pread(f.fileno(), int(length), int(offset))
    pixel = int(offset) + payload.index(_site(site).tobytes()) + 100
    f.seek(pixel)
    byte = f.read(1)
    f.seek(pixel)
    f.write(bytes([byte[0] ^ 1]))
  return path, int(offset) - 12


def test_flipped_byte_fails_or_is_skipped_and_counted(tmp_path):
  manifest = _write_dataset(str(tmp_path))
  path, offset = _flip_image_byte(manifest, site=5)
  it = input_pipeline.train_iterator(manifest, global_batch_size=NUM_SITES, crop_size=CROP)
  with pytest.raises(records.RecordError) as e:
    next(it)
  assert f"{path}: byte offset {offset}: payload crc mismatch" in str(e.value)
  # Skipping: the first batch fills from the whole first epoch minus the bad site.
  it = input_pipeline.train_iterator(manifest, global_batch_size=NUM_SITES - 1,
                                     crop_size=CROP, skip_corrupt=True)
  batch = next(it)
  assert int(batch["num_skipped"]) == 1
  assert sorted(_site_ids([batch["image"]])) == [i for i in range(NUM_SITES) if i != 5]
  # 23 batches of 23 crops take 23 epochs of 24 records, each with one bad record;
  # the last one is counted only if a good record follows it in its epoch.
  last_epoch_ends_bad = input_pipeline.ShuffledDraws(NUM_SITES, 0)[23 * NUM_SITES - 1][0] == 5
  assert sum(int(next(it)["num_skipped"]) for _ in range(22)) == 22 - last_epoch_ends_bad
  # Resume stays exact on the skipping path too.
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = input_pipeline.train_iterator(manifest, global_batch_size=NUM_SITES - 1,
                                          crop_size=CROP, skip_corrupt=True)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["num_skipped"] == want["num_skipped"]
  # Evaluation skips the site too, or stops on it.
  tiles = list(input_pipeline.eval_tiles(manifest, tile_size=CROP, skip_corrupt=True))
  assert sorted(set(np.concatenate([t["site"] for t in tiles]))) == [
      i for i in range(NUM_SITES) if i != 5]
  with pytest.raises(records.RecordError, match="payload crc mismatch"):
    list(input_pipeline.eval_tiles(manifest, tile_size=CROP))
  # verify_crc=False reads the damaged record without noticing.
  it = input_pipeline.train_iterator(manifest, global_batch_size=NUM_SITES,
                                     crop_size=CROP, verify_crc=False)
  assert next(it)["image"].shape[0] == NUM_SITES


def test_truncated_shard_fails_at_start_or_is_skipped(tmp_path):
  manifest = _write_dataset(str(tmp_path))
  path = os.path.join(str(tmp_path), "shard-2.tfrecord")
  last = int(np.load(path + ".idx")[-1, 0]) - 12
  os.truncate(path, os.path.getsize(path) - 5)
  with pytest.raises(records.RecordError, match=f"^{path}: byte offset {last}: truncated"):
    input_pipeline.train_iterator(manifest, global_batch_size=4, crop_size=CROP)
  it = input_pipeline.train_iterator(manifest, global_batch_size=NUM_SITES - 1,
                                     crop_size=CROP, skip_corrupt=True)
  batch = next(it)
  assert int(batch["num_skipped"]) == 1
  assert NUM_SITES - 1 not in _site_ids([batch["image"]])


def test_config_mismatch_is_one_line_input_error(manifest):
  cases = [(dict(expect_channels=6), "field 'image_shape'", ["3 channels", "expects 6"]),
           (dict(expect_dtype="uint16"), "field 'dtype'", ["uint8", "uint16"]),
           (dict(expect_dtype=16), "field 'dtype'", ["uint8", "uint16"])]
  for kwargs, field, values in cases:
    with pytest.raises(input_pipeline.InputError) as e:
      input_pipeline.train_iterator(manifest, global_batch_size=4, crop_size=CROP, **kwargs)
    message = str(e.value)
    assert "\n" not in message and manifest in message and field in message
    assert all(v in message for v in values), message
  # Matching expectations pass (a bit depth works as well as a dtype name).
  input_pipeline.open_dataset(manifest, expect_channels=3, expect_dtype=8)
  with pytest.raises(input_pipeline.InputError, match="smaller than the crop size 32"):
    input_pipeline.train_iterator(manifest, global_batch_size=4, crop_size=32)
  with pytest.raises(input_pipeline.InputError, match="not divisible by 3 processes"):
    input_pipeline.train_iterator(manifest, global_batch_size=4, process_count=3)
  with pytest.raises(input_pipeline.InputError, match="no such manifest"):
    input_pipeline.open_dataset(os.path.dirname(manifest) + "/nope")


def test_eval_tiles_cover_every_site_in_order(manifest):
  tile = 8  # 20x24 sites: a 2x3 grid, centred vertically (rows 2..17).
  batches = list(input_pipeline.eval_tiles(manifest, tile_size=tile, batch_size=10))
  sizes = [len(b["site"]) for b in batches]
  assert sizes == [10] * 14 + [4]  # 24 sites x 6 tiles = 144.
  sites = np.concatenate([b["site"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(sites, np.repeat(np.arange(NUM_SITES), 6))
  for i in (0, 13, NUM_SITES - 1):
    site = _site(i)
    for t, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):
      y, x = 2 + r * tile, c * tile
      np.testing.assert_array_equal(images[6 * i + t], site[y:y + tile, x:x + tile])
  metadata = input_pipeline.site_metadata(manifest)
  assert [m["site"] for m in metadata] == list(range(NUM_SITES))
  assert metadata[3] == {"site": 3, "well": "B03"}
  with pytest.raises(input_pipeline.InputError, match="field 'image_shape'"):
    input_pipeline.eval_tiles(manifest, expect_channels=6)
