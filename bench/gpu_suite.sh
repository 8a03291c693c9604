#!/usr/bin/env bash
# The GPU check of mae_jax in one go, for a machine that is lent for a short while: the
# yardsticks, the bf16 train step of ViT-S/16, ViT-B/16 and ViT-L/8 (with MFU against the chip's
# spec peak), the ViT-S/16 embedding, and the demo at GPU speed. Each step runs under `timeout`;
# a failing step is reported and the next one still runs. At most 12.5 minutes: on an H200 (16
# host cores) each train step took ~2 minutes to compile (S/16 125 s, B/16 111 s: XLA's GEMM
# autotuning; XLA_FLAGS=--xla_gpu_autotune_level=0 would shorten it, not measured here).
#
# Usage: bash bench/gpu_suite.sh        (from anywhere; it runs in the repository root)
#
# Environment (defaults in brackets):
#   OUT            folder for gpu_suite.jsonl and one log per step [a new temp folder]
#   PYTHON         the python that runs the repository, jax with CUDA [python]
#   S16_BATCH B16_BATCH L8_BATCH   train-step batches of vits16, vitb16, vitl8 [1024 512 128]:
#                  S/16 at 1024 and B/16 at 512 ran on an H200 (bfloat16, scanned layers);
#                  L/8 at 128 asked for 125 GiB there while attention stored its scores, and
#                  needs cuDNN's flash attention (mae_jax/models/vit.py), now the default
#   TRAIN_STEPS    timed train steps per model [5]
#   EMBED_BATCH    embedding batch [256]
#   DEMO_MINUTES   the demo's training budget [1]
#   DEMO_WORKERS   the demo's processes for rendering, sharding and pixel statistics [the host's
#                  cores, at most 16]: on 2 workers its CPU stages took ~4 minutes
#   T_COMMON T_TRAIN T_EMBED T_DEMO   per-step timeouts in seconds [30 420 60 240]: 750 s in all
#                  (on an H200: common 17 s; the S/16 + B/16 compiles 236 s; embed 48 s)
#   MAE_JAX_CACHE  the demo's annotation wheel: an offline host needs it there (the demo's error
#                  line says which file; docs/data_layouts.md §7)
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
demo_minutes=${DEMO_MINUTES:-1}
t_common=${T_COMMON:-30} t_train=${T_TRAIN:-420} t_embed=${T_EMBED:-60} t_demo=${T_DEMO:-240}
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
  for step in "common $t_common" "train $t_train" "embed $t_embed" "demo $t_demo"; do
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
  run_step common "$t_common" "${common_cmd[@]}"
  run_step train_step "$t_train" "${train_cmd[@]}"
  run_step embed "$t_embed" "${embed_cmd[@]}"
  run_step demo "$t_demo" "${demo_cmd[@]}"
fi
echo "gpu_suite: $failures step(s) failed; all JSON lines in $JSONL"
[[ $failures == 0 ]]
