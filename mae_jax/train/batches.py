"""Global batches for the train loop: in-memory synthetic crops or the grain pipeline.

Both speak one protocol, so the loop never asks which one it has:

    data = make_batches(config, batch_sharding)   # (B, H, W, C) global jax.Arrays
    images = next(data)
    ckpt.save(step, state, data.iterator)           # grain-checkpointable get_state / set_state
    state, it = ckpt.restore(step, abstract, data.iterator if data.restores_iterator else None)
    data.resume(step, it)
    data.close()

This sits in `train` (not `data`) because it builds sharded jax arrays; `mae_jax.data` stays
free of jax so that conversion hosts need none.
"""
import json
from typing import Protocol

import jax
import numpy as np

from mae_jax.data import input_pipeline
from mae_jax.train import ConfigError


class Batches(Protocol):
  """What the train loop needs of a data source."""
  restores_iterator: bool  # whether a resume reads the iterator state saved in the checkpoint
  iterator: object  # get_state / set_state: saved with every checkpoint
  skipped: int  # corrupt records skipped so far by this process (data.skip_corrupt)

  def __next__(self) -> jax.Array: ...
  def resume(self, step: int, restored_iterator) -> None: ...
  def close(self) -> None: ...


def make_batches(config, batch_sharding):
  """(batches, one line saying what they are) for `config.data`."""
  if config.data.manifest:
    return (GrainBatches(config, batch_sharding),
            f"data: {config.data.manifest} ({config.data.num_workers} grain workers)")
  return (SyntheticCrops(config, batch_sharding),
          "data: data.manifest is unset -> in-memory SYNTHETIC 6-channel crops "
          "(smooth random textures, deterministic by step)")


class SyntheticCrops:
  restores_iterator = False

  """In-memory 6-channel crops: smooth random textures, a pure function of (seed, step, row).

  Used when `data.manifest` is unset. Every row is generated from its global position, so the
  batches are identical on any mesh or process count and a resumed run sees the same data.
  Duck-types the grain iterator protocol (get_state / set_state) for the checkpoint.
  """

  def __init__(self, config, batch_sharding):
    m = config.model
    self.shape = (config.batch_size, m.image_size, m.image_size, m.channels)
    self.dtype = np.dtype(config.data.dtype)
    self.seed, self.sharding, self.next_step = int(config.seed), batch_sharding, 1
    self.iterator, self.skipped = self, 0  # a checkpoint saves self.get_state()

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    _, size, _, channels = self.shape
    u = np.arange(size, dtype=np.float32) / size
    out = np.empty((stop - start, size, size, channels), self.dtype)
    top = np.iinfo(self.dtype).max
    for i, row in enumerate(range(start, stop)):
      rng = np.random.default_rng([self.seed, step, row])
      freq = rng.uniform(0.5, 4.0, (2, 3, channels))  # 3 separable waves per channel
      phase = rng.uniform(0, 2 * np.pi, (2, 3, channels))
      fy = np.sin(2 * np.pi * freq[0] * u[:, None, None] + phase[0])  # (H, 3, C)
      fx = np.sin(2 * np.pi * freq[1] * u[:, None, None] + phase[1])
      image = np.einsum("ykc,xkc->yxc", fy, fx) / 3.0  # in [-1, 1]
      out[i] = np.round((image + 1.0) * 0.5 * top).astype(self.dtype)
    return out

  def __next__(self) -> jax.Array:
    step = self.next_step
    self.next_step += 1
    rows = lambda index: self.rows(step, *index[0].indices(self.shape[0])[:2])
    return jax.make_array_from_callback(self.shape, self.sharding, rows)

  def get_state(self) -> bytes:
    return json.dumps({"source": "synthetic", "next_step": self.next_step}).encode()

  def set_state(self, state: bytes):
    self.next_step = int(json.loads(state)["next_step"])

  def start_prefetch(self):  # called by grain's checkpoint handler after a restore
    pass

  def resume(self, step: int, restored_iterator):
    """Continues after checkpoint `step`: the batches are a function of the step alone, so
    the saved iterator is not read (and a resume may change the process count)."""
    del restored_iterator
    self.next_step = step + 1

  def close(self):
    pass


class GrainBatches:
  restores_iterator = True

  """Global batches from the grain pipeline: each process feeds its slice of the batch."""

  def __init__(self, config, batch_sharding):
    d, m = config.data, config.model
    self.shape = (config.batch_size, m.image_size, m.image_size, m.channels)
    rows = {idx[0].indices(config.batch_size)[:2]
            for idx in batch_sharding.addressable_devices_indices_map(self.shape).values()}
    if sum(stop - start for start, stop in rows) != config.batch_size // jax.process_count():
      raise ConfigError(f"mesh {dict(batch_sharding.mesh.shape)}: every process must hold its "
                        f"own 1/{jax.process_count()} of the batch (keep the tensor axis within "
                        f"a process), got rows {sorted(rows)}")
    self.iterator = input_pipeline.train_iterator(
        d.manifest, global_batch_size=config.batch_size, crop_size=m.image_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=d.num_workers, augment=d.augment,
        verify_crc=d.verify_crc, skip_corrupt=d.skip_corrupt, expect_channels=m.channels,
        expect_dtype=d.dtype)
    self.sharding, self.skipped = batch_sharding, 0

  def __next__(self) -> jax.Array:
    batch = next(self.iterator)
    self.skipped += int(batch.pop("num_skipped", 0))
    return jax.make_array_from_process_local_data(self.sharding, batch["image"], self.shape)

  def resume(self, step: int, restored_iterator):
    """Continues after checkpoint `step` with the grain iterator restored from it."""
    del step
    self.iterator = restored_iterator

  def close(self):
    if hasattr(self.iterator, "close"):
      self.iterator.close()
