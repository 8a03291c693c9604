r"""Writes an embedded synthetic CRISPR screen in the RxRx3 file layout, with its ground truth.

  python -m data_prep.synthetic --out=synth [--genes=300] [--seed=0] [--workers=2] \
      [--style=default|granular]

Layout (docs/data_layouts.md §2, §6): OUT/metadata.csv (the 10 RxRx3 columns), 16-bit PNGs at
OUT/images/{experiment_name}/Plate{plate}/{address}_s1_w{1..6}.png on 1536-well plates
(addresses A01..AF48), and OUT/ground_truth/: genes.csv, expression.csv, planted_pairs.csv,
phenotypes.npz, wells.csv, screen.json, withheld_pairs.csv and annotations/{source}.txt.

Withheld modules (--withhold, a fraction of the planted modules): their phenotype is planted,
but their pairs are in ground_truth/withheld_pairs.csv and removed from the screen's annotation
files (ground_truth/annotations: each source's pairs inside the screen, for --annotations_dir),
so `eval.neighbors --top_pairs=N` can be scored on discoveries no source names
(docs/science.md §4.5).

Design: every experiment holds every guide of every gene once, spread at random over its plates,
plus --controls_per_plate EMPTY_control wells per plate (TVN fits on them, and needs more control
wells per experiment than embedding dimensions, docs/science.md §6). Batch effects are per experiment
and per plate (per-channel gain and background, illumination falloff, defocus, noise level), with
a gradient across the plate and a little per-well jitter. The biology is in phenotypes.py and the
pixels in render.py; --style picks how cells look and how a gene's latent acts on them (styles.py),
with the same genes, modules, wells, latents and batch effects in every style.

Same flags and seed -> the same bytes, whatever --workers. Wells whose six PNGs exist are skipped,
so an interrupted run is finished by rerunning it; metadata.csv and ground_truth/ are written
last. The last stdout line is one JSON object with counts and the style.
"""
import argparse
import csv
import ctypes
import ctypes.util
import io
import json
import multiprocessing
import os
import sys
import time
import zipfile

import numpy as np

from data_prep import phenotypes
from data_prep import render
from data_prep import styles
from mae_jax.util import cli, files
from mae_jax.util.errors import UserError

METADATA_COLUMNS = ("well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES",
                    "concentration", "perturbation_type", "cell_type")
CONTROL = "EMPTY_control"
ROWS = [chr(ord("A") + i) for i in range(26)] + ["A" + chr(ord("A") + i) for i in range(6)]
COLS = 48
FORMAT = "mae_jax-synthetic-v1"
WITHHOLD = 0.2  # share of planted modules left out of ground_truth/annotations
_MARKER = ".synthetic_run.json"  # parameters of an unfinished run, so a rerun can resume it


class SyntheticError(UserError, ValueError):
  """A user mistake; the message is the one line shown."""


def address(row, col):
  """0-based plate position -> 1536-well address such as "A01" or "AF48"."""
  return f"{ROWS[row]}{col + 1:02d}"


# ----------------------------------------------------------------------------- design


def _plate_effects(n_exp, n_plates, rng):
  """Per (experiment, plate): the parameters of render.apply_effects before per-well jitter."""
  out = {}
  for e in range(n_exp):
    log_gain = rng.normal(0, 0.3, 6)
    offset = rng.uniform(120, 360, 6)
    blur, vignette, shot = rng.uniform(0, 0.7), rng.uniform(0.1, 0.3), rng.uniform(0.6, 1.4)
    for p in range(n_plates):
      out[e, p] = {
          "log_gain": log_gain + rng.normal(0, 0.2, 6),
          "offset": offset * rng.uniform(0.85, 1.15, 6),
          "blur": blur + rng.uniform(0, 0.6),
          "vignette": float(np.clip(vignette + rng.normal(0, 0.06), 0, 0.6)),
          "centre": 0.5 + rng.normal(0, 0.06, 2),
          "shot": shot * rng.uniform(0.8, 1.25),
          "read": rng.uniform(4, 10),
          "gradient": rng.uniform(-1, 1, 2),  # gain tilt across the plate (rows, columns)
      }
  return out


