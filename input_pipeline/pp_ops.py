"""The preprocessing ops of pp specs ('resize(224)|flip_lr|value_range(0, 1)|normalize(...)').

Each op is registered in `pp_registry` and works on the example's 'image' (uint8 or float
(H, W, C) from the data sources), or, in an example with no 'image', on every frame of its
'video' (T, H, W, C; video sources): the frames go through the op at once as one batch (T leads,
H, W, C are the last three axes), so frame t comes out as the image op would make it, and a
random op draws once per video (every frame gets the same crop / flip). The test-time 'views'
(V, H, W, C) of `pp_ops_tta.tta_views` go through the ops the same way. The other keys pass
through. Geometry follows torchvision, which the PyTorch seeds of VPT-on-FGVC, SA2VP, CoOp, RPL
and LMPT use (`torchvision/transforms/transforms.py`): `resize_shorter_side` is `Resize(int)`,
`center_crop` is `CenterCrop`, `random_resized_crop` is `RandomResizedCrop`. The op names and
the `value_range` op follow google-research/big_vision `big_vision/pp/ops_image.py`. DGL
(knightyxp/DGL `dataloaders/decode.py` `RawVideoExtractorpyAV`) likewise center-crops and
normalises a clip's (T, C, H, W) frames as one tensor.

  resize(size, method='bilinear', antialias=True)       exactly size (int or (h, w))
  resize_shorter_side(size, method='bilinear', antialias=True)
  center_crop(size)                                     torchvision rounding of the offsets
  random_crop(size)                                     random ('_seed')
  flip_lr(p=0.5)                                        random ('_seed')
  random_resized_crop(size, scale=(0.08, 1.0), ratio=(0.75, 1.3333333333333333),
                      method='bicubic', antialias=True) random ('_seed')
  value_range(vmin=0, vmax=1, in_min=0, in_max=255)     to float32, [in_min, in_max] -> [vmin, vmax]
  normalize(mean, std)                                  (x - mean) / std; or a preset name:
                                                        'imagenet', 'inception', 'clip'

Resizing: `antialias=True` (the default) follows torchvision on PIL images, which filters when
downsampling; VPT's VTAB pipeline (`tf_dataset.py`, `tf.image.resize`) does not, so its specs
say antialias=False. Bicubic is TF's Keys kernel (a = -0.5, as PIL's); a bicubic resize of a
uint8 image is clipped to [0, 255] as PIL's uint8 output is (PIL also rounds; we keep floats).
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from input_pipeline.pp_registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP `clip.py` `_transform`
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "inception": (INCEPTION_MEAN, INCEPTION_STD),
                  "clip": (CLIP_MEAN, CLIP_STD)}
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
_OVERSHOOTING_METHODS = ("bicubic", "lanczos3", "lanczos5", "mitchellcubic")
STACKED_KEYS = {"video": "(T, H, W, C)", "views": "(V, H, W, C)"}  # ops treat them alike


def _size_hw(size, what: str = "size") -> tuple[int, int]:
  """An int or an (h, w) pair of positive ints -> (h, w)."""
  hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
  if (not isinstance(hw, (tuple, list)) or len(hw) != 2
      or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw)):
    raise ValueError(f"{what}={size!r}: expected a positive int or an (height, width) pair of "
                     "them.")
  return tuple(hw)


def _positive_int(value, what: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{what}={value!r}: expected a positive int.")
  return value


def _check_method(method: str) -> str:
  if method not in RESIZE_METHODS:
    raise ValueError(f"method={method!r}: expected one of {', '.join(RESIZE_METHODS)}.")
  return method


def visual_key(example: dict) -> str:
  """'image' when the example has one, else 'video' or 'views' (`pp_ops_tta.tta_views`), of
  static rank 4; a KeyError when it has none."""
  if "image" in example:
    return "image"
  key = next((k for k in STACKED_KEYS if k in example), None)
  if key is None:
    raise KeyError(f"pp ops work on the example's 'image' or 'video'; its keys are "
                   f"{sorted(example)}.")
  shape = tf.convert_to_tensor(example[key]).shape
  if shape.rank != 4:
    raise ValueError(f"pp ops take a {key!r} of shape {STACKED_KEYS[key]}; got {shape}.")
  return key


def _crop_shape(image: tf.Tensor, crop_h: int, crop_w: int) -> tuple:
  """The static shape of an (H, W, C) image's or (T, H, W, C) video's crop to (crop_h, crop_w)
  (an image of unknown rank: (crop_h, crop_w, C))."""
  leading = image.shape[:-3] if image.shape.rank is not None else ()
  return (*leading, crop_h, crop_w, image.shape[-1])


def _on_image(fn):
  """fn(image) -> image as an op over the example dict; fn takes (..., H, W, C), so it maps the
  'image', or the 'video' (T, H, W, C) as a batch of frames (see the module docstring)."""

  def op(example: dict) -> dict:
    key = visual_key(example)
    return {**example, key: fn(tf.convert_to_tensor(example[key]))}

  return op


def resize_image(image: tf.Tensor, size_hw, method: str, antialias: bool) -> tf.Tensor:
  """`tf.image.resize` of an image (H, W, C) or frames (T, H, W, C) (float32 out); an
  overshooting kernel on uint8 input is clipped to the uint8 range, as PIL's uint8 output is."""
  resized = tf.image.resize(image, size_hw, method, antialias=antialias)
  if image.dtype == tf.uint8 and method in _OVERSHOOTING_METHODS:
    resized = tf.clip_by_value(resized, 0.0, 255.0)
  return resized


