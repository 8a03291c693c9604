"""copairs mean average precision in recall.json equals a direct copairs call on the same data."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from eval import map_metrics, recall

copairs_map = pytest.importorskip("copairs.map")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENES = [f"G{i:02d}" for i in range(24)]
PAIRS = [("G00", "G01"), ("G01", "G02"), ("G03", "G04"), ("G05", "G06"), ("G06", "G07"),
         ("G08", "G09"), ("G12", "G13"), ("G14", "G15")]


def tiny_wells(seed=0, dims=8):
  """2 experiments x 2 plates, each gene once per plate, 6 controls per plate; the first 12
  genes have a phenotype shared within each annotated group."""
  rng = np.random.default_rng(seed)
  centre = {g: rng.normal(size=dims) * (1.5 if i < 12 else 0) for i, g in enumerate(GENES)}
  for a, b in PAIRS:
    centre[b] = centre[a] + rng.normal(size=dims) * 0.3 if int(a[1:]) < 12 else centre[b]
  rows, x = [], []
  for e in ("gene-001", "gene-002"):
    for p in (1, 2):
      for g in GENES + ["EMPTY_control"] * 6:
        rows.append({"well_id": f"{e}_{p}_{len(rows)}", "experiment_name": e, "plate": p,
                     "gene": g, "treatment": g, "perturbation_type": "CRISPR"})
        x.append(centre.get(g, np.zeros(dims)) + rng.normal(size=dims) * 0.4)
  return np.array(x, np.float32), pd.DataFrame(rows)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  x, meta = tiny_wells()
  result = recall.score_wells(x, meta, pairs_by_source={"CORUM": PAIRS, "HuMAP": PAIRS[:5]},
                              batch_correction="none", arm_correction=False, min_entities=2,
                              map_metrics=True)
  out = tmp_path_factory.mktemp("map") / "eval"
  data = recall.write_outputs(result, out)
  return result, data, out


def test_activity_equals_a_direct_copairs_call(scored):
  result, data, out = scored
  act = data["mean_average_precision"]["activity"]
  assert (out / "map_metrics.png").stat().st_size > 0
  assert json.loads((out / "recall.json").read_text())["mean_average_precision"]["activity"] == act
  # The same wells, straight into copairs: replicates positive, same-plate controls negative.
  x, meta = tiny_wells()
  ctrl = (meta["gene"] == "EMPTY_control").to_numpy()
  prof = pd.DataFrame({"pert": meta["gene"], "plate": meta["experiment_name"] + "|" +
                       meta["plate"].astype(str)})
  prof["ref"] = np.where(ctrl, np.arange(len(prof)), -1)
  ap = copairs_map.average_precision(prof, x, ["pert", "ref"], [], ["plate"], ["pert", "ref"],
                                     progress_bar=False)
  table = copairs_map.mean_average_precision(ap[~ctrl], ["pert", "ref"],
                                             null_size=map_metrics.NULL_SIZE, threshold=0.05,
                                             seed=map_metrics.SEED, progress_bar=False)
  assert act["perturbations"] == len(GENES) == len(table)
  assert act["mean_average_precision"] == pytest.approx(table["mean_average_precision"].mean())
  assert act["fraction_retrieved"] == pytest.approx((table["corrected_p_value"] < 0.05).mean())
  assert act["negatives"] == "same-plate controls"
  assert 0.4 <= act["fraction_retrieved"] <= 0.6  # the 12 genes with a phenotype, not the rest


def test_consistency_equals_a_direct_copairs_call(scored):
  result, data, _ = scored
  cons = data["mean_average_precision"]["consistency"]
  assert set(cons) == {"CORUM", "HuMAP"}
  labels, gmap = result["_map"]["labels"], result["_map"]["embeddings"]
  index = {g: k for k, g in enumerate(labels)}
  # Connected components of the CORUM pairs: {0,1,2} {3,4} {5,6,7} {8,9} {12,13} {14,15}.
  groups = [("G00", "G01", "G02"), ("G03", "G04"), ("G05", "G06", "G07"), ("G08", "G09"),
            ("G12", "G13"), ("G14", "G15")]
  rows = [(g, k) for k, members in enumerate(groups) for g in members]
  prof = pd.DataFrame(rows, columns=["gene", "group"])
  feats = gmap[[index[g] for g, _ in rows]]
  ap = copairs_map.average_precision(prof, feats, ["group"], [], [], ["group"],
                                     progress_bar=False)
  table = copairs_map.mean_average_precision(ap, ["group"], null_size=map_metrics.NULL_SIZE,
                                             threshold=0.05, seed=map_metrics.SEED,
                                             progress_bar=False)
  c = cons["CORUM"]
  assert (c["groups"], c["genes"], c["groups_scored"]) == (6, 14, 6)
  assert c["mean_average_precision"] == pytest.approx(table["mean_average_precision"].mean())
  assert c["fraction_retrieved"] == pytest.approx((table["corrected_p_value"] < 0.05).mean())
  assert cons["HuMAP"]["groups"] == 3  # {0,1,2}, {3,4} and {5,6,7}


def test_large_components_are_left_out_and_missing_copairs_is_recorded(monkeypatch):
  rng = np.random.default_rng(1)
  labels = GENES
  x = rng.normal(size=(len(labels), 4))
  chain = [(GENES[i], GENES[i + 1]) for i in range(10)]  # one component of 11 genes
  summary, _ = map_metrics.consistency(labels, x, chain + [("G20", "G21")], max_group=5)
  assert summary["large_components_left_out"] == 1 and summary["genes_in_large_components"] == 11
  assert "skipped" in summary  # one group of <= 5 genes is left
  monkeypatch.setattr(map_metrics, "available", lambda: False)
  assert map_metrics.evaluate(labels, x, {"CORUM": chain}) == {
      "skipped": "copairs not installed: pip install -e .[profiling]"}


def test_cli_writes_the_key_and_the_figure(tmp_path):
  x, meta = tiny_wells()
  emb = pd.DataFrame(x, columns=[f"feature_{k}" for k in range(x.shape[1])])
  emb.insert(0, "well_id", meta["well_id"])
  emb.to_parquet(tmp_path / "emb.parquet", index=False)
  meta.to_csv(tmp_path / "meta.csv", index=False)
  ann = tmp_path / "ann"
  ann.mkdir()
  (ann / "CORUM.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in PAIRS))
  base = [sys.executable, "-m", "eval.recall", f"--embeddings={tmp_path}/emb.parquet",
          f"--metadata={tmp_path}/meta.csv", f"--annotations_dir={ann}", "--sources=CORUM",
          "--min_entities=2", "--explore=false", "--batch_key=experiment_name"]
  proc = subprocess.run(base + [f"--out={tmp_path}/on"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  data = json.loads((tmp_path / "on" / "recall.json").read_text())
  assert data["mean_average_precision"]["activity"]["perturbations"] == len(GENES)
  assert (tmp_path / "on" / "map_metrics.png").exists()
  off = recall.score_wells(x, meta, pairs_by_source={"CORUM": PAIRS}, batch_correction="none",
                           arm_correction=False, min_entities=2)  # in-process default: off
  assert "mean_average_precision" not in off
