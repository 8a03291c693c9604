"""The synthetic screen: planted biology, batch effects, arm proximity, layout, determinism."""
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from data_prep import phenotypes, render, styles, synthetic
from eval import benchmarks
from mae_jax.util import cli


def known_relationship_recall(x, labels, pairs, **options):
  """Recall of one source, which must have enough genes in the map."""
  return benchmarks.relationship_recall(x, labels, {"S": pairs}, strict=True,
                                        **options)["sources"]["S"]


SMALL = ["--genes=40", "--guides=2", "--experiments=2", "--plates=3", "--controls_per_plate=10",
         "--image_size=256", "--seed=3"]


def _run(out, extra=(), capsys=None):
  synthetic.main([f"--out={out}", *SMALL, *extra])
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth") / "screen"
  synthetic.main([f"--out={out}", *SMALL, "--workers=2"])
  return out


@pytest.fixture(scope="module")
def default_biology():
  """Genes and latents of the default screen (300 genes, 2 experiments x 3 guides), no pixels."""
  rng_genes, rng_latent, _, _, rng_wells = [np.random.default_rng(s)
                                            for s in np.random.SeedSequence(0).spawn(5)]
  gs = phenotypes.select_genes(300, rng_genes)
  ph = phenotypes.gene_phenotypes(gs, rng_latent)
  well_genes = [g for g in gs.genes for _ in range(2) for _ in range(3)]
  well_guides = [k for _ in gs.genes for _ in range(2) for k in range(3)]
  wells = phenotypes.well_latents(ph, well_genes, well_guides, rng_wells)
  gene_means = wells.reshape(len(gs.genes), 6, -1).mean(axis=1)
  return gs, ph, gene_means


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _tree_digest(root):
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_planted_pairs_are_recalled_and_random_pairs_are_not(default_biology):
  gs, _, gene_means = default_biology
  planted = [(a, b) for a, b, _, _ in phenotypes.planted_pairs(gs)]
  res = known_relationship_recall(gene_means, gs.genes, planted)
  assert res["pairs"] == len(planted) > 200
  assert res["recall_0.05_0.95"] >= 0.8, res
  rng = np.random.default_rng(0)
  random_pairs = {tuple(sorted(rng.choice(gs.genes, 2, replace=False))) for _ in range(4000)}
  res = known_relationship_recall(gene_means, gs.genes, sorted(random_pairs - set(planted)))
  assert 0.05 < res["recall_0.05_0.95"] < 0.16, res
  assert 0.13 < res["recall_0.1_0.9"] < 0.27, res


def test_every_source_is_measurable_and_corum_signor_plant_nothing(default_biology):
  gs = default_biology[0]
  coverage = phenotypes.benchmark_coverage(gs.genes)
  for source, c in coverage.items():
    assert c["genes"] >= 20, (source, c)
  assert {m.source for m in gs.modules} == {"HuMAP", "Reactome", "StringDB"}
  assert sum(not e for e in gs.expressed.values()) == 75
  assert all(gs.zfpkm[g] < -3 for g in gs.genes if not gs.expressed[g])
  assert all(gs.zfpkm[g] >= -3 for g in gs.genes if gs.expressed[g])


def test_arm_mates_are_similar_until_arm_correction(default_biology):
  gs, ph, gene_means = default_biology
  arms = np.array([gs.arm[g] for g in gs.genes])
  expressed = np.array([gs.expressed[g] for g in gs.genes])
  unit = gene_means / np.linalg.norm(gene_means, axis=1, keepdims=True)
  share_module = ph.membership.astype(float) @ ph.membership.T.astype(float) > 0
  i, j = np.triu_indices(len(gs.genes), 1)
  unrelated = ~share_module[i, j]
  mates = unrelated & (arms[i] == arms[j])
  cos = np.sum(unit[i] * unit[j], axis=1)
  assert mates.sum() > 500
  assert cos[mates].mean() > cos[unrelated & ~mates].mean() + 0.1
  # Arm correction (docs/science.md §3.5): subtract the mean of the unexpressed genes of arms with > 20.
  corrected = gene_means.copy()
  big = [a for a in np.unique(arms) if np.sum((arms == a) & ~expressed) > 20]
  assert len(big) >= 3
  for a in big:
    corrected[arms == a] -= gene_means[(arms == a) & ~expressed].mean(axis=0)
  unit = corrected / np.linalg.norm(corrected, axis=1, keepdims=True)
  cos = np.sum(unit[i] * unit[j], axis=1)
  on_big = mates & np.isin(arms[i], big) & expressed[i] & expressed[j]
  assert on_big.sum() > 50
  assert abs(cos[on_big].mean() - cos[unrelated & ~mates].mean()) < 0.05


