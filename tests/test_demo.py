"""mae_jax.demo end to end at a tiny size, its rerun and user errors; baselines; README block."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.demo import baselines, report
from test_train import main_env

TINY = ["--genes=40", "--guides=2", "--experiments=2", "--plates=2", "--controls_per_plate=10",
        "--image_size=64", "--seed=3", "--steps=6", "--eval_points=2", "--workers=1",
        "--config.batch_size=16", "--config.log_every=2", "--config.model.image_size=32",
        "--config.model.patch_size=8", "--config.model.width=32", "--config.model.depth=1",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.model.decoder_width=32", "--config.model.decoder_heads=2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo(*args, env=None):
  """The demo as a user on one CPU device runs it; `env` adds the tests' compile cache and
  fewer XLA passes (tests/test_train.py: main_env)."""
  return subprocess.run([sys.executable, "-m", "mae_jax.demo", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=600, env=env)


@pytest.fixture(scope="module")
def fast_env(cache_dir):
  return main_env(cache_dir, devices=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fast_env):
  tmp = tmp_path_factory.mktemp("demo")
  readme = tmp / "README.md"
  readme.write_text("# project\n\nintro\n")
  proc = demo(f"--out={tmp / 'out'}", f"--readme={readme}", *TINY, env=fast_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, proc


def _check_recall(r):
  assert set(r["sources"]) == set(report.SOURCES)
  for src in r["sources"].values():
    assert "recall_0.05_0.95" in src and "recall_0.1_0.9" in src
    v = src["recall_0.05_0.95"]
    assert v is None or 0.0 <= v <= 1.0
  assert r["n_perturbations"] > 20


def test_report_structure(tiny_run):
  tmp, proc = tiny_run
  out = tmp / "out"
  data = json.loads((out / "report.json").read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == data  # last stdout line = report
  assert data["device"].startswith("cpu")
  assert data["budget_minutes"] is None  # --steps, not a budget
  assert set(data["methods"]) == {"mae", "random_init", "pixel_stats", "ceiling"}
  for m in data["methods"].values():
    _check_recall(m)
    assert m["batch_correction"]["method"] == "tvn"
    _check_recall(m["uncorrected"])
    assert m["uncorrected"]["batch_correction"]["method"] == "none"
  loss = data["loss"]
  assert loss["final"] > 0 and loss["mean_predictor"] > 0
  assert set(data["arm_mates"]) == {"before", "after"}
  steps = [b["step"] for b in data["by_step"]]
  assert steps == [0, 3, 6]  # random init, half way, final (--eval_points=2)
  flops = [b["flops"] for b in data["by_step"]]
  assert flops[0] == 0 and flops[1] > 0 and flops[2] == pytest.approx(2 * flops[1])
  for b in data["by_step"]:
    _check_recall(b["recall"])
  assert data["methods"]["mae"]["sources"] == data["by_step"][-1]["recall"]["sources"]
  assert set(data["checks"]) >= {"ceiling_corum_recall_at_least_0.5", "tvn_raises_every_method",
                                 "arm_correction_lowers_arm_mates",
                                 "mae_loss_clearly_below_mean_predictor"}
  for name in report.FIGURES:
    assert 1000 < (out / name).stat().st_size < report.MAX_FIGURE_BYTES
  assert "| MAE (trained) |" in (out / "report.md").read_text()


def test_readme_block_and_figures(tiny_run):
  tmp, _ = tiny_run
  text = (tmp / "README.md").read_text()
  assert text.startswith("# project\n\nintro\n")
  assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
  assert report.HEADING in text and "bench/results/demo/recall.png" in text
  for name in report.FIGURES:
    assert (tmp / "bench" / "results" / "demo" / name).exists()


def test_rerun_reuses_every_stage(tiny_run, fast_env):
  tmp, _ = tiny_run
  before = json.loads((tmp / "out" / "report.json").read_text())
  proc = demo(f"--out={tmp / 'out'}", *TINY, env=fast_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "running" not in "".join(l for l in proc.stderr.splitlines(True)
                                  if l.startswith("demo:") and "score" not in l)
  after = json.loads(proc.stdout.strip().splitlines()[-1])
  assert after["methods"] == before["methods"] and after["by_step"] == before["by_step"]


def test_the_maps_eval_dir_opens_in_eval_explore(tiny_run, tmp_path):
  """The demo's headline map (TVN + arm correction) is an eval.recall folder: eval.explore pages it."""
  tmp, _ = tiny_run
  maps = sorted((tmp / "out" / "runs").glob("*/recall/step_*/tvn/gene_embeddings.npz"))
  assert maps, list((tmp / "out").rglob("tvn"))
  page = tmp_path / "map.html"
  proc = subprocess.run([sys.executable, "-m", "eval.explore", f"--map={maps[-1].parent}",
                         f"--out={page}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["genes"] == 40
  assert page.stat().st_size > 100_000


def test_budget_is_planned_by_a_timed_probe(tiny_run, tmp_path, fast_env):
  """The default path: a probe times real steps and the budget sets total_steps; the new run
  joins the earlier one in the scaling figure and README runs table."""
  tmp, _ = tiny_run
  out = tmp_path / "out"
  shutil.copytree(tmp / "out", out)
  proc = demo(f"--out={out}", "--budget_minutes=0.1", *[a for a in TINY if "--steps" not in a],
              env=fast_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (run,) = [p for p in (out / "runs").iterdir() if p.name.startswith("budget_0.1min")]
  plan = json.loads((run / "plan.json").read_text())
  assert plan["source"] == "probe" and plan["step_time_s"] > 0 and plan["total_steps"] >= 2
  data = json.loads((out / "report.json").read_text())
  assert data["budget_minutes"] == 0.1 and data["total_steps"] == plan["total_steps"]
  names = sorted(r["run"].split("_")[0] for r in report.all_runs(str(out)))
  assert names == ["budget", "steps"]
  # Its timing adds up its own stages and the shared ones, not the earlier run's.
  embeds = {k for k in data["timing"]["stages_s"] if k.startswith("embed_step_")}
  assert embeds == {f"embed_step_{b['step']}" for b in data["by_step"] if b["step"]}
  assert {"screen", "train", "embed_random_init"} <= set(data["timing"]["stages_s"])


def test_user_errors_are_one_line(tmp_path):
  truth = tmp_path / "done" / "screen" / "ground_truth"
  truth.mkdir(parents=True)
  (truth / "screen.json").write_text(json.dumps({"parameters": {"genes": 40}}))
  for args in (["--budget_minutes=-1", f"--out={tmp_path / 'x'}"],
               [f"--out={tmp_path / 'done'}", "--genes=41"],
               [f"--out={tmp_path / 'y'}", "--config.model.nonsense=1"],
               [f"--out={tmp_path / 'z'}", "--eval_points=0"]):
    proc = demo(*args)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mae_jax.demo: error: "), proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["done"]
  assert sorted(os.listdir(tmp_path / "done")) == ["screen"]


def test_pixel_statistics_count_nuclei_and_see_texture():
  rng = np.random.default_rng(0)
  image = rng.integers(100, 120, (128, 128, 6)).astype(np.uint16)
  yy, xx = np.mgrid[:128, :128]
  for cy, cx in ((20, 20), (20, 90), (70, 50), (100, 100), (105, 20)):
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < 49, 0] = 3000
  feats = baselines.site_features(image)
  names = baselines.feature_names(6)
  assert feats.shape == (len(names),) and np.isfinite(feats).all()
  assert feats[names.index("nuclei_count")] == 5
  assert feats[names.index("nucleus_area_mean")] == pytest.approx(np.pi * 49, rel=0.2)
  # Fine noise puts its variance in the finest band; a smooth ramp in the coarsest.
  fine = baselines.site_features(rng.integers(0, 1000, (128, 128, 6)).astype(np.uint16))
  ramp = np.repeat((xx * 8)[..., None], 6, axis=2).astype(np.uint16)
  coarse = baselines.site_features(ramp)
  band = lambda f, b: f[names.index(f"w2_band{b}")]
  assert band(fine, 0) > band(fine, 5) and band(coarse, 5) > band(coarse, 0)


def test_readme_block_is_replaced_in_place(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n\n{report.HEADING}\n\n{report.BEGIN}\nOLD-BLOCK\n{report.END}\n"
                    "\n## After\n")
  out = tmp_path / "out"
  out.mkdir()
  for name in report.FIGURES:
    (out / name).write_bytes(b"png")
  data = json.loads(json.dumps(_fake_report()))
  report.update_readme(str(readme), str(out), data)
  text = readme.read_text()
  assert "OLD-BLOCK" not in text and text.endswith("\n## After\n")
  assert text.count(report.HEADING) == 1
  assert "| true phenotypes (ceiling) | 0.600 |" in text
  # 50 CORUM pairs at recall 0.3: sqrt(0.3 * 0.7 / 50) = 0.065.
  assert "binomial standard error of about 0.06" in text


def _fake_report():
  r = lambda v: {"sources": {s: {"recall_0.05_0.95": v, "pairs": 50} for s in report.SOURCES}}
  method = lambda v: {**r(v), "uncorrected": r(0.1), "tvn_no_arm": r(v),
                      "arm_correction": {"arm_mates_before": 0.2, "arm_mates_after": 0.0}}
  data = {"device": "cpu", "run": "steps_1", "total_steps": 1, "batch_size": 2,
          "train_flops": 1e12, "train": {"seconds": 1.0},
          "methods": {"mae": method(0.3), "random_init": method(0.15),
                      "pixel_stats": method(0.2), "ceiling": method(0.6)},
          "loss": {"final": 0.5, "mean_predictor": 1.0, "initial": 1.1,
                   "ratio_to_mean_predictor": 0.5},
          "arm_mates": {"before": 0.2, "after": 0.0},
          "timing": {"this_invocation_s": 1.0, "stages_s": {"screen": 1.0}, "cpus": 2,
                     "stages_total_s": 1.0,
                     "cpu_share": 0.5, "load_average": {"min": 1.0, "max": 2.0}}}
  data["gains"] = {m: report.corum(data["methods"][m]) - report.CHANCE for m in report.METHODS}
  data["gains"]["mae_over_random_init"] = data["gains"]["mae"] / data["gains"]["random_init"]
  data["checks"] = report.checks(data)
  return data
