"""Genes, modules and latent phenotypes of the synthetic screen, and its ground truth.

Biology model (docs/science.md §3.5, §4.1; docs/data_layouts.md §6): signal planted on the real
gene-pair graph and real chromosome arms, so recall and arm correction have something to find:

* Genes are real symbols from the union of the five benchmark sources, with a real hg38 arm.
* Modules (complexes, pathways) are dense neighbourhoods in HuMAP, Reactome or StringDB only;
  CORUM and SIGNOR never plant anything and stay a fair test. They are used only to prefer seeds
  that are CORUM or SIGNOR genes, so that recall on them is measurable.
* An expressed module gene's latent phenotype is the sum of its modules' vectors plus a private
  part; expressed genes outside modules get a private phenotype of random strength.
* About a quarter of the genes are unexpressed (zFPKM < -3) and have no gene phenotype. Every
  gene, expressed or not, carries its chromosome arm's weaker "proximity" vector (the CRISPR-cut
  proximity bias). With a few hundred genes spread over 45 arms no arm would reach the > 20
  unexpressed genes that arm correction needs, so most unexpressed genes are deliberately
  concentrated on a few "focus" arms (about 22 each).
* zFPKM: the real U2OS median where known (the not-detected sentinel -1e6 is written as -10);
  genes declared unexpressed are drawn from genes really unexpressed in U2OS when possible.
* A well's latent = its gene's latent + guide noise (shared by the guide's wells) + well noise;
  controls have well noise only. A fixed random mixing maps a latent to the renderer's
  morphology parameters, so each latent dimension moves many features (the morphology style,
  styles.py, chooses the parameters and may thin the mixing; the latents do not depend on it).
"""
import dataclasses

import numpy as np

from data_prep import render
from mae_jax.data import resources

PLANT_SOURCES = ("HuMAP", "Reactome", "StringDB")
SOURCE_SHARE = {"HuMAP": 0.4, "StringDB": 0.35, "Reactome": 0.25}
UNEXPRESSED_ZFPKM = -3.0
NOT_DETECTED_ZFPKM = -10.0
PER_FOCUS_ARM = 22  # > 20 unexpressed genes per arm, the arm-correction threshold
MIN_COVERAGE = 30  # genes of each benchmark source in its in-screen pairs (EFAAR scores >= 20)
LATENT_DIM = 16

# Norms of the latent parts (each is an isotropic Gaussian direction times this norm).
MODULE_NORM = (0.9, 1.3)
PRIVATE_NORM = 0.35
SINGLETON_NORM = (0.0, 1.1)
ARM_NORM = 0.45
GUIDE_NORM = 0.15
WELL_NORM = 0.3


@dataclasses.dataclass
class Module:
  id: str
  source: str
  genes: list


@dataclasses.dataclass
class GeneSet:
  genes: list              # sorted symbols
  arm: dict                # gene -> arm
  expressed: dict          # gene -> bool
  zfpkm: dict              # gene -> float
  modules: list            # [Module]
  focus_arms: list


def _load_reference():
  rel = {s: resources.load_relationships(s) for s in resources.SOURCES}
  return rel, resources.gene_arms(), resources.u2os_expression()


def _adjacency(pairs, allowed):
  adj = {}
  for a, b in pairs:
    if a in allowed and b in allowed:
      adj.setdefault(a, set()).add(b)
      adj.setdefault(b, set()).add(a)
  return adj


def _grow_module(seed, adj, size, rng, bonus=None, min_link=0.6):
  """Greedy dense neighbourhood in ``adj``: adds the neighbour linked to the most members, if
  linked to >= min_link of them. ``bonus`` (another source's adjacency) only breaks ties."""
  members = [seed]
  links = {g: 1 for g in adj[seed]}
  extra = {g: 1 for g in (bonus or {}).get(seed, ())}
  while len(members) < size and links:
    eligible = [g for g, k in links.items() if k >= min_link * len(members)]
    if not eligible:
      break
    score = {g: links[g] + 0.5 * extra.get(g, 0) for g in eligible}
    best = max(score.values())
    pick = sorted(g for g in eligible if score[g] == best)
    g = pick[rng.integers(len(pick))]
    members.append(g)
    del links[g]
    for h in adj[g]:
      if h not in members:
        links[h] = links.get(h, 0) + 1
    for h in (bonus or {}).get(g, ()):
      extra[h] = extra.get(h, 0) + 1
  return members