def test_mean_intensity_is_normalised_but_morphology_differs():
  rng = np.random.default_rng(0)
  mixing = rng.standard_normal((len(render.PARAMS), 4))
  a, b = phenotypes.latent_to_params(np.array([[1.5, 0, 0, 0], [-1.5, 0, 0, 0]]), mixing)
  img_a = render.render_clean(a, 128, np.random.default_rng(1))
  img_b = render.render_clean(b, 128, np.random.default_rng(1))
  np.testing.assert_allclose(img_a.mean(axis=(1, 2)), render.MEAN_COUNTS, rtol=1e-4)
  np.testing.assert_allclose(img_b.mean(axis=(1, 2)), render.MEAN_COUNTS, rtol=1e-4)
  assert np.abs(img_a - img_b).mean() > 0.3 * render.MEAN_COUNTS.mean()


def test_control_wells_separate_by_plate(screen):
  rows = [r for r in _read_csv(screen / "metadata.csv") if r["gene"] == "EMPTY_control"]
  feats, plates = [], []
  for r in rows:
    folder = screen / "images" / r["experiment_name"] / f"Plate{r['plate']}"
    planes = [np.asarray(Image.open(folder / f"{r['address']}_s1_w{c}.png"), np.float64)
              for c in range(1, 7)]
    feats.append([f(p) for p in planes for f in (np.mean, np.std)])
    plates.append(f"{r['experiment_name']}/{r['plate']}")
  x, plates = np.log(np.array(feats)), np.array(plates)
  x = (x - x.mean(0)) / x.std(0)
  hits = 0
  for k in range(len(x)):  # leave-one-out nearest centroid
    keep = np.arange(len(x)) != k
    names = sorted(set(plates))
    centroids = np.array([x[keep & (plates == n)].mean(0) for n in names])
    hits += names[np.argmin(((centroids - x[k]) ** 2).sum(1))] == plates[k]
  assert len(set(plates)) == 6 and len(x) == 60
  assert hits / len(x) > 0.6  # chance is 1/6


def test_layout_is_rxrx3(screen):
  with open(screen / "metadata.csv") as f:
    assert f.readline().rstrip("\n") == ",".join(synthetic.METADATA_COLUMNS)
  rows = _read_csv(screen / "metadata.csv")
  assert len(rows) == 2 * (40 * 2 + 3 * 10)
  assert synthetic.address(0, 0) == "A01" and synthetic.address(26, 8) == "AA09"
  assert synthetic.address(31, 47) == "AF48"
  address = re.compile(r"^(A[A-F]|[A-Z])(0[1-9]|[1-3][0-9]|4[0-8])$")
  for r in rows:
    assert address.match(r["address"]), r
    assert r["well_id"] == f"{r['experiment_name']}_{r['plate']}_{r['address']}"
    assert re.match(r"^gene-\d{3}$", r["experiment_name"]) and 1 <= int(r["plate"]) <= 3
    if r["gene"] == "EMPTY_control":
      assert r["treatment"] == "EMPTY_control"
    else:
      assert re.match(rf"^{re.escape(r['gene'])}_guide_[12]$", r["treatment"]), r
    assert (r["SMILES"], r["concentration"], r["perturbation_type"], r["cell_type"]) == (
        "", "", "CRISPR", "HUVEC")
  assert len({r["well_id"] for r in rows}) == len(rows)
  r = rows[0]
  folder = screen / "images" / r["experiment_name"] / f"Plate{r['plate']}"
  pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
  assert len(pngs) == 6 * sum(x["experiment_name"] == r["experiment_name"] and
                              x["plate"] == r["plate"] for x in rows)
  with Image.open(folder / f"{r['address']}_s1_w1.png") as im:
    assert im.mode == "I;16" and im.size == (256, 256)
  truth = screen / "ground_truth"
  assert sorted(os.listdir(truth)) == ["annotations", "expression.csv", "genes.csv",
                                       "phenotypes.npz", "planted_pairs.csv", "screen.json",
                                       "wells.csv", "withheld_pairs.csv"]
  wells = _read_csv(truth / "wells.csv")
  assert [w["well_id"] for w in wells] == [r["well_id"] for r in rows]
  assert list(wells[0]) == ["well_id"] + [f"feature_{i}" for i in range(16)]
  assert list(_read_csv(truth / "expression.csv")[0]) == ["gene", "zFPKM"]
  assert list(_read_csv(truth / "planted_pairs.csv")[0])[:3] == ["entity1", "entity2", "source"]
  with np.load(truth / "phenotypes.npz") as z:
    assert z["well_latent"].shape == (len(rows), 16)
    assert z["gene_latent"].shape == z["gene_arm_component"].shape == (40, 16)
  meta = json.loads((truth / "screen.json").read_text())
  assert meta["counts"]["control_wells"] == 60 and meta["counts"]["plates"] == 6


