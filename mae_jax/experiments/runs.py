"""The bodies of the study's stages that touch models: probe, train, embed, held-out loss.

Each writes its output atomically (mae_jax/demo/stages.py) and is run through `stages.Timer`, so a
rerun skips it once its output exists; training resumes from its newest checkpoint.
"""
import json
import math
import os
import time

from mae_jax.demo import stages, tasks
from mae_jax.util import cli


def probe(config, workdir, steps, log_every):
  """Seconds per steady step of `config` on this machine (a short run in `workdir`)."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(workdir, ignore_errors=True)  # an interrupted probe starts afresh
  c = config.copy_and_resolve_references()
  c.unlock()
  c.update(total_steps=steps, log_every=log_every, checkpoint_every=10 ** 9, keep_checkpoints=1)
  step_time, wall, overhead = tasks.time_steps(c, workdir)
  return {"step_time_s": round(step_time, 4), "probe_wall_s": round(wall, 1),
          "startup_s": round(overhead, 1), "probe_steps": steps}


def train(config, workdir, done_path, plan):
  """Trains (or resumes) `config` in `workdir`; writes `done_path` with the result and wall time."""
  from mae_jax.train import loop  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  result = loop.train_and_evaluate(config, workdir)
  if result["status"] == "nan":
    raise cli.UserError(f"{workdir}: training diverged (non-finite loss at step "
                        f"{result['step']}); lower the arm's learning rate and use a new --out")
  if result["status"] != "done":
    raise cli.UserError(f"{workdir}: training stopped at step {result['step']} "
                        f"({result['status']}); rerun the same command to resume")
  stages.write_json(done_path, {**result, "seconds": round(time.time() - t0, 1), "plan": plan})


def eval_steps(train_dir, points):
  """Checkpoint steps scored along a run: the final one, its half, quarter, ... (as the demo)."""
  total = stages.read_json(os.path.join(train_dir, "config.json"))["total_steps"]
  ckpts = sorted(int(p) for p in os.listdir(os.path.join(train_dir, "checkpoints")) if p.isdigit())
  wanted = [total // 2 ** k for k in range(max(1, points))]
  return sorted({min(ckpts, key=lambda s: abs(s - w)) for w in wanted if w > 0})


def embed(paths, path, stride=1, model_cfg=None, ckpt=None, seed=0):
  """Well embeddings of a checkpoint (or of `model_cfg` at random init, `seed`) into `path`.

  stride 1 is the demo's embedding (eval.embed: every tile of every site, mean over tiles,
  sites -> wells). stride k keeps the tiles whose row and column are multiples of k (a k²-th of
  them, spread over the site), the same for every arm: the quick suite's cut of embedding cost.
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if stride == 1:
    tasks.embed_model(paths, path, model_cfg=model_cfg, ckpt=ckpt, seed=seed)
    return
  from mae_jax.train import cpu_options  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mae_jax.data import input_pipeline, records  # pylint: disable=g-import-not-at-top
  _, model = tasks.mesh_and_model(model_cfg, ckpt, seed)
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  fn = cpu_options.jit_embed(lambda p, s, x: nnx.merge(graphdef, p, s).embed(x))
  size, batch_size = int(model.cfg.image_size), 64
  cols = records.read_manifest(paths["manifest"])["image_shape"][1] // size
  meta = input_pipeline.site_metadata(paths["manifest"])
  sums, counts = None, np.zeros(len(meta), np.int64)

  def run(x, sites):  # one compiled shape: a short batch is padded
    nonlocal sums
    n = len(x)
    x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    emb = np.asarray(fn(params, state, x), np.float32)[:n]
    if sums is None:
      sums = np.zeros((len(meta), emb.shape[1]), np.float64)
    np.add.at(sums, sites, emb)
    np.add.at(counts, sites, 1)

  x, sites, last, k = None, None, -1, 0
  for batch in input_pipeline.eval_tiles(paths["manifest"], tile_size=size, batch_size=batch_size,
                                         expect_channels=model.cfg.channels):
    index = np.empty(len(batch["site"]), np.int64)  # the tile's place in its site's grid
    for j, s in enumerate(batch["site"]):
      last, k = (s, 0) if s != last else (last, k)
      index[j], k = k, k + 1
    keep = (index // cols % stride == 0) & (index % cols % stride == 0)
    x = batch["image"][keep] if x is None else np.concatenate([x, batch["image"][keep]])
    sites = batch["site"][keep] if sites is None else np.concatenate([sites, batch["site"][keep]])
    while len(x) >= batch_size:
      run(x[:batch_size], sites[:batch_size])
      x, sites = x[batch_size:], sites[batch_size:]
  if x is not None and len(x):
    run(x, sites)
  seen = counts > 0
  site_emb = (sums[seen] / counts[seen, None]).astype(np.float32)
  tasks.save_sites(path, site_emb, [m for m, s in zip(meta, seen) if s])


def losses(paths, train_dir, config, steps, crops=tasks.EVAL_CROPS):
  """{step: {...}} of a run. The MAEs: held-out masked-patch loss of the random init (step 0)
  and each checkpoint against predicting the crop mean (mae_jax/demo/tasks.py). The WSL
  classifier: cross-entropy of its training batches (the mean of the last tenth of the logged
  steps) against ln(classes), the loss of predicting every class alike, and its accuracy against
  1/classes."""
  from mae_jax.models import registry  # pylint: disable=g-import-not-at-top
  model_cfg = config.model
  if registry.kind(model_cfg) != "wsl":
    by_step, _ = tasks.loss_evaluation({**paths, "train": train_dir}, model_cfg,
                                       int(config.seed), steps, crops)
    return {str(s): {**v, "baseline": v["mean_predictor"],
                     "baseline_name": "predicting the crop mean (held-out crops)"}
            for s, v in by_step.items()}
  classes = int(stages.read_json(os.path.join(train_dir, "config.json"))["model"]["num_classes"])
  rows = [json.loads(l) for l in open(os.path.join(train_dir, "metrics.jsonl")) if l.strip()]
  out = {}
  for s in steps:
    upto = [r for r in rows if r["step"] <= s]
    tail = upto[-max(1, len(upto) // 10):]
    out[str(s)] = {"loss": sum(r["cross_entropy"] for r in tail) / len(tail),
                   "accuracy": sum(r["accuracy"] for r in tail) / len(tail),
                   "baseline": math.log(classes), "chance_accuracy": 1.0 / classes,
                   "baseline_name": "ln(classes): every class alike (training batches)"}
  return out
