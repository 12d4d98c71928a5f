"""Evaluators chosen by `config.evals`: the registry, the context they run in, and shared helpers.

After google-research/big_vision `big_vision/evaluators/common.py` (`from_config`): every entry
of `config.evals` names one evaluator,

  config.evals.val = dict(type='classification', split='test', every_steps=500)
  config.evals.zs = dict(type='zeroshot', split='test', templates='ensemble')

and its metrics are written as '{name}/{metric}'. Keys: `type` (a registered evaluator), `split`
(a split of the data source), `every_steps` or `every_epochs` (0: only the final evaluation), and
the evaluator's own settings (the keyword arguments of its `__init__`). Everything is checked when
the evaluators are built, before training: unknown type, unknown split, unknown or bad settings,
a predict function the method does not export.

An evaluator sees an `EvalContext` (config, data source, mesh, eval batches, the method's pure
predict functions), never the trainer. As in big_vision's jit evaluators, predict functions are
jitted once per evaluator with replicated outputs, so every process can read the results.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprompt import sharding

GENERIC_KEYS = ("type", "split", "every_steps", "every_epochs")
_REGISTRY: dict[str, type] = {}


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator may use (never the trainer).

  predict_fns (an evaluator asks for those it needs):
    'logits': (variables, batch) -> (B, C); 'loss': (variables, batch) -> (B,) or a scalar;
    'embed_image': (variables, images) -> (B, E) L2-normalised; 'embed_text': (variables,
    token_ids (N, L) int32) -> (N, E) L2-normalised; 'logit_scale': (variables) -> scalar, the
    exp'd CLIP scale; 'tokenize': host (list[str]) -> np.int32 (N, L).
  """
  config: Any  # the run's ConfigDict (methods' settings, e.g. config.lmpt.threshold)
  source: Any  # the input_pipeline DataSource (class_names, class_groups, splits, check_split)
  mesh: Any  # jax.sharding.Mesh with a 'data' axis (jaxprompt/sharding.py)
  batches: Callable[[str], Iterable[dict]]  # split -> global batches; padding: '_mask' False
  predict_fns: Mapping[str, Callable]  # the method's pure functions, see above


def register(type_name: str):
  """Class decorator: makes an `Evaluator` subclass available as `type=type_name`."""
  def wrap(cls):
    if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
      raise ValueError(f"Evaluator type {type_name!r} is registered twice.")
    cls.TYPE = type_name
    _REGISTRY[type_name] = cls
    return cls
  return wrap


def known_types() -> list[str]:
  return sorted(_REGISTRY)


class Evaluator:
  """Base class: `run(variables) -> {metric: float}` (names without the '{name}/' prefix, with
  'examples'). Subclasses list the predict functions they need in `NEEDS` (or call `require`)
  and take their settings as keyword-only `__init__` arguments. `from_config` sets `name` (the
  config key) and the period `every_steps` / `every_epochs` (0: only the final evaluation)."""
  TYPE = "?"
  NEEDS: tuple[str, ...] = ()

  def __init__(self, ctx: EvalContext, *, split: str):
    self.ctx, self.split = ctx, split
    self.name, self.every_steps, self.every_epochs = self.TYPE, 0, 0
    self._jitted: dict[Any, Callable] = {}
    self.require(*self.NEEDS)

  def require(self, *names: str) -> None:
    missing = [n for n in names if n not in self.ctx.predict_fns]
    if missing:
      raise ValueError(f"The {self.TYPE!r} evaluator needs the method's predict function(s) "
                       f"{missing}; the method exports {sorted(self.ctx.predict_fns)}.")

  def jit(self, fn: Callable, key: Any = None) -> Callable:
    """`fn` jitted once for this evaluator (cached under `key`, default `fn`), outputs
    replicated over the mesh so that every process can `device_get` them."""
    key = fn if key is None else key
    if key not in self._jitted:
      self._jitted[key] = jax.jit(fn, out_shardings=NamedSharding(self.ctx.mesh, P()))
    return self._jitted[key]

  def predict(self, name: str) -> Callable:
    """The method's predict function `name`, jitted (see `jit`)."""
    return self.jit(self.ctx.predict_fns[name], key=("predict", name))

  def interval(self, steps_per_epoch: int) -> int:
    """Steps between evaluations during training (0: only at the end)."""
    if self.every_steps:
      return int(self.every_steps)
    return max(1, int(round(self.every_epochs * steps_per_epoch))) if self.every_epochs else 0

  def due(self, step: int, steps_per_epoch: int) -> bool:
    interval = self.interval(steps_per_epoch)
    return bool(interval) and step % interval == 0

  def run(self, variables) -> dict[str, float]:
    raise NotImplementedError

  def metric_names(self) -> tuple[str, ...]:
    """The metrics `run` returns (unprefixed), known before it runs: `config.keep_best` is
    checked against them at start."""
    raise NotImplementedError