def test_ground_truth_files_score_the_planted_pairs(screen):
  rows = {r["well_id"]: r["gene"] for r in _read_csv(screen / "metadata.csv")}
  wells = _read_csv(screen / "ground_truth" / "wells.csv")
  genes = sorted({g for g in rows.values() if g != "EMPTY_control"})
  x = np.array([[float(v) for k, v in w.items() if k != "well_id"] for w in wells])
  labels = np.array([rows[w["well_id"]] for w in wells])
  gene_means = np.stack([x[labels == g].mean(0) for g in genes])
  planted = [(r["entity1"], r["entity2"])
             for r in _read_csv(screen / "ground_truth" / "planted_pairs.csv")]
  res = known_relationship_recall(gene_means, genes, planted, min_entities=10)
  # 40 genes: the planted pairs are ~7 % of all pairs, more than a 5 % tail can hold.
  assert res["recall_0.1_0.9"] >= 0.8, res


def test_rerun_is_byte_identical_and_resumes(screen, tmp_path, capsys):
  other = tmp_path / "again"
  result = _run(other, ["--workers=1"], capsys)
  assert result["wells"] == 220 and result["control_wells"] == 60 and result["rendered"] == 220
  assert set(result) >= {"genes", "wells", "control_wells", "experiments", "plates",
                         "planted_pairs", "seconds"}
  assert _tree_digest(other) == _tree_digest(screen)
  # Lost images are made again (only those), with the same bytes.
  before = _tree_digest(other)
  pngs = sorted((other / "images" / "gene-002" / "Plate3").iterdir())
  for p in pngs[:3]:
    p.unlink()
  result = _run(other, ["--workers=1"], capsys)
  assert result["rendered"] == 1 and result["skipped"] == 219
  assert _tree_digest(other) == before


def test_user_mistakes_fail_in_one_line(tmp_path, capsys):
  out = tmp_path / "x"
  for bad in (["--genes=2"], ["--image_size=100"], ["--plates=1", "--controls_per_plate=1500"],
              ["--style=nope"]):
    with pytest.raises(SystemExit) as e:  # the command line, as `python -m` runs it
      cli.run(synthetic.main, [f"--out={out}", *bad], absl_flags=False)
    assert e.value.code == cli.USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("data_prep.synthetic: error: --") and "\n" not in err, err
    with pytest.raises(synthetic.SyntheticError):  # in-process callers get the exception
      synthetic.main([f"--out={out}", *bad])
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    cli.run(synthetic.main, [f"--out={tmp_path / 'busy'}", *SMALL], absl_flags=False)
  assert e.value.code == cli.USAGE and "not empty" in capsys.readouterr().err
  proc = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--help"],
                        capture_output=True, text=True)
  assert proc.returncode == 0 and "--controls_per_plate" in proc.stdout


# ----------------------------------------------------------------------------- styles


@pytest.fixture(scope="module")
def granular_screen(tmp_path_factory):
  """The SMALL screen in the granular style, and the JSON line its command printed last."""
  out = tmp_path_factory.mktemp("synth_granular") / "screen"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    synthetic.main([f"--out={out}", *SMALL, "--style=granular", "--workers=2"])
  return out, json.loads(printed.getvalue().strip().splitlines()[-1])


def _planes(root, row):
  folder = root / "images" / row["experiment_name"] / f"Plate{row['plate']}"
  return [np.asarray(Image.open(folder / f"{row['address']}_s1_w{c}.png"), np.float64)
          for c in range(1, 7)]


def test_default_style_output_is_unchanged(screen):
  # Fingerprints of the SMALL default screen as it was made before --style existed (the README's
  # numbers were measured on the default): sha256 prefixes of files without floating-point
  # arithmetic, and per-channel pixel spreads of three sites (a tolerance absorbs last-bit
  # differences of vectorised math between CPUs).
  digests = {"metadata.csv": "24a06a552e301cc2", "ground_truth/genes.csv": "bed3dc364994d910",
             "ground_truth/planted_pairs.csv": "76eeb6528a009697"}
  for rel, want in digests.items():
    assert hashlib.sha256((screen / rel).read_bytes()).hexdigest()[:16] == want, rel
  spreads = {"gene-001_1_B09": [2155.90, 495.18, 987.40, 361.76, 829.11, 712.35],
             "gene-001_1_B11": [1194.06, 328.21, 970.01, 227.16, 371.56, 804.12],
             "gene-001_1_B45": [1727.51, 442.64, 925.95, 370.94, 631.78, 727.18]}
  rows = {r["well_id"]: r for r in _read_csv(screen / "metadata.csv")}
  for well, want in spreads.items():
    got = [p.std() for p in _planes(screen, rows[well])]
    np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=well)
  meta = json.loads((screen / "ground_truth" / "screen.json").read_text())
  assert "style" not in meta["parameters"]
  assert meta["render_params"] == {k: list(v) for k, v in render.PARAMS.items()}


