r"""Ahead-of-time compile of the train step for a TPU topology, without the hardware.

    python -m mae_jax.compile --config=configs/vitl8.py --topology=v5p-256 \
        --config.batch_size=16384 --config.mesh.data=1 --config.mesh.fsdp=-1 \
        --config.precision=bfloat16 --config.remat=True
    python -m mae_jax.compile --write_readme=README.md   # regenerate the "Scaling up" table

MaxText's train_compile.py recipe: libtpu (`pip install "mae_jax[aot]"`) describes the chips, the
real train step is lowered over the sharded ABSTRACT state for the real global batch and compiled;
XLA's memory and cost analyses say whether it fits in HBM and what a step costs. Without libtpu:
as many fake CPU devices as chips, same sharding, but XLA:CPU's figures (`"backend":
"cpu-fake-devices"`, `"fits": null`: bf16 + remat ViT-L/8 at 256 per device takes 726 GiB there,
65 GiB on v5p). Topology names follow Cloud TPU: v4-/v5p-N counts TensorCores (v5p-128 is 64
chips, 4x4x4), v5e-/v6e-N chips (v5e-256 is 16x16); or a chip grid: v5p:4x4x8.
"""
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from mae_jax.util import cli, files

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Target TPU slice, e.g. v5p-128, v4-64, v5e-256, "
                                "v6e-256 or an explicit chip grid such as v5p:4x4x8.")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "cpu"],
                             "tpu: libtpu's compiler; cpu: fake CPU devices; auto: tpu if libtpu "
                             "is installed.")
_README = flags.DEFINE_string("write_readme", None, "Compile the configs of the scaling table "
                              "(SCALING_TABLE) and rewrite that section of this README, then exit.")
_CACHE = flags.DEFINE_string("cache_dir", None, "With --write_readme: keep each row's JSON output "
                             "here and reuse it while the row's command and backend are unchanged "
                             "(big compiles take many minutes on a small machine).")

GIB = 2 ** 30
EXAMPLES = "v5p-128 (64 chips, 4x4x4), v5p-256, v4-64, v5e-256, v6e-256 or v5p:4x4x8"


# -- topologies (pure Python: parsed before jax picks its devices) --------------------------------
@dataclasses.dataclass(frozen=True)
class Generation:
  prefix: str  # libtpu's topology-name prefix
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  cores_per_chip: int  # what the number in "v5p-128" counts per chip
  hbm_gib: float
  chip_config: str  # libtpu chip_config_name: one device per chip ("megacore") or per core


GENERATIONS = {
    "v4": Generation("v4", 3, 2, 32, "megacore"),
    "v5p": Generation("v5p", 3, 2, 95, "megacore"),
    "v5e": Generation("v5e", 2, 1, 16, "default"),
    "v6e": Generation("v6e", 2, 1, 32, "default"),
}