def _coverage(genes, adj_all):
  """Per source: genes of the set with a partner in the set (EFAAR's entity count)."""
  return {x: sum(1 for g in genes if adj.get(g, set()) & genes) for x, adj in adj_all.items()}


def _pick_modules(n_module, rel, universe, can_express, rng):
  """Dense neighbourhoods of the planting sources until n_module genes are in modules.

  Sources take turns by SOURCE_SHARE, seeds are preferably CORUM or SIGNOR genes. Once most
  module genes are chosen, a benchmark source with fewer than MIN_COVERAGE of its genes among its
  in-screen pairs gets modules from the planting source that overlaps it most, seeded at its
  genes, with its links breaking ties, so that every source can be scored.
  """
  corum = {g for p in rel["CORUM"] for g in p}
  signor = {g for p in rel["SIGNOR"] for g in p}
  adj = {s: _adjacency(rel[s], can_express) for s in PLANT_SOURCES}
  adj_all = {x: _adjacency(rel[x], set(universe)) for x in rel}
  pair_sets = {x: set(rel[x]) for x in rel}
  closest = {x: max(PLANT_SOURCES, key=lambda s: (len(pair_sets[s] & pair_sets[x]), s))
             for x in rel}
  seeds, focus_seeds = {}, {}
  for s in PLANT_SOURCES:
    cand = sorted(g for g, nb in adj[s].items() if len(nb) >= 3)
    w = np.array([1.0 + 2.0 * (g in corum) + 2.0 * (g in signor) for g in cand])
    seeds[s] = list(rng.choice(cand, size=len(cand), replace=False, p=w / w.sum()))
  for x in rel:
    cand = sorted(g for g in adj[closest[x]] if g in adj_all[x] and len(adj[closest[x]][g]) >= 3)
    focus_seeds[x] = list(rng.permutation(cand)[:60])  # bounded tries per source
  modules, in_modules, n_memberships = [], set(), {}
  planted = {s: 0 for s in PLANT_SOURCES}
  while len(in_modules) < n_module:
    focus = None
    if len(in_modules) >= 0.6 * n_module:
      cover = _coverage(in_modules, adj_all)
      short = sorted((c, x) for x, c in cover.items() if c < MIN_COVERAGE and focus_seeds[x])
      focus = short[0][1] if short else None
    if focus:
      s, seed, bonus = closest[focus], focus_seeds[focus].pop(), adj_all[focus]
    else:
      live = [s for s in PLANT_SOURCES if seeds[s]]
      if not live:
        break
      s = min(live, key=lambda s: planted[s] / SOURCE_SHARE[s])
      seed, bonus = seeds[s].pop(), None
    if seed in in_modules:
      continue
    size = int(min(rng.integers(4, 11), n_module - len(in_modules) + 1))
    members = _grow_module(seed, adj[s], max(size, 3), rng, bonus)
    shared = [g for g in members if g in in_modules]
    # One shared gene makes genes that belong to two modules; more would merge modules.
    if len(members) < 3 or len(shared) > 1 or any(n_memberships.get(g, 0) >= 2 for g in shared):
      continue
    if focus and (_coverage(in_modules | set(members), {focus: adj_all[focus]})[focus]
                  <= cover[focus]):
      continue
    modules.append(Module(f"M{len(modules) + 1:03d}", s, sorted(members)))
    for g in members:
      n_memberships[g] = n_memberships.get(g, 0) + 1
    planted[s] += len(members) - len(shared)
    in_modules.update(members)
  return modules, in_modules


