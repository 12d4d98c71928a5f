"""'embedded/multilabel_lt': generated long-tailed multi-label images with class names and captions.

The out-of-the-box data of the LMPT configs (`configs/lmpt_voc_lt.py`, `configs/lmpt_coco_lt.py`):
what COCO-LT / VOC-LT give LMPT (`multilabel_lt.py`), made here with numpy from fixed seeds, so
that the method runs with no download.

  * 10 classes, "{colour} square" (`CLASS_NAMES`); 32×32 RGB uint8 images on a dark noisy
    background (values 0..49), split into 2×2 cells of 16 px; each label of an image is a filled
    square of its colour (side 9..14 px, colour jitter ±20) in its own cell, so an image has 1 to
    3 labels.
  * Long-tailed train split (600 images): class c has exactly `TRAIN_COUNTS[c]` positive images,
    300 down to 6, so the head / medium / tail groups of `multilabel_lt.class_groups` (>= 100,
    [20, 100), < 20 training images) are 3 / 4 / 3 classes. Every train image has a label.
  * Balanced test split (500 images): 100 positives per class, 2 labels per image on average (the
    LT benchmarks test on the full VOC2007 test / COCO val2017 sets).
  * Captions (train only, as the seed's): a sentence naming the image's squares in a random order,
    e.g. "a photo of a blue square and a red square.", cut to `caption_chars` = 75 characters as
    the seed cuts its captions; `caption_tokenizer` tokenises them once (as `multilabel_lt`).

The source has the attributes of `multilabel_lt.MultilabelLtSource` that LMPT uses: `class_names`,
`class_freq`, `num_train_images`, `class_groups`, `captions`, `labels(split)`. Examples:
{'image': uint8 (32, 32, 3), 'labels': float32 multi-hot (10,)} plus, in train, 'caption' and,
with a tokenizer, 'caption_tokens' int32 (L,). Generating both splits takes well under a second.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from input_pipeline import base, multilabel_lt

NAME = "embedded/multilabel_lt"
IMAGE_SIZE, CELL = 32, 16
COLOURS = {  # name: RGB, all far apart so that a frozen random CLIP still separates them
    "red": (225, 35, 35), "green": (40, 200, 40), "blue": (45, 70, 235), "yellow": (235, 215, 40),
    "magenta": (210, 40, 215), "cyan": (40, 215, 215), "orange": (245, 140, 20),
    "white": (240, 240, 240), "purple": (120, 40, 160), "brown": (130, 80, 30)}
CLASS_NAMES = tuple(f"{colour} square" for colour in COLOURS)
TRAIN_COUNTS = (300, 180, 120, 80, 50, 32, 20, 14, 9, 6)  # head 3, medium 4, tail 3
SPLIT_SIZES = {"train": 600, "test": 500}
TEST_COUNT_PER_CLASS = 100
MAX_LABELS = 3
_SPLIT_SEEDS = {"train": 0, "test": 1}
CAPTION_TEMPLATES = ("a photo of {}.", "an image of {} on a dark background.",
                     "there is {} in the picture.")


def assign_labels(counts, num_images: int, rng: np.random.Generator) -> np.ndarray:
  """(num_images, C) uint8 multi-hot with exactly counts[c] positives in column c, every image 1
  to MAX_LABELS labels: each image first gets one label drawn from the shuffled label slots, the
  remaining slots go to random images that lack that class and have room."""
  slots = rng.permutation(np.repeat(np.arange(len(counts)), counts))
  if not num_images <= len(slots) <= num_images * MAX_LABELS:
    raise ValueError(f"{len(slots)} labels do not fit {num_images} images with 1 to "
                     f"{MAX_LABELS} labels each.")
  labels = np.zeros((num_images, len(counts)), np.uint8)
  labels[np.arange(num_images), slots[:num_images]] = 1
  for c in slots[num_images:]:
    free = np.flatnonzero((labels[:, c] == 0) & (labels.sum(1) < MAX_LABELS))
    labels[rng.choice(free), c] = 1
  return labels


def draw_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8 (N, 32, 32, 3): one coloured square per label, each in its own random 16 px cell."""
  palette = np.array(list(COLOURS.values()))
  images = rng.integers(0, 50, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  for image, row in zip(images, labels):
    cells = rng.permutation(4)
    for cell, c in zip(cells, np.flatnonzero(row)):
      side = int(rng.integers(9, 15))
      top = CELL * (cell // 2) + int(rng.integers(0, CELL - side + 1))
      left = CELL * (cell % 2) + int(rng.integers(0, CELL - side + 1))
      colour = np.clip(palette[c] + rng.integers(-20, 21, size=3), 0, 255)
      image[top:top + side, left:left + side] = colour
  return images


def make_captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
  """One sentence per image naming its squares in a random order."""
  captions = []
  for row in labels:
    names = [f"a {CLASS_NAMES[c]}" for c in rng.permutation(np.flatnonzero(row))]
    objects = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    captions.append(CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(objects))
  return captions


def make_split(split: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
  """(images uint8 (N, 32, 32, 3), labels uint8 (N, C), captions or None) of a split."""
  rng = np.random.default_rng([20_240_705, _SPLIT_SEEDS[split]])
  counts = TRAIN_COUNTS if split == "train" else (TEST_COUNT_PER_CLASS,) * len(CLASS_NAMES)
  labels = assign_labels(counts, SPLIT_SIZES[split], rng)
  images = draw_images(labels, rng)
  return images, labels, make_captions(labels, rng) if split == "train" else None


class MultilabelShapesSource(base.DataSource):
  """The generated long-tailed multi-label squares (see module docstring), served from memory."""
  batch_keys = multilabel_lt.MultilabelLtSource.batch_keys

  def __init__(self, name: str = NAME, *, caption_chars: int | None = multilabel_lt.CAPTION_CHARS,
               caption_tokenizer: Callable[[list[str]], np.ndarray] | None = None):
    self.name, self.class_names = name, CLASS_NAMES
    self.num_classes, self.splits = len(CLASS_NAMES), tuple(SPLIT_SIZES)
    self._splits = {split: make_split(split) for split in SPLIT_SIZES}
    self.captions = [c[:caption_chars] for c in self._splits["train"][2]]
    self._caption_tokens = (None if caption_tokenizer is None else
                            np.asarray(caption_tokenizer(self.captions), np.int32))
    self.class_freq = self._splits["train"][1].sum(0, dtype=np.int64)
    self.num_train_images = SPLIT_SIZES["train"]
    self.class_groups = multilabel_lt.class_groups(self.class_freq)

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return SPLIT_SIZES[split]

  def labels(self, split: str) -> np.ndarray:
    """The split's multi-hot labels, float32 [N, C], in the split's order (for host metrics)."""
    self.check_split(split)
    return self._splits[split][1].astype(np.float32)

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    images, labels, _ = self._splits[split]
    start, end = base.host_range(len(labels), process_index, process_count)
    columns = {"image": images[start:end], "labels": labels[start:end].astype(np.float32)}
    if split == "train":
      columns["caption"] = tf.constant(self.captions[start:end], tf.string)
      if self._caption_tokens is not None:
        columns["caption_tokens"] = self._caption_tokens[start:end]
    return tf.data.Dataset.from_tensor_slices(columns)
