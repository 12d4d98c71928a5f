"""The method contract: the one record a prompt method module fills in, checked at start.

A method is a module `jaxprompt.<config.model_name>` (e.g. `prompts.sa2vp`) that defines

  METHOD = method.Method(model=Model, trainable=r"...", loaders={"model": load}, ...)

and the trainer reads nothing else from it, so a misspelled hook is a TypeError when the module is
imported and a module without `METHOD` is an error naming it, never a silent fallback. The fields:

  * `model`: the Linen module class, built as `model(num_classes=..., dtype=..., **config.model)`
    (plus `class_names=` from the data source when it has that field: CLIP prompt methods). Its
    `apply(variables, *[batch[k] for k in inputs], train=bool, rngs=..., **optional inputs)`
    returns `(logits, aux)`.
  * `trainable`: regex over '/'-joined param names that train (`config.trainable_params`
    overrides it); everything else, and every non-param collection (BatchNorm statistics), stays
    frozen.
  * `inputs`: batch keys passed positionally, in order ('image' for every method today; a video
    method will say 'video'); the model is initialised from the data's element spec of these keys.
    `optional_inputs`: keys passed as keywords when a batch has them (LMPT's train-only
    'caption_tokens'). The trainer checks both against the source's declared keys at start.
  * `loaders`: `config.model_init` part name -> `load(variables, path) -> variables`. A plain
    string `model_init` goes to the part 'model'; a dict `{'image': path, 'text': path}` to one
    loader per part (GLIP's Swin + BERT, ClipCap's CLIP + GPT-2), each merging its own subtree
    with the strict key check of `models.common.merge_params`.
  * `make_loss(config, source) -> loss(logits, aux, batch)`: per-example losses (or one scalar
    for the batch); None: softmax cross-entropy on batch['label'] with `config.label_smoothing`.
  * `predict_fns(model, config) -> {name: fn}`: functions evaluators may use besides the 'logits'
    and 'loss' the trainer derives (CLIP methods: 'embed_image', 'embed_text', 'logit_scale',
    'tokenize'; GLIP: 'detect', with its `config.glip` settings; see `jaxprompt/evaluators/`).
  * `source_kwargs(config) -> dict`: keyword arguments of the data source a config cannot hold
    (LMPT's caption tokenizer).
  * `mutable`: non-param collections that training updates through the forward pass, as the
    original's train mode does (LMPT puts the whole CLIP in train mode, so a ResNet tower's
    BatchNorm running statistics move); they are then checkpointed with the trainable params.
    Empty (every other method): all non-param collections stay frozen.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

from jaxprompt import optim


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method module declares as `METHOD` (see the module docstring)."""
  model: Any
  trainable: str
  loaders: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  inputs: tuple[str, ...] = ("image",)
  optional_inputs: tuple[str, ...] = ()
  make_loss: Callable | None = None
  predict_fns: Callable | None = None
  source_kwargs: Callable | None = None
  mutable: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.inputs:
      raise ValueError("Method.inputs: a model consumes at least one batch key.")
    for name in ("make_loss", "predict_fns", "source_kwargs"):
      value = getattr(self, name)
      if value is not None and not callable(value):
        raise TypeError(f"Method.{name} must be callable or None; got {value!r}.")
    for part, loader in self.loaders.items():
      if not callable(loader):
        raise TypeError(f"Method.loaders[{part!r}] must be callable; got {loader!r}.")


def load_method(model_name: str) -> Method:
  """`METHOD` of `jaxprompt.<model_name>`, or an error naming the module."""
  try:
    module = importlib.import_module(f"jaxprompt.{model_name}")
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith(f"jaxprompt.{model_name.split('.')[0]}"):
      raise ValueError(f"config.model_name={model_name!r}: no module jaxprompt.{model_name} "
                       "(methods live in jaxprompt/prompts/, e.g. 'prompts.vpt').") from e
    raise
  method = getattr(module, "METHOD", None)
  if not isinstance(method, Method):
    raise ValueError(f"jaxprompt.{model_name} is not a method: it defines no METHOD = "
                     "jaxprompt.method.Method(...) (see jaxprompt/method.py).")
  return method


def model_init_parts(model_init, method: Method, model_name: str) -> dict[str, str]:
  """`config.model_init` as {part: path}: '' -> {}, a path -> {'model': path}, a dict as it is;
  a part without a loader is an error naming the method's parts."""
  if not model_init:
    return {}
  if isinstance(model_init, str):
    parts = {"model": model_init}
  else:  # a dict or ConfigDict of part -> path; parts left '' are not loaded
    items = model_init.to_dict() if hasattr(model_init, "to_dict") else dict(model_init)
    parts = {part: path for part, path in items.items() if path}
  unknown = sorted(set(parts) - set(method.loaders))
  if unknown:
    raise ValueError(f"config.model_init names the part(s) {unknown}, which {model_name} cannot "
                     f"load; its parts: {sorted(method.loaders) or 'none'}.")
  bad = [part for part, path in parts.items() if not isinstance(path, str)]
  if bad:
    raise ValueError(f"config.model_init[{bad[0]!r}] = {parts[bad[0]]!r}: expected a path.")
  return parts


def model_inputs(method: Method, batch: dict) -> tuple[list, dict]:
  """(positional, keyword) model arguments of `batch`: `inputs` in order, `optional_inputs` that
  the batch has."""
  return ([batch[k] for k in method.inputs],
          {k: batch[k] for k in method.optional_inputs if k in batch})


def check_inputs(method: Method, model_name: str, batch_keys, source_name: str) -> None:
  """Every key the method requires (`inputs`) is one the source produces; else an error naming
  both. `optional_inputs` may be absent (LMPT without its embedding loss has no captions)."""
  missing = [k for k in method.inputs if k not in batch_keys]
  if missing:
    raise ValueError(f"{model_name} consumes the batch key(s) {missing}, which data source "
                     f"{source_name!r} does not produce (it produces {sorted(batch_keys)}).")


def cross_entropy_loss(config, source):
  """The default `make_loss`: softmax cross-entropy on batch['label'] (config.label_smoothing)."""
  smoothing = config.get("label_smoothing", 0.0)
  return lambda logits, aux, batch: optim.cross_entropy(logits, batch["label"],
                                                        source.num_classes, smoothing)


def predict_functions(method: Method, model, loss_fn, config) -> dict[str, Callable]:
  """The functions evaluators use: 'logits' and 'loss' (variables, batch), evaluation mode, plus
  the method's own `predict_fns(model, config)`."""

  def logits(variables, batch):
    args, kwargs = model_inputs(method, batch)
    return model.apply(variables, *args, train=False, **kwargs)[0]

  def loss(variables, batch):
    args, kwargs = model_inputs(method, batch)
    out, aux = model.apply(variables, *args, train=False, **kwargs)
    return loss_fn(out, aux, batch)

  fns = {"logits": logits, "loss": loss}
  if method.predict_fns is not None:
    fns.update(method.predict_fns(model, config))
  return fns


def params_loader(load: Callable[[dict, str], dict]) -> Callable[[dict, str], dict]:
  """A `loaders` entry from a loader of the params tree alone (ViT and Swin methods)."""
  return lambda variables, path: {**variables, "params": load(variables["params"], path)}
