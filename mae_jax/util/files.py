"""The one way files are written: atomically, and the generated blocks of the README.

    with files.atomic_open(path, "wb") as f:   # f is PATH.tmp.PID until the block ends
      np.save(f, array)
    files.write(path, text_or_bytes)
    files.rewrite_block("README.md", "zoo", table)

A reader, or a rerun that skips finished work, never sees a half-written file: the data goes to
a temporary file in the same folder, which replaces `path` only when the block ends without an
exception and is removed otherwise. No jax here, so data_prep uses it too.
"""
import contextlib
import os
import re


def _is_remote(path) -> bool:
  return "://" in os.fspath(path)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", fsync: bool = True):
  """Opens a temporary file beside `path` for writing ("w" text in UTF-8, or "wb").

  Local files are fsynced before the rename (unless fsync=False) so that after a crash `path`
  holds either the old or the whole new content, never an empty file. Paths with a scheme
  (gs://...) go through etils.epath, whose rename is what the object store offers.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open: mode {mode!r}, expected 'w' or 'wb'")
  encoding = None if "b" in mode else "utf-8"
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    try:
      with tmp.open(mode, encoding=encoding) as f:
        yield f
      tmp.replace(path)
    except BaseException:
      if tmp.exists():
        tmp.unlink()
      raise
    return
  path = os.fspath(path)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, mode, encoding=encoding) as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write(path, data: str | bytes, fsync: bool = True) -> None:
  """Atomically writes `data` (str as UTF-8 text, or bytes) to `path`."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync) as f:
    f.write(data)


def rewrite_block(path, name: str, block: str, heading: str | None = None) -> None:
  """Replaces what lies between the marker lines `<!-- NAME:begin ... -->` and
  `<!-- NAME:end -->` of the markdown file `path` with `block` (the markers stay).

  Without the markers, the block and its markers are appended under the line `heading`
  (e.g. "## Scaling up"), or, if heading is None, ValueError says they are missing.
  """
  end = f"<!-- {name}:end -->"
  begin_re = re.compile(rf"^<!-- {re.escape(name)}:begin\b[^>\n]*-->", re.MULTILINE)
  end_re = re.compile(rf"^{re.escape(end)}", re.MULTILINE)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  begin = begin_re.search(text)
  stop = end_re.search(text, begin.end()) if begin else None
  if stop is None:
    if heading is None:
      raise ValueError(f"{path}: no markers <!-- {name}:begin --> ... {end}")
    text = text.rstrip("\n") + f"\n\n{heading}\n\n<!-- {name}:begin -->\n{block}\n{end}\n"
  else:
    text = f"{text[:begin.end()]}\n{block}\n{text[stop.start():]}"
  write(path, text)
