"""pp specs: the registry and builder (`input_pipeline/pp_registry.py`), the ops
(`input_pipeline/pp_ops.py`), and that every config keeps the tensors of the old `augment` enum.

`_old_make_preprocess_fn` is `input_pipeline/preprocess.py` as it was before pp specs (commit
3b07a5c), copied here unchanged as the oracle of "today's outputs".
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import pp_ops, pp_registry, preprocess

# ---------------------------------------------------------------- the oracle (old preprocess.py)

AUGMENTATIONS = ("none", "resize_flip", "fgvc_train", "fgvc_eval")


def _old_resize_shorter_side(image: tf.Tensor, size: int, antialias: bool) -> tf.Tensor:
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = size / tf.minimum(h, w)
  new_h = tf.where(h <= w, size, tf.cast(tf.math.floor(h * scale), tf.int32))
  new_w = tf.where(h <= w, tf.cast(tf.math.floor(w * scale), tf.int32), size)
  return tf.image.resize(image, tf.stack([new_h, new_w]), "bilinear", antialias=antialias)


def _old_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, image.shape[-1]))


def _old_make_preprocess_fn(*, image_size: int, mean, std, augment: str = "none",
                            antialias: bool | None = None) -> Callable[[dict], dict]:
  if augment not in AUGMENTATIONS:
    raise ValueError(f"Unknown augment {augment!r}; valid: {', '.join(AUGMENTATIONS)}.")
  antialias = augment != "none" if antialias is None else antialias
  resize_to = round(image_size * 256 / 224)
  mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

  def preprocess_fn(example: dict) -> dict:
    example = dict(example)
    seed = example.pop("_seed", None)
    image = example["image"]
    if augment in ("none", "resize_flip"):
      image = tf.image.resize(image, (image_size, image_size), "bilinear", antialias=antialias)
      if augment == "resize_flip":
        image = tf.image.stateless_random_flip_left_right(image, seed)
    else:
      image = _old_resize_shorter_side(image, resize_to, antialias)
      if augment == "fgvc_eval":
        image = _old_center_crop(image, image_size)
      else:
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), crop_seed)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.cast(image, tf.float32) / 255.0
    example["image"] = (image - mean) / std
    if "label" in example:
      example["label"] = tf.cast(example["label"], tf.int32)
    return example

  return preprocess_fn


def _spec(augment: str, size: int, norm: str, antialias: bool | None) -> tuple[str, ...]:
  """The old `augment` modes as pp specs (what the configs now write)."""
  tail = f"value_range(0, 1)|normalize('{norm}')"
  aa = "" if (antialias if antialias is not None else augment != "none") else ", antialias=False"
  if augment in ("none", "resize_flip"):
    flip = "|flip_lr" if augment == "resize_flip" else ""
    return f"resize({size}{aa}){flip}|{tail}"
  resize = f"resize_shorter_side({round(size * 256 / 224)}{aa})"
  crop = f"random_crop({size})|flip_lr" if augment == "fgvc_train" else f"center_crop({size})"
  return f"{resize}|{crop}|{tail}"


SHAPES = ((37, 23), (20, 64), (16, 16), (300, 251))


def _examples(with_seed: bool, n_seeds: int = 3):
  rng = np.random.default_rng(0)
  for h, w in SHAPES:
    image = tf.constant(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for s in range(n_seeds if with_seed else 1):
      example = {"image": image, "label": tf.constant(h % 5, tf.int64),
                 "labels": tf.constant([0.0, 1.0])}
      if with_seed:
        example["_seed"] = tf.constant([s, 17 * s + 1], tf.int64)
      yield example


def _assert_same(old_fn, new_fn, with_seed: bool):
  for example in _examples(with_seed):
    old, new = old_fn(example), new_fn(example)
    assert sorted(old) == sorted(new) and "_seed" not in new
    assert new["image"].dtype == tf.float32 and new["label"].dtype == tf.int32
    for key in old:
      np.testing.assert_array_equal(new[key].numpy(), old[key].numpy(), err_msg=key)


@pytest.mark.parametrize("augment,antialias", [
    ("none", None), ("none", True), ("resize_flip", None), ("resize_flip", True),
    ("fgvc_train", None), ("fgvc_eval", None), ("fgvc_eval", False)])
@pytest.mark.parametrize("size", [16, 224])
def test_old_augment_modes_are_pp_specs_bit_for_bit(augment, antialias, size):
  norm = "clip" if augment.startswith("fgvc") else "imagenet"
  mean, std = pp_ops.NORMALIZATIONS[norm]
  old = _old_make_preprocess_fn(image_size=size, mean=mean, std=std, augment=augment,
                                antialias=antialias)
  new = preprocess.make_preprocess_fn(_spec(augment, size, norm, antialias))
  _assert_same(old, new, with_seed=augment in ("resize_flip", "fgvc_train"))
  if augment in ("none", "fgvc_eval"):  # eval specs also drop a '_seed' they do not use
    _assert_same(old, new, with_seed=True)


# Each config's pp before pp specs: (image_size, normalisation, train_augment, eval_augment,
# antialias), recorded from configs/*.py at commit 3b07a5c.
OLD_CONFIG_PP = {
    "vpt_vtab:": (32, "imagenet", "none", "none", None),
    "vpt_vtab:task=cifar": (224, "imagenet", "none", "none", None),
    "vpt_swin_vtab:": (32, "imagenet", "none", "none", None),
    "vpt_swin_vtab:task=dtd": (224, "imagenet", "none", "none", None),
    "sa2vp_vtab:": (32, "inception", "none", "none", None),
    "sa2vp_vtab:task=cifar": (224, "inception", "none", "none", None),
    "sa2vp_vtab:task=dtd,files": (224, "inception", "none", "none", None),
    "sa2vp_swin_vtab:": (32, "inception", "none", "none", None),
    "sa2vp_swin_vtab:task=svhn": (224, "inception", "none", "none", None),
    "sa2vp_fgvc:": (32, "inception", "none", "none", None),
    "sa2vp_fgvc:dataset=cub": (224, "inception", "fgvc_train", "fgvc_eval", None),
    "sa2vp_hta:": (32, "inception", "none", "none", None),
    "sa2vp_hta:dataset=cifar10": (224, "inception", "fgvc_train", "fgvc_eval", None),
    "coop:": (32, "clip", "none", "none", None),
    "rpl_lvis:data=/nonexistent,demo=True": (32, "clip", "none", "none", None),
    "lmpt_voc_lt:": (32, "imagenet", "resize_flip", "none", True),
    "lmpt_voc_lt:data=/nonexistent": (224, "imagenet", "resize_flip", "none", True),
    "lmpt_coco_lt:data=/nonexistent,baseline=finetune": (
        224, "imagenet", "resize_flip", "none", True),
}


@pytest.mark.parametrize("case", sorted(OLD_CONFIG_PP))
def test_every_config_keeps_its_preprocessing_tensors(case):
  name, arg = case.split(":")
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  size, norm, train_augment, eval_augment, antialias = OLD_CONFIG_PP[case]
  assert config.pp.image_size == size
  mean, std = pp_ops.NORMALIZATIONS[norm]
  for key, augment in (("train", train_augment), ("eval", eval_augment)):
    old = _old_make_preprocess_fn(image_size=size, mean=mean, std=std, augment=augment,
                                  antialias=antialias)
    _assert_same(old, preprocess.make_preprocess_fn(config.pp[key]), with_seed=True)


@pytest.mark.parametrize("case,scale", [("coop:dataset=folder", (0.08, 1.0)),
                                        ("rpl_lvis:data=/nonexistent", (0.4, 1.0))])
def test_coop_and_rpl_real_data_follow_dassl_transforms(case, scale):
  """Changed on purpose from the old resize-crop-flip: Dassl's RandomResizedCrop (CoOp's scale
  (0.08, 1), RPL's INPUT.CROP_SCALE (0.4, 1)), bicubic, with a flip; test: shorter side to 224
  (bicubic) and the center crop."""
  name, arg = case.split(":")
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  tail = "value_range(0, 1)|normalize('clip')"
  assert config.pp.train == f"random_resized_crop(224, scale={scale})|flip_lr|{tail}"
  assert config.pp.eval == f"resize_shorter_side(224, method='bicubic')|center_crop(224)|{tail}"
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
  out = preprocess.make_preprocess_fn(config.pp.train)(
      {"image": image, "_seed": tf.constant([1, 2], tf.int64)})
  assert out["image"].shape == (224, 224, 3)
  assert preprocess.make_preprocess_fn(config.pp.eval)({"image": image})["image"].shape == (
      224, 224, 3)


# ---------------------------------------------------------------- registry, parser, builder

def test_parse_spec_reads_literals_only():
  calls = pp_registry.parse_spec(" a | b(1, (2, 3), k='x|y', n=-0.5)|c() ")
  assert [(c.name, c.args, c.kwargs) for c in calls] == [
      ("a", (), {}), ("b", (1, (2, 3)), {"k": "x|y", "n": -0.5}), ("c", (), {})]
  assert calls[1].text == "b(1, (2, 3), k='x|y', n=-0.5)"
  with pytest.raises(ValueError, match=r"'normalize\(mean, std\)'.*'mean' is not a literal"):
    pp_registry.parse_spec("resize(8)|normalize(mean, std)")
  with pytest.raises(ValueError, match="not a literal"):
    pp_registry.parse_spec("resize(__import__('os').getcwd())")
  with pytest.raises(ValueError, match="not an op"):
    pp_registry.parse_spec("resize(8)|os.system('x')")
  with pytest.raises(ValueError, match="does not parse"):
    pp_registry.parse_spec("resize(8)||flip_lr")
  with pytest.raises(ValueError, match="empty"):
    pp_registry.parse_spec("  ")
  with pytest.raises(TypeError, match="string"):
    pp_registry.parse_spec(["resize(8)"])


def test_unknown_op_lists_the_known_ops():
  with pytest.raises(ValueError, match=r"Unknown pp op 'resise'; known ops: .*center_crop.*"
                                       r"random_resized_crop.*resize.*value_range"):
    preprocess.make_preprocess_fn("resise(8)|value_range(0, 1)")


@pytest.mark.parametrize("spec,message", [
    ("resize(8, methd='bicubic')", r"resize\(8, methd='bicubic'\).*unexpected keyword "
                                   r"argument 'methd'.*expected resize\(size, method='bilinear', "
                                   r"antialias=True\)\."),
    ("center_crop()", r"missing a required argument: 'size'.*expected center_crop\(size\)"),
    ("flip_lr(0.5, 0.2)", r"too many positional arguments.*expected flip_lr\(p"),
    ("resize(8, method='cubic')", r"resize\(8, method='cubic'\).: method='cubic'.*bicubic"),
    ("resize(0)", r"size=0: expected a positive int"),
    ("flip_lr(p=2)", r"p=2: expected a probability"),
    ("normalize('imagenett')", r"preset name .*imagenet, inception, clip"),
    ("normalize((0.5, 0.5), (0.5,))", r"as many means as nonzero stds"),
    ("random_resized_crop(8, scale=(1.0, 0.5))", r"scale=\(1.0, 0.5\).*low <= high"),
    ("value_range(0, 1, 3, 3)", r"input range is empty"),
])
def test_bad_arguments_fail_at_build_time_naming_the_op(spec, message):
  with pytest.raises(ValueError, match=message):
    preprocess.make_preprocess_fn(spec)


@pytest.mark.parametrize("spec,op", [
    ("resize(8)|flip_lr|value_range(0, 1)", "flip_lr"),
    ("resize_shorter_side(10)|random_crop(8)", "random_crop(8)"),
    ("random_resized_crop(8)", "random_resized_crop(8)")])
def test_random_op_without_seed_says_to_use_an_eval_spec(spec, op):
  pp = preprocess.make_preprocess_fn(spec)
  example = {"image": tf.zeros((12, 12, 3), tf.uint8)}
  with pytest.raises(ValueError, match=rf"'{re.escape(op)}.*is random.*'_seed'.*center_crop"):
    pp(example)
  assert "_seed" not in pp({**example, "_seed": tf.constant([1, 2], tf.int64)})


def test_register_rejects_duplicates_and_odd_names():
  with pytest.raises(ValueError, match="'resize' is already registered"):
    pp_registry.register("resize")(lambda: lambda example: example)
  with pytest.raises(ValueError, match="identifier"):
    pp_registry.register("my-op")


def test_ops_pass_other_keys_through_and_cast_the_label():
  pp = preprocess.make_preprocess_fn("resize(4)|value_range(-1, 1)")
  out = pp({"image": np.full((6, 6, 3), 255, np.uint8), "label": np.int64(2),
            "caption_tokens": np.array([5, 6], np.int32)})
  np.testing.assert_allclose(out["image"], np.ones((4, 4, 3)), rtol=1e-6)
  assert out["label"].dtype == tf.int32 and int(out["label"]) == 2
  np.testing.assert_array_equal(out["caption_tokens"], [5, 6])
  zero = pp({"image": np.zeros((6, 6, 3), np.uint8)})["image"]
  np.testing.assert_allclose(zero, -np.ones((4, 4, 3)), rtol=1e-6)


def test_flip_lr_probability():
  image = np.zeros((2, 2, 3), np.uint8)
  image[:, 0] = 255
  seeds = [tf.constant([0, i], tf.int64) for i in range(16)]
  left = lambda spec: {float(preprocess.make_preprocess_fn(spec)(
      {"image": image, "_seed": s})["image"][0, 0, 0]) for s in seeds}
  assert left("flip_lr(p=0)|value_range(0, 1)") == {1.0}
  assert left("flip_lr(p=1)|value_range(0, 1)") == {0.0}
  assert left("flip_lr|value_range(0, 1)") == {0.0, 1.0}


# ---------------------------------------------------------------- random_resized_crop

def _boxes(height: int, width: int, n: int, **kw) -> np.ndarray:
  """(n, 4) [top, left, h, w] for seeds [0, i], i < n."""
  seeds = tf.stack([tf.zeros(n, tf.int64), tf.range(n, dtype=tf.int64)], axis=1)
  box = lambda seed: tf.stack(pp_ops.random_resized_crop_box(height, width, seed, **kw))
  return tf.function(lambda s: tf.map_fn(box, s, fn_output_signature=tf.int32))(seeds).numpy()


def test_random_resized_crop_shape_determinism_and_seeds():
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (60, 90, 3), np.uint8))
  pp = preprocess.make_preprocess_fn("random_resized_crop(24)|value_range(0, 1)")
  run = lambda seed: pp({"image": image, "_seed": tf.constant(seed, tf.int64)})["image"].numpy()
  first = run([3, 4])
  assert first.shape == (24, 24, 3) and first.dtype == np.float32
  assert 0.0 <= first.min() and first.max() <= 1.0  # bicubic overshoot clipped, as PIL's uint8
  np.testing.assert_array_equal(run([3, 4]), first)
  assert not np.array_equal(run([3, 5]), first) and not np.array_equal(run([4, 4]), first)


def test_random_resized_crop_is_the_resized_box():
  image = tf.constant(np.random.default_rng(2).integers(0, 256, (50, 70, 3), np.uint8))
  seed = tf.constant([7, 8], tf.int64)
  out = pp_ops.random_resized_crop(16, method="bilinear")({"image": image, "_seed": seed})
  top, left, h, w = (int(v) for v in pp_ops.random_resized_crop_box(50, 70, seed))
  expected = tf.image.resize(image[top:top + h, left:left + w], (16, 16), "bilinear",
                             antialias=True)
  np.testing.assert_array_equal(out["image"], expected)


def _torchvision_sizes(height, width, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """(n, 2) [h, w] of torchvision `RandomResizedCrop.get_params`, re-written in NumPy (its loop
  of 10 tries, then the fallback), with NumPy's own random numbers."""
  rng, sizes = np.random.default_rng(0), []
  for _ in range(n):
    for _ in range(10):
      target_area = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
      if 0 < w <= width and 0 < h <= height:
        break
    else:
      in_ratio = width / height
      h, w = ((round(width / min(ratio)), width) if in_ratio < min(ratio) else
              (height, round(height * max(ratio))) if in_ratio > max(ratio) else (height, width))
    sizes.append((h, w))
  return np.array(sizes)


