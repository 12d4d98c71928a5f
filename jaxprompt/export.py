"""Prompt-only artefacts: one small file per task, loadable onto a shared frozen backbone.

A prompt-tuning run changes only its prompts and head, yet the originals (KMnP/vpt,
SA2VP's `train.py`) save the whole model per task. This module writes what a task adds to the
backbone and nothing else:

  python -m jaxprompt.export --workdir DIR --out task.prompt [--task NAME]

The file is safetensors (no pickle: loading it runs no code): one tensor per trainable param of
the run's newest checkpoint, named by its '/'-joined path, and in the header's metadata the
method (`config.model_name`), the task name (default: the workdir's folder name), the step, the
run's config as recorded in `<workdir>/config.json`, the class count and, for a model with a
`class_names` field (the CLIP class-prompt methods: CoOp, LMPT), the class names the run was built
with (from its data source or config), so serving needs no dataset, and the fingerprint of the
frozen backbone: sha256 over the frozen params' names, shapes, dtypes and bytes, as the run built
them (its `model_init`, or its seeded init). `apply_artefact` puts the params into a built model's
variables and refuses a backbone with another fingerprint, another method or other shapes, so
prompts never meet a backbone they were not trained on.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import ml_collections
import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

from jaxprompt import checkpointing, method as method_lib, optim, run_record, sharding, train

FORMAT = "jaxprompt.prompt/2"  # /2: num_classes and class_names in the metadata


@dataclasses.dataclass(frozen=True)
class Artefact:
  """A loaded prompt artefact: `params` are the trainable params as a nested dict of arrays."""
  path: str
  task: str
  method: str
  fingerprint: str
  step: int
  config: dict  # flat dotted keys, as `<workdir>/config.json`
  params: dict
  num_classes: int
  class_names: tuple[str, ...] = ()  # as the model was built (CLIP class-prompt methods)

  def flat_params(self) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(self.params, sep="/")


def config_from_record(flat: dict) -> ml_collections.ConfigDict:
  """The ConfigDict of a run record's flat dotted keys (`run_record.flat_config`)."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return ml_collections.ConfigDict(tree)


def read_run_config(workdir: str) -> dict:
  """The flat config recorded in `<workdir>/config.json`, or an error naming the file."""
  path = os.path.join(workdir, run_record.RECORD_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} does not exist: --workdir must be the workdir of a jaxprompt "
                     "training run (it records its config there).")
  with open(path) as f:
    return json.load(f)


