"""GLIP's training targets (ATSS assignment) and losses, jit-able with static shapes.

Follows microsoft/GLIP (Li et al., CVPR 2022, arXiv 2112.03857; ATSS: Zhang et al., CVPR 2020,
arXiv 1912.02424): `maskrcnn_benchmark/modeling/rpn/loss.py` (`ATSSLossComputation`:
`prepare_targets`, `compute_centerness_targets`, `GIoULoss`, `__call__`),
`maskrcnn_benchmark/layers/sigmoid_focal_loss.py` (`token_sigmoid_binary_focal_loss`, the
"binary" version used for `loss_dot_product_token`), `modeling/rpn/vldyhead.py`
(`VLDyHeadModule._forward_train`) and the NaN guard of `engine/trainer.py::do_train`.

Assignment, per image (`assign`, vmapped over the batch by `build_targets`):
  1. IoU of every anchor with every GT (+1 areas); Euclidean distance between anchor and GT
     centres.
  2. Per pyramid level, the min(top_k, anchors in the level) anchors closest to each GT are its
     candidates.
  3. A candidate is positive for the GT if its IoU >= mean + std (unbiased) of the GT's candidate
     IoUs and its centre lies strictly inside the GT (min(l, t, r, b) > 0.01).
  4. An anchor positive for several GTs takes the one with the largest IoU (first on ties).
Targets: a positive anchor learns its GT's row of the (binarised) positive map, a negative one
the "no-object" slot only (the last token index T - 1, which the text mask normally hides).

Losses (fp32): token sigmoid focal loss (alpha 0.25, gamma 2) over every (anchor, token) pair
whose token is valid in the text mask, summed and divided by max(#positives, 1); GIoU of decoded
boxes (areas without +1, eps 1e-7) weighted by the centerness targets and divided by their sum,
times 2.0; centerness BCE-with-logits summed over positives and divided by max(#positives, 1).
`loss_cls` of the original is multiplied by 0 and is left out. The total is the sum of the three
with a NaN total replaced by 0, as in `do_train`.

Deliberate deviations:
  * Normalisers are batch-global sums. The original divides each GPU's sum by the positives (or
    centerness targets) summed over GPUs and divided by the number of GPUs G, then DDP averages
    the gradients; the resulting update is sum / global count, which is what a sharded jit of
    these functions computes (XLA inserts the all-reduce). For the positive count the original
    floor is max(P / G, 1), i.e. max(P, G) after the averaging; we use max(P, 1), which agrees
    whenever a global batch has at least G positives.
  * Static shapes: GT boxes are padded to M rows with a validity mask; padded rows never become
    candidates' owners or positives. A negative anchor's matched index is 0 (as in the
    original), and its box/centerness targets are replaced by safe placeholders that no loss
    reads.
  * GIoU and centerness targets use the matched GT box itself instead of decode(encode(GT)),
    which is the same box up to float rounding.
  * Ties in the centre-distance top-k go to the lower anchor index (torch.topk leaves the order
    of ties unspecified).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxprompt.models.glip import boxes as box_ops

ATSS_TOP_K = 9  # MODEL.ATSS.TOPK
FOCAL_ALPHA = 0.25  # MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA
FOCAL_GAMMA = 2.0  # MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA
REG_LOSS_WEIGHT = 2.0  # MODEL.ATSS.REG_LOSS_WEIGHT
CENTRE_INSIDE_MARGIN = 0.01
GIOU_EPS = 1e-7
_NOT_POSITIVE = -1e8  # the original's -INF fill for (anchor, GT) pairs that are not positive

OUTPUT_KEYS = ("token_logits", "box_regression", "centerness")
BATCH_KEYS = ("boxes", "box_mask", "positive_map", "text_mask")


def _check_level_sizes(level_sizes: Sequence[int], num_anchors: int) -> tuple[int, ...]:
  level_sizes = tuple(int(n) for n in level_sizes)
  if sum(level_sizes) != num_anchors or min(level_sizes, default=0) <= 0:
    raise ValueError(f"level_sizes {level_sizes} (sum {sum(level_sizes)}) must be positive and "
                     f"add up to the {num_anchors} anchors.")
  return level_sizes


def assign(anchors, level_sizes: Sequence[int], gt_boxes, gt_valid, top_k: int = ATSS_TOP_K):
  """ATSS assignment of one image: (matched GT index (N,) int32, positive (N,) bool).

  anchors (N, 4) xyxy concatenated over levels of `level_sizes` anchors each (static ints);
  gt_boxes (M, 4) xyxy; gt_valid (M,) bool, False for padding rows. A negative anchor's matched
  index is 0.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  level_sizes = _check_level_sizes(level_sizes, anchors.shape[0])
  num_gt = gt_boxes.shape[0]
  if num_gt == 0:
    return jnp.zeros(anchors.shape[:1], jnp.int32), jnp.zeros(anchors.shape[:1], bool)
  gt_valid = jnp.asarray(gt_valid, bool)
  # Padding rows may hold anything; give them a harmless box so nothing below turns NaN.
  gt_boxes = jnp.where(gt_valid[:, None], gt_boxes, jnp.array([0.0, 0.0, 1.0, 1.0]))

  ious = box_ops.pairwise_iou(gt_boxes, anchors)  # (M, N)
  anchor_centres = box_ops.centres(anchors)  # (N, 2)
  gt_centres = box_ops.centres(gt_boxes)  # (M, 2)
  distances = jnp.sqrt(jnp.sum((gt_centres[:, None, :] - anchor_centres[None, :, :]) ** 2, -1))

  candidates = []  # per level (M, k_l) anchor indices
  start = 0
  for size in level_sizes:
    k = min(top_k, size)
    _, nearest = jax.lax.top_k(-distances[:, start:start + size], k)
    candidates.append(nearest + start)
    start += size
  candidates = jnp.concatenate(candidates, axis=1)  # (M, K)

  candidate_ious = jnp.take_along_axis(ious, candidates, axis=1)  # (M, K)
  threshold = candidate_ious.mean(axis=1) + jnp.std(candidate_ious, axis=1, ddof=1)
  candidate_centres = anchor_centres[candidates]  # (M, K, 2)
  sides = jnp.stack([candidate_centres[..., 0] - gt_boxes[:, None, 0],
                     candidate_centres[..., 1] - gt_boxes[:, None, 1],
                     gt_boxes[:, None, 2] - candidate_centres[..., 0],
                     gt_boxes[:, None, 3] - candidate_centres[..., 1]], axis=-1)
  is_positive = ((candidate_ious >= threshold[:, None])
                 & (sides.min(axis=-1) > CENTRE_INSIDE_MARGIN) & gt_valid[:, None])

  # (M, N) IoU where the pair is positive, the -INF fill elsewhere; candidates of one GT are
  # distinct anchors, so the scatter writes each cell at most once.
  rows = jnp.broadcast_to(jnp.arange(num_gt)[:, None], candidates.shape)
  positive_ious = jnp.full(ious.shape, _NOT_POSITIVE, jnp.float32).at[rows, candidates].max(
      jnp.where(is_positive, candidate_ious, _NOT_POSITIVE))
  matched = jnp.argmax(positive_ious, axis=0).astype(jnp.int32)  # first maximum, as torch.max
  positive = positive_ious.max(axis=0) > _NOT_POSITIVE
  return jnp.where(positive, matched, 0), positive


