"""Many tasks' prompts on one frozen backbone: a mixed-task batch in one jitted forward.

Prompt tuning leaves the backbone untouched, so N tasks need one backbone in memory and N small
prompt artefacts (`jaxprompt/export.py`), not N models; the originals (KMnP/vpt, SA2VP) load one
full model per task and serve one task at a time. Here the N artefacts' trainable params are
stacked on a leading task axis; a batch of images with per-example task ids runs as one jitted
forward in which each example's prompts and head are gathered by its task id (`jnp.take`) and the
model is vmapped over (example, its params) against the shared frozen params. Tasks may have
different class counts: each head is padded to the largest with zero weights and bias -inf, so a
padded class never wins and each task's logits are its first C_t columns.

  python -m jaxprompt.serve --artefact a.prompt --artefact b.prompt --images DIR

reads `DIR/<task name>/*` (png/jpeg), preprocesses them with the run's evaluation pp (which
resizes to the backbone's input size) and prints the predicted class of every image, per task.
All artefacts must be of one method and one backbone (the same fingerprint).
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from flax import traverse_util

from input_pipeline import preprocess
from jaxprompt import export, method as method_lib, train

HEAD = ("head/kernel", "head/bias")  # the classifier, (D, C) and (C,): padded to the largest C
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Server:
  """One frozen backbone serving the prompts of several tasks of one method.

  `artefacts`: paths or `export.Artefact`s with distinct task names. `backbone`: the model's
  variables (e.g. `export.build_backbone(config)[0]`), or a config to build them from (the run's
  model_init or seeded init); every artefact's backbone fingerprint must match them.
  """

  def __init__(self, artefacts: Sequence, backbone):
    records = [a if isinstance(a, export.Artefact) else export.load_artefact(a)
               for a in artefacts]
    if not records:
      raise ValueError("Server needs at least one prompt artefact.")
    seen = {}
    for record in records:
      if record.task in seen:
        raise ValueError(f"Two artefacts have the task name {record.task!r}: {seen[record.task]!r}"
                         f" and {record.path!r} (export one with --task NAME).")
      seen[record.task] = record.path
    self.tasks = [r.task for r in records]
    self.config = export.config_from_record(records[0].config)
    self.method_name = self.config.model_name
    self.image_size = int(self.config.pp.image_size)
    if not isinstance(backbone, dict):
      backbone = export.build_backbone(backbone)[0]
    names = sorted(records[0].flat_params())
    missing = [k for k in HEAD if k not in names]
    if missing:
      raise ValueError(f"Prompt artefact {records[0].path!r} has no classifier {missing}; "
                       f"serving gathers per-task heads named {list(HEAD)}.")
    self.num_classes = [int(r.flat_params()[HEAD[1]].shape[-1]) for r in records]
    width = max(self.num_classes)
    backbone_flat = traverse_util.flatten_dict(backbone["params"], sep="/")
    fingerprint = export.backbone_fingerprint(backbone["params"], names)  # once, for all tasks
    for record in records:
      if sorted(record.flat_params()) != names:
        raise ValueError(f"Prompt artefact {record.path!r} holds the params "
                         f"{sorted(record.flat_params())}; {records[0].path!r} holds {names}.")
      head = {k: np.shape(backbone_flat[k])[:-1] + record.flat_params()[k].shape[-1:]
              for k in HEAD if k in backbone_flat}
      export.check_compatible(record, backbone["params"], method=self.method_name, shapes=head,
                              fingerprint=fingerprint)
    stacked = {name: np.stack([_pad_head(name, r.flat_params()[name], width) for r in records])
               for name in names}  # name -> (T, ...)
    self._trainable = jax.tree.map(jnp.asarray, stacked)
    self._frozen = {k: v for k, v in backbone_flat.items() if k not in stacked}
    self._collections = {k: v for k, v in backbone.items() if k != "params"}
    method = method_lib.load_method(self.method_name)
    self.model = train.build_model(self.config, method, width)
    self._forward = jax.jit(self._logits)

  def _logits(self, frozen, trainable, collections, images, task_ids):
    """(B, C_max) logits; example b runs with the params of task task_ids[b]."""
    per_example = jax.tree.map(lambda x: jnp.take(x, task_ids, axis=0), trainable)  # (B, ...)

    def one(params, image):
      variables = {"params": traverse_util.unflatten_dict({**frozen, **params}, sep="/"),
                   **collections}
      return self.model.apply(variables, image[None], train=False)[0][0]

    return jax.vmap(one)(per_example, images)

  def logits(self, images, task_ids) -> np.ndarray:
    """(B, C_max) float32 logits of preprocessed `images` (B, S, S, 3) for their `task_ids` (B,);
    columns past a task's class count are -inf."""
    images, task_ids = np.asarray(images, np.float32), np.asarray(task_ids)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images have shape {images.shape}; the backbone takes (B, *{expected}) "
                       f"(preprocess with the run's pp, e.g. `load_images`, which resizes).")
    if task_ids.shape != images.shape[:1] or not np.issubdtype(task_ids.dtype, np.integer):
      raise ValueError(f"task_ids must be {images.shape[0]} integers (one per image); got "
                       f"{task_ids.dtype} of shape {task_ids.shape}.")
    bad = task_ids[(task_ids < 0) | (task_ids >= len(self.tasks))]
    if bad.size:
      raise ValueError(f"task id {int(bad[0])} is out of range: {len(self.tasks)} tasks are "
                       f"loaded (0..{len(self.tasks) - 1}: {self.tasks}).")
    return np.asarray(self._forward(self._frozen, self._trainable, self._collections,
                                    images, task_ids.astype(np.int32)))

  def predict(self, images, task_ids) -> list[tuple[str, int]]:
    """(task name, predicted class) per example."""
    classes = self.logits(images, task_ids).argmax(-1)
    return [(self.tasks[t], int(c)) for t, c in zip(np.asarray(task_ids), classes)]


