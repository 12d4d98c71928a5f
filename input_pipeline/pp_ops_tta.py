"""The pp op `tta_views`: the test-time views of one image that TPT tunes its prompt on.

TPT (Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language
Models", NeurIPS 2022) adapts on N views of each test image: the plain view plus N - 1 random
augmentations, AugMix-ed for the fine-grained datasets (the ImageNet variants use none).
It follows azshue/TPT `data/datautils.py` (`AugMixAugmenter`, `augmix`, `get_preaugment`), the
op set of `data/augmix_ops.py` (google-research/augmix) and how `tpt_classification.py` builds
the augmenter (`n_views = batch_size - 1`, `augmix = len(set_id) > 1`):

  tta_views(num_views=64, size=224, augmix=False, severity=1)    random ('_seed')
      'image' uint8 (H, W, 3), any size -> 'views' float32 (V, size, size, 3) in [0, 255]
      (the 'image' key is replaced). View 0: `resize_shorter_side(size, 'bicubic')|
      center_crop(size)` (TPT's base transform). Views 1..V-1: a `RandomResizedCrop(size)`
      (scale (0.08, 1), ratio (3/4, 4/3), torchvision's default bilinear interpolation, which
      filters when downsampling a PIL image) and a horizontal flip with p = 0.5; with
      augmix=True each is then AugMix-ed (`augmix_image`). Images smaller than `size` are
      upscaled. The pp ops after it (`value_range(0, 1)|normalize('clip')`) apply to every view,
      as they do to a video's frames.

Randomness: view v >= 1 draws from its own seed, `stateless_split(seed, V - 1)[v - 1]` of the
example's '_seed'; that seed splits into 3 (crop box, flip, AugMix), so a view is a pure
function of the image and its seed. Evaluation examples get a '_seed' from
`pipeline.make_eval_dataset(..., augment_seed=...)`.

AugMix as TPT runs it (`augmix_image`): on the pre-augmented view x (uint8), 3 chains, each of
1-3 ops drawn uniformly from AUGMIX_OPS (with replacement), each op with its own level
u ~ U(0.1, severity) and sign; chain weights w ~ Dirichlet(1, 1, 1), mix m ~ Beta(1, 1); the view
is m·x + (1 - m)·Σ_i w_i·chain_i(x). The op parameters, as `augmix_ops.py` derives them from u
(int(·) truncates): posterize to 4 - int(u·4/10) bits; rotate by ±int(u·30/10) degrees;
solarize at 256 - int(u·256/10); shear by ±u·0.3/10; translate by ±int(u·(size/3)/10) pixels.

Deliberate deviations (each checked in tests/test_tta_views.py):
  * Mixing space. TPT mixes the CLIP-normalised tensors; we mix pixels in [0, 255] and
    `value_range|normalize` follow. Normalisation is affine and Σ w_i = 1, so the two agree up
    to float rounding; the mix is clipped to [0, 255], which removes only that rounding.
  * Pixel rounding. PIL holds every intermediate image as uint8; the plain views stay float
    after resizing, as every pp op here does. An AugMix-ed view rounds its pre-augmented crop to
    uint8 first (the ops work on integer levels, and m·x uses that same image), and each op's
    output is uint8, as PIL's is.
  * Rotate, shear and translate are PIL's bilinear affine transform (`Image.transform(AFFINE)`,
    which `Image.rotate` calls) re-expressed as `tf.raw_ops.ImageProjectiveTransformV3`: PIL's
    pixel-edge coordinates (x + 0.5), its edge-clamped bilinear samples truncated to uint8 and
    its zero fill for points outside the source are reproduced; the sampling runs in float32
    here (double in PIL), so a sample within ~1e-4 of an integer may truncate to the
    neighbouring level (about 1 pixel value in 1000 in the tests). Rotate's matrix is not rounded to
    15 decimals as PIL's is (no effect on 8-bit output).
  * `augmix_ops.py` fixes IMAGE_SIZE = 224 (the translation bound and the output size of the
    affine ops) and `get_preaugment` crops to 224 whatever `--resolution` says; here both follow
    `size` (the same at 224).
  * TPT draws from numpy's and torch's global generators; we draw the same distributions from
    stateless TensorFlow ops (Dirichlet as normalised Gamma(1) draws, as numpy computes it;
    Beta(1, 1) as U(0, 1)), so the numbers differ but are reproducible per seed.
"""
from __future__ import annotations

