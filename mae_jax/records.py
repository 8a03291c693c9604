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
import threading
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


def crc32c(data) -> int:
  """CRC32C of bytes or a contiguous uint8 ndarray (google_crc32c rejects bytearray)."""
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
  # Deterministic: map entries sorted by key, so reruns write identical bytes
  # (upb otherwise orders them by a per-process hash seed).
  return example.SerializeToString(deterministic=True)


# A small reader of the protobuf wire format of Example. Upb's first access to a
# large bytes field costs ~3 ms per MB, and reading metadata through upb would
# read the whole image, so the hot paths walk the bytes themselves.

def _varint(data, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(data):
      raise ValueError("truncated varint")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7f) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _walk(read, start: int, end: int):
  """Yields (field number, wire type, value start, value size) of one message.

  `read(pos, n)` returns up to n bytes of the serialized message from pos; a
  varint value's size is its encoded length.
  """
  pos = start
  while pos < end:
    head = read(pos, 20)
    tag, used = _varint(head, 0)
    field, wire = tag >> 3, tag & 7
    if wire == 0:
      size = _varint(head, used)[1] - used
    elif wire == 2:
      size, after = _varint(head, used)
      used = after
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield field, wire, pos + used, size
    pos += used + size
  if pos != end:
    raise ValueError("field runs past the end of its message")


def _feature_entries(read, length: int):
  """Yields (key, value start, value size) of each entry of Example.features."""
  for field, wire, start, size in _walk(read, 0, length):
    if field != 1 or wire != 2:  # Example.features
      continue
    for field2, wire2, entry, entry_size in _walk(read, start, start + size):
      if field2 != 1 or wire2 != 2:  # Features.feature (map entries)
        continue
      key, value = None, (0, 0)
      for field3, _, pos, n in _walk(read, entry, entry + entry_size):
        if field3 == 1:
          key = bytes(read(pos, n)).decode()
        elif field3 == 2:
          value = (pos, n)
      yield key, *value


def _list_values(read, start: int, size: int, kind: int):
  """(start, size, wire type) of each value of a Feature's list `kind`.

  kind: 1 bytes_list, 2 float_list, 3 int64_list.
  """
  values = []
  for field, _, pos, n in _walk(read, start, start + size):
    if field == kind:
      values.extend((p, m, w) for f, w, p, m in _walk(read, pos, pos + n) if f == 1)
  return values


def _scalars(read, pos: int, size: int, wire: int, kind: int) -> list:
  """Decoded values of one list field occurrence (packed or not)."""
  data = bytes(read(pos, size))
  if len(data) != size:
    raise ValueError("truncated feature")
  if kind == 1:
    return [data.decode()]
  if kind == 2:
    return np.frombuffer(data, "<f4").tolist()
  values, at = [], 0
  while at < len(data) if wire == 2 else not values:
    value, at = _varint(data, at)
    values.append(value - (1 << 64) if value >= 1 << 63 else value)
  return values


def _feature_first(read, start: int, size: int):
  """First value of a serialized Feature ("" when empty)."""
  for kind in (1, 2, 3):
    for pos, n, wire in _list_values(read, start, size, kind):
      values = _scalars(read, pos, n, wire, kind)
      if values:
        return values[0]
  return ""


_IMAGE_KEYS = (b"image", b"shape", b"dtype")


