"""One self-contained HTML page to browse a genome map: `python -m eval.explore`.

  python -m eval.explore --map=EVAL_DIR [--out=EVAL_DIR/map.html] [--max_genes=N]

Reads the gene_embeddings.npz (labels + the corrected map) and recall.json that `eval.recall`
writes (it also calls `write_page` itself unless --explore=false) and writes one HTML file with
every script and all data inside: it opens offline, from disk, without a server. The page shows
- the run's recall table and the corrections applied (recall.json);
- a 2-D layout of the genes (UMAP, McInnes et al. arXiv 1802.03426, when umap-learn is
  installed; else PCA), coloured by cluster: Ward linkage on the unit rows, so on cosine
  distance (above 3,000 genes on the centroids of a spherical k-means first); hover names a gene;
- a search box (or a click on a point): the gene's k nearest genes by cosine similarity, and
  for each pair the sources (CORUM, HuMAP, Reactome, SIGNOR, StringDB; the files eval.recall
  scores with, read by the same loader) that annotate it; unannotated pairs are candidates;
- the similarity heatmap of that neighbourhood, ordered by average-linkage clustering (done by
  the page when a gene is chosen).

Size: only each gene's top-k neighbours (int16 cosines x 1e4) and its neighbourhood's pairwise
cosines (int8 x 100) ship, never the N x N matrix. plotly.js (the plots) is inlined gzip-compressed
and inflated by the browser's DecompressionStream (Chrome 80, Firefox 113, Safari 16.4): 1.4 of
its 4.8 MB. The last stdout line is {"out", "genes", "genes_in_map", "bytes", "layout",
"clusters", "neighbours", "sources", "seconds"}.
"""
import base64
import functools
import gzip
import html
import json
import os
import re
import time

import numpy as np

from eval import EvalError
from mae_jax.data import resources
from mae_jax.util import cli, files

MAP_FILE = "gene_embeddings.npz"
PAGE_FILE = "map.html"
_WARD_MAX = 3000  # genes clustered directly; above, Ward runs on k-means centroids


def load_map(map_dir):
  """(labels, embeddings, recall.json dict or {}) of an eval dir; EvalError if it is not one."""
  if not os.path.isdir(map_dir):
    raise EvalError(f"{map_dir}: no such eval directory")
  path = os.path.join(map_dir, MAP_FILE)
  if not os.path.isfile(path):
    raise EvalError(f"{map_dir}: no {MAP_FILE} (python -m eval.recall --out=DIR writes it)")
  try:
    with np.load(path) as z:
      labels, x = z["labels"].astype(str), z["embeddings"].astype(np.float32)
  except (KeyError, ValueError, OSError) as e:
    raise EvalError(f"{path}: not a gene map with labels and embeddings ({e})") from e
  if x.ndim != 2 or len(x) != len(labels) or len(x) < 3 or not np.all(np.isfinite(x)):
    raise EvalError(f"{path}: expected finite (N >= 3, D) embeddings, one per label; got "
                    f"{x.shape} for {len(labels)} labels")
  result = {}
  if os.path.isfile(os.path.join(map_dir, "recall.json")):
    try:
      with open(os.path.join(map_dir, "recall.json")) as f:
        result = json.load(f)
    except json.JSONDecodeError as e:
      raise EvalError(f"{map_dir}/recall.json: not JSON ({e})") from e
  return labels, x, result


def unit_rows(x):
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return (x / np.where(norm > 0, norm, 1)).astype(np.float32)


def neighbourhoods(xn, k, chunk=1024):
  """Each row's k nearest rows by cosine (nb, sim: (N, k), best first) and the pairwise cosines
  of [row, its k neighbours] as a condensed upper triangle (N, (k+1)k/2), in row chunks."""
  n = len(xn)
  k = min(k, n - 1)
  iu = np.triu_indices(k + 1, 1)
  nb, sim = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
  heat = np.empty((n, len(iu[0])), np.float32)
  for a in range(0, n, chunk):
    rows = np.arange(a, min(a + chunk, n))
    s = xn[rows] @ xn.T
    s[np.arange(len(rows)), rows] = -np.inf
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ts = np.take_along_axis(s, top, 1)
    order = np.argsort(-ts, axis=1, kind="stable")
    nb[rows], sim[rows] = np.take_along_axis(top, order, 1), np.take_along_axis(ts, order, 1)
    v = xn[np.concatenate([rows[:, None], nb[rows]], 1)]
    heat[rows] = (v @ v.transpose(0, 2, 1))[:, iu[0], iu[1]]
  return nb, sim, heat