def _well_effects(plate, row, col, rng):
  gy, gx = plate["gradient"]
  tilt = 0.06 * (gy * (row - 15.5) / 15.5 + gx * (col - 23.5) / 23.5)
  return {
      "gain": (np.exp(plate["log_gain"] + rng.normal(0, 0.04, 6)) * (1 + tilt)).tolist(),
      "offset": plate["offset"].tolist(),
      "vignette": plate["vignette"],
      "centre": plate["centre"].tolist(),
      "blur": float(max(0.0, plate["blur"] + rng.normal(0, 0.1))),
      "shot": float(plate["shot"]),
      "read": float(plate["read"]),
  }


def design(args):
  """Genes, phenotypes and the well table (with each well's render parameters and effects)."""
  streams = [np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(5)]
  rng_genes, rng_latent, rng_layout, rng_effects, rng_wells = streams
  style = styles.get(getattr(args, "style", styles.DEFAULT))
  gs = phenotypes.select_genes(args.genes, rng_genes, args.unexpressed_fraction)
  ph = phenotypes.gene_phenotypes(gs, rng_latent, args.latent_dim, len(style.params))
  ph.mixing = style.mixing(ph.mixing)
  plates = _plate_effects(args.experiments, args.plates, rng_effects)
  per_plate = -(-args.genes * args.guides // args.plates) + args.controls_per_plate
  if per_plate > len(ROWS) * COLS:
    raise SyntheticError(f"--plates={args.plates}: a plate would hold {per_plate} wells, a "
                         "1536-well plate holds 1536; use more --plates or fewer "
                         "--controls_per_plate")
  inner = [(r, c) for r in range(1, len(ROWS) - 1) for c in range(1, COLS - 1)]
  every = [(r, c) for r in range(len(ROWS)) for c in range(COLS)]
  wells = []
  for e in range(args.experiments):
    experiment = f"gene-{e + 1:03d}"
    perts = [(g, k) for g in gs.genes for k in range(1, args.guides + 1)]
    order = rng_layout.permutation(len(perts))
    for p, chunk in enumerate(np.array_split(order, args.plates)):
      content = [perts[i] for i in chunk] + [(CONTROL, 0)] * args.controls_per_plate
      content = [content[i] for i in rng_layout.permutation(len(content))]
      spots = inner if len(content) <= len(inner) else every
      picked = sorted(rng_layout.choice(len(spots), size=len(content), replace=False))
      for (gene, guide), s in zip(content, picked):
        row, col = spots[s]
        addr = address(row, col)
        wells.append({
            "well_id": f"{experiment}_{p + 1}_{addr}", "experiment_name": experiment,
            "plate": p + 1, "address": addr, "gene": gene, "guide": guide,
            "treatment": CONTROL if gene == CONTROL else f"{gene}_guide_{guide}",
            "effects": _well_effects(plates[e, p], row, col, rng_effects)})
  latent = phenotypes.well_latents(ph, [w["gene"] for w in wells], [w["guide"] for w in wells],
                                   rng_wells)
  for w, params in zip(wells, phenotypes.latent_to_params(latent, ph.mixing, style.params)):
    w["params"] = params
  return gs, ph, wells, latent


# ----------------------------------------------------------------------------- writing


def _csv_text(header, rows):
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buf.getvalue()


def _npz_bytes(arrays):
  """np.savez with fixed zip timestamps, so reruns give identical bytes."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, value in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      with zf.open(info, "w") as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
  return buf.getvalue()


def site_paths(out, well):
  folder = os.path.join(out, "images", well["experiment_name"], f"Plate{well['plate']}")
  return [os.path.join(folder, f"{well['address']}_s1_{c}.png") for c in render.CHANNELS]


def _tune_malloc():
  """Keeps freed ~1 MB numpy temporaries in the heap instead of unmapping them.

  With glibc's defaults each site maps and page-faults ~150 MB of fresh memory, about 15 % of the
  rendering time. No-op where mallopt is not available.
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(-3, 1 << 26)  # M_MMAP_THRESHOLD: 64 MiB
    libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD: 256 MiB
  except (OSError, AttributeError, TypeError):
    pass


def _render_task(task):
  """Renders one well unless its six PNGs exist; returns 1 if it rendered."""
  index, paths, params, effects, size, seed, style = task
  if all(os.path.exists(p) for p in paths):
    return 0
  img = styles.render_site(style, params, effects, size,
                           np.random.default_rng([seed, 1536, index]))
  os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
  for plane, path in zip(img, paths):
    # Not fsynced: thousands of PNGs, and a rerun (after an interrupted run) re-renders any well
    # whose PNGs are not all there.
    files.write(path, render.encode_png16(plane), fsync=False)
  return 1


def render_all(out, wells, size, seed, workers, style=styles.DEFAULT):
  tasks = [(i, site_paths(out, w), w["params"], w["effects"], size, seed, style)
           for i, w in enumerate(wells)]
  rendered, start, step = 0, time.time(), max(1, len(tasks) // 10)
  if workers > 1:
    # spawn, not fork: a caller may have threads (e.g. jax) that a forked child would inherit.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_tune_malloc) as pool:
      results = pool.imap_unordered(_render_task, tasks, chunksize=4)
      for k, r in enumerate(results, 1):
        rendered += r
        if k % step == 0:
          print(f"synthetic: {k}/{len(tasks)} wells ({time.time() - start:.0f} s)", file=sys.stderr)
  else:
    _tune_malloc()
    for k, t in enumerate(tasks, 1):
      rendered += _render_task(t)
      if k % step == 0:
        print(f"synthetic: {k}/{len(tasks)} wells ({time.time() - start:.0f} s)", file=sys.stderr)
  return rendered


def ground_truth_files(gs, ph, wells, latent, parameters):
  """{relative path: bytes or text} of everything beside the images."""
  pairs = phenotypes.planted_pairs(gs)
  withheld = set(phenotypes.withheld_modules(gs, parameters.get("withhold", WITHHOLD),
                                             parameters["seed"]))
  withheld_pairs = [p for p in pairs if set(p[3].split(";")) & withheld]
  annotations = phenotypes.screen_annotations(gs.genes, [p[:2] for p in withheld_pairs])
  memberships = {g: [] for g in gs.genes}
  for m in gs.modules:
    for g in m.genes:
      memberships[g].append(m.id)
  genes_rows = [(g, gs.arm[g], gs.expressed[g], f"{gs.zfpkm[g]:.4f}", ";".join(memberships[g]))
                for g in gs.genes]
  dim = latent.shape[1]
  features = [f"feature_{i}" for i in range(dim)]
  style = styles.get(parameters.get("style", styles.DEFAULT))
  param_names = list(style.params)
  unexpressed_per_arm = {}
  for g in gs.genes:
    if not gs.expressed[g]:
      unexpressed_per_arm[gs.arm[g]] = unexpressed_per_arm.get(gs.arm[g], 0) + 1
  controls = sum(w["gene"] == CONTROL for w in wells)
  counts = {
      "genes": len(gs.genes), "wells": len(wells), "control_wells": controls,
      "experiments": len({w["experiment_name"] for w in wells}),
      "plates": len({(w["experiment_name"], w["plate"]) for w in wells}),
      "planted_pairs": len(pairs), "modules": len(gs.modules),
      "unexpressed_genes": sum(not v for v in gs.expressed.values()),
  }
  screen = {
      "format": FORMAT, "layout": "rxrx3", "parameters": parameters, "counts": counts,
      "channels": list(render.CHANNELS), "stains": list(render.STAINS), "bit_depth": 16,
      "image_size": parameters["image_size"], "cell_type": "HUVEC", "control": CONTROL,
      "latent_dim": dim, "render_params": {k: list(v) for k, v in style.params.items()},
      "focus_arms": gs.focus_arms,
      "arms_over_20_unexpressed": sorted(a for a, n in unexpressed_per_arm.items() if n > 20),
      "benchmark_pairs_in_screen": phenotypes.benchmark_coverage(gs.genes),
      "planting_sources": list(phenotypes.PLANT_SOURCES),
      "modules": [{"id": m.id, "source": m.source, "genes": m.genes} for m in gs.modules],
      "withheld_modules": sorted(withheld), "withheld_pairs": len(withheld_pairs),
  }
  well_params = np.array([[w["params"][k] for k in param_names] for w in wells], np.float32)
  arrays = {
      "genes": np.array(gs.genes), "gene_latent": ph.latent.astype(np.float32),
      "gene_arm_component": ph.arm_component.astype(np.float32),
      "gene_phenotype": (ph.latent - ph.arm_component).astype(np.float32),
      "gene_arm": np.array([gs.arm[g] for g in gs.genes]),
      "expressed": np.array([gs.expressed[g] for g in gs.genes]),
      "arms": np.array(ph.arms), "arm_vectors": ph.arm_vectors.astype(np.float32),
      "modules": np.array([m.id for m in gs.modules]),
      "module_sources": np.array([m.source for m in gs.modules]),
      "module_vectors": ph.module_vectors.astype(np.float32), "membership": ph.membership,
      "well_ids": np.array([w["well_id"] for w in wells]),
      "well_genes": np.array([w["gene"] for w in wells]),
      "well_latent": latent.astype(np.float32), "param_names": np.array(param_names),
      "well_params": well_params, "mixing": ph.mixing.astype(np.float32),
  }
  return {
      "ground_truth/genes.csv": _csv_text(("gene", "arm", "expressed", "zFPKM", "modules"),
                                          genes_rows),
      "ground_truth/expression.csv": _csv_text(
          ("gene", "zFPKM"), [(g, f"{gs.zfpkm[g]:.4f}") for g in gs.genes]),
      "ground_truth/planted_pairs.csv": _csv_text(("entity1", "entity2", "source", "modules"),
                                                  pairs),
      "ground_truth/withheld_pairs.csv": _csv_text(("entity1", "entity2", "source", "modules"),
                                                   withheld_pairs),
      **{f"ground_truth/annotations/{src}.txt": _csv_text(("entity1", "entity2"), rel)
         for src, rel in annotations.items()},
      "ground_truth/wells.csv": _csv_text(
          ["well_id"] + features,
          [[w["well_id"]] + [f"{v:.6f}" for v in row] for w, row in zip(wells, latent)]),
      "ground_truth/phenotypes.npz": _npz_bytes(arrays),
      "metadata.csv": _csv_text(METADATA_COLUMNS, [
          (w["well_id"], w["experiment_name"], w["plate"], w["address"], w["gene"], w["treatment"],
           "", "", "CRISPR", "HUVEC") for w in wells]),
      # Written last: its presence marks a finished screen.
      "ground_truth/screen.json": json.dumps(screen, indent=1, sort_keys=True) + "\n",
  }, counts


# ----------------------------------------------------------------------------- CLI


def _parser():
  p = cli.ArgumentParser(prog="python -m data_prep.synthetic",
                         description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output folder (created; may hold an unfinished run)")
  p.add_argument("--genes", type=int, default=300, help="number of genes (real symbols)")
  p.add_argument("--guides", type=int, default=3,
                 help="guides per gene (one well each per experiment)")
  p.add_argument("--experiments", type=int, default=2, help="experiments (gene-001, ...)")
  p.add_argument("--plates", type=int, default=4, help="1536-well plates per experiment")
  p.add_argument("--controls_per_plate", type=int, default=64, help="EMPTY_control wells per plate")
  p.add_argument("--image_size", type=int, default=512, help="site width and height in pixels "
                 "(RxRx3: 2048; the pixel size is fixed, so larger sites show more cells)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
  p.add_argument("--unexpressed_fraction", type=float, default=0.25,
                 help="share of genes declared unexpressed (zFPKM < -3; arm component only)")
  p.add_argument("--latent_dim", type=int, default=phenotypes.LATENT_DIM,
                 help="dimensions of the latent phenotype space")
  p.add_argument("--style", default=styles.DEFAULT,
                 help=f"morphology style, one of {', '.join(styles.STYLES)}: how cells look and "
                 "how a gene's latent acts on them; the ground truth is the same in every style "
                 "(docs/data_layouts.md §6)")
  p.add_argument("--withhold", type=float, default=WITHHOLD,
                 help="share of planted modules whose pairs are left out of "
                 "ground_truth/annotations and listed in ground_truth/withheld_pairs.csv, to "
                 "score discoveries (eval.neighbors --top_pairs; docs/science.md §4.5)")
  return p


def _check(args):
  bounds = {"genes": (8, 3000), "guides": (1, 20), "experiments": (1, 999), "plates": (1, 48),
            "controls_per_plate": (1, 1536), "image_size": (64, 4096), "workers": (1, 256),
            "latent_dim": (2, 256)}
  for name, (lo, hi) in bounds.items():
    v = getattr(args, name)
    if not lo <= v <= hi:
      raise SyntheticError(f"--{name}={v}: expected an integer from {lo} to {hi}")
  if args.image_size % 32:
    raise SyntheticError(f"--image_size={args.image_size}: expected a multiple of 32")
  if args.style not in styles.STYLES:
    raise SyntheticError(f"--style={args.style}: expected one of {', '.join(styles.STYLES)}")
  if not 0 <= args.withhold <= 1:
    raise SyntheticError(f"--withhold={args.withhold}: expected 0 to 1")
  if not 0 <= args.unexpressed_fraction <= 0.6:
    raise SyntheticError(f"--unexpressed_fraction={args.unexpressed_fraction}: expected 0 to 0.6")


def _claim(out, parameters):
  """Creates OUT or checks that it holds a (finished or unfinished) run with the same flags."""
  done = os.path.join(out, "ground_truth", "screen.json")
  marker = os.path.join(out, _MARKER)
  for path in (done, marker):
    if os.path.exists(path):
      with open(path) as f:
        try:
          prev = json.load(f)
        except json.JSONDecodeError:
          raise SyntheticError(f"{path}: not valid JSON; remove it or choose a new --out") from None
      prev = prev.get("parameters") if path == done else prev
      if prev != parameters:
        diff = sorted(k for k in set(prev or {}) | set(parameters)
                      if (prev or {}).get(k) != parameters.get(k))
        raise SyntheticError(f"--out={out}: holds a screen made with other flags "
                             f"({', '.join(diff)}); rerun with the same flags or choose a new "
                             "--out")
      return
  if os.path.isfile(out):
    raise SyntheticError(f"--out={out}: is a file, expected a folder")
  if os.path.isdir(out) and os.listdir(out):
    raise SyntheticError(f"--out={out}: folder is not empty and holds no synthetic screen; "
                         "choose a new or empty folder")
  os.makedirs(out, exist_ok=True)
  files.write(marker, json.dumps(parameters, sort_keys=True))


def generate(args):
  start = time.time()
  _check(args)
  parameters = {k: getattr(args, k) for k in ("genes", "guides", "experiments", "plates",
                                              "controls_per_plate", "image_size", "seed",
                                              "unexpressed_fraction", "latent_dim")}
  parameters["format"] = FORMAT
  if args.style != styles.DEFAULT:  # absent for the default, so its screen.json is unchanged
    parameters["style"] = args.style
  if args.withhold != WITHHOLD:  # likewise: earlier screens resume with the default
    parameters["withhold"] = args.withhold
  _claim(args.out, parameters)
  gs, ph, wells, latent = design(args)
  rendered = render_all(args.out, wells, args.image_size, args.seed, args.workers, args.style)
  outputs, counts = ground_truth_files(gs, ph, wells, latent, parameters)
  os.makedirs(os.path.join(args.out, "ground_truth", "annotations"), exist_ok=True)
  for rel, data in outputs.items():
    files.write(os.path.join(args.out, rel), data)
  marker = os.path.join(args.out, _MARKER)
  if os.path.exists(marker):
    os.remove(marker)
  return {"out": args.out, **counts, "rendered": rendered, "skipped": len(wells) - rendered,
          "image_size": args.image_size, "style": args.style,
          "seconds": round(time.time() - start, 1)}


def main(argv=None):
  """The command line; a user mistake raises a cli.UserError (cli.run shows it as one line)."""
  print(json.dumps(generate(_parser().parse_args(argv))))


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