def centerness_targets(anchors, target_boxes):
  """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of anchor centres (..., 4) inside
  target_boxes (..., 4): the distances from the anchor centre to the box sides."""
  anchor_centres = box_ops.centres(anchors)
  left = anchor_centres[..., 0] - target_boxes[..., 0]
  top = anchor_centres[..., 1] - target_boxes[..., 1]
  right = target_boxes[..., 2] - anchor_centres[..., 0]
  bottom = target_boxes[..., 3] - anchor_centres[..., 1]
  return jnp.sqrt(jnp.minimum(left, right) / jnp.maximum(left, right)
                  * jnp.minimum(top, bottom) / jnp.maximum(top, bottom))


def build_targets(anchors, level_sizes: Sequence[int], gt_boxes, gt_valid, positive_map,
                  top_k: int = ATSS_TOP_K) -> dict:
  """Per-anchor targets of a batch, vmapping `assign`.

  gt_boxes (B, M, 4), gt_valid (B, M) bool, positive_map (B, M, T) (binarised with > 0).
  Returns dict(positive (B, N) bool, matched (B, N) int32, token_targets (B, N, T) float32,
  box_targets (B, N, 4) matched GT boxes (the anchor itself for negatives),
  centerness_targets (B, N) (0 for negatives)).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  matched, positive = jax.vmap(lambda b, v: assign(anchors, level_sizes, b, v, top_k))(
      gt_boxes, gt_valid)
  num_tokens = positive_map.shape[-1]
  binary_map = (jnp.asarray(positive_map) > 0).astype(jnp.float32)
  matched_rows = jnp.take_along_axis(binary_map, matched[..., None], axis=1)  # (B, N, T)
  no_object = jax.nn.one_hot(num_tokens - 1, num_tokens, dtype=jnp.float32)
  token_targets = jnp.where(positive[..., None], matched_rows, no_object)
  matched_boxes = jnp.take_along_axis(gt_boxes, matched[..., None], axis=1)  # (B, N, 4)
  box_targets = jnp.where(positive[..., None], matched_boxes, anchors[None])
  centerness = jnp.where(positive, centerness_targets(anchors[None], box_targets), 0.0)
  return dict(positive=positive, matched=matched, token_targets=token_targets,
              box_targets=box_targets, centerness_targets=centerness)


def token_focal_loss(logits, targets, text_mask, num_positive, alpha: float = FOCAL_ALPHA,
                     gamma: float = FOCAL_GAMMA):
  """Binary sigmoid focal loss over (B, N, T) pairs whose token is valid in text_mask (B, T),
  summed and divided by max(num_positive, 1)."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.sigmoid(logits)
  # binary_cross_entropy_with_logits, in its overflow-free form.
  cross_entropy = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
  alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
  losses = alpha_t * cross_entropy * (1.0 - p_t) ** gamma
  valid = (jnp.asarray(text_mask) > 0)[:, None, :]
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(num_positive, 1.0)


