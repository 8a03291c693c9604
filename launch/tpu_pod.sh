#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $VARS expand on the TPU workers
# Runs mae_jax on a Cloud TPU VM slice (v4-32, v5p-128, v6e-16, ...): create the
# slice, install the project on every worker, start/stop the trainer on all of
# them at once. See launch/README.md for the whole cycle.
#
# Usage: launch/tpu_pod.sh [options] COMMAND [--config.KEY=VALUE ...] [-- TRAINER_ARGS...]
#
# Commands:
#   create   create the slice (or reuse it when it already exists)
#   setup    copy a `git archive` of HEAD to every worker, make a Python 3.11
#            venv there, pip install "jax[tpu]" and the project, check devices
#   train    start `python -m mae_jax.main` on every worker in the background;
#            rerunning it with the same --workdir resumes from the newest checkpoint
#   status   slice state, and per worker whether the trainer runs + last log line
#   logs     last --lines lines of every worker's log
#   stop     SIGTERM the trainer on every worker: it saves a checkpoint and exits
#   delete   delete the slice (and its queued resource)
#
# Options (environment variable in brackets):
#   --name NAME           TPU name [TPU_NAME]                          (required)
#   --zone ZONE           zone, e.g. us-east5-a [TPU_ZONE]             (required)
#   --project PROJECT     Google Cloud project [TPU_PROJECT] (default: gcloud's)
#   --accelerator TYPE    accelerator type [TPU_ACCELERATOR] (default v5p-128)
#   --version RUNTIME     TPU software version [TPU_RUNTIME] (default: by family)
#   --spot                spot capacity (cheaper, can be preempted)
#   --queued              create through a queued resource (waits for capacity)
#   --config FILE         trainer config (default configs/vitl8.py)
#   --workdir DIR         gs://bucket/run (shared by all workers) [WORKDIR]
#   --data-bucket BUCKET  setup mounts gs://BUCKET read-only with gcsfuse ...
#   --data-mount DIR      ... at DIR on every worker (default /mnt/data)
#   --jax-version V       jax[tpu] version installed by setup (default 0.10.2)
#   --env KEY=VALUE       exported for the trainer (repeatable), e.g. LIBTPU_INIT_ARGS=...
#   --lines N             lines shown by `logs` (default 20)
#   --dry-run             print every command, one per line prefixed "DRY-RUN: ",
#                         and run nothing
#   -h, --help            this text
#
# Example:
#   launch/tpu_pod.sh --name mae --zone us-east5-a --accelerator v5p-128 --spot create
#   launch/tpu_pod.sh --name mae --zone us-east5-a --data-bucket my-rxrx3 setup
#   launch/tpu_pod.sh --name mae --zone us-east5-a --workdir gs://my-runs/vitl8 train \
#     --config.data.manifest=/mnt/data/rxrx3/manifest.json --config.total_steps=200000
set -euo pipefail

readonly REMOTE_SRC='$HOME/mae_jax_src'
readonly REMOTE_VENV='$HOME/mae_jax_venv'
readonly REMOTE_LOGS='$HOME/mae_jax_logs'
readonly TARBALL_NAME=mae_jax_src.tar.gz

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
usage() { sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; }

# Words joined so that `shlex.split` / bash give the same argv back.
quote_words() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$w "
    else
      out+="'${w//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

run() {
  if (( DRY_RUN )); then
    printf 'DRY-RUN: %s\n' "$(quote_words "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_words "$@")" >&2
  "$@"
}

# TPU VM workers (hosts) of an accelerator type: v2/v3/v4/v5p names count
# TensorCores (8 per host), v5e/v6e names count chips (4 per host, 1 host <= 8).
workers_for() {
  local family=${1%-*} size=${1##*-}
  [[ "$size" =~ ^[0-9]+$ ]] || { echo "?"; return; }
  case "$family" in
    v2|v3|v4|v5p) echo $(( size <= 8 ? 1 : size / 8 )) ;;
    v5litepod|v5e|v6e) echo $(( size <= 8 ? 1 : size / 4 )) ;;
    *) echo "?" ;;
  esac
}