def backbone_fingerprint(params: dict, trainable_names) -> str:
  """sha256 over the names, shapes, dtypes and bytes of every param not in `trainable_names`."""
  digest = hashlib.sha256()
  trainable = set(trainable_names)
  for name, value in sorted(traverse_util.flatten_dict(params, sep="/").items()):
    if name in trainable:
      continue
    array = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{name}|{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def build_run(config) -> tuple[dict, list[str], object]:
  """(the run's variables as built from its config: its model_init or seeded init, the trainable
  param names, the model). Builds the run's experiment, so its data source must be reachable."""
  exp = train.build(config)
  names = [k for k, v in traverse_util.flatten_dict(exp.labels, sep="/").items()
           if v == optim.TRAIN]
  return train.variables(exp.state), names, exp.model


def build_backbone(config, *, num_classes: int | None = None,
                   class_names: Sequence[str] = ()) -> tuple[dict, list[str]]:
  """(the variables as the run built them from `config`: its model_init or seeded init, the
  trainable param names). Without `num_classes`, from the run's experiment (`build_run`: its data
  source must be reachable); with it, without any data: the model of that class count (and
  `class_names`, an artefact's), initialised on one image of `config.pp.image_size` (image
  models only), as serving does. The fingerprint check tells when the two differ."""
  if num_classes is None:
    return build_run(config)[:2]
  method = method_lib.load_method(config.model_name)
  if tuple(method.inputs) != ("image",):
    raise ValueError(f"{config.model_name} consumes {list(method.inputs)}; a backbone is built "
                     "without data for image models only (build_run builds it with the data).")
  model = train.build_model(config, method, num_classes, tuple(class_names) or None)
  size = int(config.pp.image_size)
  parts = method_lib.model_init_parts(config.get("model_init"), method, config.model_name)
  variables, _ = train.init_variables(
      model, [np.zeros((1, size, size, 3), np.float32)], method.loaders, parts, seed=config.seed,
      mesh=sharding.make_mesh(1), rule=config.param_sharding)
  labels = optim.param_labels(variables["params"],
                              config.get("trainable_params") or method.trainable)
  return variables, [k for k, v in traverse_util.flatten_dict(labels, sep="/").items()
                     if v == optim.TRAIN]


def save_artefact(path: str, params: dict, *, task: str, method: str, fingerprint: str,
                  step: int, config: dict, num_classes: int,
                  class_names: tuple[str, ...] = ()) -> None:
  """Writes `params` (nested dict of arrays) and the metadata as one safetensors file."""
  if class_names and len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for {num_classes} classes.")
  tensors = {k: np.ascontiguousarray(np.asarray(v))
             for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  metadata = {"format": FORMAT, "task": task, "method": method, "fingerprint": fingerprint,
              "step": str(step), "config": json.dumps(config, separators=(",", ":")),
              "num_classes": str(num_classes), "class_names": json.dumps(list(class_names))}
  safetensors_numpy.save_file(tensors, path, metadata=metadata)


def export(workdir: str, out: str, task: str | None = None) -> Artefact:
  """Writes the artefact of the newest checkpoint of the run in `workdir` to `out`."""
  flat_config = read_run_config(workdir)
  step, state = checkpointing.read_run(workdir)
  if traverse_util.flatten_dict(state.get("model_state") or {}):
    raise ValueError(f"The run in {workdir!r} also trains non-param collections "
                     f"({sorted(state['model_state'])}); a prompt artefact holds params only.")
  variables, trainable_names, model = build_run(config_from_record(flat_config))
  saved = set(traverse_util.flatten_dict(state["params"], sep="/"))
  if saved != set(trainable_names):
    raise ValueError(f"The checkpoint of step {step} in {workdir!r} holds the params "
                     f"{sorted(saved)}, but the recorded config trains {sorted(trainable_names)}.")
  save_artefact(out, state["params"], task=task or os.path.basename(os.path.abspath(workdir)),
                method=flat_config["model_name"], step=step, config=flat_config,
                fingerprint=backbone_fingerprint(variables["params"], trainable_names),
                num_classes=model.num_classes, class_names=tuple(getattr(model, "class_names", ())))
  return load_artefact(out)


def load_artefact(path: str) -> Artefact:
  """Reads an artefact written by `export`; an error names the file and what is wrong."""
  if not os.path.isfile(path):
    raise ValueError(f"Prompt artefact {path!r} does not exist.")
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own kinds)
    raise ValueError(f"Cannot read {path!r} as a prompt artefact (safetensors): "
                     f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path!r} is not a jaxprompt prompt artefact: its metadata 'format' is "
                     f"{metadata.get('format')!r}, expected {FORMAT!r}.")
  missing = [k for k in ("task", "method", "fingerprint", "step", "config", "num_classes",
                         "class_names") if k not in metadata]
  if missing:
    raise ValueError(f"Prompt artefact {path!r} lacks the metadata key(s) {missing}.")
  return Artefact(path=path, task=metadata["task"], method=metadata["method"],
                  fingerprint=metadata["fingerprint"], step=int(metadata["step"]),
                  config=json.loads(metadata["config"]),
                  params=traverse_util.unflatten_dict(flat, sep="/"),
                  num_classes=int(metadata["num_classes"]),
                  class_names=tuple(json.loads(metadata["class_names"])))


def check_compatible(record: Artefact, params: dict, *, method: str,
                     shapes: dict | None = None, fingerprint: str | None = None) -> None:
  """Refuses (ValueError) `record` on `params` when the method, the frozen backbone's fingerprint
  or a param's shape differs. `shapes`: name -> shape expected instead of `params`' own;
  `fingerprint`: the backbone's, when already computed (one hash for many artefacts)."""
  if record.method != method:
    raise ValueError(f"Prompt artefact {record.path!r} is of method {record.method!r}; the "
                     f"backbone runs {method!r}.")
  flat = traverse_util.flatten_dict(params, sep="/")
  for name, value in record.flat_params().items():
    if name not in flat:
      raise ValueError(f"Prompt artefact {record.path!r} holds {name!r}, which the model has "
                       f"not (its params: {sorted(flat)[:8]}...).")
    want = tuple((shapes or {}).get(name, np.shape(flat[name])))
    if tuple(value.shape) != want:
      raise ValueError(f"Prompt artefact {record.path!r}: {name!r} has shape "
                       f"{tuple(value.shape)}, the model's has {want}.")
  fingerprint = fingerprint or backbone_fingerprint(params, record.flat_params())
  if fingerprint != record.fingerprint:
    raise ValueError(f"Prompt artefact {record.path!r} (task {record.task!r}) was trained on the "
                     f"backbone with fingerprint {record.fingerprint}; this backbone's is "
                     f"{fingerprint}. Build the backbone from the run's model_init and seed.")


def apply_artefact(record: Artefact, variables: dict, *, method: str) -> dict:
  """`variables` with the artefact's params put in, after `check_compatible`."""
  check_compatible(record, variables["params"], method=method)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  flat.update(record.flat_params())
  return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the workdir of a training run")
  parser.add_argument("--out", required=True, help="the artefact to write, e.g. task.prompt")
  parser.add_argument("--task", default=None, help="task name (default: the workdir's name)")
  args = parser.parse_args(argv)
  record = export(args.workdir, args.out, args.task)
  print(f"wrote {args.out}: task {record.task!r}, {record.method}, step {record.step}, "
        f"{len(record.flat_params())} tensors, {os.path.getsize(args.out):,} bytes, backbone "
        f"{record.fingerprint[:16]}")


if __name__ == "__main__":
  main()
