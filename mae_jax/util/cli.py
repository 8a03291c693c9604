"""One way to run an absl command: user mistakes end in ONE line on stderr, never a traceback.

    if __name__ == "__main__":
      cli.run(main)

Flag-parsing errors (unknown flags, a config file that does not exist, a typo in a
`--config.key=value` override, a value of the wrong type) and the errors listed in `USER_ERRORS`
raised by `main` print `error: <one line>` and exit 2 / 1. Anything else is a bug and keeps its
traceback.
"""
import re
import sys

from absl import app, flags


class UserError(Exception):
  """A mistake of the user (bad input, missing file): its message is the one line shown."""


def _user_errors():
  # Imported lazily so that a command pays only for the modules it uses.
  errors = [UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError]
  for module, name in (("mae_jax.data.records", "RecordError"), ("mae_jax.data.input_pipeline", "InputError"),
                       ("mae_jax.data.resources", "ResourceError")):
    mod = sys.modules.get(module)
    if mod is not None and hasattr(mod, name):
      errors.append(getattr(mod, name))
  return tuple(errors)


def one_line(exc: BaseException) -> str:
  """Squeezes an exception message (absl and ml_collections write several lines) into one."""
  text = str(exc).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError-style repr
    text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
  if "Failed loading config file" in text:  # ml_collections: keep the line that says why
    why = [line.strip() for line in text.splitlines() if "[Errno" in line or "Error" in line]
    return "config file: " + (why[-1] if why else text.splitlines()[-1].strip())
  hint = re.search(r'Did you mean "(\w+)"', text)
  key = re.match(r"'?(\w+)'?\s*$", text.splitlines()[0]) if text else None
  if hint and key:
    return f"unknown config key {key.group(1)!r}; did you mean {hint.group(1)!r}?"
  parts = [p.strip() for p in text.splitlines() if p.strip()]
  return " ".join(parts) or type(exc).__name__


def fail(message: str, code: int = 1):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def run(main):
  """absl `app.run(main)` with one-line errors for everything the user can get wrong."""
  app.define_help_flags()
  try:
    remaining = flags.FLAGS(sys.argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    fail(one_line(e), 2)

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(one_line(e), 2)
    except _user_errors() + (OSError,) as e:  # OSError: also a config file that failed to load
      fail(one_line(e))

  app.run(guarded, flags_parser=lambda _: remaining)  # parse once: config overrides are not idempotent
