"""Embed every well of a prepared dataset with an MAE encoder: tiles -> sites -> wells.

  python -m eval.embed --ckpt=DIR --manifest=SHARDS/manifest.json --out=DIR|WELLS.parquet

writes the well embeddings as a profile table (Metadata_Plate, Metadata_Well, Metadata_Site_Count,
Metadata_Perturbation, Metadata_Gene, Metadata_Batch, Metadata_pert_type, ...; emb_0000 ...;
eval/profiles.py) that `eval.recall --embeddings`, pycytominer and copairs read.

Each site is cut into non-overlapping crops of the model's image size (four 256² tiles of a 512²
site, 64 of a 2048² one), crops are embedded in batches sharded over all local devices (mean of
patch tokens by default; CLS or an earlier block by flag), tile embeddings are averaged to the site
and sites to the well (docs/science.md §3.1-3.2).
"""
import time

import jax
from absl import logging
import numpy as np
import pandas as pd
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax.train import checkpointing, cpu_options, sharding
from mae_jax.util import progress as progress_lib

from mae_jax.data import input_pipeline
from eval import EvalError

WELL_COLUMNS = ("well_id", "experiment", "plate", "well", "site_count", "perturbation", "gene",
                "perturbation_type", "is_control", "concentration", "smiles", "cell_type")


def data_parallel_mesh() -> Mesh:
  """All local devices on the data axis (evaluation replicates the parameters)."""
  devices = np.asarray(jax.local_devices())
  return Mesh(devices.reshape(len(devices), 1, 1), sharding.MESH_AXES)


def embed_manifest(model, manifest, *, mesh=None, pooling="mean", block=None, batch_size=32,
                   progress=True, adabn=False, progress_every=30.0, pad_tiles=False,
                   sites=None, metadata=None, timing=None):
  """(site embeddings (S, D) float32, site metadata list) of every site in `manifest`, or of
  the site indices `sites` (one process's share, eval/parts.py).

  Sites of any size: each gives the largest centred grid of whole model-size tiles, or with
  `pad_tiles` the smallest grid covering it, zero-padded (input_pipeline.tile_grid); each site's
  metadata records how many tiles it gave ("tiles").

  `timing`, a dict, receives "crops", "seconds" and "crops_per_s" (after the first batch, which
  compiles). `progress`: a bar on stderr when it is a terminal, else a line (done/total, rate, ETA) every
  `progress_every` seconds (mae_jax/util/progress.py).

  With `adabn` (models with BatchNorm: the WSL DenseNet) each experiment's crops are embedded
  with BatchNorm statistics re-estimated on that experiment (`adabn_statistics`), from all of
  its sites even when only some of them are to be embedded here.
  """
  mesh = mesh or data_parallel_mesh()
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
  graphdef, params, stats = nnx.split(model, nnx.Param, ...)
  replicated = NamedSharding(mesh, P())
  params, stats = jax.device_put((params, stats), replicated)
  images_sharding = NamedSharding(mesh, P(sharding.MESH_AXES[0]))

  @cpu_options.jit_embed
  def embed(params, stats, images):
    return nnx.merge(graphdef, params, stats).embed(images, pooling=pooling, block=block)

  cfg = model.cfg
  metadata = metadata or input_pipeline.site_metadata(manifest)
  channels = None if cfg.get("channel_agnostic") else cfg.channels  # CA-MAE takes any count
  tiles = lambda sites: input_pipeline.eval_tiles(
      manifest, tile_size=cfg.image_size, batch_size=batch_size, expect_channels=channels,
      pad=pad_tiles, sites=sites)
  experiment = np.array([str(m.get("experiment", "")) for m in metadata])
  if adabn:
    if not hasattr(model, "batch_statistics"):
      raise EvalError(f"--adabn re-estimates BatchNorm statistics; a {type(model).__name__} has "
                      f"none (it is for the WSL DenseNet)")
    statistics_sites = None if sites is None else np.flatnonzero(
        np.isin(experiment, experiment[sites]))
    per_experiment = adabn_statistics(model, tiles(statistics_sites), experiment, batch_size,
                                      replicated)
  sums, counts = None, np.zeros(len(metadata), np.int64)
  bar = progress_lib.Progress(len(metadata) if sites is None else len(sites), unit="site",
                              desc="embedding", mode="auto" if progress else "off",
                              every=progress_every)
  start, crops = time.perf_counter(), 0
  for batch in tiles(sites):
    images, sites = batch["image"], batch["site"]
    groups = ([(stats, np.ones(len(sites), bool))] if not adabn else
              [(per_experiment[e], experiment[sites] == e) for e in np.unique(experiment[sites])])
    fresh = int((counts[np.unique(sites)] == 0).sum())  # a site's tiles may span two batches
    for group_stats, rows in groups:
      n = int(rows.sum())
      # Pad a short batch: one compiled shape, an even split over devices.
      x = np.zeros((batch_size,) + images.shape[1:], images.dtype)
      x[:n] = images[rows]
      emb = np.asarray(embed(params, group_stats, jax.device_put(x, images_sharding)),
                       np.float32)[:n]
      if sums is None:
        sums = np.zeros((len(metadata), emb.shape[1]), np.float64)
      np.add.at(sums, sites[rows], emb)
      np.add.at(counts, sites[rows], 1)
    if not crops:
      warm = (time.perf_counter(), len(sites))
    crops += len(sites)
    bar.update(fresh)
    bar.set_postfix(crops_per_s=f"{crops / (time.perf_counter() - start):.1f}")
  bar.close()
  seconds = time.perf_counter() - start
  # crops/s after the first batch (which compiles); over the whole loop when it was the only one
  steady = (crops / max(seconds, 1e-9) if crops == warm[1] else
            (crops - warm[1]) / max(time.perf_counter() - warm[0], 1e-9)) if crops else 0.0
  logging.info("embedded %d crops of %d sites in %.1f s (%.1f crops/s after the first batch)",
               crops, int((counts > 0).sum()), seconds, steady)
  if timing is not None:
    timing.update(crops=crops, seconds=seconds, crops_per_s=steady)
  if sums is None:
    raise EvalError(f"{manifest}: no site could be embedded")
  seen = counts > 0
  logging.info("tiles per site: %s of %d px (%s)", sorted(set(counts[seen].tolist())),
               cfg.image_size, "zero-padded grid" if pad_tiles else "centred whole tiles")
  return ((sums[seen] / counts[seen, None]).astype(np.float32),
          [dict(m, tiles=int(n)) for m, n, s in zip(metadata, counts, seen) if s])


