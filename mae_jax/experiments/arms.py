"""The arms of the study, its suites, its data subsets and its compute plans (docs/science.md §8).

    suite = SUITES["quick"]
    cfg = arm_config(ARMS_BY_NAME["vit_p16_m75"], seed=0)       # ml_collections.ConfigDict
    cfg = width_config(128, seed=0)                              # a scaling-grid ViT
    plan = flop_equal_plan(reference, cfg, step_time, wall_cap)  # steps at the reference's FLOPs
    plate_subset(manifest, 0.25, out_dir)                        # the first quarter of the plates

Every arm trains on the same shards with the demo's recipe (configs/demo.py) and only the named
difference: the patch (experiment 2), the mask ratio (experiment 3), the network (MU-Net,
configs/munet_demo.py) or the objective (the WSL classifier, configs/wsl_demo.py). The budget is
the reference arm's (ViT MAE, patch 8, mask 0.75): its steps come from a timed probe and the
wall-clock budget, and every other arm gets the same training FLOPs (mae_jax/models/flops.py),
unless that would take more than `wall_cap` times the reference's wall time, in which case it
gets the reference's wall time instead (the report says which).
"""
import collections
import dataclasses
import os
import re

from configs import demo, munet_demo, wsl_demo
from mae_jax.data import records
from mae_jax.models import flops


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  label: str
  make: object  # () -> the arm's ConfigDict
  overrides: tuple  # (dotted key, value) pairs on top of make()
  network: str  # arms with the same encoder at initialisation share one random-init score
  claim: str  # what the arm tests (Kraus et al. 2023)


ARMS = (
    Arm("vit_p8_m75", "ViT MAE, patch 8, mask 0.75", demo.get_config, (), "vit_p8",
        "experiment 1: the reference MAE (configs/demo.py)"),
    Arm("vit_p16_m75", "ViT MAE, patch 16, mask 0.75", demo.get_config,
        (("model.patch_size", 16),), "vit_p16", "experiment 2: larger patches, same crop"),
    Arm("vit_p8_m25", "ViT MAE, patch 8, mask 0.25", demo.get_config,
        (("model.mask_ratio", 0.25),), "vit_p8", "experiment 3: a lower mask ratio"),
    Arm("munet", "MU-Net MAE", munet_demo.get_config, (), "munet",
        "the convolutional MAE (configs/munet_demo.py)"),
    Arm("wsl", "WSL DenseNet (labels: gene)", wsl_demo.get_config, (), "wsl",
        "the weakly supervised classifier (configs/wsl_demo.py)"),
)
ARMS_BY_NAME = {a.name: a for a in ARMS}
REFERENCE = "vit_p8_m75"
NETWORK_LABELS = {"vit_p8": "ViT, patch 8", "vit_p16": "ViT, patch 16", "munet": "MU-Net",
                  "wsl": "WSL DenseNet"}


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  budget_minutes: float  # training wall time of the reference arm (one seed)
  seeds: int  # seeds of every main arm (the grid and the random inits use seed 0)
  widths: tuple  # ViT widths of the scaling grid (head dimension 32, MLP 4 x width)
  fractions: tuple  # shares of the plates the grid trains on
  eval_points: int  # checkpoints scored per grid run: the final one, half way, a quarter, ...
  tile_stride: int  # embed every k-th tile row and column of a site (1: every tile)
  wall_cap: float = 2.0  # FLOP-equal steps may take at most this x the reference's wall time
  probe_steps: int = 40  # the reference probe (configs/demo.py: steady after ~20 steps)
  arm_probe_steps: int = 12  # the other arms' probes (only to decide FLOPs vs wall time)
  loss_crops: int = 256  # held-out crops of the MAEs' loss (mae_jax/demo/tasks.py)
  cp_field: int = 128  # CellProfiler features of the centre field² pixels of each site
  screen: tuple = ()  # data_prep.synthetic flags of the suite's screens, (name, value) pairs


SUITES = {
    # Two screens of 256² sites, 45 s of reference training, widths up to the reference's, a
    # quarter of each site's tiles: sized by measured stage times to finish in <= 60 min on 2 CPU
    # cores (docs/science.md §8).
    "quick": Suite("quick", 0.75, 1, (16, 32, 64), (0.25, 1.0), 3, 2, wall_cap=1.5,
                   probe_steps=30, arm_probe_steps=8, cp_field=96,
                   screen=(("image_size", 256),)),
    # 10x the reference budget, 3 seeds, widths up to 2x the reference's, every tile.
    "full": Suite("full", 20.0, 3, (32, 64, 128), (0.25, 1.0), 4, 1, cp_field=512),
}
# --tiny (tests): every network at toy size on 32² crops, so the whole suite runs in seconds.
TINY = {
    "mae": (("model.image_size", 32), ("model.width", 16), ("model.depth", 1),
            ("model.num_heads", 1), ("model.mlp_dim", 32), ("model.decoder_width", 16),
            ("model.decoder_heads", 1)),
    "munet": (("model.image_size", 32), ("model.base_width", 4), ("model.levels", 2),
              ("model.norm_groups", 2)),
    "wsl": (("model.image_size", 32), ("model.growth_rate", 4), ("model.block_config", (1, 1)),
            ("model.num_init_features", 8)),
    "all": (("batch_size", 8), ("log_every", 1)),
}
TINY_SUITE = Suite("tiny", 0.05, 1, (8, 16), (0.5, 1.0), 2, 2, probe_steps=6,
                   arm_probe_steps=4, loss_crops=64, cp_field=64)


