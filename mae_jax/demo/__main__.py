r"""One command, end to end: synthetic screen -> shards -> MAE pre-training -> genome map -> recall.

  python -m mae_jax.demo --out=DIR [--budget_minutes=M] [--readme=README.md]

Stages (each skipped when its output exists, so a rerun reuses finished work and an interrupted
run continues; training resumes from its newest checkpoint):
  1. screen      DIR/screen/     python -m data_prep.synthetic (its defaults unless flags say)
  2. shards      DIR/shards/     python -m data_prep.convert --layout=rxrx3
  3. baselines   DIR/features/   the screen's true well phenotypes (the ceiling) and hand-crafted
                                 pixel statistics per site (mae_jax/demo/baselines.py)
  4. train       DIR/runs/R/     a short probe measures the step time on this machine, the budget
                                 sets total_steps, then mae_jax.train.loop runs with checkpoints along
                                 the way (R = budget_<M>min or steps_<N>)
  5. embed       the random-init encoder (shared by runs: DIR/features/) and every evaluated
                 checkpoint embed every site (eval.embed), sites -> wells
  6. score       eval.recall.score_wells with TVN (+ arm centring), without any correction, and
                 with TVN but no arm centring; the MAE's held-out loss against predicting the
                 crop mean
  7. report      DIR/report.json (docs/interfaces.md §3), DIR/report.md and figures (mae_jax/demo/report.py);
                 --readme rewrites the README's demo block and copies the figures beside it.
The last stdout line is report.json.
"""
import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

import configs
from mae_jax.util import cli
from mae_jax.demo import stages
from mae_jax.demo.stages import log

DEFAULT_BUDGET_MINUTES = 5.0  # sized so the whole default command takes <= 20 min on 2 free cores
RECALL_VARIANTS = {  # name -> score_wells options
    "tvn": dict(batch_correction="tvn", arm_correction=True),
    "uncorrected": dict(batch_correction="none", arm_correction=False),
    "tvn_no_arm": dict(batch_correction="tvn", arm_correction=False),
}
SCREEN_FLAGS = ("genes", "guides", "experiments", "plates", "controls_per_plate", "image_size",
                "seed")
# The first steps run slower (input pipeline and allocator warming up: 0.11-0.16 s against 0.08-0.09
# s later, demo recipe on 2 cores), so the probe is long enough to time steady steps.
PROBE_STEPS, PROBE_LOG = 40, 5
EVAL_CROPS, EVAL_BATCH = 256, 64

_OUT = flags.DEFINE_string("out", None, "output folder (reruns reuse its finished stages)")
_BUDGET = flags.DEFINE_float("budget_minutes", DEFAULT_BUDGET_MINUTES,
                             "minutes of MAE pre-training (probe included)")
_STEPS = flags.DEFINE_integer("steps", None, "train exactly this many steps instead of a budget")
_EVAL_POINTS = flags.DEFINE_integer("eval_points", 2, "checkpoints scored along the run: the "
                                    "final one, half way, a quarter, ... (recall by step)")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "processes for rendering, "
                                "conversion and pixel statistics")
_README = flags.DEFINE_string("readme", None, "rewrite the demo block of this README from "
                              "DIR/report.json and copy the figures to bench/results/demo/")
_README_ONLY = flags.DEFINE_bool("readme_only", False, "with --readme: only regenerate the "
                                 "README block from an existing DIR/report.json")
for _name in SCREEN_FLAGS:
  flags.DEFINE_integer(_name, None, f"data_prep.synthetic --{_name} (default: its own)")
DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "demo.py")
# No default here: config_flags would load it and apply --config.KEY overrides at import time,
# where a typo could only end in a traceback; the __main__ block below adds
# --config=DEFAULT_CONFIG to the command line instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"MAE recipe (default {DEFAULT_CONFIG}; override with --config.KEY=VALUE)",
    lock_config=True)


# -- stages -------------------------------------------------------------------------------------
def make_screen(paths):
  args = ["data_prep.synthetic", f"--out={paths['screen']}", f"--workers={_WORKERS.value}"]
  args += [f"--{n}={flags.FLAGS[n].value}" for n in SCREEN_FLAGS
           if flags.FLAGS[n].value is not None]
  stages.run_module(args, "data_prep.synthetic")


def check_screen(paths):
  """A finished screen in DIR must match the screen flags given now."""
  done = os.path.join(paths["screen"], "ground_truth", "screen.json")
  if not os.path.exists(done):
    return
  have = stages.read_json(done)["parameters"]
  for n in SCREEN_FLAGS:
    want = flags.FLAGS[n].value
    if want is not None and have.get(n) != want:
      raise cli.UserError(f"{done}: the screen in {paths['out']} has {n}={have.get(n)}, not "
                          f"--{n}={want}; use another --out")


