"""'embedded/named_shapes': the generated shapes with class names and a vocabulary, for CLIP.

The images and labels are exactly those of 'embedded/shapes' (`embedded.py`); this source adds
what a CLIP prompt method needs and no download can provide here:

  * `class_names`: class c is "{colour} square at the {top|bottom}" with the colours of
    `embedded.PALETTE` in order (red, green, blue, yellow, magenta);
  * optional seeded K-shot training data (`shots=K`): per class, K training examples drawn
    without replacement (`random.Random(seed).sample`, classes in label order), and the val
    split cut to min(K, 4) per class, as Dassl's `generate_fewshot_dataset` does for CoOp;
  * an optional distribution shift of the test split (`shift='zoom_out'`, for the test-time
    adaptation demos): every test image is shrunk to half its size about the centre (2×2 box
    averaging; the 16 px content keeps its top/bottom half) and pasted on a fresh noisy
    background of the same kind, and the contrast is lowered to SHIFT_CONTRAST about mid-grey.
    The squares become 4-6 px, smaller than any training square, and duller; the train and val
    splits stay clean. The shifted images are generated from a fixed seed, like the splits;
  * optionally only the first `test_examples` examples of the test split (the TTA demos adapt on
    500, which keeps them short);
  * `byte_vocabulary()`: a CLIP tokenizer vocabulary the project writes itself, byte-level BPE
    with no merges (the 256 byte symbols, their '</w>' forms, '<|startoftext|>' = 512,
    '<|endoftext|>' = 513; every character is a token), readable by `clip_tokenizer.Tokenizer`.
"""
from __future__ import annotations

import gzip
import os
import random
import tempfile

import numpy as np

from input_pipeline import embedded

NAME = "embedded/named_shapes"
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta")  # embedded.PALETTE order
CLASS_NAMES = tuple(f"{colour} square at the {half}"
                    for half in ("top", "bottom") for colour in COLOUR_NAMES)
MAX_VAL_SHOTS = 4
SHIFTS = ("", "zoom_out")  # '' = no shift
SHIFT_CONTRAST = 0.7  # zoom_out: pixel values 128 + 0.7 · (value - 128)
_SHIFT_SEED = 3


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Sorted indices of `shots` examples per class (all of a class that has fewer)."""
  rng = random.Random(seed)
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label).tolist()
    chosen += members if len(members) <= shots else rng.sample(members, shots)
  return np.sort(np.asarray(chosen, np.int64))


def zoom_out(images: np.ndarray, seed: int = _SHIFT_SEED) -> np.ndarray:
  """The 'zoom_out' shift of uint8 images (n, 32, 32, 3): the image halved about its centre (2×2
  box average) on a new noisy background (uniform in [0, 90), as `embedded.make_shapes`), then
  the contrast lowered to SHIFT_CONTRAST about 128; rounded to uint8."""
  n, size = images.shape[0], embedded.IMAGE_SIZE
  half, offset = size // 2, size // 4
  small = images.astype(np.float32).reshape(n, half, 2, half, 2, 3).mean(axis=(2, 4))
  rng = np.random.default_rng([20_240_601, seed])
  canvas = rng.integers(0, 90, size=images.shape).astype(np.float32)
  canvas[:, offset:offset + half, offset:offset + half] = small
  shifted = 128 + SHIFT_CONTRAST * (canvas - 128)
  return np.clip(np.round(shifted), 0, 255).astype(np.uint8)


class NamedShapesSource(embedded.ShapesSource):
  """`embedded.ShapesSource` plus `class_names`, optional K-shot train/val splits, an optional
  shift of the test split (`shift`, one of SHIFTS) and an optional cut of it (`test_examples`,
  0 = all)."""

  def __init__(self, name: str = NAME, *, shots: int = 0, seed: int = 1, shift: str = "",
               test_examples: int = 0):
    super().__init__(name)
    if shots < 0:
      raise ValueError(f"shots must be >= 0 (0 = the full splits); got {shots}.")
    if shift not in SHIFTS:
      raise ValueError(f"shift={shift!r}: expected one of {SHIFTS} ('' = no shift; 'zoom_out' "
                       f"shrinks and dulls the test images).")
    images, labels = self._arrays["test"]
    if not 0 <= test_examples <= len(labels):
      raise ValueError(f"test_examples={test_examples}: expected 0 (the whole test split) to "
                       f"{len(labels)}.")
    self.shift = shift
    if shift:
      images = zoom_out(images)
    if test_examples:
      images, labels = images[:test_examples], labels[:test_examples]
    self._arrays["test"] = images, labels
    self.class_names, self.shots, self.seed = CLASS_NAMES, shots, seed
    if shots:
      for split, per_class in (("train", shots), ("val", min(shots, MAX_VAL_SHOTS))):
        images, labels = self._arrays[split]
        keep = few_shot_indices(labels, per_class, seed)
        self._arrays[split] = images[keep], labels[keep]

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return len(self._arrays[split][1])


def write_byte_vocabulary(path: str) -> str:
  """Writes the no-merge byte-level BPE vocabulary (OpenAI's .txt.gz format: a header line and no
  merge lines) to `path` and returns it."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
  with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    f.write(b"#version: jaxprompt byte-level, no merges\n")
  os.replace(partial, path)  # atomic: concurrent writers leave one complete file
  return path


def byte_vocabulary() -> str:
  """Path of the byte-level vocabulary in this user's temp folder, written on first use."""
  path = os.path.join(tempfile.gettempdir(), f"jaxprompt-{os.getuid()}", "byte_bpe.txt.gz")
  return path if os.path.isfile(path) else write_byte_vocabulary(path)