import math

import tensorflow as tf

from input_pipeline import pp_ops
from input_pipeline.pp_registry import register

AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")  # augmix_ops.py `augmentations`, in its order
NUM_CHAINS = 3
MAX_CHAIN_DEPTH = 3


# ---------------------------------------------------------------- Pillow's ops on uint8 (H, W, 3)

def _channel_histograms(image: tf.Tensor) -> tf.Tensor:
  """(H, W, 3) uint8 -> (3, 256) int32 pixel counts per channel (PIL `Image.histogram`)."""
  pixels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, 3]))
  return tf.math.bincount(pixels, minlength=256, maxlength=256, axis=-1)


def _apply_luts(image: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
  """Each channel c of a uint8 image through its table luts[c] ((3, 256) ints in [0, 255])."""
  channels = tf.transpose(tf.cast(image, tf.int32), [2, 0, 1])  # (3, H, W)
  return tf.cast(tf.transpose(tf.gather(luts, channels, batch_dims=1), [1, 2, 0]), tf.uint8)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.autocontrast(image)`: per channel, [lo, hi] (its darkest and brightest
  levels) stretched to [0, 255] by the table int(i · 255 / (hi - lo) - lo · 255 / (hi - lo));
  a channel of one level is unchanged."""
  hist = _channel_histograms(image)
  levels = tf.range(256)
  present = hist > 0
  lo = tf.reduce_min(tf.where(present, levels, 256), axis=1, keepdims=True)
  hi = tf.reduce_max(tf.where(present, levels, -1), axis=1, keepdims=True)
  scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), tf.float64)
  offset = -tf.cast(lo, tf.float64) * scale
  stretched = tf.cast(tf.cast(levels, tf.float64) * scale + offset, tf.int32)  # int(): truncates
  luts = tf.where(hi > lo, tf.clip_by_value(stretched, 0, 255), levels)
  return _apply_luts(image, luts)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.equalize(image)`: per channel, step = (pixels - count of the brightest level
  present) // 255 and level i -> (step // 2 + pixels below level i) // step, capped at 255
  (PIL's 8-bit table); a channel with step 0 is unchanged."""
  hist = _channel_histograms(image)
  levels = tf.range(256)
  brightest = tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1)
  step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, brightest, batch_dims=1)) // 255
  step = step[:, None]
  below = tf.cumsum(hist, axis=1, exclusive=True)
  equalised = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
  return _apply_luts(image, tf.where(step > 0, equalised, levels))


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """PIL `ImageOps.posterize(image, bits)`: keep the `bits` high bits of every level."""
  shift = 8 - tf.cast(bits, tf.int32)
  pixels = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.uint8)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """PIL `ImageOps.solarize(image, threshold)`: levels >= threshold are inverted (255 - i)."""
  pixels = tf.cast(image, tf.int32)
  return tf.cast(tf.where(pixels < tf.cast(threshold, tf.int32), pixels, 255 - pixels), tf.uint8)