def layout_2d(xn, method="auto", seed=0):
  """(N, 2) coordinates and "umap" or "pca"."""
  if method in ("auto", "umap") and len(xn) >= 30:
    try:
      import umap  # optional: pip install -e ".[explore]"
    except ImportError:
      if method == "umap":
        raise EvalError("--layout=umap needs umap-learn (pip install umap-learn)") from None
    else:
      model = umap.UMAP(n_neighbors=15, metric="cosine", random_state=seed)
      return model.fit_transform(xn).astype(np.float32), "umap"
  elif method == "umap":
    raise EvalError(f"--layout=umap needs at least 30 genes, the map has {len(xn)}")
  centred = xn - xn.mean(0)
  _, vecs = np.linalg.eigh(centred.T.astype(np.float64) @ centred)  # ascending eigenvalues
  xy = centred @ vecs[:, ::-1][:, :2].astype(np.float32)
  return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))).astype(np.float32), "pca"


def clusters(xn, n_clusters=0, seed=0):
  """Cluster id per gene (0 = the largest cluster), Ward linkage on the unit rows."""
  from scipy.cluster import hierarchy
  n = len(xn)
  want = min(n_clusters or int(np.clip(round(np.sqrt(n / 2)), 2, 40)), n)
  points, member = xn, np.arange(n)
  if n > _WARD_MAX:  # spherical k-means to micro-clusters, then Ward on their centroids
    rng = np.random.default_rng(seed)
    points = xn[rng.choice(n, 1000, replace=False)]
    for _ in range(10):
      member = np.argmax(xn @ points.T, axis=1)
      order = np.argsort(member, kind="stable")
      taken, starts = np.unique(member[order], return_index=True)
      sums = np.zeros_like(points)
      sums[taken] = np.add.reduceat(xn[order], starts)
      alive = np.linalg.norm(sums, axis=1) > 0  # an empty micro-cluster keeps its centroid
      points = np.where(alive[:, None], unit_rows(sums), points)
  ids = hierarchy.fcluster(hierarchy.linkage(points, "ward"), want, "maxclust")[member]
  _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  rank = np.empty_like(counts)
  rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
  return rank[inverse]


def annotate(names, nb, sources, annotations_dir=None):
  """uint8 (N, k): bit b set where sources[b] annotates the pair (gene, neighbour)."""
  names = [str(g) for g in names]
  keys = [(a, b) if a < b else (b, a)
          for a, row in zip(names, nb) for b in (names[j] for j in row)]
  bits = np.zeros(nb.size, np.uint8)
  for b, source in enumerate(sources):
    known = set(resources.load_relationships(source, annotations_dir))
    bits |= np.fromiter((p in known for p in keys), bool, len(keys)).astype(np.uint8) << b
  return bits.reshape(nb.shape)


# ------------------------------------------------------------------------------------ the page

def _b64(a, dtype):
  return base64.b64encode(np.ascontiguousarray(a, dtype).tobytes()).decode()


def _script_json(obj) -> str:
  return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


@functools.lru_cache(maxsize=1)
def _plotly_js_gz() -> str:
  from plotly.offline import get_plotlyjs
  return base64.b64encode(gzip.compress(get_plotlyjs().encode(), 9, mtime=0)).decode()


