"""Where the train step spends its time, by op class, from a jax.profiler trace of the real step.

  python -m bench.profile_step [--config=vits16] [--batch=16] [--precision=float32] [--threads=2]
                               [--steps=3] [--scan_layers=config|true|false]

The step (bench/train_step.py: build) runs --steps times under `jax.profiler.trace`; every
executed HLO op (a thunk of XLA:CPU's runtime, a kernel on GPU) is put in one class from its
opcode and the named scopes of the model code (vit.attention, LayerNorm, gelu, masking,
reconstruction_loss, the optimizer update in mae_jax/train/step.py), forward and backward alike:

  matmul            dense projections (dots outside attention)
  attention_matmul  q k^T and weights @ v
  attention_other   softmax, scaling, head transposes inside attention
  layernorm, gelu, fourier_fft, loss_other, masking (argsort, gathers and their scatters),
  optimizer         the Lion / AdamW update, clipping, weight decay
  copies            copies and transposes outside the scopes above
  other             the rest (residual adds, casts, patchify, ...)

One JSON line per class {"op_class", "ms_per_step", "share", "top" (its 3 costliest ops with
their source op names)} (share of the summed op time, which exceeds the wall time when ops run
concurrently on several threads; the trace itself slows the step), then
{"summary", "step_s", "op_ms_per_step", "concurrency", "top_ops"}.
"""
import collections
import glob
import os
import re
import tempfile
import time

from bench import common
from mae_jax.util import cli

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
CLASSES = ("matmul", "attention_matmul", "attention_other", "layernorm", "gelu", "fourier_fft",
           "loss_other", "masking", "optimizer", "copies", "other")


def parse_hlo(text):
  """{instruction: (opcode, op_name, opcodes of what it calls, recursively)} of an HLO module."""
  computations, current, instructions = collections.defaultdict(set), None, {}
  calls = collections.defaultdict(set)
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name, opcode, rest = m.groups()
      op_name = _OP_NAME.search(rest)
      callees = set(_CALLS.findall(rest))
      instructions[name] = (opcode, op_name.group(1) if op_name else "", callees)
      if current:
        computations[current].add(opcode)
        calls[current] |= callees
      continue
    c = _COMPUTATION.match(line)
    if c and "=" not in line.split("{")[0]:
      current = c.group(1)

  def inner(comps, seen):
    out = set()
    for comp in comps - seen:
      seen.add(comp)
      out |= computations.get(comp, set()) | inner(calls.get(comp, set()), seen)
    return out

  return {n: (op, name, inner(callees, set())) for n, (op, name, callees) in instructions.items()}


def classify(opcode, op_name, inside) -> str:
  ops = {opcode} | inside
  has_dot = bool(ops & {"dot", "convolution"}) or (opcode == "custom-call" and "dot" in op_name)
  scopes = set(re.split(r"[/()]", op_name))
  if "optimizer" in scopes:
    return "optimizer"
  if "fft" in ops:
    return "fourier_fft"
  if "attention" in scopes:
    return "attention_matmul" if has_dot else "attention_other"
  if has_dot:
    return "matmul"
  for scope in ("layernorm", "gelu", "masking"):
    if scope in scopes:
      return scope
  if "reconstruction_loss" in scopes:
    return "loss_other"
  if ops & {"gather", "scatter", "sort"}:
    return "masking"
  if opcode in ("copy", "transpose"):
    return "copies"
  return "other"


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="vits16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--scan_layers", choices=("config", "true", "false"), default="config")
  args = p.parse_args(argv)
  if args.threads:
    common.configure_threads(args.threads)
  # XLA:GPU replays most kernels as CUDA graphs (command buffers). On an H200 only the kernels
  # outside them (cuFFT) were attributed to an HLO op, so profile without them (inert on the CPU;
  # the step runs slower on a GPU so: a caveat on step_s there).
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  import jax  # pylint: disable=g-import-not-at-top
  from bench import train_step  # pylint: disable=g-import-not-at-top
  scan = None if args.scan_layers == "config" else args.scan_layers == "true"
  step, (state, data, rng), _, _ = train_step.build(args.config, args.precision, args.batch, scan)
  ops = parse_hlo(step.as_text())
  state, metrics = step(state, data, rng)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, data, rng)
        jax.block_until_ready((state, metrics))
      step_s = (time.perf_counter() - start) / args.steps
    profile = jax.profiler.ProfileData.from_file(
        sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1])
    per_class, per_op = collections.Counter(), collections.Counter()
    # On an accelerator the host plane holds each kernel's launch under the same hlo_op: count
    # only the device planes' kernels there.
    on_cpu = jax.default_backend() == "cpu"
    planes = [p for p in profile.planes if on_cpu or p.name.startswith("/device:")]
    for plane in planes:
      for line in plane.lines:
        for event in line.events:
          name = dict(event.stats).get("hlo_op")
          if not name or name not in ops or ops[name][0] in CONTAINERS:
            continue
          ms = event.duration_ns / 1e6 / args.steps
          per_class[classify(*ops[name])] += ms
          per_op[name] += ms
  total = sum(per_class.values())
  for c in CLASSES:
    top = [(n, ms) for n, ms in per_op.most_common() if classify(*ops[n]) == c][:3]
    common.emit(op_class=c, ms_per_step=round(per_class[c], 2),
                share=round(per_class[c] / total, 4) if total else None,
                top=[{"op": n, "ms": round(ms, 1), "source": ops[n][1].split("/", 1)[-1][-60:]}
                     for n, ms in top])
  common.emit(summary=True, config=args.config, batch=args.batch, precision=args.precision,
              threads=args.threads, step_s=round(step_s, 4), op_ms_per_step=round(total, 1),
              concurrency=round(total / 1e3 / step_s, 2),
              top_ops=[{"op": n, "class": classify(*ops[n]), "ms": round(ms, 2)}
                       for n, ms in per_op.most_common(12)],
              device=common.device_description())


if __name__ == "__main__":
  cli.run(main, absl_flags=False, keep_freed_memory=True)
