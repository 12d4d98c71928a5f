"""Multi-label evaluation as LMPT reports it: mAP, head/medium/tail mAP, thresholded P/R/F1.

Host-side numpy on the whole split at once: the evaluator gathers the logits and multi-hot
batch['labels'] of every real example (padding rows, '_mask' False, dropped), then scores them.
Follows LMPT (Richard88888/LMPT) `lmpt/metrics.py` (`eval_map`, `ltAnalysis`) and `lmpt/test.py`:

  * Scores are the **softmax over classes** of the logits (`nn.Softmax(dim=1)` in train.py and
    test.py), not per-class sigmoids: `class_softmax`.
  * AP per class = sklearn's `average_precision_score` (non-interpolated: Σ_k (R_k − R_{k−1}) P_k
    over the distinct scores in decreasing order, tied scores form one step); mAP = the unweighted
    mean over classes. `average_precision` reimplements it (no sklearn dependency); a class with
    no positive example gets AP 0, as sklearn ≥ 1.1 gives (with a warning; older versions NaN).
  * head / medium / tail mAP: mean AP over the data source's `class_groups`
    (`multilabel_lt.class_groups`: training counts ≥ 100, [20, 100), < 20); an empty group gives
    NaN (the seed divides by zero). Sources without `class_groups` report mAP alone.
  * `--thre` (test.py, 0.3): predictions = softmax score > threshold (strictly). Per class
    precision and recall are 0 for a class with no true positive; CP, CR = their means; **CF1 =
    the mean of the per-class F1**, not the F1 of CP and CR. OP, OR over all (image, class)
    pairs; OF1 = 2·OP·OR/(OP + OR). Returned as fractions (test.py prints them ×100, mAP not).
    Deviation: where the seed divides 0 by 0 (no positive predictions at all: OP; OP = OR = 0:
    OF1) it prints NaN; 0 is returned here.

  config.evals.test = dict(type='multilabel', split='test', threshold=0.3)

`threshold` defaults to `config.lmpt.threshold` when the config has one, else 0.3.
"""
from __future__ import annotations

import numpy as np

from jaxprompt.evaluators import common

DEFAULT_THRESHOLD = 0.3  # test.py --thre


def class_softmax(logits) -> np.ndarray:
  """(N, C) logits -> softmax over classes, float64 (the seed's ranking scores)."""
  logits = np.asarray(logits, np.float64)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  if labels.ndim != 2 or labels.shape != scores.shape:
    raise ValueError(f"labels and scores must both be (N, C); got {labels.shape} and "
                     f"{scores.shape}.")
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError("labels must be multi-hot (0/1).")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf (the seed's eval prints 'Input contains NaN').")
  return labels.astype(bool), scores


def _binary_average_precision(positive: np.ndarray, score: np.ndarray) -> float:
  """sklearn's average precision of one class (see module docstring)."""
  num_positive = int(positive.sum())
  if num_positive == 0:
    return 0.0
  order = np.argsort(-score, kind="mergesort")
  positive, score = positive[order], score[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]  # end of each distinct score
  true_pos = np.cumsum(positive)[last_of_tie]
  precision = true_pos / (last_of_tie + 1)
  recall = true_pos / num_positive
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision(labels, scores) -> np.ndarray:
  """Per-class AP (C,), as sklearn `average_precision_score(labels, scores, average=None)`."""
  labels, scores = _check(labels, scores)
  return np.array([_binary_average_precision(labels[:, c], scores[:, c])
                   for c in range(labels.shape[1])])


def mean_average_precision(labels, scores) -> tuple[float, np.ndarray]:
  """(mAP, per-class APs): metrics.py `eval_map`."""
  aps = average_precision(labels, scores)
  return float(aps.mean()), aps


def group_mean_ap(aps, groups: dict[str, np.ndarray]) -> dict[str, float]:
  """{group: mean AP over its class ids} (`ltAnalysis`); NaN for an empty group."""
  aps = np.asarray(aps, np.float64)
  return {group: float(aps[ids].mean()) if len(ids) else float("nan")
          for group, ids in groups.items()}


def threshold_metrics(labels, scores, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
  """CP, CR, CF1, OP, OR, OF1 of the predictions score > threshold (test.py; fractions)."""
  labels, scores = _check(labels, scores)
  predicted = scores > threshold
  tp = np.sum(predicted & labels, axis=0).astype(np.float64)     # (C,)
  fp = np.sum(predicted & ~labels, axis=0).astype(np.float64)
  fn = np.sum(~predicted & labels, axis=0).astype(np.float64)
  hit = tp > 0  # classes without a true positive get precision = recall = F1 = 0
  precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=hit)
  recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=hit)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=hit)
  total_tp = tp.sum()
  op = total_tp / (tp + fp).sum() if (tp + fp).sum() else 0.0
  orec = total_tp / (tp + fn).sum() if (tp + fn).sum() else 0.0
  of1 = 2 * op * orec / (op + orec) if op + orec else 0.0
  return {"CP": float(precision.mean()), "CR": float(recall.mean()), "CF1": float(f1.mean()),
          "OP": float(op), "OR": float(orec), "OF1": float(of1)}


