"""data_prep.convert on tiny screens written here in the exact RxRx1 / RxRx3 / RxRx3-core / CSV
layouts (file names, CSV headers, key formats of docs/data_layouts.md), at reduced image sizes."""
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from PIL import features
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from data_prep import convert
from data_prep import layouts
from data_prep.layouts import ConvertError
from mae_jax.data import records
from mae_jax.util import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 256  # site size of the fixtures (real: 512 / 2048 via --image_size)

RXRX1_CSV = """\
site_id,well_id,cell_type,dataset,experiment,plate,well,site,well_type,sirna,sirna_id
HUVEC-01_1_B03_1,HUVEC-01_1_B03,HUVEC,train,HUVEC-01,1,B03,1,negative_control,EMPTY,1138
HUVEC-01_1_B02_2,HUVEC-01_1_B02,HUVEC,train,HUVEC-01,1,B02,2,treatment,s21721,513
HUVEC-01_1_B02_1,HUVEC-01_1_B02,HUVEC,train,HUVEC-01,1,B02,1,treatment,s21721,513
HUVEC-01_1_O23_1,HUVEC-01_1_O23,HUVEC,train,HUVEC-01,1,O23,1,positive_control,s501,1108
HUVEC-01_2_C10_1,HUVEC-01_2_C10,HUVEC,train,HUVEC-01,2,C10,1,treatment,s1234,7
HUVEC-24_1_B02_1,HUVEC-24_1_B02,HUVEC,test,HUVEC-24,1,B02,1,treatment,,
HUVEC-24_1_B02_2,HUVEC-24_1_B02,HUVEC,test,HUVEC-24,1,B02,2,treatment,,
U2OS-01_4_M23_2,U2OS-01_4_M23,U2OS,train,U2OS-01,4,M23,2,treatment,s99,42
"""
# Blank SMILES/concentration for CRISPR, a CXSMILES block with commas inside quotes, AA..AF rows.
RXRX3_CSV = """\
well_id,experiment_name,plate,address,gene,treatment,SMILES,concentration,perturbation_type,cell_type
gene-001_1_AA02,gene-001,1,AA02,TSC2,TSC2_guide_1,,,CRISPR,HUVEC
gene-001_1_B03,gene-001,1,B03,EMPTY_control,EMPTY_control,,,CRISPR,HUVEC
gene-001_1_AF48,gene-001,1,AF48,CRISPR_control,CRISPR_control,,,CRISPR,HUVEC
gene-001_2_A01,gene-001,2,A01,RXRX3-00017,RXRX3-00017_guide_3,,,CRISPR,HUVEC
compound-001_19_D20,compound-001,19,D20,,aspirin,CC(=O)Oc1ccccc1C(=O)O,0.25,COMPOUND,HUVEC
compound-001_19_AB05,compound-001,19,AB05,,cpd-7,"C/C=C/C=C\\C |c:1,3,t:5|",2.5,COMPOUND,HUVEC
"""
CXSMILES = "C/C=C/C=C\\C |c:1,3,t:5|"


def _rng(seed):
  return np.random.default_rng(seed)


def _image(rng, size, dtype, c=6):
  hi = 256 if dtype == np.uint8 else 65536
  return rng.integers(0, hi, (size, size, c), dtype=dtype)


def _save_png(path, plane):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(plane).save(path, compress_level=1)


def make_rxrx1(root, size=S, seed=0):
  """RxRx1 archive layout; returns {site_id: HWC uint8}."""
  rng = _rng(seed)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "metadata.csv"), "w") as f:
    f.write(RXRX1_CSV)
  images = {}
  for line in RXRX1_CSV.splitlines()[1:]:
    site_id, _, _, _, exp, plate, well, site = line.split(",")[:8]
    images[site_id] = _image(rng, size, np.uint8)
    for c in range(6):
      _save_png(os.path.join(root, "images", exp, f"Plate{plate}", f"{well}_s{site}_w{c + 1}.png"),
                images[site_id][..., c])
  return images


