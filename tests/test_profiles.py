"""Profile tables in and out (eval/profiles.py, eval.embed, eval.recall --embeddings) and the
pycytominer normalisations (eval/normalize.py), checked against pycytominer itself."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from eval import normalize, profiles, recall, tables
from test_eval_e2e import GENES, write_annotations, write_screen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = dict(arm_correction=False, batch_key="experiment")


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def random_init_checkpoint(workdir):
  """configs/tiny.py (32² crops) at random init as WORKDIR/{config.json, checkpoints/0}."""
  from configs import tiny
  from mae_jax.weights import transfer
  config = tiny.get_config()
  config.model.image_size = 32
  return transfer.save_random_init(config, workdir)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  root = tmp_path_factory.mktemp("screen")
  manifest = write_screen(root, np.random.default_rng(0))
  ckpt = random_init_checkpoint(str(root / "run"))
  return root, str(manifest), ckpt, write_annotations(root / "ann")


def test_embed_cli_parquet_round_trip_gives_the_same_recall(screen, tmp_path):
  root, manifest, ckpt, ann = screen
  out = tmp_path / "wells.parquet"
  got, _ = _run("eval.embed", f"--ckpt={ckpt}", f"--manifest={manifest}", f"--out={out}")
  assert got["wells"] == 2 * (2 * len(GENES) + 24) and got["control_wells"] == 48
  df = pd.read_parquet(out)
  meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
  assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site_Count", "Metadata_Perturbation",
          "Metadata_Gene", "Metadata_Batch", "Metadata_pert_type"} <= set(meta_cols)
  assert df.columns[len(meta_cols)] == "emb_0000" and list(df.columns[:len(meta_cols)]) == meta_cols
  assert set(df["Metadata_pert_type"]) == {"trt", "negcon"}
  assert (df["Metadata_Site_Count"] == 1).all()

  # the same checkpoint through eval.recall --ckpt, and the parquet as --embeddings reads it
  a, _ = _run("eval.recall", f"--ckpt={ckpt}", f"--manifest={manifest}", f"--out={tmp_path / 'a'}",
              f"--annotations_dir={ann}", "--arm_correction=false", "--explore=false")
  x, meta, level, _ = tables.load_embeddings(out)
  assert level == "wells"
  parts = tmp_path / "parts"  # --out=DIR: its parts read back as one table
  parts.mkdir()
  shutil.copy(out, parts / "wells-00000-of-00001.parquet")
  x_dir, meta_dir, _, _ = tables.load_embeddings(parts)
  np.testing.assert_array_equal(x_dir, x)
  assert list(meta_dir["well_id"]) == list(meta["well_id"])
  b = recall.public(recall.score_wells(x, meta, **dict(OPTS, annotations_dir=str(ann))))
  assert a["n_wells"] == b["n_wells"] and a["n_perturbations"] == b["n_perturbations"]
  for src in a["sources"]:
    for key in ("recall_0.05_0.95", "recall_0.1_0.9"):
      assert a["sources"][src][key] == pytest.approx(b["sources"][src][key], abs=1e-6)
  gene_map = pd.read_parquet(tmp_path / "a" / "gene_embeddings.parquet")
  with np.load(tmp_path / "a" / "gene_embeddings.npz") as z:
    assert list(gene_map["Metadata_Perturbation"]) == list(z["labels"])
    np.testing.assert_array_equal(gene_map.filter(like="emb_").to_numpy(), z["embeddings"])
  x, meta, level, _ = tables.load_embeddings(tmp_path / "a" / "gene_embeddings.parquet")
  assert level == "perturbations" and x.shape[0] == len(GENES)


def _profile_table(rng, n_genes=24, dims=16, controls=30):
  """Well-level profiles in two plates; genes k and k+1 share a phenotype."""
  genes = [f"G{k:02d}" for k in range(n_genes)]
  basis = rng.standard_normal((4, dims))
  pheno = {}
  for k in range(0, n_genes, 2):
    z = rng.standard_normal(4) * 3
    pheno[genes[k]], pheno[genes[k + 1]] = z @ basis, (z + rng.standard_normal(4) * 0.3) @ basis
  rows, feats = [], []
  for plate in ("P1", "P2"):
    shift, scale = rng.standard_normal(dims) * 3, rng.uniform(0.5, 2, dims)
    wells = [("DMSO", "negcon")] * controls + [(g, "trt") for g in genes for _ in range(2)]
    for w, (g, kind) in enumerate(wells):
      rows.append((plate, f"W{w:03d}", g, kind))
      feats.append((pheno.get(g, np.zeros(dims)) + rng.standard_normal(dims)) * scale + shift)
  meta = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Gene",
                                     "Metadata_pert_type"])
  x = pd.DataFrame(np.array(feats, np.float32), columns=profiles.feature_names(dims))
  pairs = {"CORUM": [(genes[k], genes[k + 1]) for k in range(0, n_genes, 2)]}
  return pd.concat([meta, x], axis=1), pairs


def test_metadata_columns_are_never_features(tmp_path):
  df, pairs = _profile_table(np.random.default_rng(1))
  df = df.rename(columns=lambda c: c.replace("emb_", "Cells_Intensity_"))
  with_site = df.copy()
  with_site.insert(2, "Metadata_Site", np.random.default_rng(2).integers(1, 1000, len(df)))
  with_site.to_parquet(tmp_path / "a.parquet")
  df.to_parquet(tmp_path / "b.parquet")
  xa, ma, level, _ = tables.load_embeddings(tmp_path / "a.parquet")
  xb, mb, _, _ = tables.load_embeddings(tmp_path / "b.parquet")
  assert level == "wells" and xa.shape == xb.shape and "Metadata_Site" in ma
  assert all(n.startswith("Cells_") for n in ma.attrs["feature_names"])
  opts = dict(OPTS, pairs_by_source=pairs, control_query="Metadata_pert_type == 'negcon'",
              batch_key="Metadata_Plate", min_entities=4)
  ra, rb = recall.score_wells(xa, ma, **opts), recall.score_wells(xb, mb, **opts)
  assert ra["sources"]["CORUM"] == rb["sources"]["CORUM"]
  np.testing.assert_array_equal(ra["_map"]["embeddings"], rb["_map"]["embeddings"])
  assert ra["sources"]["CORUM"]["recall_0.1_0.9"] > 0.5
  # the column, were it a feature (site numbers in the thousands), would swamp the profiles
  xs = np.concatenate([xa, 10 * with_site[["Metadata_Site"]].to_numpy(np.float32)], axis=1)
  opts["batch_correction"] = "none"
  rs, rm = recall.score_wells(xs, ma, **opts), recall.score_wells(xa, ma, **opts)
  assert rs["sources"]["CORUM"]["recall_0.05_0.95"] < rm["sources"]["CORUM"]["recall_0.05_0.95"]


def test_jump_style_parquet_scores_from_the_command_line(tmp_path):
  """Site-level rows (Metadata_Site), JCP2022 ids, Cells_/Nuclei_ features with NaN columns."""
  df, pairs = _profile_table(np.random.default_rng(3), dims=20)
  ids = {g: f"JCP2022_{k:06d}" for k, g in enumerate(sorted(set(df["Metadata_Gene"])))}
  df.insert(2, "Metadata_JCP2022", df.pop("Metadata_Gene").map(ids))
  feats = df.filter(like="emb_").to_numpy()
  names = [f"{'Cells' if k % 2 else 'Nuclei'}_AreaShape_{k}" for k in range(feats.shape[1])]
  sites = []
  for s in (1, 2):  # two sites per well: the reader averages them
    part = df.drop(columns=df.filter(like="emb_").columns)
    part.insert(2, "Metadata_Site", s)
    part.insert(3, "Metadata_Source", "source_1")
    noise = np.random.default_rng(s).standard_normal(feats.shape) * 0.1
    sites.append(pd.concat([part, pd.DataFrame(feats + noise, columns=names)], axis=1))
  table = pd.concat(sites, ignore_index=True)
  table["Cells_Constant"] = 1.0  # removed by variance_threshold
  table["Nuclei_Copy"] = table[names[0]] * 2 + 1  # removed by correlation_threshold
  table["Image_Missing"] = np.nan  # dropped on reading, with a warning
  path = tmp_path / "jump.parquet"
  table.to_parquet(path)
  ann = tmp_path / "ann"
  ann.mkdir()
  (ann / "CORUM.txt").write_text("entity1,entity2\n" + "".join(
      f"{ids[a]},{ids[b]}\n" for a, b in pairs["CORUM"]))
  out, err = _run("eval.recall", f"--embeddings={path}", f"--out={tmp_path / 'out'}",
                  f"--annotations_dir={ann}", "--sources=CORUM", "--min_entities=4",
                  "--perturbation_key=Metadata_JCP2022", "--batch_key=Metadata_Plate",
                  "--control_query=Metadata_pert_type == 'negcon'",
                  "--batch_correction=mad_robustize",
                  "--feature_select=variance_threshold,correlation_threshold",
                  "--arm_correction=false", "--explore=false")
  assert out["n_wells"] == len(df) and out["n_perturbations"] == len(ids) - 1
  bc = out["batch_correction"]
  assert bc["method"] == "mad_robustize" and bc["control_wells"] == 60
  dropped = bc["feature_select"]["dropped"]
  assert dropped["variance_threshold"] == 1 and dropped["correlation_threshold"] >= 1
  assert out["sources"]["CORUM"]["recall_0.1_0.9"] > 0.5
  assert "1 of 23 feature columns have missing" in err


def test_skipped_sources_are_reported_with_their_counts():
  df, pairs = _profile_table(np.random.default_rng(4))
  x, meta = df.filter(like="emb_").to_numpy(), profiles.standardise(df.drop(
      columns=df.filter(like="emb_").columns))
  pairs["SIGNOR"] = pairs["CORUM"][:2]
  res = recall.score_wells(x, meta, **dict(OPTS, pairs_by_source=pairs, min_entities=6,
                                           batch_key="Metadata_Plate",
                                           control_query="Metadata_pert_type == 'negcon'"))
  assert res["skipped_sources"] == {"min_entities": 6, "entities": {"SIGNOR": 4}}
  assert res["sources"]["SIGNOR"]["recall_0.1_0.9"] is None
  assert res["sources"]["CORUM"]["recall_0.1_0.9"] is not None


# ------------------------------------------------------------------ against pycytominer

def _frame(rng, n=60, d=8):
  x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d) * 5
  df = pd.DataFrame(x, columns=[f"Cells_F{k}" for k in range(d)])
  df.insert(0, "Metadata_pert_type", np.where(np.arange(n) % 3 == 0, "negcon", "trt"))
  return df


def test_mad_robustize_matches_pycytominer():
  pycytominer = pytest.importorskip("pycytominer")
  df = _frame(np.random.default_rng(5))
  want = pycytominer.normalize(df, features="infer", samples="Metadata_pert_type == 'negcon'",
                               method="mad_robustize")
  ctrl = (df["Metadata_pert_type"] == "negcon").to_numpy()
  got, _ = normalize.mad_robustize(df.filter(like="Cells_").to_numpy(), ctrl)
  np.testing.assert_allclose(got, want.filter(like="Cells_").to_numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,method", [(60, "ZCA-cor"), (60, "ZCA"), (9, "ZCA-cor")])
def test_spherize_matches_pycytominer(n, method):  # more controls than features, and fewer
  pycytominer = pytest.importorskip("pycytominer")
  df = _frame(np.random.default_rng(6), n=3 * n, d=12)
  want = pycytominer.normalize(df, features="infer", samples="Metadata_pert_type == 'negcon'",
                               method="spherize", spherize_epsilon=1e-6, spherize_method=method)
  ctrl = (df["Metadata_pert_type"] == "negcon").to_numpy()
  got, _ = normalize.spherize(df.filter(like="Cells_").to_numpy(), ctrl, epsilon=1e-6,
                              method=method)
  np.testing.assert_allclose(got, want.filter(like="Cells_").to_numpy(), rtol=1e-4, atol=1e-4)
  if n > 12:  # whitened controls
    np.testing.assert_allclose(np.cov(got[ctrl].T), np.eye(12), atol=1e-3)


def test_feature_select_matches_pycytominer(tmp_path):
  pycytominer = pytest.importorskip("pycytominer")
  rng = np.random.default_rng(7)
  df = _frame(rng, d=10)
  df["Cells_Const"] = 3.0
  df["Cells_Twin"] = df["Cells_F1"] * 2 + rng.standard_normal(len(df)) * 0.01
  df["Nuclei_Anti"] = -df["Cells_F2"]  # negatively correlated: kept, as pycytominer does
  df["Nuclei_Gappy"] = np.where(np.arange(len(df)) % 4 == 0, np.nan, 1.0 * np.arange(len(df)))
  df["Cytoplasm_Blocked"] = rng.standard_normal(len(df))
  ops = ["variance_threshold", "drop_na_columns", "correlation_threshold", "blocklist"]
  want = pycytominer.feature_select(df, operation=ops, blocklist=["Cytoplasm_Blocked"])
  names = [c for c in df.columns if not c.startswith("Metadata_")]
  keep, info = normalize.feature_select(df[names].to_numpy(), ops, names,
                                        blocklist=["Cytoplasm_Blocked"])
  assert sorted(np.asarray(names)[keep]) == sorted(c for c in want.columns
                                                   if not c.startswith("Metadata_"))
  assert info["features_after"] == len(keep) < len(names)
