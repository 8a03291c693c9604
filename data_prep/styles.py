"""Morphology styles of the synthetic screen: how the cells look and how a gene acts on them.

    python -m data_prep.synthetic --out=DIR --style=granular

A style is a renderer (well parameters -> six clean channels), its parameter table (name: (low,
high, base), moved by phenotypes.latent_to_params) and the shape of the latent -> parameter
mixing. The biology (genes, modules, latents), the layout and the batch effects do not depend on
the style, so a screen's ground truth is the same in every style for one seed
(docs/data_layouts.md §6). Hyper-parameters tuned on one style can then be reported on another.

* ``default``: render.py. Few (about 55 per 512² field) large, spread, elongated cells with
  stress fibres, a reticular ER, tubular mitochondria and a Golgi ribbon; a dense random mixing,
  so every latent dimension moves most of the 26 parameters, amounts and lengths among them.
* ``granular``: this module. Small, round cells (about 150 per field) packed in colonies, with
  punctate organelles (chromocentres, fragmented nucleoli, ER exit sites, RNA granules, clumped
  mitochondrial dots, Golgi fragments) and radial or circumferential actin filaments, seen
  through channel cross-talk. Its 25 parameters set texture frequency, granule size at a fixed
  mass, fragmentation and spatial arrangement (colonies, radial placement, clumping, filament
  orientation), not amounts; each parameter follows only the 5 strongest of its latent
  loadings, so a latent dimension moves a few features instead of all of them.
"""
import dataclasses
import functools
from typing import Callable, Optional

import numpy as np
from scipy import ndimage as ndi

from data_prep import render

# name: (low, high, base); lengths in pixels at the renderer's fixed pixel size.
GRANULAR_PARAMS = {
    "density": (90., 240., 150.),               # cells per 512^2 field (default style: 55)
    "colony_fraction": (0.05, 0.95, 0.6),       # cells seeded in colonies vs scattered
    "colony_spread": (18., 90., 40.),           # sd of a colony's cells around its centre
    "cell_radius": (15., 32., 22.),
    "cell_elongation": (1.0, 1.8, 1.15),
    "membrane_ruffle": (0.0, 0.4, 0.12),        # irregularity of the cell outline
    "nucleus_radius": (6., 11., 8.),
    "chromatin_scale": (0.7, 3.5, 1.4),         # spatial period of the chromatin texture
    "chromocentre_count": (0.5, 14., 4.),       # heterochromatin foci per nucleus
    "chromocentre_size": (0.6, 2.2, 1.0),       # focus size at a fixed mass per focus
    "nucleoli_fragmentation": (0.0, 1.0, 0.3),  # one large nucleolus vs many small, same mass
    "nucleoli_periphery": (0.0, 1.0, 0.3),      # nucleoli at the centre vs the nuclear rim
    "er_texture_scale": (0.8, 4.0, 1.6),        # spatial period of the diffuse ER texture
    "er_puncta_size": (0.6, 2.2, 1.0),          # ER exit sites: size at a fixed mass
    "er_spread": (0.0, 1.0, 0.4),               # puncta near the nucleus vs out to the membrane
    "filament_count": (2., 24., 8.),            # actin filaments per cell
    "filament_length": (4., 26., 11.),
    "filament_radial": (0.0, 1.0, 0.5),         # radial spokes vs circumferential arcs
    "rna_granule_size": (0.6, 2.4, 1.0),        # cytoplasmic RNA granules at a fixed mass
    "mito_granule_size": (0.6, 2.0, 0.9),
    "mito_rod_length": (1., 7., 2.5),           # dots vs short rods
    "mito_clumping": (0.0, 1.0, 0.35),          # share of mitochondria in 3 clumps per cell
    "mito_perinuclear": (0.0, 1.0, 0.4),
    "golgi_fragments": (2., 30., 7.),           # Golgi fragments per cell, total mass fixed
    "golgi_dispersal": (0.2, 2.0, 0.6),         # angular and radial spread around the nucleus
}
# Target mean of each clean channel in camera counts (render.MEAN_COUNTS for the default).
GRANULAR_MEAN_COUNTS = np.array([600., 800., 500., 700., 450., 650.], np.float32)
# Bleed-through (detected channel, dye, share of the dye's signal): neighbouring emission
# spectra of the Cell Painting dyes (Bray et al., Nat. Protoc. 2016): Hoechst into the ConA
# channel, ConA and SYTO14 into each other, SYTO14 into the phalloidin channel, WGA and
# phalloidin into each other, MitoTracker into WGA. Applied to unit-mean channels.
CROSS_TALK = ((1, 0, 0.10), (3, 1, 0.12), (1, 3, 0.08), (2, 3, 0.06), (2, 5, 0.10),
              (5, 2, 0.08), (5, 4, 0.07))
