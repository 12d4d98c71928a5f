"""GLIP detection post-processing (token scores -> class scores -> boxes -> class-aware NMS).

Follows microsoft/GLIP (Li et al., CVPR 2022, arXiv 2112.03857):
`maskrcnn_benchmark/modeling/rpn/inference.py` (`ATSSPostProcessor`,
`convert_grounding_to_od_logits`), `engine/inference.py`
(`create_positive_map_label_to_token_from_positive_map`), `structures/boxlist_ops.py`
(`boxlist_ml_nms`, `remove_small_boxes`), `structures/bounding_box.py` (`clip_to_image`) and the
multi-label NMS kernel `csrc/cuda/ml_nms.cu`. Test settings: `MODEL.ATSS.INFERENCE_TH` 0.05,
`PRE_NMS_TOP_N` 1000, `NMS_TH` 0.6, `DETECTIONS_PER_IMG` 100, `MODEL.DYHEAD.SCORE_AGG` "MEAN".

Order of operations, as in the original:
  1. token probabilities p = sigmoid(logits); the score of class c is the mean (or max) of p over
     the tokens of c's phrase (`class_token_map[c] > 0`); a class without tokens scores 0.
  2. per level and image, the (anchor, class) pairs with score > threshold (before centerness)
     are candidates; their score becomes score * sigmoid(centerness) and at most `pre_nms_top_n`
     of them (the highest) are kept per level.
  3. boxes are decoded from the anchor, the final score is sqrt(score * centerness), boxes are
     clipped to the unpadded resized image (x in [0, w - 1], y in [0, h - 1]) and boxes with a
     negative +1 width or height are dropped (`remove_small_boxes` with min_size 0).
  4. levels are concatenated, NMS runs per class at IoU > 0.6 (+1 areas) and the
     `detections_per_image` best survivors are returned. Labels are 1..C (contiguous).

Deliberate deviations (static shapes for jit):
  * Outputs are fixed-size: (B, detections_per_image) boxes / scores / labels / valid, sorted by
    descending score; rows past the detections hold zeros with valid False. The original returns
    a variable-length list in concatenation order and, on a tie at the 100th score (kthvalue
    threshold), may return a few more than 100 boxes; we return exactly the 100 first in
    descending order (ties: lower candidate index first).
  * `nms` is greedy NMS truncated after `max_outputs` kept boxes (see its docstring). Greedy NMS
    decides each box from the higher-scored ones only, so its first 100 keeps in score order are
    exactly the 100 best boxes of the full NMS the original runs before its top-100 cut.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxprompt.models.glip import boxes as box_ops

SCORE_THRESHOLD = 0.05  # MODEL.ATSS.INFERENCE_TH
PRE_NMS_TOP_N = 1000  # MODEL.ATSS.PRE_NMS_TOP_N
NMS_THRESHOLD = 0.6  # MODEL.ATSS.NMS_TH
DETECTIONS_PER_IMAGE = 100  # MODEL.ATSS.DETECTIONS_PER_IMG
SCORE_AGGREGATIONS = ("MEAN", "MAX")


def class_scores(token_probs, class_token_map, agg: str = "MEAN"):
  """(B, N, T) token probabilities -> (B, N, C) class scores.

  class_token_map (C, T): row c is nonzero on the tokens of class c + 1's phrase (a binary or
  normalised positive map). "MEAN" averages the probabilities over those tokens, "MAX" takes
  their maximum; a class with no token scores 0.
  """
  if agg not in SCORE_AGGREGATIONS:
    raise ValueError(f"class_scores: agg={agg!r}, expected one of {SCORE_AGGREGATIONS}.")
  if class_token_map.ndim != 2 or class_token_map.shape[-1] != token_probs.shape[-1]:
    raise ValueError(f"class_scores: class_token_map has shape {tuple(class_token_map.shape)}, "
                     f"expected (C, {token_probs.shape[-1]}) to match token_probs "
                     f"{tuple(token_probs.shape)}.")
  members = jnp.asarray(class_token_map) > 0  # (C, T)
  token_probs = token_probs.astype(jnp.float32)
  if agg == "MEAN":
    sums = jnp.einsum("bnt,ct->bnc", token_probs, members.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    counts = members.sum(-1).astype(jnp.float32)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)
  # Probabilities are >= 0, so filling non-members with 0 gives 0 for classes without tokens.
  # One class at a time: a (B, N, C, T) broadcast would not fit at GLIP's sizes (1.8 GB/image).
  per_class = jax.lax.map(lambda member: jnp.max(jnp.where(member, token_probs, 0.0), -1),
                          members)  # (C, B, N)
  return jnp.moveaxis(per_class, 0, -1)


def nms(boxes, scores, labels, valid, *, iou_threshold: float = NMS_THRESHOLD,
        max_outputs: int = DETECTIONS_PER_IMAGE):
  """Class-aware greedy NMS of one image with static shapes.

  boxes (K, 4) xyxy, scores (K,), labels (K,) int, valid (K,) bool. A box is suppressed by a
  higher-scored kept box of the same label with IoU (+1 areas) > iou_threshold. Returns
  (indices (max_outputs,) int32, kept (max_outputs,) bool): the kept boxes in descending score
  order (equal scores: lower index first), padded with kept False.

  Cost: a `lax.fori_loop` of max_outputs steps; each step picks the best live box (argmax over
  K) and suppresses against it (one row of K IoUs), so O(max_outputs * K) work and O(K) memory,
  instead of the K x K IoU matrix of a full NMS. With GLIP's 5 levels x 1000 candidates that is
  100 steps over 5000 boxes per image.
  """
  num_boxes = boxes.shape[0]
  positions = jnp.arange(num_boxes)

  def step(t, state):
    alive, indices, kept = state
    best = jnp.argmax(jnp.where(alive, scores, -jnp.inf))
    best = jnp.where(alive[best], best, jnp.argmax(alive))  # a live box with score -inf
    found = alive[best]
    ious = box_ops.pairwise_iou(boxes[best][None], boxes)[0]
    suppressed = ((ious > iou_threshold) & (labels == labels[best])) | (positions == best)
    alive = alive & ~suppressed
    return alive, indices.at[t].set(best.astype(jnp.int32)), kept.at[t].set(found)

  state = (jnp.asarray(valid, bool), jnp.zeros((max_outputs,), jnp.int32),
           jnp.zeros((max_outputs,), bool))
  _, indices, kept = jax.lax.fori_loop(0, max_outputs, step, state)
  return indices, kept


def _check_inputs(outputs: Mapping, anchors, class_token_map, image_size) -> None:
  missing = [k for k in ("token_logits", "box_regression", "centerness") if k not in outputs]
  if missing:
    raise ValueError(f"postprocess: outputs lacks {missing}; expected token_logits (B, N, T), "
                     f"box_regression (B, N, 4) and centerness (B, N).")
  batch_size, num_anchors, num_tokens = outputs["token_logits"].shape
  expected = {"box_regression": (batch_size, num_anchors, 4),
              "centerness": (batch_size, num_anchors)}
  for key, shape in expected.items():
    if tuple(outputs[key].shape) != shape:
      raise ValueError(f"postprocess: outputs[{key!r}] has shape {tuple(outputs[key].shape)}, "
                       f"expected {shape}.")
  if tuple(anchors.shape) != (num_anchors, 4):
    raise ValueError(f"postprocess: anchors have shape {tuple(anchors.shape)}, expected "
                     f"({num_anchors}, 4).")
  if class_token_map.ndim != 2 or class_token_map.shape[1] != num_tokens:
    raise ValueError(f"postprocess: class_token_map has shape {tuple(class_token_map.shape)}, "
                     f"expected (C, {num_tokens}).")
  if tuple(image_size.shape) != (batch_size, 2):
    raise ValueError(f"postprocess: image_size has shape {tuple(image_size.shape)}, expected "
                     f"({batch_size}, 2) = (height, width) of each resized image.")


def postprocess(outputs: Mapping, anchors, level_sizes: Sequence[int], class_token_map,
                image_size, *, score_threshold: float = SCORE_THRESHOLD,
                pre_nms_top_n: int = PRE_NMS_TOP_N, nms_threshold: float = NMS_THRESHOLD,
                detections_per_image: int = DETECTIONS_PER_IMAGE, score_agg: str = "MEAN") -> dict:
  """Detections of a batch from the head outputs, as `ATSSPostProcessor` (see module docstring).

  outputs: token_logits (B, N, T), box_regression (B, N, 4), centerness (B, N); anchors (N, 4);
  level_sizes the static anchors per level; class_token_map (C, T); image_size (B, 2) the
  (height, width) of each resized image before padding. Returns dict(boxes (B, D, 4) xyxy in
  resized-image pixels, scores (B, D), labels (B, D) int32 in 1..C, valid (B, D) bool), D =
  detections_per_image, sorted by descending score.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  class_token_map = jnp.asarray(class_token_map)
  image_size = jnp.asarray(image_size)
  _check_inputs(outputs, anchors, class_token_map, image_size)
  level_sizes = tuple(int(n) for n in level_sizes)
  if sum(level_sizes) != anchors.shape[0]:
    raise ValueError(f"postprocess: level_sizes {level_sizes} add up to {sum(level_sizes)}, "
                     f"expected the {anchors.shape[0]} anchors.")
  batch_size = outputs["token_logits"].shape[0]
  num_classes = class_token_map.shape[0]

  probs = jax.nn.sigmoid(outputs["token_logits"].astype(jnp.float32))
  scores = class_scores(probs, class_token_map, score_agg)  # (B, N, C)
  centerness = jax.nn.sigmoid(outputs["centerness"].astype(jnp.float32))  # (B, N)
  deltas = outputs["box_regression"].astype(jnp.float32)

  level_boxes, level_scores, level_labels, level_valid = [], [], [], []
  start = 0
  for size in level_sizes:
    level = slice(start, start + size)
    score = scores[:, level]  # (B, n, C)
    is_candidate = score > score_threshold
    ranked = jnp.where(is_candidate, score * centerness[:, level, None], -1.0)
    k = min(pre_nms_top_n, size * num_classes)
    values, flat = jax.lax.top_k(ranked.reshape(batch_size, -1), k)  # (B, k)
    locations = flat // num_classes + start
    level_labels.append((flat % num_classes + 1).astype(jnp.int32))
    level_valid.append(values >= 0.0)
    level_scores.append(jnp.sqrt(jnp.maximum(values, 0.0)))
    level_deltas = jnp.take_along_axis(deltas, locations[..., None], axis=1)
    level_boxes.append(box_ops.decode(level_deltas, anchors[locations]))
    start += size
  cand_boxes = box_ops.clip_to_image(jnp.concatenate(level_boxes, 1), image_size)  # (B, K, 4)
  cand_scores = jnp.concatenate(level_scores, 1)
  cand_labels = jnp.concatenate(level_labels, 1)
  cand_valid = (jnp.concatenate(level_valid, 1)
                & (cand_boxes[..., 2] - cand_boxes[..., 0] + 1.0 >= 0.0)
                & (cand_boxes[..., 3] - cand_boxes[..., 1] + 1.0 >= 0.0))

  indices, kept = jax.vmap(
      lambda b, s, l, v: nms(b, s, l, v, iou_threshold=nms_threshold,
                             max_outputs=detections_per_image))(
      cand_boxes, cand_scores, cand_labels, cand_valid)

  def gather(x):  # (B, K, ...) -> (B, D, ...) at the kept indices
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)

  return dict(boxes=jnp.where(kept[..., None], gather(cand_boxes), 0.0),
              scores=jnp.where(kept, gather(cand_scores), 0.0),
              labels=jnp.where(kept, gather(cand_labels), 0),
              valid=kept)