@register("resize")
def resize(size, method: str = "bilinear", antialias: bool = True):
  """Resize to exactly `size` (int: square; or (h, w)), ignoring the aspect ratio."""
  size_hw, method = _size_hw(size), _check_method(method)
  return _on_image(lambda image: resize_image(image, size_hw, method, antialias))


@register("resize_shorter_side")
def resize_shorter_side(size: int, method: str = "bilinear", antialias: bool = True):
  """torchvision `Resize(size)`: the shorter side -> size, the longer -> int(size · long / short)
  (floor), keeping the aspect ratio."""
  size, method = _positive_int(size, "size"), _check_method(method)

  def fn(image):
    shape = tf.shape(image)
    h, w = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    scale = size / tf.minimum(h, w)
    new_h = tf.where(h <= w, size, tf.cast(tf.math.floor(h * scale), tf.int32))
    new_w = tf.where(h <= w, tf.cast(tf.math.floor(w * scale), tf.int32), size)
    return resize_image(image, tf.stack([new_h, new_w]), method, antialias)

  return _on_image(fn)


@register("center_crop")
def center_crop(size):
  """torchvision `CenterCrop(size)`: top = round((h - size_h) / 2), likewise left (round half to
  even, as Python's round). The image must be at least `size`."""
  crop_h, crop_w = _size_hw(size)

  def fn(image):
    shape = tf.shape(image)
    top = tf.cast(tf.round(tf.cast(shape[-3] - crop_h, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[-2] - crop_w, tf.float32) / 2), tf.int32)
    return tf.ensure_shape(image[..., top:top + crop_h, left:left + crop_w, :],
                           _crop_shape(image, crop_h, crop_w))

  return _on_image(fn)


@register("random_crop", random=True)
def random_crop(size):
  """A uniformly placed crop of `size` (torchvision `RandomCrop`), drawn as
  `tf.image.stateless_random_crop` draws it for an (H, W, C) image: one offset per axis,
  uniform int32 modulo (H - crop_h + 1, W - crop_w + 1, 1). A video's frames share the draw. The
  image must be at least `size`."""
  crop_h, crop_w = _size_hw(size)

  def op(example):
    key = visual_key(example)
    image = tf.convert_to_tensor(example[key])
    if key == "image" and image.shape.rank != 3:
      raise ValueError(f"random_crop expects an (H, W, C) image; got shape {image.shape}.")
    shape = tf.shape(image)
    height, width = shape[-3], shape[-2]
    check = tf.debugging.Assert((height >= crop_h) & (width >= crop_w),
                                [f"random_crop({size!r}) needs an image of at least that size; "
                                 "got (height, width)", height, width])
    with tf.control_dependencies([check]):
      limit = tf.stack([height - crop_h + 1, width - crop_w + 1, 1])
    offset = tf.random.stateless_uniform([3], example["_seed"], maxval=tf.int32.max,
                                         dtype=tf.int32) % limit
    top, left = offset[0], offset[1]
    crop = tf.ensure_shape(image[..., top:top + crop_h, left:left + crop_w, :],
                           _crop_shape(image, crop_h, crop_w))
    return {**example, key: crop}

  return op


@register("flip_lr", random=True)
def flip_lr(p: float = 0.5):
  """Mirror left-right with probability p (torchvision `RandomHorizontalFlip(p)`): flips when a
  stateless uniform [0, 1) draw is below p, as `tf.image.stateless_random_flip_left_right`
  (which is p = 0.5) does."""
  if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p!r}: expected a probability in [0, 1].")

  def op(example):
    key = visual_key(example)
    image = tf.convert_to_tensor(example[key])
    draw = tf.random.stateless_uniform([], seed=example["_seed"], minval=0, maxval=1.0)
    flipped = tf.cond(draw < p, lambda: tf.reverse(image, [-2]), lambda: image)
    return {**example, key: flipped}

  return op


