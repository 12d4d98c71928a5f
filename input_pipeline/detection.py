"""`DetectionSource`: the contract every GLIP detection dataset (COCO, ODinW, the embedded shapes)
implements, on top of `base.DataSource`.

A detection source knows its classes in contiguous label order (`class_names`, labels 1..C), the
dataset's category id of each label (`category_ids`), and the grounding caption of its classes
(`grounding`, `grounding.make_grounding` from the `vocab`, `max_text_len`, `separator` and
`caption_prompts` arguments). Each decoded example is

  'image'        uint8 (H, W, 3) RGB, the image as stored (pp ops resize and normalise it);
  'boxes'        float32 (n, 4) xyxy in that image's pixel frame, GLIP's +1 convention: a COCO
                 box [x, y, w, h] is [x, y, x + w - 1, y + h - 1] (`xywh_to_xyxy`);
  'box_labels'   int32 (n,) contiguous labels in 1..C;
  'positive_map' float32 (n, T) binary: row i = class_token_map[box_labels[i] - 1];
  'text_ids'     int32 (T,), 'text_mask' int32 (T,): the tokenised caption (the same for every
                 example of the source; chunked evaluation swaps them per chunk);
  'orig_size'    int32 (2,) the image's (height, width) as stored;
  'image_id'     int32 the dataset's image id (COCO's `images[].id`).

After the box-aware pp ops (`pp_ops_boxes.py`: resize_glip|flip_lr_boxes|to_bgr255_normalize|
pad_image|pad_boxes) and so in batches: 'image' float32 (S_h, S_w, 3) on a fixed canvas (in
evaluation with pad_image(..., size_divisible=32): the multiple of 32 of the image's own size,
bucketed by `pipeline.make_eval_dataset`), 'boxes' (M, 4), 'box_labels' (M,), 'box_mask' bool
(M,), 'positive_map' (M, T) with zero padding rows, 'image_size' int32 (2,) the resized (h, w)
before padding; 'orig_size', 'image_id', 'text_ids', 'text_mask' unchanged. `batch_keys` declares
these.

Per-image captions (GLIP's LVIS training path, `grounding.CaptionSampler`): with
`per_image_captions` (default None: on exactly when the class list's caption overflows
`max_text_len` and there are no `caption_prompts`), the examples of the splits in
`caption_sampling_splits` (training splits) carry their own 'text_ids'/'text_mask' (the image's
classes plus sampled negative names, drawn per (`caption_seed`, image id), `max_negatives` of
them at most) and 'positive_map' rows of that caption; boxes whose class was cut because the
image's own classes overflow are dropped, as in GLIP. Subclasses mark those splits' raw examples
with `mark_caption_sampling`.

Subclasses set the attributes through `DetectionSource.__init__`, implement `num_examples`,
`raw_dataset`, `decode_detection` (raw example -> the keys above without the text ones; the
default passes the example through, for sources whose raw examples are already decoded) and
`coco_ground_truth(split)`, the COCO-format ground truth the detection evaluator scores against
(see its docstring). `decode` adds the grounding keys and checks boxes and labels.

Follows microsoft/GLIP `maskrcnn_benchmark/data/datasets/modulated_coco.py` (`CocoGrounding`:
crowd boxes dropped, xywh -> xyxy with the +1 convention, `clip_to_image(remove_empty=True)`;
`create_positive_map`) and `structures/bounding_box.py` (`BoxList`). Deviation: GLIP normalises
each positive-map row to sum 1 and its loss then binarises it (`> 0`); the rows here are binary.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import base, grounding as grounding_lib

DETECTION_BATCH_KEYS = {
    "boxes": tf.float32,
    "box_labels": tf.int32,
    "box_mask": tf.bool,
    "positive_map": tf.float32,
    "text_ids": tf.int32,
    "text_mask": tf.int32,
    "image_size": tf.int32,
    "orig_size": tf.int32,
    "image_id": tf.int32,
}


# Raw-example key of the splits whose captions are sampled per image (`mark_caption_sampling`).
SAMPLE_CAPTION_KEY = "_sample_caption"


def xywh_to_xyxy(boxes_xywh) -> np.ndarray:
  """COCO [x, y, w, h] -> [x1, y1, x2, y2] with GLIP's +1 convention (x2 = x + max(w - 1, 0),
  as `BoxList.convert('xyxy')`); float32 (n, 4)."""
  boxes = np.asarray(boxes_xywh, np.float32).reshape(-1, 4)
  x, y, w, h = boxes.T
  return np.stack([x, y, x + np.maximum(w - 1, 0), y + np.maximum(h - 1, 0)], 1)


def xyxy_to_xywh(boxes_xyxy) -> np.ndarray:
  """[x1, y1, x2, y2] (+1 convention) -> COCO [x, y, x2 - x1 + 1, y2 - y1 + 1]; float32 (n, 4)."""
  boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + 1], 1)


def clip_and_drop_empty(boxes_xyxy, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """GLIP's `BoxList.clip_to_image(remove_empty=True)`: clamp x to [0, width - 1] and y to
  [0, height - 1], then keep boxes with x2 > x1 and y2 > y1. Returns (clipped boxes, keep mask);
  COCO-style sources apply it (with the same mask on the labels) before `check_boxes`."""
  boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4).copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width - 1)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height - 1)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes, keep


def check_boxes(boxes, labels, num_classes: int, where: str) -> None:
  """Raises a ValueError naming `where` (the image id / file) when `boxes` is not float (n, 4)
  xyxy with x2 > x1 and y2 > y1 (GLIP drops such empty boxes, see `clip_and_drop_empty`) or a
  label is outside 1..num_classes."""
  boxes, labels = np.asarray(boxes), np.asarray(labels)
  if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
    raise ValueError(f"{where}: expected boxes (n, 4) and box_labels (n,); got shapes "
                     f"{boxes.shape} and {labels.shape}.")
  empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
  if empty.any():
    raise ValueError(f"{where}: boxes {boxes[empty].tolist()} have zero or negative size (x2 <= "
                     "x1 or y2 <= y1 in xyxy with the +1 convention); drop them as GLIP does "
                     "(detection.clip_and_drop_empty).")
  bad = (labels < 1) | (labels > num_classes)
  if bad.any():
    raise ValueError(f"{where}: box labels {sorted(set(labels[bad].tolist()))} are outside the "
                     f"contiguous labels 1..{num_classes}.")


def coco_ground_truth_dict(image_ids, sizes_hw, boxes_xyxy, labels, category_ids: Sequence[int],
                           class_names: Sequence[str]) -> dict:
  """A COCO detection json dict from per-image arrays: images [{id, height, width}],
  annotations [{id (1-based), image_id, category_id, bbox [x, y, w, h] (w = x2 - x1 + 1), area
  w·h, iscrowd 0}], categories [{id, name}]. Boxes are in the original pixel frame."""
  images, annotations = [], []
  for image_id, (height, width), boxes, box_labels in zip(image_ids, sizes_hw, boxes_xyxy,
                                                         labels):
    images.append({"id": int(image_id), "height": int(height), "width": int(width)})
    for box, label in zip(xyxy_to_xywh(boxes).tolist(), np.asarray(box_labels).tolist()):
      annotations.append({"id": len(annotations) + 1, "image_id": int(image_id),
                          "category_id": int(category_ids[label - 1]), "bbox": box,
                          "area": box[2] * box[3], "iscrowd": 0})
  categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, class_names)]
  return {"images": images, "annotations": annotations, "categories": categories}


def assert_all(condition, message: str, *data):
  """An in-graph check: fails with `message` and the values `data` unless `condition` holds
  everywhere (`tf.debugging.Assert`, which, unlike TF2's assert_* ops, takes data)."""
  return tf.debugging.Assert(tf.reduce_all(condition), [message, *data], summarize=64)


class DetectionSource(base.DataSource):
  """Base class of detection sources (see the module docstring for the example contract)."""

  batch_keys = DETECTION_BATCH_KEYS

  def __init__(self, name: str, class_names: Sequence[str], splits: Sequence[str], *, vocab: str,
               max_text_len: int = grounding_lib.DEFAULT_MAX_LENGTH,
               separator: str = grounding_lib.DEFAULT_SEPARATOR,
               caption_prompts: Sequence[dict] | None = None,
               category_ids: Sequence[int] | None = None,
               per_image_captions: bool | None = None,
               max_negatives: int = grounding_lib.DEFAULT_MAX_NEGATIVES, caption_seed: int = 0,
               caption_sampling_splits: Sequence[str] = ("train",)):
    self.name, self.splits = name, tuple(splits)
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.category_ids = (tuple(range(1, self.num_classes + 1)) if category_ids is None
                         else tuple(int(c) for c in category_ids))
    if len(self.category_ids) != self.num_classes or len(set(self.category_ids)) != len(
        self.category_ids):
      raise ValueError(f"{name}: category_ids={category_ids!r} must give one distinct dataset "
                       f"category id per class ({self.num_classes} classes).")
    self.vocab, self.max_text_len = vocab, max_text_len
    self.separator = separator
    self.caption_prompts = None if caption_prompts is None else list(caption_prompts)
    # A class list whose caption overflows max_text_len (LVIS: 1203 names) has no one caption:
    # it is evaluated in chunks (the detection evaluator's chunk_size, GLIP's
    # TEST.CHUNKED_EVALUATION) and trains on per-image captions (below); `caption_overflow` says
    # why, for a method to refuse training without them. Its examples outside the sampled
    # splits carry the first chunk's caption; the evaluator swaps in each chunk's.
    self.caption_overflow = None
    try:
      self.grounding = grounding_lib.make_grounding(self.class_names, vocab, max_text_len,
                                                    separator, self.caption_prompts)
    except grounding_lib.CaptionTooLongError as e:
      self.caption_overflow = str(e)
      self.grounding = self._first_chunk()
    # Per-image captions (module docstring; grounding.CaptionSampler).
    if per_image_captions not in (None, True, False):
      raise ValueError(f"{name}: per_image_captions={per_image_captions!r}; expected None (on when "
                       "the caption overflows), True or False.")
    if not isinstance(caption_seed, int) or isinstance(caption_seed, bool):
      raise ValueError(f"{name}: caption_seed={caption_seed!r}; expected an int.")
    self.caption_seed = caption_seed
    self.caption_sampling_splits = tuple(caption_sampling_splits)
    self.caption_sampler = None
    if per_image_captions is None:  # automatic: GLIP's per-image path has no caption prompts
      per_image_captions = bool(self.caption_overflow) and self.caption_prompts is None
    if per_image_captions:
      if self.caption_prompts is not None:  # GLIP asserts the same (not use_caption_prompt)
        raise ValueError(f"{name}: per-image captions cannot use caption_prompts (GLIP's "
                         "per-image path has none); drop them or set per_image_captions=False.")
      self.caption_sampler = grounding_lib.CaptionSampler(
          self.class_names, vocab, max_text_len, separator, max_negatives=max_negatives)

  def _first_chunk(self) -> grounding_lib.Grounding:
    """The grounding of the longest leading run of classes whose caption fits."""
    low, high = 1, self.num_classes - 1  # the whole list does not fit
    while low < high:
      mid = (low + high + 1) // 2
      try:
        grounding_lib.make_grounding(self.class_names[:mid], self.vocab, self.max_text_len,
                                     self.separator, None if self.caption_prompts is None
                                     else self.caption_prompts[:mid], num_classes=self.num_classes)
        low = mid
      except grounding_lib.CaptionTooLongError:
        high = mid - 1
    return self.grounding_chunks(low)[0][1]

  def label_of_category(self) -> dict[int, int]:
    """Dataset category id -> contiguous label."""
    return {c: label for label, c in enumerate(self.category_ids, start=1)}

  def grounding_chunks(self, chunk_size: int) -> list[tuple[np.ndarray, grounding_lib.Grounding]]:
    """GLIP's chunked-evaluation prompts of this source's classes (`grounding.chunk_groundings`):
    [(labels in the chunk, Grounding with a (C, T) class_token_map)]."""
    return grounding_lib.chunk_groundings(self.class_names, chunk_size, self.vocab,
                                          self.max_text_len, self.separator, self.caption_prompts)

  def decode_detection(self, example: dict) -> dict:
    """Raw example -> {'image', 'boxes', 'box_labels', 'orig_size', 'image_id'} (module
    docstring); the default is for sources whose raw examples are already decoded."""
    return example

  def with_grounding(self, example: dict) -> dict:
    """Adds 'text_ids', 'text_mask' and 'positive_map' (rows of the class -> token map picked by
    'box_labels'); checks in the graph that boxes are non-empty and labels in 1..C, naming the
    image id (and 'file_name' when the example has one)."""
    example = dict(example)
    boxes = tf.cast(example["boxes"], tf.float32)
    labels = tf.cast(example["box_labels"], tf.int32)
    where = [tf.strings.as_string(tf.cast(example["image_id"], tf.int64))]
    if "file_name" in example:
      where.append(example["file_name"])
    checks = [
        assert_all(boxes[:, 2:] > boxes[:, :2],
                   f"{self.name}: a box has zero or negative size (x2 <= x1 or y2 <= y1) in "
                   "image id / file", *where, "boxes:", boxes),
        assert_all((labels >= 1) & (labels <= self.num_classes),
                   f"{self.name}: a box label is outside 1..{self.num_classes} in image id / file",
                   *where, "labels:", labels),
    ]
    with tf.control_dependencies(checks):
      labels = tf.identity(labels)
    if self.caption_sampler is not None and SAMPLE_CAPTION_KEY in example:
      return self._with_sampled_caption(example, boxes, labels)
    class_token_map = tf.constant(self.grounding.class_token_map)
    example.update(
        boxes=boxes, box_labels=labels,
        positive_map=tf.gather(class_token_map, labels - 1),
        text_ids=tf.constant(self.grounding.text_ids),
        text_mask=tf.constant(self.grounding.text_mask),
        orig_size=tf.cast(example["orig_size"], tf.int32),
        image_id=tf.cast(example["image_id"], tf.int32))
    return example

  def samples_captions(self, split: str) -> bool:
    """Whether `split`'s examples carry per-image captions."""
    return self.caption_sampler is not None and split in self.caption_sampling_splits

  def mark_caption_sampling(self, raw: dict, split: str, count: int) -> dict:
    """`raw` (the columns of `split`'s raw dataset, `count` rows) with the marker that makes
    `decode` sample the captions, when `samples_captions(split)`."""
    if not self.samples_captions(split):
      return raw
    return {**raw, SAMPLE_CAPTION_KEY: np.ones([count], bool)}

  def _with_sampled_caption(self, example: dict, boxes, labels) -> dict:
    sampler, length = self.caption_sampler, self.max_text_len

    def sample(box_labels, image_id):
      caption = sampler.sample(box_labels, grounding_lib.caption_rng(self.caption_seed,
                                                                     int(image_id)))
      return caption.text_ids, caption.text_mask, caption.positive_map, caption.keep_box

    text_ids, text_mask, positive_map, keep = tf.numpy_function(
        sample, [labels, example["image_id"]], [tf.int32, tf.int32, tf.float32, tf.bool],
        stateful=False)
    text_ids.set_shape([length])
    text_mask.set_shape([length])
    keep.set_shape([None])
    positive_map = tf.ensure_shape(positive_map, [None, length])
    example = {k: v for k, v in example.items() if k != SAMPLE_CAPTION_KEY}
    example.update(
        boxes=tf.boolean_mask(boxes, keep), box_labels=tf.boolean_mask(labels, keep),
        positive_map=tf.boolean_mask(positive_map, keep), text_ids=text_ids, text_mask=text_mask,
        orig_size=tf.cast(example["orig_size"], tf.int32),
        image_id=tf.cast(example["image_id"], tf.int32))
    return example

  def decode(self, example: dict) -> dict:
    return self.with_grounding(self.decode_detection(example))

  def coco_ground_truth(self, split: str) -> dict:
    """The split's ground truth as a COCO detection json dict, what the evaluator loads into
    pycocotools: 'images' [{id, height, width, ...}] (ids = the examples' 'image_id', sizes =
    their 'orig_size'), 'annotations' [{id, image_id, category_id, bbox [x, y, w, h] in original
    pixels with w = x2 - x1 + 1, area, iscrowd}], 'categories' [{id, name}] with the ids of
    `category_ids`. Detections are mapped back with `category_ids[label - 1]`."""
    raise NotImplementedError

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"splits={self.splits}, caption={self.grounding.caption[:60]!r}, "
            f"max_text_len={self.max_text_len})")
