"""Many tasks' prompts on one frozen backbone: a mixed-task batch in one jitted forward.

Prompt tuning leaves the backbone untouched, so N tasks need one backbone in memory and N small
prompt artefacts (`jaxprompt/export.py`), not N models; the originals (KMnP/vpt, SA2VP, CoOp's
`trainers/coop.py`, LMPT's `lmpt/test.py`) load one full model per task and serve one task at a
time. A batch of images with per-example task ids runs as one jitted forward. The artefacts'
params decide how, not the method's name:

  * a classifier head (`head/kernel`, `head/bias`: VPT, SA2VP, LMPT's linear baseline): the
    prompts may change the image tower, so the N artefacts' params are stacked on a leading task
    axis, each example's prompts and head are gathered by its task id (`jnp.take`) and the model
    is vmapped over (example, its params) against the shared frozen params. Each head is padded
    to the largest class count with zero weights and bias -inf, so a padded class never wins.
  * class prompts (no head, and a model that computes its classes' features from prompts:
    `encode_prompts`, `encode_images`, `class_logits` of `prompts/coop.py`'s `PromptCLIP`: CoOp,
    LMPT, RPL): the prompts never touch the image tower, so each task's class features (its
    learned context and class names, recorded in the artefact, through the frozen text encoder)
    are computed once when the server loads; per batch the image features are computed once for
    all examples, and each example's logits are `class_logits` of its image features and its
    task's class features, gathered by task id: exactly the method's evaluation forward. Classes
    past a task's count are -inf.

Each task's logits are its first C_t columns.

  python -m jaxprompt.serve --artefact a.prompt --artefact b.prompt --images DIR

reads `DIR/<task name>/*` (png/jpeg), preprocesses them with the run's evaluation pp (which
resizes to the backbone's input size) and prints every image's prediction, per task, as the run's
evaluator makes it: the argmax class, or for a 'multilabel' evaluator (LMPT) every class whose
softmax-over-classes score exceeds its threshold. All artefacts must be of one method and one
backbone (the same fingerprint); the backbone is built from the first artefact's config without
any data (`export.build_backbone`).
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from flax import traverse_util

from input_pipeline import preprocess
from jaxprompt import export, method as method_lib, train
from jaxprompt.evaluators import multilabel

HEAD = ("head/kernel", "head/bias")  # the classifier, (D, C) and (C,): padded to the largest C
# What a class-prompt model offers (`prompts/coop.py` PromptCLIP): its evaluation forward is
# class_logits(encode_images(images), encode_prompts()).
CLASS_PROMPT_FUNCTIONS = ("encode_prompts", "encode_images", "class_logits")
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
    self.num_classes = [r.num_classes for r in records]
    self.class_names = [r.class_names for r in records]
    self._predictions = [prediction_rule(export.config_from_record(r.config)) for r in records]
    method = method_lib.load_method(self.method_name)
    if not isinstance(backbone, dict):
      backbone = export.build_backbone(backbone, num_classes=records[0].num_classes,
                                       class_names=records[0].class_names)[0]
    names = sorted(records[0].flat_params())
    for record in records:
      if record.method != self.method_name:  # before building any task's model
        raise ValueError(f"Prompt artefact {record.path!r} is of method {record.method!r}; "
                         f"{records[0].path!r} of {self.method_name!r} (a server serves one "
                         "method).")
      if sorted(record.flat_params()) != names:
        raise ValueError(f"Prompt artefact {record.path!r} holds the params "
                         f"{sorted(record.flat_params())}; {records[0].path!r} holds {names}.")
    backbone_flat = traverse_util.flatten_dict(backbone["params"], sep="/")
    fingerprint = export.backbone_fingerprint(backbone["params"], names)  # once, for all tasks
    frozen = {k: v for k, v in backbone_flat.items() if k not in names}
    collections = {k: v for k, v in backbone.items() if k != "params"}
    has_head = all(k in names for k in HEAD)
    if has_head:
      shapes = [{k: np.shape(backbone_flat[k])[:-1] + r.flat_params()[k].shape[-1:]
                 for k in HEAD if k in backbone_flat} for r in records]
    elif all(callable(getattr(method.model, f, None)) for f in CLASS_PROMPT_FUNCTIONS):
      models = [train.build_model(export.config_from_record(r.config), method, r.num_classes,
                                  r.class_names or None) for r in records]
      shapes = [_prompt_param_shapes(m) for m in models]
    else:
      raise ValueError(f"Prompt artefact {records[0].path!r} ({self.method_name}) has no "
                       f"classifier {list(HEAD)}, and {self.method_name}'s model computes no "
                       f"class features from prompts ({', '.join(CLASS_PROMPT_FUNCTIONS)}): "
                       "serving knows neither how to gather its heads nor its class sets.")
    for record, shape in zip(records, shapes):
      export.check_compatible(record, backbone["params"], method=self.method_name, shapes=shape,
                              fingerprint=fingerprint)
    if has_head:
      width = max(self.num_classes)
      stacked = {name: np.stack([_pad_head(name, r.flat_params()[name], width) for r in records])
                 for name in names}  # name -> (T, ...)
      self.model = train.build_model(self.config, method, width)
      self._inputs = (frozen, jax.tree.map(jnp.asarray, stacked), collections)
      self._forward = jax.jit(self._head_logits)
    else:
      self.model = models[0]  # its image tower and logit scale are every task's (one backbone)
      features = [_class_features(m, frozen, r.flat_params(), collections)
                  for m, r in zip(models, records)]
      self._inputs = (frozen, collections, *_padded_class_features(features))
      self._forward = jax.jit(self._class_prompt_logits)

  def _head_logits(self, frozen, trainable, collections, images, task_ids):
    """(B, C_max) logits; example b runs with the params of task task_ids[b]."""
    per_example = jax.tree.map(lambda x: jnp.take(x, task_ids, axis=0), trainable)  # (B, ...)

    def one(params, image):
      variables = {"params": traverse_util.unflatten_dict({**frozen, **params}, sep="/"),
                   **collections}
      return self.model.apply(variables, image[None], train=False)[0][0]

    return jax.vmap(one)(per_example, images)

  def _class_prompt_logits(self, frozen, collections, class_features, valid, images, task_ids):
    """(B, C_max) logits: the image features of all examples at once, then example b's
    `class_logits` against the class features (T, C_max, E) of task task_ids[b]."""
    variables = {"params": traverse_util.unflatten_dict(frozen, sep="/"), **collections}
    image_features = self.model.apply(variables, images, method="encode_images")  # (B, E)

    def one(image_feature, task_features):
      return self.model.apply(variables, image_feature[None], task_features,
                              method="class_logits")[0]

    logits = jax.vmap(one)(image_features, jnp.take(class_features, task_ids, axis=0))
    return jnp.where(jnp.take(valid, task_ids, axis=0), logits, -jnp.inf)

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
    return np.asarray(self._forward(*self._inputs, images, task_ids.astype(np.int32)))

  def predict(self, images, task_ids) -> list[tuple[str, object]]:
    """(task name, prediction) per example, as the task's run evaluates: the argmax class (int),
    or for a 'multilabel' evaluator the tuple of classes over its threshold (`prediction_rule`)."""
    logits = self.logits(images, task_ids)
    return [(self.tasks[t], self._predictions[t](row[:self.num_classes[t]]))
            for t, row in zip(np.asarray(task_ids), logits)]


def _prompt_param_shapes(model) -> dict[str, tuple]:
  """name -> shape of the params a class-prompt model's prompts create (e.g. CoOp's class-specific
  context (C, n_ctx, W) for this model's class count)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), method="encode_prompts"))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes["params"],
                                                                   sep="/").items()}


