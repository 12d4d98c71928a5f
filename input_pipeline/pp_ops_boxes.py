"""Box-aware pp ops for GLIP detection examples (`detection.py`'s contract): resize, flip,
normalise, and pad images and boxes to fixed sizes for batching.

  resize_glip(min_size=800, max_size=1333)       shorter side -> min_size, longer <= max_size;
                                                 boxes scaled; sets 'image_size'
  resize_glip_multi(min_sizes=(480, 560, 640, 720, 800), max_size=1333)
                                                 random ('_seed'): min_size drawn from min_sizes
  flip_lr_boxes(p=0.5)                           random ('_seed'): mirror image and boxes
  to_bgr255_normalize(mean=(103.53, 116.28, 123.675), std=(57.375, 57.12, 58.395))
                                                 RGB -> BGR on the 0..255 scale, (x - mean) / std
  pad_image(height, width, size_divisible=0)     zeros at the bottom/right up to a fixed canvas;
                                                 sets 'image_size' (the size before padding);
                                                 size_divisible=32: evaluated at the multiple of
                                                 32 of the image's own size (GLIP's padding)
  pad_boxes(max_boxes, drop_extra=False)         boxes/box_labels/positive_map padded to M rows
                                                 with zeros, plus 'box_mask' bool (M,)

A GLIP recipe reads, for a 128x128 demo:
  train: resize_glip(128, 128)|flip_lr_boxes|to_bgr255_normalize|pad_image(128, 128)|pad_boxes(8)
  eval:  resize_glip(128, 128)|to_bgr255_normalize|pad_image(128, 128)|pad_boxes(8, True)
and for COCO at GLIP's test size resize_glip(800, 1333)|...|pad_image(1344, 1344)|pad_boxes(M)
(train) and resize_glip(800, 1333)|...|pad_image(1344, 1344, size_divisible=32)|pad_boxes(M, True)
(eval: an 800 x 1066 image is evaluated at 800 x 1088). Flip before padding (it mirrors about the
image's current width).

Follows microsoft/GLIP `maskrcnn_benchmark/data/transforms/transforms.py` (`Resize.get_size`,
`RandomHorizontalFlip`, `ToTensor` + `Normalize(format='bgr255')`), `transforms/build.py` (their
order: resize, flip, to-tensor, normalise) and `structures/bounding_box.py` (`BoxList.resize`:
x scaled by new_w / old_w and y by new_h / old_h; `BoxList.transpose(FLIP_LEFT_RIGHT)`:
x1' = W - x2 - 1, x2' = W - x1 - 1).

Deliberate deviations:
  * Images are resized with TF's bilinear kernel with antialiasing (`pp_ops.resize_image`), as
    PIL's bilinear filter widens its support when downsampling; PIL then rounds to uint8 and GLIP
    normalises those integers, while the floats are kept here.
  * GLIP pads each batch to its largest image rounded up to a multiple of 32
    (`DATALOADER.SIZE_DIVISIBILITY`, `structures/image_list.py` `to_image_list`), and its fusion
    attends to the padded area. Here every image is padded to one fixed canvas (static shapes for
    jit). With `size_divisible=32` evaluation follows GLIP exactly: each image is cut back to the
    multiple of 32 of its own size and batched only with images of that padded size (one compiled
    shape per padded size), which is GLIP's padding at its TEST.IMS_PER_BATCH 1 and at any eval
    batch size. Training stays on the canvas (one compiled train step; GLIP's own per-GPU
    training batches are padded to their largest image, a shape that changes every step). The
    zeros are added after normalisation, as in GLIP.
  * GLIP keeps every box of an image (its batches are lists); here an example carries at most
    M = max_boxes. More boxes than M is an error by default, naming the image id, so targets are
    never cut silently; `drop_extra=True` keeps the first M in the source's order (for eval
    streams, whose boxes the COCO evaluator does not read, or a deliberate cap).
  * `to_bgr255_normalize` uses the 0..255 values directly; GLIP's ToTensor (x / 255) then x 255
    gives the same values up to float rounding.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from input_pipeline import detection, pipeline, pp_ops
from input_pipeline.pp_registry import register

GLIP_PIXEL_MEAN = (103.53, 116.28, 123.675)  # BGR, 0..255 (GLIP's INPUT.PIXEL_MEAN)
GLIP_PIXEL_STD = (57.375, 57.12, 58.395)
GLIP_MULTI_MIN_SIZES = (480, 560, 640, 720, 800)  # AUGMENT.MULT_MIN_SIZE_TRAIN (pre-training)
GLIP_SIZE_DIVISIBILITY = 32  # DATALOADER.SIZE_DIVISIBILITY


def _require(example: dict, keys, op: str) -> None:
  missing = [k for k in keys if k not in example]
  if missing:
    raise KeyError(f"pp op {op} needs the example keys {missing}; its keys are "
                   f"{sorted(example)} (a detection source's examples have 'image', 'boxes', "
                   "'box_labels', 'positive_map', ...).")


def glip_output_size(height: int, width: int, min_size: int,
                     max_size: int | None) -> tuple[int, int]:
  """(new_h, new_w) of GLIP's `Resize.get_size` for an image of (height, width), in Python:
  shorter side -> min_size unless the longer would exceed max_size, in which case the shorter
  side is round(max_size * short / long); the longer side is int(size * long / short)."""
  size = min_size
  if max_size is not None:
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
      size = int(round(max_size * short / long))
  if (width <= height and width == size) or (height <= width and height == size):
    return height, width
  if width < height:
    return int(size * height / width), size
  return size, int(size * width / height)


def _glip_output_size_tf(height, width, min_size, max_size):
  """`glip_output_size` on int tensors (float64 like Python's floats); (new_h, new_w) int32."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  size = tf.cast(min_size, tf.float64)
  if max_size is not None:
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
  keep = ((w <= h) & tf.equal(w, size)) | ((h <= w) & tf.equal(h, size))
  new_h = tf.where(keep, h, tf.where(w < h, tf.floor(size * h / w), size))
  new_w = tf.where(keep, w, tf.where(w < h, size, tf.floor(size * w / h)))
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def _resize_example(example: dict, min_size, max_size, op: str) -> dict:
  _require(example, ("image", "boxes"), op)
  image = tf.convert_to_tensor(example["image"])
  shape = tf.shape(image)
  new_h, new_w = _glip_output_size_tf(shape[0], shape[1], min_size, max_size)
  resized = pp_ops.resize_image(image, tf.stack([new_h, new_w]), "bilinear", True)
  ratio_w = tf.cast(tf.cast(new_w, tf.float64) / tf.cast(shape[1], tf.float64), tf.float32)
  ratio_h = tf.cast(tf.cast(new_h, tf.float64) / tf.cast(shape[0], tf.float64), tf.float32)
  boxes = tf.cast(example["boxes"], tf.float32) * tf.stack(
      [ratio_w, ratio_h, ratio_w, ratio_h])
  return {**example, "image": resized, "boxes": boxes, "image_size": tf.stack([new_h, new_w])}


def _check_sizes(min_sizes, max_size) -> None:
  for size in min_sizes:
    pp_ops._positive_int(size, "min_size")  # pylint: disable=protected-access
  if max_size is not None:
    pp_ops._positive_int(max_size, "max_size")  # pylint: disable=protected-access


@register("resize_glip")
def resize_glip(min_size: int = 800, max_size: int | None = 1333):
  """GLIP's test-time `Resize(min_size, max_size)`: 'image' resized (bilinear, antialiased) to
  `glip_output_size`, 'boxes' scaled per axis, 'image_size' = the new (h, w) int32."""
  _check_sizes([min_size], max_size)
  return lambda example: _resize_example(example, min_size, max_size, "resize_glip")


@register("resize_glip_multi", random=True)
def resize_glip_multi(min_sizes: Sequence[int] = GLIP_MULTI_MIN_SIZES,
                      max_size: int | None = 1333):
  """GLIP's multi-scale training `Resize(MULT_MIN_SIZE_TRAIN, max_size)`: the shorter side is
  drawn uniformly from `min_sizes` per example, then as `resize_glip`."""
  if not isinstance(min_sizes, (tuple, list)) or not min_sizes:
    raise ValueError(f"min_sizes={min_sizes!r}: expected a non-empty tuple of positive ints.")
  _check_sizes(min_sizes, max_size)
  choices = tf.constant(min_sizes, tf.int32)

  def op(example):
    index = tf.random.stateless_uniform([], example["_seed"], 0, len(min_sizes), tf.int32)
    return _resize_example(example, choices[index], max_size, "resize_glip_multi")

  return op


def flip_boxes_lr(boxes: tf.Tensor, width) -> tf.Tensor:
  """xyxy boxes (+1 convention) mirrored in an image `width` wide: x1' = W - x2 - 1,
  x2' = W - x1 - 1 (GLIP's `BoxList.transpose(FLIP_LEFT_RIGHT)`)."""
  width = tf.cast(width, boxes.dtype)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  return tf.stack([width - x2 - 1, y1, width - x1 - 1, y2], axis=-1)


@register("flip_lr_boxes", random=True)
def flip_lr_boxes(p: float = 0.5):
  """GLIP's `RandomHorizontalFlip(p)`: with probability p (a stateless uniform draw below p),
  mirror 'image' left-right and 'boxes' with `flip_boxes_lr`."""
  if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p!r}: expected a probability in [0, 1].")

  def op(example):
    _require(example, ("image", "boxes"), "flip_lr_boxes")
    image = tf.convert_to_tensor(example["image"])
    boxes = tf.cast(example["boxes"], tf.float32)
    draw = tf.random.stateless_uniform([], seed=example["_seed"], minval=0, maxval=1.0)
    flip = draw < p
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    boxes = tf.cond(flip, lambda: flip_boxes_lr(boxes, tf.shape(image)[1]), lambda: boxes)
    return {**example, "image": image, "boxes": boxes}

  return op