def select_genes(n_genes, rng, unexpressed_fraction=0.25, module_fraction=0.8, reference=None):
  """Chooses the screen's genes, their modules, arms and expression (see module docstring)."""
  rel, arms, expr = reference or _load_reference()
  universe = sorted({g for pairs in rel.values() for p in pairs for g in p if g in arms})
  if n_genes < 8 or n_genes > len(universe) // 4:
    raise ValueError(f"--genes={n_genes}: expected 8 to {len(universe) // 4}")
  can_express = {g for g in universe if expr.get(g, 0.0) >= UNEXPRESSED_ZFPKM}
  n_unexp = int(round(unexpressed_fraction * n_genes))
  n_module = int(round(module_fraction * (n_genes - n_unexp)))
  modules, in_modules = _pick_modules(n_module, rel, universe, can_express, rng)

  # Unexpressed genes: most on a few focus arms (so those arms have > 20), the rest scattered.
  chosen = set(in_modules)
  really_off = [g for g in universe if g in expr and expr[g] < UNEXPRESSED_ZFPKM]
  by_arm = {}
  for g in really_off:
    by_arm.setdefault(arms[g], []).append(g)
  n_focus = int(0.9 * n_unexp) // PER_FOCUS_ARM
  rich = sorted(by_arm, key=lambda a: (-len(by_arm[a]), a))[:max(10, n_focus)]
  focus = sorted(rng.choice(rich, size=n_focus, replace=False)) if n_focus else []
  unexpressed = []
  for a in focus:
    pool = sorted(g for g in by_arm[a] if g not in chosen)
    unexpressed += list(rng.choice(pool, size=PER_FOCUS_ARM, replace=False))
  rest = sorted(g for g in really_off if g not in chosen and arms[g] not in focus)
  unexpressed += list(rng.choice(rest, size=n_unexp - len(unexpressed), replace=False))
  chosen.update(unexpressed)

  # Expressed genes outside modules fill up the screen.
  free = sorted(g for g in can_express if g not in chosen)
  singletons = list(rng.choice(free, size=max(0, n_genes - len(chosen)), replace=False))
  chosen.update(singletons)

  genes = sorted(chosen)
  off = set(unexpressed)
  zfpkm = {}
  for g in genes:
    if g in expr:
      zfpkm[g] = max(expr[g], NOT_DETECTED_ZFPKM)
    elif g in off:  # not in the U2OS table: draw a plausible value on the declared side
      zfpkm[g] = float(rng.uniform(-8, -3.5))
    else:
      zfpkm[g] = max(float(rng.normal(0.5, 0.8)), -2.5)
  return GeneSet(genes=genes, arm={g: arms[g] for g in genes},
                 expressed={g: g not in off for g in genes}, zfpkm=zfpkm,
                 modules=modules, focus_arms=[str(a) for a in focus])


def _directions(rng, n, dim):
  v = rng.standard_normal((n, dim))
  return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclasses.dataclass
class Phenotypes:
  genes: list
  latent: np.ndarray          # (G, D) gene phenotype + arm component
  arm_component: np.ndarray   # (G, D)
  arms: list                  # arm names, sorted
  arm_vectors: np.ndarray     # (A, D)
  module_vectors: np.ndarray  # (M, D)
  membership: np.ndarray      # (G, M) bool
  mixing: np.ndarray          # (F, D) latent -> logits of render.PARAMS


def gene_phenotypes(gs, rng, dim=LATENT_DIM, n_params=None):
  """Latent vector per gene: modules + private part (expressed genes only) + arm component.

  ``n_params``: rows of the mixing (default: render.PARAMS); drawn last, so the latents are
  the same whatever it is.
  """
  genes, m = gs.genes, len(gs.modules)
  index = {g: i for i, g in enumerate(genes)}
  module_vectors = _directions(rng, m, dim) * rng.uniform(*MODULE_NORM, (m, 1))
  membership = np.zeros((len(genes), m), bool)
  for j, mod in enumerate(gs.modules):
    membership[[index[g] for g in mod.genes], j] = True
  private = _directions(rng, len(genes), dim)
  strength = np.where(membership.any(1), PRIVATE_NORM, rng.uniform(*SINGLETON_NORM, len(genes)))
  weights = membership * rng.uniform(0.75, 1.0, membership.shape)
  phenotype = weights @ module_vectors + private * strength[:, None]
  phenotype[[not gs.expressed[g] for g in genes]] = 0.0
  arms = sorted(set(gs.arm.values()))
  arm_vectors = _directions(rng, len(arms), dim) * ARM_NORM
  arm_component = arm_vectors[[arms.index(gs.arm[g]) for g in genes]]
  mixing = rng.standard_normal((n_params or len(render.PARAMS), dim))
  return Phenotypes(genes=genes, latent=phenotype + arm_component, arm_component=arm_component,
                    arms=arms, arm_vectors=arm_vectors, module_vectors=module_vectors,
                    membership=membership, mixing=mixing)


