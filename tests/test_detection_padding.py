"""GLIP's evaluation padding: `pad_image(..., size_divisible=32)` (pp_ops_boxes.py), the eval
stream's shape buckets (pipeline.py) and the 'detection' evaluator on them: each image is run at
the multiple of 32 of its own size, as GLIP's `to_image_list(size_divisible=32)` pads an image
alone in its batch, and gives what running it alone gives."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import glip_coco, glip_odinw, sdpt_coco, sdpt_odinw
from input_pipeline import (base, detection, embedded_detection, pipeline, pp_ops_boxes,
                            preprocess)
from jaxprompt import sharding
from jaxprompt.evaluators import common, detection as detection_evaluator

# (h, w) crops of the embedded 128 x 128 scenes; padded to multiples of 32 they fall in 6 sizes.
SIZES = ((128, 128), (100, 128), (70, 100), (64, 64), (33, 90), (90, 33), (128, 70), (96, 128),
         (40, 40), (100, 120), (64, 60), (128, 100), (120, 128))
BUCKET_PP = "to_bgr255_normalize|pad_image(128, 128, size_divisible=32)|pad_boxes(4, True)"
CANVAS_PP = "to_bgr255_normalize|pad_image(128, 128)|pad_boxes(4, True)"


def ceil32(size):
  return tuple(-(-int(s) // 32) * 32 for s in size)


class CroppedShapes(embedded_detection.DetectionShapesSource):
  """The embedded scenes' 'test' split cut to `SIZES` (image i + 1 to SIZES[i]): boxes clipped to
  the crop and empty ones dropped, as a COCO source does."""

  def __init__(self):
    super().__init__(name="test/cropped_shapes")
    images, boxes, labels, num_boxes = super().arrays("test")
    n = len(SIZES)
    self.crop_boxes = np.zeros((n, 4, 4), np.float32)
    self.crop_labels = np.zeros((n, 4), np.int32)
    self.crop_counts = np.zeros(n, np.int32)
    for i, (h, w) in enumerate(SIZES):
      kept, keep = detection.clip_and_drop_empty(boxes[i, :num_boxes[i]], h, w)
      count = int(keep.sum())
      self.crop_boxes[i, :count] = kept[keep]
      self.crop_labels[i, :count] = labels[i, :num_boxes[i]][keep]
      self.crop_counts[i] = count
    self.crop_images = images[:n]

  def num_examples(self, split):
    return len(SIZES) if split == "test" else super().num_examples(split)

  def raw_dataset(self, split, *, process_index=0, process_count=1):
    assert split == "test"
    start, end = base.host_range(len(SIZES), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({
        "image": self.crop_images[start:end], "crop": np.array(SIZES, np.int32)[start:end],
        "boxes": self.crop_boxes[start:end], "box_labels": self.crop_labels[start:end],
        "num_boxes": self.crop_counts[start:end],
        "image_id": np.arange(start + 1, end + 1, dtype=np.int32)})

  def decode_detection(self, example):
    example = dict(example)
    count, crop = example.pop("num_boxes"), example.pop("crop")
    return {**example, "image": example["image"][:crop[0], :crop[1]],
            "boxes": example["boxes"][:count], "box_labels": example["box_labels"][:count],
            "orig_size": crop}

  def coco_ground_truth(self, split):
    return detection.coco_ground_truth_dict(
        np.arange(1, len(SIZES) + 1), SIZES,
        [b[:k] for b, k in zip(self.crop_boxes, self.crop_counts)],
        [x[:k] for x, k in zip(self.crop_labels, self.crop_counts)], self.category_ids,
        self.class_names)


@pytest.fixture(scope="module")
def source():
  return CroppedShapes()


def _run(spec, example):
  example = {k: tf.convert_to_tensor(v) for k, v in example.items()}
  return {k: v.numpy() for k, v in preprocess.make_preprocess_fn(spec)(example).items()}


def _eval_batches(source, spec, batch_size=4):
  return list(pipeline.make_eval_dataset(source, "test", preprocess.make_preprocess_fn(spec),
                                         global_batch_size=batch_size).as_numpy_iterator())


# ------------------------------------------------------------------------------------ pp op


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (200, 640), (640, 480)])
def test_glip_sizes_are_padded_to_multiples_of_32_and_boxes_kept(hw):
  image = np.full((*hw, 3), 90, np.uint8)
  boxes = np.array([[10, 20, 300, 150], [0, 0, 5, 7]], np.float32)
  example = {"image": image, "boxes": boxes}
  head = "resize_glip(800, 1333)|to_bgr255_normalize|"
  padded = _run(head + "pad_image(1344, 1344, size_divisible=32)", example)
  canvas = _run(head + "pad_image(1344, 1344)", example)
  resized = pp_ops_boxes.glip_output_size(*hw, 800, 1333)
  assert tuple(padded["image_size"]) == resized
  assert tuple(padded["_padded_size"]) == ceil32(resized)
  if hw == (480, 640):  # the common COCO size: 800 x 1066 -> 800 x 1088
    assert resized == (800, 1066) and tuple(padded["_padded_size"]) == (800, 1088)
  assert padded["image"].shape == (1344, 1344, 3) and "_padded_size" not in canvas
  np.testing.assert_array_equal(padded["image"], canvas["image"])
  np.testing.assert_array_equal(padded["boxes"], canvas["boxes"])


def test_pad_image_size_divisible_errors():
  with pytest.raises(ValueError, match=r"multiple of 32.*pad_image\(128, 160, size_divisible=32"):
    preprocess.make_preprocess_fn("pad_image(100, 160, size_divisible=32)")
  for bad in ("-32", "True", "2.5"):
    with pytest.raises(ValueError, match="size_divisible="):
      preprocess.make_preprocess_fn(f"pad_image(128, 128, size_divisible={bad})")


# ------------------------------------------------------------------------------ eval stream


def test_buckets_hold_equal_padded_sizes_and_every_example_once(source):
  buckets, canvas = _eval_batches(source, BUCKET_PP), _eval_batches(source, CANVAS_PP)
  by_id = {int(i): (b, r) for b in canvas for r, i in enumerate(b["image_id"]) if b["_mask"][r]}
  seen, batches_per_size = [], {}
  for batch in buckets:
    assert "_padded_size" not in batch and len(batch["_mask"]) == 4
    h, w = batch["image"].shape[1:3]
    batches_per_size[(h, w)] = batches_per_size.get((h, w), 0) + 1
    for row in range(4):
      if not batch["_mask"][row]:  # filler rows: zeros everywhere
        assert all(not np.any(v[row]) for v in batch.values())
        continue
      image_id = int(batch["image_id"][row])
      seen.append(image_id)
      assert (h, w) == ceil32(SIZES[image_id - 1]) == ceil32(batch["image_size"][row])
      other, other_row = by_id[image_id]  # the same example on the fixed canvas
      np.testing.assert_array_equal(batch["image"][row], other["image"][other_row, :h, :w])
      assert not np.any(other["image"][other_row, h:]) and not np.any(
          other["image"][other_row, :, w:])
      for key in ("boxes", "box_labels", "box_mask", "positive_map", "image_size", "orig_size",
                  "text_ids"):
        np.testing.assert_array_equal(batch[key][row], other[key][other_row], err_msg=key)
  assert sorted(seen) == list(range(1, len(SIZES) + 1))
  counts = {}
  for size in SIZES:
    counts[ceil32(size)] = counts.get(ceil32(size), 0) + 1
  assert batches_per_size == {s: -(-n // 4) for s, n in counts.items()}  # one partial per size


def test_bucketing_refuses_several_processes_and_training_keeps_the_canvas(source):
  fn = preprocess.make_preprocess_fn(BUCKET_PP)
  with pytest.raises(ValueError, match=r"single process.*process_count=2.*pad_image\(H, W\)"):
    pipeline.make_eval_dataset(source, "test", fn, global_batch_size=4, process_count=2)
  train = next(pipeline.make_train_dataset(source, "test", fn, global_batch_size=4, seed=0,
                                           cache=False).as_numpy_iterator())
  assert train["image"].shape == (4, 128, 128, 3) and "_padded_size" not in train
  spec = pipeline.batch_spec(source, "test", fn, train=False)  # what the trainer inits from
  assert spec["image"].shape.as_list() == [None, 128, 128, 3] and "_padded_size" not in spec


# -------------------------------------------------------------------------------- evaluator


def _shape_sensitive_detect(traced):
  """One box per image spanning the padded input, scored by the input's mean: both change with
  the padding. `traced` collects the (H, W) of every trace."""

  def detect(variables, batch, class_token_map):
    image = batch["image"]
    b, h, w = image.shape[:3]
    traced.append((h, w))
    box = jnp.array([1.0, 2.0, w / 2, h / 3]) + variables["shift"]
    return {"boxes": jnp.broadcast_to(box, (b, 1, 4)),
            "scores": jax.nn.sigmoid(image.mean(axis=(1, 2, 3)))[:, None],
            "labels": jnp.ones((b, 1), jnp.int32), "valid": jnp.ones((b, 1), bool)}

  return detect


def _padding_invariant_detect(variables, batch, class_token_map):
  """The batch's boxes shifted and scored by the mean of the unpadded pixels ('image_size')."""
  image = batch["image"]
  h, w = batch["image_size"][:, 0], batch["image_size"][:, 1]
  inside = ((jnp.arange(image.shape[1])[None, :, None] < h[:, None, None])
            & (jnp.arange(image.shape[2])[None, None, :] < w[:, None, None]))
  mean = (image.sum(-1) * inside).sum((1, 2)) / (3 * inside.sum((1, 2)))
  rank = jnp.arange(batch["boxes"].shape[1])
  return {"boxes": batch["boxes"] + 4 * mean[:, None, None],
          "scores": jax.nn.sigmoid(mean[:, None] + 0.1 * rank),
          "labels": jnp.maximum(batch["box_labels"], 1), "valid": batch["box_mask"]}


