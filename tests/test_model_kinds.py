"""Every model kind through the one stack: `python -m mae_jax.main` on shards of a screen, SIGTERM
saves, the rerun resumes onto the same losses, `eval.recall --ckpt` scores the map; the sharded
AOT compile for a TPU topology; and the WSL labels (vocabulary, exclusion, exact resume).

Each config runs with tiny overrides (the same code at a few thousand parameters).
"""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.data import input_pipeline, labels
from tests.test_compile import run_compile
from tests.test_eval_e2e import run, write_annotations, write_screen
from tests.test_train import REPO, losses, main_env, result_of, run_main

MUNET_TINY = ["--config.model.image_size=32", "--config.model.patch_size=8",
              "--config.model.base_width=8", "--config.model.levels=2",
              "--config.model.norm_groups=4"]
WSL_TINY = ["--config.model.image_size=32", "--config.model.growth_rate=8",
            "--config.model.block_config=(2,2)", "--config.model.num_init_features=16"]
# MU-Net-M and -L differ only in base_width, which MUNET_TINY sets: at tiny size they are one
# network, so one of them runs the command; both full sizes are built in tests/test_munet.py
# (parameter counts) and -L compiles sharded below.
KINDS = {"munet_l": MUNET_TINY, "wsl_densenet161": WSL_TINY}
TERMS = {"munet_l": {"mse", "fourier"}, "wsl_densenet161": {"cross_entropy", "accuracy"}}


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  root = tmp_path_factory.mktemp("screen")
  return write_screen(root, np.random.default_rng(0)), write_annotations(root / "annotations")


def sigterm_at_step_2(args, cache_dir):
  """Runs main, SIGTERM once step 2 is logged; returns its result."""
  proc = subprocess.Popen([sys.executable, "-m", "mae_jax.main", *args], cwd=REPO,
                          env=main_env(cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("step 2/"):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=300)
  finally:
    proc.kill()
  lines += out.splitlines()
  assert proc.returncode == 0, lines[-5:]
  return json.loads(lines[-1])


@pytest.mark.parametrize("name", KINDS)
def test_sigterm_resume_and_recall(name, screen, tmp_path, cache_dir):
  manifest, annotations = screen
  args = [f"--config=configs/{name}.py", *KINDS[name], f"--config.data.manifest={manifest}",
          "--config.total_steps=8", "--config.checkpoint_every=100", "--config.batch_size=8",
          "--config.log_every=1", "--config.data.num_workers=0"]
  straight = run_main([*args, f"--workdir={tmp_path / 'straight'}"], cache_dir)
  assert result_of(straight)["status"] == "done", straight.stderr[-3000:]
  want = losses(tmp_path / "straight")

  stopped = tmp_path / "stopped"
  first = sigterm_at_step_2([*args, f"--workdir={stopped}"], cache_dir)
  assert first["status"] == "preempted" and 2 <= first["step"] < 8, first
  assert (stopped / "checkpoints" / str(first["step"]) / "state").is_dir()
  second = run_main([*args, f"--workdir={stopped}"], cache_dir)
  assert result_of(second)["status"] == "done", second.stderr[-3000:]
  assert f"restored step {first['step']}" in second.stdout
  got = losses(stopped)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-5)
  record = json.loads((stopped / "metrics.jsonl").read_text().splitlines()[-1])
  assert TERMS[name] <= set(record), record  # the kind's own terms, named as such

  out_dir = tmp_path / "eval"
  out = run(["eval.recall", f"--ckpt={stopped}", f"--manifest={manifest}", f"--out={out_dir}",
             f"--annotations_dir={annotations}", "--arm_correction=false"], cache_dir)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["n_perturbations"] == 24 and set(result["sources"]) >= {"CORUM", "StringDB"}
  assert json.loads((out_dir / "recall.json").read_text()) == result