def make_rxrx3(root, size=S, seed=1):
  """RxRx3 layout, 16-bit; returns {well_id: HWC uint16}."""
  rng = _rng(seed)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "metadata.csv"), "w") as f:
    f.write(RXRX3_CSV)
  images = {}
  for line in RXRX3_CSV.splitlines()[1:]:
    well_id, exp, plate, address = line.split(",")[:4]
    images[well_id] = _image(rng, size, np.uint16)
    for c in range(6):
      _save_png(os.path.join(root, "images", exp, f"Plate{plate}", f"{address}_s1_w{c + 1}.png"),
                images[well_id][..., c])
  return images


def _jp2(plane):
  buf = io.BytesIO()
  Image.fromarray(plane).save(buf, format="JPEG2000", irreversible=False)  # lossless
  return buf.getvalue()


def make_rxrx3_core(root, size=S, seed=2, with_metadata=True):
  """HF parquet shards, one jp2 channel image per row; channels of a site spread over files."""
  rng = _rng(seed)
  wells = [line.split(",") for line in RXRX3_CSV.splitlines()[1:4]]
  images, rows = {}, []
  for well_id, exp, plate, address, *_ in wells:
    images[well_id] = _image(rng, size, np.uint8)
    for c in range(6):
      key = f"{exp}/Plate{plate}/{address}_s1_{c + 1}"
      cell = {"bytes": _jp2(images[well_id][..., c]), "path": f"{address}_s1_{c + 1}.jp2"}
      rows.append((key, cell))
  order = _rng(seed + 1).permutation(len(rows))
  rows = [rows[i] for i in order]
  struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  os.makedirs(os.path.join(root, "data"), exist_ok=True)
  half = len(rows) // 2
  for k, part in enumerate((rows[:half], rows[half:])):
    table = pa.table({"__key__": pa.array([r[0] for r in part], pa.string()),
                      "jp2": pa.array([r[1] for r in part], struct)})
    pq.write_table(table, os.path.join(root, "data", f"train-{k:05d}-of-00002.parquet"),
                   row_group_size=4)
  if with_metadata:
    with open(os.path.join(root, "metadata_rxrx3_core.csv"), "w") as f:
      f.write(RXRX3_CSV)
  return images


