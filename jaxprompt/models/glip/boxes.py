"""GLIP anchors, box coding and IoU with the legacy maskrcnn-benchmark "+1" pixel convention.

Follows microsoft/GLIP (Li et al., CVPR 2022, arXiv 2112.03857, the ATSS head of §3):
`maskrcnn_benchmark/modeling/rpn/anchor_generator.py` (`generate_anchors`, `grid_anchors`), the
`BoxCoder` defined in `maskrcnn_benchmark/modeling/rpn/vldyhead.py` (the one the VLDyHead's loss
and post-processor use; note it is *not* `modeling/box_coder.py`, whose centres and decoded
corners differ by half a pixel) and `structures/boxlist_ops.py::boxlist_iou`.

Conventions (all boxes xyxy in resized-image pixels):
  * A box [x1, y1, x2, y2] covers the pixels x1..x2 inclusive: width = x2 - x1 + 1.
  * Centres are (x1 + x2) / 2. Decoding puts the corners at centre -/+ (w - 1) / 2, so
    decode(encode(gt, a), a) == gt exactly (up to float rounding).
  * One anchor per location (aspect ratio 1, one scale per octave), side `size` = 8 x stride,
    centred at (stride - 1) / 2 + shift: the stride-8 anchor at location (0, 0) is
    [-28, -28, 35, 35]. Locations are enumerated level by level (P3..P7), row-major inside a
    level (y outer, x inner), which is the order of the head's flattened outputs.

Every function except `anchors` takes jnp or numpy arrays and is jit-able; leading dimensions
broadcast.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

STRIDES = (8, 16, 32, 64, 128)  # P3..P7
ANCHOR_SIZES = (64, 128, 256, 512, 1024)  # MODEL.RPN.ANCHOR_SIZES of the GLIP configs
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (wx, wy, ww, wh), hard-coded in the VLDyHead coder
SIZE_DELTA_CLAMP = math.log(1000.0 / 16)  # dw, dh are clamped here before exp


def level_sizes(level_shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
  """((H, W) per level) -> (H*W per level): the number of anchors of each level."""
  return tuple(int(h) * int(w) for h, w in level_shapes)


def anchors(level_shapes: Sequence[tuple[int, int]], strides: Sequence[int] = STRIDES,
            sizes: Sequence[float] = ANCHOR_SIZES) -> np.ndarray:
  """(N, 4) float32 anchors, N = sum H*W, for pyramid levels of the given (H, W) grid shapes.

  Level l has one anchor of side sizes[l] per location of a grid with stride strides[l]; the
  base window is (0, 0, s - 1, s - 1), so the anchor at grid (y, x) is centred at
  ((s - 1) / 2 + x*s, (s - 1) / 2 + y*s) and spans centre -/+ (size - 1) / 2.
  """
  level_shapes = [tuple(int(v) for v in shape) for shape in level_shapes]
  if not len(level_shapes) == len(strides) == len(sizes):
    raise ValueError(f"anchors: got {len(level_shapes)} level shapes {level_shapes}, "
                     f"{len(strides)} strides {tuple(strides)} and {len(sizes)} sizes "
                     f"{tuple(sizes)}; expected one of each per pyramid level.")
  per_level = []
  for (height, width), stride, size in zip(level_shapes, strides, sizes):
    if height <= 0 or width <= 0:
      raise ValueError(f"anchors: level shape {(height, width)} must be positive.")
    centre = (stride - 1) / 2.0
    half = (size - 1) / 2.0
    base = np.array([centre - half, centre - half, centre + half, centre + half], np.float64)
    shift_y, shift_x = np.meshgrid(np.arange(height) * float(stride),
                                   np.arange(width) * float(stride), indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    per_level.append(shifts + base)
  return np.concatenate(per_level, axis=0).astype(np.float32)


def widths_heights_centres(boxes):
  """(..., 4) xyxy -> (w, h, cx, cy), each (...,), with the +1 widths and (x1 + x2) / 2 centres."""
  widths = boxes[..., 2] - boxes[..., 0] + 1.0
  heights = boxes[..., 3] - boxes[..., 1] + 1.0
  centre_x = (boxes[..., 0] + boxes[..., 2]) / 2.0
  centre_y = (boxes[..., 1] + boxes[..., 3]) / 2.0
  return widths, heights, centre_x, centre_y


def centres(boxes):
  """(..., 4) xyxy -> (..., 2) box centres (x, y)."""
  return jnp.stack([(boxes[..., 0] + boxes[..., 2]) / 2.0,
                    (boxes[..., 1] + boxes[..., 3]) / 2.0], axis=-1)


def encode(gt_boxes, anchor_boxes, weights: Sequence[float] = BOX_CODER_WEIGHTS):
  """Regression targets (..., 4) = (dx, dy, dw, dh) of gt_boxes relative to anchor_boxes."""
  wx, wy, ww, wh = weights
  anchor_w, anchor_h, anchor_cx, anchor_cy = widths_heights_centres(anchor_boxes)
  gt_w, gt_h, gt_cx, gt_cy = widths_heights_centres(gt_boxes)
  return jnp.stack([wx * (gt_cx - anchor_cx) / anchor_w,
                    wy * (gt_cy - anchor_cy) / anchor_h,
                    ww * jnp.log(gt_w / anchor_w),
                    wh * jnp.log(gt_h / anchor_h)], axis=-1)


def decode(deltas, anchor_boxes, weights: Sequence[float] = BOX_CODER_WEIGHTS):
  """Boxes (..., 4) xyxy from regression deltas (..., 4) relative to anchor_boxes.

  dw, dh are clamped from above at log(1000/16) before the exp, as in the original.
  """
  wx, wy, ww, wh = weights
  anchor_w, anchor_h, anchor_cx, anchor_cy = widths_heights_centres(anchor_boxes)
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, SIZE_DELTA_CLAMP)
  dh = jnp.minimum(deltas[..., 3] / wh, SIZE_DELTA_CLAMP)
  centre_x = dx * anchor_w + anchor_cx
  centre_y = dy * anchor_h + anchor_cy
  half_w = 0.5 * (jnp.exp(dw) * anchor_w - 1.0)
  half_h = 0.5 * (jnp.exp(dh) * anchor_h - 1.0)
  return jnp.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h],
                   axis=-1)


def areas(boxes):
  """(..., 4) xyxy -> (...,) areas (x2 - x1 + 1) * (y2 - y1 + 1)."""
  return (boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0)


def pairwise_iou(boxes1, boxes2):
  """IoU matrix (..., N, M) of boxes1 (..., N, 4) against boxes2 (..., M, 4), +1 areas."""
  left_top = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  right_bottom = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  overlap = jnp.clip(right_bottom - left_top + 1.0, 0.0)
  intersection = overlap[..., 0] * overlap[..., 1]
  union = areas(boxes1)[..., :, None] + areas(boxes2)[..., None, :] - intersection
  return intersection / union


def clip_to_image(boxes, image_size):
  """Clamps (..., K, 4) boxes into an image of (..., 2) = (height, width): x in [0, w - 1] and
  y in [0, h - 1] (`BoxList.clip_to_image`)."""
  image_size = jnp.asarray(image_size, boxes.dtype)
  max_x = image_size[..., 1, None] - 1.0
  max_y = image_size[..., 0, None] - 1.0
  return jnp.stack([jnp.clip(boxes[..., 0], 0.0, max_x), jnp.clip(boxes[..., 1], 0.0, max_y),
                    jnp.clip(boxes[..., 2], 0.0, max_x), jnp.clip(boxes[..., 3], 0.0, max_y)],
                   axis=-1)
