"""Multi-task serving throughput: one mixed-task batch vs the same examples served task by task.

  python benchmarks/serve.py                                 # VPT-deep ViT-B/16, 224 px, 4 tasks
  python benchmarks/serve.py --config=configs/sa2vp_vtab.py --variant=Ti/16 --tasks=8

`jaxprompt.serve.Server` runs a batch whose examples belong to different tasks in one jitted
forward, each example's prompts and head gathered by its task id. The alternative a per-task
server offers is to split the batch by task and run one forward per task (one compiled program
per task and sub-batch size). Both are timed on the same examples, with a random-init backbone
and random prompts (throughput does not depend on the values); images/s is the best of
`--repeats` after a compile-and-warm-up call.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from jaxprompt import export, method as method_lib, optim, run_record, serve, train

config_flags.DEFINE_config_file("config", "configs/vpt_vtab.py", "Config whose method is served.")
flags.DEFINE_string("variant", "B/16", "Backbone variant; '' keeps the config's.")
flags.DEFINE_integer("image_size", 224, "Square input size.")
flags.DEFINE_integer("tasks", 4, "Number of tasks (artefacts) served.")
flags.DEFINE_integer("batch_size", 16, "Examples per mixed batch, split evenly over the tasks.")
flags.DEFINE_integer("repeats", 3, "Timed calls (after one compile-and-warm-up call).")
FLAGS = flags.FLAGS


def best_seconds(fn, repeats: int) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(_):
  config = FLAGS.config
  if FLAGS.variant:
    config.model.variant = FLAGS.variant
  config.pp.image_size = FLAGS.image_size
  method = method_lib.load_method(config.model_name)
  model = train.build_model(config, method, 10)
  image = np.zeros((1, FLAGS.image_size, FLAGS.image_size, 3), np.float32)
  variables = jax.jit(lambda rng: model.init(rng, image, train=False))(jax.random.PRNGKey(0))
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  labels = traverse_util.flatten_dict(optim.param_labels(variables["params"], method.trainable),
                                      sep="/")
  names = [k for k, v in labels.items() if v == optim.TRAIN]
  fingerprint = export.backbone_fingerprint(variables["params"], names)
  rng = np.random.default_rng(0)
  records = [export.Artefact(
      path=f"<task {t}>", task=f"task{t}", method=config.model_name, fingerprint=fingerprint,
      step=0, config=run_record.flat_config(config),
      params=traverse_util.unflatten_dict(
          {k: rng.normal(size=flat[k].shape).astype(np.float32) * 0.05 for k in names}, sep="/"))
      for t in range(FLAGS.tasks)]
  images = rng.normal(size=(FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3))
  images = images.astype(np.float32)
  task_ids = np.arange(FLAGS.batch_size) % FLAGS.tasks
  mixed = serve.Server(records, variables)
  alone = [serve.Server([r], variables) for r in records]
  mixed_s = best_seconds(lambda: mixed.logits(images, task_ids), FLAGS.repeats)
  split_s = best_seconds(lambda: [s.logits(images[task_ids == t], task_ids[task_ids == t] * 0)
                                  for t, s in enumerate(alone)], FLAGS.repeats)
  print(f"{config.model_name} {config.model.variant}, {FLAGS.image_size} px, {FLAGS.tasks} tasks, "
        f"batch {FLAGS.batch_size} on {jax.default_backend()}:")
  print(f"  mixed batch, one forward : {FLAGS.batch_size / mixed_s:8.2f} images/s")
  print(f"  task by task             : {FLAGS.batch_size / split_s:8.2f} images/s")


if __name__ == "__main__":
  app.run(main)
