"""Renders one 6-channel Cell-Painting-like site from well-level morphology parameters.

Channels (RxRx3 order): w1 nuclei (Hoechst), w2 ER (ConA), w3 actin (phalloidin), w4 RNA and
nucleoli (SYTO14), w5 mitochondria (MitoTracker), w6 Golgi and plasma membrane (WGA).

A site is a field of cells at a fixed pixel size (about 0.65 um/px as in RxRx3), so a larger
``size`` shows more cells, not bigger ones. Cells are Voronoi territories around seeded nuclei,
limited by a per-cell ellipse; inside them the renderer draws elliptic nuclei with chromatin
texture, nucleoli, a perinuclear reticular ER, stress fibres and cortical actin, tubular or
fragmented mitochondria, and a juxtanuclear Golgi. Every channel is vectorised over the whole
field (no per-cell Python loop).

The gene signal is meant to live in morphology, texture and cross-channel layout, so each clean
channel is scaled to a fixed mean before the batch effects: the mean intensity of a channel then
carries the plate and well effects, not the phenotype.

This is the screen's ``default`` morphology style; styles.py holds the others, which reuse the
drawing helpers and the batch effects (apply_effects) here.
"""
import functools
import struct
import zlib

import numpy as np
from scipy import ndimage as ndi

CHANNELS = ("w1", "w2", "w3", "w4", "w5", "w6")
STAINS = ("Hoechst (nuclei)", "ConA (ER)", "phalloidin (actin)", "SYTO14 (RNA, nucleoli)",
          "MitoTracker (mitochondria)", "WGA (Golgi, plasma membrane)")
# Target mean of each clean channel in camera counts (before gain, offset and noise); the
# sparse channels (nuclei, mitochondria) get less so that their bright spots rarely saturate.
MEAN_COUNTS = np.array([750., 700., 650., 600., 350., 600.], np.float32)
REFERENCE_SIZE = 512  # densities are given per 512 x 512 field

# name: (low, high, base). Phenotypes move a parameter within (low, high) around base
# (see phenotypes.latent_to_params); lengths are in pixels.
PARAMS = {
    "density": (22., 110., 55.),             # cells per 512^2 field
    "cell_radius": (30., 80., 52.),          # mean semi-axis of the cell ellipse
    "cell_elongation": (1.0, 3.0, 1.6),      # axis ratio of the cell ellipse
    "cell_alignment": (0.0, 0.95, 0.3),      # coherence of cell axes across the field
    "nucleus_radius": (8., 17., 11.5),
    "nucleus_eccentricity": (1.0, 2.0, 1.3),  # axis ratio of the nucleus
    "chromatin_texture": (0.05, 0.9, 0.3),
    "mitotic_fraction": (0.0, 0.3, 0.05),    # rounded cells with condensed bright nuclei
    "nucleoli_count": (0.8, 7., 2.5),
    "nucleoli_size": (0.7, 2.6, 1.3),
    "rna_nuclear": (0.1, 1.4, 0.45),         # nucleoplasm vs cytoplasm RNA
    "er_scale": (1.0, 3.6, 1.8),             # mesh size of the ER network
    "er_perinuclear": (6., 45., 16.),        # decay length of ER away from the nucleus
    "er_network": (0.15, 0.95, 0.6),         # tubular network vs diffuse sheets
    "actin_fibres": (0.5, 22., 7.),          # stress fibres per cell
    "actin_length": (8., 80., 32.),
    "actin_coherence": (0.0, 1.0, 0.55),     # alignment of fibres with the cell axis
    "actin_cortical": (0.1, 2.0, 0.6),       # cortical ring vs fibres
    "mito_count": (12., 90., 38.),           # mitochondria per cell
    "mito_length": (1., 14., 4.5),           # fragmented (short) vs tubular (long)
    "mito_perinuclear": (0.0, 1.0, 0.45),    # clustering around the nucleus
    "mito_er_coloc": (0.0, 0.95, 0.35),      # mitochondria seen on ER tubules
    "golgi_offset": (0.5, 2.0, 1.1),         # Golgi distance from the nuclear centre / radius
    "golgi_spread": (1.2, 9., 3.2),          # compact ribbon vs dispersed stacks
    "golgi_polarity": (0.0, 1.0, 0.5),       # Golgi at the cell's long-axis end vs anywhere
    "membrane_wga": (0.1, 1.6, 0.5),         # plasma membrane vs Golgi in w6
}