def affine(image: tf.Tensor, coefficients) -> tf.Tensor:
  """PIL `image.transform(image.size, Image.AFFINE, (a, b, c, d, e, f), Image.BILINEAR)` on a
  uint8 (H, W, 3) image: output pixel (x, y) is the bilinear sample of the input at
  (a·(x + ½) + b·(y + ½) + c, d·(x + ½) + e·(y + ½) + f) in pixel-edge coordinates, its
  neighbours clamped at the border and the value truncated to uint8; points outside
  [0, W) × [0, H) are black."""
  a, b, c, d, e, f = (tf.cast(v, tf.float64) for v in coefficients)
  shape = tf.shape(image)
  # TF samples at pixel-centre coordinates: x_in - ½ = a·x + b·y + c + (a + b - 1) / 2.
  transform = tf.cast(tf.stack([a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2, 0.0, 0.0]),
                      tf.float32)
  sampled = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform[None],
      output_shape=shape[:2], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="NEAREST")[0]  # NEAREST clamps the sample point: PIL's clamped neighbours
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  ys = tf.range(height, dtype=tf.float64)[:, None] + 0.5
  xs = tf.range(width, dtype=tf.float64)[None, :] + 0.5
  x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  sampled = tf.where(inside[..., None], sampled, 0.0)
  return tf.cast(tf.floor(sampled), tf.uint8)  # PIL truncates the sample to its 8-bit level


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """PIL `image.rotate(degrees, resample=Image.BILINEAR)`: counter-clockwise about the image
  centre (W/2, H/2), same size, black corners."""
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180)
  cos, sin = tf.cos(angle), tf.sin(angle)
  shape = tf.shape(image)
  cx, cy = tf.cast(shape[1], tf.float64) / 2, tf.cast(shape[0], tf.float64) / 2
  return affine(image, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


# ---------------------------------------------------------------- AugMix

def augmix_op(image: tf.Tensor, index, level, negate) -> tf.Tensor:
  """The AUGMIX_OPS[index] op of `augmix_ops.py` at level u = `level` (its `sample_level`
  draw, a float in [0.1, severity)) and, for the signed ops, sign -1 where `negate`."""
  level = tf.cast(level, tf.float64)
  sign = tf.where(negate, tf.constant(-1.0, tf.float64), 1.0)
  shape = tf.cast(tf.shape(image), tf.float64)

  def int_parameter(maxval):  # int(level · maxval / 10) of a positive number
    return tf.floor(level * maxval / 10)

  shear = sign * (level * 0.3 / 10)
  branches = [
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: posterize(image, 4 - int_parameter(4)),
      lambda: rotate(image, sign * int_parameter(30)),
      lambda: solarize(image, 256 - int_parameter(256)),
      lambda: affine(image, (1, shear, 0, 0, 1, 0)),
      lambda: affine(image, (1, 0, 0, shear, 1, 0)),
      lambda: affine(image, (1, 0, sign * int_parameter(shape[1] / 3), 0, 1, 0)),
      lambda: affine(image, (1, 0, 0, 0, 1, sign * int_parameter(shape[0] / 3))),
  ]
  return tf.ensure_shape(tf.switch_case(tf.cast(index, tf.int32), branches), image.shape)


def augmix_chain(image: tf.Tensor, seed, severity: float) -> tf.Tensor:
  """One AugMix chain: depth ~ U{1, 2, 3}, then that many ops of AUGMIX_OPS, each drawn
  uniformly with its own level ~ U(0.1, severity) and sign."""
  depth_seed, op_seed, level_seed, sign_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  depth = tf.random.stateless_uniform([], depth_seed, 1, MAX_CHAIN_DEPTH + 1, tf.int32)
  ops = tf.random.stateless_uniform([MAX_CHAIN_DEPTH], op_seed, 0, len(AUGMIX_OPS), tf.int32)
  levels = tf.random.stateless_uniform([MAX_CHAIN_DEPTH], level_seed, 0.1, severity, tf.float64)
  negate = tf.random.stateless_uniform([MAX_CHAIN_DEPTH], sign_seed) > 0.5

  def apply(step, x):
    return step + 1, augmix_op(x, ops[step], levels[step], negate[step])

  # A loop, not `depth` unrolled copies: the graph holds the 9 ops once (fast to trace).
  return tf.while_loop(lambda step, _: step < depth, apply, (0, image))[1]


def augmix_parts(image: tf.Tensor, seed, severity: float = 1):
  """The draws of one AugMix of a uint8 (H, W, 3) image: (chains uint8 (3, H, W, 3), weights
  float32 (3,) ~ Dirichlet(1, 1, 1), mix float32 () ~ Beta(1, 1))."""
  image = tf.convert_to_tensor(image)
  mix_seed, weight_seed, *chain_seeds = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2 + NUM_CHAINS))
  gammas = tf.random.stateless_gamma([NUM_CHAINS], weight_seed, alpha=1.0)
  weights = gammas / tf.reduce_sum(gammas)
  mix = tf.random.stateless_uniform([], mix_seed)
  chains = tf.map_fn(lambda s: augmix_chain(image, s, severity), tf.stack(chain_seeds),
                     fn_output_signature=tf.TensorSpec(image.shape, tf.uint8))
  return chains, weights, mix


