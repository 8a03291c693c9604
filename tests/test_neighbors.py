"""`python -m eval.neighbors`: nearest genes with their sources, top unannotated pairs, and their
precision against withheld pairs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eval import EvalError, neighbors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENES = [f"G{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory):
  """Three tight groups (G00-G03, G04-G07, G08-G11); only G00-G01 and G04-G05 are annotated,
  the pairs of the second group are withheld."""
  root = tmp_path_factory.mktemp("nb")
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 6)) * 3
  x = np.concatenate([centres[k] + rng.normal(size=(4, 6)) * 0.1 for k in range(3)])
  (root / "eval").mkdir()
  np.savez(root / "eval" / "gene_embeddings.npz", labels=np.array(GENES), embeddings=x)
  truth = root / "ground_truth"
  (truth / "annotations").mkdir(parents=True)
  for src in ("CORUM", "HuMAP"):
    (truth / "annotations" / f"{src}.txt").write_text(
        "entity1,entity2\nG00,G01\n" + ("G04,G05\n" if src == "HuMAP" else ""))
  held = [(a, b) for i, a in enumerate(GENES[4:8]) for b in GENES[4 + i + 1:8]]
  (truth / "withheld_pairs.csv").write_text(
      "entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in held if (a, b) != ("G04", "G05")))
  return root


def test_nearest_genes_name_their_sources(map_dir):
  labels, x = GENES, np.load(map_dir / "eval" / "gene_embeddings.npz")["embeddings"]
  rows = neighbors.nearest(labels, x, "G00", 3, ["CORUM", "HuMAP"], map_dir / "ground_truth" /
                           "annotations")
  assert {r["gene"] for r in rows} == {"G01", "G02", "G03"}
  assert next(r for r in rows if r["gene"] == "G01")["sources"] == ["CORUM", "HuMAP"]
  with pytest.raises(EvalError, match="did you mean G00"):
    neighbors.nearest(labels, x, "g00", 3, ["CORUM"], map_dir / "ground_truth" / "annotations")


def test_top_pairs_and_withheld_precision_from_the_command(map_dir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "eval.neighbors", f"--map={map_dir / 'eval'}",
                         "--top_pairs=16", "--sources=CORUM,HuMAP", f"--out={tmp_path}",
                         f"--annotations_dir={map_dir / 'ground_truth' / 'annotations'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  data = json.loads(proc.stdout.strip().splitlines()[-1])
  pairs = {(r["gene1"], r["gene2"]) for r in data["pairs"]}
  # 3 groups x 6 within-group pairs, less the 2 annotated ones: exactly the 16 most similar.
  assert len(pairs) == 16 and ("G00", "G01") not in pairs and ("G04", "G05") not in pairs
  assert all(a[:2] == b[:2] or int(a[1:]) // 4 == int(b[1:]) // 4 for a, b in pairs)
  w = data["withheld"]  # found beside --annotations_dir
  assert (w["hits"], w["withheld_pairs_in_map"], w["precision"]) == (5, 5, round(5 / 16, 4))
  assert w["expected_random_precision"] == round(5 / (66 - 2), 4)
  assert (tmp_path / "top_pairs.csv").read_text().startswith("rank,gene1,gene2,cosine\n")
  proc = subprocess.run([sys.executable, "-m", "eval.neighbors", f"--map={tmp_path / 'nope'}",
                         "--gene=G00"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
  assert proc.stderr.startswith("eval.neighbors: error: ") and "no such eval directory" in proc.stderr