def _scatter_figure(names, xy, cluster, layout_name) -> str:
  import plotly.graph_objects as go
  import plotly.io as pio
  from plotly.colors import qualitative
  palette = qualitative.Dark24 + qualitative.Light24
  kind = go.Scattergl if len(names) > _WARD_MAX else go.Scatter  # the page falls back to SVG
  fig = go.Figure()
  for c in range(int(cluster.max()) + 1):
    m = np.flatnonzero(cluster == c)
    fig.add_trace(kind(
        x=xy[m, 0], y=xy[m, 1], mode="markers", name=f"cluster {c + 1} ({len(m)})",
        text=names[m].tolist(), customdata=m.astype(np.int32),
        marker=dict(size=6 if len(names) < 2000 else 3, color=palette[c % len(palette)]),
        hovertemplate=f"%{{text}}<extra>cluster {c + 1}</extra>"))
  fig.add_trace(kind(x=[], y=[], mode="markers+text", name="selected", showlegend=False,
                     textposition="top center", hoverinfo="skip",
                     marker=dict(size=13, color="rgba(0,0,0,0)",
                                 line=dict(width=2, color="black"))))
  axis = dict(showticklabels=False, zeroline=False, showgrid=False)
  fig.update_layout(template="plotly_white", hovermode="closest",
                    margin=dict(l=30, r=10, t=30, b=30),
                    xaxis=dict(title=f"{layout_name.upper()} 1", **axis),
                    yaxis=dict(title=f"{layout_name.upper()} 2", **axis),
                    legend=dict(itemsizing="constant", font=dict(size=10)),
                    title=dict(text=f"{len(names):,} genes, {layout_name.upper()} layout, "
                                    f"{int(cluster.max()) + 1} clusters", font=dict(size=13)))
  return pio.to_json(fig, validate=False).replace("</", "<\\/")


def _fmt(v, spec=".3f"):
  return "" if v is None else format(v, spec) if isinstance(v, float) else html.escape(str(v))


def _recall_html(result) -> str:
  if not result.get("sources"):
    return "<p>no recall.json beside the map</p>"
  keys = list(result.get("chance") or {}) or sorted(
      {k for s in result["sources"].values() for k in s if k.startswith("recall_")})
  label = lambda k: "recall ({}, {})".format(*k.split("_")[1:3])  # noqa: E731
  head = "".join(f"<th>{label(k)}</th>" for k in keys)
  rows = [f"<tr><th>source</th><th>pairs</th><th>genes</th>{head}</tr>"]
  for src, r in result["sources"].items():
    cells = "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys)
    skipped = f' title="{html.escape(str(r["skipped"]))}"' if r.get("skipped") else ""
    rows.append(f"<tr{skipped}><td>{html.escape(src)}{' (skipped)' if skipped else ''}</td>"
                f"<td>{_fmt(r.get('pairs'))}</td><td>{_fmt(r.get('entities'))}</td>{cells}</tr>")
  if result.get("chance"):
    cells = "".join(f"<td>{_fmt(result['chance'].get(k))}</td>" for k in keys)
    rows.append(f"<tr class='chance'><td>chance</td><td></td><td></td>{cells}</tr>")
  return f"<table>{''.join(rows)}</table>"


def _corrections_html(result) -> str:
  bc, arm = result.get("batch_correction") or {}, result.get("arm_correction") or {}
  s = result.get("settings") or {}
  batch = bc.get("method", "unknown")
  if bc.get("coral"):
    batch += " + CORAL"
  if bc.get("batch_key"):
    batch += f" per {bc['batch_key']}"
  if bc.get("control_wells"):
    batch += f", fitted on {bc['control_wells']:,} control wells"
  items = [("method", result.get("method")), ("batch correction", batch if bc else None),
           ("arm centring", f"yes ({arm['mode'].replace('_', ' ')})" if arm.get("mode")
            else f"no: {arm['skipped']}" if arm.get("skipped") else None),
           ("aggregation", s.get("aggregation") if bc.get("method") != "precomputed" else None),
           ("perturbation types", ", ".join(s["perturbation_types"])
            if s.get("perturbation_types") else None),
           ("map", f"{result['n_perturbations']:,} perturbations" if result.get("n_perturbations")
            else None), ("wells", f"{result['n_wells']:,}" if result.get("n_wells") else None)]
  rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>"
                 for k, v in items if v is not None)
  return f"<table>{rows}</table>" if rows else "<p>unknown (no recall.json)</p>"


