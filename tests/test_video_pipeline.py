"""Video batches: the generated 'embedded/moving_shapes' source
(`input_pipeline/embedded_video.py`), the pp ops on a 'video' frame by frame (`pp_ops.py`),
multi-caption `clip_tokenize` (`pp_ops_text.py`) and the train/eval streams over videos
(`pipeline.py`)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import input_pipeline
from input_pipeline import (base, embedded, embedded_clip, embedded_video, pipeline, pp_ops,
                            preprocess)
from jaxprompt.models import clip_tokenizer

CONTEXT = 32


@pytest.fixture(scope="module")
def source():
  return input_pipeline.get_source("embedded/moving_shapes")


@pytest.fixture(scope="module")
def tokenizer():
  return clip_tokenizer.Tokenizer(embedded_clip.byte_vocabulary(), context_length=CONTEXT)


def square_track(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per frame the square's centre (x, y) (F, 2) and its pixel count (F,): the square is bright
  (a channel >= 180) and the background a dark grey (< 60)."""
  inside = video.max(axis=-1) > 120  # (F, H, W)
  ys, xs = np.indices(inside.shape[1:])
  counts = inside.sum(axis=(1, 2))
  centres = np.stack([(inside * xs).sum(axis=(1, 2)), (inside * ys).sum(axis=(1, 2))], -1)
  return centres / counts[:, None], counts


# ---------------------------------------------------------------- the embedded source


