"""`eval.embed` under jax.distributed: each process embeds its share of the wells into its own
parquet part (eval/parts.py); two local processes give the one-process table row for row."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import portpicker
import pytest

from eval import EvalError, parts, tables
from test_eval_e2e import write_screen
from test_multiprocess import REPO, env_for
from test_profiles import random_init_checkpoint


def test_split_sites_keeps_wells_whole_and_balances_sites():
  sizes = [1, 4, 2, 2, 9, 1, 1, 3, 5, 2]  # sites per well; well 4 interleaved with well 5
  meta = [{"well_id": f"w{w}"} for w, n in enumerate(sizes) for _ in range(n)]
  meta.insert(3, meta.pop())  # a site of the last well appears early: wells by first site
  for count in (1, 2, 3, 4):
    shares = parts.split_sites(meta, count)
    order = np.concatenate(shares)
    assert sorted(order.tolist()) == list(range(len(meta)))
    wells = parts.well_ids(meta)
    owner = {wells[i]: p for p, share in enumerate(shares) for i in share}
    assert all(owner[wells[i]] == p for p, share in enumerate(shares) for i in share)
    firsts = list(dict.fromkeys(wells[i] for i in order))
    assert firsts == list(dict.fromkeys(wells))  # parts in order = one-process well order
    loads = [len(s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes) + 1, (count, loads)


def _embed(args, env, tag, tmp_path):
  """Runs eval.embed once per args list (together, as one job); returns their JSON lines."""
  procs, outs = [], []
  for i, a in enumerate(args):
    out = tmp_path / f"{tag}.{i}.out"
    outs.append(out)
    with open(out, "w") as o, open(f"{out}.err", "w") as e:
      procs.append(subprocess.Popen([sys.executable, "-m", "eval.embed", *a], cwd=REPO,
                                    env=env, stdout=o, stderr=e))
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0] * len(procs), [pathlib.Path(f"{o}.err").read_text()[-2000:] for o in outs]
  return [json.loads(o.read_text().strip().splitlines()[-1]) for o in outs]


def _pair(common, port):
  return [[*common, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"] for i in range(2)]


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  root = tmp_path_factory.mktemp("screen")
  manifest = write_screen(root, np.random.default_rng(0))
  return str(manifest), random_init_checkpoint(str(root / "run"))


def test_two_processes_write_the_one_process_table(screen, tmp_path, cache_dir):
  manifest, ckpt = screen
  common = [f"--ckpt={ckpt}", f"--manifest={manifest}"]
  (single,) = _embed([[*common, f"--out={tmp_path / 'one'}"]], env_for(cache_dir, 2), "one",
                     tmp_path)
  assert single["out"].endswith("wells-00000-of-00001.parquet") and single["total_wells"] == 144

  pair = _embed(_pair([*common, f"--out={tmp_path / 'two'}"], portpicker.pick_unused_port()),
                env_for(cache_dir, 2), "two", tmp_path)
  assert [r["process"] for r in pair] == [0, 1] and not any(r["skipped"] for r in pair)
  assert [r["wells"] for r in pair] == [72, 72] and pair[0]["total_wells"] == 144
  assert all(r["crops_per_s"] > 0 for r in pair)
  index = json.loads((tmp_path / "two" / "index.json").read_text())
  assert index["parts"] == ["wells-00000-of-00002.parquet", "wells-00001-of-00002.parquet"]
  assert index["wells"] == 144 and index["settings"]["pooling"] == "mean"

  one = pd.read_parquet(tmp_path / "one" / "wells-00000-of-00001.parquet")
  two = pd.concat([pd.read_parquet(tmp_path / "two" / p) for p in index["parts"]],
                  ignore_index=True)
  meta = [c for c in one if c.startswith("Metadata_")]
  pd.testing.assert_frame_equal(one[meta], two[meta])
  np.testing.assert_allclose(two.filter(like="emb_").to_numpy(),
                             one.filter(like="emb_").to_numpy(), rtol=1e-5, atol=1e-6)
  x, got, level, _ = tables.load_embeddings(tmp_path / "two")  # what eval.recall reads
  assert level == "wells" and x.shape == (144, one.filter(like="emb_").shape[1])

  # A rerun skips both finished parts (and process 0 writes the index again).
  again = _embed(_pair([*common, f"--out={tmp_path / 'two'}"], portpicker.pick_unused_port()),
                 env_for(cache_dir, 2), "again", tmp_path)
  assert all(r["skipped"] for r in again) and again[0]["total_wells"] == 144

  # A part embedded with other settings is refused; a missing part is named.
  settings = dict(index["settings"], pooling="cls")
  with pytest.raises(EvalError, match="other settings \\(pooling\\)"):
    parts.finished(str(tmp_path / "two" / index["parts"][1]), settings)
  (tmp_path / "two" / index["parts"][1]).unlink()
  with pytest.raises(EvalError, match="1 of 2 parts missing \\(wells-00001-of-00002"):
    tables.load_embeddings(tmp_path / "two")
