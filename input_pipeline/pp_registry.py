"""The registry of preprocessing ops and the builder that composes a pp spec into one function.

A pp spec is a string of ops joined by `|`, applied left to right to the example dict:

    "resize_shorter_side(256)|random_crop(224)|flip_lr|value_range(0, 1)|normalize('clip')"

Each op is a bare name (`flip_lr`) or a call with *literal* arguments only (numbers, strings,
tuples, lists, True/False/None), positional or by keyword. The design follows
google-research/big_vision `big_vision/pp/registry.py` (ops registered by name, a call string
parsed with `ast`) and `big_vision/pp/builder.py` (the `op|op(args)` language); what differs:

  * The whole spec is parsed once with `ast.parse(mode='eval')` as a chain of `|` (Python's
    bit-or), so a `|` inside a string argument is no separator and a syntax error names the
    spec. Arguments go through `ast.literal_eval` only: nothing in a spec is ever evaluated.
  * Arguments are checked at build time against the op factory's signature
    (`inspect.signature(...).bind`) and the factory runs then, so a typo or a bad value fails
    when the config is read, before any data flows, with the op and its signature in the error.
  * Randomness is stateless. The builder pops the example's '_seed' (a shape-(2,) int tensor
    that `pipeline.make_train_dataset` adds), gives it unchanged to the only random op of a
    spec, or `tf.random.experimental.stateless_split(seed, n)[i]` to random op i of n, and
    hands each random op its seed as the example's '_seed'; deterministic ops never see one.
    A random op on an example without '_seed' (evaluation) is an error that says so, except
    that a spec with a test-time op (`register(..., test_time=True)`: TPT's `tta_views`) is
    marked `test_time_augmentation`, and the trainer then seeds its evaluation examples
    (`pipeline.make_eval_dataset(augment_seed=config.seed)`).
  * After the last op the builder casts 'label' (a class index) to int32 (what the batched
    streams and the losses expect) and drops '_seed'.

An op is a factory registered with `@register('name')` (or `register('name', random=True)` when
it draws from '_seed'): `factory(*args, **kwargs)` validates its arguments and returns
`fn(example: dict) -> dict`. Ops take and return the whole example dict, so ops on boxes,
captions or several views can be added later. The shipped ops live in `pp_ops.py`; a new op is
one registered function there (or in any module imported before the spec is built), with no
change to this module or to `preprocess.py`.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any, Callable

import tensorflow as tf

Example = dict
OpFn = Callable[[Example], Example]


@dataclasses.dataclass(frozen=True)
class RegisteredOp:
  name: str
  factory: Callable[..., OpFn]
  random: bool
  test_time: bool = False


_REGISTRY: dict[str, RegisteredOp] = {}


def register(name: str, *, random: bool = False,
             test_time: bool = False) -> Callable[[Callable[..., OpFn]], Callable[..., OpFn]]:
  """Decorator: registers `factory(**kwargs) -> fn(example) -> example` as the pp op `name`.

  random=True: the op draws from the example's '_seed', which the builder provides per op.
  test_time=True (implies random): a test-time augmentation, random by design in evaluation; a
  spec holding one is built `test_time_augmentation`, so its evaluation examples get a seed.
  """
  if not name.isidentifier():
    raise ValueError(f"pp op name {name!r} must be a Python identifier (it is parsed as one).")

  def decorator(factory):
    if name in _REGISTRY:
      other = _REGISTRY[name].factory
      raise ValueError(f"pp op {name!r} is already registered (by {other.__module__}."
                       f"{other.__qualname__}).")
    _REGISTRY[name] = RegisteredOp(name, factory, random or test_time, test_time)
    return factory

  return decorator


def registered_ops() -> tuple[str, ...]:
  """The names of the registered ops, sorted."""
  return tuple(sorted(_REGISTRY))


def lookup(name: str) -> RegisteredOp:
  """The op called `name`; unknown names are an error listing the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown pp op {name!r}; known ops: {', '.join(registered_ops())}.")
  return _REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class OpCall:
  """One parsed op of a spec: its name, literal arguments and source text."""
  name: str
  args: tuple
  kwargs: dict[str, Any]
  text: str


