"""Tests for mae_jax.data.records: framing, codec, sidecar index, manifest, corruption."""
import os
import pickle
import struct

import numpy as np
import pytest

from mae_jax.data import records

CHANNELS = ["w1", "w2", "w3"]


def _crc32c_reference(data: bytes) -> int:
  """Bitwise Castagnoli CRC (reflected polynomial 0x82F63B78), independent of google_crc32c."""
  crc = 0xffffffff
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82f63b78 if crc & 1 else 0)
  return crc ^ 0xffffffff


def _masked_reference(data: bytes) -> int:
  crc = _crc32c_reference(data)
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) % 2**32


def _site(i, shape=(8, 6, 3), dtype=np.uint8):
  rng = np.random.default_rng(i)
  return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


def _write_shard(path, n, start=0, shape=(8, 6, 3), dtype=np.uint8):
  with records.ShardWriter(path) as w:
    for i in range(start, start + n):
      w.write(_site(i, shape, dtype), CHANNELS, {"site": i, "well": f"A{i:02d}"})
  return w.count


def test_crc32c_known_vectors():
  assert records.crc32c(b"123456789") == 0xE3069283
  assert _crc32c_reference(b"123456789") == 0xE3069283
  # RFC 3720 (iSCSI) test vectors.
  assert records.crc32c(bytes(32)) == 0x8A9136AA
  assert records.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert records.crc32c(bytes(range(32))) == 0x46DD794E
  for data in (b"", b"123456789", struct.pack("<Q", 1234), bytes(range(256)) * 3):
    assert records.masked_crc32c(data) == _masked_reference(data)


def test_frame_layout_matches_reference():
  payload = b"hello tfrecord"
  framed = records.frame(payload)
  length = struct.pack("<Q", len(payload))
  assert framed == (length + struct.pack("<I", _masked_reference(length)) + payload +
                    struct.pack("<I", _masked_reference(payload)))
  # Length 0 record, worked out by hand: masked crc of eight zero bytes.
  assert records.frame(b"")[8:12] == struct.pack("<I", _masked_reference(bytes(8)))


def test_writer_output_parses_with_reference_reader(tmp_path):
  """Walk the file with only struct + the pure-Python CRC, as any TFRecord reader does."""
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path, 4)
  data = open(path, "rb").read()
  offset, sites = 0, []
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    assert struct.unpack_from("<I", data, offset + 8)[0] == _masked_reference(data[offset:offset + 8])
    payload = data[offset + 12:offset + 12 + length]
    assert struct.unpack_from("<I", data, offset + 12 + length)[0] == _masked_reference(payload)
    sites.append(records.decode_site(payload))
    offset += 16 + length
  assert offset == len(data) and len(sites) == 4
  np.testing.assert_array_equal(sites[2]["image"], _site(2))
  index = np.load(path + ".idx")
  assert index.dtype == np.int64 and index.shape == (4, 2) and index[0, 0] == 12


def test_tf_data_reads_shards(tmp_path):
  tf = pytest.importorskip("tensorflow")
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path, 3, shape=(4, 5, 3), dtype=np.uint16)
  spec = {"image": tf.io.FixedLenFeature([], tf.string),
          "shape": tf.io.FixedLenFeature([3], tf.int64),
          "meta/site": tf.io.FixedLenFeature([], tf.int64)}
  got = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(path)]
  assert len(got) == 3
  image = tf.io.decode_raw(got[1]["image"], tf.uint16, little_endian=True)
  np.testing.assert_array_equal(np.reshape(image.numpy(), (4, 5, 3)), _site(1, (4, 5, 3), np.uint16))
  assert int(got[2]["meta/site"]) == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_encode_decode_roundtrip(dtype):
  image = _site(0, (5, 7, 6), dtype)
  meta = {"well_id": "gene-001_1_AA02", "site": 1, "is_control": True,
          "concentration": "", "dose": 0.25, "smiles": None}
  payload = records.encode_site(image, [f"w{i}" for i in range(1, 7)], meta)
  site = records.decode_site(payload)
  np.testing.assert_array_equal(site["image"], image)
  assert site["image"].dtype == dtype
  assert site["channels"] == ["w1", "w2", "w3", "w4", "w5", "w6"]
  assert site["metadata"] == {"well_id": "gene-001_1_AA02", "site": 1, "is_control": 1,
                              "concentration": "", "dose": 0.25, "smiles": ""}
  # Raw bytes are little-endian whatever the host: find them in the payload.
  assert image.astype("<" + np.dtype(dtype).str[1:]).tobytes() in payload
  # Map entries are written sorted by key, so equal input gives equal bytes.
  keys = [b"channels", b"dtype", b"image", b"meta/concentration", b"meta/well_id", b"shape"]
  positions = [payload.index(b"\n" + bytes([len(k)]) + k) for k in keys]
  assert positions == sorted(positions)
  np.testing.assert_array_equal(records.decode_image(payload), image)