def adabn_statistics(model, tiles, experiment, batch_size, replicated) -> dict:
  """AdaBN (Li et al. 2016): experiment -> BatchNorm statistics of its crops alone.

  Crops are gathered per experiment into full batches; each batch's statistics (every layer's
  batch mean and variance in train mode, `model.batch_statistics`) are averaged over the
  experiment's batches, weighted by crops, as torch's cumulative running average
  (momentum=None) would estimate them. An experiment with a single crop keeps the model's own.
  """
  graphdef, params, stats = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, replicated)
  batch_stats = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s, copy=True).batch_statistics(x))
  pending, sums, counts = {}, {}, {}

  def add(e, images):
    got = jax.device_get(batch_stats(params, stats, images))
    weighted = jax.tree.map(lambda v: np.asarray(v, np.float64) * len(images), got)
    sums[e] = weighted if e not in sums else jax.tree.map(np.add, sums[e], weighted)
    counts[e] = counts.get(e, 0) + len(images)

  for batch in tiles:
    names = experiment[batch["site"]]
    for e in np.unique(names):
      buffer = np.concatenate([*pending.get(e, []), batch["image"][names == e]])
      while len(buffer) >= batch_size:
        add(e, buffer[:batch_size])
        buffer = buffer[batch_size:]
      pending[e] = [buffer]
  for e, (buffer,) in pending.items():
    if len(buffer) >= 2:
      add(e, buffer)
  out = {}
  stats = stats.to_pure_dict()
  for e in np.unique(experiment):
    own = stats if e not in sums else jax.tree.map(
        lambda v, ref: np.asarray(v / counts[e], ref.dtype), sums[e], stats)
    out[e] = jax.device_put(own, replicated)
  return out


def wells_from_sites(site_emb, site_meta):
  """Averages the sites of each well: (well embeddings (W, D), well metadata DataFrame)."""
  meta = pd.DataFrame(site_meta)
  if "well_id" not in meta or (meta["well_id"].astype(str) == "").any():
    meta["well_id"] = [f"{m.get('experiment', '')}_{m.get('plate', '')}_{m.get('well', '')}"
                       for m in site_meta]
  codes, _ = pd.factorize(meta["well_id"])
  emb = pd.DataFrame(site_emb, dtype=np.float64).groupby(codes, sort=True).mean()
  emb = emb.to_numpy(np.float32)
  first = meta.groupby(codes, sort=True).first().reset_index(drop=True)
  first["site_count"] = np.bincount(codes)
  return emb, first[[c for c in WELL_COLUMNS if c in first] +
                    [c for c in first if c not in WELL_COLUMNS]]