def test_splits_captions_and_determinism(source):
  assert {s: source.num_examples(s) for s in source.splits} == {"train": 600, "val": 60,
                                                                 "test": 60}
  for split in source.splits:
    videos, captions = source.arrays(split)
    assert videos.shape == (source.num_examples(split), 16, 32, 32, 3)
    assert videos.dtype == np.uint8
    counts = {c: captions.count(c) for c in set(captions)}
    assert set(counts) == set(embedded_video.CAPTIONS)  # every caption, equally often
    assert set(counts.values()) == {len(captions) // embedded_video.NUM_SCENES}
  assert len(set(source.arrays("test")[1])) == 60  # each test caption names one test video
  again = embedded_video.MovingShapesSource()
  for split in source.splits:
    np.testing.assert_array_equal(again.arrays(split)[0], source.arrays(split)[0])
    assert again.arrays(split)[1] == source.arrays(split)[1]
  assert not np.array_equal(source.arrays("val")[0], source.arrays("test")[0])
  assert input_pipeline.get_source("embedded/moving_shapes", num_frames=4).arrays(
      "test")[0].shape == (60, 4, 32, 32, 3)
  with pytest.raises(ValueError, match="num_frames=1"):
    embedded_video.MovingShapesSource(num_frames=1)
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    source.arrays("dev")


def test_the_caption_describes_the_motion(source, tokenizer):
  """For every test clip the square's centre moves 15 px in the caption's direction and not
  across it, stays in the named band and has the named colour; the reversed clip moves the other
  way, which is the caption with the opposite direction. Every phrasing fits the 32-token
  context of the byte vocabulary uncut."""
  videos, captions = source.arrays("test")
  step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
  opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
  for video, text in zip(videos, captions):
    colour, _, _, direction, _, position = text.split()  # {colour} square goes {dir} at {pos}
    centres, counts = square_track(video)
    along = np.abs(step[direction])
    np.testing.assert_allclose(centres[-1] - centres[0], 15 * np.array(step[direction]))
    np.testing.assert_allclose(np.abs(np.diff(centres, axis=0) @ along), 1.0)  # 1 px a frame
    np.testing.assert_allclose(np.diff(centres, axis=0) @ (1 - along), 0.0)
    across = centres[:, 1 if direction in ("left", "right") else 0]  # rows or columns
    band = {"top": 0, "left": 0, "middle": 1, "bottom": 2, "right": 2}[position]
    assert (across // 11 == band).all(), text  # bands 0-9, 11-20, 22-31
    assert (counts == counts[0]).all() and 36 <= counts[0] <= 64, text
    pixel = video[0][video[0].max(axis=-1) > 120][0].astype(int)
    palette = embedded.PALETTE[embedded_clip.COLOUR_NAMES.index(colour)]
    assert np.abs(pixel - palette).max() <= 25, text
    reversed_centres, _ = square_track(video[::-1])
    np.testing.assert_allclose(reversed_centres[-1] - reversed_centres[0],
                               -15 * np.array(step[direction]))
    assert text.replace(f"goes {direction}", f"goes {opposite[direction]}") in captions
  every_phrasing = [embedded_video.caption(i, t) for i in range(embedded_video.NUM_SCENES)
                    for t in range(len(embedded_video.TEMPLATES))]
  tokenizer(every_phrasing, truncate=False)  # raises if one is longer than 32 tokens


# ---------------------------------------------------------------- pp ops on videos


@pytest.mark.parametrize("spec", [
    "center_crop(20)", "center_crop((12, 17))", "resize(16)", "resize((20, 12), 'bicubic')",
    "resize_shorter_side(12)", "value_range(0, 1)", "value_range(-1, 1)|normalize('clip')",
    "random_crop(15)", "flip_lr", "random_resized_crop(12)",
    "resize_shorter_side(20)|random_crop(16)|flip_lr|value_range(0, 1)|normalize('imagenet')",
])
def test_video_ops_equal_the_image_op_on_every_frame(spec):
  """Frame t of the video op is the image op on frame t, bit for bit; random ops use one draw
  per video (the image op with the same seed), which varies between seeds."""
  video = np.random.default_rng(0).integers(0, 256, (3, 22, 26, 3), dtype=np.uint8)
  fn = preprocess.make_preprocess_fn(spec)
  outputs = []
  for seed in range(8):
    seed = tf.constant([seed, 7], tf.int64)
    out = fn({"video": video, "_seed": seed, "caption": "kept"})
    assert set(out) == {"video", "caption"}
    for t in range(len(video)):
      frame = fn({"image": video[t], "_seed": seed})["image"]
      np.testing.assert_array_equal(out["video"][t], frame)
    outputs.append(out["video"].numpy())
  if "random" in spec or "flip" in spec:
    assert any(o.shape != outputs[0].shape or not np.array_equal(o, outputs[0])
               for o in outputs[1:])


def test_video_ops_check_the_example():
  fn = preprocess.make_preprocess_fn("center_crop(8)")
  with pytest.raises(ValueError, match=r"'video' of shape \(T, H, W, C\); got \(10, 10, 3\)"):
    fn({"video": np.zeros((10, 10, 3), np.uint8)})
  with pytest.raises(KeyError, match="'image' or 'video'; its keys are \\['caption'\\]"):
    fn({"caption": "no pixels"})
  assert pp_ops.visual_key({"image": 0, "video": 0}) == "image"  # images win


# ---------------------------------------------------------------- multi-caption tokenisation


def test_clip_tokenize_reads_all_captions_of_a_video(tokenizer):
  vocab = embedded_clip.byte_vocabulary()
  captions = ["a red square moving left", "the square goes left", "x" * 50]
  expected = tokenizer(captions, truncate=True)
  padded = preprocess.make_preprocess_fn(
      f"clip_tokenize({vocab!r}, context_length={CONTEXT}, max_captions=5)")
  ids = padded({"caption": captions})["caption_tokens"].numpy()
  assert ids.shape == (5, CONTEXT) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[:3], expected)
  assert not ids[3:].any() and ids[:3, 0].all()  # padding rows are zeros, real rows start at SOT
  single = padded({"caption": captions[0]})["caption_tokens"].numpy()
  np.testing.assert_array_equal(single, np.concatenate([expected[:1], np.zeros((4, CONTEXT))]))
  unpadded = preprocess.make_preprocess_fn(f"clip_tokenize({vocab!r}, context_length={CONTEXT})")
  np.testing.assert_array_equal(unpadded({"caption": captions})["caption_tokens"], expected)
  ds = tf.data.Dataset.from_tensor_slices({"caption": [captions, captions[::-1]]}).map(padded)
  assert ds.element_spec["caption_tokens"].shape == (5, CONTEXT)
  np.testing.assert_array_equal(next(iter(ds))["caption_tokens"][:3], expected)
  too_few = preprocess.make_preprocess_fn(
      f"clip_tokenize({vocab!r}, context_length={CONTEXT}, max_captions=2)")
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="'caption' holds 3 captions; raise max_captions to at least 3"):
    next(iter(tf.data.Dataset.from_tensors({"caption": captions}).map(too_few)))
  with pytest.raises(ValueError, match="max_captions=0: expected a positive int"):
    preprocess.make_preprocess_fn(f"clip_tokenize({vocab!r}, max_captions=0)")
  with pytest.raises(ValueError, match="a string or a vector of strings from 'caption'"):
    unpadded({"caption": [captions]})