def test_encode_rejects_bad_input():
  with pytest.raises(ValueError, match="HWC"):
    records.encode_site(np.zeros((4, 4), np.uint8), ["a"], {})
  with pytest.raises(ValueError, match="dtype"):
    records.encode_site(np.zeros((4, 4, 1), np.float32), ["a"], {})
  with pytest.raises(ValueError, match="channel names"):
    records.encode_site(np.zeros((4, 4, 2), np.uint8), ["a"], {})


def test_writer_removes_temp_file_on_error(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  with pytest.raises(RuntimeError):
    with records.ShardWriter(path) as w:
      w.write(_site(0), CHANNELS, {})
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == []


def test_source_random_access_pickle_and_index_fallback(tmp_path):
  paths = [str(tmp_path / f"s{k}.tfrecord") for k in range(3)]
  for k, p in enumerate(paths):
    _write_shard(p, [3, 0, 4][k], start=10 * k)
  src = records.IndexedTFRecordSource(paths)
  assert len(src) == 7 and src.scanned == []
  wanted = [0, 1, 2, 20, 21, 22, 23]
  for i, site in enumerate(wanted):
    np.testing.assert_array_equal(records.decode_image(src[i]), _site(site))
  assert records.decode_site(src[-1])["metadata"]["site"] == 23
  with pytest.raises(IndexError):
    src[7]
  clone = pickle.loads(pickle.dumps(src))
  assert records.decode_site(clone[4])["metadata"]["site"] == 21
  # Missing sidecar and a stale (short) one: rebuilt by one header scan, same index.
  os.remove(paths[0] + ".idx")
  np.save(paths[2] + ".idx", np.load(paths[2] + ".idx")[:2])
  os.rename(paths[2] + ".idx.npy", paths[2] + ".idx")
  rebuilt = records.IndexedTFRecordSource(paths)
  assert rebuilt.scanned == [paths[0], paths[2]]
  np.testing.assert_array_equal(rebuilt._index, src._index)


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_byte_raises_or_is_skipped(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path, 3)
  index = np.load(path + ".idx")
  _flip_byte(path, int(index[1, 0]) + 17)
  src = records.IndexedTFRecordSource([path])
  src[0], src[2]
  start = int(index[1, 0]) - 12
  with pytest.raises(records.RecordError) as e:
    src[1]
  assert str(e.value) == f"{path}: byte offset {start}: payload crc mismatch"
  skipping = records.IndexedTFRecordSource([path], skip_corrupt=True)
  assert [skipping[i] is None for i in range(3)] == [False, True, False]
  assert skipping.read_view(1) is None and skipping.num_corrupt == 2
  with pytest.raises(records.RecordError, match=f"byte offset {start}: payload crc"):
    src.read_view(1)
  # Without CRC checks the flipped byte goes unnoticed (only framing is checked).
  assert records.IndexedTFRecordSource([path], verify_crc=False)[1] is not None


def test_truncated_shard_raises_or_is_skipped(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path, 3)
  index = np.load(path + ".idx")
  os.truncate(path, os.path.getsize(path) - 9)
  last = int(index[2, 0]) - 12
  expected = f"^{path}: byte offset {last}: truncated record"
  # The sidecar promises more than the file holds: found at start-up ...
  with pytest.raises(records.RecordError, match=expected):
    records.IndexedTFRecordSource([path])
  # ... or, skipping, counted when the lost record is read.
  skipping = records.IndexedTFRecordSource([path], skip_corrupt=True)
  assert len(skipping) == 3
  assert [skipping.read_view(i) is None for i in range(3)] == [False, False, True]
  assert skipping[2] is None and skipping.num_corrupt == 2
  # Without a sidecar the header scan finds the cut.
  os.remove(path + ".idx")
  with pytest.raises(records.RecordError, match=expected):
    records.IndexedTFRecordSource([path])
  scanned = records.IndexedTFRecordSource([path], skip_corrupt=True)
  assert len(scanned) == 2 and scanned.num_corrupt == 1


def test_malformed_payload_names_shard_and_offset(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  with records.ShardWriter(path) as w:
    w.write(_site(0), CHANNELS, {})
    w.write_payload(b"\x0a\x05trunc")  # Framed correctly, but not a whole Example.
  src = records.IndexedTFRecordSource([path])
  start = int(np.load(path + ".idx")[1, 0]) - 12
  with pytest.raises(records.RecordError, match=f"^{path}: byte offset {start}: bad site"):
    src.decode_image(1, src.read_view(1))
  np.testing.assert_array_equal(src.decode_image(0, src.read_view(0)), _site(0))


def test_bad_length_crc_found_by_scan(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path, 3)
  start = int(np.load(path + ".idx")[1, 0]) - 12
  os.remove(path + ".idx")
  _flip_byte(path, start + 9)  # Inside the masked crc of record 1's length.
  with pytest.raises(records.RecordError) as e:
    records.IndexedTFRecordSource([path])
  assert str(e.value) == f"{path}: byte offset {start}: length crc mismatch"
  skipping = records.IndexedTFRecordSource([path], skip_corrupt=True)
  assert len(skipping) == 1 and skipping.num_corrupt == 1


def test_read_view_matches_getitem_and_reuses_buffer(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path, 3)
  src = records.IndexedTFRecordSource([path])
  first = src.read_view(0)
  assert first.dtype == np.uint8 and first.tobytes() == src[0]
  second = src.read_view(1)
  assert second.tobytes() == src[1]
  assert np.shares_memory(first, second)  # One buffer per thread, reused.
  np.testing.assert_array_equal(records.decode_image(second), _site(1))


def test_manifest_roundtrip_and_validation(tmp_path):
  _write_shard(str(tmp_path / "a.tfrecord"), 2)
  manifest = {"layout": "rxrx3", "shards": [{"path": "a.tfrecord", "records": 2}],
              "num_records": 2, "image_shape": [8, 6, 3], "channels": CHANNELS,
              "dtype": "uint8"}
  path = records.write_manifest(tmp_path, manifest)
  assert path == str(tmp_path / "manifest.json")
  assert records.read_manifest(tmp_path)["format"] == records.FORMAT
  assert records.read_manifest(path)["layout"] == "rxrx3"
  assert records.shard_paths(tmp_path) == [str(tmp_path / "a.tfrecord")]
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
  for change, field in [({"num_records": 3}, "num_records"),
                        ({"dtype": "float32"}, "dtype"),
                        ({"channels": ["w1"]}, "channels"),
                        ({"image_shape": [8, 6]}, "image_shape"),
                        ({"format": "other"}, "format")]:
    records.write_manifest(tmp_path, {**manifest, **change})
    with pytest.raises(records.ManifestError) as e:
      records.read_manifest(tmp_path)
    assert f"field {field!r}" in str(e.value) and path in str(e.value)
    assert "\n" not in str(e.value)
  with pytest.raises(records.ManifestError, match="no such manifest"):
    records.read_manifest(tmp_path / "missing")