def make_shards(paths):
  screen = stages.read_json(os.path.join(paths["screen"], "ground_truth", "screen.json"))
  size = screen["image_size"]
  stages.run_module(["data_prep.convert", "--layout=rxrx3", f"--root={paths['screen']}",
              f"--out={paths['shards']}", f"--image_size={size}", f"--workers={_WORKERS.value}"],
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


def make_pixel_stats(paths, path):
  from eval import embed  # pylint: disable=g-import-not-at-top
  from mae_jax.demo import baselines  # pylint: disable=g-import-not-at-top
  step = {"next": 0.0}

  def progress(done, total):
    if done >= step["next"] * total:
      log(f"pixel statistics: {done}/{total} sites")
      step["next"] += 0.25
  feats, site_meta = baselines.manifest_features(paths["manifest"], workers=_WORKERS.value,
                                                 progress=progress)
  stages.save_wells(path, *embed.wells_from_sites(feats, site_meta))


def run_id():
  """budget_<M>min or steps_<N>, plus a hash of the recipe when it is not configs/demo.py's."""
  from mae_jax.demo import report  # pylint: disable=g-import-not-at-top
  name = f"steps_{_STEPS.value}" if _STEPS.value else f"budget_{_BUDGET.value:g}min"
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  if overrides or os.path.abspath(filename) != DEFAULT_CONFIG:
    name += "_" + report.config_key(_CONFIG.value, 0)
  return name


def run_config(paths, total_steps):
  """The recipe with the run's length: checkpoints at 1/2^k of the run for recall by step."""
  c = _CONFIG.value.copy_and_resolve_references()
  c.unlock()
  points = max(1, _EVAL_POINTS.value)
  every = max(1, total_steps // 2 ** (points - 1))
  c.total_steps = max(total_steps, every)
  c.checkpoint_every = every
  c.keep_checkpoints = max(c.keep_checkpoints, c.total_steps // every + 1)
  c.log_every = max(1, min(c.log_every, c.total_steps // 20 or 1))
  c.data.manifest = paths["manifest"]
  c.lock()
  return c


def plan_training(paths):
  """{total_steps, step_time_s, ...}: a fixed --steps, or a probe run that times real steps."""
  from mae_jax.train import loop  # pylint: disable=g-import-not-at-top
  if _STEPS.value:
    return {"total_steps": int(_STEPS.value), "source": "--steps"}
  probe = run_config(paths, PROBE_STEPS)
  probe.unlock()
  probe.update(log_every=PROBE_LOG, checkpoint_every=10 ** 9, keep_checkpoints=1)
  workdir = os.path.join(paths["run"], "probe")
  t0 = time.time()
  loop.train_and_evaluate(probe, workdir)
  wall = time.time() - t0
  times = [json.loads(l).get("step_time_s") for l in open(os.path.join(workdir, "metrics.jsonl"))]
  times = sorted(t for t in times[len(times) // 2:] if t)  # the steady second half
  step_time = times[len(times) // 2]
  overhead = max(0.0, wall - PROBE_STEPS * step_time)  # compile, pipeline start, shutdown
  left = _BUDGET.value * 60 - wall - overhead
  total = int(left / step_time)
  minimum = 2 ** (max(1, _EVAL_POINTS.value) - 1)
  if total < minimum:
    log(f"warning: a {_BUDGET.value:g}-minute budget leaves {left:.0f} s at {step_time:.2f} s "
        f"per step; training the minimum of {minimum} steps")
    total = minimum
  log(f"probe: {step_time:.3f} s/step, {overhead:.0f} s start-up -> {total} steps in "
      f"{_BUDGET.value:g} min")
  return {"total_steps": total, "source": "probe", "step_time_s": round(step_time, 4),
          "probe_wall_s": round(wall, 1), "startup_s": round(overhead, 1),
          "budget_minutes": _BUDGET.value}


def train_run(paths):
  from mae_jax.train import loop  # pylint: disable=g-import-not-at-top
  plan_path = os.path.join(paths["run"], "plan.json")
  if os.path.exists(plan_path):
    plan = stages.read_json(plan_path)
  else:
    plan = plan_training(paths)
    stages.write_json(plan_path, plan)
  config = run_config(paths, plan["total_steps"])
  t0 = time.time()
  result = loop.train_and_evaluate(config, paths["train"])
  if result["status"] == "nan":
    raise cli.UserError(f"training diverged (non-finite loss at step {result['step']}); lower "
                        "--config.optimizer.lr and use a new --out")
  if result["status"] != "done":
    raise cli.UserError(f"training stopped at step {result['step']} ({result['status']}); rerun "
                        "the same command to resume")
  stages.write_json(os.path.join(paths["run"], "train_done.json"),
             {**result, "seconds": round(time.time() - t0, 1), **plan})


def eval_steps(paths):
  """Checkpoint steps scored for recall by step: the final one, its half, quarter, ..."""
  total = stages.read_json(os.path.join(paths["train"], "config.json"))["total_steps"]
  ckpts = sorted(int(p) for p in os.listdir(os.path.join(paths["train"], "checkpoints"))
                 if p.isdigit())
  wanted = [total // 2 ** k for k in range(max(1, _EVAL_POINTS.value))]
  return sorted({min(ckpts, key=lambda s: abs(s - w)) for w in wanted if w > 0})


def _mesh_and_model(model_cfg=None, ckpt=None, seed=0):
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
  mesh, model = _mesh_and_model(model_cfg, ckpt, seed)
  site_emb, site_meta = embed.embed_manifest(model, paths["manifest"], mesh=mesh, batch_size=64)
  stages.save_wells(path, *embed.wells_from_sites(site_emb, site_meta))



def score(paths, emb_path, out_dir, shared):
  """recall.json of every RECALL_VARIANTS entry for one well-embedding file (each reused).

  `shared` holds the annotation pairs and expression table, read once for all scorings.
  """
  from eval import recall  # pylint: disable=g-import-not-at-top
  results = {}
  for name, options in RECALL_VARIANTS.items():
    target = os.path.join(out_dir, name)
    done = os.path.join(target, "recall.json")
    if not os.path.exists(done):
      if not shared:
        shared.update(pairs_by_source=recall.load_sources(recall.DEFAULTS["sources"]),
                      expression=recall.load_expression(paths["expression"]))
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


def loss_evaluation(paths, model_cfg, seed, steps):
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
  batches = [next(it)["image"] for _ in range(EVAL_CROPS // EVAL_BATCH)]
  keys = [jax.random.key(10_000 + i) for i in range(len(batches))]
  p, fw = model_cfg.patch_size, model_cfg.fourier_weight
  out, grid = {}, None
  for step in [0] + list(steps):
    ckpt = os.path.join(paths["train"], "checkpoints", str(step)) if step else None
    _, model = _mesh_and_model(model_cfg, ckpt, seed)
    graphdef, state = nnx.split(model)

    @jax.jit
    def evaluate(state, images, key):
      loss, aux = nnx.merge(graphdef, state)({"image": images}, key)
      zero, _, _ = mae.reconstruction_loss(jnp.zeros_like(aux["target"]), aux["target"],
                                           aux["mask"], p, fw)
      return loss, aux["mse"], zero, aux

    rows = [evaluate(state, jnp.asarray(b), k) for b, k in zip(batches, keys)]
    out[step] = {"loss": float(np.mean([r[0] for r in rows])),
                 "mse": float(np.mean([r[1] for r in rows])),
                 "mean_predictor": float(np.mean([r[2] for r in rows]))}
    if step == max([0] + list(steps)):
      aux = jax.device_get(rows[0][3])
      grid = {k: np.asarray(aux[k][:2]) for k in ("pred", "target", "mask")}
  return out, grid


# -- main ---------------------------------------------------------------------------------------
def pipeline(out):
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.models import flops  # pylint: disable=g-import-not-at-top
  from mae_jax.demo import report  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  paths = {"out": out, "screen": os.path.join(out, "screen"), "shards": os.path.join(out, "shards"),
           "features": os.path.join(out, "features"), "run": os.path.join(out, "runs", run_id())}
  paths.update(manifest=os.path.join(paths["shards"], "manifest.json"),
               expression=os.path.join(paths["screen"], "ground_truth", "expression.csv"),
               train=os.path.join(paths["run"], "train"))
  check_screen(paths)
  os.makedirs(out, exist_ok=True)
  for k in ("features", "run"):
    os.makedirs(paths[k], exist_ok=True)
  timer = stages.Timer(out, paths["run"])
  timer.stage("screen", os.path.join(paths["screen"], "ground_truth", "screen.json"),
              lambda: make_screen(paths))
  timer.stage("shards", paths["manifest"], lambda: make_shards(paths))
  ceiling = os.path.join(paths["features"], "ceiling.npz")
  pixel = os.path.join(paths["features"], "pixel_stats.npz")
  timer.stage("ceiling", ceiling, lambda: make_ceiling(paths, ceiling))
  timer.stage("pixel_stats", pixel, lambda: make_pixel_stats(paths, pixel))

  model_cfg = _CONFIG.value.model
  seed = int(_CONFIG.value.seed)
  key = report.config_key(model_cfg, seed)
  random_init = os.path.join(paths["features"], f"random_init_{key}.npz")
  timer.stage("train", os.path.join(paths["run"], "train_done.json"), lambda: train_run(paths))
  train_info = stages.read_json(os.path.join(paths["run"], "train_done.json"))
  config = stages.read_json(os.path.join(paths["train"], "config.json"))
  timer.stage("embed_random_init", random_init,
              lambda: embed_model(paths, random_init, model_cfg=model_cfg, seed=seed))
  steps = eval_steps(paths)
  emb_dir = os.path.join(paths["run"], "embeddings")
  os.makedirs(emb_dir, exist_ok=True)
  for s in steps:
    path = os.path.join(emb_dir, f"step_{s}.npz")
    ckpt = os.path.join(paths["train"], "checkpoints", str(s))
    timer.stage(f"embed_step_{s}", path, lambda: embed_model(paths, path, ckpt=ckpt))

  scores = {}
  recall_dir = os.path.join(paths["run"], "recall")

  shared = {}

  def score_all():
    scores["ceiling"] = score(paths, ceiling, os.path.join(paths["features"], "recall_ceiling"),
                              shared)
    scores["pixel_stats"] = score(paths, pixel, os.path.join(paths["features"],
                                                             "recall_pixel_stats"), shared)
    scores["random_init"] = score(paths, random_init, os.path.join(
        paths["features"], f"recall_random_init_{key}"), shared)
    for s in steps:
      scores[f"step_{s}"] = score(paths, os.path.join(emb_dir, f"step_{s}.npz"),
                                  os.path.join(recall_dir, f"step_{s}"), shared)
  timer.stage("score", None, score_all)

  loss_path = os.path.join(paths["run"], "loss.json")
  grid_path = os.path.join(paths["run"], "reconstruction.npz")

  def losses():
    import numpy as np  # pylint: disable=g-import-not-at-top
    by_step, grid = loss_evaluation(paths, model_cfg, seed, steps)
    np.savez(grid_path, patch_size=model_cfg.patch_size, **grid)
    stages.write_json(loss_path, {str(k): v for k, v in by_step.items()})
  timer.stage("loss", loss_path, losses)

  per_image = flops.flops_per_image(config_dict(config["model"]))
  data = report.build(
      device=describe_device(), budget_minutes=None if _STEPS.value else _BUDGET.value,
      scores=scores, steps=steps, config=config, train_info=train_info,
      loss_by_step={int(k): v for k, v in stages.read_json(loss_path).items()},
      metrics_path=os.path.join(paths["train"], "metrics.jsonl"), flops_per_image=per_image,
      screen=stages.read_json(os.path.join(paths["screen"], "ground_truth", "screen.json")),
      timing=timer.summary(), run=run_id())
  report.write(out, paths["run"], data, grid_path)
  return data


def config_dict(d):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(d)


def describe_device():
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kind = devices[0].device_kind
  extra = f", {os.cpu_count()} host cores" if devices[0].platform == "cpu" else ""
  return f"{jax.default_backend()}: {len(devices)} x {kind}{extra}"


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT.value:
    raise cli.UserError("--out is required")
  if _BUDGET.value <= 0:
    raise cli.UserError(f"--budget_minutes={_BUDGET.value}: expected a positive number")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise cli.UserError(f"--steps={_STEPS.value}: expected a positive integer")
  if not 1 <= _EVAL_POINTS.value <= 8:
    raise cli.UserError(f"--eval_points={_EVAL_POINTS.value}: expected 1 to 8")
  out = os.path.abspath(_OUT.value)
  from mae_jax.demo import report  # pylint: disable=g-import-not-at-top
  if _README_ONLY.value:
    if not _README.value:
      raise cli.UserError("--readme_only needs --readme=README.md")
    path = os.path.join(out, "report.json")
    if not os.path.exists(path):
      raise cli.UserError(f"{path} does not exist: run the demo first")
    data = stages.read_json(path)
  else:
    data = pipeline(out)
  if _README.value:
    report.update_readme(_README.value, out, data)
  print(json.dumps(report.public(data)), flush=True)


if __name__ == "__main__":
  _ARGS = sys.argv[1:]
  if not any(a == "--config" or a.startswith("--config=") for a in _ARGS):
    _ARGS.insert(0, f"--config={DEFAULT_CONFIG}")
  cli.run(main, _ARGS)
