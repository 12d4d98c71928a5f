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
size otherwise (CPU). Params on device 0 are the bytes of parameter shards the mesh's first device
holds: `--config.mesh.model=N --config.sharding_rules=megatron` splits the transformer matmuls over
N devices. The measurements are `benchmarks/common.py`'s; `benchmarks/run_all.py` times
every method's step this way in one table.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402
from jaxprompt import host_memory, sharding, train  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/vpt_vtab.py",
                                "Config whose model, optimizer and mesh are benchmarked.")
flags.DEFINE_string("variant", "B/16", "Backbone variant set into config.model.variant; '' keeps "
                    "the config's.")
flags.DEFINE_integer("batch_size", 8, "Global batch size.")
flags.DEFINE_integer("image_size", 224, "Square input size.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one compile-and-warm-up step).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.")
flags.DEFINE_bool("reuse_host_memory", True, "As the trainer (`jaxprompt/host_memory.py`); "
                  "--noreuse_host_memory times the step with glibc's default allocator.")
FLAGS = flags.FLAGS


def main(_):
  reused = FLAGS.reuse_host_memory and host_memory.reuse_freed_memory()
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

  # Measured before the steps, which donate the state.
  param_bytes = sharding.bytes_on_device(exp.state["params"], exp.mesh.devices.flat[0])
  total_bytes = sum(x.nbytes for x in jax.tree.leaves(exp.state["params"]))
  timing, _ = common.time_step(exp.train_step, (exp.state, batch), steps=FLAGS.steps,
                               carry=lambda args, outputs: (outputs[0], args[1]))
  flops_per_step, step_seconds, times = timing.flops, timing.seconds, timing.times
  dtype = jnp.dtype(config.compute_dtype)
  peak = common.matmul_peak_flops(FLAGS.matmul_size, dtype)
  memory, memory_kind = common.peak_memory_bytes()

  achieved = flops_per_step / step_seconds
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"model: {config.model_name} {dict(config.model)}, dtype {config.compute_dtype}")
  print(f"batch {FLAGS.batch_size} at {FLAGS.image_size} px, median of {FLAGS.steps} steps: "
        f"{step_seconds:.3f} s/step (min {min(times):.3f}, max {max(times):.3f})")
  print(f"images/s: {FLAGS.batch_size / step_seconds:.3f}")
  print(f"FLOPs/step (XLA): {flops_per_step / 1e9:.1f} GFLOP; achieved {achieved / 1e9:.1f} GFLOP/s")
  print(f"matmul peak ({FLAGS.matmul_size}^2 {dtype.name}): {peak / 1e9:.1f} GFLOP/s; "
        f"MFU: {100 * achieved / peak:.1f}%")
  print(f"compile {timing.compile_s:.1f} s; XLA memory (arguments + temporaries + outputs): "
        f"{timing.xla_bytes / common.GIB:.2f} GiB; peak memory ({memory_kind}): "
        f"{memory / common.GIB:.2f} GiB")
  print(f"freed host memory reused (jaxprompt/host_memory.py): {reused}")
  print(f"params on device 0 of the {dict(exp.mesh.shape)} mesh: {param_bytes / 2**20:.1f} MiB "
        f"(of {total_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
  app.run(main)