@pytest.mark.parametrize("height,width", [(120, 200), (150, 150)])
def test_random_resized_crop_boxes_stay_inside_and_follow_scale_and_ratio(height, width):
  boxes = _boxes(height, width, 2000)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area, log_ratio = h * w / (height * width), np.log(w / h)
  # Rounding w and h to ints moves the area and ratio slightly past the bounds.
  assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
  assert log_ratio.min() >= math.log(3 / 4) - 0.05 and log_ratio.max() <= math.log(4 / 3) + 0.05
  assert area.min() < 0.1 and log_ratio.min() < math.log(0.8) and log_ratio.max() > math.log(1.25)
  assert len({(t, l) for t, l in zip(top, left)}) > 1000  # placed at random
  # The same distribution as torchvision's algorithm: area fraction U(0.08, 1) and log ratio
  # U(log 3/4, log 4/3), cut by the tries that do not fit.
  ref_h, ref_w = _torchvision_sizes(height, width, 4000).T
  ref_area, ref_log_ratio = ref_h * ref_w / (height * width), np.log(ref_w / ref_h)
  for ours, ref in ((area, ref_area), (log_ratio, ref_log_ratio)):
    assert abs(ours.mean() - ref.mean()) < 0.02 and abs(ours.std() - ref.std()) < 0.02
    assert abs(ours.max() - ref.max()) < 0.05


