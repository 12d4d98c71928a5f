"""'embedded/detection_shapes': a generated detection dataset with its own BERT vocabulary, so the
GLIP pipeline runs end to end with no download.

128x128 RGB uint8 images on a dark noisy background (2x2-pixel noise blocks) with one to four
objects that do not touch, each one of four classes (`CLASS_NAMES`): a red square, a blue disc
("blue circle"), a green triangle (apex up) or a yellow horizontal bar. The sizes (20..44 px)
and positions vary, and the colours are jittered. Each class has its own colour and shape, so the
signal is strong enough for a tiny GLIP trained a few hundred steps on a CPU. Boxes are tight
around the painted pixels in GLIP's +1 convention ([x1, y1, x2, y2] = first and last pixel
columns and rows), labels 1..4 in `CLASS_NAMES` order, category ids 1..4, image ids 1..n in each
split.

Generated with numpy from fixed seeds (one per split): the same bytes on every machine and run.
Splits: train 512, val 64, test 128 (about 0.3 s for all three on a busy 2-core CPU).

LVIS-style use (`configs/sdpt_lvis.py`'s demo): `extra_class_names` appends names that are never
drawn (labels 5.., e.g. `DISTRACTOR_NAMES`, the other colour x shape pairs), so the class list
can outgrow a short caption and train on per-image captions (`detection.DetectionSource`);
`lvis_fields=True` adds what LVISEval reads to `coco_ground_truth`: each image's
`neg_category_ids` (every category it does not show: the scenes are exhaustively labelled),
empty `not_exhaustive_category_ids`, and each category's `frequency` from `DEMO_FREQUENCY`
(assigned, so that LVIS' rare / common / frequent groups each hold a drawn class; the generated
split is not long-tailed; the distractors are 'r').

The caption is "red square. blue circle. green triangle. yellow bar" (GLIP's ". " separator);
`max_text_len` defaults to 32 (the GLIP-tiny text length). The vocabulary is a WordPiece
vocab.txt the project writes itself (`vocabulary()`: the BERT special tokens, '.', ',', and the
words of the class names and of a few prompt words), in this user's temp folder, written
atomically on first use; `vocab=` takes another one (bert-base-uncased's works too).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow as tf

from input_pipeline import base, detection, grounding

NAME = "embedded/detection_shapes"
IMAGE_SIZE = 128
MAX_OBJECTS = 4
CLASS_NAMES = ("red square", "blue circle", "green triangle", "yellow bar")
COLOURS = ((220, 45, 45), (50, 80, 230), (45, 200, 60), (230, 210, 50))  # CLASS_NAMES order
SIZE_RANGE = (20, 44)  # object side in pixels, inclusive
DISTRACTOR_NAMES = tuple(f"{c} {s}" for c in ("red", "blue", "green", "yellow")
                         for s in ("square", "circle", "triangle", "bar")
                         if f"{c} {s}" not in CLASS_NAMES)  # 12 names never drawn
DEMO_FREQUENCY = ("f", "c", "r", "f")  # LVIS frequency group of each drawn class (assigned)
SPLIT_SIZES = {"train": 512, "val": 64, "test": 128}
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_MAX_TEXT_LEN = 32
VOCAB_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the",
                "there", "are", "is", "some", "of", "on", "in", "and", "object", "shape",
                "red", "square", "blue", "circle", "green", "triangle", "yellow", "bar")
VOCAB_VERSION = 1


def _object_mask(label: int, side: int) -> np.ndarray:
  """bool (h, w) mask of class `label` (1-based) drawn in a `side`-pixel square (a bar is
  side x max(6, side // 3))."""
  shape = CLASS_NAMES[label - 1].split()[1]
  if shape == "bar":
    return np.ones((max(6, side // 3), side), bool)
  yy, xx = np.mgrid[0:side, 0:side] + 0.5
  if shape == "circle":
    return (xx - side / 2) ** 2 + (yy - side / 2) ** 2 <= (side / 2) ** 2
  if shape == "triangle":  # apex at the top middle, the bottom row full
    return np.abs(xx - side / 2) <= np.floor(yy + 0.5) / 2
  return np.ones((side, side), bool)


def make_detection_shapes(num_examples: int, seed: int):
  """(images uint8 (n, 128, 128, 3), boxes float32 (n, 4, 4) xyxy zero-padded, labels int32
  (n, 4) zero-padded, num_boxes int32 (n,)); objects are placed by rejection so that their boxes
  keep a 2-pixel gap."""
  rng = np.random.default_rng([20_250_610, seed])
  half = IMAGE_SIZE // 2  # background noise in 2x2 blocks (4x fewer draws)
  noise = rng.integers(0, 70, size=(num_examples, half, half, 3), dtype=np.uint8)
  images = np.repeat(np.repeat(noise, 2, axis=1), 2, axis=2)
  boxes = np.zeros((num_examples, MAX_OBJECTS, 4), np.float32)
  labels = np.zeros((num_examples, MAX_OBJECTS), np.int32)
  num_boxes = np.zeros(num_examples, np.int32)
  wanted = rng.integers(1, MAX_OBJECTS + 1, size=num_examples)
  for i in range(num_examples):
    placed = []
    for _ in range(wanted[i]):
      label = int(rng.integers(1, len(CLASS_NAMES) + 1))
      mask = _object_mask(label, int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1)))
      colour = np.clip(np.array(COLOURS[label - 1]) + rng.integers(-25, 26, size=3), 0, 255)
      h, w = mask.shape
      for _ in range(20):  # tries to find a free spot
        y0 = int(rng.integers(0, IMAGE_SIZE - h + 1))
        x0 = int(rng.integers(0, IMAGE_SIZE - w + 1))
        if all(x0 > b[2] + 2 or x0 + w - 1 < b[0] - 2 or y0 > b[3] + 2 or y0 + h - 1 < b[1] - 2
               for b in placed):
          break
      else:
        continue  # no room: this image gets one object fewer
      images[i, y0:y0 + h, x0:x0 + w][mask] = colour.astype(np.uint8)
      rows, cols = np.nonzero(mask)
      box = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max(), y0 + rows.max())
      boxes[i, len(placed)], labels[i, len(placed)] = box, label
      placed.append(box)
    num_boxes[i] = len(placed)
  return images, boxes, labels, num_boxes


def write_vocabulary(path: str) -> str:
  """Writes the demo's WordPiece vocab.txt (`VOCAB_TOKENS`, one per line) to `path` atomically
  and returns it."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write("\n".join(VOCAB_TOKENS) + "\n")
  os.replace(partial, path)  # atomic: concurrent writers leave one complete file
  return path


def vocabulary() -> str:
  """Path of the demo vocabulary in this user's temp folder, (re)written when absent or
  different."""
  path = os.path.join(tempfile.gettempdir(), f"jaxprompt-{os.getuid()}",
                      f"detection_shapes_vocab_v{VOCAB_VERSION}.txt")
  try:
    with open(path, encoding="utf-8") as f:
      if f.read().split("\n")[:-1] == list(VOCAB_TOKENS):
        return path
  except OSError:
    pass
  return write_vocabulary(path)


class DetectionShapesSource(detection.DetectionSource):
  """The generated detection shapes served from memory (see the module docstring)."""

  def __init__(self, name: str = NAME, *, vocab: str | None = None,
               max_text_len: int = DEFAULT_MAX_TEXT_LEN, separator: str = ". ",
               caption_prompts=None, extra_class_names=(), lvis_fields: bool = False,
               per_image_captions: bool | None = None,
               max_negatives: int = grounding.DEFAULT_MAX_NEGATIVES, caption_seed: int = 0):
    extra = tuple(extra_class_names)
    if not all(isinstance(n, str) and n for n in extra) or set(extra) & set(CLASS_NAMES):
      raise ValueError(f"{name}: extra_class_names={extra_class_names!r}; expected non-empty "
                       f"names other than the drawn classes {CLASS_NAMES}.")
    self.lvis_fields = bool(lvis_fields)
    super().__init__(name, CLASS_NAMES + extra, tuple(SPLIT_SIZES),
                     vocab=vocabulary() if vocab is None else vocab, max_text_len=max_text_len,
                     separator=separator, caption_prompts=caption_prompts,
                     per_image_captions=per_image_captions, max_negatives=max_negatives,
                     caption_seed=caption_seed, caption_sampling_splits=("train",))
    self._arrays = {split: make_detection_shapes(n, _SPLIT_SEEDS[split])
                    for split, n in SPLIT_SIZES.items()}

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return SPLIT_SIZES[split]

  def arrays(self, split: str):
    """The whole split as numpy (images, boxes (n, 4, 4), labels (n, 4), num_boxes (n,)); the
    rows past num_boxes are zero padding. Image i has id i + 1."""
    self.check_split(split)
    return self._arrays[split]

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    images, boxes, labels, num_boxes = self.arrays(split)
    start, end = base.host_range(len(images), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices(self.mark_caption_sampling({
        "image": images[start:end], "boxes": boxes[start:end], "box_labels": labels[start:end],
        "num_boxes": num_boxes[start:end],
        "image_id": np.arange(start + 1, end + 1, dtype=np.int32)}, split, end - start))

  def decode_detection(self, example: dict) -> dict:
    example = dict(example)
    count = example.pop("num_boxes")
    example["boxes"] = example["boxes"][:count]
    example["box_labels"] = example["box_labels"][:count]
    example["orig_size"] = tf.constant([IMAGE_SIZE, IMAGE_SIZE], tf.int32)
    return example

  def coco_ground_truth(self, split: str) -> dict:
    images, boxes, labels, num_boxes = self.arrays(split)
    truth = detection.coco_ground_truth_dict(
        np.arange(1, len(images) + 1), [(IMAGE_SIZE, IMAGE_SIZE)] * len(images),
        [b[:k] for b, k in zip(boxes, num_boxes)], [x[:k] for x, k in zip(labels, num_boxes)],
        self.category_ids, self.class_names)
    if self.lvis_fields:  # what LVISEval reads (module docstring)
      for image, image_labels, k in zip(truth["images"], labels, num_boxes):
        shown = {self.category_ids[l - 1] for l in image_labels[:k].tolist()}
        image["neg_category_ids"] = [c for c in self.category_ids if c not in shown]
        image["not_exhaustive_category_ids"] = []
      for index, category in enumerate(truth["categories"]):
        category["frequency"] = DEMO_FREQUENCY[index] if index < len(CLASS_NAMES) else "r"
    return truth