def giou_loss(deltas, target_boxes, anchors, weights):
  """sum(weights * (1 - GIoU(decode(deltas), target_boxes))) / sum(weights), 0 if no weight.

  deltas, target_boxes (..., 4), anchors broadcastable to them, weights (...) (the centerness
  targets, 0 on anchors that do not count). Areas without +1, eps 1e-7 as `GIoULoss`.
  """
  pred = box_ops.decode(deltas.astype(jnp.float32), anchors)
  pred_x1, pred_y1 = pred[..., 0], pred[..., 1]
  pred_x2 = jnp.maximum(pred_x1, pred[..., 2])
  pred_y2 = jnp.maximum(pred_y1, pred[..., 3])
  pred_area = (pred_x2 - pred_x1) * (pred_y2 - pred_y1)
  tgt_x1, tgt_y1, tgt_x2, tgt_y2 = (target_boxes[..., i] for i in range(4))
  target_area = (tgt_x2 - tgt_x1) * (tgt_y2 - tgt_y1)
  inter_x1, inter_y1 = jnp.maximum(pred_x1, tgt_x1), jnp.maximum(pred_y1, tgt_y1)
  inter_x2, inter_y2 = jnp.minimum(pred_x2, tgt_x2), jnp.minimum(pred_y2, tgt_y2)
  overlaps = (inter_x2 > inter_x1) & (inter_y2 > inter_y1)
  intersection = jnp.where(overlaps, (inter_x2 - inter_x1) * (inter_y2 - inter_y1), 0.0)
  enclosing = ((jnp.maximum(pred_x2, tgt_x2) - jnp.minimum(pred_x1, tgt_x1))
               * (jnp.maximum(pred_y2, tgt_y2) - jnp.minimum(pred_y1, tgt_y1)) + GIOU_EPS)
  union = pred_area + target_area - intersection + GIOU_EPS
  gious = intersection / union - (enclosing - union) / enclosing
  weight_sum = jnp.sum(weights)
  weighted = jnp.sum(jnp.where(weights > 0, weights * (1.0 - gious), 0.0))
  return jnp.where(weight_sum > 0, weighted / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)


