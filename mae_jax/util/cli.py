"""One way to run a command: a user mistake ends in ONE line on stderr, a bug in a traceback.

    if __name__ == "__main__":
      cli.run(main)                    # absl flags, ml_collections --config.KEY overrides
      cli.run(main, absl_flags=False)  # main(argv) parses argv with cli.ArgumentParser

A flag that does not parse, a UserError (the base of every project error type, see errors.py)
or an OSError (a path that is missing, unreadable or full) prints `<command>: error: <one
line>` on stderr and exits with USAGE (2); <command> is the module that `python -m` ran, e.g.
`mae_jax.main`, `eval.recall`, `data_prep.convert`. Anything else is a bug: its traceback stays.
"""
import argparse
import importlib.util
import logging
import os
import re
import sys

from mae_jax.util import host_memory
from mae_jax.util.errors import UserError  # commands raise it as cli.UserError

USAGE = 2  # the exit status of every user mistake
# What `main` may raise for a user mistake; flag-parsing errors are added where flags are parsed.
USER_ERRORS = (UserError, OSError)
_HELP = ("--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "--helpxml",
         "-helpxml", "-h", "-?", "--?")


class UsageError(UserError):
  """A command line that does not parse (cli.ArgumentParser raises it)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse for cli.run: a mistake raises UsageError (one line) instead of printing usage."""

  def __init__(self, *args, **kwargs):
    if not args and "prog" not in kwargs and _main_module():
      kwargs["prog"] = f"python -m {_main_module()}"
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise UsageError(f"{message} (see --help)")


def one_line(exc: BaseException) -> str:
  """Squeezes an exception message (absl and ml_collections write several lines) into one."""
  if isinstance(exc, OSError) and exc.filename and exc.strerror:
    return f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
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


def _main_module() -> str | None:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return spec.name.removesuffix(".__main__") if spec and spec.name else None


def command_name(main) -> str:
  """The module `python -m` ran (`mae_jax.demo` for mae_jax/demo/__main__.py)."""
  module = getattr(main, "__module__", None)
  if module in (None, "__main__"):
    module = _main_module() or os.path.splitext(os.path.basename(sys.argv[0]))[0]
  return module.removesuffix(".__main__")


def _unknown_config_key(exc) -> str:
  text = one_line(exc)
  if text.startswith("unknown config key"):  # one_line found ml_collections' "Did you mean"
    return text
  lookup = re.search(r"Attempting to lookup: ([\w.]+)", text)  # a key below a leaf
  key = lookup.group(1) if lookup else text.strip("'\"")
  return f"unknown config key {key!r}"


def packaged_config(args: list[str]) -> list[str]:
  """`--config=configs/NAME.py[:ARG]` from any folder: a path that does not exist here but does
  in the installed `configs` package (the repository's configs/) is rewritten to that file."""
  out = list(args)
  for i, arg in enumerate(out):
    if arg == "--":
      break
    name, eq, value = arg.partition("=")
    if name not in ("--config", "-config"):
      continue
    if not eq:  # `--config PATH`
      if i + 1 >= len(out):
        break
      i, value = i + 1, out[i + 1]
    path, colon, extra = value.partition(":")
    parts = os.path.normpath(path).split(os.sep)
    if os.path.exists(path) or len(parts) < 2 or parts[0] != "configs":
      continue
    spec = importlib.util.find_spec("configs")  # locates the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
      candidate = os.path.join(folder, *parts[1:])
      if os.path.isfile(candidate):
        out[i] = (f"{name}=" if eq else "") + candidate + colon + extra
        break
  return out


def print_result(result: dict):
  """Prints the command's result as the last stdout line.

  Native libraries (gloo's "Rank 0 is connected" lines under jax.distributed) write through C
  stdio, which is block-buffered into a file or pipe and would otherwise land after our line.
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  sys.stdout.flush()
  try:
    ctypes.CDLL(None).fflush(None)
  except (OSError, AttributeError):  # no C runtime to flush (not on Linux / macOS)
    pass
  print(json.dumps(result), flush=True)


def _fail(command: str, message: str):
  print(f"{command}: error: {message}", file=sys.stderr)
  sys.exit(USAGE)


class _QuietOrbax(logging.Filter):
  """Orbax logs every save and restore phase at INFO; keep its warnings (and all of it at -v 1)."""

  def filter(self, record):
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    return (record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
            or absl_logging.get_verbosity() > 0)


def run(main, argv=None, *, absl_flags: bool = True, keep_freed_memory: bool = False):
  """Runs `main` as the command line `argv` (default: sys.argv[1:]) and exits with its status.

  absl_flags: the absl flags are parsed ONCE, here (a second parse, as `app.run(main)` does,
  re-defines every `--config.KEY` override flag and fails with "defined twice": overrides are
  not idempotent), then `main(remaining argv)` runs under app.run; `--config=configs/NAME.py`
  resolves against the installed configs package when the path is not found (packaged_config).
  Otherwise `main(argv)` parses argv itself, with cli.ArgumentParser. main's return value is the exit status (None: 0).
  keep_freed_memory: for commands whose time goes into jitted steps (training, embedding, their
  benchmarks): glibc keeps freed buffers for the next step (mae_jax/util/host_memory.py), set
  here, before jax starts its threads.
  """
  if keep_freed_memory:
    host_memory.keep_freed_memory()
  command = command_name(main)
  args = list(sys.argv[1:] if argv is None else argv)
  if not absl_flags:
    try:
      status = main(args)
    except USER_ERRORS as e:
      _fail(command, one_line(e))
    sys.exit(status)

  # pylint: disable-next=g-import-not-at-top
  from absl import app, flags, logging as absl_logging
  app.define_help_flags()
  if "config" in flags.FLAGS:  # ml_collections' --config=configs/NAME.py, from any folder
    args = packaged_config(args)
  try:
    remaining = flags.FLAGS([sys.argv[0], *args])
  except SystemExit as e:  # absl ends --help and its kin with status 1 after printing the usage
    sys.exit(0 if e.code == 1 and any(a.split("=")[0] in _HELP for a in args) else e.code)
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.KEY that does not exist
    _fail(command, _unknown_config_key(e))
  except (flags.Error, TypeError, ValueError, OSError) as e:  # OSError: a config file
    _fail(command, one_line(e))
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())

  def guarded(remaining):
    try:
      return main(remaining)
    except (app.UsageError, *USER_ERRORS) as e:
      _fail(command, one_line(e))

  app.run(guarded, flags_parser=lambda _: remaining)