default_runtime() {
  case "${1%-*}" in
    v6e) echo v2-alpha-tpuv6e ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5litepod|v5e) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# ---- arguments ---------------------------------------------------------------
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-v5p-128}
RUNTIME=${TPU_RUNTIME:-}
WORKDIR=${WORKDIR:-}
CONFIG=configs/vitl8.py
SPOT=0
QUEUED=0
DRY_RUN=${DRY_RUN:-0}
DATA_BUCKET=""
DATA_MOUNT=/mnt/data
JAX_VERSION=0.10.2
LINES=20
COMMAND=""
TRAINER_ARGS=()
TRAINER_ENV=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --config.*) TRAINER_ARGS+=("$1") ;;
    --) shift; TRAINER_ARGS+=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --name) need_value "$@"; NAME=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --accelerator|--accelerator-type) need_value "$@"; ACCELERATOR=$2; shift ;;
    --version|--runtime-version) need_value "$@"; RUNTIME=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --data-bucket) need_value "$@"; DATA_BUCKET=${2#gs://}; shift ;;
    --data-mount) need_value "$@"; DATA_MOUNT=$2; shift ;;
    --jax-version) need_value "$@"; JAX_VERSION=$2; shift ;;
    --lines) need_value "$@"; LINES=$2; shift ;;
    --env)
      need_value "$@"
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$2'"
      TRAINER_ENV+=("$2"); shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *)
      [[ -z "$COMMAND" ]] || die "one command at a time, got '$COMMAND' and '$1'"
      COMMAND=$1 ;;
  esac
  shift
done

case "$COMMAND" in
  create|setup|train|status|logs|stop|delete) ;;
  "") die "missing COMMAND: create|setup|train|status|logs|stop|delete (see --help)" ;;
  *) die "unknown command '$COMMAND': expected create|setup|train|status|logs|stop|delete" ;;
