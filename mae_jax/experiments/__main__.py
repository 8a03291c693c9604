r"""The paper's study as one command: every arm on one screen, one budget, one scoring.

  python -m mae_jax.experiments --out=DIR [--suite=quick|full] [--budget_minutes=M] [--seeds=N]
      [--styles=default,granular] [--manifest=SHARDS/manifest.json --expression=CSV]
      [--readme=README.md]

Every arm runs on each synthetic screen style in DIR/<style>/ (the demo's recipe was tuned on
`default` only, so `granular` is a screen it was not tuned on), or on the one converted screen of
--manifest in DIR/manifest/. Stages per screen (each skipped once its output exists, so a rerun
reuses finished work and an interrupted suite loses at most the stage in flight; training
resumes from its newest checkpoint):
  1. screen, shards   the synthetic screen (data_prep.synthetic --style) and its shards, as
                      mae_jax.demo does; or the converted screen of --manifest
  2. subsets          DIR/subsets/plates_<P>/manifest.json: the grid's smaller training sets
  3. ceiling, pixel_stats, cellprofiler   the true phenotypes (only with ground truth), pixel
                      statistics and CellProfiler features (cp_measure, when installed)
  4. plan_<arm>       a timed probe of the reference (ViT MAE p8, mask 0.75): --budget_minutes
                      of its steps set the training FLOPs every arm gets (mae_jax/experiments/arms.py)
  5. train_<run>, embed_<run>_step_<N>, loss_<run>   the main arms (x --seeds), then the scaling
                      grid: ViT widths x plate fractions, each scored at several checkpoints
  6. embed_random_<network>   each network at random init
  7. score            TVN + arm centring, uncorrected, TVN without arm centring (as the demo)
  8. report           DIR/<style>/report.json, report.md, recall.png, scaling.png,
                      relative.png (mae_jax/experiments/report.py)
then DIR/report.json (docs/interfaces.md §3: every screen's report under "screens") and
DIR/report.md. The last stdout line is DIR/report.json.
"""
import dataclasses
import json
import os
import sys

from absl import flags

from mae_jax.demo import stages, tasks
from mae_jax.experiments import arms
from mae_jax.util import cli

SCREEN_FLAGS = ("genes", "guides", "experiments", "plates", "controls_per_plate", "image_size",
                "seed")
_OUT = flags.DEFINE_string("out", None, "output folder (reruns reuse its finished stages)")
_SUITE = flags.DEFINE_enum("suite", "quick", ["quick", "full"], "quick: <= 60 min on 2 CPU "
                           "cores; full: 10x the budget, more seeds and widths")
_BUDGET = flags.DEFINE_float("budget_minutes", None, "training minutes of the reference arm "
                             "(default: the suite's); every arm gets its training FLOPs")
_SEEDS = flags.DEFINE_integer("seeds", None, "seeds of each main arm (default: the suite's)")
_STYLES = flags.DEFINE_list("styles", ["default", "granular"], "data_prep.synthetic --style "
                            "of each screen the suite runs on")
TUNED_ON = "default"  # the style configs/demo.py's recipe was chosen on
# data_prep.synthetic's styles (data_prep/styles.py; an application does not import data_prep,
# tests/test_experiments.py checks the two agree).
STYLES = ("default", "granular")
_MANIFEST = flags.DEFINE_string("manifest", None, "run on this converted screen instead of the "
                                "synthetic one (the ceiling needs its ground truth)")
_EXPRESSION = flags.DEFINE_string("expression", None, "gene,zFPKM CSV (or u2os) for arm "
                                  "correction; default: the synthetic screen's")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "processes for rendering, "
                                "conversion and pixel statistics")
_STEPS = flags.DEFINE_integer("steps", None, "reference steps instead of a timed probe (every "
                              "arm then gets equal FLOPs)")
_TINY = flags.DEFINE_bool("tiny", False, "toy networks and grid (tests)")
_README = flags.DEFINE_string("readme", None, "rewrite the study block of this README from "
                              "DIR/report.json and copy the figures to bench/results/experiments/")
