"""Grain input pipeline over TFRecord shards of HCS sites.

Training: a global shuffle of sites, repeated forever, sliced per JAX process,
one random crop (plus optional dihedral flips) per site, batched inside the grain
workers. Evaluation: every site once, in order, cut into non-overlapping tiles.
Transforms use numpy only, so grain workers never start a JAX backend, and
everything is picklable because grain workers are spawned.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from typing import Iterator

from absl import flags
import grain
import numpy as np

from mae_jax.data import records
from mae_jax.util.errors import UserError


class InputError(UserError, ValueError):
  """A dataset that does not fit the run: one line naming file, field and values."""


def _dtype_name(dtype) -> str:
  if isinstance(dtype, int):  # A bit depth such as 8 or 16.
    return f"uint{dtype}"
  return np.dtype(dtype).name


def open_dataset(manifest_path, *, expect_channels=None, expect_dtype=None,
                 verify_crc=True, skip_corrupt=False):
  """(manifest dict, IndexedTFRecordSource); checks the data against the config."""
  path = records.manifest_path(manifest_path)
  try:
    manifest = records.read_manifest(path)
  except records.ManifestError as e:
    raise InputError(str(e)) from None
  channels = manifest["image_shape"][2]
  if expect_channels is not None and int(expect_channels) != channels:
    raise InputError(f"{path}: field 'image_shape': the data has {channels} channels, "
                     f"the config expects {int(expect_channels)}")
  if expect_dtype is not None and _dtype_name(expect_dtype) != manifest["dtype"]:
    raise InputError(f"{path}: field 'dtype': the data is {manifest['dtype']}, the config "
                     f"expects {_dtype_name(expect_dtype)}")
  # A missing, truncated or unreadable shard raises RecordError (file + offset).
  source = records.IndexedTFRecordSource(records.shard_paths(path, manifest),
                                         verify_crc=verify_crc, skip_corrupt=skip_corrupt)
  for shard, count in zip(manifest["shards"], source.counts):
    if count != shard["records"]:
      message = (f"{path}: shard {shard['path']!r} holds {count} records, the manifest "
                 f"says {shard['records']}")
      if not skip_corrupt:
        raise InputError(message)
      logging.warning("%s (skipping the rest of it)", message)
  if not len(source):
    raise InputError(f"{path}: field 'shards': no records to read")
  return manifest, source


def _check_fits(path, manifest, size: int, what: str) -> None:
  height, width, _ = manifest["image_shape"]
  if size > min(height, width):
    raise InputError(f"{records.manifest_path(path)}: field 'image_shape': sites are "
                     f"{height}x{width}, smaller than the {what} {size}")


class ShuffledDraws:
  """Endless stream of crop draws; epoch e visits every record once, in a seeded order.

  Element i is (record index, y, x, k) for the (i mod n)-th record of epoch
  i // n: y, x in [0, 1) place the crop and k in 0..7 picks a dihedral map (0
  without augment). This does the work of grain's shuffle().repeat().random_map()
  in numpy, one epoch at a time: on 256 records index_shuffle costs 0.13-0.4 ms
  per element and random_map reseeds a Philox generator (~50 µs) per element,
  against a budget of ~1 ms per crop on 2 cores.
  """

  def __init__(self, num_records: int, seed: int, augment: bool = False):
    self.num_records, self.seed, self.augment = num_records, seed, augment
    self._epochs, self._lock = {}, threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, position: int):
    epoch, i = divmod(int(position), self.num_records)
    order, yx, k = self._epoch(epoch)
    return int(order[i]), float(yx[i, 0]), float(yx[i, 1]), int(k[i])

  def _epoch(self, epoch: int):
    draws = self._epochs.get(epoch)
    if draws is None:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(self.num_records)
      draws = (order.astype(np.int32) if self.num_records < 2**31 else order,
               rng.random((self.num_records, 2), np.float32),
               rng.integers(8 if self.augment else 1, size=self.num_records, dtype=np.uint8))
      with self._lock:  # Reader threads share this; keep two epochs for stragglers.
        self._epochs[epoch] = draws
        for old in sorted(self._epochs)[:-2]:
          del self._epochs[old]
    return draws

  def __getstate__(self):
    return {"num_records": self.num_records, "seed": self.seed, "augment": self.augment}

  def __setstate__(self, state):
    self.__init__(**state)


def crop_site(image: np.ndarray, draw, size: int) -> np.ndarray:
  """The size² crop of an HWC site that a ShuffledDraws element picks, as a view."""
  _, y, x, k = draw
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f"site of {height}x{width} is smaller than the crop {size}")
  y, x = int(y * (height - size + 1)), int(x * (width - size + 1))
  crop = np.rot90(image[y:y + size, x:x + size], k % 4)
  return crop[:, ::-1] if k >= 4 else crop


@dataclasses.dataclass(frozen=True)
class Labelled:
  """The records a labelled (WSL) run draws from and their classes.

  Draws index `records` (the records with a class), and each crop carries the class of its
  record. None (unlabelled): draws index every record, and crops carry no label.
  """
  records: np.ndarray  # int64 record indices
  classes: np.ndarray  # int32 class of each of them

  @classmethod
  def of(cls, ids: np.ndarray):
    """From the class id of every record (-1: not trained on)."""
    records = np.flatnonzero(ids >= 0)
    return cls(records, ids[records].astype(np.int32))


def _record(labelled, draw) -> int:
  return int(labelled.records[draw[0]]) if labelled is not None else draw[0]


@dataclasses.dataclass(frozen=True)
class CropBatch:
  """grain batch_fn: reads, decodes and crops each drawn record into one batch.

  Each record is read into a reused per-thread buffer and its crop is copied
  straight into the batch: one copy per crop and no multi-MB allocation per
  record (fresh buffers cost more in page faults than the read itself).
  """
  source: records.IndexedTFRecordSource
  size: int
  labelled: Labelled | None = None

  def __call__(self, draws) -> dict[str, np.ndarray]:
    out = None
    for i, draw in enumerate(draws):
      index = _record(self.labelled, draw)
      image = self.source.decode_image(index, self.source.read_view(index))
      if out is None:
        out = np.empty((len(draws), self.size, self.size, image.shape[2]), image.dtype)
      out[i] = crop_site(image, draw, self.size)
    if self.labelled is None:
      return {"image": out}
    return {"image": out, "label": self.labelled.classes[[d[0] for d in draws]]}


# A record that failed its checks (skip_corrupt=True): counted, then dropped.
_CORRUPT = {}


@dataclasses.dataclass(frozen=True)
class ReadCrop:
  """Map to one crop (a copy) or the _CORRUPT marker, for the skip_corrupt path."""
  source: records.IndexedTFRecordSource
  size: int
  labelled: Labelled | None = None

  def __call__(self, draw) -> dict[str, np.ndarray]:
    index = _record(self.labelled, draw)
    payload = self.source.read_view(index)
    if payload is None:
      return _CORRUPT
    crop = {"image": crop_site(self.source.decode_image(index, payload), draw, self.size).copy()}
    if self.labelled is not None:
      crop["label"] = self.labelled.classes[draw[0]]
    return crop


class _SkipCorruptBatchDataset(grain.IterDataset):
  """Batches of exactly batch_size crops; corrupt markers are dropped and counted."""

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __iter__(self):
    return _SkipCorruptBatchIterator(self._parent.__iter__(), self._batch_size)


class _SkipCorruptBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __next__(self):
    crops, skipped = [], 0
    while len(crops) < self._batch_size:
      element = next(self._parent)
      if "image" in element:
        crops.append(element)
      else:
        skipped += 1
    batch = {k: np.stack([c[k] for c in crops]) for k in crops[0]}
    return dict(batch, num_skipped=np.int64(skipped))

  # Nothing is buffered between calls, so the parent's state is exact.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def train_dataset(manifest_path, *, global_batch_size: int, crop_size: int = 256,
                  seed: int = 0, process_index: int = 0, process_count: int = 1,
                  augment: bool = False, verify_crc: bool = True,
                  skip_corrupt: bool = False, expect_channels=None, expect_dtype=None,
                  labels: np.ndarray | None = None, read_threads: int = 2,
                  read_buffer: int = 2) -> grain.IterDataset:
  """Endless, deterministic stream of this process's local training batches.

  Yields {"image": (global_batch_size // process_count, crop, crop, C)} in the
  stored dtype. Epochs are global reshuffles of all sites, each site giving one
  random crop; process p takes positions p, p + P, ... of that stream. With
  skip_corrupt=True corrupt records are dropped, and each batch also carries
  "num_skipped" (int64 scalar: records dropped while filling it; pop it before
  making jax.Arrays). With `labels` (the int32 class of every record, -1 for
  records not to train on; mae_jax/data/labels.py) only labelled records are
  drawn and batches also hold their (local_batch,) int32 "label". read_threads
  and read_buffer (batches) set grain's ReadOptions in each process.
  """
  if global_batch_size % process_count:
    raise InputError(f"global batch size {global_batch_size} is not divisible by "
                     f"{process_count} processes")
  if not 0 <= process_index < process_count:
    raise InputError(f"process_index {process_index} not in [0, {process_count})")
  manifest, source = open_dataset(manifest_path, expect_channels=expect_channels,
                                  expect_dtype=expect_dtype, verify_crc=verify_crc,
                                  skip_corrupt=skip_corrupt)
  _check_fits(manifest_path, manifest, crop_size, "crop size")
  local_batch = global_batch_size // process_count
  labelled = None
  if labels is not None:
    if len(labels) != len(source):
      raise InputError(f"{records.manifest_path(manifest_path)}: {len(source)} records but "
                       f"{len(labels)} labels")
    labelled = Labelled.of(np.asarray(labels))
  # Slice after drawing, so processes don't read neighbouring records in
  # lockstep and each crop's draw is keyed by its global position. Records are
  # read inside the batch function, one at a time into a reused buffer.
  count = len(source) if labelled is None else len(labelled.records)
  draws = grain.MapDataset.source(ShuffledDraws(count, seed, augment))
  draws = draws[process_index::process_count]
  if skip_corrupt:
    # Dropping records moves batch boundaries: batch after the element stream.
    crops = draws.map(ReadCrop(source, crop_size, labelled)).to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads,
        prefetch_buffer_size=max(read_buffer * local_batch, read_threads)))
    return _SkipCorruptBatchDataset(crops, local_batch)
  batches = draws.batch(local_batch, drop_remainder=True,
                        batch_fn=CropBatch(source, crop_size, labelled))
  return batches.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(read_buffer, read_threads)))


def train_iterator(manifest_path, *, num_workers: int = 0, worker_buffer: int = 2,
                   **kwargs) -> grain.DatasetIterator:
  """Iterator over train_dataset(**kwargs), prefetched by num_workers processes.

  get_state()/set_state() resume exactly, with the same num_workers only (grain
  keeps one state per worker). Call close() when done.
  """
  ds = train_dataset(manifest_path, **kwargs)
  if num_workers > 0:
    # grain 0.2.18 reads absl flags in mp_prefetch and fails outside app.run (#1355).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=worker_buffer))
  return iter(ds)


def tile_grid(height: int, width: int, size: int, pad: bool = False) -> tuple[int, int]:
  """(rows, cols) of the tiles a height x width site gives: the largest centred grid of whole
  tiles (a 1080² JUMP site: 4x4 tiles of 256, 28 px unused on each side), or with `pad` the
  smallest grid that covers the site, which is centred on it and zero-padded (5x5 of 256)."""
  if pad:
    return -(-height // size), -(-width // size)
  return height // size, width // size


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Site index -> (index, (n, t, t, C) tiles of a centred grid), or None if skipped."""
  source: records.IndexedTFRecordSource
  size: int
  pad: bool = False

  def __call__(self, index: int):
    payload = self.source.read_view(index)
    if payload is None:
      return None
    image = self.source.decode_image(index, payload)
    height, width, channels = image.shape
    t = self.size
    rows, cols = tile_grid(height, width, t, self.pad)
    if not rows or not cols:
      raise ValueError(f"site {index} of {height}x{width} is smaller than the tile {t}")
    if self.pad and (rows * t, cols * t) != (height, width):
      canvas = np.zeros((rows * t, cols * t, channels), image.dtype)
      y, x = (rows * t - height) // 2, (cols * t - width) // 2
      canvas[y:y + height, x:x + width] = image
      image, height, width = canvas, rows * t, cols * t
    y, x = (height - rows * t) // 2, (width - cols * t) // 2
    grid = image[y:y + rows * t, x:x + cols * t].reshape(rows, t, cols, t, channels)
    # One copy, always: the payload buffer is reused for the next record.
    tiles = np.empty((rows * cols, t, t, channels), image.dtype)
    tiles.reshape(rows, cols, t, t, channels)[...] = grid.swapaxes(1, 2)
    return int(index), tiles


def eval_tiles(manifest_path, *, tile_size: int = 256, batch_size: int = 32,
               expect_channels=None, expect_dtype=None, skip_corrupt: bool = False,
               read_threads: int = 4, pad: bool = False,
               sites=None) -> Iterator[dict[str, np.ndarray]]:
  """Every site (or the site indices `sites`) once, in order, as {"image": (B, t, t, C),
  "site": (B,) int64}.

  Each site gives its grid of non-overlapping t×t tiles (row-major, centred when
  t doesn't divide the site; with `pad`, zero-padded to whole tiles instead:
  tile_grid); batches run across sites and the last may be short. With
  skip_corrupt, corrupt sites give no tiles.
  """
  manifest, source = open_dataset(manifest_path, expect_channels=expect_channels,
                                  expect_dtype=expect_dtype, skip_corrupt=skip_corrupt)
  if not pad:
    _check_fits(manifest_path, manifest, tile_size, "tile size")
  indices = (grain.MapDataset.range(len(source)) if sites is None else
             grain.MapDataset.source([int(i) for i in sites]))
  ds = (indices.map(_Tiles(source, tile_size, pad))
        .to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                           prefetch_buffer_size=2 * read_threads)))
  return _tile_batches(ds, batch_size)


def _tile_batches(ds, batch_size: int):
  images, sites, count = [], [], 0
  for site, tiles in ds:
    images.append(tiles)
    sites.append(np.full(len(tiles), site, np.int64))
    count += len(tiles)
    while count >= batch_size:
      image, site_ids = np.concatenate(images), np.concatenate(sites)
      yield {"image": image[:batch_size], "site": site_ids[:batch_size]}
      images, sites, count = [image[batch_size:]], [site_ids[batch_size:]], count - batch_size
  if count:
    yield {"image": np.concatenate(images), "site": np.concatenate(sites)}


def site_metadata(manifest_path) -> list[dict]:
  """Metadata dict of every site, in source (= eval_tiles "site") order."""
  _, source = open_dataset(manifest_path)
  try:
    return [source.metadata(i) for i in range(len(source))]
  finally:
    source.close()
