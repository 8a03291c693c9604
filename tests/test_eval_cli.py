"""`python -m eval.recall --embeddings` end to end on a tiny screen in the RxRx3-core format."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from eval import aggregate, recall, tables
from mae_jax.data import resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RXRX3_COLUMNS = ["well_id", "experiment_name", "plate", "address", "gene", "treatment",
                 "SMILES", "concentration", "perturbation_type", "cell_type"]
SMILES = 'CC(=O)Oc1ccccc1C(=O)O |c:1,3,r:2|'  # a CXSMILES block with commas


def _genes(n):
  arms = resources.gene_arms()
  on_1p = sorted(g for g, a in arms.items() if a == "chr1p")[:n // 2]
  on_19q = sorted(g for g, a in arms.items() if a == "chr19q")[:n - n // 2]
  return on_1p + on_19q


def write_rxrx3_core(root, seed=0, n_genes=40, dims=384):
  """OpenPhenom-style parquet + metadata_rxrx3_core.csv + a tiny annotation folder."""
  rng = np.random.default_rng(seed)
  genes = _genes(n_genes)
  # related genes (consecutive pairs) share a phenotype in a 12-d subspace of the features
  basis = rng.standard_normal((12, dims))
  pheno = {}
  for k in range(0, n_genes, 2):
    shared = rng.standard_normal(12) * 3
    pheno[genes[k]] = shared @ basis
    pheno[genes[k + 1]] = (shared + rng.standard_normal(12)) @ basis
  rows, feats = [], []
  for e, exp in enumerate(["gene-001", "gene-002", "compound-001"]):
    shift, scale = rng.standard_normal(dims) * 4, rng.uniform(0.5, 2.0, dims)
    plate_wells = []
    if exp.startswith("gene"):
      plate_wells += [("EMPTY_control", "EMPTY_control", "", np.nan, "CRISPR")] * 140
      plate_wells += [("CRISPR_control", "CRISPR_control", "", np.nan, "CRISPR")] * 6
      plate_wells += [(g, f"{g}_guide_{k}", "", np.nan, "CRISPR") for g in genes
                      for k in (1, 2)]
    else:
      plate_wells += [("EMPTY_control", "EMPTY_control", "", np.nan, "COMPOUND")] * 140
      plate_wells += [("", "CPD_A", SMILES, c, "COMPOUND") for c in (0.1, 1.0) for _ in range(3)]
      plate_wells += [("", "DMSO_control", "", 0.0, "COMPOUND")] * 4
    for w, (gene, treat, smi, conc, ptype) in enumerate(plate_wells):
      row, col = divmod(w, 48)
      address = ("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[row] if row < 26 else "A" + "ABCDEF"[row - 26])
      address += f"{col + 1:02d}"
      signal = pheno.get(gene, np.zeros(dims))
      rows.append([f"{exp}_{1 + w % 2}_{address}", exp, 1 + w % 2, address, gene, treat, smi,
                   conc, ptype, "HUVEC"])
      feats.append((signal + rng.standard_normal(dims)) * scale + shift)
  meta = pd.DataFrame(rows, columns=RXRX3_COLUMNS)
  x = np.array(feats, np.float32)
  emb = pd.DataFrame(x, columns=[f"feature_{k}" for k in range(dims)])
  emb.insert(0, "well_id", meta["well_id"])
  emb = pd.concat([emb, emb.iloc[:5]], ignore_index=True)  # repeated well_ids get mean-reduced
  os.makedirs(root, exist_ok=True)
  emb.to_parquet(os.path.join(root, "OpenPhenom_rxrx3_core_embeddings.parquet"), index=False)
  meta.to_csv(os.path.join(root, "metadata_rxrx3_core.csv"), index=False)
  ann = os.path.join(root, "annotations")
  os.makedirs(ann)
  related = [(genes[k], genes[k + 1]) for k in range(0, n_genes, 2)]
  for src in resources.SOURCES:
    pairs = related[:3] if src == "SIGNOR" else related + [(genes[0], "NOT_IN_MAP")]
    with open(os.path.join(ann, f"{src}.txt"), "w") as f:
      f.write("entity1,entity2\n" + "".join(f"{b},{a}\n" for a, b in pairs))
  return root, genes


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  return write_rxrx3_core(str(tmp_path_factory.mktemp("rxrx3_core")))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "eval.recall", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_rxrx3_core(screen, tmp_path):
  root, genes = screen
  out = tmp_path / "out"
  proc = _cli(f"--embeddings={root}/OpenPhenom_rxrx3_core_embeddings.parquet",
              f"--metadata={root}/metadata_rxrx3_core.csv", f"--out={out}",
              f"--annotations_dir={root}/annotations", "--batch_key=experiment_name")
  assert proc.returncode == 0, proc.stderr
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert last == json.loads((out / "recall.json").read_text())
  assert last["n_perturbations"] == len(genes) + 2  # genes + CPD_A at two concentrations
  assert set(last["sources"]) == set(resources.SOURCES)
  corum = last["sources"]["CORUM"]
  assert corum["pairs"] == len(genes) // 2
  assert corum["recall_0.05_0.95"] > 0.5 and corum["recall_0.1_0.9"] > 0.5  # chance: 0.1/0.2
  assert last["sources"]["SIGNOR"]["recall_0.1_0.9"] is None
  assert "fewer than 20" in last["sources"]["SIGNOR"]["skipped"]
  assert last["batch_correction"]["method"] == "tvn" and last["batch_correction"]["coral"]
  assert last["arm_correction"]["mode"] is None  # no --expression: skipped unless asked for
  assert "no expression table" in last["arm_correction"]["skipped"]
  assert sorted(p.name for p in out.iterdir()) == ["gene_embeddings.npz",
                                                   "gene_embeddings.parquet", "map.html",
                                                   "map_metrics.png", "recall.csv", "recall.json",
                                                   "recall.png"]
  with np.load(out / "gene_embeddings.npz") as z:
    labels = list(z["labels"])
    assert z["embeddings"].shape[0] == len(labels)
  assert {"CPD_A@0.1", "CPD_A@1"} <= set(labels)
  assert not any("control" in v for v in labels)
  csv = pd.read_csv(out / "recall.csv")
  assert list(csv["source"]) == list(resources.SOURCES)
  assert (out / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "keeping" in proc.stderr  # 280 controls for 384 dims: the component guard warned


def test_cli_user_errors_one_line(screen, tmp_path):
  root, _ = screen
  base = [f"--metadata={root}/metadata_rxrx3_core.csv", f"--annotations_dir={root}/annotations"]
  emb = f"--embeddings={root}/OpenPhenom_rxrx3_core_embeddings.parquet"
  cases = [
      ([emb, f"--out={tmp_path}/a", "--batch_correction=zca"] + base, "batch_correction"),
      ([f"--embeddings={tmp_path}/missing.parquet", f"--out={tmp_path}/b"] + base, "not found"),
      ([emb, f"--out={tmp_path}/d", "--sources=CORUM,SIGNOR"] + base, "SIGNOR"),
  ]
  for args, needle in cases:
    proc = _cli(*args)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval.recall: error: "), proc.stderr
    assert needle in err[0], proc.stderr
    assert not any(p.name.startswith(".") or p.suffix for p in tmp_path.glob("*/*"))


def test_read_rxrx3_core_tables(screen):
  root, genes = screen
  x, meta, level, notes = tables.load_embeddings(
      f"{root}/OpenPhenom_rxrx3_core_embeddings.parquet", f"{root}/metadata_rxrx3_core.csv")
  raw = pd.read_parquet(f"{root}/OpenPhenom_rxrx3_core_embeddings.parquet")
  assert level == "wells" and not notes and x.shape == (raw["well_id"].nunique(), 384)
  assert {"experiment", "well", "perturbation", "smiles", "concentration"} <= set(meta.columns)
  first = raw["well_id"].iloc[0]
  np.testing.assert_allclose(x[meta["well_id"].to_numpy() == first][0],
                             raw[raw["well_id"] == first].iloc[:, 1:].mean().to_numpy(),
                             rtol=1e-6)
  assert meta.loc[meta["perturbation"] == "CPD_A", "smiles"].iloc[0] == SMILES
  assert aggregate.canonical_perturbation("TP53_guide_3") == "TP53"
  assert aggregate.canonical_perturbation("CRISPR_control") == "CRISPR_control"


def test_score_wells_in_process_methods(screen):
  root, genes = screen
  x, meta, _, _ = tables.load_embeddings(f"{root}/OpenPhenom_rxrx3_core_embeddings.parquet",
                                         f"{root}/metadata_rxrx3_core.csv")
  x = x[:, :64]  # the first 64 OpenPhenom features keep the eigh calls small
  pairs = {s: resources.load_relationships(s, f"{root}/annotations") for s in ("CORUM",)}
  with pytest.raises(tables.TableError, match="batch key column 'donor' not in the metadata"):
    recall.score_wells(x, meta, batch_key="donor", pairs_by_source=pairs)
  scores = {}
  for method in ("none", "tvn", "pca_centerscale"):
    res = recall.score_wells(x, meta, batch_correction=method, pairs_by_source=pairs,
                             perturbation_types=["CRISPR"], arm_correction=False)
    assert res["n_perturbations"] == len(genes) and res["batch_correction"]["method"] == method
    scores[method] = res["sources"]["CORUM"]["recall_0.1_0.9"]
  assert scores["tvn"] >= scores["none"] and scores["pca_centerscale"] >= scores["none"]
  # a map table (one row per perturbation) with expression: unexpressed-gene arm centring.
  # The screen has 20 genes on chr1p and 20 on chr19q; 10 more chr1p genes give that arm 30,
  # 22 of them unexpressed (> 20: centred), while chr19q's 20 are not > 20 (left alone).
  arms = resources.gene_arms()
  extra = sorted(g for g, a in arms.items() if a == "chr1p")[20:30]
  assert not set(extra) & set(genes)
  labels = genes + extra
  on_1p = np.array([arms[g] == "chr1p" for g in labels])
  expr = {g: (2.0 if g in extra[:8] else -5.0) for g in labels}  # 22 of chr1p unexpressed
  basis = np.array([on_1p[k] and expr[g] < -3 for k, g in enumerate(labels)])
  rng = np.random.default_rng(0)
  gmap = rng.standard_normal((len(labels), 8))
  gmap[on_1p] += rng.standard_normal(8) * 5  # an arm-wide offset (proximity bias)
  res = recall.score_map(labels, gmap, pairs_by_source=pairs, expression=expr, min_entities=2)
  arm = res["arm_correction"]
  assert arm["mode"] == "unexpressed" and arm["arms_with_genes"] == 2
  assert arm["arms_corrected"] == 1 and arm["genes_corrected"] == 30
  assert arm["arm_mates_before"] > 0.5 and abs(arm["arm_mates_after"]) < 0.2
  assert res["sources"]["CORUM"]["pairs"] == len(genes) // 2
  got = res["_map"]["embeddings"]
  want = gmap.copy()
  want[on_1p] -= gmap[basis].mean(axis=0)  # the offset is gone with the basis mean
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(got[~on_1p], gmap[~on_1p].astype(np.float32))
  res = recall.score_map(labels, gmap, pairs_by_source=pairs, arm_correction=True)
  assert res["arm_correction"]["mode"] == "all_genes"
  assert res["arm_correction"]["arms_corrected"] == 1  # chr1p's 30; chr19q's 20 is not > 20
  want = gmap.copy()
  want[on_1p] -= gmap[on_1p].mean(axis=0)
  np.testing.assert_allclose(res["_map"]["embeddings"], want, atol=1e-5)


def test_map_tables_npz_and_csv(tmp_path):
  rng = np.random.default_rng(1)
  genes = _genes(30)
  x = rng.standard_normal((30, 6)).astype(np.float32)
  np.savez(tmp_path / "map.npz", embeddings=x, labels=np.array(genes))
  pd.DataFrame({"gene": genes, **{f"emb_{k}": x[:, k] for k in range(6)}}).to_csv(
      tmp_path / "map.csv", index=False)
  for name in ("map.npz", "map.csv"):
    got, meta, level, _ = tables.load_embeddings(tmp_path / name)
    assert level == "perturbations" and list(meta["perturbation"]) == genes
    np.testing.assert_allclose(got, x, rtol=1e-6)
  with pytest.raises(tables.TableError, match="no well_id column to join"):
    tables.load_embeddings(tmp_path / "map.csv", tmp_path / "map.csv")
  np.savez(tmp_path / "bad.npz", other=x)
  with pytest.raises(tables.TableError, match="bad.npz: no 2-D array"):
    tables.load_embeddings(tmp_path / "bad.npz")


class _Flags(dict):
  """Stands in for absl FlagValues in `recall.run` (attribute access + flag.present)."""

  def __getattr__(self, name):
    return dict.__getitem__(self, name)

  def __getitem__(self, name):
    if name == "sources":
      return type("F", (), {"present": False})()
    return dict.__getitem__(self, name)


def test_ckpt_branch_calls_embed_wells(screen, tmp_path, monkeypatch):
  root, genes = screen
  x, meta, _, _ = tables.load_embeddings(f"{root}/OpenPhenom_rxrx3_core_embeddings.parquet",
                                         f"{root}/metadata_rxrx3_core.csv")
  calls = []

  def fake_embed_wells(ckpt, manifest, **kw):
    calls.append((ckpt, manifest, kw))
    return x[:, :32], meta

  import eval.embed  # noqa: F401  (the real module; only embed_wells is replaced)
  monkeypatch.setattr("eval.embed.embed_wells", fake_embed_wells)
  f = _Flags(out=str(tmp_path / "o"), embeddings=None, metadata=None, ckpt="/w/ckpt",
             manifest="/d/manifest.json", pooling="cls", block=3, batch_size=16, adabn=True,
             explore=False, batch_correction="tvn", coral=True, batch_key="experiment", control="EMPTY_control",
             arm_correction=None, expression=None, sources=["CORUM"],
             annotations_dir=f"{root}/annotations", aggregation="median",
             perturbation_types=["CRISPR"], min_entities=20, title="ckpt test",
             control_query=None, feature_select=[], blocklist=None, spherize_epsilon=1e-6,
             spherize_method="ZCA-cor", perturbation_key=None, map_metrics=False)
  data = recall.run(f)
  assert calls == [("/w/ckpt", "/d/manifest.json",
                    {"pooling": "cls", "block": 3, "batch_size": 16, "adabn": True})]
  assert data["n_perturbations"] == len(genes) and data["settings"]["aggregation"] == "median"
  assert (tmp_path / "o" / "recall.json").exists()
