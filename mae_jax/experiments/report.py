"""The study's report: report.json (docs/interfaces.md §3), report.md and three figures.

    data = build(...)          # every arm, the scaling grid, Spearman, claims; all from run files
    write(out, data)           # DIR/report.json, report.md, recall.png, scaling.png, relative.png

Every number is a recall (5/95, two-sided; docs/science.md §4.1) with its binomial standard error
sqrt(r (1 - r) / pairs) (over seeds: the binomial SE of the mean recall and the seeds' spread,
added in quadrature). A source-mean carries the mean of the sources' SEs (the SE if their errors
were perfectly correlated: the sources share genes, so it is the cautious choice). A claim holds
when its difference is at least twice its SE, does not hold when it is at least twice its SE the
other way, and is within noise otherwise.
"""
import json
import math
import os

import numpy as np

from mae_jax.demo import report as demo_report
from mae_jax.experiments import arms
from mae_jax.util import files

SOURCES, KEY, CHANCE = demo_report.SOURCES, demo_report.KEY, demo_report.CHANCE
Z = 2.0  # a difference of Z standard errors or more is not noise
FIGURES = ("recall.png", "scaling.png", "relative.png")


# -- numbers ------------------------------------------------------------------------------------
def _se(r, pairs):
  return math.sqrt(r * (1 - r) / pairs) if r is not None and pairs else None


def per_source(recall_json):
  """{source: {"recall", "se", "pairs"}} of a recall.json (recall None where skipped)."""
  out = {}
  for s in SOURCES:
    v = recall_json["sources"].get(s, {})
    r, pairs = v.get(KEY), v.get("pairs")
    out[s] = {"recall": r, "se": _se(r, pairs), "pairs": pairs}
  return out


def source_mean(rows):
  """{"recall", "se"}: the mean over the scored sources, with the mean of their SEs."""
  scored = [v for v in rows.values() if v["recall"] is not None]
  if not scored:
    return {"recall": None, "se": None}
  return {"recall": float(np.mean([v["recall"] for v in scored])),
          "se": float(np.mean([v["se"] for v in scored]))}


def entry(scores):
  """What every arm reports of one embedding: TVN + arm-centred recall per source and its mean,
  the same uncorrected and without arm centring, and the arm-mates cosine."""
  tvn = per_source(scores["tvn"])
  out = {"recall": tvn, "mean": source_mean(tvn)}
  for variant in ("uncorrected", "tvn_no_arm"):
    rows = per_source(scores[variant])
    out[variant] = {s: v["recall"] for s, v in rows.items()}
    out[f"mean_{variant}"] = source_mean(rows)["recall"]
  arm = scores["tvn"].get("arm_correction", {})
  out["arm_mates"] = {"before": arm.get("arm_mates_before"), "after": arm.get("arm_mates_after")}
  return out


def combine(runs):
  """Seeds of one arm: the mean recall per source, SE = binomial SE of the mean recall (the
  same gene pairs every seed) and the seeds' standard error of the mean, in quadrature."""
  if len(runs) == 1:
    return {k: runs[0][k] for k in ("recall", "mean", "uncorrected", "mean_uncorrected",
                                     "tvn_no_arm", "mean_tvn_no_arm", "arm_mates")}
  rows = {}
  for s in SOURCES:
    vals = [r["recall"][s]["recall"] for r in runs]
    if any(v is None for v in vals):
      rows[s] = {"recall": None, "se": None, "pairs": runs[0]["recall"][s]["pairs"]}
      continue
    m, pairs = float(np.mean(vals)), runs[0]["recall"][s]["pairs"]
    spread = float(np.std(vals, ddof=1)) / math.sqrt(len(vals))
    rows[s] = {"recall": m, "se": math.sqrt(_se(m, pairs) ** 2 + spread ** 2), "pairs": pairs,
               "seeds": vals}
  mean = lambda key: {s: _mean([r[key][s] for r in runs]) for s in SOURCES}
  return {"recall": rows, "mean": source_mean(rows), "uncorrected": mean("uncorrected"),
          "mean_uncorrected": _mean([r["mean_uncorrected"] for r in runs]),
          "tvn_no_arm": mean("tvn_no_arm"),
          "mean_tvn_no_arm": _mean([r["mean_tvn_no_arm"] for r in runs]),
          "arm_mates": {k: _mean([r["arm_mates"][k] for r in runs]) for k in ("before", "after")}}


def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def verdict(difference, se):
  if difference is None or not se:
    return "within noise" if difference == 0 else "not scored"
  z = difference / se
  return "holds" if z >= Z else "does not hold" if z <= -Z else "within noise"


