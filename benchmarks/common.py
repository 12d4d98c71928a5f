"""What every benchmark here measures the same way: the matmul peak, a compiled step's XLA FLOPs and
memory, step times, the process's peak memory, and the markdown table they are printed in.

  * FLOPs are XLA's cost analysis of the compiled function (dots at 2 x MACs, one per elementwise
    op), so work XLA removes (weight gradients of frozen params) is not counted; MFU is that
    count over the measured time against `matmul_peak_flops`, measured on the same machine in the
    same run.
  * XLA memory is the compiled function's arguments + temporaries + outputs, less the arguments
    its outputs alias (donated state): what the step needs on a device.
  * Peak memory is the device's `peak_bytes_in_use` where the backend reports it (GPU/TPU), the
    process's maximum resident set size otherwise (CPU): the peak over everything run so far.

Used by benchmarks/train_step.py, glip.py, dgl.py, tta.py and run_all.py.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2**30


def best_seconds(fn: Callable, repeats: int) -> float:
  """The least wall time of `repeats` calls of `fn` (its outputs waited for); inf for 0 calls."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def median_seconds(fn: Callable, steps: int) -> float:
  """The median wall time of `steps` calls of `fn` (its outputs waited for)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_peak_flops(n: int, dtype, repeats: int = 10) -> float:
  """Best FLOP/s of an n x n @ n x n matmul in `dtype` on the default device."""
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), dtype) for i in range(2))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  return 2 * n**3 / best_seconds(lambda: matmul(a, b), repeats)


def xla_flops(compiled) -> float:
  """XLA's FLOP count of a compiled function (0 where the backend reports none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def compiled_bytes(compiled) -> int:
  """XLA's memory of a compiled function: arguments + temporaries + outputs - aliased."""
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.temp_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def peak_memory_bytes() -> tuple[int, str]:
  """(bytes, what they are): the device's peak where reported, else the process's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def load_now() -> str:
  return "load " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


@dataclasses.dataclass
class StepTiming:
  """One compiled step: XLA's FLOPs and memory, compile time, and the median of the timed calls."""
  flops: float
  xla_bytes: int
  compile_s: float
  seconds: float
  times: list

  def achieved(self) -> float:
    return self.flops / self.seconds


def time_step(jitted, args: tuple, *, steps: int, warmup: int = 1,
              carry: Callable | None = None) -> tuple[StepTiming, object]:
  """Lowers and compiles `jitted` at `args`, then calls it `warmup` + `steps` times and keeps the
  median of the last `steps`; returns the timing and the last call's outputs. `carry(args,
  outputs) -> args` makes the next call's arguments (a train step's new state, its input
  donated); without it every call gets `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  times = []
  for call in range(warmup + steps):
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled(*args))
    if call >= warmup:
      times.append(time.perf_counter() - start)
    if carry is not None:
      args = carry(args, outputs)
  return StepTiming(xla_flops(compiled), compiled_bytes(compiled), compile_s,
                    float(np.median(times)), times), outputs


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub markdown table; every row must have the header's length; '|' in a cell (a pp
  spec) is escaped."""
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f"Row {list(row)} has {len(row)} cells; the header has {len(header)}.")
  line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])