def _class_features(model, frozen: dict, params: dict, collections: dict) -> np.ndarray:
  """(C, E) class features of one task: its prompts through the frozen text encoder."""
  variables = {"params": traverse_util.unflatten_dict({**frozen, **params}, sep="/"),
               **collections}
  return np.asarray(jax.jit(lambda v: model.apply(v, method="encode_prompts"))(variables))


def _padded_class_features(features: Sequence[np.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """((T, C_max, E) class features, zero past a task's count; (T, C_max) bool, True where real)."""
  width = max(len(f) for f in features)
  padded = np.stack([np.pad(f, [(0, width - len(f)), (0, 0)]) for f in features])
  valid = np.arange(width)[None] < np.array([len(f) for f in features])[:, None]
  return jnp.asarray(padded), jnp.asarray(valid)


def _argmax(logits: np.ndarray) -> int:
  return int(np.argmax(logits))


def prediction_rule(config) -> Callable[[np.ndarray], object]:
  """How the run's own evaluator turns one example's logits (C,) into a prediction: for a
  'multilabel' evaluator (LMPT) the tuple of classes whose softmax-over-classes score exceeds its
  threshold (`evaluators/multilabel.py`), else the argmax class."""
  settings = [dict(e) for e in (config.get("evals") or {}).values()]
  multilabel_settings = [e for e in settings if e.get("type") == "multilabel"]
  if not multilabel_settings:
    return _argmax
  threshold = multilabel.threshold_setting(config, multilabel_settings[0].get("threshold"))
  return lambda logits: tuple(
      int(c) for c in np.flatnonzero(multilabel.class_softmax(logits[None])[0] > threshold))


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
  for t, task in enumerate(server.tasks):
    print(f"task {task} ({server.num_classes[t]} classes):")
    for path, (name, prediction) in zip(paths, predictions):
      if name == task:
        print(f"  {os.path.relpath(path, args.images)}: "
              f"{describe(prediction, server.class_names[t])}")


def describe(prediction, class_names: Sequence[str]) -> str:
  """'class 3 (dog)' for an argmax prediction, 'classes [1, 4] (cat, dog)' for a multi-label one
  (names when the artefact records them)."""
  classes = prediction if isinstance(prediction, tuple) else (prediction,)
  text = f"classes {list(classes)}" if isinstance(prediction, tuple) else f"class {prediction}"
  if not (class_names and classes):
    return text
  return f"{text} ({', '.join(class_names[c] for c in classes)})"


if __name__ == "__main__":
  main()
