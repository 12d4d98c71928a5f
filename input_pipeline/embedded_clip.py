"""'embedded/named_shapes': the generated shapes with class names and a vocabulary, for CLIP.

The images and labels are exactly those of 'embedded/shapes' (`embedded.py`); this source adds
what a CLIP prompt method needs and no download can provide here:

  * `class_names`: class c is "{colour} square at the {top|bottom}" with the colours of
    `embedded.PALETTE` in order (red, green, blue, yellow, magenta);
  * optional seeded K-shot training data (`shots=K`): per class, K training examples drawn
    without replacement (`random.Random(seed).sample`, classes in label order), and the val
    split cut to min(K, 4) per class, as Dassl's `generate_fewshot_dataset` does for CoOp;
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


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Sorted indices of `shots` examples per class (all of a class that has fewer)."""
  rng = random.Random(seed)
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label).tolist()
    chosen += members if len(members) <= shots else rng.sample(members, shots)
  return np.sort(np.asarray(chosen, np.int64))


class NamedShapesSource(embedded.ShapesSource):
  """`embedded.ShapesSource` plus `class_names` and optional K-shot train/val splits."""

  def __init__(self, name: str = NAME, *, shots: int = 0, seed: int = 1):
    super().__init__(name)
    if shots < 0:
      raise ValueError(f"shots must be >= 0 (0 = the full splits); got {shots}.")
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
