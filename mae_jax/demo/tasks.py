"""The demo's stage bodies that read no flags, shared by `python -m mae_jax.demo` and
`python -m mae_jax.experiments`. `paths` is a dict with at least `screen`, `shards`, `manifest`,
`expression` and (for the held-out loss) `train`, the run's training workdir.
"""
import functools
import os

from mae_jax.demo import stages
from mae_jax.demo.stages import log
from mae_jax.util import cli

RECALL_VARIANTS = {  # name -> score_wells options
    "tvn": dict(batch_correction="tvn", arm_correction=True),
    "uncorrected": dict(batch_correction="none", arm_correction=False),
    "tvn_no_arm": dict(batch_correction="tvn", arm_correction=False),
}
EVAL_CROPS, EVAL_BATCH = 256, 64


def make_shards(paths, workers):
  screen = stages.read_json(os.path.join(paths["screen"], "ground_truth", "screen.json"))
  size = screen["image_size"]
  stages.run_module(["data_prep.convert", "--layout=rxrx3", f"--root={paths['screen']}",
                     f"--out={paths['shards']}", f"--image_size={size}", f"--workers={workers}"],
                    "data_prep.convert")


def make_ceiling(paths, path):
  """The screen's true well phenotypes (latent) joined to the well metadata of the shards."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from eval import embed  # pylint: disable=g-import-not-at-top
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  site_meta = input_pipeline.site_metadata(paths["manifest"])
  _, meta = embed.wells_from_sites(np.zeros((len(site_meta), 1), np.float32), site_meta)
  truth = pd.read_csv(os.path.join(paths["screen"], "ground_truth", "wells.csv"))
  truth = truth.set_index("well_id")
  missing = sorted(set(meta["well_id"]) - set(truth.index))
  if missing:
    raise cli.UserError(f"{paths['screen']}/ground_truth/wells.csv: no latent for well "
                        f"{missing[0]} (and {len(missing) - 1} more)")
  stages.save_wells(path, truth.loc[meta["well_id"]].to_numpy(np.float32), meta)


def make_pixel_stats(paths, path, workers, kind="pixel_stats", **options):
  """Hand-crafted well features: pixel statistics, or CellProfiler's (kind="cellprofiler")."""
  from mae_jax.demo import baselines  # pylint: disable=g-import-not-at-top
  step = {"next": 0.0}

  def progress(done, total):
    if done >= step["next"] * total:
      log(f"{kind}: {done}/{total} sites")
      step["next"] += 0.25
  feats, site_meta = baselines.manifest_features(paths["manifest"], workers=workers,
                                                 progress=progress, kind=kind, **options)
  save_sites(path, feats, site_meta)


def save_sites(path, site_emb, site_meta):
  """Site embeddings -> well embeddings (eval.embed's mean over sites) saved in `path`."""
  from eval import embed  # pylint: disable=g-import-not-at-top
  stages.save_wells(path, *embed.wells_from_sites(site_emb, site_meta))


def scoring_inputs(paths, wells_path):
  """The shared inputs of every scoring (`score`): the annotation pairs of every default source,
  restricted to pairs of names that occur in the metadata of the wells at `wells_path`, and the
  screen's expression table.

  Only pairs of genes in the map are ever scored (eval/benchmarks.py: filter_pairs), and the map's
  genes are metadata values of the screen, so the restriction changes no number; it makes each
  of the many scorings filter thousands of pairs instead of every annotated one.
  """
  from eval import recall  # pylint: disable=g-import-not-at-top
  _, meta = stages.load_wells(wells_path)
  names = {str(v) for c in meta.columns for v in meta[c].unique()}
  return {"pairs_by_source": {s: [p for p in v if p[0] in names and p[1] in names]
                              for s, v in recall.load_sources(recall.DEFAULTS["sources"]).items()},
          "expression": recall.load_expression(paths["expression"])}


def mesh_and_model(model_cfg=None, ckpt=None, seed=0):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from eval import embed  # pylint: disable=g-import-not-at-top
  from mae_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from mae_jax.models import registry  # pylint: disable=g-import-not-at-top
  mesh = embed.data_parallel_mesh()
  if ckpt is not None:
    model, _ = checkpointing.load_for_eval(ckpt, mesh=mesh)
  else:
    with nnx.use_eager_sharding(False):
      model = registry.build_model(model_cfg, seed=seed)
  return mesh, model


