"""Progress of a long loop on stderr: a tqdm bar on a terminal, else a log line every 30 s.

    bar = progress.Progress(total=len(sites), unit="site", desc="data_prep.convert")
    bar.update(1)       # as each item finishes (tqdm's interface: update, n, set_postfix, close)
    bar.close()

Under a batch scheduler, `nohup` or a pipe a bar would print nothing useful (tqdm off) or
carriage-return noise, so there each `every` seconds one plain line says done/total, the rate and
the estimated time left, e.g. `data_prep.convert: 120/1000 sites (12%), 3.4 sites/s, ETA 4m18s`,
and `close` prints the final count. mode: "auto" (bar on a terminal, lines otherwise), "on" (a
bar always), "off" (nothing).
"""
import sys
import time

import tqdm

MODES = ("auto", "on", "off")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
  """tqdm's update / n / set_postfix / close, as a bar or as periodic log lines."""

  def __init__(self, total: int, *, initial: int = 0, unit: str = "it", desc: str = "",
               mode: str = "auto", every: float = 30.0, file=None):
    if mode not in MODES:
      raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    self.file = sys.stderr if file is None else file
    self.total, self.n, self.unit, self.desc = int(total), int(initial), unit, desc
    self.every = every
    self._initial, self._postfix, self._closed = int(initial), "", False
    self._start = self._last = time.monotonic()
    terminal = getattr(self.file, "isatty", lambda: False)()
    self._bar = None
    self._lines = mode == "auto" and not terminal
    if mode == "on" or (mode == "auto" and terminal):
      self._bar = tqdm.tqdm(total=total, initial=initial, unit=unit, desc=desc or None,
                            file=self.file, smoothing=0.1)

  def update(self, n: int = 1):
    self.n += int(n)
    if self._bar is not None:
      self._bar.update(n)
    elif self._lines and time.monotonic() - self._last >= self.every:
      self._log()

  def set_postfix(self, **values):
    if self._bar is not None:
      self._bar.set_postfix(**values)
    self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

  def line(self) -> str:
    """`desc: done/total units (pct), rate units/s, ETA time` as of now."""
    elapsed = max(time.monotonic() - self._start, 1e-9)
    rate = (self.n - self._initial) / elapsed
    pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
    text = f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total} {self.unit}s{pct}, "
    text += f"{rate:.3g} {self.unit}s/s"
    if self.n < self.total:
      text += f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 else ", ETA unknown"
    else:
      text += f", done in {_duration(elapsed)}"
    return text + (f", {self._postfix}" if self._postfix else "")

  def _log(self):
    self._last = time.monotonic()
    print(self.line(), file=self.file, flush=True)

  def close(self):
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self._lines and self.n > self._initial:
      self._log()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
