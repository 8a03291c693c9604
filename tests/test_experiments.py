"""mae_jax.experiments at toy size: the whole suite on a tiny screen, killed mid-way and resumed,
on a converted screen without ground truth (--manifest), user errors; its pieces in-process
(plate subsets, FLOP-equal plans, verdicts with standard errors, strided embedding)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.data import records
from mae_jax.experiments import arms, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREEN = ["--genes=40", "--guides=2", "--experiments=2", "--plates=2", "--controls_per_plate=10",
          "--image_size=64", "--seed=3"]
TINY = ["--tiny", "--steps=4", "--workers=1"]
EVERY_ARM = {a.name for a in arms.ARMS} | {f"random_init_{n}" for n in arms.NETWORK_LABELS} | {
    "pixel_stats", "cellprofiler"}
STYLES = ("default", "granular")
VERDICTS = {"holds", "does not hold", "within noise", "not scored"}


def env(cache_dir):
  """One device, fewer XLA passes and the session's compilation cache (as tests/test_train.py)."""
  e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  e["XLA_FLAGS"] = ""
  return e


def suite(*args, cache_dir, **kw):
  return subprocess.run([sys.executable, "-m", "mae_jax.experiments", *args], cwd=ROOT,
                        env=env(cache_dir), capture_output=True, text=True, timeout=900, **kw)


