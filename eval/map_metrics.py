"""Mean average precision of a map with copairs: phenotypic activity and consistency.

Two retrieval views beside recall (docs/science.md §4.4), both computed by copairs
(`copairs.map.average_precision`, then `copairs.map.mean_average_precision`, which adds a
permutation p-value per group and Benjamini-Hochberg q-values):

* activity: each well of a perturbation queries its replicate wells (positives) against the
  control wells of its plate (negatives); the mAP per perturbation says whether its replicates
  stand apart from controls. Reported: the mean mAP and the fraction of perturbations retrieved
  at q < 0.05 ("fraction_active").
* consistency: on the gene map, each gene queries the genes of its annotated group (positives)
  against genes of the source's other groups (negatives). A source holds pairs, not groups; the
  groups are the connected components of its pair graph among the map's genes, so every gene is
  annotated to one group. Components above `max_group` genes are networks rather than
  complexes and are left out (their count is reported). Per source: mean mAP, the fraction of
  groups retrieved at q < 0.05 ("fraction_consistent").

copairs is optional (pip install -e ".[profiling]"); without it `evaluate` returns SKIPPED.
"""
import numpy as np
import pandas as pd

from eval import aggregate as agg
from eval import benchmarks

SKIPPED = {"skipped": "copairs not installed: pip install -e .[profiling]"}
NULL_SIZE = 10000  # permutation null per (positives, total) configuration; p >= 1/(NULL_SIZE+1)
THRESHOLD = 0.05
MAX_GROUP = 50
SEED = 0


def available() -> bool:
  import importlib.util
  return importlib.util.find_spec("copairs") is not None


def _map_table(ap, sameby, null_size, seed):
  from copairs import map as cmap
  return cmap.mean_average_precision(ap, sameby, null_size=null_size, threshold=THRESHOLD,
                                     seed=seed, progress_bar=False)


def _summary(table, key, threshold=THRESHOLD):
  q = table["corrected_p_value"].to_numpy(float)
  return {key: int(len(table)), "mean_average_precision": float(table["mean_average_precision"]
                                                                .mean()),
          "median_average_precision": float(table["mean_average_precision"].median()),
          "fraction_retrieved": float(np.mean(q < threshold)), "q_threshold": threshold,
          "retrieved": int(np.sum(q < threshold))}


def activity_inputs(x, meta, control="EMPTY_control", controls=None):
  """(profiles metadata, features) for activity: test wells + control wells (`controls`, a
  mask, default: the wells labelled `control`).

  Columns: perturbation (the map label; controls keep the control name), is_control,
  reference (copairs' reference index: the row for controls, -1 otherwise, so controls never
  pair with each other as positives) and plate (experiment|plate when known, for negatives)."""
  ctrl = agg.control_mask(meta, control)[0] if controls is None else np.asarray(controls, bool)
  keep = ctrl | ~agg.excluded_from_map(meta, control)
  labels = agg.map_labels(meta)
  plate = np.full(len(meta), "all", object)
  if "plate" in meta:
    plate = meta["plate"].astype(str).to_numpy(object)
    if "experiment" in meta:
      plate = (meta["experiment"].astype(str) + "|" + meta["plate"].astype(str)).to_numpy(object)
  prof = pd.DataFrame({"perturbation": np.where(ctrl, control, labels),
                       "is_control": ctrl, "plate": plate})[keep].reset_index(drop=True)
  prof["reference"] = np.where(prof["is_control"], np.arange(len(prof)), -1)
  return prof, np.asarray(x, np.float32)[keep]