class TopologyError(cli.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as the user wrote it
  generation: str
  shape: tuple[int, ...]  # chips along each ICI axis

  @property
  def gen(self) -> Generation:
    return GENERATIONS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology_name(self) -> str:
    """What `jax.experimental.topologies.get_topology_desc` expects, e.g. "v5p:4x4x4"."""
    return f"{self.gen.prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def hbm_bytes(self) -> int:
    return int(self.gen.hbm_gib * GIB)

  def libtpu_kwargs(self) -> dict:
    """MaxText's system characteristics: 2x2x1 chips per host, wraparound on full tori."""
    shape3 = self.shape + (1,) * (3 - len(self.shape))
    if self.gen.dims == 3:  # v4/v5p slices built of 4x4x4 cubes are tori
      wrap = (all(s % 4 == 0 for s in shape3),) * 3
    else:  # v5e/v6e: a 16-chip edge closes into a ring
      wrap = tuple(s == 16 for s in shape3[:2]) + (False,)
    return dict(chip_config_name=self.gen.chip_config, wrap=wrap,
                chips_per_host_bounds=tuple(min(s, b) for s, b in zip(shape3, (2, 2, 1))))


def default_shape(chips: int, dims: int) -> tuple[int, ...] | None:
  """Cloud TPU's grid for a power-of-two chip count: double the smallest axis (the last on ties)."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if chips < math.prod(shape) or chips & (chips - 1):
    return (1, 1) if dims == 2 and chips == 1 else None
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str) -> Topology:
  """"v5p-128" / "v4-64" / "v5e-256" / "v6e-16" / "v5p:4x4x8" -> Topology (TopologyError else)."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)[-:](\d+(?:x\d+)*)", name.strip().lower())
  if not match:
    raise TopologyError(f"--topology={name!r}: unknown TPU topology; examples: {EXAMPLES}")
  generation = {"v5litepod": "v5e"}.get(match.group(1), match.group(1))
  gen, size = GENERATIONS[generation], match.group(2)
  if "x" in size:
    shape = tuple(int(s) for s in size.split("x"))
    if len(shape) != gen.dims or min(shape) < 1:
      raise TopologyError(f"--topology={name!r}: {generation} chip grids have {gen.dims} axes, "
                          f"e.g. {'4x4x4' if gen.dims == 3 else '16x16'}")
    return Topology(name, generation, shape)
  count = int(size)
  shape = default_shape(count // gen.cores_per_chip, gen.dims)
  if shape is None or count % gen.cores_per_chip:
    unit = "TensorCores (2 per chip)" if gen.cores_per_chip == 2 else "chips"
    least = 4 * gen.cores_per_chip if gen.dims == 3 else 1
    raise TopologyError(f"--topology={name!r}: the number after {generation}- counts {unit} and "
                        f"must be a power of two >= {least}; or give the chip grid, e.g. "
                        f"{generation}:{'4x4x12' if gen.dims == 3 else '8x16'}")
  return Topology(name, generation, shape)


# -- devices --------------------------------------------------------------------------------------
def libtpu_version() -> str | None:
  """The installed libtpu's version (or TPU_LIBRARY_PATH), None if there is none."""
  if importlib.util.find_spec("libtpu") is not None:
    try:
      return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
      return "unknown version"
  path = os.environ.get("TPU_LIBRARY_PATH")
  return path if path and os.path.isfile(path) else None


def target_devices(topology: Topology, backend: str):
  """(devices to compile for, backend label). Must run before jax initialises a backend."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  fresh = not xla_bridge.backends_are_initialized()
  if backend == "auto":
    backend = "tpu" if libtpu_version() else "cpu"
  if backend == "tpu":
    if not libtpu_version():
      raise cli.UserError("--backend=tpu needs libtpu: pip install 'mae_jax[aot]' (or set "
                          "TPU_LIBRARY_PATH to a libtpu.so)")
    # No TPU is attached: keep jax's own computations on the CPU, and tell libtpu which slice it
    # describes so it does not go looking for TPU VM metadata (and warn about not finding it).
    if fresh:
      jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.generation}-"
                          f"{topology.chips * topology.gen.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile to own the chips; compiling touches none, so two
    # compiles (or a compile beside a TPU job) may share the host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name,
                                          **topology.libtpu_kwargs())
    except Exception as e:  # libtpu rejects grids it cannot build (e.g. v5p:3x3x3)
      raise TopologyError(f"--topology={topology.name!r}: libtpu cannot describe "
                          f"{topology.topology_name}: {cli.one_line(e)}") from e
    return list(desc.devices), "tpu"
  # jax_num_cpu_devices is the post-import form of XLA_FLAGS=--xla_force_host_platform_device_count
  # (it wins over that flag); both only act before the CPU backend starts.
  if fresh:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", topology.chips)
  cpus = jax.devices("cpu")
  if len(cpus) < topology.chips:
    raise cli.UserError(f"{topology.name} needs {topology.chips} fake CPU devices but jax already "
                        f"started with {len(cpus)}; run in a fresh process")
  return cpus[:topology.chips], "cpu-fake-devices"


# -- compile --------------------------------------------------------------------------------------
_HBM_NEEDS = (r"Total hbm usage >= ([\d.]+)([KMGT]?)",  # XLA:TPU "Ran out of memory in memory
               r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm",  # space hbm" (two libtpu wordings)
               r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM")


def _hbm_overflow(message: str):
  """Bytes (at least) the TPU compiler said the program needs when it refused it, else None."""
  for pattern in _HBM_NEEDS:
    match = re.search(pattern, message)
    if match:
      scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": GIB, "T": 2 ** 40}[match.group(2)]
      return int(float(match.group(1)) * scale)
  return None


def topology_mesh(config, devices):
  """The config's ("data", "fsdp", "tensor") mesh laid onto the chips' ICI axes (MaxText's way).

  Checks that the global batch splits over it; mistakes are UserErrors (one line).
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType, Mesh  # pylint: disable=g-import-not-at-top
  from mae_jax.train import ConfigError, sharding, step as step_lib  # pylint: disable=g-import-not-at-top
  try:
    shape = sharding.mesh_shape(config.mesh, len(devices))
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    mesh = Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    step_lib.check_batch(config, mesh)
  except (sharding.MeshError, ConfigError) as e:
    raise cli.UserError(str(e)) from e
  return mesh


def compile_step(config, topology: Topology, mesh, backend: str) -> dict:
  """Lowers and compiles the real train step on `mesh`; memory, FLOPs and timings."""
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.models import flops  # pylint: disable=g-import-not-at-top
  from mae_jax.train import sharding, step as step_lib  # pylint: disable=g-import-not-at-top

  per_device, _ = step_lib.check_batch(config, mesh)
  devices = mesh.devices.flatten()
  m = config.model

  t0 = time.perf_counter()
  graphdef, tx, abstract, _ = step_lib.build_state(config, mesh)
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    try:
      leaf.sharding.shard_shape(leaf.shape)
    except ValueError as e:  # e.g. ViT-G's width 1664 = 13 x 128 over fsdp 256
      raise cli.UserError(f"mesh {dict(mesh.shape)} does not divide {jax.tree_util.keystr(path)} "
                          f"of shape {leaf.shape} (split as {leaf.sharding.spec}); choose mesh "
                          f"sizes that divide it") from e
  lowered = step_lib.lower_train_step(graphdef, tx, config, mesh, abstract)
  lower_s = time.perf_counter() - t0

  analytical = flops.flops_per_image(m)["train"] * config.batch_size
  result = dict(
      config=config.get("name", m.variant), topology=topology.name,
      topology_name=topology.topology_name, chips=topology.chips, backend=backend,
      device_kind=devices[0].device_kind, devices=len(devices), mesh=dict(mesh.shape),
      global_batch=int(config.batch_size), per_device_batch=per_device,
      microbatches=int(config.microbatches), precision=config.precision, remat=bool(config.remat),
      scan_layers=bool(m.get("scan_layers", False)),
      params=sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["model"])),
      state_bytes_per_device=sharding.per_device_bytes(abstract),
      hbm_bytes=topology.hbm_bytes, analytical_step_flops=analytical, lower_s=round(lower_s, 1))

  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA:TPU refuses programs that overflow HBM: that is the answer here
    used = _hbm_overflow(str(e))
    if used is None:
      raise
    result.update(compile_s=round(time.perf_counter() - t0, 1), per_device_bytes=used,
                  fits=False, step_flops=None, error=str(e).strip().splitlines()[0][:300])
    return result
  result["compile_s"] = round(time.perf_counter() - t0, 1)

  mem = compiled.memory_analysis()
  # Donated state: the outputs reuse the arguments' buffers (alias), so count them once.
  parts = dict(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes)
  total = (parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"]
           + parts["temp_bytes"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_device_flops = float(cost.get("flops", 0.0))  # of one device's SPMD partition
  fits = total <= topology.hbm_bytes if backend == "tpu" else None  # XLA:CPU: no HBM verdict
  result.update(parts, per_device_bytes=total, fits=fits,
                step_flops=per_device_flops * len(devices),
                step_flops_per_device=per_device_flops)
  return result


def _size(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def _flop(n: float) -> str:
  return f"{n / 1e12:,.1f} TFLOP" if n >= 1e11 else f"{n / 1e9:,.2f} GFLOP"


def report(r: dict) -> str:
  """Human-readable lines for one compile result."""
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  lines = [
      f"{r['config']} on {r['topology']} ({r['device_kind']}, {r['topology_name']}: {r['chips']} "
      f"chips, {r['hbm_bytes'] / GIB:.0f} GiB HBM each), backend {r['backend']}",
      f"mesh {mesh}; global batch {r['global_batch']} = {r['per_device_batch']} per device "
      f"({r['microbatches']} microbatches); {r['precision']} compute, "
      f"remat {'on' if r['remat'] else 'off'}, {'scanned' if r.get('scan_layers') else 'unrolled'} "
      f"blocks; {r['params'] / 1e6:,.1f} M parameters",
  ]
  verdict = {True: "fits", False: "DOES NOT FIT", None: "no verdict: XLA:CPU's buffer "
             "assignment, not the TPU compiler's (install libtpu)"}[r["fits"]]
  if "temp_bytes" in r:
    lines.append(
        f"per device: arguments {_size(r['argument_bytes'])}, outputs {_size(r['output_bytes'])} "
        f"({_size(r['alias_bytes'])} of them donated), temporaries {_size(r['temp_bytes'])}, "
        f"total {_size(r['per_device_bytes'])} of {r['hbm_bytes'] / GIB:.0f} GiB: {verdict}")
    lines.append(
        f"step: {_flop(r['step_flops'])} (XLA cost analysis, {_flop(r['step_flops_per_device'])} "
        f"per device) vs analytical {_flop(r['analytical_step_flops'])} (mae_jax/models/flops.py x batch)")
  else:
    lines.append(f"per device: the compiler needs at least {_size(r['per_device_bytes'])} of "
                 f"{r['hbm_bytes'] / GIB:.0f} GiB: {verdict} ({r['error']})")
  lines.append(f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s")
  return "\n".join(lines)


# -- README table ---------------------------------------------------------------------------------
# (config, topology, overrides): the paper's global batches for L/8 and G/8 (16,384 on 128 H100s
# and 8,192 on 256 H100s, docs/science.md §2.6) on as many v5p chips (L/8 also on half as many), FSDP,
# bf16, remat. ViT-G's width 1664 = 13 x 128 caps FSDP at 128-way: G/8 runs data 2 x fsdp 128.
_BIG = ("--config.mesh.fsdp=-1", "--config.precision=bfloat16", "--config.remat=True")
SCALING_TABLE = (
    ("vits16", "v5p-32", ("--config.precision=bfloat16",)),
    ("vitb16", "v5p-32", ("--config.precision=bfloat16",)),
    ("vitl16", "v5p-64", ("--config.mesh.data=1", "--config.mesh.fsdp=-1",
                          "--config.precision=bfloat16")),
    ("vitl8", "v5p-256", ("--config.batch_size=16384", "--config.mesh.data=1") + _BIG),
    ("vitl8", "v5p-128", ("--config.batch_size=16384", "--config.mesh.data=1") + _BIG),
    ("vitg8", "v5p-512", ("--config.batch_size=8192", "--config.mesh.data=2") + _BIG),
)


def run_command(config_name: str, topology: str, overrides, backend: str,
                cache_dir: str | None = None) -> dict:
  """One `python -m mae_jax.compile` in a fresh process (each needs its own devices)."""
  command = " ".join(["python -m mae_jax.compile", f"--config=configs/{config_name}.py",
                      f"--topology={topology}", *overrides])
  want = {"tpu": "tpu", "cpu": "cpu-fake-devices"}.get(backend) or (
      "tpu" if libtpu_version() else "cpu-fake-devices")
  cached = pathlib.Path(cache_dir) / f"{config_name}_{topology}.json" if cache_dir else None
  if cached and cached.is_file():
    result = json.loads(cached.read_text())
    if result.get("command") == command and result.get("backend") == want:
      print(f"{command}: reusing {cached}", file=sys.stderr)
      return result
  print(f"{command}: compiling ...", file=sys.stderr, flush=True)
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-m", "mae_jax.compile", f"--backend={backend}",
                         f"--config={root / 'configs' / config_name}.py", f"--topology={topology}",
                         *overrides], cwd=root, capture_output=True, text=True, check=False)
  sys.stderr.write(proc.stderr)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise cli.UserError(f"{command} failed (exit {proc.returncode}): {why}")
  sys.stderr.write(proc.stdout)
  result = dict(json.loads(lines[-1]), command=command)
  if cached:
    cached.parent.mkdir(parents=True, exist_ok=True)
    files.write(cached, json.dumps(result) + "\n")
  return result


def scaling_block(rows) -> str:
  backends = sorted({r["backend"] for r in rows})
  if backends == ["tpu"]:
    note = f"TPU compiler: libtpu {rows[0].get('libtpu')}"
  else:
    note = ("XLA:CPU on fake devices, libtpu was not installed: memory and FLOPs are XLA:CPU's, "
            "not the TPU compiler's" if backends == ["cpu-fake-devices"] else ", ".join(backends))
  lines = [
      f"Generated by `python -m mae_jax.compile --write_readme=README.md` ({note}). Each row",
      "is the real train step, lowered over the sharded abstract state and compiled for the",
      "topology on a machine without TPUs, as MaxText's `train_compile.py` does. Memory is per",
      "device: arguments + outputs + temporaries, the donated train state counted once. Step",
      "FLOPs: XLA's cost analysis / `mae_jax/models/flops.py` x batch. XLA counts the body of a",
      "loop once: with scanned blocks (`scan`: `model.scan_layers`, one loop for the encoder and",
      "one for the decoder) its count holds one layer of each (`python -m bench.compile_time`",
      "counts per trip: within 1 % of the unrolled step), plus the remat recomputation and the",
      "TPU compiler's own loops (collective matmuls): use the analytical count for MFU.",
      "Topology names follow Cloud TPU: v5p-256 is 256 TensorCores = 128 chips (4x4x8). Compile",
      "times are wall seconds on the 2-core development machine, shared with other jobs.",
      "",
      "The TPU compiler comes from `pip install -e \".[aot]\"` (libtpu). Without it the command",
      "compiles for as many fake CPU devices and says so (`\"backend\": \"cpu-fake-devices\"`).",
      "On a machine without TPUs an importable libtpu makes every jax program probe for one",
      "(unless `JAX_PLATFORMS=cpu`), so it may be kept apart: `pip install --target DIR libtpu`",
      "then `PYTHONPATH=DIR python -m mae_jax.compile ...` (or `TPU_LIBRARY_PATH=` its .so).",
      "",
      "| config | topology (chips) | mesh data x fsdp x tensor | global batch (per chip) "
      "| compute | GiB per device (temp) | HBM GiB | fits | step TFLOP XLA / analytical "
      "| compile s |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    mesh = " x ".join(str(v) for v in r["mesh"].values())
    compute = r["precision"] + (", remat" if r["remat"] else "") + (
        ", scan" if r.get("scan_layers") else "")
    temp = f" ({r['temp_bytes'] / GIB:.1f})" if "temp_bytes" in r else ""
    xla = f"{r['step_flops'] / 1e12:,.0f}" if r.get("step_flops") else "-"
    fits = {True: "yes", False: "**no**", None: "? (XLA:CPU)"}[r["fits"]]
    lines.append(
        f"| `{r['config']}` | {r['topology']} ({r['chips']}) | {mesh} | {r['global_batch']:,} "
        f"({r['per_device_batch']}) | {compute} | {r['per_device_bytes'] / GIB:.1f}{temp} | "
        f"{r['hbm_bytes'] / GIB:.0f} | {fits} | {xla} / {r['analytical_step_flops'] / 1e12:,.0f} | "
        f"{r['compile_s']:.0f} |")
  lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
  return "\n".join(lines)


def write_readme(readme: pathlib.Path, block: str):
  """Replaces the text between the scaling markers (added under "## Scaling up" if absent)."""
  files.rewrite_block(readme, "scaling", block, "## Scaling up")


# -- main -----------------------------------------------------------------------------------------
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _README.value:
    readme = pathlib.Path(_README.value)
    if not readme.is_file():
      raise FileNotFoundError(f"--write_readme: {readme} does not exist")
    rows = [run_command(name, topo, overrides, _BACKEND.value, _CACHE.value)
            for name, topo, overrides in SCALING_TABLE]
    write_readme(readme, scaling_block(rows))
    print(json.dumps({"readme": str(readme), "rows": [
        {k: r.get(k) for k in ("config", "topology", "backend", "per_device_bytes", "fits",
                               "step_flops", "compile_s")} for r in rows]}))
    return
  if _CONFIG.value is None or _TOPOLOGY.value is None:
    raise app.UsageError("--config and --topology are required, e.g. --config=configs/vitl8.py "
                         "--topology=v5p-128")
  config = _CONFIG.value  # a config file that failed to load raises OSError here
  topology = parse_topology(_TOPOLOGY.value)
  devices, backend = target_devices(topology, _BACKEND.value)
  mesh = topology_mesh(config, devices)
  if backend != "tpu":
    print(f"warning: libtpu is not installed (pip install 'mae_jax[aot]'): compiling for "
          f"{len(devices)} fake CPU devices; memory and FLOPs reflect XLA:CPU, not the TPU "
          f"compiler", file=sys.stderr)
  if int(config.microbatches) > 1:
    print("note: XLA's cost analysis counts the microbatch loop body once, so step_flops "
          "undercounts by about the number of microbatches", file=sys.stderr)
  result = compile_step(config, topology, mesh, backend)
  result["libtpu"] = libtpu_version() if backend == "tpu" else None
  print(report(result))
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