CELLS_PER_COLONY = 12
MITOTIC_FRACTION = 0.03
BANK_SEED = render.BANK_SEED + 1
TEXTURE_SCALES = np.geomspace(0.7, 4.0, 6).astype(np.float32)

# The default renderer's drawing helpers (render.py), shared so that both styles draw alike.
# pylint: disable=protected-access
_blur, _splat, _segments = render._blur, render._splat, render._segments
_to_field, _ellipse_radius = render._to_field, render._ellipse_radius
_points_in_cells = render._points_in_cells
_binomial_blur, _crop, _crop_spec, _unit = (render._binomial_blur, render._crop,
                                            render._crop_spec, render._unit)
_bank_size = render._bank_size
# pylint: enable=protected-access


@functools.lru_cache(maxsize=2)
def _texture_bank(size):
  """Unit band-pass noise at TEXTURE_SCALES, a little larger than the site (render._banks)."""
  m = _bank_size(size)
  white = np.random.default_rng(BANK_SEED).standard_normal((m, m), dtype=np.float32)
  return np.stack([_unit(ndi.gaussian_filter(white, s) - ndi.gaussian_filter(white, 2 * s))
                   for s in TEXTURE_SCALES])


def _texture(size, scale, rng):
  """Band-pass noise at spatial ``scale``, blended between the two nearest banked scales."""
  bank = _texture_bank(size)
  i = int(np.clip(np.searchsorted(TEXTURE_SCALES, scale) - 1, 0, len(TEXTURE_SCALES) - 2))
  t = np.log(scale / TEXTURE_SCALES[i]) / np.log(TEXTURE_SCALES[i + 1] / TEXTURE_SCALES[i])
  t = float(np.clip(t, 0, 1))
  pair = _crop(bank[i:i + 2], size, _crop_spec(size, rng))
  return (1 - t) * pair[0] + t * pair[1]


def _colony_cells(p, size, rng):
  """Cells seeded as a Thomas cluster process (colonies) mixed with scattered cells."""
  n_target = max(3, rng.poisson(p["density"] * (size / render.REFERENCE_SIZE) ** 2))
  n_cand = 6 * n_target
  n_col = max(1, int(round(n_target * p["colony_fraction"] / CELLS_PER_COLONY)))
  centres = rng.uniform(0, size, (n_col, 2))
  near = centres[rng.integers(n_col, size=n_cand)] + rng.normal(0, p["colony_spread"],
                                                                (n_cand, 2))
  cand = np.where((rng.random(n_cand) < p["colony_fraction"])[:, None], near,
                  rng.uniform(0, size, (n_cand, 2)))
  cand = cand[np.all((cand >= 0) & (cand < size), axis=1)].astype(np.float32)
  kept = render.keep_apart(cand, n_target, (2.05 * p["nucleus_radius"]) ** 2)
  n = len(kept)
  mitotic = rng.random(n) < MITOTIC_FRACTION
  elong = p["cell_elongation"] * rng.lognormal(0, 0.1, n)
  cells = {
      "cy": kept[:, 0], "cx": kept[:, 1], "theta": rng.uniform(0, np.pi, n),
      "R": p["cell_radius"] * rng.lognormal(0, 0.12, n) * np.where(mitotic, 0.6, 1.0),
      "elong": np.where(mitotic, 1.05, np.maximum(elong, 1.0)),
      "rn": p["nucleus_radius"] * rng.lognormal(0, 0.08, n) * np.where(mitotic, 0.75, 1.0),
      "ecc": np.where(mitotic, 1.05, np.maximum(1.1 * rng.lognormal(0, 0.08, n), 1.0)),
      "dna": rng.lognormal(0, 0.12, n) * np.where(mitotic, 2.2, 1.0),
      "mitotic": mitotic,
  }
  root = np.sqrt(cells["elong"])
  cells["A"], cells["B"] = cells["R"] * root, cells["R"] / root
  cells["a"], cells["b"] = cells["rn"] * np.sqrt(cells["ecc"]), cells["rn"] / np.sqrt(cells["ecc"])
  return {k: np.asarray(v, np.float32) if k != "mitotic" else v for k, v in cells.items()}


