"""Known-relationship recall of a screen's embeddings: correct -> aggregate -> arm-centre -> recall.

  python -m eval.recall --embeddings=FILE [--metadata=CSV] --out=DIR
  python -m eval.recall --ckpt=DIR --manifest=PATH --out=DIR

Writes DIR/recall.json ({"n_perturbations", "sources": {src: {"pairs", "recall_0.05_0.95",
"recall_0.1_0.9", ...}}, "consistency", "batch_correction", "arm_correction", "settings", ...}),
recall.csv, recall.png and gene_embeddings.npz (labels + the corrected map); the last stdout
line is recall.json. In-process: `score_wells(emb, meta, **options)` / `score_map(labels, x,
**options)` return that dict (plus "_map"), `write_outputs(result, out_dir, title)` writes it.

Choices: a source with fewer than 20 of its genes in the map is reported as skipped (recall
null, with the reason) unless --sources was given explicitly, in which case it is an error.
Arm centring (default "auto") uses the unexpressed genes (zFPKM < -3) of --expression (a CSV
with gene,zFPKM, or `u2os` for the public U2OS proxy) and is skipped without one; an explicit
--arm_correction=true without --expression centres on the mean of all map genes on the arm
(the fallback of docs/science.md §3.5); --arm_correction=false turns it off. Duplicate map labels
always raise.
"""
import contextlib
import json
import os
import time

import numpy as np

from eval import EvalError, define_embedding_flags
from eval import aggregate as agg
from eval import benchmarks
from eval import correct
from eval import map_metrics
from eval import normalize
from eval import profiles
from eval import tables
from mae_jax.data import resources
from mae_jax.util import cli, files

DEFAULTS = dict(batch_correction="tvn", coral=True, batch_key="experiment",
                control="EMPTY_control", arm_correction="auto", expression=None,
                sources=resources.SOURCES, annotations_dir=None, aggregation="mean",
                perturbation_types=None, thresholds=benchmarks.THRESHOLDS,
                min_entities=benchmarks.MIN_ENTITIES, strict_sources=False, pairs_by_source=None,
                control_query=None, feature_select=(), feature_names=None, blocklist=(),
                spherize_epsilon=normalize.SPHERIZE_EPSILON, spherize_method="ZCA-cor")
METHODS = ("none", "tvn", "pca_centerscale", "mad_robustize", "spherize")
_MAP_KEYS = ("arm_correction", "expression", "sources", "annotations_dir", "thresholds",
             "min_entities", "strict_sources", "pairs_by_source")


def load_expression(expression):
  """None, a {gene: zFPKM} dict, "u2os" (efaar 0.1.0 proxy) or a CSV with gene and zFPKM."""
  if expression is None or isinstance(expression, dict):
    return expression
  if str(expression).lower() == "u2os":
    return resources.u2os_expression()
  import pandas as pd
  df = tables.normalise_columns(tables.read_csv(expression))
  col = next((c for c in df.columns if str(c).lower() == "zfpkm"), None)
  if "gene" not in df or col is None:
    raise tables.TableError(f"{expression}: expression CSV needs columns gene and zFPKM")
  vals = pd.to_numeric(df[col], errors="coerce")
  return {str(g): float(v) for g, v in zip(df["gene"], vals) if v == v}


def load_sources(sources, annotations_dir=None) -> dict:
  return {s: resources.load_relationships(s, annotations_dir) for s in sources}


def _batches(meta, batch_key):
  """One batch label per row from the batch_key column(s); None for batch_key "none"."""
  if str(batch_key).strip().lower() in ("", "none"):
    return None
  cols = []
  for name in str(batch_key).split(","):
    name = name.strip()
    col = name if name in meta else tables.RENAME.get(name.lower(), name.lower())
    if col not in meta:
      raise tables.TableError(f"batch key column {name!r} not in the metadata (columns: "
                              f"{', '.join(map(str, meta.columns))})")
    cols.append(meta[col].astype(str))
  out = cols[0]
  for c in cols[1:]:
    out = out + "|" + c
  return out.to_numpy()


def describe(result: dict) -> str:
  """A short method line for titles, e.g. "TVN + CORAL, arm-centred (unexpressed genes)"."""
  bc = result.get("batch_correction", {})
  name = {"tvn": "TVN", "pca_centerscale": "PCA-CenterScale", "none": "no batch correction",
          "mad_robustize": "MAD robustize", "spherize": "spherize (ZCA)"}
  text = name.get(bc.get("method"), "precomputed map")
  if bc.get("method") == "tvn" and "coral" in bc:
    text += " + CORAL"
  arm = result.get("arm_correction", {})
  if arm.get("mode"):
    text += f", arm-centred ({arm['mode'].replace('_', ' ')})"
  return text


