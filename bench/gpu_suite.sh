#!/usr/bin/env bash
# The GPU check of mae_jax in one go (<= 10 minutes on one 80-140 GB GPU), for a machine that is
# lent for a short while: the yardsticks, the bf16 train step of ViT-S/16, ViT-B/16 and ViT-L/8
# (with MFU against the chip's spec peak), the ViT-S/16 embedding, and the demo at GPU speed.
# Each step runs under `timeout`; a failing step is reported and the next one still runs.
#
# Usage: bash bench/gpu_suite.sh        (from anywhere; it runs in the repository root)
#
# Environment (defaults in brackets):
#   OUT            folder for gpu_suite.jsonl and one log per step [a new temp folder]
#   PYTHON         the python that runs the repository, jax with CUDA [python]
#   S16_BATCH B16_BATCH L8_BATCH   train-step batches of vits16, vitb16, vitl8 [1024 512 128]:
#                  the largest powers of two that leave room on an 80 GB GPU (bfloat16, scanned
#                  layers, cuDNN attention); raise them on a 141 GB H200
#   TRAIN_STEPS    timed train steps per model [5]
#   EMBED_BATCH    embedding batch [256]
#   DEMO_MINUTES   the demo's training budget [2]
#   DEMO_WORKERS   the demo's processes for rendering, sharding and pixel statistics [the host's
#                  cores, at most 16]: its CPU stages take ~4 minutes with the demo's own 2
#   T_COMMON T_TRAIN T_EMBED T_DEMO   per-step timeouts in seconds [45 180 75 270]: 570 s in all
#   DRY_RUN=1      print every command above ("DRY-RUN: " + the command, one per line), then run a
#                  tiny smoke version of the benchmarks on the CPU in seconds instead (CI: the
#                  scripts this calls still parse their flags and print JSON)
#
# Output: every JSON line the steps print, on stdout and in $OUT/gpu_suite.jsonl, plus one line
# per step {"suite_step", "rc", "seconds", "json_lines"} there; on stdout one summary line per
# step ("gpu_suite: NAME ok|FAILED|TIMED OUT ..."). Exit status: 0 when every step passed, else 1.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p;}' "$0"
  exit 0
fi

PYTHON=${PYTHON:-python}
if ! command -v "$PYTHON" >/dev/null; then
  PYTHON=python3
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}
mkdir -p "$OUT" || exit 2
JSONL="$OUT/gpu_suite.jsonl"
: >"$JSONL"
failures=0

# run_step NAME TIMEOUT_S COMMAND...: runs it, keeps its JSON lines, prints one summary line.
run_step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" start rc lines status
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >"$log.stdout" 2>"$log"
  rc=$?
  grep '^{' "$log.stdout" | tee -a "$JSONL"
  lines=$(grep -c '^{' "$log.stdout")
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (rc $rc): $(tail -n 1 "$log")" ;;
  esac
  [[ $rc == 0 ]] || failures=$((failures + 1))
  printf '{"suite_step": "%s", "rc": %d, "seconds": %d, "json_lines": %d}\n' \
    "$name" "$rc" "$((SECONDS - start))" "$lines" >>"$JSONL"
  echo "gpu_suite: $name $status in $((SECONDS - start)) s, $lines JSON lines (log: $log)"
}

s16=${S16_BATCH:-1024}
b16=${B16_BATCH:-512}
l8=${L8_BATCH:-128}
train_steps=${TRAIN_STEPS:-5}
embed_batch=${EMBED_BATCH:-256}
demo_minutes=${DEMO_MINUTES:-2}
cores=$(nproc 2>/dev/null || echo 2)
demo_workers=${DEMO_WORKERS:-$((cores < 16 ? cores : 16))}

# The full-scale commands, one array each.
# bench.common: 8192^2 products, since a 2048^2 one is bound by dispatch on a GPU.
common_cmd=("$PYTHON" -m bench.common --n=8192)
# --threads=0: leave the host pools alone (the batches live on the GPU).
train_cmd=("$PYTHON" -m bench.train_step
  "--runs=vits16:bfloat16:$s16,vitb16:bfloat16:$b16,vitl8:bfloat16:$l8"
  "--steps=$train_steps" --threads=0)
embed_cmd=("$PYTHON" -m bench.embed --config=vits16 --precision=bfloat16
  "--batch=$embed_batch" --seconds=10)
demo_cmd=("$PYTHON" -m mae_jax.demo "--out=$OUT/demo" "--budget_minutes=$demo_minutes"
  "--workers=$demo_workers")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for step in "common ${T_COMMON:-45}" "train ${T_TRAIN:-180}" "embed ${T_EMBED:-75}" \
    "demo ${T_DEMO:-270}"; do
    ref="${step% *}_cmd[@]"
    words=("${!ref}")
    echo "DRY-RUN: timeout ${step#* } ${words[*]@Q}"
  done
  echo "gpu_suite: DRY_RUN: a tiny smoke run on the CPU instead, JSON to $JSONL"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  run_step smoke_common 60 "$PYTHON" -m bench.common --n=128 --repeats=1
  run_step smoke_train_step 90 "$PYTHON" -m bench.train_step --runs=tiny:float32:2 --steps=1
  run_step smoke_embed 90 "$PYTHON" -m bench.embed --config=tiny --batch=4 --seconds=1
  run_step smoke_demo_flags 60 "$PYTHON" -m mae_jax.demo --help
else
  echo "gpu_suite: JSON lines to $JSONL"
  run_step common "${T_COMMON:-45}" "${common_cmd[@]}"
  run_step train_step "${T_TRAIN:-180}" "${train_cmd[@]}"
  run_step embed "${T_EMBED:-75}" "${embed_cmd[@]}"
  run_step demo "${T_DEMO:-270}" "${demo_cmd[@]}"
fi
echo "gpu_suite: $failures step(s) failed; all JSON lines in $JSONL"
[[ $failures == 0 ]]
