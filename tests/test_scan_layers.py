"""model.scan_layers: stacked blocks run by nnx.scan compute what per-layer blocks compute, and
checkpoints of either layout restore into the other (eval and training resume)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import tiny
from mae_jax.models import mae
from mae_jax.train import ConfigError, checkpointing, loop, sharding, step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config(scan, **model):
  c = tiny.get_config()
  c.model.update(scan_layers=scan, **model)
  return c


def params_of(model):
  return nnx.state(model, nnx.Param).to_pure_dict()


def images(n=4, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 255, (n, 32, 32, 6)).astype(np.uint8))


def both_layouts(remat=True, **model):
  """(per-layer model, scanned model) holding the same parameters."""
  with nnx.use_eager_sharding(False):
    unrolled = mae.build_model(config(False, **model).model, remat=remat)
    scanned = mae.build_model(config(True, **model).model, remat=remat)
  nnx.update(scanned, mae.relayout(params_of(unrolled), scan=True))
  return unrolled, scanned


def test_stacked_parameters_carry_a_layers_axis(devices):
  c = config(True, depth=3, decoder_depth=2)
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  _, _, abstract, _ = step_lib.build_state(c, mesh)
  blocks = abstract["model"]["blocks"]
  assert blocks["in_proj"].shape == (3, 64, 448)
  assert abstract["model"]["decoder_blocks"]["fc1"].shape == (2, 32, 128)
  assert blocks["in_proj"].sharding.spec == P(None, "fsdp", "tensor")  # "layers": no mesh axis
  assert sharding.logical_to_mesh(("layers", "embed"), c.sharding_rules) == P(None, "fsdp")
  with nnx.use_eager_sharding(False):
    model = mae.build_model(c.model)
  names = model.blocks.in_proj.get_metadata()["out_sharding"]
  assert names == ("layers", "embed", "mlp")
  # every layer initialised on its own
  w = np.asarray(model.blocks.in_proj[...])
  assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])


@pytest.mark.parametrize("remat", [True, False])
def test_same_loss_gradients_and_embeddings_both_ways(remat):
  """Same parameters -> same loss and gradients (drop_path > 0; remat on, and off: the scanned
  body then keeps only matmul outputs) and the same embed(block=K)."""
  unrolled, scanned = both_layouts(remat, depth=3, decoder_depth=2, drop_path=0.5)
  x = images()

  def loss_and_grads(model):
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: nnx.merge(graphdef, p)({"image": x}, jax.random.key(3))[0]
    return jax.jit(jax.value_and_grad(loss))(params.to_pure_dict())

  loss_u, grads_u = loss_and_grads(unrolled)
  loss_s, grads_s = loss_and_grads(scanned)
  np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=1e-6)
  grads_s = mae.relayout(grads_s, scan=False)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads_u)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_u), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # stochastic depth really acted: without it the loss differs
  with nnx.use_eager_sharding(False):
    no_drop = mae.build_model(config(True, depth=3, decoder_depth=2, drop_path=0.0).model)
  nnx.update(no_drop, params_of(scanned))
  no_drop_loss = jax.jit(lambda m: m({"image": x}, jax.random.key(3))[0])(no_drop)
  assert float(no_drop_loss) != pytest.approx(float(loss_s), rel=1e-6)

  embed = jax.jit(lambda m, block, pooling: m.embed(x, block=block, pooling=pooling),
                  static_argnums=(1, 2))
  for block, pooling in ((1, "mean"), (2, "cls"), (None, "mean")):
    np.testing.assert_allclose(np.asarray(embed(scanned, block, pooling)),
                               np.asarray(embed(unrolled, block, pooling)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(embed(scanned, 1, "mean"), embed(scanned, 2, "mean"))
  with pytest.raises(ValueError, match="block must be in 1..3"):
    scanned.embed(x, block=4)


def test_relayout_of_optimiser_state_round_trips():
  with nnx.use_eager_sharding(False):
    params = params_of(mae.build_model(config(False).model))
  for tx in (optax.adamw(1e-3), optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-4))):
    state = tx.init(params)
    state = jax.tree.map(lambda a: a + jnp.arange(a.size, dtype=a.dtype).reshape(a.shape), state)
    stacked = mae.relayout(state, scan=True)
    assert jax.tree.structure(stacked) == jax.tree.structure(
        tx.init(mae.relayout(params, scan=True)))
    back = mae.relayout(stacked, scan=False)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = mae.relayout(stacked, scan=True)  # already stacked: unchanged
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked)))


def test_resume_accepts_a_config_json_from_before_scanned_layers(tmp_path):
  c = config(False)
  loop.write_config(c, tmp_path, resuming=False)
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["model"]["scan_layers"]  # what runs from before scanned layers wrote
  path.write_text(json.dumps(old))
  loop.write_config(config(True), tmp_path, resuming=True)  # converted on restore: allowed
  assert json.loads(path.read_text())["model"]["scan_layers"] is True
  path.write_text(json.dumps(old))
  with pytest.raises(ConfigError, match=r"other model settings \(model.width\)"):
    loop.write_config(config(True, width=128), tmp_path, resuming=True)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())}


def test_resume_converts_checkpoints_between_layouts(tmp_path, devices, capsys):
  """An unrolled run (its config.json without scan_layers) resumes scanned on an FSDP mesh and
  back: parameters and Adam moments are converted, the losses follow the uninterrupted run."""
  def run(workdir, scan, stop_at, mesh=(8, 1, 1)):
    c = config(scan)
    c.update(total_steps=20, checkpoint_every=3, log_every=1)
    c.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
    return loop.train_and_evaluate(c, workdir, stop_at=stop_at)

  reference = tmp_path / "reference"
  run(reference, False, 6)
  want = _losses(reference)
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  cfg = json.loads((workdir / "config.json").read_text())
  del cfg["model"]["scan_layers"]
  (workdir / "config.json").write_text(json.dumps(cfg))
  capsys.readouterr()

  result = run(workdir, True, 6, mesh=(2, 4, 1))
  assert result["status"] == "preempted" and result["step"] == 6
  out = capsys.readouterr().out
  assert "converted the checkpoint of step 3 from per-layer blocks" in out
  got = _losses(workdir)
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)],
                             rtol=1e-5)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), save_every=3, keep=3)
  try:
    model = tiny.get_config().model
    assert not ckpt.stacked_layers(3, model) and ckpt.stacked_layers(6, model)
  finally:
    ckpt.close()

  # eval: either layout, whatever config.json says now
  x = np.asarray(images(2))
  emb = {}
  for step in (3, 6):
    model, cfg = checkpointing.load_for_eval(workdir, step=step)
    assert cfg.model.scan_layers == (step == 6)
    emb[step] = np.asarray(jax.jit(lambda m: m.embed(x, block=1))(model))
  ref_model, _ = checkpointing.load_for_eval(reference, step=6)
  np.testing.assert_allclose(emb[6], np.asarray(jax.jit(lambda m: m.embed(x, block=1))(ref_model)),
                             rtol=1e-4, atol=1e-5)

  # and back to per-layer blocks
  result = run(workdir, False, 7)
  assert result["step"] == 7
  assert "from stacked blocks" in capsys.readouterr().out


def test_compile_time_bench_prints_both_layouts():
  res = subprocess.run([sys.executable, "-m", "bench.compile_time", "--config=configs/tiny.py",
                        "--batch=2", "--devices=2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
  assert res.returncode == 0, res.stderr[-2000:]
  rows = [json.loads(line) for line in res.stdout.splitlines()]
  assert [r.get("scan_layers") for r in rows[:2]] == [True, False]
  assert all(r["seconds"] > 0 and r["xla_step_flops"] > 0 for r in rows[:2])
  summary = rows[2]
  assert summary["bench"] == "compile_time_summary" and summary["speedup"] > 0
  assert summary["xla_flops_encoder_layer"] > 0
  assert summary["flops_ratio_scanned_to_unrolled"] == pytest.approx(1.0, abs=0.02)
