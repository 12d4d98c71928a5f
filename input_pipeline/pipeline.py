"""Batched training and evaluation streams over any `DataSource`, per host.

Training (`make_train_dataset`): an endless stream of epochs over the whole split, the same for
every host count. Epoch e is the split in one global order, shuffled with a seed derived from
(seed, e) alone; the run's global batch k is examples [k·B, (k+1)·B) of that stream, and host
p of P keeps rows [p·B/P, (p+1)·B/P) of each, the rows its devices hold in the global batch
(`sharding.global_batch`). Every host walks the (undecoded) global stream and drops the positions
of other hosts *before* decoding, so it decodes only its own examples. An example's augmentation
seed is folded from (seed, its position in the run's stream), so the global batch at step k is
the same examples, in the same order, with the same random crops and flips, on any number of
hosts and devices. The stream is a pure function of the seed: the same seed gives the same
batches, and resuming at `start_step` starts at epoch ⌊start_step·B/n⌋ and skips the rest before
decoding, so the batches from there on are the ones an uninterrupted run would have seen, also
when the run resumes on another host count. Batches may straddle epochs (big_vision style), so
no example is dropped for good; every batch is full. The shuffle keys are those a single process
always used ((seed, 0) for the order, (seed, 1) for augmentation), so one-process runs keep their
batches. Each host holds the whole split's undecoded examples in its shuffle buffer (encoded
bytes, paths or small arrays), where a per-host block would hold 1/P of them: the price of an
order that does not depend on P.

Evaluation (`make_eval_dataset`): one pass, every example of the split exactly once over all
hosts; the last batch is padded with '_mask' = False examples, and every host yields the same
number of batches (hosts with fewer examples add whole masked batches). Evaluation examples have
no '_seed', so random pp ops refuse to run on them, unless the caller opts in with
`augment_seed` (test-time augmentation, e.g. TPT's `tta_views`): then example i of the split
draws from a seed folded from (augment_seed, i), the same whatever the batch size or host split.

Shape-bucketed evaluation: examples that carry '_padded_size' (int32 (h, w), set by a pp op such
as `pad_image(H, W, size_divisible=32)`, which pads the image to its fixed (H, W) canvas) are
evaluated at that size: each image is cut back to its top-left '_padded_size' and batched only
with images of the same size (`tf.data` `group_by_window`, keyed on the size); every group's last
batch is filled up with '_mask' = False zeros. Batches then differ in image shape (a jitted
predict function compiles once per shape); examples come out grouped, not in the split's order.
The stream holds at most (number of sizes) x (batch - 1) waiting examples. Only a single process
can bucket: processes run the same shape in the same step and their batch counts must agree,
which per-process grouping cannot guarantee, so with `process_count` > 1 it is an error (pad to a
fixed canvas there: the pp op without size_divisible). Training streams ignore '_padded_size'.

A batch carries whichever of 'image' (H, W, 3) and 'video' (T, H, W, 3: frames in time order)
the examples have, and whichever of the source's declared `batch_keys` they have: 'label'
(single-label sources), 'labels' (multi-hot, multi-label sources), 'caption_tokens' ((L,) per
caption, or (C, L) with all-zero padding rows for a video's C captions), ...; other example keys
(file names, caption strings) stay out of the batch. Evaluation needs a fixed image / video shape
after preprocessing and pads videos like images (zero frames, '_mask' False); bucketing by
'_padded_size' is for images only.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from input_pipeline import base

PADDED_SIZE_KEY = "_padded_size"  # an eval example's (h, w) to cut its image to and bucket on
# (H, W, 3), (T, H, W, 3) and (V, H, W, 3) test-time views (pp op tta_views); a batch carries
# those it has
VISUAL_KEYS = ("image", "video", "views")


def _batch_fields(example: dict, batch_keys: dict) -> dict:
  """The example's 'image' / 'video' / 'views' and the declared `batch_keys` it has, cast to their
  batch dtypes."""
  fields = {k: example[k] for k in VISUAL_KEYS if k in example}
  if not fields:
    raise ValueError(f"An example needs an 'image' or a 'video' (or the 'views' of tta_views) to "
                     f"be batched; after preprocessing its keys are {sorted(example)}.")
  fields.update({k: tf.cast(example[k], dtype) for k, dtype in batch_keys.items() if k in example})
  return fields


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  return global_batch_size // process_count


def _host_counts(source, split: str, process_count: int) -> list[int]:
  total = source.num_examples(split)
  return [end - start for start, end in
          (base.host_range(total, i, process_count) for i in range(process_count))]


def make_train_dataset(source: base.DataSource, split: str, preprocess_fn: Callable[[dict], dict],
                       *, global_batch_size: int, seed: int, start_step: int = 0,
                       process_index: int = 0, process_count: int = 1,
                       cache: bool = True) -> tf.data.Dataset:
  """Endless batches {'image': (b, H, W, 3) f32 or 'video': (b, T, H, W, 3) f32, 'label': (b,)
  int32 / 'caption_tokens': (b, L) int32, ...}, b = global / processes."""
  batch = local_batch_size(global_batch_size, process_count)
  base.host_range(0, process_index, process_count)  # checks the index
  num_examples = source.num_examples(split)
  if num_examples == 0:
    raise ValueError(f"{source.name} split {split!r} has no examples to train on.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  raw = source.raw_dataset(split)  # the whole split: every host walks the global order
  if cache:
    raw = raw.cache()  # raw = not yet decoded: encoded bytes / paths / small arrays
  shuffle_key = tf.constant([seed, 0], tf.int64)
  augment_key = tf.constant([seed, 1], tf.int64)

  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(shuffle_key, e)[0]
    return raw.shuffle(num_examples, seed=tf.cast(epoch_seed, tf.int64))

  first_epoch, offset = divmod(start_step * global_batch_size, num_examples)
  stream = tf.data.Dataset.counter(first_epoch).flat_map(epoch)
  positions = tf.data.Dataset.counter(first_epoch * num_examples)  # index of the example in the run
  stream = tf.data.Dataset.zip((stream, positions)).skip(offset)
  # The example is row position % B of its global batch; this host's rows are [p·b, (p+1)·b).
  stream = stream.filter(
      lambda example, position: (position % global_batch_size) // batch == process_index)

  def prepare(example, position):
    example = dict(source.decode(example))
    example["_seed"] = tf.random.experimental.stateless_fold_in(augment_key, position)
    return _batch_fields(preprocess_fn(example), source.batch_keys)

  stream = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(source: base.DataSource, split: str, preprocess_fn: Callable[[dict], dict],
                      *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                      augment_seed: int | None = None) -> tf.data.Dataset:
  """One pass of batches {'image' / 'video' / 'views', 'label' / 'caption_tokens' / ...,
  '_mask': (b,) bool}, padded as described above (and bucketed by image size when the examples
  carry '_padded_size').

  augment_seed: None (the default) gives examples no '_seed', so a random pp op is an error.
  An int opts in to random evaluation ops (test-time augmentation: `tta_views`): example i of
  the split gets '_seed' = stateless_fold_in((augment_seed, 0), i), so its draws depend only on
  augment_seed and i, not on the batch size or the host split."""
  if augment_seed is not None and (not isinstance(augment_seed, int)
                                   or isinstance(augment_seed, bool)):
    raise ValueError(f"augment_seed={augment_seed!r}: expected None or an int.")
  batch = local_batch_size(global_batch_size, process_count)
  counts = _host_counts(source, split, process_count)
  num_batches = -(-max(counts) // batch)
  first_index = sum(counts[:process_index])  # this host's block starts there in the split

  def prepare(index, example):
    if augment_seed is not None:
      example = {**example, "_seed": tf.random.experimental.stateless_fold_in(
          tf.constant([augment_seed, 0], tf.int64), index)}
    example = preprocess_fn(example)
    fields = {**_batch_fields(example, source.batch_keys), "_mask": tf.constant(True)}
    if PADDED_SIZE_KEY in example:
      fields[PADDED_SIZE_KEY] = tf.cast(example[PADDED_SIZE_KEY], tf.int32)
    return fields

  ds = source.dataset(split, process_index=process_index, process_count=process_count)
  ds = ds.enumerate(first_index).map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=True)
  for key in VISUAL_KEYS:
    if key in ds.element_spec and not ds.element_spec[key].shape.is_fully_defined():
      raise ValueError(f"Evaluation batches need a fixed {key} shape after preprocessing; got "
                       f"{ds.element_spec[key].shape} for {source.name} split {split!r}.")
  if PADDED_SIZE_KEY in ds.element_spec:
    _check_bucketable(source, split, ds.element_spec, process_count)
    return _bucketed_by_size(ds, batch).prefetch(tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(  # zeros everywhere, '_mask' False
      {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()})
  ds = ds.concatenate(padding.repeat(num_batches * batch - counts[process_index]))
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def check_eval_buckets(source: base.DataSource, split: str, preprocess_fn: Callable[[dict], dict],
                       *, process_count: int) -> bool:
  """Whether `split`'s eval stream through `preprocess_fn` is bucketed by image size (its examples
  carry '_padded_size'), from the dataset graph alone (no data is read); a ValueError when it is
  and `process_count` > 1 or the examples are videos, so that a run can refuse it before training
  rather than at its first evaluation."""
  spec = source.raw_dataset(split).map(lambda e: preprocess_fn(dict(source.decode(e))))
  bucketed = PADDED_SIZE_KEY in spec.element_spec
  if bucketed:
    _check_bucketable(source, split, spec.element_spec, process_count)
  return bucketed


def _check_bucketable(source, split: str, element_spec: dict, process_count: int) -> None:
  if "image" not in element_spec:
    raise ValueError(
        f"{source.name} split {split!r}: the eval preprocessing sets {PADDED_SIZE_KEY!r} (e.g. "
        f"pad_image(..., size_divisible=32)), which buckets images by padded size; these "
        f"examples have no 'image' (keys: {sorted(element_spec)}). Videos are evaluated at one "
        f"fixed (T, H, W, 3) shape: crop or resize them to it in config.pp.eval.")
  if process_count > 1:
    raise ValueError(
        f"{source.name} split {split!r}: the eval preprocessing sets {PADDED_SIZE_KEY!r} (e.g. "
        f"pad_image(..., size_divisible=32)), which batches images by padded size; that needs a "
        f"single process, and this run has process_count={process_count} (processes must run "
        f"the same image shape in every step). Evaluate on the fixed canvas instead: "
        f"pad_image(H, W) without size_divisible in config.pp.eval.")


def _bucketed_by_size(ds: tf.data.Dataset, batch: int) -> tf.data.Dataset:
  """Examples with images cut to their '_padded_size', in batches of `batch` whose images share
  that size; each size's last batch is filled up with zeros ('_mask' False)."""
  canvas = ds.element_spec["image"].shape.as_list()

  def cut(example):
    example = dict(example)
    size = example.pop(PADDED_SIZE_KEY)
    check = tf.debugging.Assert(
        tf.reduce_all((size > 0) & (size <= tf.constant(canvas[:2]))),
        [f"{PADDED_SIZE_KEY} (h, w) must be positive and at most the canvas {tuple(canvas[:2])}; "
         "got", size])
    with tf.control_dependencies([check]):
      example["image"] = example["image"][:size[0], :size[1]]
    return example

  def size_key(example):  # (h, w) -> one int64
    shape = tf.shape(example["image"], out_type=tf.int64)
    return shape[0] * (canvas[1] + 1) + shape[1]

  def fill(rows):
    missing = batch - tf.shape(rows["_mask"])[0]
    return {k: tf.ensure_shape(
        tf.pad(v, [[0, missing]] + [[0, 0]] * (v.shape.rank - 1)), [batch, *v.shape[1:]])
            for k, v in rows.items()}

  ds = ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.group_by_window(size_key, lambda key, window: window.batch(batch), window_size=batch)
  return ds.map(fill, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def batch_spec(source: base.DataSource, split: str, preprocess_fn: Callable[[dict], dict], *,
               train: bool) -> dict:
  """The element spec of `split`'s batches (leading dimension None) through `preprocess_fn`, the
  train (with an example seed) or eval path (seeded when the spec holds a test-time op such as
  `tta_views`: `pp_registry`), from the dataset graph alone (no data is read). The trainer
  initialises the model from it, so a model may take images, videos, boxes or tokens."""
  seeded = train or getattr(preprocess_fn, "test_time_augmentation", False)

  def prepare(example):
    example = dict(source.decode(example))
    if seeded:
      example["_seed"] = tf.zeros([2], tf.int64)
    return _batch_fields(preprocess_fn(example), source.batch_keys)

  return source.raw_dataset(split).map(prepare).batch(1).element_spec