def make_manifest(root, seed=3):
  """User CSV: 16-bit TIFF channels ch1..ch3 at relative paths plus free metadata columns."""
  rng = _rng(seed)
  lines = ["experiment,plate,well,site,treatment,gene,dose_uM,ch1,ch2,ch3"]
  images = {}
  for exp, plate, well, site, treatment, gene in [
      ("exp-B", "3", "B02", 1, "GENE2_guide_1", "GENE2"),
      ("exp-A", "1", "C04", 1, "EMPTY_control", ""),
      ("exp-A", "1", "B02", 2, "GENE1_guide_1", "GENE1"),
      ("exp-A", "1", "B02", 1, "GENE1_guide_1", "GENE1")]:
    img = _image(rng, S, np.uint16, c=3)
    paths = []
    for c in range(3):
      rel = f"img/{exp}/{plate}_{well}_{site}_c{c}.tif"
      os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
      tifffile.imwrite(os.path.join(root, rel), img[..., c])
      paths.append(rel)
    images[f"{exp}_{plate}_{well}_s{site}"] = img
    lines.append(f"{exp},{plate},{well},{site},{treatment},{gene},,{','.join(paths)}")
  with open(os.path.join(root, "sites.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return images


def read_back(out):
  manifest = records.read_manifest(out)
  source = records.IndexedTFRecordSource(records.shard_paths(out, manifest))
  return manifest, [records.decode_site(source[i]) for i in range(len(source))]


def snapshot(out):
  files = {}
  for folder, _, names in os.walk(out):
    for n in names:
      p = os.path.join(folder, n)
      with open(p, "rb") as f:
        files[os.path.relpath(p, out)] = f.read()
  return files


def check_stats(manifest, images):
  stack = np.concatenate([i.reshape(-1, i.shape[-1]) for i in images]).astype(np.float64)
  np.testing.assert_allclose(manifest["channel_stats"]["mean"], stack.mean(0), rtol=1e-12)
  np.testing.assert_allclose(manifest["channel_stats"]["std"], stack.std(0), rtol=1e-9)
  assert manifest["channel_stats"]["max"] == stack.max(0).astype(int).tolist()


# ---------------------------------------------------------------- round trips


def test_rxrx1_round_trip(tmp_path):
  images = make_rxrx1(tmp_path / "rxrx1")
  summary = convert.convert("rxrx1", str(tmp_path / "rxrx1"), str(tmp_path / "out"),
                            workers=1, sites_per_shard=2, image_size=S)
  manifest, sites = read_back(tmp_path / "out")
  assert summary["num_records"] == manifest["num_records"] == len(images) == len(sites)
  assert [s["path"] for s in manifest["shards"]] == [
      "shards/HUVEC-01_P1-00000.tfrecord", "shards/HUVEC-01_P1-00001.tfrecord",
      "shards/HUVEC-01_P2-00000.tfrecord", "shards/HUVEC-24_P1-00000.tfrecord",
      "shards/U2OS-01_P4-00000.tfrecord"]
  assert manifest["image_shape"] == [S, S, 6] and manifest["dtype"] == "uint8"
  assert manifest["channels"] == ["w1", "w2", "w3", "w4", "w5", "w6"]
  assert manifest["experiments"] == ["HUVEC-01", "HUVEC-24", "U2OS-01"]
  assert manifest["num_wells"] == 6 and manifest["counts"]["controls"] == 1
  # Sorted by experiment, plate, well, site whatever the CSV order.
  assert [s["metadata"]["site_id"] for s in sites[:4]] == [
      "HUVEC-01_1_B02_1", "HUVEC-01_1_B02_2", "HUVEC-01_1_B03_1", "HUVEC-01_1_O23_1"]
  for s in sites:
    md = s["metadata"]
    np.testing.assert_array_equal(s["image"], images[md["site_id"]])
    assert s["channels"] == manifest["channels"]
    assert md["is_control"] == (md["well_type"] == "negative_control")
    assert md["perturbation"] == md["sirna"] and md["perturbation_type"] == "siRNA"
  test = {s["metadata"]["site_id"]: s["metadata"] for s in sites}["HUVEC-24_1_B02_2"]
  assert (test["dataset"], test["sirna"], test["sirna_id"], test["site"]) == ("test", "", "", 2)
  assert test["well_id"] == "HUVEC-24_1_B02" and test["plate"] == "1" and test["well"] == "B02"
  check_stats(manifest, list(images.values()))


def test_rxrx3_round_trip_16bit(tmp_path):
  images = make_rxrx3(tmp_path / "rxrx3")
  convert.convert("rxrx3", str(tmp_path / "rxrx3"), str(tmp_path / "out"), workers=2,
                  image_size=S)
  manifest, sites = read_back(tmp_path / "out")
  assert manifest["dtype"] == "uint16" and manifest["num_records"] == 6
  by_well = {s["metadata"]["well_id"]: s for s in sites}
  for well_id, img in images.items():
    assert by_well[well_id]["image"].dtype == np.uint16
    np.testing.assert_array_equal(by_well[well_id]["image"], img)
  # Two-letter rows come after Z in plate order.
  assert [s["metadata"]["well"] for s in sites[2:5]] == ["B03", "AA02", "AF48"]
  md = by_well["compound-001_19_AB05"]["metadata"]
  assert md["smiles"] == CXSMILES and md["concentration"] == "2.5"
  assert md["perturbation"] == "cpd-7" and md["perturbation_type"] == "COMPOUND"
  md = by_well["gene-001_1_AA02"]["metadata"]
  assert (md["smiles"], md["concentration"], md["gene"]) == ("", "", "TSC2")
  assert (md["experiment"], md["plate"], md["site"], md["is_control"]) == ("gene-001", "1", 1, 0)
  assert {w for w, s in by_well.items() if s["metadata"]["is_control"]} == {
      "gene-001_1_B03", "gene-001_1_AF48"}
  assert manifest["counts"]["perturbation_types"] == {"COMPOUND": 2, "CRISPR": 4}
  check_stats(manifest, list(images.values()))


@pytest.mark.parametrize("with_metadata", [True, False])
def test_rxrx3_core_round_trip(tmp_path, with_metadata):
  assert features.check("jpg_2000")
  images = make_rxrx3_core(tmp_path / "core", with_metadata=with_metadata)
  convert.convert("rxrx3_core", str(tmp_path / "core"), str(tmp_path / "out"), workers=1,
                  image_size=S)
  manifest, sites = read_back(tmp_path / "out")
  assert manifest["num_records"] == 3 and manifest["channels"] == [f"w{c}" for c in range(1, 7)]
  assert [s["metadata"]["well"] for s in sites] == ["B03", "AA02", "AF48"]
  for s in sites:
    np.testing.assert_array_equal(s["image"], images[s["metadata"]["well_id"]])
  md = sites[0]["metadata"]
  if with_metadata:
    assert (md["perturbation"], md["is_control"], md["perturbation_type"]) == (
        "EMPTY_control", 1, "CRISPR")
  else:
    assert (md["well_id"], md["perturbation"], md["is_control"]) == ("gene-001_1_B03", "", 0)


def test_manifest_layout(tmp_path):
  images = make_manifest(tmp_path / "user")
  convert.convert("manifest", str(tmp_path / "user"), str(tmp_path / "out"), workers=1,
                  image_size=0)
  manifest, sites = read_back(tmp_path / "out")
  assert manifest["channels"] == ["ch1", "ch2", "ch3"] and manifest["dtype"] == "uint16"
  assert [s["path"] for s in manifest["shards"]] == [
      "shards/exp-A_P1-00000.tfrecord", "shards/exp-B_P3-00000.tfrecord"]
  for s in sites:
    md = s["metadata"]
    np.testing.assert_array_equal(s["image"], images[f"{md['well_id']}_s{md['site']}"])
    assert md["dose_uM"] == "" and md["is_control"] == (md["perturbation"] == "EMPTY_control")
  first = sites[0]["metadata"]
  assert (first["perturbation"], first["gene"], first["well_id"]) == (
      "GENE1_guide_1", "GENE1", "exp-A_1_B02")


def test_manifest_named_channels_png(tmp_path):
  rng = _rng(4)
  root = tmp_path / "user"
  img = _image(rng, 512, np.uint8, c=2)
  _save_png(str(root / "a_dna.png"), img[..., 0])
  _save_png(str(root / "a_actin.png"), img[..., 1])
  (root / "plate.csv").write_text(f"label,actin,dna\nsiteA,a_actin.png,{root / 'a_dna.png'}\n")
  convert.convert("manifest", str(root / "plate.csv"), str(tmp_path / "out"),
                  channel_columns=["dna", "actin"])
  manifest, sites = read_back(tmp_path / "out")
  assert manifest["channels"] == ["dna", "actin"] and manifest["image_shape"] == [512, 512, 2]
  np.testing.assert_array_equal(sites[0]["image"], img)
  assert sites[0]["metadata"]["label"] == "siteA" and sites[0]["metadata"]["well_id"] == "row2"


# ---------------------------------------------------------------- resume


def test_rerun_skips_finished_shards_and_is_byte_identical(tmp_path):
  make_rxrx1(tmp_path / "rxrx1")
  root, out = str(tmp_path / "rxrx1"), str(tmp_path / "out")
  kw = dict(workers=2, sites_per_shard=2, image_size=S)
  first = convert.convert("rxrx1", root, out, **kw)
  reference = snapshot(out)
  assert first["shards_written"] == first["shards"] == 5

  # Interrupted run 1: one finished shard and the manifest are gone.
  victim = os.path.join(out, "shards", "HUVEC-01_P2-00000.tfrecord")
  os.remove(victim)
  os.remove(os.path.join(out, "manifest.json"))
  shards = [os.path.join(out, p) for p in reference if p.endswith(".tfrecord")]
  for p in shards:
    if p != victim:
      os.utime(p, (1000, 1000))
  again = convert.convert("rxrx1", root, out, **kw)
  assert (again["shards_written"], again["shards_skipped"]) == (1, 4)
  assert all(os.path.getmtime(p) == 1000 for p in shards if p != victim)
  assert snapshot(out) == reference

  # Interrupted run 2: a worker fails on an unreadable file after other shards finished.
  out2 = str(tmp_path / "out2")
  bad = os.path.join(root, "images", "U2OS-01", "Plate4", "M23_s2_w3.png")
  good = open(bad, "rb").read()
  with open(bad, "wb") as f:
    f.write(good[:100])
  with pytest.raises(ConvertError, match="M23_s2_w3.png"):
    convert.convert("rxrx1", root, out2, **kw)
  left = os.listdir(os.path.join(out2, "shards"))
  assert not any(".tmp" in n for n in left)
  assert not os.path.exists(os.path.join(out2, "manifest.json"))
  assert "U2OS-01_P4-00000.tfrecord" not in left
  # The failing shard is the last task: it starts only after 3 others have finished.
  done = [n for n in left if n.endswith(".tfrecord")]
  assert len(done) >= 3
  with open(bad, "wb") as f:
    f.write(good)
  # A SIGKILLed writer leaves its temporary file; the rerun clears it.
  open(os.path.join(out2, "shards", "U2OS-01_P4-00000.tfrecord.tmp"), "wb").close()
  resumed = convert.convert("rxrx1", root, out2, **kw)
  assert resumed["shards_written"] == 5 - len(done)
  assert snapshot(out2) == reference


# ---------------------------------------------------------------- user errors


def _main_error(capsys, *argv):
  """The command line through cli.run, as `python -m data_prep.convert` runs it."""
  with pytest.raises(SystemExit) as e:
    cli.run(convert.main, ["--progress=off", *argv], absl_flags=False)
  err = capsys.readouterr().err
  assert e.value.code == cli.USAGE and err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("data_prep.convert: error: "), err
  return err


def test_user_errors_are_one_line(tmp_path, capsys):
  root = tmp_path / "rxrx1"
  make_rxrx1(root)
  common = [f"--root={root}", "--image_size=256"]
  out = tmp_path / "out"

  missing = root / "images" / "HUVEC-01" / "Plate2" / "C10_s1_w4.png"
  data = missing.read_bytes()
  missing.unlink()
  err = _main_error(capsys, "--layout=rxrx1", f"--out={out}", *common)
  assert str(missing) in err and "HUVEC-01_2_C10_1" in err
  assert not out.exists()  # nothing written for a mistake found up front
  missing.write_bytes(data)

  # Real RxRx1 sites are 512²: the default --image_size says so.
  err = _main_error(capsys, "--layout=rxrx1", f"--out={out}", f"--root={root}")
  assert "256x256, expected 512x512" in err

  # One channel 16-bit among 8-bit ones: both channels named.
  odd = root / "images" / "HUVEC-01" / "Plate1" / "B02_s1_w5.png"
  Image.fromarray(np.zeros((S, S), np.uint16)).save(odd)
  err = _main_error(capsys, "--layout=rxrx1", f"--out={out}", *common)
  assert "B02_s1_w5.png" in err and "B02_s1_w1.png" in err and "uint16" in err

  # A site of another size, found by a worker: both sites named, no partial shard left.
  for c in range(6):
    _save_png(str(root / "images" / "U2OS-01" / "Plate4" / f"M23_s2_w{c + 1}.png"),
              np.zeros((512, 512), np.uint8))
  Image.fromarray(np.zeros((S, S), np.uint8)).save(odd)
  err = _main_error(capsys, "--layout=rxrx1", f"--out={out}", "--workers=2",
                    "--sites_per_shard=1", *common)
  assert "U2OS-01_4_M23_2" in err and "HUVEC-01_1_B02_1" in err and "512x512x6" in err
  assert not any(".tmp" in n for n in os.listdir(out / "shards"))

  # Unknown / missing columns are named, with the expected list.
  (root / "metadata.csv").write_text(RXRX1_CSV.replace("sirna_id", "sirna_idx", 1))
  err = _main_error(capsys, "--layout=rxrx1", f"--out={out}", *common)
  assert "missing columns sirna_id" in err and "unknown columns sirna_idx" in err
  assert "expected columns: site_id, well_id" in err
  err = _main_error(capsys, "--layout=rxrx3", f"--out={out}", *common)
  assert "missing columns well_id" not in err and "experiment_name" in err

  err = _main_error(capsys, "--layout=rxrx9", f"--out={out}", *common)
  assert "--layout" in err
  err = _main_error(capsys, "--layout=manifest", f"--root={tmp_path / 'nope.csv'}",
                    f"--out={out}")
  assert "nope.csv" in err


def test_manifest_errors(tmp_path, capsys):
  make_manifest(tmp_path / "user")
  args = ["--layout=manifest", f"--root={tmp_path / 'user'}", f"--out={tmp_path / 'out'}"]
  err = _main_error(capsys, *args, "--channel_columns=ch1,dapi")
  assert "dapi" in err and "ch1, ch2, ch3" in err
  err = _main_error(capsys, *args, "--image_size=512")
  assert "expected 512x512" in err
  csv = tmp_path / "user" / "sites.csv"
  csv.write_text(csv.read_text().replace("ch1,ch2,ch3", "dna,rna,agp"))
  err = _main_error(capsys, *args)
  assert "no channel columns" in err


def test_layout_readers_reject_bad_rows(tmp_path):
  make_rxrx3(tmp_path / "r3")
  with open(tmp_path / "r3" / "metadata.csv", "a") as f:
    f.write("gene-001_1_AA02,gene-001,1,AA02,TSC2,TSC2_guide_1,,,CRISPR,HUVEC\n")
  with pytest.raises(ConvertError, match="gene-001_1_AA02 appears twice"):
    layouts.list_sites("rxrx3", str(tmp_path / "r3"))
  make_rxrx3_core(tmp_path / "core")
  os.remove(tmp_path / "core" / "data" / "train-00001-of-00002.parquet")
  with pytest.raises(ConvertError, match="no parquet row for channel"):
    layouts.list_sites("rxrx3_core", str(tmp_path / "core"))


def test_cli_subprocess(tmp_path):
  make_rxrx1(tmp_path / "rxrx1")
  env = {**os.environ, "PYTHONPATH": REPO}
  base = [sys.executable, "-m", "data_prep.convert", "--layout=rxrx1",
          f"--root={tmp_path / 'rxrx1'}", "--image_size=256", "--sites_per_shard=3"]
  # Success through `python -m` with spawned workers; last stdout line is the JSON summary;
  # conversion never imports jax.
  run = subprocess.run(base + [f"--out={tmp_path / 'out'}", "--workers=2"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary["num_records"] == 8 and summary["shards_written"] == 5
  probe = subprocess.run(
      [sys.executable, "-c", "import sys, numpy, data_prep.convert, mae_jax.data.records as r; "
       "r.encode_site(numpy.zeros((2, 2, 1), numpy.uint8), ['a'], {}); "
       "print('jax' in sys.modules)"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert probe.stdout.strip() == "False", probe.stdout + probe.stderr
  os.remove(tmp_path / "rxrx1" / "images" / "HUVEC-24" / "Plate1" / "B02_s2_w6.png")
  run = subprocess.run(base + [f"--out={tmp_path / 'out2'}"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 2 and run.stdout == ""
  assert run.stderr.count("\n") == 1 and "B02_s2_w6.png" in run.stderr, run.stderr
  assert run.stderr.startswith("data_prep.convert: error: "), run.stderr
  assert "HUVEC-24_1_B02_2" in run.stderr and not (tmp_path / "out2").exists()
