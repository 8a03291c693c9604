"""launch/ scripts: syntax, shellcheck, dry-run plans, and the SLURM job's preemption path."""
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"
SCRIPTS = [TPU_POD, SLURM]


def _run(cmd, env=None, **kw):
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(cmd, env=full_env, capture_output=True, text=True,
                        timeout=60, **kw)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  res = _run(["bash", "-n", str(script)])
  assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  res = _run(["shellcheck", "--shell=bash", str(script)])
  assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  res = _run(["bash", str(script), "--help"], env={"DRY_RUN": "1"})
  assert res.returncode == 0 and "mae_jax" in res.stdout, res.stderr


# ---- TPU pod --------------------------------------------------------------------

POD = ["--name", "mae-test", "--zone", "us-central2-b", "--accelerator", "v4-32"]


def _tpu_dry_run(*args):
  res = _run(["bash", str(TPU_POD), *POD, "--dry-run", *args])
  assert res.returncode == 0, res.stderr
  header = [l for l in res.stdout.splitlines() if l.startswith("# tpu=")]
  commands = [shlex.split(l[len("DRY-RUN: "):])
              for l in res.stdout.splitlines() if l.startswith("DRY-RUN: ")]
  assert len(header) == 1 and commands, res.stdout
  return header[0], commands


def _remote_command(argv):
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  assert "mae-test" in argv and "--zone=us-central2-b" in argv
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return cmd


def test_tpu_train_runs_the_trainer_on_all_four_workers():
  overrides = ["--config.total_steps=1000", "--config.model.mask_ratio=0.6",
               '--config.optimizer={"name": "adamw"}']
  header, commands = _tpu_dry_run(
      "--workdir", "gs://bucket/runs/vitl8", "--env", "LIBTPU_INIT_ARGS=--a=1 --b",
      "train", *overrides)
  assert "workers=4" in header and "accelerator=v4-32" in header
  (argv,) = commands
  assert "--worker=all" in argv
  remote = _remote_command(argv)
  assert ("python -m mae_jax.main --config=configs/vitl8.py "
          "--workdir=gs://bucket/runs/vitl8") in remote
  # The remote shell gives the trainer exactly these arguments back.
  trainer = shlex.split(remote.split("nohup setsid ", 1)[1].split(" >> ")[0])
  assert trainer == ["python", "-m", "mae_jax.main", "--config=configs/vitl8.py",
                     "--workdir=gs://bucket/runs/vitl8", *overrides]
  assert "export LIBTPU_INIT_ARGS=" in remote and "train.pid" in remote


