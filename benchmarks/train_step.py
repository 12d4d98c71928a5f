"""Throughput of one real train step: images/s, achieved FLOP/s, MFU and peak memory.

  python benchmarks/train_step.py                       # VPT-deep ViT-B/16, 224 px, batch 8
  python benchmarks/train_step.py --config=configs/vpt_vtab.py:shallow --batch_size=16
  python benchmarks/train_step.py --config.compute_dtype=bfloat16

The step timed is exactly the trainer's (`jaxprompt.train.build(config).train_step`): forward,
backward through the frozen backbone to the prompts, optimizer update. FLOPs are XLA's count for
the compiled step (`cost_analysis`), so work XLA removes (weight gradients of frozen params) is not
counted. MFU divides the achieved FLOP/s by the matmul peak measured here, on the same machine,
with a large square matmul in the config's compute dtype. Peak memory is the device's
`peak_bytes_in_use` where the backend reports it (GPU/TPU) and the process's maximum resident set
size otherwise (CPU).
"""
from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxprompt import sharding, train

config_flags.DEFINE_config_file("config", "configs/vpt_vtab.py",
                                "Config whose model, optimizer and mesh are benchmarked.")
flags.DEFINE_string("variant", "B/16", "Backbone variant set into config.model.variant; '' keeps "
                    "the config's.")
flags.DEFINE_integer("batch_size", 8, "Global batch size.")
flags.DEFINE_integer("image_size", 224, "Square input size.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one compile-and-warm-up step).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.")
FLAGS = flags.FLAGS


def best_seconds(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_flops(n: int, dtype) -> float:
  """Best FLOP/s of an n x n @ n x n matmul in `dtype` on the default device."""
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), dtype) for i in range(2))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  return 2 * n**3 / best_seconds(lambda: matmul(a, b), repeats=10)


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def main(_):
  config = FLAGS.config
  config.batch_size = FLAGS.batch_size
  if FLAGS.variant:
    config.model.variant = FLAGS.variant
  config.pp.image_size = FLAGS.image_size
  # The data source only sets the class count here; the batch below is synthetic.
  config.dataset, config.train_split = "embedded/shapes", "train"
  exp = train.build(config)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.normal(size=(FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
                          ).astype(np.float32),
      "label": rng.integers(0, exp.data.source.num_classes, FLAGS.batch_size).astype(np.int32),
  }, exp.mesh)

  compiled = exp.train_step.lower(exp.state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_step = float(cost["flops"])

  state = exp.state
  state, _ = exp.train_step(state, batch)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_seconds = float(np.median(times))
  dtype = jnp.dtype(config.compute_dtype)
  peak = matmul_peak_flops(FLAGS.matmul_size, dtype)
  memory, memory_kind = peak_memory_bytes()

  achieved = flops_per_step / step_seconds
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"model: {config.model_name} {dict(config.model)}, dtype {config.compute_dtype}")
  print(f"batch {FLAGS.batch_size} at {FLAGS.image_size} px, median of {FLAGS.steps} steps: "
        f"{step_seconds:.3f} s/step (min {min(times):.3f}, max {max(times):.3f})")
  print(f"images/s: {FLAGS.batch_size / step_seconds:.3f}")
  print(f"FLOPs/step (XLA): {flops_per_step / 1e9:.1f} GFLOP; achieved {achieved / 1e9:.1f} GFLOP/s")
  print(f"matmul peak ({FLAGS.matmul_size}^2 {dtype.name}): {peak / 1e9:.1f} GFLOP/s; "
        f"MFU: {100 * achieved / peak:.1f}%")
  print(f"peak memory ({memory_kind}): {memory / 2**30:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
