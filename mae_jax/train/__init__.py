"""Training: optimiser and schedule, sharding rules and mesh, train step and loop, checkpoints."""


class ConfigError(ValueError):
  """A config that cannot run on the present devices (a user mistake: one line)."""