def build_page(labels, x, result=None, *, neighbours=10, n_clusters=0, layout="auto",
               sources=None, annotations_dir=None, title=None, seed=0):
  """(html text, info dict) of the page for a map."""
  result = result or {}
  names = np.asarray(labels).astype(str)
  if len(set(names)) != len(names):
    raise EvalError("the map has duplicate labels")
  sources = list(sources or (result.get("settings") or {}).get("sources") or resources.SOURCES)
  if len(sources) > 8:
    raise EvalError(f"at most 8 sources, got {len(sources)}")
  xn = unit_rows(x)
  nb, sim, heat = neighbourhoods(xn, max(1, min(neighbours, 50)))
  k = nb.shape[1]
  xy, layout_name = layout_2d(xn, layout, seed)
  cluster = clusters(xn, n_clusters, seed)
  data = {"names": names.tolist(), "k": k, "sources": sources, "xy": _b64(xy, "<f4"),
          "nb": _b64(nb, "<u2" if len(names) < 65536 else "<u4"),
          "sim": _b64(np.round(sim * 1e4), "<i2"), "src": _b64(annotate(names, nb, sources,
                                                                    annotations_dir), "u1"),
          "heat": _b64(np.round(heat * 100), "i1")}
  title = title or "Genome map" + (f": {result['method']}" if result.get("method") else "")
  meta = (f"{len(names):,} genes · layout {layout_name.upper()} · {int(cluster.max()) + 1} "
          f"clusters (Ward on cosine) · {k} nearest genes each · sources: {', '.join(sources)}")
  parts = {"TITLE": html.escape(title), "META": html.escape(meta), "RECALL": _recall_html(result),
           "CORRECTIONS": _corrections_html(result), "DATA": _script_json(data),
           "FIGURE": _scatter_figure(names, xy, cluster, layout_name), "PLOTLY": _plotly_js_gz(),
           "JS": _JS}
  page = re.sub(r"@([A-Z]+)@", lambda m: parts[m.group(1)], _TEMPLATE)
  info = {"genes": len(names), "layout": layout_name, "clusters": int(cluster.max()) + 1,
          "neighbours": k, "sources": sources}
  return page, info


