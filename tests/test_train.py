"""`python -m mae_jax.main` end to end on 8 fake CPU devices: meshes, exact resume, SIGTERM, NaN,
dry runs of every real config, plus the train step's microbatching and remat in-process.

Runs share one persistent compilation cache and JAX_DISABLE_MOST_OPTIMIZATIONS, and every run
uses the same schedule (total_steps=200, stopped early with --stop_at), so a mesh compiles once.
"""
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import camae_vits16, tiny, vitb16, vitb8, vitg8, vitl16, vitl8, vits16
from mae_jax.train import ConfigError, batches, checkpointing, loop, metrics, sharding
from mae_jax.train import step as step_lib
from mae_jax.models import mae
from mae_jax.data import records

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/tiny.py", "--config.total_steps=200", "--config.log_every=1",
        "--config.checkpoint_every=100", "--config.optimizer.warmup_fraction=0.01",
        "--config.optimizer.lr=3e-3"]
MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


def mesh_flags(shape):
  return [f"--config.mesh.{a}={n}" for a, n in zip(sharding.MESH_AXES, shape)]


def main_env(cache_dir, devices=8):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_main(args, cache_dir, *, timeout=300):
  proc = subprocess.run([sys.executable, "-m", "mae_jax.main", *args], cwd=REPO, timeout=timeout,
                        env=main_env(cache_dir), capture_output=True, text=True)
  return proc


def result_of(proc):
  assert proc.stdout.strip(), proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  """24 sites of 48x48x6 in 2 TFRecord shards: the grain pipeline takes random 32x32 crops."""
  out = tmp_path_factory.mktemp("data")
  config = tiny.get_config()
  config.model.image_size = 48
  sites = batches.SyntheticCrops(config, None).images(step=0, start=0, stop=24)
  channels = [f"w{i}" for i in range(1, 7)]
  shards = []
  for s in range(2):
    with records.ShardWriter(str(out / f"shard-{s}.tfrecord")) as writer:
      for i in range(12 * s, 12 * s + 12):
        writer.write(sites[i], channels, {"site": i, "well": f"B{i:02d}"})
    shards.append({"path": f"shard-{s}.tfrecord", "records": writer.count})
  return pathlib.Path(records.write_manifest(out, {
      "layout": "test", "shards": shards, "num_records": 24, "image_shape": [48, 48, 6],
      "channels": channels, "dtype": "uint8"}))