def embed_wells(ckpt, manifest, *, pooling="mean", block=None, batch_size=32, progress=True,
                adabn=False, **share):
  """Restores the encoder of `ckpt` and embeds every well of `manifest` (eval.recall --ckpt), or
  one process's share (`sites`, `metadata`, `timing`: embed_manifest)."""
  mesh = data_parallel_mesh()
  model, _ = checkpointing.load_for_eval(ckpt, mesh=mesh)
  site_emb, site_meta = embed_manifest(model, manifest, mesh=mesh, pooling=pooling, block=block,
                                       batch_size=batch_size, progress=progress, adabn=adabn,
                                       **share)
  return wells_from_sites(site_emb, site_meta)


# ------------------------------------------------------------------------------------ CLI

def _define_flags():
  from absl import flags
  import eval as eval_lib
  from mae_jax.train import distributed
  flags.DEFINE_string("ckpt", None, "checkpoint dir (workdir or a step dir) to embed with")
  flags.DEFINE_string("manifest", None, "manifest.json of the prepared dataset")
  flags.DEFINE_string("out", None, "the well table to write: a folder that gets one part per "
                      "process (wells-0000I-of-0000N.parquet, then index.json), or FILE.parquet "
                      "(one process); eval.recall --embeddings reads both")
  eval_lib.define_embedding_flags()
  flags.DEFINE_string("control", "EMPTY_control", "perturbation label of control wells "
                      "(Metadata_pert_type negcon)")
  distributed.define_flags()


def run(f) -> dict:
  """Embeds this process's share of the wells into its part of --out (eval/parts.py).

  Under jax.distributed (launch/README.md) every process embeds the wells of its share on its
  own devices and writes its part; process 0 writes DIR/index.json once all parts are complete.
  A rerun skips complete parts embedded with the same settings.
  """
  import os
  from etils import epath
  from eval import parts, profiles
  from mae_jax.train import distributed
  for name in ("ckpt", "manifest", "out"):
    if not f[name].value:
      raise EvalError(f"--{name} is required")
  if not os.path.isfile(f.manifest):
    raise EvalError(f"--manifest={f.manifest}: file not found")
  distributed.initialize(f)
  start = time.perf_counter()
  count, index = jax.process_count(), jax.process_index()
  one_file = str(f.out).lower().endswith((".parquet", ".pq"))
  if one_file and count > 1:
    raise EvalError(f"--out={f.out}: {count} processes write one part each; give a folder")
  out = f.out if one_file else os.path.join(f.out, parts.part_name(index, count))
  _, step_dir = checkpointing.resolve(f.ckpt)
  settings = {"checkpoint": str(step_dir.resolve()), "manifest": os.path.abspath(f.manifest),
              "pooling": f.pooling, "block": f.block, "adabn": f.adabn, "control": f.control}
  done = None if one_file else parts.finished(out, settings)
  skipped = done is not None
  if not skipped:
    metadata = input_pipeline.site_metadata(f.manifest)
    shares = parts.split_sites(metadata, count)
    if min(map(len, shares)) == 0:  # every process sees it: none waits for a missing peer
      raise EvalError(f"{f.manifest}: {count} processes for fewer wells; use fewer processes")
    timing = {}
    emb, meta = embed_wells(f.ckpt, f.manifest, pooling=f.pooling, block=f.block,
                            batch_size=f.batch_size, adabn=f.adabn, sites=shares[index],
                            metadata=metadata, timing=timing)
    table = profiles.wells_frame(emb, meta, f.control)
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    profiles.write_parquet(table, out)
    done = {"wells": int(len(table)), "sites": int(meta["site_count"].sum()),
            "dim": int(emb.shape[1]), "control_wells":
            int((table["Metadata_pert_type"] == profiles.NEGCON).sum()),
            "crops": timing["crops"], "crops_per_s": round(timing["crops_per_s"], 2),
            "seconds": round(time.perf_counter() - start, 3)}
    if not one_file:
      parts.write_marker(out, settings, done)
  result = {"out": out, **{k: done[k] for k in ("wells", "sites", "dim", "control_wells",
                                                "crops", "crops_per_s")},
            "skipped": skipped, "seconds": round(time.perf_counter() - start, 3)}
  if not one_file:
    if count > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("eval.embed: every part written")
      result.update(process=index, processes=count)
    if index == 0:
      result["index"] = os.path.join(f.out, parts.INDEX)
      result["total_wells"] = parts.write_index(f.out, count)["wells"]
    if count > 1:  # done with the peers: gloo's connection threads print nothing after our line
      jax.distributed.shutdown()
  return result


def main(argv):
  from absl import flags
  from mae_jax.util import cli
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.print_result(run(flags.FLAGS))


if __name__ == "__main__":
  from mae_jax.util import cli as _cli
  _define_flags()
  _cli.run(main, keep_freed_memory=True)