def write_page(map_dir, out=None, *, max_genes=0, seed=0, **options) -> dict:
  """Reads MAP_DIR, writes the page (default MAP_DIR/map.html); returns the JSON summary."""
  t0 = time.perf_counter()
  labels, x, result = load_map(map_dir)
  total = len(labels)
  if max_genes and total > max_genes:
    keep = np.sort(np.random.default_rng(seed).choice(total, max(max_genes, 3), replace=False))
    labels, x = labels[keep], x[keep]
  page, info = build_page(labels, x, result, seed=seed, **options)
  out = out or os.path.join(map_dir, PAGE_FILE)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with files.atomic_open(out, "w") as f:
    f.write(page)
  return {"out": out, **info, "genes_in_map": total, "bytes": os.path.getsize(out),
          "seconds": round(time.perf_counter() - t0, 3)}


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:16px 20px;color:#222}
h1{font-size:20px;margin:0}h3{font-size:14px;margin:10px 0 4px}.meta{color:#666}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #e4e4e4;
text-align:left}.top{display:flex;gap:40px;flex-wrap:wrap}.chance td{color:#888}
.main{display:flex;gap:16px;flex-wrap:wrap;margin-top:12px}#map{flex:3 1 600px;height:660px}
.side{flex:2 1 440px;min-width:380px}#search{font-size:15px;padding:3px 6px;width:200px}
#status{color:#666;margin:4px 0 8px;font-size:13px}tr.candidate td{background:#fff1c7}
.tag{display:inline-block;padding:0 5px;margin-right:3px;border-radius:3px;background:#dde8f6;
font-size:12px}#neighbours a{color:#1f5fa8;cursor:pointer;text-decoration:underline}
#heatmap{height:430px}
</style></head><body>
<h1>@TITLE@</h1><div class="meta">@META@</div>
<div class="top"><div><h3>Recall of known relationships</h3>@RECALL@</div>
<div><h3>Corrections applied</h3>@CORRECTIONS@</div></div>
<div class="main"><div id="map"></div><div class="side">
<label>Gene <input id="search" list="genes" placeholder="type a gene, Enter" autocomplete="off"
disabled></label><datalist id="genes"></datalist><div id="status">loading the plots&hellip;</div>
<table id="neighbours"><thead><tr><th>#</th><th>nearest gene</th><th>cosine</th>
<th>annotated by</th></tr></thead><tbody></tbody></table><div id="heatmap"></div></div></div>
<script type="application/json" id="data">@DATA@</script>
<script type="application/json" id="figure">@FIGURE@</script>
<script type="application/octet-stream" id="plotly-gz">@PLOTLY@</script>
<script>@JS@</script>
</body></html>
"""

# Only what plotly lacks: decoding the data, the search box, the neighbour table, redrawing.
_JS = r"""(async () => {
const $ = id => document.getElementById(id), status = t => { $('status').textContent = t; };
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const arr = (s, T) => new T(bytes(s).buffer);
const ENT = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'};
const esc = s => String(s).replace(/[&<>"]/g, c => ENT[c]);
try {
  const gz = new Blob([bytes($('plotly-gz').textContent)]).stream();
  (0, eval)(await new Response(gz.pipeThrough(new DecompressionStream('gzip'))).text());
} catch (e) { status('this browser cannot unpack the inlined plotly.js: ' + e); throw e; }
const D = JSON.parse($('data').textContent), F = JSON.parse($('figure').textContent);
const names = D.names, K = D.k, M = K + 1, P = M * K / 2, xy = arr(D.xy, Float32Array);
const nb = arr(D.nb, names.length < 65536 ? Uint16Array : Uint32Array);
const sim = arr(D.sim, Int16Array);
const src = bytes(D.src), heat = arr(D.heat, Int8Array);
const index = new Map(names.map((g, i) => [g.toUpperCase(), i]));
let gl = false;
try { gl = !!document.createElement('canvas').getContext('webgl'); } catch (e) {}
if (!gl) F.data.forEach(t => { if (t.type === 'scattergl') t.type = 'scatter'; });
await Plotly.newPlot('map', F.data, F.layout, {responsive: true, displaylogo: false});
const selTrace = F.data.length - 1;
$('map').on('plotly_click', e => {
  const c = e.points[0].customdata;
  if (c !== undefined) select(+c);
});
$('neighbours').addEventListener('click', e => {
  const a = e.target.closest('a[data-i]');
  if (a) select(+a.dataset.i);
});
$('genes').innerHTML = names.map(g => `<option value="${esc(g)}">`).join('');
const input = $('search');
const find = () => {
  const i = index.get(input.value.trim().toUpperCase());
  if (i === undefined) status(`no gene "${input.value.trim()}" in this map`); else select(i);
};
input.addEventListener('keydown', e => { if (e.key === 'Enter') find(); });
input.addEventListener('change', find);
input.disabled = false;
status(`${names.length} genes: type one (or click a point) to see its ${K} nearest genes`);

function select(i) {
  input.value = names[i];
  const ids = [i], rows = [];
  for (let r = 0; r < K; r++) {
    const j = nb[i * K + r], m = src[i * K + r];
    ids.push(j);
    const tags = D.sources.filter((_, b) => (m >> b) & 1)
      .map(s => `<span class="tag">${esc(s)}</span>`);
    rows.push(`<tr class="${m ? 'known' : 'candidate'}" data-gene="${esc(names[j])}">` +
      `<td>${r + 1}</td>` +
      `<td><a data-i="${j}">${esc(names[j])}</a></td><td>${(sim[i * K + r] / 1e4).toFixed(3)}</td>` +
      `<td>${tags.join('') || '<b>candidate</b>: in no source'}</td></tr>`);
  }
  $('neighbours').tBodies[0].innerHTML = rows.join('');
  status(`${names[i]}: ${K} nearest genes by cosine; highlighted: pairs that no source annotates`);
  Plotly.restyle('map', {x: [ids.map(j => xy[2 * j])], y: [ids.map(j => xy[2 * j + 1])],
                         text: [ids.map((j, r) => r ? '' : names[j])], customdata: [ids]}, [selTrace]);
  const tri = (a, b) => M * a - a * (a + 1) / 2 + b - a - 1;
  const cell = (a, b) => a === b ? 1 : heat[i * P + (a < b ? tri(a, b) : tri(b, a))] / 100;
  const o = leafOrder(M, (a, b) => 1 - cell(a, b)), lab = o.map(a => names[ids[a]]);
  Plotly.react('heatmap', [{type: 'heatmap', x: lab, y: lab, z: o.map(a => o.map(b => cell(a, b))),
    zmin: -1, zmax: 1, colorscale: 'RdBu', reversescale: false,
    hovertemplate: '%{y} · %{x}: %{z:.2f}<extra></extra>'}],
    {title: {text: `neighbourhood of ${esc(names[i])}: cosine, clustered`, font: {size: 13}},
     margin: {l: 90, r: 10, t: 36, b: 90}, xaxis: {type: 'category'},
     yaxis: {type: 'category', autorange: 'reversed'}}, {displayModeBar: false});
}
// Leaf order of average-linkage clustering (scipy's "average"), naive: M is at most 51.
function leafOrder(M, dist) {
  const groups = Array.from({length: M}, (_, a) => [a]);
  while (groups.length > 1) {
    let best = [0, 1, Infinity];
    for (let p = 0; p < groups.length; p++) for (let q = p + 1; q < groups.length; q++) {
      let d = 0;
      for (const a of groups[p]) for (const b of groups[q]) d += dist(a, b);
      d /= groups[p].length * groups[q].length;
      if (d < best[2]) best = [p, q, d];
    }
    groups[best[0]] = groups[best[0]].concat(groups[best[1]]);
    groups.splice(best[1], 1);
  }
  return groups[0];
}
window.exploreSelect = select;
})();
"""


# ------------------------------------------------------------------------------------ CLI

def _define_flags():
  from absl import flags
  flags.DEFINE_string("map", None, "eval dir of python -m eval.recall (gene_embeddings.npz, "
                      "recall.json)")
  flags.DEFINE_string("out", None, "HTML file to write (default MAP/map.html)")
  flags.DEFINE_integer("max_genes", 0, "keep at most this many genes, drawn at random (0: all)")
  flags.DEFINE_integer("neighbours", 10, "nearest genes listed per gene (1 to 50)")
  flags.DEFINE_integer("clusters", 0, "clusters to colour (0: about sqrt(N/2), 2 to 40)")
  flags.DEFINE_enum("layout", "auto", ["auto", "umap", "pca"],
                    "2-D layout: auto = UMAP when umap-learn is installed, else PCA")
  flags.DEFINE_list("sources", None, "annotation sources (default: those of recall.json)")
  flags.DEFINE_string("annotations_dir", None, "folder with {source}.txt annotation files")
  flags.DEFINE_string("title", None, "page title (default: the run's method)")
  flags.DEFINE_integer("seed", 0, "seed of the layout, the clustering and --max_genes")


def main(argv):
  from absl import flags
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.map:
    raise EvalError("--map=EVAL_DIR is required")
  if f.max_genes < 0 or not 1 <= f.neighbours <= 50 or f.clusters < 0:
    raise EvalError("--max_genes and --clusters must be >= 0, --neighbours from 1 to 50")
  info = write_page(f.map, f.out, max_genes=f.max_genes, seed=f.seed, neighbours=f.neighbours,
                    n_clusters=f.clusters, layout=f.layout, sources=f.sources,
                    annotations_dir=f.annotations_dir, title=f.title)
  print(json.dumps(info))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
