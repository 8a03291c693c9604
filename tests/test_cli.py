"""Every `python -m` command runs through mae_jax/util/cli.py: `--help` works, and a user mistake
is ONE line `<command>: error: ...` on stderr with exit status 2, never a traceback."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.data import input_pipeline, records, resources
from mae_jax.util import cli
from mae_jax.util.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")

# module, the arguments it requires (so that argparse reports the bad flag, not a missing one),
# a flag that --help must describe.
COMMANDS = [
    ("mae_jax.main", [], "workdir"),
    ("mae_jax.summary", [], "zoo"),
    ("mae_jax.compile", [], "topology"),
    ("mae_jax.demo", [], "budget_minutes"),
    ("mae_jax.weights", [], "encoder_only"),
    ("mae_jax.experiments", [], "suite"),
    ("eval.recall", [], "embeddings"),
    ("eval.embed", [], "manifest"),
    ("eval.explore", [], "max_genes"),
    ("eval.neighbors", [], "top_pairs"),
    ("data_prep.convert", ["--layout=rxrx1", "--root=r", "--out=o"], "--sites_per_shard"),
    ("data_prep.synthetic", ["--out=o"], "--controls_per_plate"),
    ("data_prep.build_arm_table", ["--out=o"], "--out"),
    ("bench.common", [], "--threads"),
    ("bench.train_step", [], "--runs"),
    ("bench.embed", [], "--precision"),
    ("bench.peers", [], "--jax_python"),
    ("bench.profile_step", [], "--scan_layers"),
    ("bench.input_pipeline", [], "--read_threads"),
    ("bench.recall", [], "--perturbations"),
    ("bench.compile_time", [], "--devices"),
]


def entry_points():
  """{module: source} of every `python -m` command: a module with a `__main__` block in the
  command packages (mae_jax/*.py, mae_jax/*/__main__.py, eval/, data_prep/, bench/)."""
  found = {}
  for pattern in ("mae_jax/*.py", "mae_jax/*/__main__.py", "eval/*.py", "data_prep/*.py",
                  "bench/*.py"):
    for path in REPO.glob(pattern):
      text = path.read_text()
      if re.search(r"^if __name__ == .__main__.:", text, re.M) or path.name == "__main__.py":
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__main__" else parts)] = text
  return found


def test_every_entry_point_runs_through_cli_and_is_checked_here():
  """A new command gets its bad-flag check in COMMANDS; none parses flags outside cli.run
  (absl's app.run, a bare argparse parser or parser.exit would print their own error style)."""
  found = entry_points()
  assert set(found) == {c[0] for c in COMMANDS}, set(found) ^ {c[0] for c in COMMANDS}
  for module, text in found.items():
    assert "cli.run(" in text, f"{module}: does not run through mae_jax.util.cli.run"
    assert not re.search(r"\bapp\.run\(|argparse\.ArgumentParser\(", text), module


def run(module, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def error_line(proc, command):
  """The one error line of a failed command; any other stderr line must be an absl log line."""
  assert proc.returncode == cli.USAGE, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if not ABSL_LOG_LINE.match(l)]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
  assert errors[0].startswith(f"{command}: error: "), errors[0]
  return errors[0][len(f"{command}: error: "):]


@pytest.mark.parametrize("module,required,flag", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_and_bad_flag(module, required, flag):
  shown = run(module, "--help")
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert flag in shown.stdout and "Traceback" not in shown.stderr, shown.stdout[-3000:]
  bad = run(module, *required, "--no_such_flag=1")
  assert "no_such_flag" in error_line(bad, module)
  assert bad.stdout == ""
  assert not (REPO / "o").exists()


def test_config_mistakes_are_one_line():
  message = error_line(run("mae_jax.main", "--config=configs/tiny.py", "--config.mesh.dta=1"),
                       "mae_jax.main")
  assert message == "unknown config key 'dta'; did you mean 'data'?"
  message = error_line(run("mae_jax.demo", "--out=unused", "--config.model.nonsense=1"),
                       "mae_jax.demo")
  assert message == "unknown config key 'nonsense'"
  message = error_line(run("mae_jax.summary", "--config=configs/nope.py"), "mae_jax.summary")
  assert message.startswith("config file: ") and "configs/nope.py" in message, message


def _write_shards(out_dir, shards=2, per_shard=4):
  """The shape configs/tiny.py trains on: 6-channel uint8 sites of 40x40 (crops of 32)."""
  channels = [f"w{c}" for c in range(1, 7)]
  entries = []
  for s in range(shards):
    path = f"shard-{s}.tfrecord"
    with records.ShardWriter(os.path.join(out_dir, path)) as w:
      for i in range(per_shard):
        site = np.random.default_rng([s, i]).integers(0, 256, (40, 40, 6), dtype=np.uint8)
        w.write(site, channels, {"well_id": f"B{s:02d}", "site": i})
    entries.append({"path": path, "records": w.count})
  return records.write_manifest(out_dir, {
      "layout": "test", "shards": entries, "num_records": shards * per_shard,
      "image_shape": [40, 40, 6], "channels": channels, "dtype": "uint8"})


def test_truncated_shard_is_one_line_naming_shard_and_offset(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  manifest = _write_shards(str(data))
  shard = data / "shard-1.tfrecord"
  last = int(np.load(f"{shard}.idx")[-1, 0]) - 12  # the header of the last record
  size = shard.stat().st_size
  os.truncate(shard, size - 5)
  proc = run("mae_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
             f"--config.data.manifest={manifest}")
  message = error_line(proc, "mae_jax.main")
  assert message == (f"{shard}: byte offset {last}: truncated record (file ends at byte "
                     f"{size - 5}, record needs {size - last} bytes)")
  assert not list(tmp_path.glob("run/checkpoints/[0-9]*"))  # it stopped before a first step


def test_corrupt_record_read_in_a_grain_worker_is_one_line(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  manifest = _write_shards(str(data))
  shard = data / "shard-0.tfrecord"
  offset, length = (int(v) for v in np.load(f"{shard}.idx")[1])
  with open(shard, "r+b") as f:  # one pixel bit: the record parses, only its crc tells
    f.seek(offset + length - 50)
    byte = f.read(1)
    f.seek(offset + length - 50)
    f.write(bytes([byte[0] ^ 1]))
  proc = run("mae_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
             f"--config.data.manifest={manifest}", "--config.data.num_workers=1")
  assert error_line(proc, "mae_jax.main") == (
      f"{shard}: byte offset {offset - 12}: payload crc mismatch")


def test_user_errors_share_one_base_class():
  # pylint: disable=g-import-not-at-top
  from data_prep import synthetic
  from data_prep.layouts.common import ConvertError
  from eval import EvalError, benchmarks, tables
  from mae_jax.compile import TopologyError
  from mae_jax.train import ConfigError, checkpointing, sharding
  user_errors = [records.RecordError, records.ManifestError, input_pipeline.InputError,
                 resources.ResourceError, ConfigError, sharding.MeshError,
                 checkpointing.CheckpointError, ConvertError, synthetic.SyntheticError, EvalError,
                 tables.TableError, benchmarks.InsufficientEntities, TopologyError, cli.UsageError]
  assert all(issubclass(e, UserError) for e in user_errors)
  assert cli.UserError is UserError
  # They stay the built-in types callers already catch.
  assert all(issubclass(e, ValueError) for e in user_errors if e is not resources.ResourceError
             and e is not TopologyError and e is not cli.UsageError)
  assert issubclass(resources.ResourceError, RuntimeError)


def test_in_process_run_exits_2_on_user_errors_and_keeps_bugs(capsys):
  def parse(argv):
    parser = cli.ArgumentParser(prog="p")
    parser.add_argument("--n", type=int, required=True)
    args = parser.parse_args(argv)
    if args.n < 0:
      raise records.RecordError("shard.tfrecord: byte offset 12: truncated record")
    if args.n == 0:
      raise FileNotFoundError(2, "No such file or directory", "missing.json")
    if args.n == 1:
      raise RuntimeError("a bug")
    return 0

  name = __name__  # the module that defines main names the command
  for argv, says in ((["--n=x"], "argument --n: invalid int value: 'x' (see --help)"),
                     (["--n=-1"], "shard.tfrecord: byte offset 12: truncated record"),
                     (["--n=0"], "missing.json: No such file or directory")):
    with pytest.raises(SystemExit) as e:
      cli.run(parse, argv, absl_flags=False)
    assert e.value.code == cli.USAGE
    assert capsys.readouterr().err == f"{name}: error: {says}\n"
  with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
    cli.run(parse, ["--n=1"], absl_flags=False)
  with pytest.raises(SystemExit) as e:
    cli.run(parse, ["--n=2"], absl_flags=False)
  assert e.value.code == 0
