"""The conversion as an Apache Beam pipeline: `python -m data_prep.convert ... --runner=NAME`.

The launcher lists the sites, probes the first, plans the shards and skips the finished ones
exactly as the local path does (data_prep/convert.py); the pipeline writes each unfinished shard
with the same `shards.write_shard`, one element per shard, so a shard's bytes do not depend on
the runner. Every file goes to a temporary name first and is renamed when complete, and a worker
skips a shard that a retried bundle already finished. The launcher then reads the shards'
.stats.json back and writes manifest.json itself, last, as the local path does.

apache_beam is imported here only (the `beam` extra: pip install '.[beam]').
"""
import re

from data_prep import shards
from data_prep.layouts.common import ConvertError


def _write(task, out, expect):
  if shards.finished(task, out) is None:  # a retried bundle may find its shard done
    shards.clear_leftovers(task, out)
    shards.write_shard(task, out, expect)
  return task.path


def _one_line(error: BaseException) -> str:
  """A worker's ConvertError as its own message; Beam wraps it in the worker's traceback."""
  text = str(error)
  found = re.findall(r"ConvertError: (.+)", text)
  if found:
    return found[-1].strip()
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def run(tasks, out: str, expect: dict, runner: str, beam_args=()) -> list[dict]:
  """Writes `tasks` on `runner`; returns their stats (as shards.write_shard returns them)."""
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConvertError(f"--runner={runner} needs Apache Beam: pip install '.[beam]' "
                       "(or pip install apache-beam)") from None
  if tasks:
    try:
      options = PipelineOptions(list(beam_args), runner=runner)
    except (ValueError, SystemExit) as e:  # Beam's own argparse exits on a bad option
      raise ConvertError(f"Beam pipeline options {' '.join(beam_args)}: {e}") from None
    try:
      with beam.Pipeline(options=options) as p:
        _ = (p
             | "shards" >> beam.Create(tasks)
             # Breaks fusion with Create, so that runners spread the shards over workers.
             | "spread" >> beam.Reshuffle()
             | "write" >> beam.Map(_write, out, expect))
    except Exception as e:  # pylint: disable=broad-except
      # A worker that was mid-shard when another failed can leave its temporary file (seen on a
      # loaded machine): remove those now, not only on the rerun, so nothing half-written stays.
      for t in tasks:
        if shards.finished(t, out) is None:
          shards.clear_leftovers(t, out)
      if isinstance(e, ConvertError):
        raise
      raise ConvertError(f"Beam pipeline on {runner} failed: {_one_line(e)}; rerun the same "
                         "command to resume") from None
  stats = [shards.finished(t, out) for t in tasks]
  missing = [t.path for t, s in zip(tasks, stats) if s is None]
  if missing:
    raise ConvertError(f"the {runner} pipeline ended without writing {len(missing)} shards "
                       f"(first: {missing[0]}); rerun the same command to resume")
  return stats
