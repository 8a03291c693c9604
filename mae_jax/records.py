"""TFRecord shards of HCS sites: framing, tf.train.Example codec, manifest, indexed source.

No jax and no TensorFlow: data_prep runs this on plain CPU hosts. Records use the
standard TFRecord framing (so tf.data reads the shards) and every shard gets a
sidecar `.idx` (int64 rows of payload offset and length) for random access.
"""
from __future__ import annotations

import functools
import json
import os
import struct
from typing import Any, Mapping, Sequence

import google_crc32c
import numpy as np

FORMAT = "mae_jax-tfrecord-v1"
DTYPES = ("uint8", "uint16")
_HEADER = 12  # uint64 length + uint32 masked crc of the length.
_FOOTER = 4   # uint32 masked crc of the payload.
_MASK_DELTA = 0xa282ead8


class RecordError(ValueError):
  """A shard that cannot be read: message names the shard, byte offset and problem."""


class ManifestError(ValueError):
  """A manifest.json that is missing or malformed: one line naming file and field."""


def crc32c(data: bytes) -> int:
  return google_crc32c.value(data)


def masked_crc32c(data) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xffffffff


def frame(payload: bytes) -> bytes:
  """One TFRecord: length, masked crc of length, payload, masked crc of payload."""
  length = struct.pack("<Q", len(payload))
  return b"".join((length, struct.pack("<I", masked_crc32c(length)), payload,
                   struct.pack("<I", masked_crc32c(payload))))


@functools.cache
def _example_cls():
  # Imported lazily: tensorflow_datasets takes ~0.6 s to import.
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  return tf_example_pb2.Example


def encode_site(image: np.ndarray, channels: Sequence[str],
                metadata: Mapping[str, Any]) -> bytes:
  """Serialized tf.train.Example of one HWC uint8/uint16 site plus its metadata."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] < 1:
    raise ValueError(f"image must be HWC with C >= 1, got shape {image.shape}")
  if image.dtype.name not in DTYPES:
    raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
  if len(channels) != image.shape[2]:
    raise ValueError(f"{len(channels)} channel names for {image.shape[2]} channels")
  example = _example_cls()()
  feature = example.features.feature
  feature["image"].bytes_list.value.append(
      np.ascontiguousarray(image, image.dtype.newbyteorder("<")).tobytes())
  feature["shape"].int64_list.value.extend(image.shape)
  feature["dtype"].bytes_list.value.append(image.dtype.name.encode())
  feature["channels"].bytes_list.value.extend(str(c).encode() for c in channels)
  for key, value in metadata.items():
    f = feature["meta/" + key]
    if value is None:
      value = ""
    if isinstance(value, (bool, np.bool_, int, np.integer)):
      f.int64_list.value.append(int(value))
    elif isinstance(value, (float, np.floating)):
      f.float_list.value.append(float(value))
    elif isinstance(value, (str, bytes)):
      f.bytes_list.value.append(value if isinstance(value, bytes) else value.encode())
    else:
      raise ValueError(f"metadata {key!r}: unsupported type {type(value).__name__}")
  return example.SerializeToString()


def _parse(payload):
  try:
    return _example_cls().FromString(payload)
  except Exception as e:  # protobuf raises its own DecodeError type.
    raise ValueError(f"not a tf.train.Example: {e}") from None


def _image_from(feature) -> np.ndarray:
  try:
    shape = tuple(feature["shape"].int64_list.value)
    dtype = np.dtype(feature["dtype"].bytes_list.value[0].decode()).newbyteorder("<")
    image = np.frombuffer(feature["image"].bytes_list.value[0], dtype).reshape(shape)
  except (IndexError, ValueError, TypeError) as e:
    raise ValueError(f"bad image feature: {e}") from None
  return image.astype(dtype.newbyteorder("="), copy=False)


def decode_image(payload) -> np.ndarray:
  """Only the HWC image of a site (read-only view of the decoded bytes)."""
  return _image_from(_parse(payload).features.feature)


def _feature_value(f):
  kind = f.WhichOneof("kind")
  if kind is None:
    return ""
  values = getattr(f, kind).value
  if not values:
    return ""
  value = values[0]
  if kind == "bytes_list":
    return value.decode()
  return value


def decode_site(payload) -> dict:
  """{"image": HWC ndarray, "channels": [...], "metadata": {key: value}}."""
  feature = _parse(payload).features.feature
  return {"image": _image_from(feature),
          "channels": [c.decode() for c in feature["channels"].bytes_list.value],
          "metadata": decode_metadata(payload, feature)}


def decode_metadata(payload, feature=None) -> dict:
  """Metadata of a site; int64 features come back as int (bools as 0/1)."""
  feature = _parse(payload).features.feature if feature is None else feature
  return {k[5:]: _feature_value(v) for k, v in sorted(feature.items())
          if k.startswith("meta/")}


def _atomic_write(path: str, write_fn) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class ShardWriter:
  """with ShardWriter(path) as w: w.write(image, channels, metadata).

  Writes `path + ".tmp"`; on clean exit renames it to `path` and writes the
  `.idx` sidecar; on an exception removes the temporary file.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.count = 0
    self._index = []
    self._offset = 0
    self._file = None

  def __enter__(self):
    self._file = open(self.path + ".tmp", "wb")
    return self

  def write(self, image, channels, metadata) -> None:
    self.write_payload(encode_site(image, channels, metadata))

  def write_payload(self, payload: bytes) -> None:
    """Appends one already serialized record."""
    self._file.write(frame(payload))
    self._index.append((self._offset + _HEADER, len(payload)))
    self._offset += _HEADER + len(payload) + _FOOTER
    self.count += 1

  def __exit__(self, exc_type, exc, tb):
    self._file.close()
    if exc_type is not None:
      os.remove(self.path + ".tmp")
      return False
    os.replace(self.path + ".tmp", self.path)
    index = np.asarray(self._index, np.int64).reshape(-1, 2)
    _atomic_write(self.path + ".idx", lambda f: np.save(f, index))
    return False


