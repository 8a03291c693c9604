"""Training: optimiser and schedule, sharding rules and mesh, train step and loop, checkpoints."""
from mae_jax.util.errors import UserError


class ConfigError(UserError, ValueError):
  """A config that cannot run on the present devices (a user mistake: one line)."""