def _image_entries(view) -> dict[bytes, tuple[int, int]]:
  """{key: (value start, size)} of the image, shape and dtype features.

  The hot path of decode_image: a flat loop over the map entries that reads
  only each entry's length and short key. Entries laid out otherwise (long key,
  key after value) fall back to the general walk.
  """
  found = {}
  for field, wire, start, size in _walk(lambda pos, n: view[pos:pos + n], 0, len(view)):
    if field != 1 or wire != 2:  # Example.features
      continue
    pos, end = start, start + size
    while pos < end:
      tag = view[pos]
      entry_size, entry = _varint(view, pos + 1)
      pos = entry + entry_size
      if tag != 0x0a:  # Not a map entry: skip (only length-delimited expected).
        raise ValueError(f"unexpected tag {tag} in Features")
      key_size = view[entry + 1]
      if view[entry] != 0x0a or key_size >= 0x80 or view[entry + 2 + key_size] != 0x12:
        return {k.encode(): (s, n) for k, s, n in
                _feature_entries(lambda p, n: view[p:p + n], len(view))
                if k.encode() in _IMAGE_KEYS}
      key = view[entry + 2:entry + 2 + key_size]
      if key in _IMAGE_KEYS:
        value_size, value = _varint(view, entry + 3 + key_size)
        found[bytes(key)] = (value, value_size)
  return found


