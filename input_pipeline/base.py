"""The `DataSource` contract every dataset family implements, and the per-host slicing rule.

A source serves named splits as `tf.data.Dataset`s of `{'image': uint8 (H, W, 3), 'label': int32}`
in a fixed order. It does so in two stages so that the training pipeline can skip and shuffle
cheaply before any pixel is decoded:

  * `raw_dataset(split)`: labels final, images still in their stored form (encoded bytes, a file
    path, or an in-memory uint8 array); cheap to cache, shuffle and skip.
  * `decode(example)`: turns one raw example into the decoded `{'image', 'label'}` form.

`dataset(split)` is simply `raw_dataset(split).map(decode)`.

Hosts read disjoint contiguous blocks of a split: host i of P gets examples
[i*n//P, (i+1)*n//P) of the split's fixed order (block sizes differ by at most one, like
`tfds.even_splits`), so together the hosts cover the split exactly once. Evaluation reads these
blocks; training reads the whole split on every host and keeps its rows of each global batch
(`pipeline.make_train_dataset`), so that its order does not depend on the number of hosts.
"""
from __future__ import annotations

import tensorflow as tf


class DataNotFoundError(FileNotFoundError):
  """The data a source needs is not on disk (not prepared, wrong folder, empty class folder)."""


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end): the block of a `num_examples`-example split that host `process_index` reads."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count); got process_index="
                     f"{process_index}, process_count={process_count}.")
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def grey_to_rgb(image: tf.Tensor) -> tf.Tensor:
  """(H, W, 1) -> (H, W, 3) by repeating the channel; (H, W, 3) unchanged."""
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


class DataSource:
  """A dataset with named splits; subclasses set the attributes and implement the two stages."""

  name: str
  num_classes: int
  splits: tuple[str, ...]
  # The example keys besides 'image' that batches carry, with their batch dtypes; a source may
  # produce a declared key in some splits only (LMPT's 'caption_tokens': train only). Methods
  # declare the keys they consume (`jaxprompt.method.Method.inputs`) and the trainer checks them
  # against this at start.
  batch_keys: dict = {"label": tf.int32}

  def num_examples(self, split: str) -> int:
    """Examples in the whole split (all hosts together)."""
    raise NotImplementedError

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    """This host's block of `split`, labels final, images not yet decoded (see module docstring)."""
    raise NotImplementedError

  def decode(self, example: dict) -> dict:
    """One raw example -> {'image': uint8 (H, W, 3), 'label': int32 scalar}."""
    return example

  def dataset(self, split: str, *, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    """This host's block of `split`, decoded, in a fixed order."""
    raw = self.raw_dataset(split, process_index=process_index, process_count=process_count)
    return raw.map(self.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def check_split(self, split: str) -> None:
    if split not in self.splits:
      raise ValueError(f"Unknown split {split!r} for data source {self.name!r}; valid splits: "
                       f"{', '.join(self.splits)}.")

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"splits={self.splits})")