@pytest.mark.parametrize("name", ["munet_l", "wsl_densenet161"])
def test_compile_sharded_for_a_tpu_topology(name):
  """The real step, sharded over v5p-32's 16 chips (fake CPU devices), fsdp x data."""
  proc = run_compile(f"--config=configs/{name}.py", "--topology=v5p-32", *KINDS[name],
                     "--config.batch_size=32", "--config.mesh.fsdp=4", "--config.mesh.data=-1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r["config"], r["devices"], r["mesh"]) == (name, 16, {"data": 4, "fsdp": 4, "tensor": 1})
  # Parameters and moments are split 4 ways over fsdp (a little is replicated: norms, stems).
  assert r["state_bytes_per_device"] < 0.6 * r["params"] * 4 * 2


def test_label_vocabulary_controls_and_resume(screen, tmp_path, cache_dir):
  """Controls as a class or excluded; the vocabulary is kept in the workdir; a resumed run with
  other label settings is refused in one line; only labelled records are drawn."""
  manifest, _ = screen
  _, source = input_pipeline.open_dataset(manifest)
  names, controls = labels.site_labels(source, "gene", manifest)
  assert controls.sum() == 48 and {names[i] for i in np.flatnonzero(controls)} == {"EMPTY_control"}
  with_class = labels.vocabulary(names, controls, label_key="gene", controls_mode="class")
  excluded = labels.vocabulary(names, controls, label_key="gene", controls_mode="exclude")
  assert len(with_class["classes"]) == 25 and "EMPTY_control" not in excluded["classes"]
  ids = labels.encode(names, controls, excluded, manifest)
  assert (ids[controls] == -1).all() and (ids[~controls] >= 0).all()
  stream = input_pipeline.train_iterator(manifest, global_batch_size=48, crop_size=32, labels=ids)
  batch = next(stream)
  assert batch["label"].dtype == np.int32 and (batch["label"] >= 0).all()
  # A batch of 48 from the 96 non-control records: every label is one of theirs.
  assert set(batch["label"].tolist()) <= set(ids[~controls].tolist())
  with pytest.raises(labels.LabelError, match="no metadata field 'siRNA'"):
    labels.site_labels(source, "siRNA", manifest)
  source.close()

  args = ["--config=configs/wsl_densenet161.py", *WSL_TINY, f"--config.data.manifest={manifest}",
          "--config.total_steps=2", "--config.batch_size=8", "--config.data.num_workers=0",
          "--config.wsl.controls=exclude", f"--workdir={tmp_path}"]
  assert result_of(run_main(args, cache_dir))["status"] == "done"
  saved = json.loads((tmp_path / "labels.json").read_text())
  assert saved["classes"] == excluded["classes"] and saved["counts"] == [4] * 24
  assert json.loads((tmp_path / "config.json").read_text())["model"]["num_classes"] == 24
  again = run_main([*args[:-2], "--config.wsl.controls=class", f"--workdir={tmp_path}"], cache_dir)
  assert again.returncode == 2 and "Traceback" not in again.stderr
  assert again.stderr.strip().splitlines()[-1].endswith(
      "labels.json: this run classifies 'gene' with controls 'exclude'; the config asks for "
      "'gene' / 'class': use a new workdir")


def test_adabn_statistics_are_each_experiments_own(screen):
  """eval.recall --adabn: every experiment's crops are embedded with BatchNorm statistics of
  those crops alone (the stem's: exactly their mean), which moves the embeddings; a model
  without BatchNorm refuses the flag in one line."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from eval import EvalError, embed  # pylint: disable=g-import-not-at-top
  from mae_jax.models import mae, registry  # pylint: disable=g-import-not-at-top
  manifest, _ = screen
  cfg = common.get_wsl_config().model
  cfg.update(image_size=32, growth_rate=8, block_config=(2, 2), num_init_features=16,
             num_classes=5)
  with nnx.use_eager_sharding(False):
    model = registry.build_model(cfg)
  metadata = input_pipeline.site_metadata(manifest)
  experiment = np.array([m["experiment"] for m in metadata])
  mesh = embed.data_parallel_mesh()
  stats = embed.adabn_statistics(
      model, input_pipeline.eval_tiles(manifest, tile_size=32, batch_size=32), experiment, 32,
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  crops = np.concatenate([b["image"][experiment[b["site"]] == "gene-002"] for b in
                          input_pipeline.eval_tiles(manifest, tile_size=32, batch_size=32)])
  stem = np.asarray(model.conv0(mae.standardize(crops)), np.float64).reshape(-1, 16)
  np.testing.assert_allclose(np.asarray(stats["gene-002"]["norm0"]["mean"]), stem.mean(0),
                             rtol=1e-4, atol=1e-6)
  assert not np.allclose(stats["gene-001"]["norm0"]["mean"], stats["gene-002"]["norm0"]["mean"])
  plain, _ = embed.embed_manifest(model, manifest, batch_size=32, progress=False)
  adapted, _ = embed.embed_manifest(model, manifest, batch_size=32, progress=False, adabn=True)
  assert plain.shape == adapted.shape == (144, model.num_features)
  assert not np.allclose(plain, adapted)
  with nnx.use_eager_sharding(False):
    vit = registry.build_model(common.get_small_config(
        "t", image_size=32, depth=1, decoder_width=32, drop_path=0.0, lr=1e-3).model)
  with pytest.raises(EvalError, match="a MAE has none"):
    embed.embed_manifest(vit, manifest, batch_size=32, progress=False, adabn=True)
