"""CellProfiler features of a site through `cp_measure` (pip install -e .[cellprofiler]).

    feats = site_features(image)           # (F,) float32, names: feature_names(channels)

The hand-crafted profile image-based profiling starts from (Caicedo et al. 2017; the JUMP
pipelines), measured by cp_measure's port of CellProfiler's modules on a simple segmentation:
  * nuclei: Otsu's threshold on the log of channel 1 (Hoechst), small objects removed,
    touching nuclei split by a watershed on the distance transform;
  * cells: a watershed from the nuclei over the mean of the other channels, limited to the
    pixels above that mean's Otsu threshold (CellProfiler's IdentifySecondaryObjects,
    "Propagation" simplified to a watershed);
  * per object: size/shape and Zernike moments of nuclei and cells, and per channel the cells'
    intensity, Haralick texture (scale 3, 16 grey levels) and granularity spectrum (8 steps
    on a quarter-resolution image);
  * per site: the mean of each measurement over the site's objects, plus the object counts.
The centre `field`² pixels of each site are measured, the same field for every site (about
0.11 / 0.19 / 0.55 CPU s per 64² / 96² / 256² six-channel field, docs/science.md §8).
No jax here: this runs in the pixel-statistics worker processes (mae_jax/demo/baselines.py).
"""
import functools

import numpy as np
from scipy import ndimage as ndi

MIN_NUCLEUS_PX = 12
SHAPE = ("sizeshape", "zernike")  # of nuclei and cells
PER_CHANNEL = ("intensity", "texture", "granularity")  # of cells, in every channel
# CellProfiler 2's 8 grey levels cost ~20x less than cp_measure's 256 and keep the contrast
# classes; 16 is the compromise (Haralick texture is per object, per direction).
TEXTURE_GRAY_LEVELS = 16
GRANULARITY = dict(subsample_size=0.25, image_sample_size=0.25, granular_spectrum_length=8)


def available() -> str | None:
  """None when cp_measure imports, else why not (one line)."""
  try:
    _measurements()
  except ImportError as e:
    return f"cp_measure is not installed ({e}): pip install -e .[cellprofiler]"
  return None


@functools.lru_cache(maxsize=None)
def _measurements():
  from cp_measure import bulk  # pylint: disable=g-import-not-at-top
  core = bulk.get_core_measurements()
  return {name: core[name] for name in SHAPE + PER_CHANNEL}


def _measure(name, masks, pixels):
  fn = _measurements()[name]
  if name == "granularity":
    return fn(masks, pixels, **GRANULARITY)
  if name == "texture":
    return fn(masks, pixels, scale=3, gray_levels=TEXTURE_GRAY_LEVELS)
  return fn(masks, pixels)


def segment(image: np.ndarray):
  """(nuclei, cells) label images of one HWC site."""
  from skimage import filters, morphology, segmentation  # pylint: disable=g-import-not-at-top
  x = np.asarray(image, np.float32)
  nuc = np.log1p(x[..., 0])
  blobs, _ = ndi.label(nuc > filters.threshold_otsu(nuc))
  mask = (np.bincount(blobs.ravel()) >= MIN_NUCLEUS_PX)[blobs] & (blobs > 0)
  distance = ndi.distance_transform_edt(mask)
  peaks, _ = ndi.label(morphology.h_maxima(distance, 2.0) & mask)
  nuclei = segmentation.watershed(-distance, peaks, mask=mask)
  nuclei = segmentation.relabel_sequential(nuclei)[0]
  rest = np.log1p(x[..., 1:].mean(-1)) if x.shape[-1] > 1 else nuc
  body = (rest > filters.threshold_otsu(rest)) | (nuclei > 0)
  cells = segmentation.watershed(-rest, nuclei, mask=body)
  return nuclei.astype(np.int32), cells.astype(np.int32)


def _centre(image, field):
  h, w = image.shape[:2]
  f = min(field, h, w)
  y, x = (h - f) // 2, (w - f) // 2
  return image[y:y + f, x:x + f]


def _groups(channels):
  """[(prefix, measurement, objects, channel or None)] in the order of the feature vector."""
  out = [(f"{obj}_{m}", m, obj, None) for obj in ("nuclei", "cells") for m in SHAPE]
  out += [(f"cells_{m}_ch{c + 1}", m, "cells", c) for c in range(channels) for m in PER_CHANNEL]
  return out


@functools.lru_cache(maxsize=None)
def _keys(channels: int) -> tuple:
  """The measurement names of each group, from a toy site with two square objects."""
  masks = np.zeros((48, 48), np.int32)
  masks[4:20, 4:20], masks[26:44, 24:44] = 1, 2
  pixels = np.random.default_rng(0).random((48, 48)).astype(np.float32)
  return tuple(tuple(sorted(_measure(m, masks, pixels))) for _, m, _, _ in _groups(channels))


def feature_names(channels: int = 6) -> list:
  names = ["nuclei_count", "cells_count"]
  for (prefix, *_), keys in zip(_groups(channels), _keys(channels)):
    names += [f"{prefix}_{k}" for k in keys]
  return names


def _mean(values) -> float:
  v = np.asarray(values, np.float64).ravel()
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else 0.0


def site_features(image: np.ndarray, field: int = 256) -> np.ndarray:
  """(F,) float32 CellProfiler features of the centre `field`² pixels of one HWC site."""
  x = np.asarray(_centre(image, field), np.float32)
  channels = x.shape[-1]
  nuclei, cells = segment(x)
  objects = {"nuclei": nuclei, "cells": cells}
  out = [float(nuclei.max()), float(cells.max())]
  scale = max(float(x.max()), 1.0)  # texture quantises [0, 1] into grey levels
  for (_, m, obj, c), keys in zip(_groups(channels), _keys(channels)):
    masks = objects[obj]
    if masks.max() == 0:
      out += [0.0] * len(keys)
      continue
    pixels = x[..., c] / scale if c is not None else x[..., 0] / scale
    values = _measure(m, masks, pixels)
    out += [_mean(values[k]) for k in keys]
  feats = np.asarray(out, np.float32)
  return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