esac
[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines expects a number, got '$LINES'"
[[ -n "$RUNTIME" ]] || RUNTIME=$(default_runtime "$ACCELERATOR")
if [[ ${#TRAINER_ARGS[@]} -gt 0 && "$COMMAND" != train ]]; then
  die "trainer arguments (${TRAINER_ARGS[0]} ...) only go with 'train'"
fi
WORKERS=$(workers_for "$ACCELERATOR")

GCLOUD_SCOPE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_SCOPE+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

on_all_workers() {  # REMOTE_COMMAND
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --command="$1"
}

# ---- commands ------------------------------------------------------------------
cmd_create() {
  # Reuse: the queued resource (which may still be waiting) or the VM itself.
  local describe=("${TPU[@]}" describe "$NAME" "${GCLOUD_SCOPE[@]}" --format='value(state)')
  (( ! QUEUED )) ||
    describe=("${QR[@]}" describe "$NAME" "${GCLOUD_SCOPE[@]}" --format='value(state.state)')
  if (( DRY_RUN )); then
    echo "# create is skipped when this describe succeeds:"
    run "${describe[@]}"
  elif "${describe[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: $NAME already exists in $ZONE; reusing it" >&2
    (( ! QUEUED )) || wait_queued_active
    return 0
  fi
  local extra=()
  (( ! SPOT )) || extra+=(--spot)
  if (( QUEUED )); then
    run "${QR[@]}" create "$NAME" "${GCLOUD_SCOPE[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      ${extra[@]+"${extra[@]}"}
    wait_queued_active
  else
    run "${TPU[@]}" create "$NAME" "${GCLOUD_SCOPE[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
      ${extra[@]+"${extra[@]}"}
  fi
}

wait_queued_active() {
  local state=""
  if (( DRY_RUN )); then
    echo "# polled every 60 s until ACTIVE:"
    run "${QR[@]}" describe "$NAME" "${GCLOUD_SCOPE[@]}" --format='value(state.state)'
    return 0
  fi
  while :; do
    state=$("${QR[@]}" describe "$NAME" "${GCLOUD_SCOPE[@]}" --format='value(state.state)')
    echo "tpu_pod.sh: queued resource $NAME is $state" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED) die "queued resource $NAME ended in state $state" ;;
    esac
    sleep 60
  done
}

cmd_setup() {
  local repo
  repo=$(cd "$(dirname "$0")/.." && pwd)
  TARBALL="${TMPDIR:-/tmp}/$TARBALL_NAME.$$"
  if (( ! DRY_RUN )); then
    trap 'rm -f "$TARBALL"' EXIT
    [[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ]] ||
      echo "tpu_pod.sh: warning: uncommitted changes are not shipped (git archive HEAD)" >&2
  fi
  run git -C "$repo" archive --format=tar.gz --output="$TARBALL" HEAD
  run "${TPU[@]}" scp "$TARBALL" "$NAME:$TARBALL_NAME" "${GCLOUD_SCOPE[@]}" --worker=all
  local mount=""
  if [[ -n "$DATA_BUCKET" ]]; then
    mount=$(printf '%s' \
      'if ! command -v gcsfuse >/dev/null; then ' \
      'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; ' \
      'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; ' \
      'sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; ' \
      "sudo mkdir -p $(printf '%q' "$DATA_MOUNT") && sudo chown \"\$USER\" $(printf '%q' "$DATA_MOUNT"); " \
      "mountpoint -q $(printf '%q' "$DATA_MOUNT") || gcsfuse --implicit-dirs -o ro " \
      "$(printf '%q %q' "$DATA_BUCKET" "$DATA_MOUNT"); ")
  fi
  # A venv with uv's Python 3.11: the TPU images ship Ubuntu 22.04's Python 3.10,
  # and jax 0.10.2 needs >= 3.11. Reruns reuse the venv and replace the source.
  on_all_workers "set -e; ${mount}python3 -m pip install --user -q uv; \
[ -x $REMOTE_VENV/bin/python ] || \$HOME/.local/bin/uv venv -q --seed --python 3.11 $REMOTE_VENV; \
rm -rf $REMOTE_SRC && mkdir -p $REMOTE_SRC $REMOTE_LOGS && tar -xzf \$HOME/$TARBALL_NAME -C $REMOTE_SRC; \
$REMOTE_VENV/bin/pip install -q -U pip $(printf '%q' "jax[tpu]==$JAX_VERSION") && \
$REMOTE_VENV/bin/pip install -q -e $REMOTE_SRC"
  # All workers must run this together: device_count() spans the whole slice.
  on_all_workers "$REMOTE_VENV/bin/python -c 'import jax; jax.distributed.initialize(); \
print(f\"worker {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, {jax.device_count()} total devices\")'"
}

cmd_train() {
  [[ -n "$WORKDIR" ]] || die "train needs --workdir gs://BUCKET/RUN (or WORKDIR)"
  if [[ "$WORKDIR" != gs://* ]]; then
    [[ "$WORKDIR" == /* ]] || die "--workdir must be gs://... or an absolute path on storage shared by all workers, got '$WORKDIR'"
    echo "tpu_pod.sh: warning: $WORKDIR must be one storage shared by all $WORKERS workers (Orbax writes from each)" >&2
  fi
  local exports="" kv trainer
  for kv in ${TRAINER_ENV[@]+"${TRAINER_ENV[@]}"}; do
    exports+="export ${kv%%=*}=$(printf '%q' "${kv#*=}"); "
  done
  trainer=$(printf '%q ' python -m mae_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
    ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})
  # Detached (nohup + setsid) so the ssh session may end; one log and pid file
  # per worker; a second `train` while one runs is refused rather than doubled.
  on_all_workers "cd $REMOTE_SRC && mkdir -p $REMOTE_LOGS && \
if [ -f $REMOTE_LOGS/train.pid ] && kill -0 \"\$(cat $REMOTE_LOGS/train.pid)\" 2>/dev/null; then \
echo \"\$(hostname): trainer already running (pid \$(cat $REMOTE_LOGS/train.pid))\" >&2; exit 1; fi; \
. $REMOTE_VENV/bin/activate; ${exports}\
echo \"=== \$(date -u +%FT%TZ) start\" >> $REMOTE_LOGS/train.log; \
nohup setsid ${trainer% } >> $REMOTE_LOGS/train.log 2>&1 < /dev/null & \
echo \$! > $REMOTE_LOGS/train.pid; echo \"\$(hostname): trainer pid \$!, log ~/mae_jax_logs/train.log\""
}

cmd_status() {
  run "${TPU[@]}" describe "$NAME" "${GCLOUD_SCOPE[@]}" \
    --format='value(state,health,acceleratorType)'
  on_all_workers "pid=\$(cat $REMOTE_LOGS/train.pid 2>/dev/null || true); \
if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then s=running; else s=stopped; fi; \
echo \"\$(hostname) trainer=\$s pid=\${pid:-none} last: \$(tail -n 1 $REMOTE_LOGS/train.log 2>/dev/null)\""
}

cmd_logs() {
  on_all_workers "tail -n $LINES $REMOTE_LOGS/train.log 2>/dev/null | sed \"s/^/[\$(hostname)] /\""
}

cmd_stop() {
  # Every worker gets SIGTERM; JAX's preemption sync makes them agree on one
  # step, the trainer saves it and exits 0 with status "preempted".
  on_all_workers "pid=\$(cat $REMOTE_LOGS/train.pid 2>/dev/null || true); \
if [ -z \"\$pid\" ] || ! kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): not running\"; exit 0; fi; \
kill -TERM \"\$pid\"; for _ in \$(seq 600); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; \
if kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): pid \$pid still running after 600 s\" >&2; exit 1; fi; \
echo \"\$(hostname): stopped; \$(tail -n 1 $REMOTE_LOGS/train.log)\""
}

cmd_delete() {
  if (( QUEUED )); then
    run "${QR[@]}" delete "$NAME" "${GCLOUD_SCOPE[@]}" --force
  else
    run "${TPU[@]}" delete "$NAME" "${GCLOUD_SCOPE[@]}"
  fi
}

echo "# tpu=$NAME zone=$ZONE accelerator=$ACCELERATOR runtime=$RUNTIME workers=$WORKERS command=$COMMAND"
"cmd_$COMMAND"