def decode_image(payload) -> np.ndarray:
  """Only the HWC image of a site: a read-only view into `payload`, no copy."""
  view = memoryview(payload)
  read = lambda pos, n: view[pos:pos + n]
  try:
    found = {k: _list_values(read, start, size, 3 if k == b"shape" else 1)
             for k, (start, size) in _image_entries(view).items()}
    shape = [v for pos, n, wire in found[b"shape"] for v in _scalars(read, pos, n, wire, 3)]
    (pos, n, wire), = found[b"dtype"]
    dtype = np.dtype(_scalars(read, pos, n, wire, 1)[0]).newbyteorder("<")
    (pos, n, _), = found[b"image"]
    image = np.frombuffer(payload, dtype, n // dtype.itemsize, pos).reshape(shape)
  except (KeyError, ValueError, TypeError, IndexError) as e:
    raise ValueError(f"bad site record: {type(e).__name__}: {e}") from None
  return image.astype(dtype.newbyteorder("="), copy=False)


def decode_metadata(payload) -> dict:
  """Metadata of a site; int64 features come back as int (bools as 0/1)."""
  view = memoryview(payload)
  return metadata_from_reader(lambda pos, n: view[pos:pos + n], len(view))


def decode_site(payload) -> dict:
  """{"image": HWC ndarray, "channels": [...], "metadata": {key: value}}."""
  view = memoryview(payload)
  read = lambda pos, n: view[pos:pos + n]
  channels = []
  for key, start, size in _feature_entries(read, len(view)):
    if key == "channels":
      channels = [bytes(view[p:p + n]).decode() for p, n, _ in
                  _list_values(read, start, size, 1)]
  return {"image": decode_image(payload), "channels": channels,
          "metadata": decode_metadata(payload)}


def metadata_from_reader(read, length: int) -> dict:
  """Metadata ("meta/*" features) of a serialized Example, skipping the image.

  `read(pos, n)` returns up to n payload bytes from pos; only the small
  metadata entries are read in full, so a 50 MB site costs a few kB of I/O.
  """
  metadata = {}
  for key, start, size in _feature_entries(read, length):
    if key and key.startswith("meta/"):
      metadata[key[5:]] = _feature_first(read, start, size)
  return dict(sorted(metadata.items()))


class _WindowReader:
  """read(pos, n) over one record payload, served from cached pread windows."""

  def __init__(self, fd: int, offset: int, length: int, window: int = 1 << 16):
    self._fd, self._offset, self._length, self._window = fd, offset, length, window
    self._start, self._data = 0, b""

  def __call__(self, pos: int, n: int):
    n = min(n, self._length - pos)
    if not self._start <= pos <= pos + n <= self._start + len(self._data):
      size = min(max(n, self._window), self._length - pos)
      self._start, self._data = pos, os.pread(self._fd, size, self._offset + pos)
    return memoryview(self._data)[pos - self._start:pos - self._start + n]


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
  """The `.idx` sidecar if it is a consistent chain of records, else None.

  A sidecar that ends before the shard does (short, stale) is rejected. One
  that runs past the end is kept: the shard itself was truncated, and the
  records it lost are reported by offset when read.
  """
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
      (ends[-1] if len(ends) else 0) < os.path.getsize(path)):
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
      elif not skip_corrupt:  # Fail at start-up on a truncated shard.
        size = os.path.getsize(path)
        lost = index[:, 0] + index[:, 1] + _FOOTER > size
        if lost.any():
          first = index[np.argmax(lost)]
          self._truncated(path, int(first[0]) - _HEADER, int(first[1]), size)
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
    if fd is None:  # Threads may race here: keep the first fd, close the other.
      fd = os.open(path, os.O_RDONLY)
      if self._fds.setdefault(path, fd) != fd:
        os.close(fd)
        fd = self._fds[path]
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

  def read_view(self, index: int) -> np.ndarray | None:
    """Like source[index], as a uint8 view into a per-thread reusable buffer.

    Valid until this thread's next read_view. The hot path uses it: a fresh
    multi-MB buffer per record costs more in page faults than the read itself.
    """
    path, offset, length = self.locate(index)
    local = self.__dict__.setdefault("_local", threading.local())
    buffer = getattr(local, "buffer", None)
    if buffer is None or len(buffer) < length + _HEADER + _FOOTER:
      buffer = local.buffer = np.empty(int((length + _HEADER + _FOOTER) * 1.25), np.uint8)
    record = buffer[:length + _HEADER + _FOOTER]
    start = offset - _HEADER
    try:
      got = os.preadv(self._fd(path), [record], start)
      if got != len(record):
        self._truncated(path, start, length)
      if self.verify_crc:
        self._check(path, start, record[:_HEADER], record[_HEADER:-_FOOTER],
                    record[-_FOOTER:])
    except RecordError:
      if not self.skip_corrupt:
        raise
      self.num_corrupt += 1
      return None
    return record[_HEADER:-_FOOTER]

  def _truncated(self, path: str, start: int, length: int, size: int | None = None):
    size = os.fstat(self._fd(path)).st_size if size is None else size
    raise RecordError(f"{path}: byte offset {start}: truncated record (file ends at "
                      f"byte {size}, record needs {_HEADER + length + _FOOTER} bytes)")

  def _read(self, path: str, offset: int, length: int) -> bytes:
    fd = self._fd(path)
    start = offset - _HEADER
    if not self.verify_crc:
      payload = os.pread(fd, length, offset)
      if len(payload) != length:
        self._truncated(path, start, length)
      return payload
    # Three preads instead of one: slicing one buffer would copy the payload.
    header = os.pread(fd, _HEADER, start)
    payload = os.pread(fd, length, offset)
    footer = os.pread(fd, _FOOTER, offset + length)
    if len(header) + len(payload) + len(footer) != _HEADER + length + _FOOTER:
      self._truncated(path, start, length)
    self._check(path, start, header, payload, footer)
    return payload

  @staticmethod
  def _check(path: str, start: int, header, payload, footer) -> None:
    length, length_crc = struct.unpack("<QI", header)
    if length != len(payload):
      raise RecordError(f"{path}: byte offset {start}: length field {length} disagrees "
                        f"with the index ({len(payload)})")
    if length_crc != masked_crc32c(header[:8]):
      raise RecordError(f"{path}: byte offset {start}: length crc mismatch")
    if struct.unpack("<I", footer)[0] != masked_crc32c(payload):
      raise RecordError(f"{path}: byte offset {start}: payload crc mismatch")

  def metadata(self, index: int) -> dict:
    """Metadata of record `index`, reading only its small features (no CRC check)."""
    path, offset, length = self.locate(index)
    try:
      return metadata_from_reader(_WindowReader(self._fd(path), offset, length), length)
    except (ValueError, IndexError) as e:
      raise RecordError(f"{path}: byte offset {offset - _HEADER}: bad record: {e}") from None

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
    state.pop("_local", None)
    return state
