"""The demo's report: report.json (docs/interfaces.md §3), report.md, figures, and the README block.

    data = build(...)                      # dict: the contract's keys + extras
    write(out, run_dir, data, grid_path)   # DIR/report.{json,md} + DIR/*.png (+ a copy in the run)
    update_readme("README.md", out, data)  # rewrites the block between the demo markers

Everything shown is computed from the run's files; nothing is typed in.
"""
import glob
import hashlib
import json
import os
import shutil

import numpy as np

from mae_jax.util import files

METHODS = ("mae", "random_init", "pixel_stats", "ceiling")
LABELS = {"mae": "MAE (trained)", "random_init": "same ViT, random init",
          "pixel_stats": "pixel statistics", "ceiling": "true phenotypes (ceiling)"}
SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
KEY = "recall_0.05_0.95"
CHANCE = 0.10
CLEAR_MARGIN = 0.10  # "clearly below": at least 10 % under the mean predictor's loss
FIGURES = ("recall.png", "loss.png", "reconstruction.png", "scaling.png")
BLOCK = "demo"  # the README's generated block lies between these markers:
BEGIN, END = f"<!-- {BLOCK}:begin -->", f"<!-- {BLOCK}:end -->"
HEADING = "## Results on the synthetic screen"
MAX_FIGURE_BYTES = 300_000


def config_key(model_cfg, seed) -> str:
  """Short hash of the architecture and seed: the random-init embedding is shared by runs."""
  blob = json.dumps({"model": json.loads(model_cfg.to_json_best_effort()), "seed": int(seed)},
                    sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:10]


def corum(recall_json):
  """CORUM recall (5/95) of a recall.json, None where the source was skipped."""
  v = recall_json["sources"].get("CORUM", {}).get(KEY)
  return None if v is None else float(v)


def mean_recall(recall_json):
  """Mean recall (5/95) over the scored sources, None when none was scored."""
  v = [r.get(KEY) for r in recall_json["sources"].values() if r.get(KEY) is not None]
  return float(np.mean(v)) if v else None


def _gt(a, b):
  return a is not None and b is not None and a > b


def _method(results):
  """A contract M: the TVN recall.json plus "uncorrected" (and "tvn_no_arm")."""
  return {**results["tvn"], "uncorrected": results["uncorrected"],
          "tvn_no_arm": results["tvn_no_arm"]}


def train_curve(metrics_path):
  rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
  return [[r["step"], r["loss"]] for r in rows]


