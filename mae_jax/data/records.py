"""TFRecord shards of HCS sites: framing, manifest, indexed source (codec: example_codec.py).

No jax and no TensorFlow: data_prep runs this on plain CPU hosts. Records use the
standard TFRecord framing (so tf.data reads the shards) and every shard gets a
sidecar `.idx` (int64 rows of payload offset and length) for random access.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from typing import Sequence

import google_crc32c
import numpy as np

# The site codec, re-exported: records is the one import for the format.
# pylint: disable-next=unused-import
from mae_jax.data.example_codec import (DTYPES, decode_image, decode_site, encode_site,
                                        metadata_from_reader)
from mae_jax.util import files
from mae_jax.util.errors import UserError

FORMAT = "mae_jax-tfrecord-v1"
_HEADER = 12  # uint64 length + uint32 masked crc of the length.
_FOOTER = 4   # uint32 masked crc of the payload.
_MASK_DELTA = 0xa282ead8


class RecordError(UserError, ValueError):
  """A shard that cannot be read: message names the shard, byte offset and problem."""


class ManifestError(UserError, ValueError):
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


class ShardWriter:
  """with ShardWriter(path) as w: w.write(image, channels, metadata).

  Writes a temporary file beside `path` (files.atomic_open); on clean exit renames it to `path`
  and writes the `.idx` sidecar; on an exception removes the temporary file.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.count = 0
    self._index = []
    self._offset = 0
    self._file = None
    self._open = contextlib.ExitStack()

  def __enter__(self):
    self._file = self._open.enter_context(files.atomic_open(self.path, "wb"))
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
    self._open.__exit__(exc_type, exc, tb)  # renames the shard, or removes it on an exception
    if exc_type is None:
      with files.atomic_open(self.path + ".idx", "wb") as f:
        np.save(f, np.asarray(self._index, np.int64).reshape(-1, 2))
    return False


def manifest_path(path) -> str:
  path = os.fspath(path)
  return os.path.join(path, "manifest.json") if os.path.isdir(path) else path


def write_manifest(out_dir, manifest: dict) -> str:
  """Atomically writes out_dir/manifest.json; returns its path."""
  path = os.path.join(os.fspath(out_dir), "manifest.json")
  manifest = {"format": FORMAT, **manifest}
  files.write(path, json.dumps(manifest, indent=1) + "\n")
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

  A cut-off record or a bad length crc raises RecordError, or with skip_corrupt
  ends the scan there and counts 1 corrupt record.
  """
  rows, offset, size = [], 0, os.path.getsize(path)
  with open(path, "rb") as f:
    while offset < size:
      header = os.pread(f.fileno(), _HEADER, offset)
      length = struct.unpack("<Q", header[:8])[0] if len(header) == _HEADER else 0
      if len(header) == _HEADER and (struct.unpack("<I", header[8:])[0] !=
                                     masked_crc32c(header[:8])):
        problem = "length crc mismatch"
      elif len(header) < _HEADER or offset + _HEADER + length + _FOOTER > size:
        problem = (f"truncated record (file ends at byte {size}, record needs "
                   f"{_HEADER + length + _FOOTER} bytes)")
      else:
        rows.append((offset + _HEADER, length))
        offset += _HEADER + length + _FOOTER
        continue
      if not skip_corrupt:
        raise RecordError(f"{path}: byte offset {offset}: {problem}")
      return np.asarray(rows, np.int64).reshape(-1, 2), 1
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
    view = self.read_view(index)
    return None if view is None else view.tobytes()

  def read_view(self, index: int) -> np.ndarray | None:
    """source[index] as a uint8 view into a reused per-thread buffer.

    Valid until this thread's next read_view. The hot paths use it: a fresh
    multi-MB buffer per record costs more in page faults than the read itself.
    """
    path, offset, length = self.locate(index)
    local = self.__dict__.setdefault("_local", threading.local())
    size, start = _HEADER + length + _FOOTER, offset - _HEADER
    if getattr(local, "buffer", None) is None or len(local.buffer) < size:
      local.buffer = np.empty(size + size // 4, np.uint8)
    record = local.buffer[:size]
    header, payload, footer = record[:_HEADER], record[_HEADER:-_FOOTER], record[-_FOOTER:]
    try:
      if os.preadv(self._fd(path), [record], start) != size:
        self._truncated(path, start, length)
      problem = self._problem(header, payload, footer, length)
      if problem:
        raise RecordError(f"{path}: byte offset {start}: {problem}")
    except RecordError:
      if not self.skip_corrupt:
        raise
      self.num_corrupt += 1
      return None
    return payload

  def _problem(self, header, payload, footer, length: int) -> str | None:
    stored, length_crc = struct.unpack("<QI", header)
    if stored != length:
      return f"length field {stored} disagrees with the index ({length})"
    if self.verify_crc and length_crc != masked_crc32c(header[:8]):
      return "length crc mismatch"
    if self.verify_crc and struct.unpack("<I", footer)[0] != masked_crc32c(payload):
      return "payload crc mismatch"
    return None

  def decode_image(self, index: int, payload) -> np.ndarray:
    """decode_image(payload) of record `index`; a malformed record raises RecordError."""
    try:
      return decode_image(payload)
    except ValueError as e:
      path, offset, _ = self.locate(index)
      raise RecordError(f"{path}: byte offset {offset - _HEADER}: {e}") from None

  def _truncated(self, path: str, start: int, length: int, size: int | None = None):
    size = os.fstat(self._fd(path)).st_size if size is None else size
    raise RecordError(f"{path}: byte offset {start}: truncated record (file ends at "
                      f"byte {size}, record needs {_HEADER + length + _FOOTER} bytes)")

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