def score_map(labels, x, **options) -> dict:
  """Arm centring and recall of an aggregated map (one row per unique label)."""
  o = {**DEFAULTS, **options}
  t0 = time.perf_counter()
  pairs = o["pairs_by_source"] or load_sources(o["sources"], o["annotations_dir"])
  labels = np.asarray(labels).astype(str)
  benchmarks.check_labels(labels)
  x = np.asarray(x, np.float32)
  expression = load_expression(o["expression"])
  arm = o["arm_correction"]
  out = {"arm_correction": {"mode": None, "skipped": "arm_correction=false"}}
  if arm == "auto" and expression is None:
    out["arm_correction"]["skipped"] = ("no expression table for the unexpressed-gene arm means; "
                                        "pass arm_correction=true to centre on all genes")
  elif arm:
    arms = resources.gene_arms()
    related = set().union(*map(set, pairs.values())) if pairs else set()
    before = correct.arm_mates_cosine(labels, x, arms, related)
    x, info = correct.arm_correct(labels, x, arms, expression)
    out["arm_correction"] = {**info, "arm_mates_before": before,
                             "arm_mates_after": correct.arm_mates_cosine(labels, x, arms,
                                                                         related)}
  rec = benchmarks.relationship_recall(x, labels, pairs, o["thresholds"], o["min_entities"],
                                       strict=o["strict_sources"])
  keys = [benchmarks.recall_key(lo, hi) for lo, hi in o["thresholds"]]
  skipped = {}
  for name, src in rec["sources"].items():
    if "skipped" in src:
      src.update({k: None for k in keys})
      skipped[name] = src["entities"]
  if skipped:  # reported, not silently dropped: recall.json "skipped_sources" and stderr
    correct.warn(f"sources skipped with fewer than {max(o['min_entities'], 2)} genes in the map: "
                 + ", ".join(f"{k} ({n})" for k, n in skipped.items()))
  return {"n_perturbations": rec["n_perturbations"], "sources": rec["sources"],
          "skipped_sources": {"min_entities": max(o["min_entities"], 2), "entities": skipped},
          "null_pairs": rec["null_pairs"], **out,
          "chance": {k: round(lo + 1 - hi, 12) for k, (lo, hi) in zip(keys, o["thresholds"])},
          "seconds_recall": round(time.perf_counter() - t0, 3),
          "_map": {"labels": labels, "embeddings": x}}


def score_wells(emb, meta, **options) -> dict:
  """Batch correction on controls -> per-perturbation aggregation -> `score_map`."""
  o = {**DEFAULTS, **options}
  meta = tables.normalise_columns(meta.reset_index(drop=True).copy())
  x = np.asarray(emb, np.float32)
  if len(meta) != len(x):
    raise EvalError(f"{len(x)} embeddings but {len(meta)} metadata rows")
  if "perturbation" not in meta:
    raise tables.TableError("well metadata has no perturbation column")
  o["pairs_by_source"] = o["pairs_by_source"] or load_sources(o["sources"], o["annotations_dir"])
  if o["control_query"]:  # e.g. "Metadata_pert_type == 'negcon'": these rows are the controls
    meta["is_control"] = profiles.query_mask(meta, o["control_query"])
  if o["strict_sources"]:  # fail before the expensive steps
    _check_sources(agg.map_labels(meta)[~agg.excluded_from_map(meta, o["control"])],
                   o["pairs_by_source"], o["min_entities"])
  t0 = time.perf_counter()
  if o["control_query"]:
    ctrl, how = meta["is_control"].to_numpy(bool), f"query: {o['control_query']}"
  else:
    ctrl, how = agg.control_mask(meta, o["control"])
  x, info = _correct(x, ctrl, meta, o)
  info["controls_from"] = how
  info["control_wells"] = int(ctrl.sum())
  seconds_correction = time.perf_counter() - t0
  labels, gmap, _ = agg.aggregate_wells(x, meta, o["control"], o["aggregation"],
                                        o["perturbation_types"])
  expression = load_expression(o["expression"])
  result = score_map(labels, gmap, **{**{k: o[k] for k in _MAP_KEYS}, "expression": expression})
  result["consistency"] = _consistency(x, meta, o["control"], expression,
                                       o["perturbation_types"])
  result.update(batch_correction=info, n_wells=int(len(x)),
                seconds_correction=round(seconds_correction, 3))
  result["settings"] = _settings(o)
  result["method"] = describe(result)
  if o.get("map_metrics"):  # copairs mAP, activity + consistency (docs/science.md §4.4)
    result["mean_average_precision"] = map_metrics.evaluate(
        labels, result["_map"]["embeddings"], o["pairs_by_source"], (x, meta, ctrl), o["control"])
  return result