for _name in SCREEN_FLAGS:
  flags.DEFINE_integer(_name, None, f"data_prep.synthetic --{_name} (default: its own)")


def suite():
  s = arms.TINY_SUITE if _TINY.value else arms.SUITES[_SUITE.value]
  updates = {}
  if _BUDGET.value is not None:
    updates["budget_minutes"] = _BUDGET.value
  if _SEEDS.value is not None:
    updates["seeds"] = _SEEDS.value
  return dataclasses.replace(s, **updates)


def settings(s):
  """What a finished stage in DIR depends on: a rerun with other values is refused."""
  return {"suite": s.name, "budget_minutes": s.budget_minutes, "tiny": _TINY.value,
          "styles": screens(), "steps": _STEPS.value,
          "manifest": os.path.abspath(_MANIFEST.value) if _MANIFEST.value else None,
          "expression": _EXPRESSION.value,
          "screen": {n: flags.FLAGS[n].value for n in SCREEN_FLAGS}}


def check_settings(out, s):
  path = os.path.join(out, "study.json")
  want = settings(s)
  if os.path.exists(path):
    have = stages.read_json(path)
    for k, v in want.items():
      if have.get(k) != v:
        raise cli.UserError(f"{path}: {out} holds a study with {k}={have.get(k)!r}, not "
                            f"{v!r}; use another --out")
  os.makedirs(out, exist_ok=True)
  stages.write_json(path, want)


def screens():
  """The screens the suite runs on: the synthetic styles, or "manifest"."""
  return ["manifest"] if _MANIFEST.value else list(_STYLES.value)


def make_screen(paths, style, s):
  chosen = {**dict(s.screen), **{n: flags.FLAGS[n].value for n in SCREEN_FLAGS
                                  if flags.FLAGS[n].value is not None}}
  args = ["data_prep.synthetic", f"--out={paths['screen']}", f"--workers={_WORKERS.value}",
          f"--style={style}"] + [f"--{n}={v}" for n, v in chosen.items()]
  stages.run_module(args, "data_prep.synthetic")


def data_paths(out):
  """Where the screen, shards, ground truth and expression table are."""
  paths = {"out": out, "features": os.path.join(out, "features"),
           "runs": os.path.join(out, "runs")}
  if _MANIFEST.value:
    from mae_jax.data import records  # pylint: disable=g-import-not-at-top
    manifest = records.manifest_path(os.path.abspath(_MANIFEST.value))
    root = records.read_manifest(manifest).get("source_root") or ""
    truth = os.path.join(root, "ground_truth")
    paths.update(manifest=manifest, shards=os.path.dirname(manifest), screen=root,
                 ground_truth=os.path.exists(os.path.join(truth, "wells.csv")))
  else:
    paths.update(screen=os.path.join(out, "screen"), shards=os.path.join(out, "shards"),
                 ground_truth=True)
    paths["manifest"] = os.path.join(paths["shards"], "manifest.json")
  default = os.path.join(paths["screen"], "ground_truth", "expression.csv")
  paths["expression"] = _EXPRESSION.value or (default if paths["ground_truth"] else None)
  return paths