def set_key(c, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


def _finish(c, overrides, seed, tiny):
  c.unlock()
  for k, v in overrides:
    set_key(c, k, v)
  if tiny:
    for k, v in TINY[c.model.get("kind", "mae")] + TINY["all"]:
      set_key(c, k, v)
  c.seed = int(seed)
  return c


def arm_config(arm, seed=0, tiny=False):
  """The arm's recipe; `total_steps` and the checkpoints are set by `train_config`."""
  return _finish(arm.make(), arm.overrides, seed, tiny)


def width_overrides(width):
  """A demo ViT of another width: head dimension 32, MLP 4 x width, decoder as wide."""
  heads = max(1, width // 32)
  return (("model.width", width), ("model.num_heads", heads), ("model.mlp_dim", 4 * width),
          ("model.decoder_width", width), ("model.decoder_heads", heads))


def width_config(width, seed=0, tiny=False):
  c = _finish(demo.get_config(), (), seed, tiny)
  for k, v in width_overrides(width):
    set_key(c, k, v)
  return c


def reference_width(tiny=False):
  return int(arm_config(ARMS_BY_NAME[REFERENCE], tiny=tiny).model.width)


def train_config(base, manifest, total_steps, eval_points):
  """`base` with the run's length and data: checkpoints at 1/2^k of the run (as the demo)."""
  c = base.copy_and_resolve_references()
  c.unlock()
  every = max(1, total_steps // 2 ** (eval_points - 1))
  c.total_steps = max(int(total_steps), every)
  c.checkpoint_every = every
  c.keep_checkpoints = max(c.keep_checkpoints, c.total_steps // every + 1)
  c.log_every = max(1, min(c.log_every, c.total_steps // 20 or 1))
  c.data.manifest = manifest
  from mae_jax.train import batches  # pylint: disable=g-import-not-at-top
  batches.match_manifest(c)  # dtype and channels of the shards (an 8-bit screen, say)
  c.lock()
  return c


def train_flops_per_image(cfg) -> float:
  return float(flops.flops_per_image(cfg.model)["train"])


def reference_plan(cfg, steps, step_time=None, eval_points=1, source="probe"):
  """The budget every arm gets: the reference's steps (a multiple of 2^(eval_points-1), so its
  checkpoints fall on the grid's 1/2^k points) and FLOPs."""
  unit = 2 ** (eval_points - 1)
  steps = max(unit, int(steps) // unit * unit)
  plan = {"total_steps": steps, "flops": steps * cfg.batch_size * train_flops_per_image(cfg),
          "rule": "reference", "source": source, "step_time_s": step_time}
  plan["train_seconds"] = None if step_time is None else round(steps * step_time, 1)
  return plan


def flop_equal_plan(reference, cfg, step_time=None, wall_cap=2.0, minimum=1):
  """Steps for `cfg` at the reference's training FLOPs, or at its wall time when FLOP-equal
  steps would take more than `wall_cap` times as long (measured `step_time` of this arm)."""
  per_step = cfg.batch_size * train_flops_per_image(cfg)
  steps = max(minimum, int(round(reference["flops"] / per_step)))
  plan = {"rule": "equal_flops", "step_time_s": step_time, "source": reference["source"]}
  ref_wall = reference.get("train_seconds")
  if step_time and ref_wall and steps * step_time > wall_cap * ref_wall:
    plan.update(rule="equal_wall_time", flop_equal_steps=steps,
                why=f"{steps} FLOP-equal steps would take {steps * step_time:.0f} s, over "
                    f"{wall_cap:g} x the reference's {ref_wall:.0f} s")
    steps = max(minimum, int(ref_wall / step_time))
  plan.update(total_steps=steps, flops=steps * per_step,
              train_seconds=None if step_time is None else round(steps * step_time, 1))
  return plan


# -- data subsets -------------------------------------------------------------------------------
_SHARD = re.compile(r"^(?P<experiment>.+)_P(?P<plate>[^_]+)-\d+\.tfrecord$")


def _plate_order(key):
  experiment, plate = key
  return (int(plate) if plate.isdigit() else 10 ** 9, plate, experiment)


def plate_subset(manifest_path, fraction, out_dir) -> dict:
  """Writes OUT_DIR/manifest.json with the shards of a `fraction` of the (experiment, plate)
  groups, plate by plate across the experiments (plate 1 of every experiment first), so a subset
  keeps every experiment while it can; returns what it chose. Shard names are those of
  data_prep.convert (`{experiment}_P{plate}-k.tfrecord`); other names count as one group each."""
  path = records.manifest_path(manifest_path)
  m = records.read_manifest(path)
  root = os.path.dirname(os.path.abspath(path))
  groups = collections.OrderedDict()
  for s in m["shards"]:
    match = _SHARD.match(os.path.basename(s["path"]))
    key = (match["experiment"], match["plate"]) if match else (s["path"], "")
    groups.setdefault(key, []).append(s)
  keys = sorted(groups, key=_plate_order)
  chosen = keys[:max(1, int(round(fraction * len(keys))))]
  shards = [{"path": os.path.relpath(os.path.join(root, s["path"]), out_dir),
             "records": s["records"]} for k in chosen for s in groups[k]]
  subset = {"fraction": fraction, "groups": len(chosen), "of_groups": len(keys),
            "plates": [f"{e} P{p}" for e, p in chosen], "parent": os.path.abspath(path),
            "records": sum(s["records"] for s in shards), "of_records": m["num_records"]}
  sub = {k: v for k, v in m.items() if k not in ("format", "counts", "num_wells")}
  sub.update(shards=shards, num_records=subset["records"], subset=subset)
  os.makedirs(out_dir, exist_ok=True)
  records.write_manifest(out_dir, sub)
  return subset
