"""Multi-task serving throughput: one mixed-task batch vs the same examples served task by task.

  python benchmarks/serve.py                                 # VPT-deep ViT-B/16, 224 px, 4 tasks
  python benchmarks/serve.py --config=configs/sa2vp_vtab.py --variant=Ti/16 --tasks=8
  python benchmarks/serve.py --config=configs/coop.py --variant=ViT-B/16   # CoOp, class prompts

`jaxprompt.serve.Server` runs a batch whose examples belong to different tasks in one jitted
forward: for a head method (VPT, SA2VP) each example's prompts and head are gathered by its task
id; for a class-prompt method (CoOp, LMPT) each task's class features are computed once at load
and gathered, and the image tower runs once for the whole batch. Three ways to run the same
examples are timed:

  * mixed batch, one forward: the Server with all tasks;
  * task by task: one Server per task, the batch split by task (one compiled program per task
    and sub-batch size), what a per-task server offers;
  * the method's own forward, task by task: the model's jitted evaluation `apply` with the task's
    params, as the originals serve one task (CoOp's `CustomCLIP.forward` re-encodes every class
    prompt through the text tower on every call).

The backbone is the config's seeded init built without data (`export.build_backbone`) and the
prompts are random (throughput does not depend on the values); each task has `--classes` class
names (class-prompt methods). images/s is the best of `--repeats` after a compile-and-warm-up
call.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from jaxprompt import export, host_memory, method as method_lib, run_record, serve, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import common  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/vpt_vtab.py", "Config whose method is served.")
flags.DEFINE_string("variant", "B/16", "Backbone variant (ViT-B/16 for CLIP); '' keeps the "
                    "config's.")
flags.DEFINE_integer("image_size", 224, "Square input size.")
flags.DEFINE_integer("tasks", 4, "Number of tasks (artefacts) served.")
flags.DEFINE_integer("classes", 10, "Classes per task.")
flags.DEFINE_integer("batch_size", 16, "Examples per mixed batch, split evenly over the tasks.")
flags.DEFINE_integer("repeats", 3, "Timed calls (after one compile-and-warm-up call).")
FLAGS = flags.FLAGS


def best_seconds(fns: dict, repeats: int) -> dict[str, float]:
  """name -> the best of `repeats` timed calls of fns[name] after one warm-up call; the calls are
  interleaved (one of each per round), so load from other processes hits all of them alike."""
  for fn in fns.values():
    fn()
  best = dict.fromkeys(fns, float("inf"))
  for _ in range(repeats):
    for name, fn in fns.items():
      best[name] = min(best[name], common.best_seconds(fn, 1))
  return best


def main(_):
  host_memory.reuse_freed_memory()  # as the trainer runs (jaxprompt/host_memory.py)
  config = FLAGS.config
  if FLAGS.variant:
    config.model.variant = FLAGS.variant
  config.pp.image_size = FLAGS.image_size
  method = method_lib.load_method(config.model_name)
  named = "class_names" in getattr(method.model, "__dataclass_fields__", {})
  class_sets = [tuple(f"object {c} of task {t}" for c in range(FLAGS.classes)) if named else ()
                for t in range(FLAGS.tasks)]
  variables, names = export.build_backbone(config, num_classes=FLAGS.classes,
                                           class_names=class_sets[0])
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  fingerprint = export.backbone_fingerprint(variables["params"], names)
  rng = np.random.default_rng(0)
  records = [export.Artefact(
      path=f"<task {t}>", task=f"task{t}", method=config.model_name, fingerprint=fingerprint,
      step=0, config=run_record.flat_config(config), num_classes=FLAGS.classes,
      class_names=class_sets[t], params=traverse_util.unflatten_dict(
          {k: rng.normal(size=flat[k].shape).astype(np.float32) * 0.05 for k in names}, sep="/"))
      for t in range(FLAGS.tasks)]
  images = rng.normal(size=(FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3))
  images = images.astype(np.float32)
  task_ids = np.arange(FLAGS.batch_size) % FLAGS.tasks
  mixed = serve.Server(records, variables)
  alone = [serve.Server([r], variables) for r in records]
  own = [(jax.jit(functools.partial(
      train.build_model(config, method, FLAGS.classes, r.class_names or None).apply, train=False)),
          {**variables, "params": traverse_util.unflatten_dict({**flat, **r.flat_params()},
                                                               sep="/")}) for r in records]
  seconds = best_seconds({
      "mixed batch, one forward": lambda: mixed.logits(images, task_ids),
      "task by task (a Server each)": lambda: [
          s.logits(images[task_ids == t], task_ids[task_ids == t] * 0)
          for t, s in enumerate(alone)],
      "the method's forward per task": lambda: [
          jax.block_until_ready(apply(v, images[task_ids == t])[0])
          for t, (apply, v) in enumerate(own)]}, FLAGS.repeats)
  print(f"{config.model_name} {config.model.variant}, {FLAGS.image_size} px, {FLAGS.tasks} tasks "
        f"of {FLAGS.classes} classes, batch {FLAGS.batch_size} on {jax.default_backend()}:")
  for name, best in seconds.items():
    print(f"  {name:30}: {FLAGS.batch_size / best:8.2f} images/s")


if __name__ == "__main__":
  app.run(main)
