"""Checkpointer (Orbax V0 manager with state + data items) and load_for_eval, in-process."""
import json
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity

from configs import tiny
from mae_jax.train import ConfigError, batches, checkpointing, loop, sharding, step as step_lib
from mae_jax.models import mae


def _mesh(shape):
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, devices):
  """A tiny run's WORKDIR: config.json + checkpoints 4, 6 of an initial state (keep=2)."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  mesh = _mesh((8, 1, 1))
  rules = sharding.normalize_rules(config.sharding_rules)
  _, _, abstract, init = step_lib.build_state(config, mesh)
  with step_lib.mesh_context(mesh, rules):
    state = init()
  data = batches.SyntheticCrops(config, step_lib.batch_shardings(config, mesh))
  loop.write_config(config, workdir, resuming=False)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), save_every=2, keep=2)
  try:
    saved_steps = []
    for step in range(1, 7):
      data.next_step = step + 1
      saved_steps.append(ckpt.save(step, state, data))
    again = ckpt.save(6, state, data, force=True)
  finally:
    ckpt.close()
  host = jax.tree.map(np.asarray, state)
  return dict(workdir=workdir, config=config, host=host, saved=saved_steps, again=again)


def test_interval_keep_and_no_double_save(saved):
  # Orbax always writes the first save of a manager, then every save_every steps.
  assert saved["saved"] == [True, True, False, True, False, True]
  assert saved["again"] is False
  steps = sorted(p.name for p in (saved["workdir"] / "checkpoints").iterdir())
  assert steps == ["4", "6"]
  data_files = sorted(p.name for p in (saved["workdir"] / "checkpoints" / "6" / "data").iterdir()
                      if p.suffix == ".json")
  assert data_files == ["process_0-of-1.json"]


def test_restore_onto_another_mesh(saved):
  config = saved["config"]
  mesh = _mesh((2, 2, 2))
  _, _, abstract, _ = step_lib.build_state(config, mesh)
  data = batches.SyntheticCrops(config, step_lib.batch_shardings(config, mesh))
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(saved["workdir"]),
                                    save_every=2, keep=2)
  try:
    assert ckpt.latest_step() == 6
    state, data = ckpt.restore(6, abstract, data)
  finally:
    ckpt.close()
  assert data.next_step == 7
  for got, want, target in zip(jax.tree.leaves(state), jax.tree.leaves(saved["host"]),
                               jax.tree.leaves(abstract)):
    assert got.sharding == target.sharding  # the NEW mesh's shardings
    np.testing.assert_array_equal(np.asarray(got), want)
  in_proj = state["model"]["blocks"][0]["in_proj"]
  assert in_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert in_proj.addressable_shards[0].data.shape == (32, 224)


def test_grain_iterator_state_travels_with_the_train_state(tmp_path, devices):
  dataset = grain.MapDataset.range(100).seed(3).shuffle().batch(4).to_iter_dataset()
  it = iter(dataset)
  for _ in range(3):
    next(it)
  ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, keep=1)
  try:
    ckpt.save(3, {"w": jnp.arange(3.0)}, it)
    expected = [next(it).tolist() for _ in range(2)]
    ckpt.wait_until_finished()
    state, resumed = ckpt.restore(3, {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                                               sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))},
                                  iter(dataset))
  finally:
    ckpt.close()
  assert [next(resumed).tolist() for _ in range(2)] == expected
  np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0])


def test_background_save_errors_surface(tmp_path, monkeypatch, devices):
  async def disk_full(self, *args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
  data = batches.SyntheticCrops(tiny.get_config(), None)
  # At the loop's check before its next save...
  ckpt = checkpointing.Checkpointer(tmp_path / "a", save_every=1, keep=2)
  assert ckpt.save(1, {"w": jnp.ones(3)}, data)  # returns before the background write fails
  with pytest.raises(OSError, match="No space left"):
    for _ in range(600):
      ckpt.check_for_errors()
      time.sleep(0.05)
  assert ckpt.all_steps() == []
  ckpt.close()
  # ... or when the run ends.
  ckpt = checkpointing.Checkpointer(tmp_path / "b", save_every=1, keep=2)
  assert ckpt.save(1, {"w": jnp.ones(3)}, data)
  with pytest.raises(OSError, match="No space left"):
    ckpt.close()


def test_load_for_eval_from_workdir_checkpoints_or_step(saved):
  workdir = saved["workdir"]
  want = saved["host"]["model"]
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "4"):
    model, config = checkpointing.load_for_eval(path)
    assert isinstance(model, mae.MAE) and config.model.width == 64
    got = nnx.state(model, nnx.Param).to_pure_dict()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), b)
      assert len(a.sharding.device_set) == 1
  images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 6), dtype=np.uint8)
  embedding = jax.jit(lambda m, x: m.embed(x))(model, images)
  assert embedding.shape == (3, 64) and np.isfinite(np.asarray(embedding)).all()


def test_load_for_eval_user_mistakes(saved, tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    checkpointing.load_for_eval(tmp_path / "missing")
  with pytest.raises(checkpointing.CheckpointError, match="neither a run's WORKDIR"):
    checkpointing.load_for_eval(tmp_path)
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint of step 5"):
    checkpointing.load_for_eval(saved["workdir"], step=5)
  (tmp_path / "config.json").write_text(json.dumps(json.loads(
      (saved["workdir"] / "config.json").read_text())))
  with pytest.raises(checkpointing.CheckpointError, match="no finished checkpoint"):
    checkpointing.load_for_eval(tmp_path)


def test_resume_refuses_another_model(saved, tmp_path):
  (tmp_path / "config.json").write_text((saved["workdir"] / "config.json").read_text())
  config = tiny.get_config()
  config.model.width = 128
  with pytest.raises(ConfigError, match=r"other model settings \(model.width\)"):
    loop.write_config(config, tmp_path, resuming=True)
  config.model.width, config.batch_size = 64, 32  # other keys may change (with a warning)
  loop.write_config(config, tmp_path, resuming=True)
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 32