# ---------------------------------------------------------------- batches


def test_train_and_eval_batches_of_the_embedded_clips(source, tokenizer):
  spec = embedded_video.pp_spec(CONTEXT)
  fn = preprocess.make_preprocess_fn(spec)
  train = pipeline.make_train_dataset(source, "train", fn, global_batch_size=8, seed=3)
  first, second = list(train.take(2).as_numpy_iterator())
  assert set(first) == {"video", "caption_tokens"}
  assert first["video"].shape == (8, 16, 32, 32, 3) and first["video"].dtype == np.float32
  assert first["caption_tokens"].shape == (8, CONTEXT)
  assert first["caption_tokens"].dtype == np.int32
  videos, captions = source.arrays("train")
  mean, std = np.array(pp_ops.CLIP_MEAN), np.array(pp_ops.CLIP_STD)
  for video, ids in zip(first["video"], first["caption_tokens"]):
    raw = np.round((video * std + mean) * 255).astype(np.uint8)
    index = next(i for i in range(len(videos)) if np.array_equal(videos[i], raw))
    np.testing.assert_array_equal(ids, tokenizer([captions[index]])[0])
  again = pipeline.make_train_dataset(source, "train", fn, global_batch_size=8, seed=3)
  np.testing.assert_array_equal(next(iter(again))["video"], first["video"])
  assert not np.array_equal(first["video"], second["video"])

  evals = list(pipeline.make_eval_dataset(source, "test", fn, global_batch_size=32)
               .as_numpy_iterator())
  assert len(evals) == 2 and set(evals[0]) == {"video", "caption_tokens", "_mask"}
  mask = np.concatenate([b["_mask"] for b in evals])
  assert mask.sum() == 60 and mask[:60].all()
  tokens = np.concatenate([b["caption_tokens"] for b in evals])
  videos_out = np.concatenate([b["video"] for b in evals])
  np.testing.assert_array_equal(tokens[:60], tokenizer(source.arrays("test")[1]))
  assert not tokens[60:].any() and not videos_out[60:].any()
  spec_shapes = pipeline.batch_spec(source, "test", fn, train=False)
  assert spec_shapes["video"].shape.as_list() == [None, 16, 32, 32, 3]


def test_multi_caption_eval_of_the_embedded_clips(tokenizer):
  """captions_per_video=3: val/test clips carry their 3 phrasings, tokenised to (3, L) rows in
  the eval batches, all 180 test captions distinct; train clips cycle through the phrasings."""
  source = input_pipeline.get_source("embedded/moving_shapes", captions_per_video=3)
  single = embedded_video.MovingShapesSource()
  np.testing.assert_array_equal(source.arrays("test")[0], single.arrays("test")[0])
  _, captions = source.arrays("test")
  assert [c[0] for c in captions] == single.arrays("test")[1]
  assert len({text for phrasings in captions for text in phrasings}) == 180
  train_captions = source.arrays("train")[1]
  assert [embedded_video.TEMPLATES.index(next(
      t for t in embedded_video.TEMPLATES if _matches(t, text))) for text in train_captions[:6]
          ] == [0, 1, 2, 0, 1, 2]
  fn = preprocess.make_preprocess_fn(embedded_video.pp_spec(CONTEXT, max_captions=3))
  batch = next(iter(pipeline.make_eval_dataset(source, "test", fn, global_batch_size=60)))
  assert batch["caption_tokens"].shape == (60, 3, CONTEXT) and batch["_mask"].numpy().all()
  np.testing.assert_array_equal(batch["caption_tokens"][7], tokenizer(list(captions[7])))
  with pytest.raises(ValueError, match=r"captions_per_video=5: expected an int in \[1, 4\]"):
    embedded_video.MovingShapesSource(captions_per_video=5)


def _matches(template: str, text: str) -> bool:
  """Whether `text` is `template` with its fields filled in (one word each)."""
  words, pattern = text.split(), template.split()
  return len(words) == len(pattern) and all(
      p.startswith("{") or p == w for p, w in zip(pattern, words))