def test_styles_share_the_ground_truth(screen, granular_screen):
  gran, printed = granular_screen
  assert printed["style"] == "granular" and printed["wells"] == 220
  for rel in ("metadata.csv", "ground_truth/genes.csv", "ground_truth/expression.csv",
              "ground_truth/planted_pairs.csv", "ground_truth/wells.csv"):
    assert (gran / rel).read_bytes() == (screen / rel).read_bytes(), rel
  by_style = {"mixing", "param_names", "well_params"}  # the latent -> render mapping
  with np.load(screen / "ground_truth" / "phenotypes.npz") as a, \
       np.load(gran / "ground_truth" / "phenotypes.npz") as b:
    assert set(a.files) == set(b.files) > by_style
    for k in set(a.files) - by_style:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert list(b["param_names"]) == list(styles.GRANULAR_PARAMS)
    assert b["mixing"].shape == (len(styles.GRANULAR_PARAMS), 16)
    assert np.all(np.count_nonzero(b["mixing"], axis=1) == 5)  # a sparse mixing
    assert b["well_params"].shape == (220, len(styles.GRANULAR_PARAMS))
  meta_a, meta_b = (json.loads((root / "ground_truth" / "screen.json").read_text())
                    for root in (screen, gran))
  assert meta_b["parameters"] == {**meta_a["parameters"], "style": "granular"}
  for k in ("counts", "modules", "focus_arms", "channels", "image_size"):
    assert meta_a[k] == meta_b[k], k


def test_granular_style_is_deterministic_and_looks_different(screen, granular_screen, tmp_path):
  gran = granular_screen[0]
  args = synthetic._parser().parse_args([f"--out={tmp_path}", *SMALL, "--style=granular"])
  wells = synthetic.design(args)[2]
  for i in (0, 1, 2):  # rendered again in this process: the bytes of the fixture's workers
    paths = [str(tmp_path / f"{i}_{c}.png") for c in render.CHANNELS]
    w = wells[i]
    assert synthetic._render_task((i, paths, w["params"], w["effects"], 256, 3, "granular")) == 1
    for mine, theirs in zip(paths, synthetic.site_paths(str(gran), w)):
      with open(mine, "rb") as f, open(theirs, "rb") as g:
        assert f.read() == g.read(), theirs
  # Same wells, same seed: the granular style has about twice as many (smaller) nuclei, and
  # Hoechst bleeding into w2 correlates the two channels.
  stats = {}
  for name, root in (("default", screen), ("granular", gran)):
    nuclei, coloc = [], []
    for r in _read_csv(root / "metadata.csv")[:24]:
      w1, w2 = (ndi.gaussian_filter(p, 2) for p in _planes(root, r)[:2])
      nuclei.append(ndi.label(w1 > w1.mean() + w1.std())[1])
      coloc.append(np.corrcoef(w1.ravel(), w2.ravel())[0, 1])
    stats[name] = np.mean(nuclei), np.mean(coloc)
  assert stats["granular"][0] > 1.6 * stats["default"][0], stats
  assert stats["granular"][1] > stats["default"][1] + 0.25, stats


def test_granular_style_normalises_intensity_and_latent_moves_texture():
  style = styles.get("granular")
  rng = np.random.default_rng(0)
  mixing = style.mixing(rng.standard_normal((len(style.params), 8)))
  latent = np.zeros((2, 8))
  latent[:, 0] = 1.5, -1.5
  a, b = phenotypes.latent_to_params(latent, mixing, style.params)
  img_a = style.render_clean(a, 128, np.random.default_rng(1))
  img_b = style.render_clean(b, 128, np.random.default_rng(1))
  np.testing.assert_array_equal(img_a, style.render_clean(a, 128, np.random.default_rng(1)))
  for img in (img_a, img_b):
    np.testing.assert_allclose(img.mean(axis=(1, 2)), styles.GRANULAR_MEAN_COUNTS, rtol=1e-4)
  assert np.abs(img_a - img_b).mean() > 0.3 * styles.GRANULAR_MEAN_COUNTS.mean()
  with pytest.raises(ValueError, match="unknown style"):
    styles.get("nope")
