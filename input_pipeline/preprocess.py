"""Per-example preprocessing: resize (and for FGVC crop/flip), scale to [0, 1], normalise.

  * augment='none' (VTAB, as VPT `tf_dataset.py` and SA2VP `build_transform_vtab`): resize to
    exactly (image_size, image_size), bilinear, no augmentation.
  * augment='fgvc_train' (VPT `transforms.py`, SA2VP `build_transform_fgvc`): resize the shorter
    side to image_size·256/224, random crop image_size, random horizontal flip (p = 0.5).
  * augment='fgvc_eval': the same resize, then the center crop.
  * augment='resize_flip' (LMPT `imagelist.py` train transform): resize to exactly
    (image_size, image_size), no crop, then a random horizontal flip (p = 0.5); its eval transform
    is 'none'.

Normalisation constants: VPT uses ImageNet mean/std; SA2VP uses the "Inception" 0.5/0.5; CLIP
and the methods on it (CoOp, RPL) use CLIP's own mean/std.

Randomness is stateless and comes from the example's '_seed' (a shape-(2,) int tensor that
`pipeline.make_train_dataset` derives from the run seed and the example's position), so the
augmented batches are the same on every run and after a resume.

Deviation: `antialias` defaults to False for 'none' (VPT's `tf.image.resize`) and True for the
other modes (torchvision resizes PIL images with an antialiasing filter). SA2VP's VTAB transform
and LMPT's eval transform also resize with PIL; pass antialias=True (`config.pp.antialias`) to
follow them more closely.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP `clip.py` `_transform`
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUGMENTATIONS = ("none", "resize_flip", "fgvc_train", "fgvc_eval")


def resize_shorter_side(image: tf.Tensor, size: int, antialias: bool) -> tf.Tensor:
  """torchvision Resize(size): shorter side -> size, longer side -> int(size · long / short)."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = size / tf.minimum(h, w)
  new_h = tf.where(h <= w, size, tf.cast(tf.math.floor(h * scale), tf.int32))
  new_w = tf.where(h <= w, tf.cast(tf.math.floor(w * scale), tf.int32), size)
  return tf.image.resize(image, tf.stack([new_h, new_w]), "bilinear", antialias=antialias)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision CenterCrop(size): top = round((h - size) / 2), likewise left."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, image.shape[-1]))


def make_preprocess_fn(*, image_size: int, mean, std, augment: str = "none",
                       antialias: bool | None = None) -> Callable[[dict], dict]:
  """{'image': uint8 (H, W, 3), ...} -> the same dict, 'image' float32 (S, S, 3); an int 'label'
  becomes int32, other keys (multi-hot 'labels', 'caption_tokens', ...) pass through."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f"Unknown augment {augment!r}; valid: {', '.join(AUGMENTATIONS)}.")
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"mean and std need 3 values (RGB); got mean={mean}, std={std}.")
  antialias = augment != "none" if antialias is None else antialias
  resize_to = round(image_size * 256 / 224)
  mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

  def preprocess(example: dict) -> dict:
    example = dict(example)
    seed = example.pop("_seed", None)
    image = example["image"]
    if augment in ("none", "resize_flip"):
      image = tf.image.resize(image, (image_size, image_size), "bilinear", antialias=antialias)
      if augment == "resize_flip":
        if seed is None:
          raise ValueError("augment='resize_flip' needs the example's '_seed' (added by "
                           "pipeline.make_train_dataset); use 'none' for evaluation.")
        image = tf.image.stateless_random_flip_left_right(image, seed)
    else:
      image = resize_shorter_side(image, resize_to, antialias)
      if augment == "fgvc_eval":
        image = center_crop(image, image_size)
      else:
        if seed is None:
          raise ValueError("augment='fgvc_train' needs the example's '_seed' (added by "
                           "pipeline.make_train_dataset); use 'fgvc_eval' for evaluation.")
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), crop_seed)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.cast(image, tf.float32) / 255.0
    example["image"] = (image - mean) / std
    if "label" in example:
      example["label"] = tf.cast(example["label"], tf.int32)
    return example

  return preprocess
