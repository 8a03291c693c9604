"""Device mesh and shardings from the config: one rules table maps logical names to mesh axes.

    mesh = make_mesh(config.mesh)                       # ("data", "fsdp", "tensor"), Auto axes
    rules = normalize_rules(config.sharding_rules)      # logical name -> mesh axes
    batch = batch_sharding(mesh, rules)                 # leading axis over data x fsdp
    target = with_shardings(abstract_state, shardings)  # for Orbax restore / AOT lowering

The model only names its axes (`configs/common.py: SHARDING_RULES`); everything mesh-specific
lives here, so the same model runs data-parallel, FSDP or tensor-parallel by changing `mesh.*`.
"""
import math

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mae_jax.util.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(UserError, ValueError):
  """A mesh shape that does not fit the devices (a user mistake: one line, no traceback)."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 (fill) in {data, fsdp, tensor} so the product is `num_devices`."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh: at most one axis may be -1 and the others >= 1, got "
                    f"{dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % fixed:
      raise MeshError(f"mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                      f"({num_devices} is not a multiple of {fixed})")
    sizes[fills[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are "
                    f"present; set one axis to -1 to fill")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axes (jax 0.10 defaults to Explicit)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if len(devices) == len(jax.devices()):  # topology-aware device order (ICI rings on TPU)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def normalize_rules(rules) -> tuple:
  """The rules table as hashable tuples (config.json gives lists back)."""
  as_axes = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return tuple((str(name), as_axes(axes)) for name, axes in rules)


def logical_to_mesh(names, rules) -> P:
  """A PartitionSpec of mesh axes for a tuple of logical names, through the rules table."""
  with nnx.logical_axis_rules(rules):
    return spmd.apply_rules(tuple(names), spmd.get_logical_axis_rules())


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying `shardings`: an Orbax restore target or AOT-lowering input."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension spans (the rules' "batch" entry)."""
  spec = logical_to_mesh(("batch",), rules)[0]
  if spec is None:
    return ()
  return (spec,) if isinstance(spec, str) else tuple(spec)


def batch_sharding(mesh: Mesh, rules, ndim: int = 4) -> NamedSharding:
  """Leading (batch) axis split over the rules' batch axes, the rest replicated."""
  axes = batch_axes(rules)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch is split (data x fsdp with the default rules)."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs/arrays with NamedShardings (max)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total