def well_latents(ph, well_genes, well_guides, rng):
  """Per-well latent: gene + guide noise + well noise; "EMPTY_control" wells are noise only."""
  dim = ph.latent.shape[1]
  index = {g: i for i, g in enumerate(ph.genes)}
  guide_noise = {}
  out = np.zeros((len(well_genes), dim))
  for w, (g, k) in enumerate(zip(well_genes, well_guides)):
    if g in index:
      key = (g, k)
      if key not in guide_noise:
        guide_noise[key] = rng.standard_normal(dim) * GUIDE_NORM / np.sqrt(dim)
      out[w] = ph.latent[index[g]] + guide_noise[key]
  return out + rng.standard_normal(out.shape) * WELL_NORM / np.sqrt(dim)


def latent_to_params(latent, mixing, params=None):
  """Latents (N, D) -> list of render-parameter dicts, each parameter a sigmoid around its base.

  ``params``: name -> (low, high, base) (default: render.PARAMS), one per row of ``mixing``.
  """
  params = params or render.PARAMS
  names = list(params)
  lo, hi, base = (np.array([params[k][i] for k in names]) for i in range(3))
  b = (base - lo) / (hi - lo)
  logits = np.log(b / (1 - b)) + np.atleast_2d(latent) @ mixing.T
  values = lo + (hi - lo) / (1 + np.exp(-logits))
  return [{k: float(v) for k, v in zip(names, row)} for row in values]


def planted_pairs(gs):
  """Gene pairs sharing a module: (entity1, entity2, sources, module ids), sorted."""
  pairs = {}
  for mod in gs.modules:
    for i, a in enumerate(mod.genes):
      for b in mod.genes[i + 1:]:
        src, ids = pairs.setdefault((a, b), (set(), []))
        src.add(mod.source)
        ids.append(mod.id)
  return [(a, b, ";".join(sorted(s)), ";".join(ids)) for (a, b), (s, ids) in sorted(pairs.items())]


def withheld_modules(gs, fraction, seed):
  """Ids of the planted modules kept out of the screen's annotation files (docs/science.md §4.5):
  their phenotype is planted but no source names their pairs, so a map that finds them ranks
  them among its most similar unannotated pairs. Drawn from their own stream, so the genes,
  latents and pixels do not depend on it."""
  n = int(round(fraction * len(gs.modules)))
  rng = np.random.default_rng([seed, 4, 4])
  return sorted(gs.modules[k].id for k in rng.choice(len(gs.modules), n, replace=False))


def screen_annotations(genes, withheld_pairs, reference=None):
  """Per source: its pairs with both genes in the screen, less the withheld pairs."""
  rel = (reference or _load_reference())[0]
  present, drop = set(genes), set(withheld_pairs)
  return {s: [p for p in pairs if p[0] in present and p[1] in present and p not in drop]
          for s, pairs in rel.items()}


def benchmark_coverage(genes, reference=None):
  """Per source: pairs with both genes in the screen and the distinct genes in them."""
  rel = (reference or _load_reference())[0]
  present = set(genes)
  out = {}
  for s, pairs in rel.items():
    inside = [p for p in pairs if p[0] in present and p[1] in present]
    out[s] = {"pairs": len(inside), "genes": len({g for p in inside for g in p})}
  return out
