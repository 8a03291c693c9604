"""Global batches for the train loop: in-memory synthetic crops or the grain pipeline.

Both speak one protocol, so the loop never asks which one it has:

    ids = record_labels(config, workdir)          # WSL: class of every record (else None)
    data = make_batches(config, shardings, ids)   # shardings: step.batch_shardings
    batch = next(data)                              # {"image": (B, H, W, C)[, "label": (B,)]}
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

from mae_jax.data import input_pipeline, labels, records
from mae_jax.models import registry
from mae_jax.train import ConfigError
from mae_jax.train.metrics import is_primary, print_primary

LABELS_FILE = "labels.json"


class Batches(Protocol):
  """What the train loop needs of a data source."""
  restores_iterator: bool  # whether a resume reads the iterator state saved in the checkpoint
  iterator: object  # get_state / set_state: saved with every checkpoint
  skipped: int  # corrupt records skipped so far by this process (data.skip_corrupt)

  def __next__(self) -> dict[str, jax.Array]: ...
  def resume(self, step: int, restored_iterator) -> None: ...
  def close(self) -> None: ...


def record_labels(config, workdir):
  """The class of every record for a labelled model kind (WSL), else None.

  The vocabulary is WORKDIR/labels.json: built from the records' `wsl.label_key` metadata at
  the start of a run, reused on resume. Sets `config.model.num_classes` to its size. Without a
  manifest the synthetic crops carry `model.num_classes` classes of their own.
  """
  if not registry.takes_labels(config.model) or not config.data.manifest:
    return None
  w, where = config.wsl, config.data.manifest
  _, source = input_pipeline.open_dataset(where, skip_corrupt=config.data.skip_corrupt)
  try:
    names, controls = labels.site_labels(source, w.label_key, where)
  finally:
    source.close()
  path = workdir / LABELS_FILE
  if path.exists():
    vocab = labels.load(path)
    if (vocab.get("label_key"), vocab.get("controls")) != (w.label_key, w.controls):
      raise ConfigError(f"{path}: this run classifies {vocab.get('label_key')!r} with controls "
                        f"{vocab.get('controls')!r}; the config asks for {w.label_key!r} / "
                        f"{w.controls!r}: use a new workdir")
  else:
    vocab = labels.vocabulary(names, controls, label_key=w.label_key, controls_mode=w.controls)
    if is_primary():
      labels.save(path, vocab)
  ids = labels.encode(names, controls, vocab, where)
  config.model.num_classes = len(vocab["classes"])
  print_primary(f"labels: {len(vocab['classes'])} classes of {w.label_key!r} "
                f"(controls: {w.controls}) on {int((ids >= 0).sum())} of {len(ids)} records; "
                f"vocabulary in {path}")
  return ids


def match_manifest(config, given=()) -> list[str]:
  """Sets `data.dtype` and `model.channels` from `data.manifest` unless `given` (the keys set on
  the command line, e.g. {"data.dtype"}) holds them; returns the changes as "KEY=VALUE".

  A config file's defaults (uint8, 6 channels) say nothing about the user's shards, so the
  manifest's dtype and channel count win over them; an explicit override is kept, and the
  pipeline then refuses a mismatch. A CA-MAE (model.channel_agnostic) takes any channel count up
  to model.max_channels (docs/science.md §1.4).
  """
  if not config.data.manifest:
    return []
  manifest = records.read_manifest(config.data.manifest)
  m, changes = config.model, []
  if "data.dtype" not in given and manifest["dtype"] != np.dtype(config.data.dtype).name:
    config.data.dtype = manifest["dtype"]
    changes.append(f"data.dtype={manifest['dtype']}")
  channels = int(manifest["image_shape"][2])
  if ("model.channels" in given and "channels" in m and channels != int(m.channels)
      and not m.get("channel_agnostic")):
    # Refused here, at startup, before any data is read or anything compiled.
    names = ",".join(map(str, manifest.get("channels", [])))
    raise ConfigError(f"{config.data.manifest}: {channels} channels ({names}), but "
                      f"model.channels={int(m.channels)} and the model is not channel-agnostic: "
                      f"drop --config.model.channels, or train a CA-MAE "
                      f"(--config.model.channel_agnostic=True, docs/science.md §1.4)")
  if "model.channels" not in given and "channels" in m and channels != int(m.channels):
    if m.get("channel_agnostic") and channels > int(m.max_channels):
      raise ConfigError(f"{config.data.manifest}: {channels} channels, but the CA-MAE takes at "
                        f"most model.max_channels={int(m.max_channels)}")
    m.channels = channels
    changes.append(f"model.channels={channels}")
  return changes


def make_batches(config, shardings: dict, record_ids=None):
  """(batches, one line saying what they are) for `config.data`."""
  if config.data.manifest:
    return (GrainBatches(config, shardings, record_ids),
            f"data: {config.data.manifest} ({config.data.num_workers} grain workers)")
  return (SyntheticCrops(config, shardings),
          "data: data.manifest is unset -> in-memory SYNTHETIC 6-channel crops "
          "(smooth random textures, deterministic by step)")


class SyntheticCrops:
  restores_iterator = False

  """In-memory 6-channel crops: smooth random textures, a pure function of (seed, step, row).

  Used when `data.manifest` is unset. Every row is generated from its global position, so the
  batches are identical on any mesh or process count and a resumed run sees the same data.
  For a labelled kind (WSL) each crop also has one of `model.num_classes` classes, which sets
  the frequency of its first wave (learnable). Duck-types the grain iterator protocol
  (get_state / set_state) for the checkpoint.
  """

  def __init__(self, config, shardings: dict):
    m = config.model
    self.shape = (config.batch_size, m.image_size, m.image_size, m.channels)
    self.dtype = np.dtype(config.data.dtype)
    self.classes = int(m.num_classes) if "label" in (shardings or {}) else 0
    self.seed, self.shardings, self.next_step = int(config.seed), shardings, 1
    self.iterator, self.skipped = self, 0  # a checkpoint saves self.get_state()

  def label(self, step: int, row: int) -> int:
    return int(np.random.default_rng([self.seed, step, row, 1]).integers(self.classes))

  def labels(self, step: int, start: int, stop: int) -> np.ndarray:
    return np.array([self.label(step, row) for row in range(start, stop)], np.int32)

  def images(self, step: int, start: int, stop: int) -> np.ndarray:
    _, size, _, channels = self.shape
    u = np.arange(size, dtype=np.float32) / size
    out = np.empty((stop - start, size, size, channels), self.dtype)
    top = np.iinfo(self.dtype).max
    for i, row in enumerate(range(start, stop)):
      rng = np.random.default_rng([self.seed, step, row])
      freq = rng.uniform(0.5, 4.0, (2, 3, channels))  # 3 separable waves per channel
      phase = rng.uniform(0, 2 * np.pi, (2, 3, channels))
      if self.classes:
        freq[0, 0] = 0.5 + 3.5 * (self.label(step, row) + 0.5) / self.classes
      fy = np.sin(2 * np.pi * freq[0] * u[:, None, None] + phase[0])  # (H, 3, C)
      fx = np.sin(2 * np.pi * freq[1] * u[:, None, None] + phase[1])
      image = np.einsum("ykc,xkc->yxc", fy, fx) / 3.0  # in [-1, 1]
      out[i] = np.round((image + 1.0) * 0.5 * top).astype(self.dtype)
    return out

  def __next__(self) -> dict[str, jax.Array]:
    step = self.next_step
    self.next_step += 1
    make = {"image": (self.shape, self.images), "label": (self.shape[:1], self.labels)}

    def array(key, sharding):
      shape, rows = make[key]
      return jax.make_array_from_callback(
          shape, sharding, lambda index: rows(step, *index[0].indices(self.shape[0])[:2]))

    return {k: array(k, sh) for k, sh in self.shardings.items()}

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

  def __init__(self, config, shardings: dict, record_ids=None):
    d, m = config.data, config.model
    self.shape = (config.batch_size, m.image_size, m.image_size, m.channels)
    images = shardings["image"]
    rows = {idx[0].indices(config.batch_size)[:2]
            for idx in images.addressable_devices_indices_map(self.shape).values()}
    if sum(stop - start for start, stop in rows) != config.batch_size // jax.process_count():
      raise ConfigError(f"mesh {dict(images.mesh.shape)}: every process must hold its "
                        f"own 1/{jax.process_count()} of the batch (keep the tensor axis within "
                        f"a process), got rows {sorted(rows)}")
    self.iterator = input_pipeline.train_iterator(
        d.manifest, global_batch_size=config.batch_size, crop_size=m.image_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=d.num_workers, augment=d.augment,
        verify_crc=d.verify_crc, skip_corrupt=d.skip_corrupt, expect_channels=m.channels,
        expect_dtype=d.dtype, labels=record_ids)
    self.shardings, self.skipped = shardings, 0

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self.iterator)
    self.skipped += int(batch.pop("num_skipped", 0))
    return {k: jax.make_array_from_process_local_data(
        sh, batch[k], (self.shape if k == "image" else self.shape[:1]))
            for k, sh in self.shardings.items()}

  def resume(self, step: int, restored_iterator):
    """Continues after checkpoint `step` with the grain iterator restored from it."""
    del step
    self.iterator = restored_iterator

  def close(self):
    if hasattr(self.iterator, "close"):
      self.iterator.close()