@functools.lru_cache(maxsize=4)
def _grid(size):
  y, x = np.mgrid[:size, :size].astype(np.float32)
  return y, x


BANK_SEED = 1536  # texture banks are fixed, so a well's pixels depend only on its own rng
ER_SCALES = np.geomspace(PARAMS["er_scale"][0], PARAMS["er_scale"][1], 6).astype(np.float32)


def _unit(a):
  return ((a - a.mean()) / (a.std() + 1e-6)).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _banks(size):
  """Texture fields a little larger than the site, made once per process; sites use crops.

  Filtering fresh white noise for every site (chromatin grain, the ER mesh at its scale, cell
  outline wobble, pixel noise) would cost more than the rest of the rendering.
  """
  m = _bank_size(size)
  rng = np.random.default_rng(BANK_SEED)
  white = rng.standard_normal((m, m), dtype=np.float32)
  low = ndi.gaussian_filter(rng.standard_normal((m // 8 + 1, m // 8 + 1), dtype=np.float32), 1.5,
                            mode="wrap")
  return {
      "noise": rng.standard_normal((m, m), dtype=np.float32),
      "grain": _unit(ndi.gaussian_filter(white, 1.2)),
      "wobble": _unit(ndi.zoom(low, 8, order=1)[:m, :m]),
      "er": np.stack([_unit(ndi.gaussian_filter(white, s) - ndi.gaussian_filter(white, 2 * s))
                      for s in ER_SCALES]),
  }


def _bank_size(size):
  return size + max(64, size // 4)


def _crop_spec(size, rng):
  m = _bank_size(size)
  oy = int(rng.integers(0, m - size + 1))
  ox = int(rng.integers(0, m - size + 1))
  return oy, ox, int(rng.integers(4))


def _crop(bank, size, spec):
  """A size x size view of a bank at an offset, flipped by one of four mirror symmetries."""
  oy, ox, k = spec
  out = bank[..., oy:oy + size, ox:ox + size]
  return out[..., ::-1 if k & 1 else 1, ::-1 if k & 2 else 1]


def _er_mesh(size, scale, rng):
  """Band-pass noise at ``scale``, blended between the two nearest banked scales."""
  bank = _banks(size)["er"]
  i = int(np.clip(np.searchsorted(ER_SCALES, scale) - 1, 0, len(ER_SCALES) - 2))
  t = float(np.clip(np.log(scale / ER_SCALES[i]) / np.log(ER_SCALES[i + 1] / ER_SCALES[i]), 0, 1))
  pair = _crop(bank[i:i + 2], size, _crop_spec(size, rng))
  return (1 - t) * pair[0] + t * pair[1]


def _splat(ys, xs, size):
  """Unit point masses as an image (points outside the field are dropped)."""
  iy, ix = np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)
  ok = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
  flat = np.bincount(iy[ok] * size + ix[ok], minlength=size * size)
  return flat.reshape(size, size).astype(np.float32)


def _segments(y0, x0, angle, length):
  """Points every pixel along segments centred at (y0, x0); returns ys, xs and segment ids."""
  n = np.maximum(1, np.ceil(length)).astype(np.int64)
  seg = np.repeat(np.arange(len(n)), n)
  offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
  t = ((offs + 0.5) / n[seg] - 0.5) * length[seg]
  return y0[seg] + t * np.sin(angle[seg]), x0[seg] + t * np.cos(angle[seg]), seg


def _ellipse_radius(phi, a, b):
  """Distance from an ellipse's centre to its boundary in direction phi (cell frame)."""
  return 1.0 / np.sqrt((np.cos(phi) / a) ** 2 + (np.sin(phi) / b) ** 2)


def _to_field(cells, u, v):
  """Cell-frame offsets (u along the cell axis) -> field coordinates (y, x)."""
  c, s = np.cos(cells["theta"]), np.sin(cells["theta"])
  return cells["cy"] + u * s + v * c, cells["cx"] + u * c - v * s


def keep_apart(cand, n_target, dmin2):
  """The first ``n_target`` candidate centres (float32, (N, 2)) that keep squared distance
  ``dmin2`` from every centre kept before them (so no two nuclei overlap)."""
  kept = np.empty((n_target, 2), np.float32)
  n = 0
  for pt in cand:
    if n and np.min(np.sum((kept[:n] - pt) ** 2, axis=1)) < dmin2:
      continue
    kept[n] = pt
    n += 1
    if n == n_target:
      break
  return kept[:n]


def _seed_cells(p, size, rng):
  """Per-cell parameters: centres (no two nuclei overlap) and jittered shape parameters."""
  n_target = max(3, rng.poisson(p["density"] * (size / REFERENCE_SIZE) ** 2))
  cand = rng.uniform(0, size, (6 * n_target, 2)).astype(np.float32)
  kept = keep_apart(cand, n_target, (2.1 * p["nucleus_radius"]) ** 2)
  n = len(kept)
  mitotic = rng.random(n) < p["mitotic_fraction"]
  spread = (1.0 - p["cell_alignment"]) * np.pi
  elong = p["cell_elongation"] * rng.lognormal(0, 0.15, n)
  cells = {
      "cy": kept[:n, 0], "cx": kept[:n, 1],
      "theta": rng.uniform(0, np.pi) + rng.uniform(-spread / 2, spread / 2, n),
      "R": p["cell_radius"] * rng.lognormal(0, 0.15, n) * np.where(mitotic, 0.5, 1.0),
      "elong": np.where(mitotic, 1.05, np.maximum(elong, 1.0)),
      "rn": p["nucleus_radius"] * rng.lognormal(0, 0.1, n) * np.where(mitotic, 0.72, 1.0),
      "ecc": np.where(mitotic, 1.05,
                      np.maximum(p["nucleus_eccentricity"] * rng.lognormal(0, 0.1, n), 1.0)),
      "dna": rng.lognormal(0, 0.15, n) * np.where(mitotic, 2.2, 1.0),
      "mitotic": mitotic,
  }
  root = np.sqrt(cells["elong"])
  cells["A"], cells["B"] = cells["R"] * root, cells["R"] / root
  cells["a"], cells["b"] = cells["rn"] * np.sqrt(cells["ecc"]), cells["rn"] / np.sqrt(cells["ecc"])
  return {k: np.asarray(v, np.float32) if k != "mitotic" else v for k, v in cells.items()}


def _points_in_cells(cells, counts, power, rng, outside_nucleus=True, reach=1.0):
  """Random points per cell, at radial fraction U**power of the way to ``reach`` x membrane.

  With ``outside_nucleus`` the radial range starts at the nuclear edge (cytoplasmic organelles),
  otherwise at the centre (stress fibres run over the nucleus too).
  """
  idx = np.repeat(np.arange(len(counts)), counts)
  phi = rng.uniform(0, 2 * np.pi, idx.size)
  rn = _ellipse_radius(phi, cells["a"][idx], cells["b"][idx])
  rc = np.maximum(_ellipse_radius(phi, cells["A"][idx], cells["B"][idx]), rn * 1.2) * reach
  r0 = rn if outside_nucleus else 0.0
  r = r0 + rng.random(idx.size) ** power * (rc - r0)
  sub = {k: v[idx] for k, v in cells.items()}
  ys, xs = _to_field(sub, r * np.cos(phi), r * np.sin(phi))
  return ys, xs, idx


def _blur(img, sigma):
  return ndi.gaussian_filter(img, sigma, truncate=3.0)


def _binomial_blur(img):
  """[1, 2, 1] / 4 along the last two axes (a Gaussian of sigma 0.71), 4x cheaper than ndimage."""
  out = np.empty_like(img)
  for axis in (-2, -1):
    src = np.moveaxis(img, axis, 0)
    dst = np.moveaxis(out, axis, 0)
    dst[1:-1] = src[:-2] + src[2:]
    dst[0], dst[-1] = src[0] + src[1], src[-2] + src[-1]
    dst *= 0.25
    dst += 0.5 * src
    img = out.copy() if axis == -2 else out
  return out


def cell_geometry(cells, size, rng, ruffle=0.12):
  """Per-pixel maps of a field of cells: Voronoi territories around the nuclei, limited by each
  cell's ellipse with an outline wobble of relative amplitude ``ruffle``.

  Returns a dict: ``lab`` (cell id per pixel), ``body`` and ``nuc`` (soft cell and nucleus
  masks), ``envelope`` (the nuclear rim), ``cyto``, ``dist_nuc`` (pixels beyond the nuclear
  edge), ``edges`` (borders between territories) and ``outline`` (the cell ellipse's edge).
  """
  y, x = _grid(size)
  banks = _banks(size)
  n = len(cells["cy"])
  seeds = np.ones((size, size), bool)
  iy = np.clip(np.rint(cells["cy"]).astype(int), 0, size - 1)
  ix = np.clip(np.rint(cells["cx"]).astype(int), 0, size - 1)
  seeds[iy, ix] = False
  ids = np.zeros((size, size), np.int32)
  ids[iy, ix] = np.arange(n)
  near = ndi.distance_transform_edt(seeds, return_distances=False, return_indices=True)
  lab = ids[near[0], near[1]]

  # Cell-frame coordinates of every pixel relative to its cell's nucleus centre.
  dy, dx = y - cells["cy"][lab], x - cells["cx"][lab]
  c, s = np.cos(cells["theta"])[lab], np.sin(cells["theta"])[lab]
  u, v = dx * c + dy * s, -dx * s + dy * c
  wobble = 1.0 + ruffle * _crop(banks["wobble"], size, _crop_spec(size, rng))
  rcell = np.sqrt((u / cells["A"][lab]) ** 2 + (v / cells["B"][lab]) ** 2) / wobble
  r_pix = cells["R"][lab]
  body = np.clip((1.0 - rcell) * r_pix / 2.0 + 0.5, 0, 1)
  rnuc = np.sqrt((u / cells["a"][lab]) ** 2 + (v / cells["b"][lab]) ** 2)
  rn_pix = cells["rn"][lab]
  nuc = np.clip((1.0 - rnuc) * rn_pix / 1.2 + 0.5, 0, 1)
  envelope = np.exp(-(((rnuc - 1.0) * rn_pix) / 1.3) ** 2)
  cyto = body * (1.0 - nuc)
  dist_nuc = np.maximum(rnuc - 1.0, 0) * rn_pix  # pixels beyond the nuclear edge
  edges = np.zeros((size, size), np.float32)
  edges[1:] += lab[1:] != lab[:-1]
  edges[:, 1:] += lab[:, 1:] != lab[:, :-1]
  outline = np.exp(-(((rcell - 1.0) * r_pix) / 1.2) ** 2) * (rnuc > 1)
  return {"lab": lab, "body": body, "nuc": nuc, "envelope": envelope, "cyto": cyto,
          "dist_nuc": dist_nuc, "edges": edges, "outline": outline}


def render_clean(p, size, rng):
  """Noise-free channels (6, size, size) float32 for well parameters ``p``, mean-normalised."""
  banks = _banks(size)
  cells = _seed_cells(p, size, rng)
  n = len(cells["cy"])
  geo = cell_geometry(cells, size, rng)
  lab, body, nuc, envelope = geo["lab"], geo["body"], geo["nuc"], geo["envelope"]
  cyto, dist_nuc, edges, outline = geo["cyto"], geo["dist_nuc"], geo["edges"], geo["outline"]
  grow = ~cells["mitotic"]
  scale = (cells["R"] / PARAMS["cell_radius"][2]) ** 2  # organelle counts grow with cell area

  # Point-like structures, splatted and blurred together below.
  # Actin stress fibres, aligned with the cell axis by actin_coherence.
  counts = rng.poisson(p["actin_fibres"] * scale) * grow
  fy, fx, fid = _points_in_cells(cells, counts, 0.5, rng, outside_nucleus=False, reach=0.75)
  jitter = (1 - p["actin_coherence"]) * rng.uniform(-np.pi / 2, np.pi / 2, fid.size)
  flen = p["actin_length"] * rng.uniform(0.5, 1.5, fid.size)
  fibre_pts = _segments(fy, fx, cells["theta"][fid] + jitter, flen)[:2]
  # Mitochondria: tubular or fragmented, perinuclear or spread.
  counts = rng.poisson(p["mito_count"] * scale)
  my, mx, mid = _points_in_cells(cells, counts, 0.6 + 3.0 * p["mito_perinuclear"], rng)
  mlen = p["mito_length"] * rng.uniform(0.4, 1.6, mid.size)
  mito_pts = _segments(my, mx, rng.uniform(0, np.pi, mid.size), mlen)[:2]
  # Golgi: stacks along a ribbon beside the nucleus (offset, polarity, spread).
  flip = np.where(rng.random(n) < 0.5, 0.0, np.pi)
  psi = flip + (1 - p["golgi_polarity"]) * rng.uniform(-np.pi, np.pi, n)
  dist = p["golgi_offset"] * _ellipse_radius(psi, cells["a"], cells["b"])
  idx = np.repeat(np.arange(n), 14)
  tang = rng.normal(0, p["golgi_spread"], idx.size)
  rad = dist[idx] + rng.normal(0, 0.4 * p["golgi_spread"], idx.size)
  cos_p, sin_p = np.cos(psi[idx]), np.sin(psi[idx])
  golgi_pts = _to_field({k: val[idx] for k, val in cells.items()},
                        rad * cos_p - tang * sin_p, rad * sin_p + tang * cos_p)
  points = np.stack([_splat(*fibre_pts, size), _splat(*mito_pts, size),
                     _splat(*golgi_pts, size), edges])
  fibres, mito, golgi, edges = _binomial_blur(points)
  membrane = 1.2 * edges * (body > 0.3) + outline

  # w1: nuclei with chromatin texture; mitotic nuclei are small, round and bright.
  grain = _crop(banks["grain"], size, _crop_spec(size, rng))
  w1 = nuc * cells["dna"][lab] * np.maximum(1.0 + p["chromatin_texture"] * grain, 0.05)

  # w2: ER as the zero-crossing network of band-pass noise, dense around the nucleus.
  mesh = _er_mesh(size, p["er_scale"], rng)
  ridge = np.exp(-(mesh / (0.3 * mesh.std() + 1e-6)) ** 2)
  er_density = cyto * (0.2 + np.exp(-dist_nuc / p["er_perinuclear"]))
  w2 = er_density * ((1 - p["er_network"]) * 0.5 + p["er_network"] * ridge) + 0.5 * envelope * body

  # w3: stress fibres + cortical actin + a little cytoplasmic actin.
  w3 = 0.12 * cyto + p["actin_cortical"] * 0.5 * membrane + 1.2 * fibres * body

  # w4: granular cytoplasmic RNA, nucleoplasm and nucleoli (count and size are phenotypes).
  counts = rng.poisson(p["nucleoli_count"], n) * grow
  idx = np.repeat(np.arange(n), counts)
  rho, phi = 0.55 * np.sqrt(rng.random(idx.size)), rng.uniform(0, 2 * np.pi, idx.size)
  sub = {k: val[idx] for k, val in cells.items()}
  ny, nx = _to_field(sub, rho * sub["a"] * np.cos(phi), rho * sub["b"] * np.sin(phi))
  sig = p["nucleoli_size"]
  nucleoli = _blur(_splat(ny, nx, size), sig) * (6.0 * sig)
  rna_grain = np.maximum(1.0 + 0.35 * _crop(banks["grain"], size, _crop_spec(size, rng)), 0)
  w4 = (0.3 * cyto * (0.4 + np.exp(-dist_nuc / 25.0)) * rna_grain
        + 0.3 * p["rna_nuclear"] * nuc + nucleoli * nuc)

  # w5: mitochondria, seen preferentially on ER tubules when mito_er_coloc is high.
  near_er = np.exp(-(mesh / (0.6 * mesh.std() + 1e-6)) ** 2)
  w5 = mito * cyto * ((1 - p["mito_er_coloc"]) + p["mito_er_coloc"] * 2.0 * near_er)

  # w6: Golgi + plasma membrane (WGA).
  w6 = golgi + p["membrane_wga"] * 0.15 * membrane + 0.04 * body

  img = np.stack([w1, w2, w3, w4, w5, w6])
  means = img.reshape(6, -1).mean(axis=1)
  return img * (MEAN_COUNTS / np.maximum(means, 1e-6))[:, None, None]


def apply_effects(img, effects, rng):
  """Microscope and batch effects on clean counts, then 16-bit quantisation.

  ``effects``: ``gain`` (6,), ``offset`` (6,) background counts, ``vignette`` (falloff at the
  corners), ``centre`` (2,) of the illumination in field fractions, ``blur`` (defocus sigma, px),
  ``shot`` (photon-noise scale) and ``read`` (read-noise counts).
  """
  size = img.shape[-1]
  if effects["blur"] > 0.25:
    img = _blur(img, (0, effects["blur"], effects["blur"]))
  y, x = _grid(size)
  cy, cx = np.asarray(effects["centre"], np.float32) * size
  r2 = ((y - cy) ** 2 + (x - cx) ** 2) / (0.5 * size) ** 2
  illum = 1.0 - effects["vignette"] * np.minimum(r2, 2.0) / 2.0
  signal = img * illum  # a new array: the in-place steps below leave `img` alone
  signal *= np.asarray(effects["gain"], np.float32)[:, None, None]
  signal += np.asarray(effects["offset"], np.float32)[:, None, None]
  sd = signal * np.float32(effects["shot"])
  sd += np.float32(effects["read"] ** 2)
  np.sqrt(sd, out=sd)
  bank = _banks(size)["noise"]
  for c in range(len(img)):
    sd[c] *= _crop(bank, size, _crop_spec(size, rng))
  signal += sd
  np.rint(signal, out=signal)
  np.clip(signal, 0, 65535, out=signal)
  return signal.astype(np.uint16)


def render_site(p, effects, size, rng):
  """One site: (6, size, size) uint16."""
  return apply_effects(render_clean(p, size, rng), effects, rng)


def _chunk(kind, data):
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png16(plane):
  """A 2-D uint16 array as 16-bit grayscale PNG bytes (deterministic).

  Rows use PNG's Sub filter and zlib's Huffman-only strategy: on noisy microscopy this is within
  a few per cent of the default compression at about a quarter of Pillow's encoding time.
  """
  plane = np.asarray(plane)
  if plane.ndim != 2 or plane.dtype != np.uint16:
    raise ValueError(f"expected a 2-D uint16 plane, got {plane.shape} {plane.dtype}")
  h, w = plane.shape
  raw = plane.astype(">u2").view(np.uint8).reshape(h, 2 * w)
  rows = np.empty((h, 2 * w + 1), np.uint8)
  rows[:, 0] = 1  # Sub: each byte minus the same byte of the previous pixel (2 bytes back)
  rows[:, 1:3] = raw[:, :2]
  np.subtract(raw[:, 2:], raw[:, :-2], out=rows[:, 3:])
  comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
  idat = comp.compress(rows.tobytes()) + comp.flush()
  header = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
          + _chunk(b"IEND", b""))
