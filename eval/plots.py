"""recall.png: recall per source at each threshold pair, with the chance level drawn; and
map_metrics.png: copairs mean average precision (eval/map_metrics.py)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_COLORS = ("#1f5fa8", "#e08a1e", "#3a9a5b", "#b8403a")


def _thresholds(result):
  keys = []
  for src in result["sources"].values():
    keys += [k for k in src if k.startswith("recall_") and k not in keys]
  return keys


def plot_recall(result: dict, path, title: str):
  """Grouped bars (one group per source, one bar per threshold pair) saved to `path` (PNG)."""
  sources = list(result["sources"])
  keys = _thresholds(result)
  fig, ax = plt.subplots(figsize=(2.4 + 1.3 * max(len(sources), 1), 4.6), dpi=150)
  width = 0.8 / max(len(keys), 1)
  x = np.arange(len(sources))
  top = 0.0
  for k, key in enumerate(keys):
    lo, hi = (float(v) for v in key.split("_")[1:3])
    chance = lo + (1 - hi)
    color = _COLORS[k % len(_COLORS)]
    vals = [result["sources"][s].get(key) for s in sources]
    pos = x - 0.4 + width * (k + 0.5)
    heights = [v if v is not None else 0 for v in vals]
    bars = ax.bar(pos, heights, width * 0.92, color=color,
                  label=f"recall ({lo:g}, {hi:g})", zorder=2)
    for b, v in zip(bars, vals):
      if v is not None:
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points",
                    color="#333")
    ax.axhline(chance, color=color, ls="--", lw=1.2, zorder=3, alpha=0.9,
               label=f"chance ({lo:g}, {hi:g}) = {chance:.0%}")
    top = max([top, chance] + heights)
  for pos, src in enumerate(sources):
    if "skipped" in result["sources"][src]:
      ax.annotate("skipped:\ntoo few genes\nin the map", (pos, 0.24), ha="center",
                  va="bottom", fontsize=7, color="#777")
  labels = [f"{s}\n{result['sources'][s].get('pairs', 0):,} pairs" for s in sources]
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_xlim(-0.6, len(sources) - 0.4)
  ax.set_ylim(0, min(1.08, top * 1.12 + 0.03))
  ax.set_ylabel("recall of known relationships")
  ax.spines[["top", "right"]].set_visible(False)
  ax.grid(axis="y", alpha=0.3, zorder=0)
  ax.legend(fontsize=7.5, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0),
            ncol=2 * max(len(keys), 1), handlelength=1.8, columnspacing=1.2)
  n = result.get("n_perturbations")
  ax.set_title(title + (f" · {n:,} perturbations" if n else ""), fontsize=10, pad=24)
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)


def plot_map_metrics(metrics: dict, path, title: str):
  """map_metrics.png: copairs mean average precision of activity and of each source's
  consistency, beside the fraction retrieved at q < 0.05 (docs/science.md §4.4)."""
  entries = [("activity\n(vs controls)", metrics.get("activity") or {})]
  entries += [(f"{src}\n{r.get('groups', 0)} groups", r)
              for src, r in (metrics.get("consistency") or {}).items()]
  keys = (("mean_average_precision", "mean mAP"), ("fraction_retrieved", "fraction q < 0.05"))
  fig, ax = plt.subplots(figsize=(2.4 + 1.2 * len(entries), 4.2), dpi=150)
  x = np.arange(len(entries))
  for k, (key, label) in enumerate(keys):
    vals = [r.get(key) for _, r in entries]
    bars = ax.bar(x - 0.2 + 0.4 * k, [v or 0 for v in vals], 0.37, color=_COLORS[k],
                  label=label, zorder=2)
    for b, v in zip(bars, vals):
      if v is not None:
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
  for pos, (_, r) in enumerate(entries):
    if "skipped" in r:
      ax.annotate("skipped", (pos, 0.05), ha="center", fontsize=7, color="#777")
  ax.set_xticks(x, [name for name, _ in entries], fontsize=8)
  ax.set_ylim(0, 1.1)
  ax.set_ylabel("copairs mean average precision")
  ax.spines[["top", "right"]].set_visible(False)
  ax.grid(axis="y", alpha=0.3, zorder=0)
  ax.legend(fontsize=7.5, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
  ax.set_title(title, fontsize=10, pad=22)
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)