def plan_all(timer, paths, s, first=None):
  """{arm: plan}: the reference's from a probe (or --steps), the others at its FLOPs.

  `first`: (screen, its plans) of the suite's first screen. Every later screen takes those
  plans as they are: the screens share the image size, shard format and networks, so a probe
  would measure the same step times again, and one budget for every screen keeps the screens'
  verdicts comparable (docs/science.md §8).
  """
  plan_dir = os.path.join(paths["runs"], "plans")
  os.makedirs(plan_dir, exist_ok=True)
  if first is not None:
    screen, plans = first
    for arm in arms.ARMS:
      path = os.path.join(plan_dir, f"{arm.name}.json")
      timer.stage(f"plan_{arm.name}", path, lambda p=path, a=arm.name: stages.write_json(
          p, {**plans[a], "from_screen": screen}))
    return {arm.name: stages.read_json(os.path.join(plan_dir, f"{arm.name}.json"))
            for arm in arms.ARMS}
  tiny, points = _TINY.value, s.eval_points
  ref_cfg = arms.train_config(arms.arm_config(arms.ARMS_BY_NAME[arms.REFERENCE], tiny=tiny),
                              paths["manifest"], s.probe_steps, 1)
  ref_path = os.path.join(plan_dir, f"{arms.REFERENCE}.json")

  def reference():
    from mae_jax.experiments import runs  # pylint: disable=g-import-not-at-top
    if _STEPS.value:
      plan = arms.reference_plan(ref_cfg, _STEPS.value, None, points, source="--steps")
    else:
      p = runs.probe(ref_cfg, os.path.join(plan_dir, f"probe_{arms.REFERENCE}"), s.probe_steps,
                     max(1, s.probe_steps // 8))
      steps = s.budget_minutes * 60 / p["step_time_s"]
      plan = {**arms.reference_plan(ref_cfg, steps, p["step_time_s"], points), "probe": p}
    stages.log(f"plan: reference {plan['total_steps']} steps, {plan['flops'] / 1e12:.2f} TFLOP")
    stages.write_json(ref_path, plan)
  timer.stage(f"plan_{arms.REFERENCE}", ref_path, reference)
  ref = stages.read_json(ref_path)
  plans = {arms.REFERENCE: ref}
  for arm in arms.ARMS:
    if arm.name == arms.REFERENCE:
      continue
    path = os.path.join(plan_dir, f"{arm.name}.json")
    cfg = arms.train_config(arms.arm_config(arm, tiny=tiny), paths["manifest"], s.probe_steps, 1)

    def other(arm=arm, cfg=cfg, path=path):
      from mae_jax.experiments import runs  # pylint: disable=g-import-not-at-top
      p = None
      if ref.get("train_seconds"):
        p = runs.probe(cfg, os.path.join(plan_dir, f"probe_{arm.name}"), s.arm_probe_steps,
                       max(1, s.arm_probe_steps // 8))
      plan = arms.flop_equal_plan(ref, cfg, p and p["step_time_s"], s.wall_cap)
      stages.log(f"plan: {arm.name} {plan['total_steps']} steps ({plan['rule']})")
      stages.write_json(path, {**plan, "probe": p})
    timer.stage(f"plan_{arm.name}", path, other)
    plans[arm.name] = stages.read_json(path)
  return plans


def run_specs(paths, s, plans, subsets):
  """Every training run, deduplicated: the main arms (x seeds), then the scaling grid, whose
  run at the reference width on all the plates is the reference arm's own."""
  tiny, specs = _TINY.value, {}
  for arm in arms.ARMS:
    for seed in range(s.seeds):
      shared = arm.name == arms.REFERENCE and seed == 0
      specs[f"{arm.name}_s{seed}"] = dict(
          arm=arm.name, seed=seed, width=None, fraction=1.0, manifest=paths["manifest"],
          config=arms.arm_config(arm, seed, tiny), steps=plans[arm.name]["total_steps"],
          points=s.eval_points if shared else 1)
  ref_width, grid = arms.reference_width(tiny), []
  for fraction in s.fractions:
    for width in s.widths:
      if width == ref_width and fraction == 1.0:
        name = f"{arms.REFERENCE}_s0"
      else:
        name = f"grid_w{width}_plates{round(100 * fraction)}"
        specs[name] = dict(arm=None, seed=0, width=width, fraction=fraction,
                           manifest=subsets[fraction], config=arms.width_config(width, 0, tiny),
                           steps=plans[arms.REFERENCE]["total_steps"], points=s.eval_points)
      grid.append(dict(run=name, width=width, fraction=fraction))
  return specs, grid


def study(out):
  """Every screen's study in DIR/<screen>/, then DIR/report.json and report.md over them."""
  from mae_jax.experiments import screens as screens_report  # pylint: disable=g-import-not-at-top
  s = suite()
  check_settings(out, s)
  stages.use_compile_cache(out)
  by_screen, settings = {}, stages.read_json(os.path.join(out, "study.json"))
  first = None  # (screen, plans): the first screen's budget is every screen's
  for name in screens():
    stages.PREFIX = f"experiments[{name}]"  # every stage's log line names its screen
    by_screen[name] = pipeline(os.path.join(out, name), name, s, settings, first)
    first = first or (name, {a: by_screen[name]["arms"][a]["plan"] for a in arms.ARMS_BY_NAME})
  stages.PREFIX = "experiments"
  data = screens_report.combine_screens(
      by_screen, tuned_on=None if _MANIFEST.value else TUNED_ON, settings=settings)
  screens_report.write_study(out, data)
  return data


def pipeline(out, style, s, settings, first=None):
  """One screen's study in `out` (its report.json is that screen's entry in DIR/report.json)."""
  from mae_jax.demo import cellprofiler  # pylint: disable=g-import-not-at-top
  from mae_jax.experiments import report, runs  # pylint: disable=g-import-not-at-top
  paths = data_paths(out)
  for k in ("features", "runs"):
    os.makedirs(paths[k], exist_ok=True)
  timer = stages.Timer(out, paths["runs"])
  if not _MANIFEST.value:
    screen_json = os.path.join(paths["screen"], "ground_truth", "screen.json")
    timer.stage("screen", screen_json, lambda: make_screen(paths, style, s))
    timer.stage("shards", paths["manifest"], lambda: tasks.make_shards(paths, _WORKERS.value))
  subsets = {1.0: paths["manifest"]}
  for fraction in s.fractions:
    if fraction < 1.0:
      folder = os.path.join(out, "subsets", f"plates_{round(100 * fraction)}")
      subsets[fraction] = os.path.join(folder, "manifest.json")
      timer.stage(f"subset_{round(100 * fraction)}", subsets[fraction],
                  lambda f=fraction, d=folder: arms.plate_subset(paths["manifest"], f, d))
  features = {"pixel_stats": os.path.join(paths["features"], "pixel_stats.npz")}
  if paths["ground_truth"]:
    features["ceiling"] = os.path.join(paths["features"], "ceiling.npz")
    timer.stage("ceiling", features["ceiling"],
                lambda: tasks.make_ceiling(paths, features["ceiling"]))
  timer.stage("pixel_stats", features["pixel_stats"],
              lambda: tasks.make_pixel_stats(paths, features["pixel_stats"], _WORKERS.value))
  skipped = {}
  if cellprofiler.available() is None:
    features["cellprofiler"] = os.path.join(paths["features"], "cellprofiler.npz")
    timer.stage("cellprofiler", features["cellprofiler"], lambda: tasks.make_pixel_stats(
        paths, features["cellprofiler"], _WORKERS.value, "cellprofiler", field=s.cp_field))
  else:
    skipped["cellprofiler"] = cellprofiler.available()

  plans = plan_all(timer, paths, s, first)
  specs, grid = run_specs(paths, s, plans, subsets)
  steps_of, loss_of = {}, {}
  for name, spec in specs.items():
    folder = os.path.join(paths["runs"], name)
    train_dir, done = os.path.join(folder, "train"), os.path.join(folder, "train_done.json")
    config = arms.train_config(spec["config"], spec["manifest"], spec["steps"], spec["points"])
    spec["train_config"] = config
    plan = plans[spec["arm"]] if spec["arm"] else {"rule": "grid: the reference's steps"}
    timer.stage(f"train_{name}", done, lambda c=config, t=train_dir, d=done, p=plan:
                runs.train(c, t, d, p))
    steps_of[name] = runs.eval_steps(train_dir, spec["points"])
    for step in steps_of[name]:
      path = os.path.join(folder, "embeddings", f"step_{step}.npz")
      ckpt = os.path.join(train_dir, "checkpoints", str(step))
      timer.stage(f"embed_{name}_step_{step}", path,
                  lambda p=path, c=ckpt: runs.embed(paths, p, s.tile_stride, ckpt=c))
    loss_path = os.path.join(folder, "loss.json")
    timer.stage(f"loss_{name}", loss_path, lambda n=name, c=config, t=train_dir, p=loss_path:
                stages.write_json(p, runs.losses(paths, t, c, steps_of[n], s.loss_crops)))
    loss_of[name] = stages.read_json(loss_path)

  random_dir = os.path.join(paths["runs"], "random_init")
  networks = {}
  for arm in arms.ARMS:
    if arm.network not in networks:
      networks[arm.network] = arm
      path = os.path.join(random_dir, f"{arm.network}.npz")
      cfg = specs[f"{arm.name}_s0"]["train_config"]
      timer.stage(f"embed_random_{arm.network}", path,
                  lambda p=path, c=cfg: runs.embed(paths, p, s.tile_stride, model_cfg=c.model,
                                                   seed=0))

  scores, shared = {}, {}

  def score_all():
    shared.update(tasks.scoring_inputs(paths, features["pixel_stats"]))
    for name, path in features.items():
      scores[name] = tasks.score(paths, path, os.path.join(paths["features"], f"recall_{name}"),
                                 shared)
    for network in networks:
      scores[f"random_init_{network}"] = tasks.score(
          paths, os.path.join(random_dir, f"{network}.npz"),
          os.path.join(random_dir, f"recall_{network}"), shared)
    for name in specs:
      for step in steps_of[name]:
        folder = os.path.join(paths["runs"], name)
        scores[f"{name}/step_{step}"] = tasks.score(
            paths, os.path.join(folder, "embeddings", f"step_{step}.npz"),
            os.path.join(folder, "recall", f"step_{step}"), shared)
  timer.stage("score", None, score_all)

  done = {name: stages.read_json(os.path.join(paths["runs"], name, "train_done.json"))
          for name in specs}
  data = report.build(
      suite=s, settings=settings, plans=plans,
      specs=specs, grid=grid, steps_of=steps_of, loss_of=loss_of, done=done, scores=scores,
      networks=networks, paths=paths, device=tasks.describe_device(), timing=timer.summary(),
      subsets={f: report.subset_info(p) for f, p in subsets.items()}, skipped=skipped)
  report.write(out, data)
  return data


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT.value:
    raise cli.UserError("--out is required")
  if _BUDGET.value is not None and _BUDGET.value <= 0:
    raise cli.UserError(f"--budget_minutes={_BUDGET.value}: expected a positive number")
  if _SEEDS.value is not None and not 1 <= _SEEDS.value <= 10:
    raise cli.UserError(f"--seeds={_SEEDS.value}: expected 1 to 10")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise cli.UserError(f"--steps={_STEPS.value}: expected a positive integer")
  if _MANIFEST.value and not os.path.exists(_MANIFEST.value):
    raise cli.UserError(f"--manifest={_MANIFEST.value}: no such file or folder")
  if _MANIFEST.value and (flags.FLAGS["styles"].present or any(
      flags.FLAGS[n].value is not None for n in SCREEN_FLAGS)):
    raise cli.UserError("--manifest runs on a converted screen: --styles and the screen flags "
                        "apply only to the synthetic screen")
  unknown = [x for x in _STYLES.value if x not in STYLES]
  if unknown or not _STYLES.value or len(set(_STYLES.value)) != len(_STYLES.value):
    raise cli.UserError(f"--styles={','.join(_STYLES.value)}: expected distinct styles of "
                        f"{', '.join(STYLES)}")
  if _README.value and not os.path.exists(_README.value):
    raise cli.UserError(f"--readme={_README.value}: no such file")
  if _EXPRESSION.value and _EXPRESSION.value != "u2os" and not os.path.exists(_EXPRESSION.value):
    raise cli.UserError(f"--expression={_EXPRESSION.value}: no such file")
  from mae_jax.experiments import screens as screens_report  # pylint: disable=g-import-not-at-top
  data = study(os.path.abspath(_OUT.value))
  if _README.value:
    screens_report.update_readme(_README.value, os.path.abspath(_OUT.value), data)
  print(json.dumps(data), flush=True)


if __name__ == "__main__":
  cli.run(main, sys.argv[1:])