def _correct(x, ctrl, meta, o):
  """Batch correction (docs/science.md §3.4); feature selection runs after mad_robustize (the
  JUMP recipe: normalise, then select) and before the other methods."""
  method = o["batch_correction"]
  if method not in METHODS:
    raise EvalError(f"batch_correction must be one of {', '.join(METHODS)}, got {method!r}")
  select = list(o["feature_select"] or ())
  selection = None

  def select_features(x):
    nonlocal selection
    keep, selection = normalize.feature_select(x, select, o["feature_names"],
                                               blocklist=o["blocklist"])
    return x[:, keep]

  if select and method != "mad_robustize":
    x = select_features(x)
  uses_batches = method in ("pca_centerscale", "mad_robustize", "spherize") or o["coral"]
  batches = _batches(meta, o["batch_key"]) if uses_batches and method != "none" else None
  if method == "none":
    info = {"method": "none"}
  elif method == "tvn":
    x, info = correct.tvn(x, ctrl, batches, coral=o["coral"])
  elif method == "pca_centerscale":
    x, info = correct.pca_centerscale(x, ctrl, batches)
  elif method == "mad_robustize":
    x, info = normalize.mad_robustize(x, ctrl, batches)
    if select:
      x = select_features(x)
  else:
    x, info = normalize.spherize(x, ctrl, batches, o["spherize_epsilon"], o["spherize_method"])
  if method != "none":
    info["batch_key"] = o["batch_key"]
  if selection:
    info["feature_select"] = selection
  return x, info


def _check_sources(labels, pairs_by_source, min_entities):
  index = {g: k for k, g in enumerate(sorted(set(labels)))}
  for src, pairs in pairs_by_source.items():
    i, j = benchmarks.filter_pairs(pairs, index)
    n = len(np.union1d(i, j))
    if n < max(min_entities, 2):
      raise benchmarks.InsufficientEntities(
          f"source {src}: {n} of its genes in the map, fewer than {max(min_entities, 2)}")


def _consistency(x, meta, control, expression, perturbation_types=None):
  if expression is None:
    return {"skipped": "needs --expression: the null is the unexpressed genes (zFPKM < -3)"}
  keep = ~agg.excluded_from_map(meta, control)
  if perturbation_types:
    wanted = {t.upper() for t in perturbation_types}
    keep &= meta["perturbation_type"].astype(str).str.upper().isin(wanted).to_numpy()
  labels = agg.map_labels(meta)[keep]
  negatives = {g for g in set(labels) if expression.get(g, 0.0) < correct.UNEXPRESSED_ZFPKM}
  return benchmarks.replicate_consistency(x[keep], labels, negatives)


def _settings(o):
  keep = ("batch_correction", "coral", "batch_key", "control", "arm_correction", "aggregation",
          "perturbation_types", "min_entities", "control_query")
  s = {k: o[k] for k in keep}
  s["sources"] = list(o["pairs_by_source"] or o["sources"])
  s["thresholds"] = [list(t) for t in o["thresholds"]]
  s["feature_select"] = list(o["feature_select"] or ())
  s["expression"] = o["expression"] if isinstance(o["expression"], (str, type(None))) else "dict"
  return s


def public(result: dict) -> dict:
  """The JSON part of a result (drops "_map"), numpy scalars and arrays as plain Python."""
  data = {k: v for k, v in result.items() if not k.startswith("_")}
  return json.loads(json.dumps(data, default=_json_default))


