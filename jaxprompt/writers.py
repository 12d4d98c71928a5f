"""Metric writers (clu: TensorBoard + stdout), a progress line with steps/s and ETA, final JSON."""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable

import jax
from clu import metric_writers


def create_writer(workdir: str):
  """TensorBoard event files in `workdir` and log lines, on process 0 only (others just log)."""
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


class Progress:
  """Prints `step k/N | metrics | x steps/s | ETA` lines; times between calls."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    values = " | ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    return (f"step {step}/{self.total_steps} | {values} | {rate:.2f} steps/s | "
            f"ETA {_format_seconds(eta)}")


def _format_seconds(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def write_atomic(path: str, write: Callable) -> str:
  """Calls write(binary file) on a temporary file next to `path`, then renames it to `path`: a
  reader never sees half a file, and a failed write leaves nothing. The file gets the permissions
  a plain open() would (mkstemp's are private)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                 suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, path)
  except BaseException:
    os.unlink(partial)
    raise
  return path


def write_json_atomic(path: str, data) -> None:
  """`data` as indented JSON, written atomically (`write_atomic`)."""
  write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode()))
