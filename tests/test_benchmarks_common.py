"""benchmarks/common.py: XLA's FLOP and memory accounting of a compiled step, the train-step call
protocol of `time_step` (state donated and carried), and the markdown table. No timing asserted."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common


def test_xla_flops_and_bytes_of_a_matmul():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert common.xla_flops(compiled) == 2 * 64 * 32 * 16
  assert common.compiled_bytes(compiled) >= 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_time_step_carries_a_donated_state():
  step = jax.jit(lambda state, x: (state + x, jnp.sum(state)), donate_argnums=(0,))
  timing, (state, total) = common.time_step(
      step, (jnp.zeros(3), jnp.ones(3)), steps=3, warmup=2,
      carry=lambda args, outputs: (outputs[0], args[1]))
  np.testing.assert_array_equal(state, np.full(3, 5.0))  # 2 warm-up + 3 timed calls
  assert float(total) == 12.0  # the last call saw the state after 4 calls
  assert len(timing.times) == 3 and timing.seconds == float(np.median(timing.times))
  assert timing.flops > 0 and timing.compile_s > 0
  # The state (3 floats) is donated: its bytes are counted once, as an argument.
  assert timing.xla_bytes < 4 * 3 * 3 + 4 + 64


def test_markdown_table():
  table = common.markdown_table(["a", "b"], [["1", "2"], [3, "resize(8)|flip_lr"]])
  assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |",
                                "| 3 | resize(8)\\|flip_lr |"]
  with pytest.raises(ValueError, match="3 cells; the header has 2"):
    common.markdown_table(["a", "b"], [["1", "2", "3"]])


def test_run_all_wall_table_splits_each_method_and_sums_them():
  from benchmarks import run_all
  row = lambda compile_s: dict(compile_s=compile_s)
  results = {
      "vpt": dict(wall_s=80.0, build_s=20.0, rows=[row(8.0), row(3.0)]),
      "rpl": dict(wall_s=50.0, build_s=10.0, rows=[row(5.0), row(None)]),  # retrieve: no compile
      "glip": {"error": "over --row_timeout=600 s"},  # a failed row is left out of the sums
  }
  lines = run_all.format_wall_table(results).splitlines()
  assert lines[2] == f"| {run_all.METHODS['vpt'].label} | 80 | 20 | 11 | 49 |"
  assert lines[3] == f"| {run_all.METHODS['rpl'].label} | 50 | 10 | 5 | 35 |"
  assert lines[4] == "| all | 130 | 30 | 16 | 84 |"
  assert len(lines) == 5