class _TinyVideoSource(base.DataSource):
  """5 videos (T=2, 4×6) with 1-3 captions each; '_padded_size' when `padded_size`; a height
  known only per example when `dynamic_height`."""

  name, num_classes, splits = "tiny_videos", 0, ("test",)
  batch_keys = embedded_video.MovingShapesSource.batch_keys

  def __init__(self, padded_size: bool = False, dynamic_height: bool = False):
    self.padded_size, self.dynamic_height = padded_size, dynamic_height

  def decode(self, example):
    if not self.dynamic_height:
      return example
    return {**example, "video": example["video"][:, :tf.reduce_max(example["caption_count"])]}

  def num_examples(self, split):
    return 5

  def raw_dataset(self, split, *, process_index=0, process_count=1):
    start, end = base.host_range(5, process_index, process_count)
    videos = np.arange(5 * 2 * 4 * 6 * 3, dtype=np.uint8).reshape(5, 2, 4, 6, 3)[start:end]
    captions = tf.ragged.constant([["v0"], ["v1", "v1 b"], ["v2"], ["v3", "v3 b", "v3 c"],
                                   ["v4"]])[start:end]
    example = {"video": videos, "caption": captions, "caption_count": captions.row_lengths()}
    if self.padded_size:
      example["_padded_size"] = np.full((end - start, 2), 4, np.int32)
    return tf.data.Dataset.from_tensor_slices(example)


def test_eval_batches_pad_videos_and_caption_rows(tokenizer):
  """Multi-caption eval: (C, L) tokens with zero rows, two hosts with equal batch counts, and
  the last batch filled with zero videos that '_mask' marks."""
  vocab = embedded_clip.byte_vocabulary()
  fn = preprocess.make_preprocess_fn(
      f"value_range(0, 1)|clip_tokenize({vocab!r}, context_length={CONTEXT}, max_captions=3)")
  source = _TinyVideoSource()
  batches = [list(pipeline.make_eval_dataset(source, "test", fn, global_batch_size=4,
                                             process_index=i, process_count=2)
                  .as_numpy_iterator()) for i in range(2)]
  # host 0 holds examples 0-1, host 1 examples 2-4: both yield 2 batches of 2
  assert [len(b) for b in batches] == [2, 2]
  assert batches[0][0]["video"].shape == (2, 2, 4, 6, 3)
  assert batches[0][0]["caption_tokens"].shape == (2, 3, CONTEXT)
  masks = [np.concatenate([b["_mask"] for b in host]).tolist() for host in batches]
  assert masks == [[True, True, False, False], [True, True, True, False]]
  single = list(pipeline.make_eval_dataset(source, "test", fn, global_batch_size=4)
                .as_numpy_iterator())
  np.testing.assert_array_equal(np.concatenate([b["_mask"] for b in single]), [1] * 5 + [0] * 3)
  tokens = np.concatenate([b["caption_tokens"] for b in single])
  np.testing.assert_array_equal(tokens[3], tokenizer(["v3", "v3 b", "v3 c"]))
  np.testing.assert_array_equal(tokens[1, :2], tokenizer(["v1", "v1 b"]))
  assert not tokens[1, 2:].any() and not tokens[5:].any()
  assert not np.concatenate([b["video"] for b in single])[5:].any()
  with pytest.raises(ValueError, match="these examples have no 'image'"):
    pipeline.make_eval_dataset(_TinyVideoSource(padded_size=True), "test", fn,
                               global_batch_size=4)
  with pytest.raises(ValueError, match="fixed video shape"):
    pipeline.make_eval_dataset(_TinyVideoSource(dynamic_height=True), "test", fn,
                               global_batch_size=4)


def test_image_batches_are_unchanged():
  source = input_pipeline.get_source("embedded/shapes")
  fn = preprocess.make_preprocess_fn("value_range(0, 1)")
  batch = next(iter(pipeline.make_eval_dataset(source, "val", fn, global_batch_size=16)))
  assert set(batch) == {"image", "label", "_mask"} and batch["image"].shape == (16, 32, 32, 3)
  with pytest.raises(ValueError, match="needs an 'image' or a 'video'"):
    pipeline._batch_fields({"label": 1}, source.batch_keys)  # pylint: disable=protected-access