def _in_nuclei(cells, counts, rng, spread, rim=0.0):
  """Points per cell in its nucleus: uniform within ``spread`` x the nuclear ellipse, or with
  weight ``rim`` in a band at 0.6-0.85 of it (towards the nuclear envelope)."""
  idx = np.repeat(np.arange(len(counts)), counts)
  u = rng.random(idx.size)
  rho = (1 - rim) * spread * np.sqrt(u) + rim * (0.6 + 0.25 * u)
  phi = rng.uniform(0, 2 * np.pi, idx.size)
  sub = {k: v[idx] for k, v in cells.items()}
  return _to_field(sub, rho * sub["a"] * np.cos(phi), rho * sub["b"] * np.sin(phi))


def _granules(ys, xs, size, sigma):
  """Unit-mass Gaussian granules of ``sigma`` pixels (a larger granule is dimmer, not more)."""
  return _blur(_splat(ys, xs, size), sigma)


def render_granular(p, size, rng):
  """Noise-free channels (6, size, size) float32 of the granular style, mean-normalised."""
  cells = _colony_cells(p, size, rng)
  n = len(cells["cy"])
  geo = render.cell_geometry(cells, size, rng, ruffle=p["membrane_ruffle"])
  lab, body, nuc, cyto = geo["lab"], geo["body"], geo["nuc"], geo["cyto"]
  membrane = 1.2 * geo["edges"] * (body > 0.3) + geo["outline"]
  grow = ~cells["mitotic"]
  scale = (cells["R"] / GRANULAR_PARAMS["cell_radius"][2]) ** 2  # counts grow with cell area

  # w1: nuclei with chromatin texture at chromatin_scale and heterochromatin foci.
  chromatin = _texture(size, p["chromatin_scale"], rng)
  counts = rng.poisson(p["chromocentre_count"], n) * grow
  foci = _granules(*_in_nuclei(cells, counts, rng, 0.8), size, p["chromocentre_size"])
  w1 = nuc * (cells["dna"][lab] * np.maximum(1.0 + 0.35 * chromatin, 0.05) + 10.0 * foci)

  # w4: nucleoplasm, nucleoli (one large to many small at the same mass; central or peripheral)
  # and cytoplasmic RNA granules of rna_granule_size.
  frag, rim = p["nucleoli_fragmentation"], p["nucleoli_periphery"]
  counts = (1 + rng.poisson(8.0 * frag, n)) * grow
  nucleoli = _granules(*_in_nuclei(cells, counts, rng, 0.45, rim), size,
                       2.4 / np.sqrt(1 + 4.0 * frag))
  counts = rng.poisson(30.0 * scale)
  ry, rx, _ = _points_in_cells(cells, counts, 1.0, rng)
  rna = _granules(ry, rx, size, p["rna_granule_size"])
  w4 = nuc * (0.25 + 50.0 * nucleoli / (1 + 8.0 * frag)) + cyto * (0.12 + 3.0 * rna)

  # w2: a diffuse ER texture at er_texture_scale plus ER exit sites near or far from the nucleus.
  texture = np.maximum(1.0 + 0.6 * _texture(size, p["er_texture_scale"], rng), 0)
  counts = rng.poisson(60.0 * scale)
  ey, ex, _ = _points_in_cells(cells, counts, 0.4 + 2.5 * (1 - p["er_spread"]), rng)
  puncta = _granules(ey, ex, size, p["er_puncta_size"])
  w2 = (0.3 * cyto * (0.3 + np.exp(-geo["dist_nuc"] / 10.0)) * texture
        + 4.0 * puncta * body + 0.4 * geo["envelope"] * body)

  # Filaments (w3): radial spokes or circumferential arcs around the nucleus.
  counts = rng.poisson(p["filament_count"] * scale) * grow
  fy, fx, fid = _points_in_cells(cells, counts, 0.7, rng, reach=0.9)
  polar = np.arctan2(fy - cells["cy"][fid], fx - cells["cx"][fid])
  angle = polar + (1 - p["filament_radial"]) * np.pi / 2 + rng.normal(0, 0.25, fid.size)
  flen = p["filament_length"] * rng.uniform(0.5, 1.5, fid.size)
  filament_pts = _segments(fy, fx, angle, flen)[:2]
  # Golgi (w6): fragments around the nucleus, dispersed with golgi_dispersal.
  counts = np.maximum(1, rng.poisson(p["golgi_fragments"], n))
  gid = np.repeat(np.arange(n), counts)
  psi = rng.uniform(0, 2 * np.pi, n)[gid] + rng.normal(0, p["golgi_dispersal"], gid.size)
  reach = _ellipse_radius(psi, cells["a"][gid], cells["b"][gid]) * (
      1.15 + np.abs(rng.normal(0, 0.5 * p["golgi_dispersal"], gid.size)))
  golgi_pts = _to_field({k: v[gid] for k, v in cells.items()}, reach * np.cos(psi),
                        reach * np.sin(psi))
  splats = np.stack([_splat(*filament_pts, size), _splat(*golgi_pts, size)])
  filaments, golgi = _binomial_blur(splats)
  w3 = 0.08 * cyto + 0.5 * membrane + 1.5 * filaments * body
  w6 = 30.0 * golgi / p["golgi_fragments"] + 0.3 * membrane + 0.04 * body

  # w5: mitochondrial dots or short rods, a share of them in 3 clumps per cell.
  counts = rng.poisson(40.0 * scale)
  my, mx, mid = _points_in_cells(cells, counts, 0.6 + 3.0 * p["mito_perinuclear"], rng)
  cy, cx, _ = _points_in_cells(cells, np.full(n, 3), 1.0, rng)
  clump = mid * 3 + rng.integers(3, size=mid.size)
  inside = rng.random(mid.size) < p["mito_clumping"]
  my = np.where(inside, cy[clump] + rng.normal(0, 2.5, mid.size), my)
  mx = np.where(inside, cx[clump] + rng.normal(0, 2.5, mid.size), mx)
  mlen = p["mito_rod_length"] * rng.uniform(0.5, 1.5, mid.size)
  mito_pts = _segments(my, mx, rng.uniform(0, np.pi, mid.size), mlen)[:2]
  w5 = _granules(*mito_pts, size, p["mito_granule_size"]) * cyto

  img = np.stack([w1, w2, w3, w4, w5, w6])
  img /= np.maximum(img.reshape(6, -1).mean(axis=1), 1e-6)[:, None, None]
  seen = img.copy()
  for detected, dye, share in CROSS_TALK:
    seen[detected] += share * img[dye]
  means = seen.reshape(6, -1).mean(axis=1)
  return seen * (GRANULAR_MEAN_COUNTS / means)[:, None, None]


