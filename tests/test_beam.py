"""The conversion as a Beam pipeline (data_prep/beam_convert.py): same bytes as the local path,
resumable after a failure, no half shard ever visible (docs/data_layouts.md §5)."""
import os
import shutil

import pytest

from data_prep import convert
from data_prep.layouts import ConvertError
from tests.test_convert import make_rxrx1, snapshot

pytest.importorskip("apache_beam")

S = 64  # tiny sites: the Beam runner's start-up is the cost here, not the pixels
KW = dict(sites_per_shard=2, image_size=S)
# A real multi-process DirectRunner, as the brief of data_prep/beam_convert.py asks of it.
BEAM = dict(runner="DirectRunner", beam_args=["--direct_num_workers=2",
                                              "--direct_running_mode=multi_processing"])


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
  """The RxRx1 fixture screen (8 sites, 5 shards) and its local conversion."""
  tmp = tmp_path_factory.mktemp("beam")
  make_rxrx1(tmp / "rxrx1", size=S)
  local = str(tmp / "local")
  summary = convert.convert("rxrx1", str(tmp / "rxrx1"), local, workers=1, **KW)
  assert summary["shards_written"] == 5
  return tmp, str(tmp / "rxrx1"), snapshot(local)


def _shards(out):
  folder = os.path.join(out, "shards")
  return {n: os.stat(os.path.join(folder, n)) for n in os.listdir(folder)
          if n.endswith(".tfrecord")}


def test_beam_fails_then_resumes_to_the_local_bytes(screen):
  tmp, root, reference = screen
  out = str(tmp / "beam")
  # Run 1 fails on an unreadable channel file of the last plate; the other shards finish.
  bad = os.path.join(root, "images", "U2OS-01", "Plate4", "M23_s2_w3.png")
  shutil.copy(bad, bad + ".good")
  with open(bad, "wb") as f:
    f.write(b"not a png")
  with pytest.raises(ConvertError, match="M23_s2_w3.png") as e:
    convert.convert("rxrx1", root, out, **KW, **BEAM)
  assert "\n" not in str(e.value)
  done = _shards(out)
  assert "U2OS-01_P4-00000.tfrecord" not in done and done
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  assert not any(".tmp" in n for n in os.listdir(os.path.join(out, "shards")))
  os.replace(bad + ".good", bad)

  # Run 2 writes only the rest; finished shards keep their inode and mtime.
  resumed = convert.convert("rxrx1", root, out, **KW, **BEAM)
  assert resumed["shards_written"] == 5 - len(done) and resumed["runner"] == "DirectRunner"
  after = _shards(out)
  for name, st in done.items():
    assert (after[name].st_ino, after[name].st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
  # Byte-identical to the local conversion: every shard, index, stats file and the manifest.
  got = snapshot(out)
  assert sorted(got) == sorted(reference)
  assert [k for k in got if got[k] != reference[k]] == []
  # A third run finds everything finished and starts no pipeline at all.
  again = convert.convert("rxrx1", root, out, **KW, **BEAM)
  assert (again["shards_written"], again["shards_skipped"]) == (0, 5)
  assert snapshot(out) == got


def test_beam_options_need_a_runner(capsys):
  from mae_jax.util import cli
  with pytest.raises(SystemExit) as e:
    cli.run(convert.main, ["--layout=rxrx1", "--root=x", "--out=y", "--direct_num_workers=2"],
            absl_flags=False)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "need --runner" in err[0]
