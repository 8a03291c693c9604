"""End to end as a user runs it: shards -> `mae_jax.main` (tiny) -> `eval.recall --ckpt=... --manifest=...`."""
import json
import os
import subprocess
import sys

import numpy as np

from mae_jax.data import records
from test_train import main_env

GENES = [f"GENE{i:02d}" for i in range(24)]
CHANNELS = [f"w{i}" for i in range(1, 7)]


def write_screen(root, rng):
  """Two experiments, 64² uint8 sites: 2 wells per gene + 24 control wells each."""
  shards = []
  for e in ("gene-001", "gene-002"):
    path = root / f"{e}.tfrecord"
    treatments = [f"{g}_guide_{k}" for g in GENES for k in (1, 2)] + ["EMPTY_control"] * 24
    with records.ShardWriter(str(path)) as w:
      for i, t in enumerate(treatments):
        well = f"{'ABCDEFGH'[i // 12]}{i % 12 + 1:02d}"
        w.write(rng.integers(0, 255, (64, 64, 6), dtype=np.uint8), CHANNELS, {
            "well_id": f"{e}_1_{well}", "experiment": e, "plate": "1", "well": well, "site": 1,
            "perturbation": t, "gene": t.split("_guide")[0], "perturbation_type": "CRISPR",
            "is_control": t == "EMPTY_control"})
    shards.append({"path": path.name, "records": len(treatments)})
  n = sum(s["records"] for s in shards)
  records.write_manifest(str(root), {
      "format": records.FORMAT, "layout": "test", "shards": shards, "num_records": n,
      "image_shape": [64, 64, 6], "channels": CHANNELS, "dtype": "uint8",
      "channel_stats": {"mean": [127.0] * 6, "std": [73.0] * 6}, "num_wells": n,
      "experiments": ["gene-001", "gene-002"]})
  return root / "manifest.json"


def write_annotations(root):
  root.mkdir()
  ring = [(GENES[i], GENES[(i + 1) % len(GENES)]) for i in range(len(GENES))]
  for source in ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB"):
    (root / f"{source}.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in ring))
  return root


def run(args, cache_dir, **kw):
  proc = subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True,
                        env=main_env(cache_dir, devices=2), timeout=600, **kw)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_train_then_recall_from_checkpoint(tmp_path, cache_dir):
  manifest = write_screen(tmp_path, np.random.default_rng(0))
  workdir = tmp_path / "run"
  out = run(["mae_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
             f"--config.data.manifest={manifest}", "--config.total_steps=6",
             "--config.checkpoint_every=3", "--config.batch_size=8"], cache_dir)
  assert json.loads(out.stdout.strip().splitlines()[-1])["status"] == "done"

  result_dir = tmp_path / "eval"
  out = run(["eval.recall", f"--ckpt={workdir}", f"--manifest={manifest}", f"--out={result_dir}",
             f"--annotations_dir={write_annotations(tmp_path / 'ann')}", "--arm_correction=false"],
            cache_dir)
  last = json.loads(out.stdout.strip().splitlines()[-1])
  saved = json.loads((result_dir / "recall.json").read_text())
  assert last == saved
  assert saved["n_perturbations"] == len(GENES)
  for source in ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB"):
    entry = saved["sources"][source]
    assert entry["pairs"] == len(GENES)
    assert 0.0 <= entry["recall_0.05_0.95"] <= entry["recall_0.1_0.9"] <= 1.0
  for name in ("recall.csv", "recall.png"):
    assert (result_dir / name).stat().st_size > 0

  # a step folder works too, and a path that is not a checkpoint is one clear line
  step_dir = workdir / "checkpoints" / "3"
  run(["eval.recall", f"--ckpt={step_dir}", f"--manifest={manifest}", f"--out={tmp_path / 'eval3'}",
       f"--annotations_dir={tmp_path / 'ann'}", "--arm_correction=false", "--pooling=cls", "--block=1"], cache_dir)
  bad = subprocess.run([sys.executable, "-m", "eval.recall", f"--ckpt={tmp_path}", f"--manifest={manifest}",
                        f"--out={tmp_path / 'eval_bad'}"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  assert bad.stderr.startswith("eval.recall: error: "), bad.stderr
  assert not (tmp_path / "eval_bad").exists()


def test_wells_average_their_sites_in_first_seen_order():
  from eval.embed import wells_from_sites
  emb = np.arange(12, dtype=np.float32).reshape(4, 3)
  sites = [{"well_id": w, "experiment": e} for w, e in (("b", "x"), ("a", "x"), ("b", "x"), ("c", "y"))]
  wells, meta = wells_from_sites(emb, sites)
  np.testing.assert_array_equal(wells, [[3, 4, 5], [3, 4, 5], [9, 10, 11]])
  assert list(meta["well_id"]) == ["b", "a", "c"] and list(meta["experiment"]) == ["x", "x", "y"]