def _evaluator(source, spec, detect, batch_size=4, process_count=None, monkeypatch=None):
  mesh = sharding.make_mesh()
  config = ml_collections.ConfigDict({"pp": {"eval": spec}})
  ctx = common.EvalContext(config, source, mesh,
                           common.eval_batches(source, preprocess.make_preprocess_fn(spec),
                                               batch_size, mesh), {"detect": detect})
  if process_count:
    monkeypatch.setattr(jax, "process_count", lambda: process_count)
  return common.build("det", {"type": "detection", "split": "test"}, ctx)


def test_several_processes_are_refused_when_the_evaluator_is_built(source, monkeypatch):
  """Before training, not at the first evaluation."""
  with pytest.raises(ValueError, match=r"config.evals.det .*single process.*process_count=2"):
    _evaluator(source, BUCKET_PP, _padding_invariant_detect, process_count=2,
               monkeypatch=monkeypatch)
  _evaluator(source, CANVAS_PP, _padding_invariant_detect, process_count=2,
             monkeypatch=monkeypatch)


def _by_image(results):
  return sorted((r["image_id"], r["bbox"], r["score"]) for r in results)


def test_evaluator_per_image_results_equal_running_each_image_alone(source):
  traced = []
  detect = _shape_sensitive_detect(traced)
  variables = {"shift": jnp.float32(0.5)}
  evaluator = _evaluator(source, BUCKET_PP, detect)
  got, examples = evaluator.results(variables)
  assert examples == len(SIZES)
  # One compile per padded size, none on a second pass.
  sizes = {ceil32(s) for s in SIZES}
  assert sorted(traced) == sorted(sizes)
  evaluator.run(variables)
  assert len(traced) == len(sizes)
  # Each image alone, batch 1, on its own multiple of 32 (cut from the fixed-canvas example).
  expected = []
  canvas_fn = preprocess.make_preprocess_fn(CANVAS_PP)
  for example in source.dataset("test").map(canvas_fn).as_numpy_iterator():
    h, w = ceil32(example["image_size"])
    alone = {k: np.asarray(example[k])[None] for k in ("image_id", "image_size", "orig_size")}
    out = detect(variables, {**alone, "image": example["image"][None, :h, :w]}, None)
    expected += detection_evaluator.coco_results(
        {**alone, "boxes": np.asarray(out["boxes"][0]), "scores": np.asarray(out["scores"][0]),
         "labels": np.asarray(out["labels"][0])}, evaluator.category_of)
  for (gid, gbox, gscore), (eid, ebox, escore) in zip(_by_image(got), _by_image(expected),
                                                      strict=True):
    assert gid == eid
    np.testing.assert_allclose(gbox, ebox, rtol=1e-6)
    np.testing.assert_allclose(gscore, escore, rtol=1e-5)
  # The fixed canvas runs every image at 128 x 128: different boxes and scores here.
  canvas_results, _ = _evaluator(source, CANVAS_PP, _shape_sensitive_detect([])).results(variables)
  assert [r[1:] for r in _by_image(canvas_results)] != [r[1:] for r in _by_image(got)]


