"""mae_jax/util/files.py: atomic writes and the README's generated blocks."""
import os

import numpy as np
import pytest

from mae_jax.util import files


@pytest.mark.parametrize("remote", [False, True])
def test_write_is_all_or_nothing(tmp_path, monkeypatch, remote):
  # remote=True takes the etils.epath branch (gs://...) on a local folder.
  monkeypatch.setattr(files, "_is_remote", lambda path: remote)
  path = tmp_path / "a.json"
  files.write(path, "old\n")
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write("half")
      raise RuntimeError("interrupted")
  assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["a.json"]
  files.write(path, b"\x00new")
  assert path.read_bytes() == b"\x00new" and os.listdir(tmp_path) == ["a.json"]


def test_atomic_open_takes_numpy_writers(tmp_path):
  with files.atomic_open(tmp_path / "x.npy", "wb") as f:
    np.save(f, np.arange(3))
  np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))


def test_rewrite_block_replaces_in_place_appends_or_refuses(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\n<!-- t:begin (keep this note) -->\nold\n<!-- t:end -->\n\nafter\n")
  files.rewrite_block(readme, "t", "new\nlines")
  files.rewrite_block(readme, "t", "new\nlines")  # idempotent
  assert readme.read_text() == ("# x\n\n<!-- t:begin (keep this note) -->\nnew\nlines\n"
                                "<!-- t:end -->\n\nafter\n")
  files.rewrite_block(readme, "u", "block", "## U")
  assert readme.read_text().endswith("after\n\n## U\n\n<!-- u:begin -->\nblock\n<!-- u:end -->\n")
  with pytest.raises(ValueError, match="no markers <!-- v:begin"):
    files.rewrite_block(readme, "v", "block")
