"""A new user's first runs: the screen's own metadata, the manifest's dtype, progress without a
terminal, configs from any folder, offline reference data, schedule-changing resumes and the arm
correction hint (docs/interfaces.md, docs/data_layouts.md §5-7). The bad-flag check of every
command is tests/test_cli.py."""
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import camae_vits16, tiny
from data_prep import convert
from data_prep.layouts import ConvertError
from eval import embed
from mae_jax.data import records, resources
from mae_jax.models import mae
from mae_jax.train import ConfigError, batches, loop
from mae_jax.util import cli, progress
from test_convert import make_rxrx1, make_rxrx3
from test_eval_cli import write_rxrx3_core
from test_eval_e2e import write_screen
from test_train import main_env, result_of

REPO = pathlib.Path(__file__).resolve().parents[1]


def _convert_error(capsys, *argv):
  with pytest.raises(SystemExit) as e:
    cli.run(convert.main, ["--progress=off", "--workers=1", *argv], absl_flags=False)
  err = capsys.readouterr().err
  assert e.value.code == cli.USAGE and err.count("\n") == 1, err
  assert err.startswith("data_prep.convert: error: "), err
  return err


def test_convert_reads_size_and_dtype_from_the_synthetic_screens_metadata(tmp_path, capsys):
  root = tmp_path / "screen"
  make_rxrx3(str(root), size=256)  # 16-bit, 256² sites: not RxRx3's real 2048²
  (root / "ground_truth").mkdir()
  screen = {"layout": "rxrx3", "image_size": 256, "bit_depth": 16}  # as data_prep.synthetic
  (root / "ground_truth" / "screen.json").write_text(json.dumps(screen))
  summary = convert.convert("rxrx3", str(root), str(tmp_path / "out"), progress="off")
  assert summary["image_shape"] == [256, 256, 6] and summary["dtype"] == "uint16"
  # An explicit flag wins over the metadata; one that contradicts it and the images is one line.
  again = convert.convert("rxrx3", str(root), str(tmp_path / "out"), image_size=256,
                          progress="off")
  assert again["shards_skipped"] == again["shards"]
  err = _convert_error(capsys, "--layout=rxrx3", f"--root={root}", f"--out={tmp_path / 'o2'}",
                       "--image_size=512")
  assert "--image_size=512" in err and "screen.json" in err and "256x256" in err, err
  (root / "ground_truth" / "screen.json").write_text(json.dumps({**screen, "bit_depth": 8}))
  with pytest.raises(ConvertError, match="says the screen is uint8"):
    convert.convert("rxrx3", str(root), str(tmp_path / "o3"), progress="off")
  # Without the metadata the layout's real size is expected, as before.
  (root / "ground_truth" / "screen.json").unlink()
  with pytest.raises(ConvertError, match="expected 2048x2048"):
    convert.convert("rxrx3", str(root), str(tmp_path / "o4"), progress="off")


def _manifest(out, dtype, channels=6, sites=8, size=40):
  names = [f"w{c}" for c in range(1, channels + 1)]
  rng = np.random.default_rng(0)
  with records.ShardWriter(str(out / "s.tfrecord")) as w:
    for i in range(sites):
      w.write(rng.integers(0, 1000, (size, size, channels)).astype(dtype), names,
              {"well_id": f"B{i:02d}", "site": 1})
  return records.write_manifest(str(out), {
      "layout": "test", "shards": [{"path": "s.tfrecord", "records": sites}],
      "num_records": sites, "image_shape": [size, size, channels], "channels": names,
      "dtype": np.dtype(dtype).name})