def augmix_image(image: tf.Tensor, seed, severity: float = 1) -> tf.Tensor:
  """TPT's `augmix` of a uint8 (H, W, 3) image: float32 m·x + (1 - m)·Σ_i w_i·chain_i(x) with the
  draws of `augmix_parts`, clipped to [0, 255] (module docstring: mixing space)."""
  image = tf.convert_to_tensor(image)
  chains, weights, mix = augmix_parts(image, seed, severity)
  mixed_chains = tf.einsum("c,chwk->hwk", weights, tf.cast(chains, tf.float32))
  mixed = mix * tf.cast(image, tf.float32) + (1 - mix) * mixed_chains
  return tf.clip_by_value(mixed, 0.0, 255.0)


# ---------------------------------------------------------------- the views

def augmented_view(image: tf.Tensor, seed, size: int, augmix: bool = False,
                   severity: float = 1) -> tf.Tensor:
  """One of TPT's augmented views of a uint8 (H, W, 3) image: float32 (size, size, 3) in
  [0, 255]; `seed` splits into 3 (crop box, flip, AugMix)."""
  crop_seed, flip_seed, augmix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = tf.shape(image)
  top, left, crop_h, crop_w = pp_ops.random_resized_crop_box(shape[0], shape[1], crop_seed)
  view = pp_ops.resize_image(image[top:top + crop_h, left:left + crop_w], (size, size),
                             "bilinear", antialias=True)
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5  # torchvision: rand(1) < p
  view = tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view)
  if augmix:
    view = augmix_image(tf.cast(tf.round(view), tf.uint8), augmix_seed, severity)
  return tf.ensure_shape(view, (size, size, 3))


def _check_number(value, what: str, low: float, high: float) -> float:
  if (not isinstance(value, (int, float)) or isinstance(value, bool)
      or not low < value <= high):
    raise ValueError(f"{what}={value!r}: expected a number in ({low}, {high}].")
  return float(value)


@register("tta_views", test_time=True)
def tta_views(num_views: int = 64, size: int = 224, augmix: bool = False, severity: float = 1):
  """'image' -> 'views' (num_views, size, size, 3): TPT's plain view and num_views - 1 augmented
  ones (module docstring)."""
  num_views = pp_ops._positive_int(num_views, "num_views")  # pylint: disable=protected-access
  size = pp_ops._positive_int(size, "size")  # pylint: disable=protected-access
  if not isinstance(augmix, bool):
    raise ValueError(f"augmix={augmix!r}: expected True or False.")
  severity = _check_number(severity, "severity", 0.1, 10)  # augmix_ops levels run to 10
  base_view = pp_ops.center_crop(size)
  base_resize = pp_ops.resize_shorter_side(size, "bicubic")
  view_spec = tf.TensorSpec((size, size, 3), tf.float32)

  def op(example: dict) -> dict:
    if "image" not in example:
      raise KeyError(f"tta_views reads 'image' (H, W, 3) uint8; the example's keys are "
                     f"{sorted(example)}.")
    image = tf.convert_to_tensor(example["image"])
    if (image.dtype != tf.uint8 or image.shape.rank not in (None, 3)
        or image.shape.rank == 3 and image.shape[-1] not in (None, 3)):
      raise ValueError(f"tta_views expects a uint8 (H, W, 3) 'image' (put it first in the spec); "
                       f"got {image.dtype.name} of shape {image.shape}.")
    image = tf.ensure_shape(image, (None, None, 3))
    plain = base_view(base_resize({"image": image}))["image"]
    seeds = tf.random.experimental.stateless_split(example["_seed"], num_views - 1)
    augmented = tf.map_fn(lambda seed: augmented_view(image, seed, size, augmix, severity),
                          seeds, fn_output_signature=view_spec)
    views = tf.ensure_shape(tf.concat([plain[None], augmented], 0), (num_views, size, size, 3))
    rest = {k: v for k, v in example.items() if k != "image"}
    return {**rest, "views": views}

  return op
