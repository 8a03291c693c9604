"""The base class of every mistake a user can make: bad input data, a wrong flag, a missing file.

Each error type of the project derives from it (RecordError, InputError, ResourceError,
ConfigError, MeshError, CheckpointError, ConvertError, ...), so `mae_jax/util/cli.py` catches
this one class and shows the message as one line, while any other exception is a bug and keeps
its traceback. It imports nothing, so that the jax-free data_prep workers and records.py can
derive from it without paying for absl or jax.
"""


class UserError(Exception):
  """A mistake of the user, not a bug: the message is the one line the command shows."""