def _literal(node: ast.AST, spec: str, op_text: str):
  try:
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    raise ValueError(
        f"pp op {op_text!r}: argument {ast.get_source_segment(spec, node)!r} is not a literal; "
        "ops take only literal arguments (numbers, strings, tuples, lists, True/False/None)."
    ) from None


def parse_spec(spec: str) -> list[OpCall]:
  """'a|b(1, k=2)|...' -> [OpCall('a', (), {}), OpCall('b', (1,), {'k': 2}), ...]; no eval."""
  if not isinstance(spec, str):
    raise TypeError(f"A pp spec is a string such as 'resize(224)|value_range(0, 1)'; got "
                    f"{type(spec).__name__} {spec!r}.")
  spec = spec.strip()
  if not spec:
    raise ValueError("The pp spec is empty; expected ops joined by '|', e.g. "
                     "'resize(224)|value_range(0, 1)'.")
  try:
    tree = ast.parse(spec, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"pp spec {spec!r} does not parse ({e.msg} at column {e.offset}); expected "
                     "ops joined by '|', e.g. 'resize(224)|flip_lr'.") from None
  nodes = []

  def flatten(node):
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
      flatten(node.left)
      flatten(node.right)
    else:
      nodes.append(node)

  flatten(tree)
  calls = []
  for node in nodes:
    text = ast.get_source_segment(spec, node)
    if isinstance(node, ast.Name):
      calls.append(OpCall(node.id, (), {}, text))
      continue
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      raise ValueError(f"pp spec {spec!r}: {text!r} is not an op; expected a name or a call "
                       "name(literal, ..., key=literal).")
    if any(isinstance(a, ast.Starred) for a in node.args) or any(
        k.arg is None for k in node.keywords):
      raise ValueError(f"pp op {text!r}: *args and **kwargs are not accepted; write each "
                       "argument as a literal.")
    args = tuple(_literal(a, spec, text) for a in node.args)
    kwargs = {k.arg: _literal(k.value, spec, text) for k in node.keywords}
    calls.append(OpCall(node.func.id, args, kwargs, text))
  return calls


def _missing_seed(text: str) -> ValueError:
  return ValueError(
      f"pp op {text!r} is random: it needs the example's '_seed' (a shape-(2,) int tensor, added "
      "by pipeline.make_train_dataset). Evaluation examples have none: use an eval spec of "
      "deterministic ops (e.g. center_crop instead of random_crop or random_resized_crop, and "
      "no flip_lr), or test-time views (tta_views), whose examples are seeded.")


def build(spec: str) -> OpFn:
  """The function `example -> example` that applies the ops of `spec` in order.

  Every op is looked up, its arguments bound to its signature and its factory called here, so
  errors surface before any data flows.
  """
  steps, test_time = [], False
  for call in parse_spec(spec):
    op = lookup(call.name)
    signature = inspect.signature(op.factory)
    signature = signature.replace(  # shown without annotations: name(size, method='bilinear')
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty)
    try:
      signature.bind(*call.args, **call.kwargs)
    except TypeError as e:
      raise ValueError(f"pp op {call.text!r}: {e}; expected {call.name}{signature}.") from None
    try:
      fn = op.factory(*call.args, **call.kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"pp op {call.text!r}: {e}") from None
    steps.append((op.random, fn, call.text))
    test_time = test_time or op.test_time
  num_random = sum(random for random, _, _ in steps)

  def preprocess(example: Example) -> Example:
    example = dict(example)
    seed = example.pop("_seed", None)
    if seed is not None and num_random > 1:
      op_seeds = list(tf.unstack(tf.random.experimental.stateless_split(seed, num_random)))
    else:
      op_seeds = [seed] * num_random
    for random, fn, text in steps:
      if random:
        if seed is None:
          raise _missing_seed(text)
        example["_seed"] = op_seeds.pop(0)
      example = fn(example)
      if not isinstance(example, dict):
        raise TypeError(f"pp op {text!r} returned {type(example).__name__}; ops return the "
                        "example dict.")
      example.pop("_seed", None)
    if "label" in example:
      example["label"] = tf.cast(example["label"], tf.int32)
    return example

  preprocess.test_time_augmentation = test_time  # evaluation seeds its examples (module doc)
  return preprocess