def activity(x, meta, control="EMPTY_control", controls=None, null_size=NULL_SIZE, seed=SEED):
  """(summary, per-perturbation table) of phenotypic activity against controls."""
  from copairs import map as cmap
  prof, feats = activity_inputs(x, meta, control, controls)
  if not prof["is_control"].any():
    return {"skipped": "no control wells"}, None
  # Negatives on the query's own plate when every plate holds controls (the copairs/JUMP recipe).
  same_plate = prof.groupby("plate")["is_control"].any().all()
  neg_sameby = ["plate"] if same_plate else []
  pos = ["perturbation", "reference"]
  counts = prof[~prof["is_control"]]["perturbation"].value_counts()
  if not (counts >= 2).any():
    return {"skipped": "no perturbation with >= 2 wells"}, None
  ap = cmap.average_precision(prof, feats, pos_sameby=pos, pos_diffby=[],
                              neg_sameby=neg_sameby, neg_diffby=pos, progress_bar=False)
  ap = ap[~ap["is_control"]].reset_index(drop=True)
  table = _map_table(ap, pos, null_size, seed)
  summary = {**_summary(table, "perturbations"), "negatives": "same-plate controls"
             if neg_sameby else "all controls", "null_size": null_size}
  return summary, table[["perturbation", "mean_average_precision", "p_value",
                         "corrected_p_value"]]


def consistency_inputs(labels, x, pairs, max_group=MAX_GROUP):
  """(profiles metadata with gene and group, features, info) of one source on the gene map."""
  from scipy import sparse
  from scipy.sparse import csgraph
  labels = np.asarray(labels).astype(str)
  index = {g: k for k, g in enumerate(labels)}
  i, j = benchmarks.filter_pairs(pairs, index)
  n = len(labels)
  graph = sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
  _, comp = csgraph.connected_components(graph, directed=False)
  sizes = np.bincount(comp)
  annotated = np.zeros(n, bool)
  annotated[i], annotated[j] = True, True
  keep = annotated & (sizes[comp] <= max_group)
  large = np.unique(comp[annotated & (sizes[comp] > max_group)])
  prof = pd.DataFrame({"gene": labels[keep], "group": comp[keep].astype(np.int64)})
  info = {"groups": int(len(np.unique(comp[keep]))), "genes": int(keep.sum()),
          "large_components_left_out": int(len(large)),
          "genes_in_large_components": int(sizes[large].sum()), "max_group": max_group}
  return prof, np.asarray(x, np.float32)[keep], info


def consistency(labels, x, pairs, max_group=MAX_GROUP, null_size=NULL_SIZE, seed=SEED):
  """(summary, per-group table) of one source's consistency on the gene map."""
  from copairs import map as cmap
  prof, feats, info = consistency_inputs(labels, x, pairs, max_group)
  if info["groups"] < 2:
    return {**info, "skipped": "fewer than 2 annotated groups of <= max_group genes in the "
            "map"}, None
  ap = cmap.average_precision(prof, feats, pos_sameby=["group"], pos_diffby=[], neg_sameby=[],
                              neg_diffby=["group"], progress_bar=False)
  table = _map_table(ap, ["group"], null_size, seed)
  return {**info, **_summary(table, "groups_scored"), "null_size": null_size}, table


def evaluate(map_labels, map_x, pairs_by_source, wells=None, control="EMPTY_control",
             null_size=NULL_SIZE, max_group=MAX_GROUP, seed=SEED) -> dict:
  """recall.json's "mean_average_precision": {"activity": {...}, "consistency": {source: {...}}}.

  `wells`: (corrected well embeddings, well metadata, control mask or None) for activity; None
  skips it."""
  if not available():
    return dict(SKIPPED)
  out = {"activity": {"skipped": "needs well-level embeddings"}, "consistency": {},
         "settings": {"null_size": null_size, "threshold": THRESHOLD, "max_group": max_group,
                      "seed": seed}}
  if wells is not None:
    x, meta, controls = wells
    out["activity"] = activity(x, meta, control, controls, null_size, seed)[0]
  for src, pairs in pairs_by_source.items():
    out["consistency"][src] = consistency(map_labels, map_x, pairs, max_group, null_size,
                                          seed)[0]
  return out
