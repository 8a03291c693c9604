"""tf.train.Example codec of one HCS site: encoder (protobuf) and a zero-copy wire-format reader.

Features: "image" (the HWC array's little-endian bytes), "shape", "dtype", "channels" and one
"meta/<key>" per metadata field. mae_jax/data/records.py re-exports these functions.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

DTYPES = ("uint8", "uint16")


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
# large bytes field costs ~3 ms per MB here, and reading metadata through upb
# would read the whole image, so the hot paths walk the bytes themselves.

def _varint(data, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(data):
      raise ValueError("truncated varint")
    byte = data[pos]
    value |= (byte & 0x7f) << shift
    pos += 1
    if byte < 0x80:
      return value, pos
    shift += 7


def _walk(read, start: int, end: int):
  """Yields (field, wire type, value start, value size) of a message's fields.

  `read(pos, n)` returns up to n bytes of the serialized message from pos.
  """
  pos = start
  while pos < end:
    head = read(pos, 20)
    tag, used = _varint(head, 0)
    wire = tag & 7
    if wire == 0:
      size = _varint(head, used)[1] - used
    elif wire == 2:
      size, after = _varint(head, used)
      used = after
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield tag >> 3, wire, pos + used, size
    pos += used + size
  if pos != end:
    raise ValueError("field runs past the end of its message")


def _feature_entries(read, length: int):
  """Yields (key bytes, value start, value size) of each Example feature."""
  for field, wire, start, size in _walk(read, 0, length):
    if (field, wire) != (1, 2):  # Example.features
      continue
    for field, wire, entry, entry_size in _walk(read, start, start + size):
      if (field, wire) != (1, 2):  # Features.feature map entries
        continue
      head = read(entry, 2)
      key_size = head[1] if len(head) == 2 and head[0] == 0x0a else 0x80
      if key_size < 0x80 and 2 + key_size <= entry_size:  # Usual: a short key first.
        key = bytes(read(entry + 2, key_size))
        rest = _walk(read, entry + 2 + key_size, entry + entry_size)
      else:
        key, rest = None, _walk(read, entry, entry + entry_size)
      value = (0, 0)
      for field, _, pos, n in rest:
        if field == 1:
          key = bytes(read(pos, n))
        elif field == 2:
          value = (pos, n)
      yield key, *value


def _spans(read, start: int, size: int):
  """(kind, wire type, start, size) of each value in a serialized Feature.

  kind: 1 bytes_list, 2 float_list, 3 int64_list.
  """
  return [(kind, wire, p, n) for kind, _, pos, size2 in _walk(read, start, start + size)
          for field, wire, p, n in _walk(read, pos, pos + size2) if field == 1]


def _values(read, start: int, size: int) -> list:
  """Decoded values of a serialized Feature (bytes, floats or ints)."""
  values = []
  for kind, wire, pos, n in _spans(read, start, size):
    data = bytes(read(pos, n))
    if len(data) != n:
      raise ValueError("truncated feature")
    if kind == 1:
      values.append(data)
    elif kind == 2:
      values.extend(np.frombuffer(data, "<f4").tolist())
    else:  # Packed (wire 2) or one plain varint; int64 is two's complement.
      at = 0
      while at < n:
        value, at = _varint(data, at)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)
  return values


def _view_reader(payload):
  view = memoryview(payload)
  return len(view), lambda pos, n: view[pos:pos + n]


def decode_image(payload) -> np.ndarray:
  """Only the HWC image of a site: a read-only view into `payload`, no copy."""
  length, read = _view_reader(payload)
  try:
    found = {k: (s, n) for k, s, n in _feature_entries(read, length)
             if k in (b"image", b"shape", b"dtype")}
    shape = _values(read, *found[b"shape"])
    dtype = np.dtype(_values(read, *found[b"dtype"])[0].decode()).newbyteorder("<")
    (_, _, pos, n), = _spans(read, *found[b"image"])
    image = np.frombuffer(payload, dtype, n // dtype.itemsize, pos).reshape(shape)
  except (KeyError, ValueError, TypeError, IndexError) as e:
    raise ValueError(f"bad site record: {type(e).__name__}: {e}") from None
  return image.astype(dtype.newbyteorder("="), copy=False)


def metadata_from_reader(read, length: int) -> dict:
  """Metadata ("meta/*" features) of a serialized Example, skipping the image.

  `read(pos, n)` returns up to n payload bytes from pos; only the small
  metadata entries are read in full, so a 50 MB site costs a few kB of I/O.
  Strings come back as str, int64 as int (bools as 0/1), empty features as "".
  """
  metadata = {}
  for key, start, size in _feature_entries(read, length):
    if key and key.startswith(b"meta/"):
      values = _values(read, start, size) or [""]
      value = values[0]
      metadata[key[5:].decode()] = value.decode() if isinstance(value, bytes) else value
  return dict(sorted(metadata.items()))


def decode_metadata(payload) -> dict:
  return metadata_from_reader(*reversed(_view_reader(payload)))


def decode_site(payload) -> dict:
  """{"image": HWC ndarray, "channels": [...], "metadata": {key: value}}."""
  length, read = _view_reader(payload)
  channels = [_values(read, s, n) for k, s, n in _feature_entries(read, length)
              if k == b"channels"]
  return {"image": decode_image(payload),
          "channels": [c.decode() for c in (channels[0] if channels else [])],
          "metadata": decode_metadata(payload)}