def centerness_loss(logits, targets, positive, num_positive):
  """BCE-with-logits of centerness logits (...) against targets, summed over positive anchors
  and divided by max(num_positive, 1)."""
  logits = logits.astype(jnp.float32)
  losses = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(jnp.where(positive, losses, 0.0)) / jnp.maximum(num_positive, 1.0)


def _check_inputs(outputs: Mapping, batch: Mapping, num_anchors: int) -> None:
  for name, mapping, keys in (("outputs", outputs, OUTPUT_KEYS), ("batch", batch, BATCH_KEYS)):
    missing = [k for k in keys if k not in mapping]
    if missing:
      raise ValueError(f"glip_losses: {name} lacks {missing}; expected keys {list(keys)}.")
  batch_size, num_boxes = batch["boxes"].shape[:2]
  num_tokens = outputs["token_logits"].shape[-1]
  expected = {
      ("outputs", "token_logits"): (batch_size, num_anchors, num_tokens),
      ("outputs", "box_regression"): (batch_size, num_anchors, 4),
      ("outputs", "centerness"): (batch_size, num_anchors),
      ("batch", "boxes"): (batch_size, num_boxes, 4),
      ("batch", "box_mask"): (batch_size, num_boxes),
      ("batch", "positive_map"): (batch_size, num_boxes, num_tokens),
      ("batch", "text_mask"): (batch_size, num_tokens),
  }
  for (where, key), shape in expected.items():
    got = tuple((outputs if where == "outputs" else batch)[key].shape)
    if got != shape:
      raise ValueError(f"glip_losses: {where}[{key!r}] has shape {got}, expected {shape} "
                       f"(B, N anchors, M boxes, T tokens).")


def glip_losses(outputs: Mapping, batch: Mapping, anchors, level_sizes: Sequence[int], *,
                top_k: int = ATSS_TOP_K, focal_alpha: float = FOCAL_ALPHA,
                focal_gamma: float = FOCAL_GAMMA,
                reg_loss_weight: float = REG_LOSS_WEIGHT) -> dict:
  """GLIP's ATSS losses of a batch: dict(loss_token, loss_reg, loss_centerness, total).

  outputs: token_logits (B, N, T), box_regression (B, N, 4), centerness (B, N).
  batch: boxes (B, M, 4) xyxy (+1 convention, resized-image pixels), box_mask (B, M) bool,
  positive_map (B, M, T), text_mask (B, T). anchors (N, 4) from `boxes.anchors`, level_sizes the
  static anchors per level. Normalisers are sums over the whole batch (see the module docstring).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  level_sizes = _check_level_sizes(level_sizes, anchors.shape[0])
  _check_inputs(outputs, batch, anchors.shape[0])
  targets = build_targets(anchors, level_sizes, batch["boxes"], batch["box_mask"],
                          batch["positive_map"], top_k)
  targets = jax.lax.stop_gradient(targets)
  positive = targets["positive"]
  num_positive = jnp.sum(positive).astype(jnp.float32)
  loss_token = token_focal_loss(outputs["token_logits"], targets["token_targets"],
                                batch["text_mask"], num_positive, focal_alpha, focal_gamma)
  loss_reg = reg_loss_weight * giou_loss(outputs["box_regression"], targets["box_targets"],
                                         anchors[None], targets["centerness_targets"])
  loss_centerness = centerness_loss(outputs["centerness"], targets["centerness_targets"],
                                    positive, num_positive)
  total = loss_token + loss_reg + loss_centerness
  total = jnp.where(jnp.isnan(total), 0.0, total)  # do_train: `losses[losses != losses] = 0`
  return dict(loss_token=loss_token, loss_reg=loss_reg, loss_centerness=loss_centerness,
              total=total)

