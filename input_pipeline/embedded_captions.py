"""'embedded/captioned_shapes': the generated named shapes with captions, for image-text retrieval
and captioning.

The images, labels and class names are those of 'embedded/named_shapes' (`embedded_clip.py`:
a coloured square in the top or bottom half of a dark noisy 32×32 image); each image also gets 2
or 3 different captions (3 for even example indices) describing its own square, so that the source
has the shape of a Karpathy split (`karpathy.py`): examples {'image', 'label', 'captions' (C,)
strings}, `batch_keys` {'label', 'caption_tokens'} (`clip_tokenize(vocab, key='captions',
max_captions=MAX_CAPTIONS)`), and host-side `captions(split)`, `image_ids(split)` (the image's
index in its split) and `references(split)` = {image id: captions} for the caption scorer
(`jaxprompt.evaluators.caption_metrics`). For captioning training, `train_pairs=True` makes the
train split one example per (image, caption) pair, each with C = 1, in image order, as COCO
Karpathy's train json (RLCF's captioner trains on pairs); val and test stay one example per image
with all its captions, the references.

A caption names the square's colour, its half (top / bottom), its horizontal third (left /
centre / right: where the square's centre lies) and its size (small: side 8-9 px, medium 10,
large 11-12), read back from the generated pixels (the square is where some channel reaches 90;
the background stays below), in one of three phrasings:

  "a small red square at the top left"
  "the top left holds a small red square"
  "small red block in the top left of a dark picture"

Images with the same four attributes share their captions, as real datasets have near-duplicate
captions. kwargs: limit=N keeps the first N examples of the val and test splits (each caption is a
query of the retrieval evaluation: tiny demos and tests), shots / seed as 'embedded/named_shapes',
shift='zoom_out' applies that source's distribution shift (`embedded_clip.zoom_out`: squares
shrunk to 4-6 px and dulled) to the kept test images AFTER their captions are read from the clean
images: the captions describe the scene, as a real caption does not change with the camera's zoom;
train_pairs as above.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from input_pipeline import base, embedded, embedded_clip, karpathy

NAME = "embedded/captioned_shapes"
MAX_CAPTIONS = 3
TEMPLATES = ("a {size} {colour} square at the {place}",
             "the {place} holds a {size} {colour} square",
             "{size} {colour} block in the {place} of a dark picture")
_SQUARE_LEVEL = 90  # `embedded.make_shapes` draws the background below 90 in every channel


def square_attributes(image: np.ndarray) -> tuple[str, str]:
  """(size word, place words) of the square in one generated image (H, W, 3) uint8."""
  rows, cols = np.nonzero(image.max(axis=-1) >= _SQUARE_LEVEL)
  side = rows.max() - rows.min() + 1
  size = "small" if side <= 9 else "medium" if side == 10 else "large"
  half = "top" if rows.min() < embedded.IMAGE_SIZE // 2 else "bottom"
  third = ("left", "centre", "right")[int((cols.min() + cols.max()) / 2 * 3
                                          // embedded.IMAGE_SIZE)]
  return size, f"{half} {third}"


def make_captions(images: np.ndarray, labels: np.ndarray) -> list[list[str]]:
  """2 or 3 captions per image (3 for even indices), in `TEMPLATES` order."""
  captions = []
  for index, (image, label) in enumerate(zip(images, labels)):
    size, place = square_attributes(image)
    colour = embedded_clip.COLOUR_NAMES[label % len(embedded_clip.COLOUR_NAMES)]
    count = 3 if index % 2 == 0 else 2
    captions.append([t.format(size=size, colour=colour, place=place)
                     for t in TEMPLATES[:count]])
  return captions


class CaptionedShapesSource(embedded_clip.NamedShapesSource):
  """`embedded_clip.NamedShapesSource` plus each image's captions (module docstring)."""

  batch_keys = {"label": tf.int32, "caption_tokens": tf.int32,
                "caption_ids": tf.int32}  # captioning: `opt_tokenize`

  def __init__(self, name: str = NAME, *, limit: Optional[int] = None, shots: int = 0,
               seed: int = 1, shift: str = "", train_pairs: bool = False):
    super().__init__(name, shots=shots, seed=seed)
    if shift not in embedded_clip.SHIFTS:
      raise ValueError(f"shift={shift!r}: expected one of {embedded_clip.SHIFTS} ('' = no shift; "
                       f"'zoom_out' shrinks and dulls the test images).")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
      raise ValueError(f"limit={limit!r}: expected None (whole splits) or an integer >= 1 (the "
                       f"examples kept in val and test).")
    if not isinstance(train_pairs, bool):
      raise ValueError(f"train_pairs={train_pairs!r}: expected True (one train example per "
                       "(image, caption) pair, captioning) or False (one per image).")
    for split in ("val", "test") if limit else ():
      images, labels = self._arrays[split]
      self._arrays[split] = images[:limit], labels[:limit]
    self._captions = {split: make_captions(*arrays) for split, arrays in self._arrays.items()}
    self._image_ids = {split: list(range(len(labels)))
                       for split, (_, labels) in self._arrays.items()}
    if train_pairs:
      images, labels = self._arrays["train"]
      owner = np.repeat(np.arange(len(labels)), [len(c) for c in self._captions["train"]])
      self._arrays["train"] = images[owner], labels[owner]
      self._captions["train"] = [[c] for texts in self._captions["train"] for c in texts]
      self._image_ids["train"] = owner.tolist()
    self.max_captions = {split: max(len(c) for c in captions)
                         for split, captions in self._captions.items()}
    self.shift, self.train_pairs = shift, train_pairs
    if shift:
      images, labels = self._arrays["test"]
      self._arrays["test"] = embedded_clip.zoom_out(images), labels

  def captions(self, split: str) -> list[list[str]]:
    """The captions of every example of `split`, in order."""
    self.check_split(split)
    return self._captions[split]

  def image_ids(self, split: str) -> list[int]:
    """The image id (index of the image in its split) of every example of `split`, in order."""
    self.check_split(split)
    return self._image_ids[split]

  def references(self, split: str) -> dict[int, list[str]]:
    """{image id: its captions} of `split`, the references of the caption scorer."""
    return karpathy.references_by_image(self.image_ids(split), self.captions(split))

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    images, labels = self.arrays(split)
    start, end = base.host_range(len(labels), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({
        "image": images[start:end], "label": labels[start:end],
        "captions": tf.ragged.constant(self._captions[split][start:end], dtype=tf.string)})