def write_outputs(result: dict, out_dir, title: str | None = None) -> dict:
  """Writes recall.json/.csv/.png and gene_embeddings.npz atomically; returns the JSON dict."""
  from eval import plots
  os.makedirs(out_dir, exist_ok=True)
  data = public(result)
  title = title or data.get("method") or describe(data)
  # All are written before any replaces its old copy: a failure leaves the old set whole.
  with contextlib.ExitStack() as stack:

    def target(name, mode="w"):
      return stack.enter_context(files.atomic_open(os.path.join(out_dir, name), mode))
    json.dump(data, target("recall.json"), indent=1)
    keys = list(data.get("chance", {}))
    f = target("recall.csv")
    f.write(",".join(["source", "pairs", "entities"] + keys + ["skipped"]) + "\n")
    for src, r in data["sources"].items():
      vals = ["" if r.get(k) is None else f"{r[k]:.6f}" for k in keys]
      f.write(",".join([src, str(r.get("pairs", 0)), str(r.get("entities", ""))] + vals +
                       [str(r.get("skipped", "")).replace(",", ";")]) + "\n")
    plots.plot_recall(data, target("recall.png", "wb"), title)
    if "activity" in data.get("mean_average_precision", {}):  # copairs ran (eval/map_metrics.py)
      plots.plot_map_metrics(data["mean_average_precision"], target("map_metrics.png", "wb"),
                             title)
    if "_map" in result:
      labels = np.asarray(result["_map"]["labels"]).astype(str)
      emb = np.asarray(result["_map"]["embeddings"], np.float32)
      np.savez(target("gene_embeddings.npz", "wb"), labels=labels, embeddings=emb)
      # the same map as a profile table (Metadata_Perturbation, emb_0000 ...; eval/profiles.py)
      profiles.map_frame(labels, emb).to_parquet(target("gene_embeddings.parquet", "wb"),
                                                 index=False)
  return data


def _json_default(v):
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  raise TypeError(f"not JSON serialisable: {type(v).__name__}")


# ------------------------------------------------------------------------------------ CLI

def _define_flags():
  from absl import flags
  flags.DEFINE_string("embeddings", None, "table of well or perturbation embeddings "
                      "(parquet/CSV/NPZ), e.g. OpenPhenom_rxrx3_core_embeddings.parquet")
  flags.DEFINE_string("metadata", None, "well metadata CSV (e.g. metadata_rxrx3_core.csv)")
  flags.DEFINE_string("ckpt", None, "checkpoint dir (workdir or a step dir) to embed with")
  flags.DEFINE_string("manifest", None, "manifest.json of the prepared dataset (with --ckpt)")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_enum("batch_correction", "tvn", list(METHODS),
                    "well-level batch correction fitted on control wells (docs/science.md §3.4): "
                    "mad_robustize and spherize are pycytominer's normalize methods, per batch")
  flags.DEFINE_list("feature_select", [], "pycytominer feature_select operations, in order: "
                    + ", ".join(normalize.OPERATIONS) + " (after mad_robustize, else before the "
                    "batch correction)")
  flags.DEFINE_string("blocklist", None, "feature names to drop with --feature_select=blocklist, "
                      "one a line (e.g. pycytominer's data/blocklist_features.txt)")
  flags.DEFINE_float("spherize_epsilon", normalize.SPHERIZE_EPSILON, "added to the singular "
                     "values in --batch_correction=spherize (pycytominer's epsilon)")
  flags.DEFINE_enum("spherize_method", "ZCA-cor", list(normalize.SPHERIZE_METHODS),
                    "--batch_correction=spherize: ZCA on standardised (ZCA-cor, pycytominer "
                    "normalize's default) or centred features")
  flags.DEFINE_string("perturbation_key", None, "with --embeddings: the perturbation column(s), "
                      "comma-separated and coalesced row by row; default for a profile table: "
                      "the first present of " + ", ".join(profiles.PERTURBATION_KEYS))
  flags.DEFINE_string("control_query", None, "pandas query selecting the control wells, e.g. "
                      "\"Metadata_pert_type == 'negcon'\" (instead of --control)")
  flags.DEFINE_bool("coral", True, "TVN's per-batch CORAL step")
  flags.DEFINE_string("batch_key", "experiment", "batch column(s), comma-separated, any "
                      "metadata column (e.g. Metadata_Plate; experiment_name is accepted for "
                      "experiment); none = one batch")
  flags.DEFINE_string("control", "EMPTY_control", "perturbation label of control wells")
  flags.DEFINE_bool("arm_correction", None, "chromosome-arm centring of the gene map; by default "
                    "only with --expression (unexpressed-gene arm means); =true without "
                    "--expression centres on the mean of all map genes per arm")
  flags.DEFINE_string("expression", None, "CSV with gene,zFPKM (or 'u2os') for arm centring "
                      "on unexpressed genes and the consistency null")
  define_embedding_flags(" (with --ckpt)")
  flags.DEFINE_list("sources", list(resources.SOURCES), "relationship sources to score")
  flags.DEFINE_string("annotations_dir", None, "folder with {source}.txt annotation files")
  flags.DEFINE_enum("aggregation", "mean", ["mean", "median"], "wells -> perturbation")
  flags.DEFINE_list("perturbation_types", None, "keep only these types in the map (e.g. CRISPR)")
  flags.DEFINE_integer("min_entities", benchmarks.MIN_ENTITIES, "genes a source needs in the map")
  flags.DEFINE_string("title", None, "plot title (default: the method)")
  flags.DEFINE_bool("explore", True, "also write DIR/map.html, the browsable map "
                    "(python -m eval.explore)")
  flags.DEFINE_bool("map_metrics", True, "copairs mean average precision (activity against "
                    "controls, consistency within annotated groups) into recall.json and map.png; "
                    "recorded as skipped without copairs (docs/science.md §4.4)")


