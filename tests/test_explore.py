"""`python -m eval.explore`: the map page of a small eval dir, opened in headless Chromium."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from eval import explore
from mae_jax.data import resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENES = [f"GENE{i:02d}" for i in range(48)]  # triplets GENE00-02, GENE03-05, ... share a phenotype
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
  """eval.recall on a 48-gene map with planted triplets: the eval dir, with its map.html."""
  root = tmp_path_factory.mktemp("explore")
  rng = np.random.default_rng(0)
  x = np.repeat(rng.standard_normal((16, 64)) * 3, 3, axis=0) + rng.standard_normal((48, 64))
  np.savez(root / "map.npz", labels=np.array(GENES), embeddings=x.astype(np.float32))
  triplets = [GENES[k:k + 3] for k in range(0, 48, 3)]
  pairs = [(a, b) for a, b, c in triplets] + [(b, c) for a, b, c in triplets[1:]]
  ann = root / "annotations"
  ann.mkdir()
  for src in resources.SOURCES:  # GENE00-GENE02 is in no source: a candidate
    chosen = pairs if src in ("CORUM", "StringDB") else pairs[1:]
    (ann / f"{src}.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in chosen))
  out = root / "eval"
  proc = _cli("eval.recall", f"--embeddings={root / 'map.npz'}", f"--out={out}",
              f"--annotations_dir={ann}", "--arm_correction=false", "--min_entities=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["n_perturbations"] == 48
  assert (out / "map.html").stat().st_size > 0  # eval.recall writes the page by default
  return out, ann


def test_neighbourhoods_match_the_full_matrix():
  x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
  xn = explore.unit_rows(x)
  nb, sim, heat = explore.neighbourhoods(xn, 5, chunk=64)
  s = xn @ xn.T
  np.fill_diagonal(s, -np.inf)
  np.testing.assert_array_equal(nb, np.argsort(-s, axis=1, kind="stable")[:, :5])
  np.testing.assert_allclose(sim, np.take_along_axis(s, nb, 1), atol=1e-6)
  np.testing.assert_allclose(heat[:, :5], sim, atol=1e-6)  # first row: the gene vs its neighbours
  cluster = explore.clusters(xn, 6)
  assert cluster.max() == 5 and np.all(np.diff(np.bincount(cluster)) <= 0)


def _chrome(user_data_dir):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={user_data_dir}", "--window-size=1500,1150"):
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _rows(driver):
  from selenium.webdriver.common.by import By
  return [(r.get_attribute("data-gene"), r.get_attribute("class"), r.text)
          for r in driver.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no Chromium: apt-get install chromium chromium-driver")
def test_page_in_headless_chromium(eval_dir, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  out, ann = eval_dir
  page = tmp_path / "page.html"
  proc = _cli("eval.explore", f"--map={out}", f"--out={page}", f"--annotations_dir={ann}",
              "--layout=pca", "--neighbours=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["genes"] == 48 and info["layout"] == "pca" and info["neighbours"] == 6
  assert info["bytes"] == page.stat().st_size and info["out"] == str(page)
  text = page.read_text()
  assert "<link" not in text and " src=" not in text  # nothing to fetch: opens offline

  with tempfile.TemporaryDirectory() as profile:
    driver = _chrome(profile)
    try:
      driver.get(page.as_uri())
      wait = WebDriverWait(driver, 60)
      box = wait.until(lambda d: d.find_element(By.ID, "search").is_enabled()
                       and d.find_element(By.ID, "search"))
      assert "CORUM" in driver.find_element(By.CSS_SELECTOR, ".top").text  # the recall table
      box.send_keys("gene00", Keys.ENTER)  # case does not matter
      wait.until(lambda d: len(_rows(d)) == 6)
      rows = _rows(driver)
      assert {r[0] for r in rows[:2]} == {"GENE01", "GENE02"}, rows
      known = {r[0]: r for r in rows}
      assert known["GENE01"][1] == "known" and "CORUM" in known["GENE01"][2]
      assert "StringDB" in known["GENE01"][2] and "HuMAP" not in known["GENE01"][2]
      assert known["GENE02"][1] == "candidate" and "candidate" in known["GENE02"][2]
      wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heatmap g.ytick")) == 7)
      driver.save_screenshot(str(tmp_path / "explore.png"))
      driver.find_element(By.CSS_SELECTOR, "#neighbours tr[data-gene='GENE01'] a").click()
      wait.until(lambda d: d.find_element(By.ID, "search").get_attribute("value") == "GENE01")
      assert {r[0] for r in _rows(driver)[:2]} == {"GENE00", "GENE02"}  # re-centred
      errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
      assert not errors, errors
    finally:
      driver.quit()
  assert (tmp_path / "explore.png").read_bytes()[:4] == b"\x89PNG"
  if os.environ.get("MAE_JAX_ARTIFACTS"):
    os.makedirs(os.environ["MAE_JAX_ARTIFACTS"], exist_ok=True)
    shutil.copy(tmp_path / "explore.png", os.environ["MAE_JAX_ARTIFACTS"])


def test_bad_map_is_one_line(eval_dir, tmp_path):
  (tmp_path / "empty").mkdir()
  cases = [(f"--map={tmp_path / 'missing'}", "no such eval directory"),
           (f"--map={tmp_path / 'empty'}", "no gene_embeddings.npz"),
           ("--out=x.html", "--map=EVAL_DIR is required"),
           (f"--map={eval_dir[0]}", "--neighbours")]
  for k, (arg, needle) in enumerate(cases):
    proc = _cli("eval.explore", arg, *(["--neighbours=0"] if k == 3 else []))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("eval.explore: error: ") and needle in err[0], err
  assert not list(tmp_path.glob("*.html")) and not os.path.exists(os.path.join(ROOT, "x.html"))