def _check_range(value, what: str) -> tuple[float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
    raise ValueError(f"{what}={value!r}: expected a (low, high) pair of numbers.")
  return float(value[0]), float(value[1])


def random_resized_crop_box(height, width, seed, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """(top, left, crop_height, crop_width), int32 scalars, as torchvision
  `RandomResizedCrop.get_params`: up to `attempts` tries drawing the area fraction uniformly in
  `scale` and the log aspect ratio (w / h) uniformly in log(`ratio`); w = round(sqrt(area · r)),
  h = round(sqrt(area / r)); the first try with 0 < w <= width and 0 < h <= height wins and is
  placed uniformly. Without one, the fallback is a centered crop: the whole image when its ratio
  is within `ratio`, else the largest crop with the nearest bound's ratio
  (top = (height - h) // 2, left = (width - w) // 2). All tries are drawn at once (no loop);
  the float math is float64, as torchvision's Python floats."""
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  target_area = height_f * width_f * tf.random.stateless_uniform(
      [attempts], area_seed, scale[0], scale[1], tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), tf.float64))
  ws = tf.round(tf.sqrt(target_area * aspect))
  hs = tf.round(tf.sqrt(target_area / aspect))
  fits = (ws > 0) & (ws <= width_f) & (hs > 0) & (hs <= height_f)
  first = tf.argmax(tf.cast(fits, tf.int32))  # the first try that fits (argmax takes the first)
  low, high = min(ratio), max(ratio)
  in_ratio = width_f / height_f
  fallback_w = tf.where(in_ratio > high, tf.round(height_f * high), width_f)
  fallback_h = tf.where(in_ratio < low, tf.round(width_f / low), height_f)
  found = tf.reduce_any(fits)
  crop_h = tf.cast(tf.where(found, hs[first], fallback_h), tf.int32)
  crop_w = tf.cast(tf.where(found, ws[first], fallback_w), tf.int32)
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  top = tf.where(found, tf.random.stateless_uniform([], top_seed, 0, height - crop_h + 1,
                                                    tf.int32), (height - crop_h) // 2)
  left = tf.where(found, tf.random.stateless_uniform([], left_seed, 0, width - crop_w + 1,
                                                     tf.int32), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


@register("random_resized_crop", random=True)
def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), method: str = "bicubic",
                        antialias: bool = True):
  """torchvision `RandomResizedCrop(size, scale, ratio, interpolation)`: a crop of random area
  fraction and aspect ratio (`random_resized_crop_box`) resized to `size`. Bicubic is the
  interpolation of CoOp (`INPUT.INTERPOLATION`, Dassl `dassl/data/transforms/transforms.py`),
  which RPL shares; torchvision's own default is bilinear, which TPT's test-time views use
  (`pp_ops_tta.tta_views`)."""
  size_hw, method = _size_hw(size), _check_method(method)
  scale, ratio = _check_range(scale, "scale"), _check_range(ratio, "ratio")
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f"scale={scale!r}: expected 0 < low <= high (area fractions).")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"ratio={ratio!r}: expected 0 < low <= high (width / height).")

  def op(example):
    key = visual_key(example)
    image = tf.convert_to_tensor(example[key])
    shape = tf.shape(image)
    top, left, crop_h, crop_w = random_resized_crop_box(shape[-3], shape[-2], example["_seed"],
                                                        scale, ratio)
    crop = image[..., top:top + crop_h, left:left + crop_w, :]
    return {**example, key: resize_image(crop, size_hw, method, antialias)}

  return op


@register("value_range")
def value_range(vmin: float = 0, vmax: float = 1, in_min: float = 0, in_max: float = 255):
  """Cast to float32 and map [in_min, in_max] linearly to [vmin, vmax] (big_vision's
  `value_range`; no clipping). The default (0, 1) is torchvision `ToTensor`'s x / 255, computed
  as exactly that division."""
  for name, value in (("vmin", vmin), ("vmax", vmax), ("in_min", in_min), ("in_max", in_max)):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f"{name}={value!r}: expected a number.")
  if in_max == in_min:
    raise ValueError(f"in_min = in_max = {in_min!r}: the input range is empty.")

  def fn(image):
    image = tf.cast(image, tf.float32)
    if in_min:
      image = image - in_min
    image = image / float(in_max - in_min)
    if (vmin, vmax) != (0, 1):
      image = image * float(vmax - vmin) + vmin
    return image

  return _on_image(fn)


@register("normalize")
def normalize(mean, std: Sequence[float] | None = None):
  """(image - mean) / std per channel; `mean` may instead name a preset of `NORMALIZATIONS`
  ('imagenet': VPT; 'inception' (0.5/0.5): SA2VP; 'clip': openai/CLIP, CoOp, RPL) with no std."""
  if isinstance(mean, str):
    if mean not in NORMALIZATIONS or std is not None:
      raise ValueError(f"mean={mean!r}, std={std!r}: a preset name takes no std and is one of "
                       f"{', '.join(NORMALIZATIONS)}.")
    mean, std = NORMALIZATIONS[mean]
  for name, value in (("mean", mean), ("std", std)):
    if (not isinstance(value, (tuple, list)) or not value
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
      raise ValueError(f"{name}={value!r}: expected a tuple of numbers, one per channel (or "
                       f"mean = a preset: {', '.join(NORMALIZATIONS)}).")
  if len(mean) != len(std) or any(s == 0 for s in std):
    raise ValueError(f"mean={mean!r}, std={std!r}: expected as many means as nonzero stds.")
  mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
  return _on_image(lambda image: (tf.cast(image, tf.float32) - mean_t) / std_t)