def sparse_mixing(mixing, keep):
  """Keeps each row's ``keep`` largest loadings (by magnitude), rescaled to the row's norm."""
  mixing = np.asarray(mixing)
  if keep is None or keep >= mixing.shape[1]:
    return mixing
  cut = -np.sort(-np.abs(mixing), axis=1)[:, keep - 1:keep]
  out = np.where(np.abs(mixing) >= cut, mixing, 0.0)
  return out * (np.linalg.norm(mixing, axis=1) / np.linalg.norm(out, axis=1))[:, None]


@dataclasses.dataclass(frozen=True)
class Style:
  name: str
  params: dict               # name: (low, high, base), the renderer's well parameters
  render_clean: Callable     # (params, size, rng) -> (6, size, size) float32
  mixing_keep: Optional[int]  # loadings kept per parameter (None: the dense mixing)

  def mixing(self, raw):
    """The latent -> parameter mixing from phenotypes.gene_phenotypes' dense draw."""
    return sparse_mixing(raw, self.mixing_keep)


STYLES = {
    "default": Style("default", render.PARAMS, render.render_clean, None),
    "granular": Style("granular", GRANULAR_PARAMS, render_granular, 5),
}
DEFAULT = "default"


def get(name):
  """The Style called ``name``; a ValueError names the known styles."""
  if name not in STYLES:
    raise ValueError(f"unknown style {name!r}; expected one of {', '.join(STYLES)}")
  return STYLES[name]


def render_site(name, p, effects, size, rng):
  """One site of style ``name``: (6, size, size) uint16, with render.apply_effects' batch
  effects (the same microscope in every style)."""
  return render.apply_effects(get(name).render_clean(p, size, rng), effects, rng)