def test_main_takes_dtype_and_channels_from_the_manifest(tmp_path, cache_dir):
  (tmp_path / "u16").mkdir()
  (tmp_path / "c3").mkdir()
  u16 = _manifest(tmp_path / "u16", np.uint16)
  c3 = _manifest(tmp_path / "c3", np.uint8, channels=3)
  config = tiny.get_config()
  config.data.manifest = u16
  assert batches.match_manifest(config) == ["data.dtype=uint16"]
  assert config.data.dtype == "uint16"
  config = tiny.get_config()
  config.data.manifest = u16
  assert batches.match_manifest(config, given={"data.dtype"}) == []  # the command line wins
  config.data.manifest = c3
  assert batches.match_manifest(config) == ["model.channels=3"] and config.model.channels == 3
  ca = camae_vits16.get_config()  # CA-MAE: any count up to model.max_channels
  ca.data.manifest = c3
  assert batches.match_manifest(ca) == ["model.channels=3"]
  ca.model.update(channels=6, max_channels=2)
  with pytest.raises(ConfigError, match="at most model.max_channels=2"):
    batches.match_manifest(ca)

  # --stop_at=0: up to the pipeline's dtype check and the initial state, no train step compiled.
  def run(*args):
    return subprocess.run([sys.executable, "-m", "mae_jax.main", "--config=configs/tiny.py",
                           f"--config.data.manifest={u16}", "--stop_at=0", *args], cwd=REPO,
                          env=main_env(cache_dir, devices=1), capture_output=True, text=True,
                          timeout=300)
  proc = run(f"--workdir={tmp_path / 'run'}")
  assert result_of(proc)["status"] == "preempted", proc.stderr[-3000:]
  assert f"from the manifest {u16}: data.dtype=uint16" in proc.stdout
  assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["dtype"] == "uint16"
  bad = run(f"--workdir={tmp_path / 'run2'}", "--config.data.dtype=uint8")
  assert bad.returncode == cli.USAGE, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines()[-1].startswith("mae_jax.main: error: ")
  assert "uint8" in bad.stderr.strip().splitlines()[-1]


def test_progress_lines_without_a_terminal(tmp_path, capsys, devices):
  log = io.StringIO()  # not a terminal: lines, not a bar
  bar = progress.Progress(4, unit="site", desc="job", every=0, file=log)
  for _ in range(4):
    bar.update(1)
  bar.set_postfix(crops_per_s="9.0")
  bar.close()
  lines = log.getvalue().splitlines()
  assert lines[0].startswith("job: 1/4 sites (25%), ") and "sites/s, ETA " in lines[0], lines
  assert lines[-1].startswith("job: 4/4 sites (100%), ") and "done in" in lines[-1], lines
  assert lines[-1].endswith("crops_per_s=9.0")
  quiet = io.StringIO()
  with progress.Progress(4, every=3600, file=quiet) as slow:
    slow.update(2)  # before the interval: nothing until close
    assert quiet.getvalue() == ""
  assert len(quiet.getvalue().splitlines()) == 1
  terminal = io.StringIO()
  terminal.isatty = lambda: True
  with progress.Progress(4, file=terminal) as shown, progress.Progress(4, mode="off") as off:
    assert shown._bar is not None and off._bar is None  # a tqdm bar on a terminal only

  make_rxrx1(str(tmp_path / "rxrx1"), size=256)
  capsys.readouterr()
  convert.convert("rxrx1", str(tmp_path / "rxrx1"), str(tmp_path / "out"), image_size=256,
                  progress_every=0)
  err = capsys.readouterr().err.splitlines()
  assert any(line.startswith("data_prep.convert: 8/8 sites (100%)") for line in err), err

  manifest = write_screen(tmp_path, np.random.default_rng(0))
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # compile time
  try:
    with nnx.use_eager_sharding(False):
      model = mae.build_model(tiny.get_config().model)
    embed.embed_manifest(model, str(manifest), batch_size=64, progress_every=0)
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  err = capsys.readouterr().err.splitlines()
  assert any(line.startswith("embedding: 144/144 sites (100%)") for line in err), err
  assert sum(line.startswith("embedding: ") for line in err) >= 2, err