def embed_model(paths, path, model_cfg=None, ckpt=None, seed=0):
  from eval import embed  # pylint: disable=g-import-not-at-top
  mesh, model = mesh_and_model(model_cfg, ckpt, seed)
  site_emb, site_meta = embed.embed_manifest(model, paths["manifest"], mesh=mesh, batch_size=64)
  save_sites(path, site_emb, site_meta)


def score(paths, emb_path, out_dir, shared):
  """recall.json of every RECALL_VARIANTS entry for one well-embedding file (each reused).

  `shared` holds the annotation pairs and expression table (`scoring_inputs`), read once for all
  scorings of one screen: filled here from the first embedding file if empty.
  """
  from eval import recall  # pylint: disable=g-import-not-at-top
  results = {}
  for name, options in RECALL_VARIANTS.items():
    target = os.path.join(out_dir, name)
    done = os.path.join(target, "recall.json")
    if not os.path.exists(done):
      if not shared:
        shared.update(scoring_inputs(paths, emb_path))
      emb, meta = stages.load_wells(emb_path)
      result = recall.score_wells(emb, meta, **shared, **options)
      result["settings"]["expression"] = paths["expression"]
      if name == "tvn":  # the headline map, browsable: python -m eval.explore --map=TARGET
        recall.write_outputs(result, target)
      else:
        os.makedirs(target, exist_ok=True)
        stages.write_json(done, recall.public(result))
    results[name] = stages.read_json(done)
  return results


def loss_evaluation(paths, model_cfg, seed, steps, crops=EVAL_CROPS):
  """Held-out loss of the random init and each checkpoint, and of predicting the crop mean.

  The same crops and masks for every model: crops drawn with a seed the training never uses,
  masks from a fixed key. In the standardised target space the crop mean is 0 in every channel.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  it = input_pipeline.train_iterator(paths["manifest"], global_batch_size=EVAL_BATCH,
                                     crop_size=model_cfg.image_size, seed=seed + 7919,
                                     num_workers=0)
  batches = [next(it)["image"] for _ in range(max(1, crops // EVAL_BATCH))]
  keys = [jax.random.key(10_000 + i) for i in range(len(batches))]
  p, fw = model_cfg.patch_size, model_cfg.fourier_weight

  # graphdef is static: the checkpoints of one graph share one compile.
  @functools.partial(jax.jit, static_argnums=0)
  def evaluate(graphdef, state, images, key):
    loss, aux = nnx.merge(graphdef, state)({"image": images}, key)
    zero, _, _ = mae.reconstruction_loss(jnp.zeros_like(aux["target"]), aux["target"],
                                         aux["mask"], p, fw)
    return loss, aux["mse"], zero, aux

  out, grid = {}, None
  for step in [0] + list(steps):
    ckpt = os.path.join(paths["train"], "checkpoints", str(step)) if step else None
    _, model = mesh_and_model(model_cfg, ckpt, seed)
    graphdef, state = nnx.split(model)
    rows = [evaluate(graphdef, state, jnp.asarray(b), k) for b, k in zip(batches, keys)]
    out[step] = {"loss": float(np.mean([r[0] for r in rows])),
                 "mse": float(np.mean([r[1] for r in rows])),
                 "mean_predictor": float(np.mean([r[2] for r in rows]))}
    if step == max([0] + list(steps)):
      aux = jax.device_get(rows[0][3])
      grid = {k: np.asarray(aux[k][:2]) for k in ("pred", "target", "mask")}
  return out, grid


def time_steps(probe_config, workdir):
  """(steady seconds per step, wall seconds, start-up seconds) of a short training run.

  The median logged step time of the run's second half: the first steps run slower while the
  input pipeline and allocator warm up.
  """
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from mae_jax.train import loop  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  loop.train_and_evaluate(probe_config, workdir)
  wall = time.time() - t0
  times = [json.loads(l).get("step_time_s") for l in open(os.path.join(workdir, "metrics.jsonl"))]
  times = sorted(t for t in times[len(times) // 2:] if t)  # the steady second half
  step_time = times[len(times) // 2]
  overhead = max(0.0, wall - probe_config.total_steps * step_time)  # compile, pipeline, shutdown
  return step_time, wall, overhead


def config_dict(d):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(d)


def describe_device():
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kind = devices[0].device_kind
  extra = f", {os.cpu_count()} host cores" if devices[0].platform == "cpu" else ""
  return f"{jax.default_backend()}: {len(devices)} x {kind}{extra}"