def _three_numbers(value, what: str) -> tuple[float, float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 3
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
    raise ValueError(f"{what}={value!r}: expected three numbers (B, G, R order).")
  return tuple(float(v) for v in value)


@register("to_bgr255_normalize")
def to_bgr255_normalize(mean: Sequence[float] = GLIP_PIXEL_MEAN,
                        std: Sequence[float] = GLIP_PIXEL_STD):
  """GLIP's `Normalize(format='bgr255')`: an RGB 'image' on the 0..255 scale (uint8 or the float
  output of a resize) -> float32 BGR, (x - mean) / std with mean and std in BGR order."""
  mean, std = _three_numbers(mean, "mean"), _three_numbers(std, "std")
  if any(s == 0 for s in std):
    raise ValueError(f"std={std!r}: expected nonzero values.")
  mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

  def fn(image):
    rank, channels = image.shape.rank, image.shape[-1] if image.shape.rank else None
    if rank is not None and (rank != 3 or channels not in (3, None)):
      raise ValueError(f"to_bgr255_normalize expects an RGB (H, W, 3) image; got {image.shape}.")
    return (tf.reverse(tf.cast(image, tf.float32), [-1]) - mean_t) / std_t

  return pp_ops._on_image(fn)  # pylint: disable=protected-access


@register("pad_image")
def pad_image(height: int, width: int, size_divisible: int = 0):
  """Zero-pads 'image' at the bottom and right to (height, width) (static shape) and records the
  size before padding as 'image_size' int32 (h, w). An image larger than the canvas is an
  error naming its size. Apply after normalisation (GLIP pads normalised tensors with 0).

  size_divisible=d > 0 (GLIP's `to_image_list(size_divisible=DATALOADER.SIZE_DIVISIBILITY)`,
  32): also records '_padded_size' int32 (2,) = (h, w) rounded up to multiples of d, the size
  GLIP pads an image alone in its batch to. The canvas stays the example's static shape (the
  trainer initialises the model from it; training streams ignore '_padded_size' and train on the
  canvas), while the evaluation stream (`pipeline.make_eval_dataset`) cuts each image back to
  its '_padded_size' and batches it only with images of the same padded size. The canvas must be
  a multiple of d, so that it holds every padded size."""
  height = pp_ops._positive_int(height, "height")  # pylint: disable=protected-access
  width = pp_ops._positive_int(width, "width")  # pylint: disable=protected-access
  if (not isinstance(size_divisible, int) or isinstance(size_divisible, bool)
      or size_divisible < 0):
    raise ValueError(f"size_divisible={size_divisible!r}: expected an int >= 0 (0: the fixed "
                     "canvas only; GLIP: 32).")
  if size_divisible and (height % size_divisible or width % size_divisible):
    raise ValueError(f"pad_image({height}, {width}, size_divisible={size_divisible}): the canvas "
                     f"must be a multiple of {size_divisible} in both sides to hold every padded "
                     f"size, e.g. pad_image({-(-height // size_divisible) * size_divisible}, "
                     f"{-(-width // size_divisible) * size_divisible}, "
                     f"size_divisible={size_divisible}).")

  def op(example):
    _require(example, ("image",), "pad_image")
    image = tf.convert_to_tensor(example["image"])
    shape = tf.shape(image)
    where = [] if "image_id" not in example else ["image_id", example["image_id"]]
    check = detection.assert_all(
        shape[:2] <= tf.constant([height, width]),
        f"pad_image({height}, {width}): the image is larger than the canvas; resize it first "
        "(e.g. resize_glip with max_size <= the canvas) or enlarge the canvas. Image (h, w, c):",
        shape, *where)
    with tf.control_dependencies([check]):
      padded = tf.pad(image, [[0, height - shape[0]], [0, width - shape[1]], [0, 0]])
    padded = tf.ensure_shape(padded, (height, width, image.shape[-1]))
    out = {**example, "image": padded, "image_size": tf.cast(shape[:2], tf.int32)}
    if size_divisible:
      out[pipeline.PADDED_SIZE_KEY] = padded_size(out["image_size"], size_divisible)
    return out

  return op


def padded_size(image_size: tf.Tensor, size_divisible: int) -> tf.Tensor:
  """(h, w) int32 rounded up to multiples of `size_divisible` (GLIP's `to_image_list`:
  ceil(size / d) * d)."""
  return (image_size + size_divisible - 1) // size_divisible * size_divisible


@register("pad_boxes")
def pad_boxes(max_boxes: int, drop_extra: bool = False):
  """'boxes' (n, 4), 'box_labels' (n,), 'positive_map' (n, T) -> M = max_boxes rows, the padding
  rows zero (label 0), plus 'box_mask' bool (M,) true on the real boxes. n > M is an error naming
  the image id, unless drop_extra=True, which keeps the first M boxes."""
  max_boxes = pp_ops._positive_int(max_boxes, "max_boxes")  # pylint: disable=protected-access
  if not isinstance(drop_extra, bool):
    raise ValueError(f"drop_extra={drop_extra!r}: expected True or False.")

  def op(example):
    _require(example, ("boxes", "box_labels", "positive_map"), "pad_boxes")
    boxes = tf.cast(example["boxes"], tf.float32)
    labels = tf.cast(example["box_labels"], tf.int32)
    positive_map = tf.cast(example["positive_map"], tf.float32)
    count = tf.shape(boxes)[0]
    if not drop_extra:
      where = [] if "image_id" not in example else ["image_id", example["image_id"]]
      check = detection.assert_all(
          count <= max_boxes,
          f"pad_boxes({max_boxes}): the example has more boxes than max_boxes; raise max_boxes "
          "to the dataset's largest box count, or pass drop_extra=True to keep the first "
          "max_boxes. Boxes in the example:", count, *where)
      with tf.control_dependencies([check]):
        count = tf.identity(count)
    count = tf.minimum(count, max_boxes)
    extra = max_boxes - count

    def pad(x, tail_shape):  # the first `count` rows, then `extra` rows of zeros
      return tf.concat([x[:count], tf.zeros(tf.concat([[extra], tail_shape], 0), x.dtype)], 0)

    num_tokens = positive_map.shape[-1]
    out = {
        "boxes": tf.ensure_shape(pad(boxes, [4]), (max_boxes, 4)),
        "box_labels": tf.ensure_shape(pad(labels, tf.zeros([0], tf.int32)), (max_boxes,)),
        "positive_map": tf.ensure_shape(pad(positive_map, tf.shape(positive_map)[1:]),
                                        (max_boxes, num_tokens)),
        "box_mask": tf.range(max_boxes) < count,
    }
    return {**example, **out}

  return op


__all__ = ["glip_output_size", "flip_boxes_lr", "padded_size", "resize_glip", "resize_glip_multi",
           "flip_lr_boxes", "to_bgr255_normalize", "pad_image", "pad_boxes"]