def build(*, device, budget_minutes, scores, steps, config, train_info, loss_by_step,
          metrics_path, flops_per_image, screen, timing, run) -> dict:
  final = max(steps)
  methods = {"mae": _method(scores[f"step_{final}"]), "random_init": _method(scores["random_init"]),
             "pixel_stats": _method(scores["pixel_stats"]), "ceiling": _method(scores["ceiling"])}
  per_step = config["batch_size"] * flops_per_image["train"]
  by_step = [{"step": 0, "flops": 0.0, "recall": scores["random_init"]["tvn"],
              "eval_loss": loss_by_step[0]["loss"]}]
  by_step += [{"step": s, "flops": float(s * per_step), "recall": scores[f"step_{s}"]["tvn"],
               "eval_loss": loss_by_step[s]["loss"]} for s in steps]
  arm = methods["mae"]["arm_correction"]
  curve = train_curve(metrics_path)
  tail = [l for _, l in curve[-max(1, len(curve) // 10):]]
  last = loss_by_step[final]
  loss = {"final": last["loss"], "mean_predictor": last["mean_predictor"],
          "initial": loss_by_step[0]["loss"], "final_train": float(np.mean(tail)),
          "first_train": curve[0][1] if curve else None,
          "held_out_crops": "256 crops of the screen drawn with an unused seed, fixed masks",
          "ratio_to_mean_predictor": last["loss"] / last["mean_predictor"]}
  gains = {m: None if corum(methods[m]) is None else corum(methods[m]) - CHANCE for m in METHODS}
  ratio = gains["mae"] / gains["random_init"] if _gt(gains["random_init"], 0) else None
  data = {
      "device": device, "budget_minutes": budget_minutes, "methods": methods, "loss": loss,
      "arm_mates": {"before": arm.get("arm_mates_before"), "after": arm.get("arm_mates_after")},
      "by_step": by_step,
      "gains": {"metric": f"CORUM {KEY} with TVN minus chance {CHANCE}", **gains,
                "mae_over_random_init": ratio},
      "run": run, "total_steps": config["total_steps"], "batch_size": config["batch_size"],
      "train_flops": float(config["total_steps"] * per_step),
      "train_gflops_per_image": flops_per_image["train"] / 1e9,
      "embed_gflops_per_crop": flops_per_image["embed"] / 1e9,
      "train": {k: train_info.get(k) for k in ("seconds", "step_time_s", "startup_s", "source")},
      "model": config["model"], "optimizer": config["optimizer"],
      "screen": screen["counts"] | {"image_size": screen["image_size"]},
      "timing": timing, "train_curve": curve,
  }
  data["checks"] = checks(data)
  return data


def checks(data) -> dict:
  m = data["methods"]
  out = {}
  c = corum(m["ceiling"])
  out["ceiling_corum_recall_at_least_0.5"] = {"value": c, "pass": c is not None and c >= 0.5}
  # "Recall" of a method here = the mean over its scored sources; CORUM alone is listed too
  # (the ceiling's latents carry no batch effect, so TVN can only reshuffle its CORUM pairs).
  raised = {k: [mean_recall(m[k]["uncorrected"]), mean_recall(m[k])] for k in METHODS}
  out["tvn_raises_every_method"] = {
      "mean_over_sources_uncorrected_vs_tvn": raised,
      "corum_uncorrected_vs_tvn": {k: [corum(m[k]["uncorrected"]), corum(m[k])] for k in METHODS},
      "pass": all(_gt(b, a) for a, b in raised.values())}
  arms = {k: [m[k]["arm_correction"].get("arm_mates_before"),
              m[k]["arm_correction"].get("arm_mates_after")] for k in METHODS}
  out["arm_correction_lowers_arm_mates"] = {
      "before_vs_after": arms, "pass": all(_gt(b, a) for b, a in arms.values())}
  l = data["loss"]
  out["mae_loss_clearly_below_mean_predictor"] = {
      "final": l["final"], "mean_predictor": l["mean_predictor"],
      "pass": l["final"] <= (1 - CLEAR_MARGIN) * l["mean_predictor"]}
  g = data["gains"]
  out["mae_gain_at_least_2x_random_init"] = {
      "mae": g["mae"], "random_init": g["random_init"],
      "pass": _gt(g["mae"], 0) and g["random_init"] is not None
              and g["mae"] >= 2 * max(g["random_init"], 0)}
  out["mae_above_pixel_stats"] = {"mae": corum(m["mae"]), "pixel_stats": corum(m["pixel_stats"]),
                                  "pass": _gt(corum(m["mae"]), corum(m["pixel_stats"]))}
  return out


def public(data) -> dict:
  return {k: v for k, v in data.items() if not k.startswith("_")}


# -- figures ------------------------------------------------------------------------------------
def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _recall(r, src):
  v = r["sources"].get(src, {}).get(KEY)
  return np.nan if v is None else v


def plot_recall(data, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 3.4), dpi=100)
  width = 0.2
  x = np.arange(len(SOURCES))
  colors = ["#1f77b4", "#7f7f7f", "#ff7f0e", "#2ca02c"]
  for i, (m, c) in enumerate(zip(METHODS, colors)):
    r = data["methods"][m]
    ax.bar(x + (i - 1.5) * width, [_recall(r, s) for s in SOURCES], width * 0.95, color=c,
           label=f"{LABELS[m]}, TVN")
    ax.bar(x + (i - 1.5) * width, [_recall(r["uncorrected"], s) for s in SOURCES], width * 0.45,
           color="white", edgecolor="black", hatch="///", linewidth=0.5,
           label="uncorrected" if i == 0 else None)
  ax.axhline(CHANCE, color="k", ls=":", lw=1, label="chance")
  ax.set_xticks(x, SOURCES)
  ax.set_ylabel(f"recall ({KEY.split('_', 1)[1].replace('_', '/')})")
  ax.set_title("Known-relationship recall of the gene map, per source")
  ax.legend(fontsize=7, ncol=3, loc="upper right")
  values = [_recall(data["methods"][m], s) for m in METHODS for s in SOURCES]
  top = np.nanmax(values) if np.isfinite(values).any() else 0.0
  ax.set_ylim(0, max(0.3, top * 1.3))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_loss(data, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
  curve = np.array(data["train_curve"])
  if len(curve):
    ax.plot(curve[:, 0], curve[:, 1], lw=0.6, alpha=0.4, color="C0")
    smooth = curve[:, 1].copy()
    for i in range(1, len(smooth)):  # exponential moving average, as TensorBoard shows it
      smooth[i] = 0.8 * smooth[i - 1] + 0.2 * smooth[i]
    ax.plot(curve[:, 0], smooth, lw=1.2, color="C0", label="MAE training loss (batch, EMA)")
  steps = [b["step"] for b in data["by_step"]]
  ax.plot(steps, [b["eval_loss"] for b in data["by_step"]], "o-", ms=4, color="C1",
          label="MAE held-out loss (checkpoints)")
  ax.axhline(data["loss"]["mean_predictor"], color="r", ls="--", lw=1,
             label="predicting the crop mean (held-out)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (0.99 MSE + 0.01 Fourier)")
  ax.set_title("Reconstruction loss of the masked patches")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_reconstruction(grid_path, path):
  from mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  plt = _plt()
  with np.load(grid_path) as z:
    pred, target, mask, patch = z["pred"], z["target"], z["mask"], int(z["patch_size"])
  n, tokens, feat = target.shape
  channels = feat // patch ** 2
  size = int(round(np.sqrt(tokens))) * patch
  cols = ["masked input", "reconstruction", "original"]
  cmap = plt.get_cmap("gray").with_extremes(bad="#4a6fa5")  # removed patches in blue
  fig, axes = plt.subplots(channels, 3 * n, figsize=(1.2 * 3 * n, 1.2 * channels), dpi=72)
  keep = (mask == 0)[..., None]
  masked = vit.unpatchify(np.where(keep, target, np.nan), patch, size)
  recon = vit.unpatchify(np.where(keep, target, pred), patch, size)
  orig = vit.unpatchify(target, patch, size)
  for i in range(n):
    for c in range(channels):
      lo, hi = np.percentile(orig[i, ..., c], [1, 99.5])
      for j, img in enumerate((masked[i], recon[i], orig[i])):
        ax = axes[c, 3 * i + j]
        ax.imshow(np.ma.masked_invalid(img[..., c]), cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
          ax.set_title(f"crop {i + 1}: {cols[j]}", fontsize=6)
        if i == 0 and j == 0:
          ax.set_ylabel(f"w{c + 1}", fontsize=7)
  fig.suptitle("Masked inputs, reconstructions (visible patches pasted back) and originals",
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def all_runs(out):
  """report.json of every run in DIR/runs (the scaling figure and README show all budgets)."""
  runs = []
  for p in sorted(glob.glob(os.path.join(out, "runs", "*", "report.json"))):
    with open(p) as f:
      runs.append(json.load(f))
  return sorted(runs, key=lambda r: r["train_flops"])


def _nan(v):
  return np.nan if v is None else v


def plot_scaling(data, runs, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
  for r in runs or [data]:
    pts = [(b["flops"], _nan(corum(b["recall"]))) for b in r["by_step"] if b["step"] > 0]
    label = f"MAE checkpoints, run {r['run']} ({r['total_steps']} steps)"
    ax.plot(*zip(*pts), "o-", ms=4, label=label)
  ax.set_xscale("log")
  for m, style in (("random_init", ":"), ("pixel_stats", "--"), ("ceiling", "-.")):
    ax.axhline(_nan(corum(data["methods"][m])), color="k", ls=style, lw=1, label=LABELS[m])
  ax.axhline(CHANCE, color="grey", lw=0.8, label="chance")
  ax.set_xlabel("training FLOPs (forward + backward)")
  per_step = data["batch_size"] * data["train_gflops_per_image"] * 1e9
  top = ax.secondary_xaxis("top", functions=(lambda f: f / per_step, lambda s: s * per_step))
  top.set_xlabel("steps", fontsize=8)
  for axis in (ax.xaxis, top.xaxis):  # minor labels of a short log axis collide
    axis.set_minor_formatter(plt.NullFormatter())
  ax.set_ylabel("CORUM recall, TVN")
  ax.set_title("MAE recall against training compute")
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# -- report.md / README -------------------------------------------------------------------------
def _fmt(v, digits=3):
  return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def recall_table(data) -> list:
  lines = ["| method | " + " | ".join(SOURCES) + " | CORUM uncorrected | CORUM TVN, no arm |",
           "|---|" + "---|" * (len(SOURCES) + 2)]
  for m in METHODS:
    r = data["methods"][m]
    lines.append(f"| {LABELS[m]} | " + " | ".join(_fmt(_recall(r, s)) for s in SOURCES) +
                 f" | {_fmt(corum(r['uncorrected']))} | {_fmt(corum(r['tvn_no_arm']))} |")
  return lines


def summary_lines(data) -> list:
  l, g, t = data["loss"], data["gains"], data["timing"]
  ratio = g["mae_over_random_init"]
  lines = [
      f"- Device: {data['device']}; run `{data['run']}`: {data['total_steps']} steps of "
      f"{data['batch_size']} crops ({data['train_flops'] / 1e12:.1f} TFLOP); training took "
      f"{_fmt(data['train']['seconds'], 0)} s.",
      f"- Loss on held-out crops: MAE {_fmt(l['final'])} vs {_fmt(l['mean_predictor'])} for "
      f"predicting the crop mean (ratio {_fmt(l['ratio_to_mean_predictor'])}); random init "
      f"{_fmt(l['initial'])}.",
      f"- Gain over chance (CORUM recall with TVN − {CHANCE}): MAE {_fmt(g['mae'])}, random init "
      f"{_fmt(g['random_init'])} (ratio {_fmt(ratio, 2) if ratio is not None else 'n/a'}), "
      f"pixel statistics {_fmt(g['pixel_stats'])}, ceiling {_fmt(g['ceiling'])}.",
      _noise_line(data),
      f"- Arm-mates (mean cosine of unrelated genes on one arm, MAE): "
      f"{_fmt(data['arm_mates']['before'])} before, {_fmt(data['arm_mates']['after'])} after "
      "arm centring.",
      f"- Wall time: {t['stages_total_s']:.0f} s over all stages as first run "
      f"({t['this_invocation_s']:.0f} s this invocation): " +
      ", ".join(f"{k} {v:.0f} s" for k, v in t["stages_s"].items()) +
      f"; load average {t['load_average']['min']:.1f}–{t['load_average']['max']:.1f} on "
      f"{t['cpus']} cores (the stages kept {100 * t['cpu_share']:.0f} % of them busy).",
  ]
  return lines


def _noise_line(data) -> str:
  """Differences between methods read against the sampling noise of the few CORUM pairs."""
  pairs = data["methods"]["mae"]["sources"]["CORUM"].get("pairs")  # none where CORUM was skipped
  r = corum(data["methods"]["mae"])
  se = (r * (1 - r) / pairs) ** 0.5 if pairs and r is not None else None
  return (f"- CORUM has {pairs} gene pairs in this screen: a recall near {_fmt(r, 2)} carries a "
          f"binomial standard error of about {_fmt(se, 2)}, so read differences below about twice "
          "that as noise.")


def check_lines(data) -> list:
  return [f"- {'PASS' if c['pass'] else 'FAIL'}: {name.replace('_', ' ')}"
          for name, c in data["checks"].items()]


def runs_table(runs) -> list:
  if len(runs) < 2:
    return []
  lines = ["| run | steps | TFLOP | MAE loss / mean predictor | CORUM TVN: MAE | random init | "
           "pixel stats | MAE gain / random-init gain |", "|---|---|---|---|---|---|---|---|"]
  for r in runs:
    ratio = r["gains"]["mae_over_random_init"]
    lines.append(f"| {r['run']} | {r['total_steps']} | {r['train_flops'] / 1e12:.1f} | "
                 f"{_fmt(r['loss']['ratio_to_mean_predictor'])} | "
                 f"{_fmt(corum(r['methods']['mae']))} | "
                 f"{_fmt(corum(r['methods']['random_init']))} | "
                 f"{_fmt(corum(r['methods']['pixel_stats']))} | "
                 f"{_fmt(ratio, 2) if ratio is not None else 'n/a'} |")
  return lines


def verdict(data) -> str:
  c = data["checks"]
  if c["mae_gain_at_least_2x_random_init"]["pass"] and c["mae_above_pixel_stats"]["pass"]:
    return "The scientific claim holds at this budget: the MAE's gain is at least twice the " \
           "random-init gain and it beats the pixel statistics."
  parts = []
  if not c["mae_gain_at_least_2x_random_init"]["pass"]:
    g = data["gains"]
    why = ""
    if _gt(2 * (g["random_init"] or 0), g["ceiling"]):
      why = (f" (nor can it be on this screen: even the true phenotypes gain only "
             f"{_fmt(g['ceiling'])} < 2 x {_fmt(g['random_init'])})")
    parts.append("the MAE's gain over chance is not twice the random-init gain" + why)
  if not c["mae_above_pixel_stats"]["pass"]:
    parts.append("the MAE does not beat the hand-crafted pixel statistics")
  return ("The scientific claim does NOT hold at this budget: " + " and ".join(parts) +
          ". See the recall-by-compute curve.")


def markdown(data, runs, figure_dir="") -> str:
  fig = lambda name, alt: f"![{alt}]({figure_dir}{name})"
  lines = ["# MAE demo on the synthetic screen", "",
           f"CORUM etc. recall ({KEY}, two-sided; chance {CHANCE}) of the gene map after TVN "
           "and chromosome-arm centring, per method:", ""]
  lines += recall_table(data) + [""] + summary_lines(data) + ["", verdict(data), ""]
  lines += check_lines(data) + [""]
  if runs_table(runs):
    lines += ["Runs in this folder:", ""] + runs_table(runs) + [""]
  lines += [fig("recall.png", "recall per method and source"), "",
            fig("scaling.png", "recall against training FLOPs"), "",
            fig("loss.png", "loss curve against the mean predictor"), "",
            fig("reconstruction.png", "masked inputs, reconstructions, originals"), ""]
  return "\n".join(lines)


def _save_figures(data, runs, folder, grid_path):
  plot_recall(data, os.path.join(folder, "recall.png"))
  plot_loss(data, os.path.join(folder, "loss.png"))
  plot_reconstruction(grid_path, os.path.join(folder, "reconstruction.png"))
  plot_scaling(data, runs, os.path.join(folder, "scaling.png"))


def write(out, run_dir, data, grid_path):
  """DIR/report.json + report.md + figures, and copies in the run's folder."""
  files.write(os.path.join(run_dir, "report.json"), json.dumps(public(data), indent=1))
  runs = all_runs(out)
  _save_figures(data, runs, out, grid_path)
  files.write(os.path.join(out, "report.md"), markdown(data, runs))
  for name in FIGURES:
    shutil.copyfile(os.path.join(out, name), os.path.join(run_dir, name))
  files.write(os.path.join(out, "report.json"), json.dumps(public(data), indent=1))


def update_readme(readme, out, data):
  """Rewrites the README's demo block from `data` and copies the figures beside the README."""
  if not os.path.exists(readme):
    raise FileNotFoundError(f"{readme}: no such README")
  folder = os.path.join(os.path.dirname(os.path.abspath(readme)), "bench", "results", "demo")
  os.makedirs(folder, exist_ok=True)
  for name in FIGURES:
    src = os.path.join(out, name)
    if os.path.getsize(src) > MAX_FIGURE_BYTES:
      raise ValueError(f"{src}: {os.path.getsize(src)} bytes, over the {MAX_FIGURE_BYTES} limit")
    shutil.copyfile(src, os.path.join(folder, name))
  runs = all_runs(out)
  body = ["", "Generated by `python -m mae_jax.demo --out=DIR --readme=README.md` from "
          "DIR/report.json (do not edit by hand).", ""]
  body += markdown(data, runs, "bench/results/demo/").split("\n")[2:]
  files.rewrite_block(readme, BLOCK, "\n".join(body), HEADING)