def stage_lines(stderr, word):
  """(screen, stage) of the log lines `experiments[SCREEN]: STAGE: WORD...` ("running" or
  "reusing ...")."""
  out = set()
  for l in stderr.splitlines():
    head, _, rest = l.partition("]: ")
    if head.startswith("experiments[") and rest.count(":") >= 1:
      stage, _, what = rest.partition(":")
      if what.strip().startswith(word):
        out.add((head[len("experiments["):], stage.strip()))
  return out


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, cache_dir):
  """The tiny suite on both styles, SIGKILLed once the first style's scaling grid starts
  training, then run again."""
  out = tmp_path_factory.mktemp("study") / "out"
  cmd = [sys.executable, "-m", "mae_jax.experiments", f"--out={out}", *TINY, *SCREEN]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env(cache_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  first = []
  try:
    for line in proc.stderr:
      first.append(line)
      if line.startswith("experiments[default]: train_grid_") and line.rstrip().endswith(
          "running"):
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert any(l.startswith("experiments[default]: train_grid_") for l in first), "".join(
      first[-20:])
  timings = {k: json.loads((out / "default" / k).read_text())
             for k in ("timings.json", "runs/timings.json")}
  second = suite(*cmd[3:], cache_dir=cache_dir)
  assert second.returncode == 0, second.stderr[-3000:]
  return out, "".join(first), timings, second, cmd[3:]


def test_report_has_every_arm_on_both_styles(killed_and_resumed):
  out, _, _, proc, _ = killed_and_resumed
  study = json.loads((out / "report.json").read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == study  # last stdout line = report
  assert set(study["screens"]) == set(STYLES) and study["tuned_on"] == "default"
  assert study["held_out"] == ["granular"]
  for c in study["claims"].values():
    assert set(c["verdicts"]) == set(STYLES) and set(c["verdicts"].values()) <= VERDICTS
  text = (out / "report.md").read_text()
  assert "tuned on the `default` style only" in text and "### Screen `granular`" in text
  for style in STYLES:
    data = study["screens"][style]
    assert data["screen"]["style"] == style
    assert data == json.loads((out / style / "report.json").read_text())
    check_screen_report(out / style, data)
  assert study["screens"]["default"]["arms"]["cellprofiler"]["field_px"] == 64
  # One budget for both screens: the second takes the first's plans, probes nothing.
  budgets = {k: study["screens"][k]["budget"] for k in STYLES}
  assert budgets["default"]["from_screen"] is None and budgets["granular"]["from_screen"] == "default"
  for name in arms.ARMS_BY_NAME:
    assert len({study["screens"][k]["arms"][name]["steps"] for k in STYLES}) == 1, name
  assert not (out / "granular" / "runs" / "plans" / f"probe_{arms.REFERENCE}").exists()


def check_screen_report(out, data):
  assert set(data["arms"]) == EVERY_ARM | {"ceiling"}
  for name, a in data["arms"].items():
    assert set(a["recall"]) == set(report.SOURCES), name
    for v in a["recall"].values():
      if v["recall"] is not None:  # 40 genes: sources with < 20 genes in the map are skipped
        assert v["se"] == pytest.approx(math.sqrt(v["recall"] * (1 - v["recall"]) / v["pairs"]))
    assert a["mean"]["recall"] is not None and "mean_uncorrected" in a
    assert set(a["uncorrected"]) == set(report.SOURCES)
  for name in arms.ARMS_BY_NAME:
    a = data["arms"][name]
    assert a["train_flops"] > 0 and a["wall_s"] > 0 and a["seeds"] == [0]
    assert a["budget_rule"] in ("reference", "equal_flops", "equal_wall_time")
    assert a["loss"]["baseline"] > 0 and a["loss"]["final"] > 0
  # --steps: every arm at the reference's FLOPs, within one step's worth.
  ref = data["arms"][arms.REFERENCE]
  for name in ("vit_p16_m75", "vit_p8_m25", "wsl"):
    a = data["arms"][name]
    assert a["train_flops"] == pytest.approx(ref["train_flops"], rel=0.5 / a["steps"] + 1e-9)
  grid = data["grid"]
  assert {(p["width"], p["fraction"]) for p in grid} == {
      (w, f) for w in arms.TINY_SUITE.widths for f in arms.TINY_SUITE.fractions}
  assert len(grid) == (arms.TINY_SUITE.eval_points * len(arms.TINY_SUITE.widths) *
                       len(arms.TINY_SUITE.fractions))
  assert {p["step"] for p in grid} == {2, 4}  # the final checkpoint and half way
  assert data["subsets"]["0.5"]["plates"] == ["gene-001 P1", "gene-002 P1"]
  assert set(data["spearman"]) == {"0.5", "1.0"}
  for c in data["claims"].values():
    assert c["verdict"] in VERDICTS
  assert set(data["claims"]) >= {"mae_beats_wsl", "patch8_beats_patch16", "mask75_beats_mask25",
                                 "recall_rises_with_flops", "mae_beats_handcrafted"}
  assert set(data["relative_improvement"]) >= set(report.SOURCES)
  for name in report.FIGURES:
    assert (out / name).stat().st_size > 5000
  text = (out / "report.md").read_text()
  assert "| WSL DenseNet (labels: gene) |" in text and "equal training FLOPs" in text


def test_rerun_after_a_kill_redoes_no_finished_stage(killed_and_resumed, cache_dir):
  out, first, before, proc, args = killed_and_resumed
  finished = {("default", k) for book in before.values() for k in book["stages"]}
  assert {("default", k) for k in ("screen", "shards", "pixel_stats", "cellprofiler",
                                   f"train_{arms.REFERENCE}_s0", "train_wsl_s0",
                                   "loss_wsl_s0")} <= finished
  assert not finished & stage_lines(proc.stderr, "running")
  assert finished <= stage_lines(proc.stderr, "reusing")
  for key, book in before.items():  # their first timings stand
    after = json.loads((out / "default" / key).read_text())["stages"]
    assert {k: after[k] for k in book["stages"]} == book["stages"]
  in_flight = sorted(stage_lines(first, "running") - finished)
  assert len(in_flight) == 1 and in_flight[0] in stage_lines(proc.stderr, "running")
  assert ("granular", "screen") in stage_lines(proc.stderr, "running")
  # A third run reuses everything but the scoring passes (which reuse their recall.json files).
  again = suite(*args, cache_dir=cache_dir)
  assert again.returncode == 0, again.stderr[-2000:]
  assert stage_lines(again.stderr, "running") == {(s, "score") for s in STYLES}


def test_manifest_of_a_converted_screen_without_ground_truth(tmp_path, cache_dir):
  screen, shards = tmp_path / "screen", tmp_path / "shards"
  for args in (["data_prep.synthetic", f"--out={screen}", "--workers=1", *SCREEN],
               ["data_prep.convert", "--layout=rxrx3", f"--root={screen}", f"--out={shards}",
                "--workers=1"]):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
  expression = tmp_path / "expression.csv"
  shutil.copy(screen / "ground_truth" / "expression.csv", expression)
  shutil.rmtree(screen)  # no ground truth any more: the ceiling row is left out
  proc = suite(f"--out={tmp_path / 'out'}", f"--manifest={shards / 'manifest.json'}",
               f"--expression={expression}", *TINY, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  study = json.loads(proc.stdout.strip().splitlines()[-1])
  assert list(study["screens"]) == ["manifest"] and study["tuned_on"] is None
  data = study["screens"]["manifest"]
  assert set(data["arms"]) == EVERY_ARM and not data["ground_truth"]
  assert data["arms"]["pixel_stats"]["recall"]["StringDB"]["recall"] is not None
  assert not (tmp_path / "out" / "manifest" / "screen").exists()
  assert "arms_corrected" in json.loads((tmp_path / "out" / "manifest" / "features" /
                                         "recall_pixel_stats" / "tvn" /
                                         "recall.json").read_text())["arm_correction"]


def test_user_errors_are_one_line(tmp_path, cache_dir):
  for args in (["--suite=huge"], ["--budget_minutes=-1"], [f"--manifest={tmp_path / 'none'}"],
               [f"--manifest={tmp_path}", "--styles=granular"], ["--seeds=0"],
               ["--styles=default,bold"], ["--styles=default,default"]):
    proc = suite(f"--out={tmp_path / 'x'}", *args, cache_dir=cache_dir)
    assert proc.returncode == 2, (args, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mae_jax.experiments: error: "), proc.stderr
  assert not (tmp_path / "x").exists()


def test_the_study_knows_every_synthetic_style():
  from data_prep import styles  # pylint: disable=g-import-not-at-top
  from mae_jax.experiments import __main__ as experiments  # pylint: disable=g-import-not-at-top
  assert set(experiments.STYLES) == set(styles.STYLES) and experiments.TUNED_ON == styles.DEFAULT


def test_cellprofiler_features_of_a_site():
  from mae_jax.demo import cellprofiler  # pylint: disable=g-import-not-at-top
  assert cellprofiler.available() is None, cellprofiler.available()
  yy, xx = np.mgrid[:96, :96]
  image = np.full((96, 96, 6), 200, np.uint16)
  for k, (cy, cx) in enumerate(((24, 24), (24, 70), (70, 40))):  # three cells, a nucleus each
    r = np.hypot(yy - cy, xx - cx)
    image[..., 1:][r < 14] += np.uint16(800 + 300 * k)
    image[..., 0][r < 6] += 3000
  nuclei, cells = cellprofiler.segment(image)
  assert nuclei.max() == cells.max() == 3
  assert ((nuclei > 0) <= (cells > 0)).all()  # every nucleus lies inside its cell
  feats = cellprofiler.site_features(image, field=96)
  names = cellprofiler.feature_names(6)
  assert feats.shape == (len(names),) and feats.dtype == np.float32 and np.isfinite(feats).all()
  assert feats[names.index("nuclei_count")] == 3
  area = [i for i, n in enumerate(names) if n.startswith("cells_sizeshape_") and "Area" in n][0]
  assert feats[area] > 300  # pi 14² ~ 615 px
  blank = cellprofiler.site_features(np.zeros((64, 64, 6), np.uint16))
  assert blank.shape == feats.shape and not blank.any()  # no objects: zeros, not an error


def test_without_cp_measure_the_arm_is_skipped_with_its_reason(killed_and_resumed, monkeypatch):
  from mae_jax.demo import cellprofiler  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "cp_measure", None)  # import cp_measure now fails
  cellprofiler._measurements.cache_clear()  # pylint: disable=protected-access
  try:
    why = cellprofiler.available()
  finally:
    monkeypatch.undo()
    cellprofiler._measurements.cache_clear()  # pylint: disable=protected-access
  assert why.startswith("cp_measure is not installed") and ".[cellprofiler]" in why
  data = json.loads((killed_and_resumed[0] / "default" / "report.json").read_text())
  del data["arms"]["cellprofiler"]
  data["skipped"] = {"cellprofiler": why}
  assert f"Not run: cellprofiler ({why})." in report.markdown(data)


# -- pieces -------------------------------------------------------------------------------------
def _manifest(folder, groups, records_each=3):
  folder.mkdir(parents=True)
  shards = [{"path": f"shards/{e}_P{p}-{k:05d}.tfrecord", "records": records_each}
            for e, p in groups for k in range(2)]
  return records.write_manifest(folder, {
      "layout": "rxrx3", "shards": shards, "num_records": len(shards) * records_each,
      "image_shape": [64, 64, 6], "channels": [f"w{i}" for i in range(1, 7)],
      "dtype": "uint16", "counts": {"sites": 1}})


def test_plate_subsets_take_plates_across_experiments(tmp_path):
  groups = [(e, p) for e in ("gene-001", "gene-002") for p in (1, 2, 3, 10)]
  path = _manifest(tmp_path / "full", groups)
  sub = arms.plate_subset(path, 0.25, str(tmp_path / "quarter"))
  assert sub["plates"] == ["gene-001 P1", "gene-002 P1"] and sub["of_groups"] == 8
  m = records.read_manifest(tmp_path / "quarter" / "manifest.json")
  assert m["num_records"] == sub["records"] == 12 and "counts" not in m
  here = records.shard_paths(tmp_path / "quarter" / "manifest.json", m)
  assert all(p.startswith(str(tmp_path / "full" / "shards")) for p in map(os.path.normpath, here))
  half = arms.plate_subset(path, 0.5, str(tmp_path / "half"))
  assert half["plates"][-2:] == ["gene-001 P2", "gene-002 P2"]  # plate 10 sorts last
  assert arms.plate_subset(path, 0.01, str(tmp_path / "one"))["groups"] == 1


def test_flop_equal_plans_fall_back_to_equal_wall_time():
  ref_cfg = arms.arm_config(arms.ARMS_BY_NAME[arms.REFERENCE])
  ref = arms.reference_plan(ref_cfg, 1003, step_time=0.1, eval_points=3)
  assert ref["total_steps"] == 1000 and ref["train_seconds"] == pytest.approx(100)
  munet = arms.arm_config(arms.ARMS_BY_NAME["munet"])
  plan = arms.flop_equal_plan(ref, munet, step_time=1.0)
  per_step = munet.batch_size * arms.train_flops_per_image(munet)
  assert plan["rule"] == "equal_flops" and abs(plan["flops"] - ref["flops"]) <= per_step / 2
  slow = arms.flop_equal_plan(ref, munet, step_time=10.0, wall_cap=2.0)
  assert slow["rule"] == "equal_wall_time" and slow["total_steps"] == 10
  assert slow["flop_equal_steps"] == plan["total_steps"]
  assert arms.flop_equal_plan(ref, munet)["rule"] == "equal_flops"  # no step time: FLOPs


def test_grid_widths_keep_the_reference_recipe():
  ref = arms.arm_config(arms.ARMS_BY_NAME[arms.REFERENCE])
  same = arms.width_config(int(ref.model.width))
  assert same.model.to_dict() == ref.model.to_dict()
  wide = arms.width_config(128)
  assert (wide.model.width, wide.model.num_heads, wide.model.mlp_dim) == (128, 4, 512)
  assert arms.train_flops_per_image(wide) > 2 * arms.train_flops_per_image(ref)


def _entry(r, pairs=100):
  rows = {s: {"recall": r, "se": math.sqrt(r * (1 - r) / pairs), "pairs": pairs}
          for s in report.SOURCES}
  return {"recall": rows, "mean": report.source_mean(rows)}


def test_verdicts_read_differences_against_their_standard_errors():
  strong, weak = _entry(0.6), _entry(0.3)
  assert report.compare(strong, weak)["verdict"] == "holds"
  assert report.compare(weak, strong)["verdict"] == "does not hold"
  assert report.compare(_entry(0.32), weak)["verdict"] == "within noise"
  c = report.compare(strong, weak)
  assert c["se"] == pytest.approx(math.hypot(math.sqrt(0.24 / 100), math.sqrt(0.21 / 100)))
  rel = report.relative(strong, weak)["CORUM"]
  assert rel["value"] == pytest.approx(1.0) and rel["se"] > 0
  rising = [{"train_flops": 10.0 ** k, **_entry(0.2 + 0.1 * k)} for k in range(5)]
  assert report.spearman(rising)["verdict"] == "holds"
  assert report.spearman(rising)["rho"] == pytest.approx(1.0)
  flat = [{"train_flops": 10.0 ** k, **_entry(0.3 + 0.01 * (k % 2))} for k in range(5)]
  assert report.spearman(flat)["verdict"] == "within noise"
  unscored = [{"train_flops": 10.0 ** k, "mean": {"recall": None, "se": None}} for k in range(3)]
  assert report.spearman(unscored)["verdict"] == "not scored"
  assert report._all(["not scored"] * 2) == "not scored"  # pylint: disable=protected-access
  assert report._all(["holds", "not scored"]) == "within noise"  # pylint: disable=protected-access
  assert report._all(["holds", "holds"]) == "holds"  # pylint: disable=protected-access
  seeds = report.combine([{**_entry(v), "uncorrected": {s: 0.1 for s in report.SOURCES},
                           "mean_uncorrected": 0.1, "tvn_no_arm": {s: v for s in report.SOURCES},
                           "mean_tvn_no_arm": v, "arm_mates": {"before": 0.2, "after": 0.0}}
                          for v in (0.4, 0.5, 0.6)])
  se = seeds["recall"]["CORUM"]["se"]
  assert seeds["recall"]["CORUM"]["recall"] == pytest.approx(0.5)
  assert se == pytest.approx(math.sqrt(0.25 / 100 + 0.1 ** 2 / 3))


def test_strided_embedding_is_the_mean_of_the_chosen_tiles(killed_and_resumed, tmp_path,
                                                           full_compiles):
  """stride 2 on 64² sites with 32² tiles keeps tile (0, 0) of each site."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mae_jax.demo import stages  # pylint: disable=g-import-not-at-top
  from mae_jax.experiments import runs  # pylint: disable=g-import-not-at-top
  from mae_jax.models import registry  # pylint: disable=g-import-not-at-top
  out = killed_and_resumed[0] / "default"
  manifest = str(out / "shards" / "manifest.json")
  cfg = arms.arm_config(arms.ARMS_BY_NAME[arms.REFERENCE], tiny=True)
  runs.embed({"manifest": manifest}, str(tmp_path / "w.npz"), 2, model_cfg=cfg.model, seed=5)
  emb, meta = stages.load_wells(str(tmp_path / "w.npz"))
  with nnx.use_eager_sharding(False):
    model = registry.build_model(cfg.model, seed=5)
  tiles = [b for b in input_pipeline.eval_tiles(manifest, tile_size=32, batch_size=4096)]
  images = np.concatenate([b["image"] for b in tiles])
  sites = np.concatenate([b["site"] for b in tiles])
  first = np.r_[True, sites[1:] != sites[:-1]]
  want = np.asarray(model.embed(jnp.asarray(images[first])))
  site_meta = input_pipeline.site_metadata(manifest)
  order = {m["well_id"]: i for i, m in enumerate(site_meta)}
  np.testing.assert_allclose(emb, want[[order[w] for w in meta["well_id"]]], atol=2e-5, rtol=1e-4)


def test_readme_block_and_figures(killed_and_resumed, tmp_path):
  from mae_jax.experiments import screens  # pylint: disable=g-import-not-at-top
  out = killed_and_resumed[0]
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\n<!-- experiments:begin -->\nold\n<!-- experiments:end -->\n\nrest\n")
  screens.update_readme(str(readme), str(out), json.loads((out / "report.json").read_text()))
  text = readme.read_text()
  assert "\nold\n" not in text and text.endswith("rest\n") and "### Screen `granular`" in text
  for style in STYLES:
    for name in report.FIGURES:
      assert (tmp_path / "bench" / "results" / "experiments" / f"{style}_{name}").exists()
      assert f"](bench/results/experiments/{style}_{name})" in text


def test_figures_of_a_screen_where_nothing_could_be_scored(tmp_path):
  """Too few genes for every source: every recall is None, and the figures are still drawn."""
  none = {"recall": None, "se": None}
  data = {"grid": [{"width": w, "fraction": f, "train_flops": 1e9 * w * (k + 1), "mean": none}
                   for w in (8, 16) for f in (0.5, 1.0) for k in range(2)],
          "arms": {"pixel_stats": {"label": "pixel statistics", "mean": none}},
          "relative_improvement": {s: {"value": None, "se": None} for s in report.SOURCES}}
  report.plot_scaling(data, tmp_path / "scaling.png")
  report.plot_relative(data, tmp_path / "relative.png")
  assert all((tmp_path / n).stat().st_size > 5000 for n in ("scaling.png", "relative.png"))