def _pad_head(name: str, value: np.ndarray, width: int) -> np.ndarray:
  """A head leaf padded on its class axis to `width`: kernel columns 0, bias -inf."""
  if name not in HEAD or value.shape[-1] == width:
    return value
  pad = [(0, 0)] * (value.ndim - 1) + [(0, width - value.shape[-1])]
  return np.pad(value, pad, constant_values=-np.inf if name == HEAD[1] else 0.0)


def load_images(paths: Sequence[str], pp_spec: str) -> np.ndarray:
  """(B, S, S, 3) float32: the image files decoded and run through `pp_spec` (the run's
  `config.pp.eval`, which resizes to the backbone's size); an unreadable file is an error
  naming it."""
  fn = preprocess.make_preprocess_fn(pp_spec)
  out = []
  for path in paths:
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
      raise ValueError(f"Cannot read image {path!r}: {e.message.splitlines()[0]}") from None
    out.append(np.asarray(fn({"image": image})["image"], np.float32))
  return np.stack(out)


def images_by_task(folder: str, tasks: Sequence[str]) -> dict[str, list[str]]:
  """{task: sorted image paths in folder/<task>/}; a subfolder naming no loaded task is an error."""
  if not os.path.isdir(folder):
    raise ValueError(f"--images {folder!r} is not a folder.")
  found = {}
  for name in sorted(os.listdir(folder)):
    sub = os.path.join(folder, name)
    if not os.path.isdir(sub):
      continue
    if name not in tasks:
      raise ValueError(f"{sub!r} names no loaded task (tasks: {list(tasks)}).")
    found[name] = [os.path.join(sub, f) for f in sorted(os.listdir(sub))
                   if f.lower().endswith(IMAGE_SUFFIXES)]
  if not any(found.values()):
    raise ValueError(f"No images in {folder!r}: expected {folder}/<task>/*.png|jpg, tasks "
                     f"{list(tasks)}.")
  return found


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--artefact", action="append", required=True,
                      help="a prompt artefact (jaxprompt.export); repeat for more tasks")
  parser.add_argument("--images", required=True, help="a folder with one subfolder per task")
  args = parser.parse_args(argv)
  records = [export.load_artefact(path) for path in args.artefact]
  server = Server(records, export.config_from_record(records[0].config))
  found = images_by_task(args.images, server.tasks)
  paths = [p for task in found for p in found[task]]
  task_ids = [server.tasks.index(task) for task in found for _ in found[task]]
  predictions = server.predict(load_images(paths, server.config.pp.eval), task_ids)
  for task in server.tasks:
    print(f"task {task} ({server.num_classes[server.tasks.index(task)]} classes):")
    for path, (name, label) in zip(paths, predictions):
      if name == task:
        print(f"  {os.path.relpath(path, args.images)}: class {label}")


if __name__ == "__main__":
  main()
