"""Image folders: root/<split>/<class_name>/*.{jpg,jpeg,png}, torchvision ImageFolder style.

The classes are the sorted sub-folder names of root/train, and that one name -> id mapping is used
for every split; they are also the source's `class_names` (what CLIP prompt methods read).
Examples are ordered by (class id, file name), so the order is fixed. Missing folders and empty
class folders raise `DataNotFoundError` naming the path.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from input_pipeline import base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


class FolderSource(base.DataSource):
  """Splits and classes read from a folder tree (see module docstring)."""

  def __init__(self, root: str, *, name: str = "folder"):
    if not root or not os.path.isdir(root):
      raise base.DataNotFoundError(f"Data source {name!r}: root folder {root!r} does not exist; "
                                   "expected root/<split>/<class_name>/*.jpg|jpeg|png.")
    self.name, self.root = name, root
    self.splits = tuple(_subdirs(root))
    if "train" not in self.splits:
      raise base.DataNotFoundError(
          f"Data source {name!r}: {os.path.join(root, 'train')} does not exist; the classes are "
          f"the sub-folders of root/train (found split folders: {list(self.splits)}).")
    self.classes = tuple(_subdirs(os.path.join(root, "train")))
    if not self.classes:
      raise base.DataNotFoundError(f"Data source {name!r}: {os.path.join(root, 'train')} has no "
                                   "class sub-folders.")
    self.num_classes = len(self.classes)
    self.class_names = self.classes
    self._files = {split: self._list(split) for split in self.splits}

  def _list(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    class_ids = {c: i for i, c in enumerate(self.classes)}
    paths, labels = [], []
    for class_name in _subdirs(os.path.join(self.root, split)):
      folder = os.path.join(self.root, split, class_name)
      if class_name not in class_ids:
        raise ValueError(f"Data source {self.name!r}: class folder {folder} is not one of the "
                         f"{self.num_classes} classes of root/train ({list(self.classes)}).")
      files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      if not files:
        raise base.DataNotFoundError(f"Data source {self.name!r}: class folder {folder} has no "
                                     f"{'/'.join(IMAGE_EXTENSIONS)} images.")
      paths += [os.path.join(folder, f) for f in files]
      labels += [class_ids[class_name]] * len(files)
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int32)

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return len(self._files[split][1])

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    paths, labels = self._files[split]
    start, end = base.host_range(len(labels), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant(paths[start:end].astype(str), tf.string),
         "label": labels[start:end]})

  def decode(self, example: dict) -> dict:
    image = tf.io.decode_image(tf.io.read_file(example["image"]), channels=3,
                               expand_animations=False)
    return {"image": image, "label": example["label"]}