def compare(a, b):
  """A beats B? The difference of the source-mean recalls and per source, with their SEs."""
  def diff(x, y):
    if x["recall"] is None or y["recall"] is None:
      return {"difference": None, "se": None, "verdict": "not scored"}
    d, se = x["recall"] - y["recall"], math.hypot(x["se"], y["se"])
    return {"difference": d, "se": se, "verdict": verdict(d, se)}
  return {**diff(a["mean"], b["mean"]),
          "per_source": {s: diff(a["recall"][s], b["recall"][s]) for s in SOURCES}}


def relative(a, b):
  """(A - B) / B per source with its delta-method SE."""
  out = {}
  for s in SOURCES:
    x, y = a["recall"][s], b["recall"][s]
    if x["recall"] is None or not y["recall"]:
      out[s] = {"value": None, "se": None}
      continue
    r, q = x["recall"], y["recall"]
    out[s] = {"value": r / q - 1, "se": math.hypot(x["se"] / q, r * y["se"] / q ** 2)}
  return out


def spearman(points):
  """Spearman's rho of recall against training FLOPs, and whether recall rises: rho > 0 at
  p < 0.05 and the most-FLOPs point above the fewest-FLOPs point by 2 SE."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  pts = sorted((p for p in points if p["mean"]["recall"] is not None),
               key=lambda p: p["train_flops"])
  if len(pts) < 3:
    return {"rho": None, "p": None, "points": len(pts), "verdict": "not scored"}
  rho, p = stats.spearmanr([q["train_flops"] for q in pts], [q["mean"]["recall"] for q in pts])
  rho, p = (None, None) if np.isnan(rho) else (float(rho), float(p))
  lo, hi = pts[0]["mean"], pts[-1]["mean"]
  d, se = hi["recall"] - lo["recall"], math.hypot(hi["se"], lo["se"])
  v = "within noise"
  if rho is not None and p < 0.05 and verdict(d, se) == ("holds" if rho > 0 else "does not hold"):
    v = "holds" if rho > 0 else "does not hold"
  return {"rho": rho, "p": p, "points": len(pts), "most_minus_fewest": d, "se": se, "verdict": v}


def subset_info(manifest):
  m = json.load(open(manifest))
  return m.get("subset") or {"fraction": 1.0, "records": m["num_records"]}


# -- build --------------------------------------------------------------------------------------
def _loss(loss_of, step):
  v = loss_of[str(step)]
  out = {"final": v["loss"], "baseline": v["baseline"], "baseline_name": v["baseline_name"],
         "ratio_to_baseline": v["loss"] / v["baseline"] if v["baseline"] else None}
  if "0" in loss_of:
    out["initial"] = loss_of["0"]["loss"]
  if "accuracy" in v:
    out.update(accuracy=v["accuracy"], chance_accuracy=v["chance_accuracy"])
  return out


def _flops(spec, step):
  cfg = spec["train_config"]
  return float(step * cfg.batch_size * arms.train_flops_per_image(cfg))


def build(*, suite, settings, plans, specs, grid, steps_of, loss_of, done, scores, networks,
          paths, device, timing, subsets, skipped=None) -> dict:
  out = {}
  for arm in arms.ARMS:
    runs = []
    for seed in range(suite.seeds):
      name = f"{arm.name}_s{seed}"
      final = max(steps_of[name])
      runs.append({"run": name, "seed": seed, "steps": final,
                   "batch_size": specs[name]["train_config"].batch_size,
                   "train_flops": _flops(specs[name], final), "wall_s": done[name]["seconds"],
                   "loss": _loss(loss_of[name], final),
                   **entry(scores[f"{name}/step_{final}"])})
    plan = plans[arm.name]
    out[arm.name] = {"label": arm.label, "claim": arm.claim, "group": "trained",
                     "kind": specs[f"{arm.name}_s0"]["train_config"].model.get("kind", "mae"),
                     "network": arm.network, "budget_rule": plan["rule"], "plan": plan,
                     "seeds": list(range(suite.seeds)),
                     "steps": runs[0]["steps"], "train_flops": runs[0]["train_flops"],
                     "wall_s": _mean([r["wall_s"] for r in runs]),
                     "loss": runs[0]["loss"], **combine(runs), "runs": runs}
  for network, arm in networks.items():
    out[f"random_init_{network}"] = {
        "label": f"{arms.NETWORK_LABELS[network]}, random init", "group": "random_init", "network": network, "seeds": [0], "train_flops": 0.0,
        "steps": 0, **entry(scores[f"random_init_{network}"])}
  out["pixel_stats"] = {"label": "pixel statistics", "group": "baseline", "train_flops": 0.0,
                        **entry(scores["pixel_stats"])}
  if "cellprofiler" in scores:
    out["cellprofiler"] = {"label": "CellProfiler features (cp_measure)", "group": "baseline",
                           "train_flops": 0.0, "field_px": suite.cp_field,
                           "fields_per_site": 1, "sites": "every site of every well",
                           "standardisation": "as pixel_stats: none before scoring, whose TVN "
                                              "whitens every feature on the controls",
                           **entry(scores["cellprofiler"])}
  if "ceiling" in scores:
    out["ceiling"] = {"label": "true phenotypes (ceiling)", "group": "baseline",
                      "train_flops": 0.0, **entry(scores["ceiling"])}

  points = []
  for g in grid:
    spec = specs[g["run"]]
    for step in steps_of[g["run"]]:
      e = entry(scores[f"{g['run']}/step_{step}"])
      points.append({**g, "plates": subsets[g["fraction"]], "step": step,
                     "train_flops": _flops(spec, step),
                     "loss": _loss(loss_of[g["run"]], step),
                     **{k: e[k] for k in ("recall", "mean", "mean_uncorrected")}})
  by_size = {str(f): spearman([p for p in points if p["fraction"] == f])
             for f in suite.fractions}

  ref = out[arms.REFERENCE]
  claims = {
      "mae_beats_wsl": {"statement": "the ViT MAE (patch 8, mask 0.75) recalls more known "
                                     "relationships than the WSL classifier",
                        **compare(ref, out["wsl"])},
      "patch8_beats_patch16": {"statement": "patch 8 beats patch 16 on the same crop",
                               **compare(ref, out["vit_p16_m75"])},
      "mask75_beats_mask25": {"statement": "mask ratio 0.75 beats 0.25",
                              **compare(ref, out["vit_p8_m25"])},
      "recall_rises_with_flops": {
          "statement": "recall rises with training FLOPs (every data size of the grid)",
          "verdict": _all(v["verdict"] for v in by_size.values()), "by_data_size": by_size},
      "mae_beats_its_random_init": {
          "statement": "the trained ViT MAE beats the same network at random init",
          **compare(ref, out[f"random_init_{arms.ARMS_BY_NAME[arms.REFERENCE].network}"])},
  }
  crafted = max((out[k] for k in ("pixel_stats", "cellprofiler") if k in out),
                key=lambda a: -1.0 if a["mean"]["recall"] is None else a["mean"]["recall"])
  claims["mae_beats_handcrafted"] = {
      "statement": f"the ViT MAE beats the best hand-crafted features ({crafted['label']})",
      **compare(ref, crafted)}
  rules = {a: out[a]["budget_rule"] for a in arms.ARMS_BY_NAME}
  return {
      "suite": suite.name, "settings": settings, "device": device,
      "screen": _screen(paths), "ground_truth": bool(paths["ground_truth"]),
      "expression": paths["expression"], "seeds": suite.seeds, "tile_stride": suite.tile_stride,
      "budget": {"minutes": suite.budget_minutes, "reference": arms.REFERENCE,
                 "reference_steps": plans[arms.REFERENCE]["total_steps"],
                 "flops": plans[arms.REFERENCE]["flops"], "rules": rules,
                 "wall_cap": suite.wall_cap, "source": plans[arms.REFERENCE]["source"],
                 "from_screen": plans[arms.REFERENCE].get("from_screen"),
                 "estimated_train_seconds": sum(p.get("train_seconds") or 0
                                                for p in plans.values())},
      "arms": out, "grid": points, "spearman": by_size,
      "relative_improvement": {"definition": "(MAE - WSL) / WSL, recall per source",
                               "mae": arms.REFERENCE, "wsl": "wsl",
                               **relative(ref, out["wsl"])},
      "claims": claims, "subsets": {str(k): v for k, v in subsets.items()}, "timing": timing,
      "skipped": dict(skipped or {}),
  }


def _all(verdicts):
  """"holds" only where every part holds; "not scored" where no part could be scored."""
  verdicts = list(verdicts)
  if all(v == "not scored" for v in verdicts):
    return "not scored"
  if all(v == "holds" for v in verdicts):
    return "holds"
  return "does not hold" if "does not hold" in verdicts else "within noise"


def _screen(paths):
  path = os.path.join(paths["screen"], "ground_truth", "screen.json")
  if paths["ground_truth"] and os.path.exists(path):
    s = json.load(open(path))
    return {"manifest": paths["manifest"], "image_size": s.get("image_size"),
            "style": s.get("parameters", {}).get("style", "default"), **s.get("counts", {})}
  return {"manifest": paths["manifest"]}


def public(data):
  return data


# -- figures ------------------------------------------------------------------------------------
def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _nan(v):
  return np.nan if v is None else v


def plot_recall(data, path):
  plt = _plt()
  rows = list(data["arms"].items())
  cols = SOURCES + ("mean",)
  fig, ax = plt.subplots(figsize=(11, 4), dpi=90)
  width = 0.85 / len(rows)
  colors = {"trained": plt.get_cmap("tab10"), "random_init": plt.get_cmap("Pastel1"),
            "baseline": plt.get_cmap("Dark2")}
  count = {}
  for i, (_, a) in enumerate(rows):
    vals = [a["recall"][s] for s in SOURCES] + [a["mean"]]
    k = count[a["group"]] = count.get(a["group"], -1) + 1
    ax.bar(np.arange(len(cols)) + (i - len(rows) / 2 + 0.5) * width,
           [_nan(v["recall"]) for v in vals], width * 0.95,
           yerr=[_nan(v["se"]) for v in vals], capsize=1.5, color=colors[a["group"]](k), label=a["label"],
           edgecolor="black", linewidth=0.3, error_kw={"elinewidth": 0.6})
  ax.axhline(CHANCE, color="k", ls=":", lw=1, label="chance")
  ax.set_xticks(np.arange(len(cols)), cols)
  ax.set_ylabel("recall 5/95, TVN + arm centring (± SE)")
  ax.set_title("Known-relationship recall per arm and source")
  ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_scaling(data, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
  widths = sorted({p["width"] for p in data["grid"]})
  fractions = sorted({p["fraction"] for p in data["grid"]})
  markers = "s^Do*v"
  for i, w in enumerate(widths):
    for j, f in enumerate(fractions):
      pts = sorted((p for p in data["grid"] if p["width"] == w and p["fraction"] == f),
                   key=lambda p: p["train_flops"])
      ax.errorbar([p["train_flops"] for p in pts], [_nan(p["mean"]["recall"]) for p in pts],
                  yerr=[_nan(p["mean"]["se"]) for p in pts], color=f"C{i}",
                  marker=markers[j % len(markers)], ls="-" if f == 1.0 else "--", ms=5,
                  capsize=2, lw=1, label=f"width {w}, {round(100 * f)} % of plates")
  for name, style, color in (("pixel_stats", "--", "k"), ("cellprofiler", ":", "k"),
                             ("wsl", "--", "C3"), ("ceiling", "-.", "k")):
    if name in data["arms"]:
      ax.axhline(_nan(data["arms"][name]["mean"]["recall"]), color=color, ls=style, lw=0.8,
                 label=data["arms"][name]["label"])
  ax.axhline(CHANCE, color="grey", lw=0.8, label="chance")
  ax.set_xscale("log")
  flops = [p["train_flops"] for p in data["grid"]]  # the range even when no recall was scored
  ax.set_xlim(min(flops) / 1.5, max(flops) * 1.5)
  ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a short log axis collide
  ax.set_xlabel("training FLOPs (forward + backward)")
  ax.set_ylabel("mean recall over sources (± SE)")
  ax.set_title("Scaling grid: recall against training compute")
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_relative(data, path):
  plt = _plt()
  rel = data["relative_improvement"]
  fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
  x = np.arange(len(SOURCES))
  ax.bar(x, [_nan(rel[s]["value"]) for s in SOURCES], 0.6,
         yerr=[_nan(rel[s]["se"]) for s in SOURCES], capsize=3, color="#4c72b0")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(x, SOURCES)
  ax.set_ylabel("(MAE − WSL) / WSL (± SE)")
  ax.set_title("Relative recall improvement of the MAE over the WSL classifier")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# -- report.md ----------------------------------------------------------------------------------
def _f(v, digits=3):
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(v):
  return "n/a" if v["recall"] is None else f"{v['recall']:.3f} ± {_f(v['se'], 3)}"


def arm_table(data):
  lines = ["| arm | seeds | steps | TFLOP | train s | loss / baseline | " + " | ".join(SOURCES) +
           " | mean ± SE | mean uncorrected | budget |", "|---" * (len(SOURCES) + 9) + "|"]
  for name, a in data["arms"].items():
    loss = a.get("loss") or {}
    lines.append(
        f"| {a['label']} | {len(a.get('seeds', []))} | {a.get('steps', '')} | "
        f"{a['train_flops'] / 1e12:.2f} | {_f(a.get('wall_s'), 0)} | "
        f"{_f(loss.get('ratio_to_baseline'))} | " +
        " | ".join(_pm(a["recall"][s]) for s in SOURCES) +
        f" | {_pm(a['mean'])} | {_f(a['mean_uncorrected'])} | "
        f"{a.get('budget_rule', '').replace('_', ' ')} |")
  return lines


def grid_table(data):
  lines = ["| width | plates | step | TFLOP | mean recall ± SE | CORUM ± SE | loss / baseline |",
           "|---|---|---|---|---|---|---|"]
  for p in data["grid"]:
    lines.append(f"| {p['width']} | {round(100 * p['fraction'])} % | {p['step']} | "
                 f"{p['train_flops'] / 1e12:.2f} | {_pm(p['mean'])} | "
                 f"{_pm(p['recall']['CORUM'])} | {_f(p['loss']['ratio_to_baseline'])} |")
  return lines


def claim_lines(data):
  lines = []
  for c in data["claims"].values():
    if "by_data_size" in c:
      detail = "; ".join(f"{round(100 * float(f))} % of plates: rho {_f(v['rho'], 2)} "
                         f"(p {_f(v['p'], 3)}, {v['points']} points), most − fewest FLOPs "
                         f"{_f(v.get('most_minus_fewest'))} ± {_f(v.get('se'))}: {v['verdict']}"
                         for f, v in c["by_data_size"].items())
    else:
      detail = (f"difference of mean recall {_f(c['difference'])} ± {_f(c['se'])}; per source: " +
                ", ".join(f"{s} {v['verdict']}" for s, v in c["per_source"].items()))
    lines.append(f"- **{c['verdict'].upper()}**: {c['statement']} ({detail}).")
  return lines


def markdown(data):
  b, t = data["budget"], data["timing"]
  capped = [a for a, r in b["rules"].items() if r == "equal_wall_time"]
  rel = data["relative_improvement"]
  lines = [
      f"# The study on {data['screen'].get('manifest')}", "",
      f"Suite `{data['suite']}` on {data['device']}; seeds per arm: {data['seeds']}; every "
      f"{data['tile_stride']}-th tile row and column embedded (1: every tile).", "",
      f"Budget: the reference arm ({b['reference']}) trains {b['reference_steps']} steps "
      f"({b['flops'] / 1e12:.2f} TFLOP; {b['minutes']:g} min, source: {b['source']}" +
      (f", the plans of screen `{b['from_screen']}`" if b.get("from_screen") else "") + "); every "
      "arm trains on the same shards at **equal training FLOPs**" +
      (f", except {', '.join(capped)} at **equal wall time** (FLOP-equal steps would have taken "
       f"more than {b['wall_cap']:g}x the reference's time)" if capped else "") + ".", "",
      f"Recall (5/95, two-sided; chance {CHANCE}) after TVN and chromosome-arm centring, ± the "
      "binomial SE sqrt(r(1-r)/pairs); loss / baseline: the MAEs' held-out loss over predicting "
      "the crop mean, WSL's training cross-entropy over ln(classes):", ""]
  lines += arm_table(data) + ["", "Claims (a difference of 2 SE or more counts):", ""]
  lines += claim_lines(data) + [""]
  lines += ["Relative improvement (MAE − WSL) / WSL: " +
            ", ".join(f"{s} {_f(rel[s]['value'], 2)} ± {_f(rel[s]['se'], 2)}" for s in SOURCES)
            + ".", "", "Scaling grid (ViT widths x training-set sizes, reference steps):", ""]
  lines += grid_table(data) + [""]
  lines += [f"Wall time: {t['stages_total_s']:.0f} s over all stages as first run "
            f"({t['this_invocation_s']:.0f} s this invocation); load average "
            f"{t['load_average']['min']:.1f}–{t['load_average']['max']:.1f} on {t['cpus']} "
            "cores. Stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in t["stages_s"].items()),
            ""]
  lines += [f"Not run: {k} ({why})." for k, why in data.get("skipped", {}).items()]
  lines += ["![recall per arm and source](recall.png)", "",
            "![recall against training FLOPs](scaling.png)", "",
            "![relative improvement of the MAE over WSL](relative.png)", ""]
  return "\n".join(lines)


def write(out, data):
  plot_recall(data, os.path.join(out, "recall.png"))
  plot_scaling(data, os.path.join(out, "scaling.png"))
  plot_relative(data, os.path.join(out, "relative.png"))
  files.write(os.path.join(out, "report.md"), markdown(data))
  files.write(os.path.join(out, "report.json"), json.dumps(public(data), indent=1))