def run(flag_values) -> dict:
  f = flag_values
  if not f.out:
    raise EvalError("--out is required")
  if bool(f.embeddings) == bool(f.ckpt):
    raise EvalError("give exactly one of --embeddings=FILE or --ckpt=DIR (with --manifest)")
  options = dict(batch_correction=f.batch_correction, coral=f.coral, batch_key=f.batch_key,
                 control=f.control, expression=f.expression,
                 arm_correction="auto" if f.arm_correction is None else f.arm_correction,
                 sources=tuple(f.sources), annotations_dir=f.annotations_dir,
                 aggregation=f.aggregation, perturbation_types=f.perturbation_types,
                 min_entities=f.min_entities, strict_sources=f["sources"].present,
                 control_query=f.control_query, feature_select=tuple(f.feature_select),
                 spherize_epsilon=f.spherize_epsilon, spherize_method=f.spherize_method,
                 blocklist=tuple(normalize.read_blocklist(f.blocklist)) if f.blocklist else ())
  options["map_metrics"] = f.map_metrics
  if f.expression and f.expression.lower() != "u2os" and not os.path.isfile(f.expression):
    raise tables.TableError(f"{f.expression}: expression file not found")
  if f.ckpt:
    if not f.manifest:
      raise EvalError("--ckpt needs --manifest=PATH")
    if f.metadata:
      raise EvalError("--metadata goes with --embeddings, not --ckpt")
    from eval.embed import embed_wells  # the encoder stack is only needed here
    emb, meta = embed_wells(f.ckpt, f.manifest, pooling=f.pooling, block=f.block,
                            batch_size=f.batch_size, adabn=f.adabn)
    level = "wells"
  else:
    emb, meta, level, notes = tables.load_embeddings(f.embeddings, f.metadata,
                                                     f.perturbation_key)
    options["feature_names"] = meta.attrs.get("feature_names")
    for note in notes:
      correct.warn(note)
  if level == "wells":
    result = score_wells(emb, meta, **options)
  else:
    correct.warn("the table has one row per perturbation: no batch correction or aggregation")
    map_opts = {k: v for k, v in options.items() if k in _MAP_KEYS}
    labels = meta["perturbation"].astype(str).to_numpy()
    result = score_map(labels, emb, **map_opts)
    result.update(batch_correction={"method": "precomputed"}, settings=_settings(
        {**DEFAULTS, **options}))
    result["method"] = describe(result)
    if f.map_metrics:  # no wells: consistency only (docs/science.md §4.4)
      result["mean_average_precision"] = map_metrics.evaluate(
          result["_map"]["labels"], result["_map"]["embeddings"],
          load_sources(f.sources, f.annotations_dir))
  data = write_outputs(result, f.out, f.title)
  if f.arm_correction is None and not f.expression:  # recall.json says so too
    correct.warn("arm correction skipped: no expression table; pass --expression=CSV (gene,"
                 "zFPKM; the synthetic screen's ground_truth/expression.csv) or --expression=u2os "
                 "as the README's results do, or --arm_correction=true (docs/science.md §3.5)")
  if f.explore:  # DIR/map.html, the browsable map (eval/explore.py)
    from eval import explore
    explore.write_page(f.out, sources=list(f.sources), annotations_dir=f.annotations_dir)
  return data


def main(argv):
  from absl import flags
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # keep stderr for warnings and the error line
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.print_result(run(flags.FLAGS))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