def test_tpu_lifecycle_commands():
  _, create = _tpu_dry_run("--spot", "create")
  assert create[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mae-test"]
  assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
          "--spot"} <= set(create[-1])

  _, setup = _tpu_dry_run("--data-bucket", "gs://my-data", "setup")
  assert setup[0][:2] == ["git", "-C"] and "archive" in setup[0]
  assert setup[1][4] == "scp" and "--worker=all" in setup[1]
  install = _remote_command(setup[2])
  assert "jax\\[tpu\\]==0.10.2" in install and "pip install -q -e" in install
  assert "gcsfuse --implicit-dirs -o ro my-data /mnt/data" in install
  assert "jax.distributed.initialize()" in _remote_command(setup[3])

  _, stop = _tpu_dry_run("stop")
  assert 'kill -TERM "$pid"' in _remote_command(stop[0])

  _, queued = _tpu_dry_run("--queued", "delete")
  assert queued[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


@pytest.mark.parametrize("args, message", [
    (["train"], "--workdir"),
    (["--workdir", "runs/x", "train"], "absolute path"),
    (["launch"], "unknown command"),
    (["--bogus", "status"], "unknown option"),
    (["status", "--config.x=1"], "only go with 'train'"),
])
def test_tpu_user_mistakes_exit_with_one_line(args, message):
  res = _run(["bash", str(TPU_POD), *POD, "--dry-run", *args])
  assert res.returncode != 0
  assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr


# ---- SLURM ----------------------------------------------------------------------

def _slurm_dry_run(env, *args):
  res = _run(["bash", str(SLURM), *args], env={"DRY_RUN": "1", **env})
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  (srun,) = [shlex.split(l[len("SRUN:"):]) for l in lines if l.startswith("SRUN:")]
  (exported,) = [dict(kv.split("=", 1) for kv in l[len("ENV:"):].split())
                 for l in lines if l.startswith("ENV:")]
  tasks = []
  for l in lines:
    if m := re.match(r"TASK (\d+): (.*) -> (.*)$", l):
      tasks.append((int(m[1]), dict(kv.split("=", 1) for kv in m[2].split()),
                    dict(kv.split("=", 1) for kv in m[3].split())))
  return srun, exported, tasks


def _jax_sees(task_env, exported):
  """What jax.distributed.initialize() derives from one task's environment."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  env = {**task_env, **{k: v for k, v in exported.items() if k.startswith("JAX_")}}
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)
  try:
    local = ([int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
             if "JAX_LOCAL_DEVICE_IDS" in env else None)
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, local, None, None)
  finally:
    os.environ.clear()
    os.environ.update(saved)


def test_slurm_two_nodes_eight_gpus_is_sixteen_processes():
  srun, exported, tasks = _slurm_dry_run(
      {"NODES": "2", "GPUS_PER_NODE": "8", "WORKDIR": "/shared/runs/vitl8"},
      "--config.total_steps=1000", "--config.model.mask_ratio=0.6")
  assert srun[0] == "srun"
  assert {"--nodes=2", "--ntasks-per-node=8", "--gpu-bind=none",
          "--kill-on-bad-exit=1"} <= set(srun)
  i = srun.index("python")
  assert srun[i:] == ["python", "-m", "mae_jax.main", "--config=configs/vitl8.py",
                      "--workdir=/shared/runs/vitl8", "--config.total_steps=1000",
                      "--config.model.mask_ratio=0.6"]
  assert "JAX_LOCAL_DEVICE_IDS" not in exported
  assert [t for t, _, _ in tasks] == list(range(16))
  for t, env, shown in tasks:
    assert env["SLURM_PROCID"] == str(t) and env["SLURM_NTASKS"] == "16"
    assert env["SLURM_LOCALID"] == str(t % 8) and env["SLURM_NODEID"] == str(t // 8)
    coordinator, nproc, pid, local = _jax_sees(env, exported)
    assert (coordinator, nproc, pid, local) == (
        shown["coordinator"], 16, t, [t % 8])
  assert len({shown["coordinator"] for _, _, shown in tasks}) == 1


def test_slurm_one_process_per_node_sees_all_local_gpus():
  srun, exported, tasks = _slurm_dry_run(
      {"NODES": "2", "GPUS_PER_NODE": "8", "TASKS_PER_NODE": "1"},
      "--dry-run", "--workdir=/shared/runs/x", "--config=configs/vitb16.py")
  assert "--ntasks-per-node=1" in srun and "--config=configs/vitb16.py" in srun
  assert exported["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  assert len(tasks) == 2
  for t, env, _ in tasks:
    assert _jax_sees(env, exported)[1:] == (2, t, list(range(8)))


@pytest.mark.parametrize("env, args, message", [
    ({}, [], "WORKDIR"),
    ({"WORKDIR": "runs/x"}, [], "absolute path"),
    ({"WORKDIR": "/x", "TASKS_PER_NODE": "3"}, [], "ntasks-per-node"),
    ({"WORKDIR": "/x"}, ["--bogus"], "unknown argument"),
])
def test_slurm_user_mistakes_exit_with_one_line(env, args, message):
  res = _run(["bash", str(SLURM), *args], env={"DRY_RUN": "1", **env})
  assert res.returncode != 0
  assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr


_FAKE_SRUN = r"""#!/bin/bash
# Two local "tasks"; like srun, forwards SIGTERM to them.
out=""; ntasks=2
while [[ "$1" == --* ]]; do [[ "$1" == --output=* ]] && out=${1#*=}; shift; done
pids=()
for t in $(seq 0 $((ntasks - 1))); do
  SLURM_PROCID=$t "$@" >> "${out//%t/$t}" 2>&1 & pids+=($!)
done
trap 'kill -TERM "${pids[@]}"' TERM
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  wait "$p" || rc=$?
done
exit $rc
"""

# Stands in for `python -m mae_jax.main`: the trainer's SIGTERM contract.
_FAKE_PYTHON = r"""#!/bin/bash
trap 'echo "{\"step\": 7, \"loss\": 0.5, \"status\": \"preempted\"}"; exit 0' TERM
echo $$ > "$WORKDIR/pid.$SLURM_PROCID"
echo "started $*"
for _ in $(seq "${FAKE_TICKS:-300}"); do sleep 0.05; done
echo '{"step": 100, "loss": 0.1, "status": "done"}'
"""


def _fake_job(tmp_path, ticks):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in [("srun", _FAKE_SRUN), ("python", _FAKE_PYTHON),
                     ("scontrol", '#!/bin/bash\necho "$*" >> "$SCONTROL_LOG"\n')]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
         "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "2",
         "SLURM_JOB_NODELIST": "gpu01", "SLURM_SUBMIT_DIR": str(tmp_path),
         "VENV": str(tmp_path / "no_venv"), "WORKDIR": str(tmp_path / "run"),
         "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "FAKE_TICKS": str(ticks)}
  env.pop("DRY_RUN", None)
  proc = subprocess.Popen(["bash", str(SLURM), "--config.total_steps=100"], env=env,
                          cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  return proc, tmp_path / "run" / "slurm_logs"


def _wait_started(proc, task_logs):
  deadline = time.time() + 20
  while not all(p.exists() and "started" in p.read_text() for p in task_logs):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
    time.sleep(0.05)


def test_slurm_job_forwards_sigterm_and_requeues(tmp_path):
  proc, logs = _fake_job(tmp_path, ticks=600)
  task_logs = [logs / f"4242.r0.task-{t}.log" for t in (0, 1)]
  _wait_started(proc, task_logs)
  proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  for p in task_logs:
    assert '"status": "preempted"' in p.read_text()
  assert "--config.total_steps=100" in task_logs[0].read_text()
  assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_slurm_manual_stop_of_the_tasks_saves_without_requeue(tmp_path):
  proc, logs = _fake_job(tmp_path, ticks=600)
  task_logs = [logs / f"4242.r0.task-{t}.log" for t in (0, 1)]
  _wait_started(proc, task_logs)
  for t in (0, 1):  # what `scancel --signal=TERM JOBID` does: tasks only
    os.kill(int((tmp_path / "run" / f"pid.{t}").read_text()), signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert "trainer status 'preempted'" in out
  assert not (tmp_path / "scontrol.log").exists()


def test_slurm_job_that_finishes_is_not_requeued(tmp_path):
  proc, logs = _fake_job(tmp_path, ticks=1)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert '"status": "done"' in (logs / "4242.r0.task-0.log").read_text()
  assert "trainer status 'done'" in out
  assert not (tmp_path / "scontrol.log").exists()