@pytest.fixture(scope="module")
def data_flags(manifest):
  return [f"--config.data.manifest={manifest}"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir, data_flags):
  """An uninterrupted 10-step run on data=8: the yardstick of every resume."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = run_main([*TINY, *data_flags, f"--workdir={workdir}", "--stop_at=10"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.fixture(scope="module")
def reference(reference_run):
  return losses(reference_run[0])


# -- sharding -----------------------------------------------------------------------------------
def test_params_and_moments_are_sharded_as_the_rules_say(devices):
  config = tiny.get_config()
  rules = sharding.normalize_rules(config.sharding_rules)
  with nnx.use_eager_sharding(False):  # the logical names each parameter was declared with
    declared = jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: mae.build_model(config.model)),
                                         nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  for shape in MESHES.values():
    config.mesh.update(dict(zip(sharding.MESH_AXES, shape)))
    mesh = sharding.make_mesh(config.mesh)
    _, _, abstract, init = step_lib.build_state(config, mesh)
    adam = abstract["opt"][1][0]  # chain(clip, adamw): ScaleByAdamState(count, mu, nu)
    for tree in (abstract["model"], adam.mu, adam.nu):
      for variable, leaf in zip(declared, jax.tree.leaves(tree), strict=True):
        spec = sharding.logical_to_mesh(variable.get_metadata()["out_sharding"], rules)
        assert leaf.shape == variable.shape
        assert leaf.sharding == jax.sharding.NamedSharding(mesh, spec)
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()

  # The real arrays of the last mesh (data=2, fsdp=2, tensor=2), initialised directly sharded.
  rules_mesh = step_lib.mesh_context(mesh, rules)
  with rules_mesh:
    state = init()
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=True):
    assert got.sharding == want.sharding and got.shape == want.shape
  in_proj = state["model"]["blocks"][0]["in_proj"]  # ("embed", "mlp") -> (fsdp, tensor)
  assert in_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in in_proj.addressable_shards} == {(32, 224)}  # of (64, 448)
  assert len({s.device for s in in_proj.addressable_shards}) == 8
  mu = state["opt"][1][0].mu["blocks"][0]["in_proj"]
  assert mu.sharding == in_proj.sharding and mu.addressable_shards[0].data.shape == (32, 224)
  assert state["step"].sharding.spec == jax.sharding.PartitionSpec()


# -- the command --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", MESHES.values(), ids=MESHES.keys())
def test_main_trains_on_mesh(shape, tmp_path, cache_dir, data_flags, request):
  if shape == (8, 1, 1):  # the reference run is this very command
    workdir, proc = request.getfixturevalue("reference_run")
    steps = 10
  else:
    workdir, steps = tmp_path, 8
    proc = run_main([*TINY, *data_flags, *mesh_flags(shape), f"--workdir={workdir}",
                     f"--stop_at={steps}"], cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = result_of(proc)
  assert result["step"] == steps and result["status"] == "preempted"
  assert "Traceback" not in proc.stderr
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").open()]
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  for key in ("loss", "mse", "fourier", "lr", "grad_norm", "images_per_s", "step_time_s",
              "gflops_per_s"):
    assert all(math.isfinite(r[key]) for r in records[1:]), key
  assert records[-1]["loss"] < records[0]["loss"] - 0.05, [r["loss"] for r in records]
  assert result["loss"] == records[-1]["loss"]
  assert result["global_batch"] == 16 and result["per_device_batch"] == 16 // (shape[0] * shape[1])
  config = json.loads((workdir / "config.json").read_text())
  assert [config["mesh"][a] for a in sharding.MESH_AXES] == list(shape)
  assert list((workdir / "tb").iterdir()), "no TensorBoard events"
  assert (workdir / "checkpoints" / str(steps) / "state").is_dir()
  assert "shards x 2 per device" in proc.stdout or "shards x 4 per device" in proc.stdout
  assert "manifest.json (0 grain workers)" in proc.stdout


def test_exact_resume_on_the_same_and_another_mesh(tmp_path, cache_dir, data_flags, reference):
  """5 steps, stop, rerun -> steps 6-10 equal the uninterrupted run's bit for bit.

  The data come from the grain pipeline, whose iterator state travels in the checkpoint.

  Restored onto a data=2,fsdp=2,tensor=2 mesh the data and parameters are identical too, but
  XLA reorders the reductions (gradient all-reduce over 4 shards instead of 8, tensor-parallel
  matmuls), so losses differ in the last bits: measured <= 2 ulp; asserted rtol 1e-6.
  """
  workdir = tmp_path / "run"
  first = run_main([*TINY, *data_flags, f"--workdir={workdir}", "--stop_at=5"], cache_dir)
  assert result_of(first).items() >= dict(step=5, loss=reference[5], status="preempted").items()
  other = tmp_path / "other_mesh"
  shutil.copytree(workdir, other)
  second = run_main([*TINY, *data_flags, f"--workdir={workdir}", "--stop_at=10"], cache_dir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "restored step 5" in second.stdout
  assert losses(workdir) == {s: reference[s] for s in range(1, 11)}  # exact, steps 1-10
  again = run_main([*TINY, *data_flags, f"--workdir={workdir}", "--stop_at=10"], cache_dir)
  assert "nothing to do" in again.stdout and result_of(again)["step"] == 10

  third = run_main([*TINY, *data_flags, *mesh_flags((2, 2, 2)), f"--workdir={other}",
                    "--stop_at=10"], cache_dir)
  assert third.returncode == 0, third.stderr[-3000:]
  resumed = losses(other)
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [reference[s] for s in range(6, 11)], rtol=1e-6, atol=0)


def test_sigterm_saves_that_step_and_exits_0(tmp_path, cache_dir):
  proc = subprocess.Popen([sys.executable, "-m", "mae_jax.main", *TINY, f"--workdir={tmp_path}"],
                          cwd=REPO, env=main_env(cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  try:
    for line in proc.stdout:  # signal once training is under way
      lines.append(line)
      if line.startswith("step 2/"):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  lines += out.splitlines()
  result = json.loads(lines[-1])
  assert proc.returncode == 0 and result["status"] == "preempted", lines[-5:]
  assert 2 <= result["step"] < 200
  assert any("SYNTHETIC" in line for line in lines)  # data.manifest unset
  assert (tmp_path / "checkpoints" / str(result["step"]) / "state").is_dir()
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == \
      result["step"]


def test_user_mistakes_are_one_line(tmp_path, cache_dir, devices):
  bad_mesh = run_main([*TINY, "--config.mesh.data=3", f"--workdir={tmp_path}"], cache_dir)
  assert bad_mesh.returncode == 2 and "Traceback" not in bad_mesh.stderr
  assert bad_mesh.stderr.strip().splitlines()[-1] == (
      "mae_jax.main: error: mesh: data*fsdp*tensor = 3 but 8 devices are present; set one axis "
      "to -1 to fill")
  config = tiny.get_config()
  config.batch_size = 12
  with pytest.raises(ConfigError, match="divisible by 8 batch shards"):
    loop.train_and_evaluate(config, tmp_path / "batch")
  config.batch_size, config.mesh.fsdp = 16, 3
  with pytest.raises(sharding.MeshError, match="cannot fill 8 devices"):
    loop.train_and_evaluate(config, tmp_path / "mesh")
  assert not (tmp_path / "batch").exists() and not (tmp_path / "mesh").exists()


# -- loop guards (in-process, no model compile) -------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, devices):
  config = tiny.get_config()
  config.update(total_steps=10, log_every=3, checkpoint_every=2)
  mesh = sharding.make_mesh(config.mesh)
  repl = sharding.replicated(mesh)
  state = dict(w=jax.device_put(jnp.ones((8,)), repl), step=jax.device_put(jnp.int32(0), repl))

  def fake_step(state, batch, rng):  # the loss turns NaN at step 5
    del batch, rng
    step = state["step"] + 1
    loss = jnp.where(step >= 5, jnp.nan, 1.0 / step)
    metrics = dict(loss=loss, mse=loss, fourier=loss, grad_norm=loss, lr=loss)
    return dict(w=state["w"] + 1, step=step), metrics

  data = batches.SyntheticCrops(config, step_lib.batch_shardings(config, mesh))
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", save_every=2, keep=5)
  log = metrics.MetricsLog(tmp_path, 0, config.total_steps)
  try:
    run = loop._Run(config=config, mesh=mesh, train_step=jax.jit(fake_step), data=data,
                    rng=jax.random.key(0), ckpt=ckpt, log=log, start=0, stop_at=None)
    result = loop._loop(run, state)
  finally:
    log.close()
    ckpt.close()
  assert result["status"] == "nan" and result["step"] == 6 and math.isnan(result["loss"])
  assert ckpt.all_steps() == [2, 4] and result["last_checkpoint"] == 4
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").open()] == [3]


# -- the step itself ----------------------------------------------------------------------------
def test_microbatches_with_remat_equal_averaged_chunk_gradients(devices):
  """microbatches=2 + remat: one update with the mean gradient of the two interleaved chunks."""
  config = tiny.get_config()
  config.update(microbatches=2, remat=True)
  config.model.update(depth=1)  # compile time
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.normalize_rules(config.sharding_rules)
  graphdef, tx, abstract, init = step_lib.build_state(config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  data = batches.SyntheticCrops(config, step_lib.batch_shardings(config, mesh))
  with step_lib.mesh_context(mesh, rules):
    state = init()
    batch, rng = next(data), jax.random.key(0)
    images, params, opt = batch["image"], state["model"], state["opt"]
    step = step_lib.jit_train_step(graphdef, tx, config, mesh, shardings)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), batch, rng)

    @jax.jit
    def manual(params, opt, images):
      def loss_fn(p, x, key):
        return nnx.merge(graphdef, p)({"image": x}, key)[0]
      key = jax.random.fold_in(rng, 0)
      parts = [jax.value_and_grad(loss_fn)(params, images[i::2], jax.random.fold_in(key, i))
               for i in range(2)]
      loss = (parts[0][0] + parts[1][0]) / 2
      grads = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
      updates, _ = tx.update(grads, opt, params)
      return loss, jax.tree.map(jnp.add, params, updates)

    loss, want = manual(params, opt, images)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(new_state["model"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
  assert int(new_state["step"]) == 1


# -- dry runs -----------------------------------------------------------------------------------
REAL = {"vits16": vits16, "camae_vits16": camae_vits16, "vitb16": vitb16, "vitb8": vitb8,
        "vitl16": vitl16, "vitl8": vitl8, "vitg8": vitg8}


@pytest.mark.parametrize("name", REAL)
def test_dry_run_of_every_real_config(name, devices, capsys):
  config = REAL[name].get_config()
  config.mesh.update(data=2, fsdp=2, tensor=2) if name == "vitg8" else config.mesh.update(
      data=2, fsdp=4)
  start = time.perf_counter()
  result = loop.dry_run(config)
  seconds = time.perf_counter() - start
  shards = 4  # fsdp x tensor: nearly every matrix is split 4 ways
  assert result["status"] == "dry_run" and result["devices"] == 8
  assert result["params"] > 30e6  # camae_vits16: 21.4 M + the official 10.4 M decoder
  full = result["params"] * 4
  assert full / shards <= result["param_bytes_per_device"] < full / shards * 1.1
  assert result["opt_bytes_per_device"] >= result["param_bytes_per_device"]
  out = capsys.readouterr().out
  assert "per device: parameters" in out and "optimiser" in out
  print(f"{name}: dry run {seconds:.1f} s")