def check_batch(evaluator: Evaluator, batch: dict, *keys: str) -> None:
  """The batch has `keys`; else an error naming the evaluator, its split and the batch's keys."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"The {evaluator.TYPE!r} evaluator {evaluator.name!r} needs batches with "
                     f"{missing}; split {evaluator.split!r} has {sorted(batch)}.")


def gather(evaluator: Evaluator, step: Callable, batches: Iterable[dict], *args,
           keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
  """The outputs of `step(*args, batch) -> (*outputs, mask)` over every batch (replicated, so any
  process can read them), concatenated on the host with the padding rows dropped. `keys`: the
  batch keys the step reads, checked on the first batch."""
  parts = []
  for batch in batches:
    if not parts:
      check_batch(evaluator, batch, *keys, "_mask")
    parts.append(jax.device_get(step(*args, batch)))
  if not parts:
    raise ValueError(f"Split {evaluator.split!r} of evaluator {evaluator.name!r} gave no batches.")
  *outputs, mask = (np.concatenate(column) for column in zip(*parts))
  keep = mask.astype(bool)
  return tuple(output[keep] for output in outputs)


def _entry_dict(name: str, entry) -> dict:
  if hasattr(entry, "to_dict"):
    entry = entry.to_dict()
  if not isinstance(entry, Mapping):
    raise ValueError(f"config.evals.{name} must be a dict with 'type' and 'split'; got "
                     f"{entry!r}.")
  return dict(entry)


def build(name: str, entry, ctx: EvalContext) -> Evaluator:
  """One evaluator from its config entry (see the module docstring), checked."""
  settings = _entry_dict(name, entry)
  where = f"config.evals.{name}"
  type_name = settings.pop("type", None)
  if type_name not in _REGISTRY:
    raise ValueError(f"{where}: unknown evaluator type {type_name!r}; known types: "
                     f"{known_types()}.")
  if "split" not in settings:
    raise ValueError(f"{where} (type {type_name!r}) needs a 'split'; the data source has "
                     f"{list(getattr(ctx.source, 'splits', []))}.")
  try:
    ctx.source.check_split(settings["split"])
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  every = {}
  for key in ("every_steps", "every_epochs"):
    value = settings.pop(key, 0) or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f"{where}.{key}={value!r}: expected a number >= 0.")
    every[key] = value
  if every["every_steps"] and every["every_epochs"]:
    raise ValueError(f"{where}: set every_steps or every_epochs, not both (got "
                     f"{every['every_steps']} and {every['every_epochs']}).")
  if every["every_steps"] and every["every_steps"] != int(every["every_steps"]):
    raise ValueError(f"{where}.every_steps={every['every_steps']!r}: expected an integer.")
  cls = _REGISTRY[type_name]
  params = inspect.signature(cls.__init__).parameters
  valid = sorted(k for k, p in params.items() if p.kind == p.KEYWORD_ONLY)
  unknown = sorted(set(settings) - set(valid))
  if unknown:
    raise ValueError(f"{where} (type {type_name!r}): unknown setting(s) {unknown}; valid: "
                     f"{sorted(set(valid) | set(GENERIC_KEYS))}.")
  missing = sorted(k for k in valid if params[k].default is inspect.Parameter.empty
                   and k not in settings)
  if missing:
    raise ValueError(f"{where} (type {type_name!r}): missing setting(s) {missing}.")
  try:
    evaluator = cls(ctx, **settings)
  except ValueError as e:
    raise ValueError(f"{where} (type {type_name!r}): {e}") from None
  evaluator.name = name
  evaluator.every_steps, evaluator.every_epochs = int(every["every_steps"]), every["every_epochs"]
  return evaluator


def from_config(evals, ctx: EvalContext) -> dict[str, Evaluator]:
  """{name: evaluator} for every entry of `evals` (`config.evals`), all checked."""
  if evals is None:
    return {}
  if not isinstance(evals, Mapping) and not hasattr(evals, "items"):
    raise ValueError(f"config.evals must be a dict of name -> evaluator settings; got {evals!r}.")
  return {name: build(name, entry, ctx) for name, entry in evals.items()}


def run_all(evaluators: Mapping[str, Evaluator], variables, *, step: int | None = None,
            steps_per_epoch: int = 1) -> dict[str, float]:
  """'{name}/{metric}' of every evaluator due at `step` (all of them when step is None)."""
  metrics = {}
  for name, evaluator in evaluators.items():
    if step is None or evaluator.due(step, steps_per_epoch):
      metrics.update({f"{name}/{k}": v for k, v in evaluator.run(variables).items()})
  return metrics


def eval_batches(source, eval_pp, batch_size: int, mesh, *,
                 augment_seed: int | None = None) -> Callable[[str], Iterable[dict]]:
  """split -> one pass of global batches (every example once, padding rows '_mask' False): the
  input pipeline's eval dataset of this process, assembled into mesh-sharded jax.Arrays.
  augment_seed: an int gives every example a '_seed' for random pp ops (test-time views,
  `tta_views`), a function of the seed and the example's index in the split only."""
  # Imported here: the input pipeline pulls in TensorFlow, which the evaluators do not need.
  from input_pipeline import pipeline  # pylint: disable=import-outside-toplevel

  def batches(split: str):
    dataset = pipeline.make_eval_dataset(
        source, split, eval_pp, global_batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        augment_seed=augment_seed)
    for local in dataset.as_numpy_iterator():
      yield sharding.global_batch(local, mesh)

  return batches
