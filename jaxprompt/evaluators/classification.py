"""Single-label classification: top-1 accuracy and mean loss over every example of a split.

After google-research/big_vision `big_vision/evaluators/classification.py`: per batch, jitted,
the masked sums of correct predictions, losses and real examples (the eval pipeline pads the last
batches with '_mask' False rows, which never count), added up on device and divided once at the
end. Accuracy is argmax(logits) == batch['label']; the loss is the method's own ('loss': per
example, or one scalar for the batch, then counted for each of its real examples).

  config.evals.test = dict(type='classification', split='test')
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from jaxprompt.evaluators import common


def masked_sums(logits, loss, batch) -> dict:
  """{'correct', 'loss', 'count'}: sums over the batch's real ('_mask') examples."""
  mask = batch["_mask"].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  loss = jnp.broadcast_to(jnp.asarray(loss, jnp.float32), mask.shape)
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
          "count": jnp.sum(mask)}


def accuracy_and_loss(evaluator: common.Evaluator, step: Callable, batches: Iterable[dict],
                      *args) -> dict[str, float]:
  """Adds up `step(*args, batch)` (-> `masked_sums`) over `batches`: accuracy, loss, examples."""
  totals = None
  for batch in batches:
    if totals is None:
      common.check_batch(evaluator, batch, "label", "_mask")
    sums = step(*args, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f"Split {evaluator.split!r} of evaluator {evaluator.name!r} gave no batches.")
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
          "examples": int(totals["count"])}


@common.register("classification")
class ClassificationEvaluator(common.Evaluator):
  """'accuracy', 'loss' and 'examples' of the method's 'logits' and 'loss' on `split`."""
  NEEDS = ("logits", "loss")

  def __init__(self, ctx: common.EvalContext, *, split: str):
    super().__init__(ctx, split=split)
    logits_fn, loss_fn = ctx.predict_fns["logits"], ctx.predict_fns["loss"]
    # One jit for both, so that XLA can share the forward pass they both run.
    self._step = self.jit(lambda variables, batch: masked_sums(
        logits_fn(variables, batch), loss_fn(variables, batch), batch), key="step")

  def metric_names(self) -> tuple[str, ...]:
    return ("accuracy", "loss", "examples")

  def run(self, variables) -> dict[str, float]:
    return accuracy_and_loss(self, self._step, self.ctx.batches(self.split), variables)