def test_padding_invariant_model_gives_the_fixed_canvas_metrics(source):
  variables = {}
  bucketed = _evaluator(source, BUCKET_PP, _padding_invariant_detect).run(variables)
  canvas = _evaluator(source, CANVAS_PP, _padding_invariant_detect, batch_size=3).run(variables)
  assert bucketed["examples"] == canvas["examples"] == len(SIZES)
  assert bucketed == pytest.approx(canvas, rel=1e-6)
  assert 0 < bucketed["AP"] < 1  # shifted boxes: some matches, not all


# ---------------------------------------------------------------------------------- configs


def test_real_data_configs_evaluate_with_glip_padding_and_demos_keep_the_canvas():
  real = [glip_coco.get_config("data=/coco"), glip_coco.get_config("data=/coco,mode=eval"),
          glip_odinw.get_config("data=/odinw"), sdpt_coco.get_config("data=/coco"),
          sdpt_odinw.get_config("data=/odinw,mask=paper")]
  for config in real:
    assert "pad_image(1344, 1344, size_divisible=32)" in config.pp.eval
    assert "pad_image(1344, 1344)|" in config.pp.train and "size_divisible" not in config.pp.train
  for spec in {config.pp.eval for config in real}:
    example = _run(spec, {"image": np.zeros((480, 640, 3), np.uint8),
                                    "boxes": np.zeros((0, 4), np.float32),
                                    "box_labels": np.zeros((0,), np.int32),
                                    "positive_map": np.zeros((0, 8), np.float32)})
    assert tuple(example["_padded_size"]) == (800, 1088)
  for config in (glip_coco.get_config(), glip_odinw.get_config(), sdpt_coco.get_config()):
    assert "size_divisible" not in config.pp.eval and "pad_image(128, 128)" in config.pp.eval