@pytest.mark.parametrize("height,width,scale,ratio,expected", [
    # torchvision's fallback by hand. 40 × 40, ratio >= 10: no try fits (w >= sqrt(1600 · 0.5 ·
    # 10) > 40); in_ratio 1 < 10 -> w = 40, h = round(40 / 10) = 4, top = (40 - 4) // 2 = 18.
    (40, 40, (0.5, 1.0), (10.0, 20.0), (18, 0, 4, 40)),
    # 30 × 50, ratio <= 0.1: h >= sqrt(1500 · 0.5 / 0.1) > 30; in_ratio 5/3 > 0.1 -> h = 30,
    # w = round(30 · 0.1) = 3, left = (50 - 3) // 2 = 23.
    (30, 50, (0.5, 1.0), (0.05, 0.1), (0, 23, 30, 3)),
    # scale >= 2: no crop of twice the area fits; in_ratio 5/3 > 4/3 -> h = 30,
    # w = round(30 · 4/3) = 40, left = (50 - 40) // 2 = 5.
    (30, 50, (2.0, 3.0), (3 / 4, 4 / 3), (0, 5, 30, 40)),
    # in_ratio 48/40 = 1.2 within the bounds: the whole image.
    (40, 48, (2.0, 3.0), (3 / 4, 4 / 3), (0, 0, 40, 48)),
])
def test_random_resized_crop_fallback_matches_torchvision(height, width, scale, ratio, expected):
  boxes = _boxes(height, width, 20, scale=scale, ratio=ratio)
  assert {tuple(b) for b in boxes.tolist()} == {expected}
  top, left, h, w = expected
  image = tf.constant(np.random.default_rng(3).integers(0, 256, (height, width, 3), np.uint8))
  op = pp_ops.random_resized_crop(8, scale=scale, ratio=ratio)
  out = op({"image": image, "_seed": tf.constant([0, 1], tf.int64)})["image"]
  expected_image = tf.clip_by_value(tf.image.resize(image[top:top + h, left:left + w], (8, 8),
                                                    "bicubic", antialias=True), 0.0, 255.0)
  np.testing.assert_array_equal(out, expected_image)
  assert math.isclose(ratio[0], min(ratio))