def test_config_path_resolves_from_another_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = str(REPO / "configs" / "tiny.py")
  assert cli.packaged_config(["--config=configs/tiny.py:x", "--config.seed=1"]) == [
      f"--config={packaged}:x", "--config.seed=1"]
  assert cli.packaged_config(["--config", "configs/tiny.py"]) == ["--config", packaged]
  for kept in (["--config=configs/nope.py"], ["--config=elsewhere/tiny.py"],
               ["--", "--config=configs/tiny.py"]):
    assert cli.packaged_config(kept) == kept
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-m", "mae_jax.summary", "--config=configs/tiny.py",
                         "--config.model.depth=3"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1])["depth"] == 3
  proc = subprocess.run([sys.executable, "-m", "mae_jax.main", "--config=configs/tiny.py",
                         "--config.dry_run=True"], cwd=tmp_path, env=main_env(tmp_path / "cache"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1])["status"] == "dry_run"


def test_offline_first_use_says_how_to_provide_the_files(tmp_path, monkeypatch):
  monkeypatch.setenv("MAE_JAX_CACHE", str(tmp_path / "cache"))
  offline = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for "
                                        "efaar-benchmarking==1.0\n")
  monkeypatch.setattr(resources.subprocess, "run", lambda *a, **k: offline)
  with pytest.raises(resources.ResourceError) as e:
    resources.annotations_dir()
  message = str(e.value)
  assert "\n" not in message and message.startswith("cannot download efaar-benchmarking==1.0")
  assert "No matching distribution" in message
  assert "--annotations_dir=DIR" in message and "CORUM" in message
  assert "$MAE_JAX_CACHE/annotations" in message
  assert str(tmp_path / "cache" / "wheels" / "efaar-benchmarking-1.0.whl") in message
  with pytest.raises(resources.ResourceError, match="--expression=CSV"):
    resources.u2os_expression()


def test_resume_with_another_schedule_is_refused(tmp_path):
  config = tiny.get_config()
  assert config.allow_schedule_change is False
  loop.write_config(config, tmp_path, resuming=False)
  longer = tiny.get_config()
  longer.total_steps = 40
  with pytest.raises(ConfigError) as e:
    loop.write_config(longer, tmp_path, resuming=True, step=10)
  assert "total_steps 20 -> 40" in str(e.value) and "\n" not in str(e.value)
  assert "--config.allow_schedule_change=True" in str(e.value)
  longer.optimizer.lr = 1.0
  with pytest.raises(ConfigError, match="optimizer.lr 0.001 -> 1.0"):
    loop.write_config(longer, tmp_path, resuming=True, step=10)
  loop.write_config(longer, tmp_path, resuming=True, step=0)  # nothing trained on the old one
  longer.allow_schedule_change = True
  loop.write_config(longer, tmp_path, resuming=True, step=10)
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 40
  same = tiny.get_config()
  same.total_steps, same.optimizer.lr = 40, 1.0
  loop.write_config(same, tmp_path, resuming=True, step=11)  # the schedule it now has: fine
  assert "allow_schedule_change" in (REPO / "docs/interfaces.md").read_text()


def test_recall_says_when_arm_correction_was_skipped(tmp_path):
  root, _ = write_rxrx3_core(str(tmp_path / "screen"), n_genes=20, dims=16)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", "eval.recall",
       f"--embeddings={root}/OpenPhenom_rxrx3_core_embeddings.parquet",
       f"--metadata={root}/metadata_rxrx3_core.csv", f"--out={tmp_path / 'out'}",
       f"--annotations_dir={root}/annotations", "--explore=false", "--min_entities=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  hints = [l for l in proc.stderr.splitlines() if "arm correction skipped" in l]
  assert len(hints) == 1 and "--expression=" in hints[0], proc.stderr
  assert "skipped" in json.loads(proc.stdout.splitlines()[-1])["arm_correction"]
  readme = (REPO / "README.md").read_text()
  quick = readme[readme.index("## Quick reference"):readme.index("## Model zoo")]
  recall_commands = [block for block in quick.split("python -m ")[1:]
                     if block.startswith("eval.recall")]
  assert recall_commands and all("--expression=" in c for c in recall_commands), quick
