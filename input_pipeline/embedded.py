"""'embedded/shapes': the project's own generated dataset, so that everything runs with no download.

32×32 RGB uint8 images of 10 balanced classes. Class c is one (colour, position) pair: a filled
square of colour PALETTE[c % 5] in the top half of the image (c < 5) or the bottom half (c >= 5),
on a dark noisy background. Size, position inside its half and colour jitter vary per image. The
signal is deliberately strong and mostly colour/position, so that a small frozen random-init ViT
with a trained head and prompts learns it within a few epochs.

Generated with numpy from fixed seeds (one per split): the same bytes on every machine and run.
Splits: train 2000, val 500, test 1000. All three take about 0.15 s to generate.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from input_pipeline import base

IMAGE_SIZE = 32
NUM_CLASSES = 10
PALETTE = np.array([(225, 40, 40), (40, 205, 40), (45, 70, 230), (230, 210, 40), (205, 40, 210)])
SPLIT_SIZES = {"train": 2000, "val": 500, "test": 1000}
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def make_shapes(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (n, 32, 32, 3), labels int32 (n,)), exactly balanced over the 10 classes."""
  rng = np.random.default_rng([20_240_601, seed])
  labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int32)
  half = IMAGE_SIZE // 2
  side = rng.integers(8, 13, size=num_examples)                      # square side, pixels
  x0 = rng.integers(0, IMAGE_SIZE - side + 1)
  y0 = rng.integers(0, half - side + 1) + np.where(labels < 5, 0, half)
  grid = np.arange(IMAGE_SIZE)
  inside = lambda start: (grid >= start[:, None]) & (grid < (start + side)[:, None])  # (n, 32)
  mask = inside(y0)[:, :, None] & inside(x0)[:, None, :]             # (n, 32, 32)
  colour = PALETTE[labels % 5] + rng.integers(-25, 26, size=(num_examples, 3))
  colour = np.clip(colour, 0, 255).astype(np.uint8)
  background = rng.integers(0, 90, size=(num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  return np.where(mask[..., None], colour[:, None, None, :], background), labels


class ShapesSource(base.DataSource):
  """The generated shapes served from memory; hosts slice each split like every other source."""

  def __init__(self, name: str = "embedded/shapes"):
    self.name, self.num_classes, self.splits = name, NUM_CLASSES, tuple(SPLIT_SIZES)
    self._arrays = {split: make_shapes(n, _SPLIT_SEEDS[split]) for split, n in SPLIT_SIZES.items()}

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return SPLIT_SIZES[split]

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as numpy (images, labels)."""
    self.check_split(split)
    return self._arrays[split]

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    images, labels = self.arrays(split)
    start, end = base.host_range(len(labels), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({"image": images[start:end],
                                               "label": labels[start:end]})