def manifest_path(path) -> str:
  path = os.fspath(path)
  return os.path.join(path, "manifest.json") if os.path.isdir(path) else path


def write_manifest(out_dir, manifest: dict) -> str:
  """Atomically writes out_dir/manifest.json; returns its path."""
  path = os.path.join(os.fspath(out_dir), "manifest.json")
  manifest = {"format": FORMAT, **manifest}
  text = json.dumps(manifest, indent=1) + "\n"
  _atomic_write(path, lambda f: f.write(text.encode()))
  return path


def read_manifest(path) -> dict:
  """Reads and validates manifest.json (given the file or its folder)."""
  path = manifest_path(path)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ManifestError(f"{path}: no such manifest") from None
  except (OSError, ValueError) as e:
    raise ManifestError(f"{path}: unreadable manifest: {e}") from None

  def check(ok, field, what):
    if not ok:
      raise ManifestError(f"{path}: field {field!r}: {what}")

  check(isinstance(manifest, dict), "<top>", "expected a JSON object")
  for key in ("format", "shards", "num_records", "image_shape", "channels", "dtype"):
    check(key in manifest, key, "missing")
  check(manifest["format"] == FORMAT, "format",
        f"expected {FORMAT!r}, got {manifest['format']!r}")
  shards = manifest["shards"]
  check(isinstance(shards, list) and all(
      isinstance(s, dict) and isinstance(s.get("path"), str) and
      isinstance(s.get("records"), int) and s["records"] >= 0 for s in shards),
        "shards", "expected a list of {\"path\": str, \"records\": int}")
  total = sum(s["records"] for s in shards)
  check(manifest["num_records"] == total, "num_records",
        f"{manifest['num_records']} but the shards hold {total}")
  shape = manifest["image_shape"]
  check(isinstance(shape, list) and len(shape) == 3 and
        all(isinstance(d, int) and d > 0 for d in shape),
        "image_shape", f"expected [H, W, C] of positive ints, got {shape!r}")
  channels = manifest["channels"]
  check(isinstance(channels, list) and len(channels) == shape[2], "channels",
        f"expected {shape[2]} channel names, got {channels!r}")
  check(manifest["dtype"] in DTYPES, "dtype",
        f"expected one of {DTYPES}, got {manifest['dtype']!r}")
  return manifest


def shard_paths(path, manifest: dict | None = None) -> list[str]:
  """Absolute shard paths of a manifest (they are stored relative to its folder)."""
  path = manifest_path(path)
  manifest = read_manifest(path) if manifest is None else manifest
  root = os.path.dirname(os.path.abspath(path))
  return [os.path.join(root, s["path"]) for s in manifest["shards"]]


def scan_index(path: str, skip_corrupt: bool = False) -> tuple[np.ndarray, int]:
  """Index of a shard from its record headers alone: ((n, 2) int64, corrupt).

  A truncated tail or a bad length crc raises RecordError, or with skip_corrupt
  ends the scan there and counts 1 corrupt record.
  """
  rows = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    offset = 0
    while offset < size:
      header = f.read(_HEADER)
      problem = None
      if len(header) < _HEADER:
        problem = f"truncated record header ({len(header)} of {_HEADER} bytes)"
      else:
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
          problem = "length crc mismatch"
        elif offset + _HEADER + length + _FOOTER > size:
          problem = (f"truncated record (needs {_HEADER + length + _FOOTER} bytes, "
                     f"file has {size - offset} left)")
      if problem:
        if skip_corrupt:
          return np.asarray(rows, np.int64).reshape(-1, 2), 1
        raise RecordError(f"{path}: byte offset {offset}: {problem}")
      rows.append((offset + _HEADER, length))
      offset += _HEADER + length + _FOOTER
      f.seek(offset)
  return np.asarray(rows, np.int64).reshape(-1, 2), 0