# ---------------------------------------------------------------- decode and CLIP tokenisation

def test_decode_op_reads_encoded_bytes_and_passes_decoded_images():
  image = np.random.default_rng(1).integers(0, 256, (5, 7, 3), np.uint8)
  encoded = tf.io.encode_png(image)
  fn = preprocess.make_preprocess_fn("decode|value_range(0, 1)")
  np.testing.assert_allclose(fn({"image": encoded})["image"], image / 255.0, rtol=1e-6)
  np.testing.assert_allclose(fn({"image": image})["image"], image / 255.0, rtol=1e-6)


def test_clip_tokenize_op_equals_the_tokenizer_inside_tf_data():
  from input_pipeline import embedded_clip  # pylint: disable=import-outside-toplevel
  from jaxprompt.models import clip_tokenizer  # pylint: disable=import-outside-toplevel
  vocab = embedded_clip.byte_vocabulary()
  captions = ["a red square.", "two blue circles (small)."]
  fn = preprocess.make_preprocess_fn(f"clip_tokenize({vocab!r}, context_length=16)")
  dataset = tf.data.Dataset.from_tensor_slices({"caption": captions, "image": np.zeros((2, 1))})
  got = np.stack([e["caption_tokens"] for e in dataset.map(fn).as_numpy_iterator()])
  expected = clip_tokenizer.Tokenizer(vocab, context_length=16)(captions, truncate=True)
  np.testing.assert_array_equal(got, expected)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    preprocess.make_preprocess_fn("clip_tokenize('/no/such/vocab.txt.gz')")
  with pytest.raises(KeyError, match="clip_tokenize reads 'text'"):
    preprocess.make_preprocess_fn(f"clip_tokenize({vocab!r}, key='text')")(
        {"caption": tf.constant("x")})
