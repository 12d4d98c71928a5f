"""TPT's test-time views (`input_pipeline/pp_ops_tta.py`) and seeded evaluation streams
(`pipeline.make_eval_dataset(..., augment_seed=...)`).

The AugMix ops are checked against Pillow itself, with TPT's parameter mapping
(azshue/TPT `data/augmix_ops.py`) rewritten here as the reference; the mix against numpy.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from input_pipeline import base, pipeline, pp_ops, pp_ops_tta, preprocess

SEED = tf.constant([3, 7], tf.int64)
BILINEAR = Image.Resampling.BILINEAR


def _image(h=30, w=22, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _views(spec: str, image, seed=SEED) -> np.ndarray:
  out = preprocess.make_preprocess_fn(spec)({"image": image, "_seed": seed, "label": 4})
  assert "image" not in out and int(out["label"]) == 4
  return out["views"].numpy()


# ---------------------------------------------------------------- the views

def test_views_shape_dtype_and_plain_view():
  image = _image()
  views = _views("tta_views(5, 16)", image)
  assert views.shape == (5, 16, 16, 3) and views.dtype == np.float32
  assert views.min() >= 0 and views.max() <= 255
  plain = preprocess.make_preprocess_fn("resize_shorter_side(16, 'bicubic')|center_crop(16)")(
      {"image": image})["image"].numpy()
  np.testing.assert_array_equal(views[0], plain)
  # The ops after tta_views apply to every view, as to a video's frames.
  normalised = _views("tta_views(5, 16)|value_range(0, 1)|normalize('clip')", image)
  mean, std = np.array(pp_ops.CLIP_MEAN), np.array(pp_ops.CLIP_STD)
  np.testing.assert_allclose(normalised, (views / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_augmented_views_differ_and_are_reproducible():
  image = _image()
  views = _views("tta_views(6, 16)", image)
  np.testing.assert_array_equal(views, _views("tta_views(6, 16)", image))
  for i in range(6):
    for j in range(i):
      assert np.abs(views[i] - views[j]).max() > 1, (i, j)
  other = _views("tta_views(6, 16)", image, seed=tf.constant([3, 8], tf.int64))
  np.testing.assert_array_equal(other[0], views[0])  # the plain view draws nothing
  assert all(np.abs(other[v] - views[v]).max() > 1 for v in range(1, 6))


def test_augmented_views_flip_about_half_the_time():
  # Brightness grows left to right, so every crop of it is either increasing (kept) or
  # decreasing (flipped) along x.
  ramp = np.broadcast_to(np.arange(0, 240, 4, dtype=np.uint8)[None, :, None], (40, 60, 3))
  views = _views("tta_views(65, 8)", np.ascontiguousarray(ramp))[1:]
  slopes = np.sign(views[:, :, -1].mean(axis=(1, 2)) - views[:, :, 0].mean(axis=(1, 2)))
  assert np.all(slopes != 0)
  assert 16 <= np.sum(slopes < 0) <= 48  # Binomial(64, 1/2): outside this has p < 1e-4


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 3)])
def test_image_smaller_than_the_crop_is_upscaled(shape):
  views = _views("tta_views(3, 16, augmix=True)", _image(*shape[:2]))
  assert views.shape == (3, 16, 16, 3) and 0 <= views.min() and views.max() <= 255


def test_arguments_and_example_are_checked():
  for spec in ("tta_views(0)", "tta_views(4, size=0)", "tta_views(augmix='yes')",
               "tta_views(severity=0)", "tta_views(severity=11)"):
    with pytest.raises(ValueError, match="tta_views"):
      preprocess.make_preprocess_fn(spec)
  fn = preprocess.make_preprocess_fn("tta_views(2, 8)")
  with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\) 'image'"):
    fn({"image": np.zeros((9, 9, 3), np.float32), "_seed": SEED})
  with pytest.raises(KeyError, match="tta_views reads 'image'"):
    fn({"video": np.zeros((2, 9, 9, 3), np.uint8), "_seed": SEED})
  with pytest.raises(ValueError, match="is random: it needs the example's '_seed'"):
    fn({"image": _image()})


# ---------------------------------------------------------------- AugMix ops against Pillow

def _tpt_op(name: str, pil: Image.Image, level: float, negate: bool) -> Image.Image:
  """TPT's `augmix_ops.py` op `name` at sample_level draw `level` (IMAGE_SIZE = the image's)."""
  sign = -1 if negate else 1
  size = pil.size[0]
  if name == "autocontrast":
    return ImageOps.autocontrast(pil)
  if name == "equalize":
    return ImageOps.equalize(pil)
  if name == "posterize":
    return ImageOps.posterize(pil, 4 - int(level * 4 / 10))
  if name == "rotate":
    return pil.rotate(sign * int(level * 30 / 10), resample=BILINEAR)
  if name == "solarize":
    return ImageOps.solarize(pil, 256 - int(level * 256 / 10))
  shear = sign * (float(level) * 0.3 / 10)
  shift = sign * int(level * (size / 3) / 10)
  coefficients = {"shear_x": (1, shear, 0, 0, 1, 0), "shear_y": (1, 0, 0, shear, 1, 0),
                  "translate_x": (1, 0, shift, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, shift)}
  return pil.transform((size, size), Image.Transform.AFFINE, coefficients[name],
                       resample=BILINEAR)


@pytest.mark.parametrize("index", range(len(pp_ops_tta.AUGMIX_OPS)))
def test_augmix_ops_match_pillow(index):
  name = pp_ops_tta.AUGMIX_OPS[index]
  images = [_image(48, 48, seed=1), (_image(48, 48, seed=2) // 3 + 70).astype(np.uint8)]
  for image in images:
    for level, negate in ((0.95, False), (3.7, True), (7.2, False)):
      ours = pp_ops_tta.augmix_op(image, index, level, negate).numpy().astype(int)
      pil = np.asarray(_tpt_op(name, Image.fromarray(image), level, negate)).astype(int)
      diff = np.abs(ours - pil)
      if name in ("rotate", "shear_x", "shear_y"):  # float32 bilinear sampling (module docs)
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (name, level, np.mean(diff > 0))
      else:
        np.testing.assert_array_equal(ours, pil, err_msg=f"{name} at level {level}")


# ---------------------------------------------------------------- the mix

def test_augmix_mix_formula_and_normalised_space():
  image = _image(16, 16, seed=3)
  for seed in ([0, 1], [5, 9], [2, 2]):
    chains, weights, mix = (t.numpy() for t in pp_ops_tta.augmix_parts(image, seed))
    assert chains.shape == (3, 16, 16, 3) and chains.dtype == np.uint8
    assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-6 and 0 <= mix <= 1
    ours = pp_ops_tta.augmix_image(image, seed).numpy()
    expected = mix * image + (1 - mix) * np.tensordot(weights, chains.astype(np.float64), 1)
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    assert 0 <= ours.min() and ours.max() <= 255
    # TPT mixes the CLIP-normalised tensors; normalising our pixel mix gives the same.
    mean, std = np.array(pp_ops.CLIP_MEAN), np.array(pp_ops.CLIP_STD)
    norm = lambda x: (np.asarray(x, np.float64) / 255 - mean) / std  # noqa: E731
    tpt = mix * norm(image) + (1 - mix) * sum(w * norm(c) for w, c in zip(weights, chains))
    np.testing.assert_allclose(norm(ours), tpt, atol=1e-5)


def test_augmix_views_mix_their_pre_augmented_crop():
  # Documented seed tree: view v >= 1 draws from stateless_split(seed, V - 1)[v - 1], split
  # into (crop box, flip, AugMix); so the AugMix-ed view is augmix_image of the plain one.
  image = _image(seed=4)
  plain = _views("tta_views(4, 16)", image)
  mixed = _views("tta_views(4, 16, augmix=True)", image)
  np.testing.assert_array_equal(mixed[0], plain[0])
  view_seeds = tf.random.experimental.stateless_split(SEED, 3)
  for v in range(1, 4):
    augmix_seed = tf.random.experimental.stateless_split(view_seeds[v - 1], 3)[2]
    crop = tf.cast(tf.round(plain[v]), tf.uint8)
    np.testing.assert_allclose(mixed[v], pp_ops_tta.augmix_image(crop, augmix_seed).numpy(),
                               atol=1e-4)
    assert np.abs(mixed[v] - plain[v]).max() > 1


# ---------------------------------------------------------------- seeded evaluation streams

class _Tiny(base.DataSource):
  name, num_classes, splits = "tiny", 7, ("test",)

  def __init__(self):
    self.images = np.stack([_image(12, 10, seed=10 + i) for i in range(7)])

  def num_examples(self, split):
    return 7

  def raw_dataset(self, split, *, process_index=0, process_count=1):
    start, end = base.host_range(7, process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({"image": self.images[start:end],
                                               "label": np.arange(start, end, dtype=np.int32)})


def _views_by_label(augment_seed, batch, process_count) -> dict:
  fn = preprocess.make_preprocess_fn("tta_views(3, 8)|value_range(0, 1)")
  out = {}
  for host in range(process_count):
    ds = pipeline.make_eval_dataset(_Tiny(), "test", fn, global_batch_size=batch,
                                    process_index=host, process_count=process_count,
                                    augment_seed=augment_seed)
    for b in ds.as_numpy_iterator():
      assert b["views"].shape == (batch // process_count, 3, 8, 8, 3)
      out.update({int(l): v for l, v, m in zip(b["label"], b["views"], b["_mask"]) if m})
  return out


def test_eval_views_do_not_depend_on_batching_or_hosts():
  reference = _views_by_label(11, batch=2, process_count=1)
  assert sorted(reference) == list(range(7))
  for batch, hosts in ((3, 1), (4, 2)):
    got = _views_by_label(11, batch, hosts)
    assert sorted(got) == list(range(7))
    for label, views in reference.items():
      np.testing.assert_array_equal(got[label], views)
  other = _views_by_label(12, batch=2, process_count=1)
  assert all(np.abs(other[i][1:] - reference[i][1:]).max() > 0 for i in range(7))
  np.testing.assert_array_equal(other[0][0], reference[0][0])  # the plain view is fixed


def test_eval_without_augment_seed_refuses_random_ops():
  fn = preprocess.make_preprocess_fn("tta_views(3, 8)")
  with pytest.raises(ValueError, match="is random: it needs the example's '_seed'"):
    pipeline.make_eval_dataset(_Tiny(), "test", fn, global_batch_size=2)
  with pytest.raises(ValueError, match="augment_seed=True"):
    pipeline.make_eval_dataset(_Tiny(), "test", fn, global_batch_size=2, augment_seed=True)