def evaluate(labels, logits, groups: dict[str, np.ndarray] | None = None,
             threshold: float | None = DEFAULT_THRESHOLD) -> dict[str, float]:
  """Everything the seed reports for one split, from logits: mAP, '<group>_mAP', CP ... OF1.

  Scores are `class_softmax(logits)`; groups e.g. `source.class_groups`; threshold None skips
  the thresholded metrics.
  """
  scores = class_softmax(logits)
  mean_ap, aps = mean_average_precision(labels, scores)
  results = {"mAP": mean_ap}
  if groups is not None:
    results.update({f"{g}_mAP": v for g, v in group_mean_ap(aps, groups).items()})
  if threshold is not None:
    results.update(threshold_metrics(labels, scores, threshold))
  return results


def threshold_setting(config, threshold) -> float:
  """`threshold`, else config.lmpt.threshold, else `DEFAULT_THRESHOLD`; checked in (0, 1)."""
  if threshold is None:
    threshold = ((config.get("lmpt") if config is not None else None) or {}).get(
        "threshold", DEFAULT_THRESHOLD)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
      not 0 < threshold < 1:
    raise ValueError(f"threshold={threshold!r}: expected a number in (0, 1) (scores are softmax "
                     "probabilities).")
  return float(threshold)


def metric_names(source, threshold) -> tuple[str, ...]:
  """The names `report` returns for `source` (its class groups) and `threshold`."""
  groups = getattr(source, "class_groups", None) or {}
  thresholded = ("CP", "CR", "CF1", "OP", "OR", "OF1") if threshold is not None else ()
  return ("mAP", *(f"{g}_mAP" for g in groups), *thresholded, "examples")


def report(evaluator: common.Evaluator, logits, labels, threshold: float) -> dict[str, float]:
  groups = getattr(evaluator.ctx.source, "class_groups", None)
  return {**evaluate(labels, logits, groups, threshold), "examples": int(len(labels))}


@common.register("multilabel")
class MultilabelEvaluator(common.Evaluator):
  """'mAP', '<group>_mAP', 'CP' ... 'OF1' and 'examples' of the method's 'logits' against
  batch['labels'] (multi-hot) on `split`."""
  NEEDS = ("logits",)

  def __init__(self, ctx: common.EvalContext, *, split: str, threshold: float | None = None):
    super().__init__(ctx, split=split)
    self.threshold = threshold_setting(ctx.config, threshold)
    logits_fn = ctx.predict_fns["logits"]
    self._step = self.jit(lambda variables, batch: (
        logits_fn(variables, batch), batch["labels"], batch["_mask"]), key="step")

  def metric_names(self) -> tuple[str, ...]:
    return metric_names(self.ctx.source, self.threshold)

  def run(self, variables) -> dict[str, float]:
    logits, labels = common.gather(self, self._step, self.ctx.batches(self.split), variables,
                                   keys=("labels",))
    return report(self, logits, labels, self.threshold)
