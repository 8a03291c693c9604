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
from mae_jax.demo import stages, tasks
from mae_jax.demo.tasks import (config_dict, describe_device, embed_model, loss_evaluation,
                                 make_ceiling, score)
from mae_jax.demo.stages import log

DEFAULT_BUDGET_MINUTES = 5.0  # sized so the whole default command takes <= 20 min on 2 free cores
SCREEN_FLAGS = ("genes", "guides", "experiments", "plates", "controls_per_plate", "image_size",
                "seed")
# The first steps run slower (input pipeline and allocator warming up: 0.11-0.16 s against 0.08-0.09
# s later, demo recipe on 2 cores), so the probe is long enough to time steady steps.
PROBE_STEPS, PROBE_LOG = 40, 5

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
  tasks.make_shards(paths, _WORKERS.value)


def make_pixel_stats(paths, path):
  tasks.make_pixel_stats(paths, path, _WORKERS.value)


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
  if _STEPS.value:
    return {"total_steps": int(_STEPS.value), "source": "--steps"}
  probe = run_config(paths, PROBE_STEPS)
  probe.unlock()
  probe.update(log_every=PROBE_LOG, checkpoint_every=10 ** 9, keep_checkpoints=1)
  step_time, wall, overhead = tasks.time_steps(probe, os.path.join(paths["run"], "probe"))
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


# -- main ---------------------------------------------------------------------------------------
def pipeline(out):
  from mae_jax.models import flops  # pylint: disable=g-import-not-at-top
  from mae_jax.demo import report  # pylint: disable=g-import-not-at-top
  stages.use_compile_cache(out)
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