def load_index(path: str) -> np.ndarray | None:
  """The `.idx` sidecar if it exists and exactly covers the shard, else None."""
  try:
    index = np.load(path + ".idx", allow_pickle=False)
  except (OSError, ValueError, EOFError):
    return None
  if index.ndim != 2 or index.shape[1] != 2 or index.dtype.kind != "i":
    return None
  index = index.astype(np.int64)
  ends = index[:, 0] + index[:, 1] + _FOOTER
  starts = np.concatenate([[0], ends[:-1]])
  if (np.any(index[:, 0] != starts + _HEADER) or np.any(index[:, 1] < 0) or
      (ends[-1] if len(ends) else 0) != os.path.getsize(path)):
    return None
  return index


class IndexedTFRecordSource:
  """Random-access Grain data source over TFRecord shards: source[i] -> payload.

  Reads each record with `os.pread` and checks both masked CRCs. A bad
  record raises RecordError naming shard and byte offset, or with skip_corrupt
  returns None and counts it in `num_corrupt` (per process). Picklable: file
  descriptors are dropped on pickling and reopened lazily.
  """

  def __init__(self, shard_paths: Sequence[str], verify_crc: bool = True,
               skip_corrupt: bool = False):
    self.paths = [os.fspath(p) for p in shard_paths]
    self.verify_crc = verify_crc
    self.skip_corrupt = skip_corrupt
    self.num_corrupt = 0
    self.scanned = []  # shards whose sidecar was missing or stale.
    indexes = []
    for path in self.paths:
      if not os.path.isfile(path):
        raise RecordError(f"{path}: byte offset 0: shard file not found")
      index = load_index(path)
      if index is None:
        index, corrupt = scan_index(path, skip_corrupt)
        self.num_corrupt += corrupt
        self.scanned.append(path)
      indexes.append(index)
    self.counts = np.asarray([len(i) for i in indexes], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self.counts)])
    self._index = (np.concatenate(indexes) if indexes else
                   np.zeros((0, 2), np.int64))
    self._fds = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f"IndexedTFRecordSource({len(self.paths)} shards, {len(self)} records)"

  def locate(self, index: int) -> tuple[str, int, int]:
    """(shard path, payload byte offset, payload length) of a global index."""
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    index %= len(self)
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    offset, length = self._index[index]
    return self.paths[shard], int(offset), int(length)

  def _fd(self, path: str) -> int:
    fd = self._fds.get(path)
    if fd is None:
      fd = self._fds[path] = os.open(path, os.O_RDONLY)
    return fd

  def __getitem__(self, index: int) -> bytes | None:
    path, offset, length = self.locate(index)
    try:
      return self._read(path, offset, length)
    except RecordError:
      if not self.skip_corrupt:
        raise
      self.num_corrupt += 1
      return None

  def _read(self, path: str, offset: int, length: int) -> bytes:
    fd = self._fd(path)
    if not self.verify_crc:
      payload = os.pread(fd, length, offset)
      if len(payload) != length:
        raise RecordError(f"{path}: byte offset {offset - _HEADER}: truncated record "
                          f"(file ends at byte {os.fstat(fd).st_size})")
      return payload
    # Three preads instead of one: google_crc32c only takes bytes, and slicing one
    # buffer would copy the payload.
    start = offset - _HEADER
    header = os.pread(fd, _HEADER, start)
    payload = os.pread(fd, length, offset)
    footer = os.pread(fd, _FOOTER, offset + length)
    got = len(header) + len(payload) + len(footer)
    if got != _HEADER + length + _FOOTER:
      raise RecordError(f"{path}: byte offset {start}: truncated record (file ends at "
                        f"byte {os.fstat(fd).st_size}, record needs "
                        f"{_HEADER + length + _FOOTER} bytes)")
    if struct.unpack("<Q", header[:8])[0] != length:
      raise RecordError(f"{path}: byte offset {start}: length field disagrees with index")
    if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
      raise RecordError(f"{path}: byte offset {start}: length crc mismatch")
    if struct.unpack("<I", footer)[0] != masked_crc32c(payload):
      raise RecordError(f"{path}: byte offset {start}: payload crc mismatch")
    return payload

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds = {}

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"] = {}
    return state
