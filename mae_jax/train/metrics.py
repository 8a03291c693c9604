"""WORKDIR/metrics.jsonl, TensorBoard scalars and the progress line of a run (process 0 only)."""
import json

import jax
from etils import epath

from mae_jax.train import ConfigError
from mae_jax.util import files


def is_primary():
  return jax.process_index() == 0


def print_primary(*args):
  if is_primary():
    print(*args, flush=True)


_NOT_TERMS = {"step", "loss", "lr", "grad_norm", "step_time_s", "images_per_s", "gflops_per_s",
              "mfu", "skipped_records"}


class MetricsLog:
  """metrics.jsonl + TensorBoard (tb/) + a progress line; written by process 0 only.

  On resume, records after the restored step (logged by the interrupted run) are dropped so the
  file holds one record per logged step.
  """

  def __init__(self, workdir: epath.Path, start_step: int, total_steps: int):
    self.total, self.writer, self.path = total_steps, None, workdir / "metrics.jsonl"
    self.lines = []
    if not is_primary():
      return
    if self.path.exists():
      self.lines = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l)["step"] <= start_step]
    self._rewrite()
    self.local = "://" not in str(self.path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    try:  # gs:// needs google-cloud-storage, s3:// boto3
      self.writer = SummaryWriter(str(workdir / "tb"))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"TensorBoard cannot write to {workdir / 'tb'}: {e}") from None

  def _rewrite(self):
    files.write(self.path, "".join(l + "\n" for l in self.lines))

  def last_loss(self):
    return json.loads(self.lines[-1])["loss"] if self.lines else None

  def write(self, record: dict):
    if not is_primary():
      return
    line = json.dumps(record)
    self.lines.append(line)
    if self.local:
      with self.path.open("a") as f:
        f.write(line + "\n")
    else:  # object stores cannot append
      self._rewrite()
    for key, value in record.items():
      if key != "step":
        self.writer.add_scalar(key, value, record["step"])
    self.writer.flush()
    rate = f" {record['images_per_s']:.1f} img/s {record['step_time_s']:.3f} s/step" \
        if "images_per_s" in record else ""
    mfu = f" mfu {record['mfu']:.3f}" if "mfu" in record else ""
    # The model kind's own terms (mse/fourier, or cross_entropy/accuracy), in the step's order.
    terms = "".join(f" {k} {v:.5g}" for k, v in record.items() if k not in _NOT_TERMS)
    print(f"step {record['step']}/{self.total} loss {record['loss']:.5f}{terms} lr "
          f"{record['lr']:.3g} grad_norm {record['grad_norm']:.3f}{rate}{mfu}", flush=True)

  def close(self):
    if self.writer is not None:
      self.writer.close()
