"""Image folders: root/<split>/<class_name>/*.{jpg,jpeg,png}, torchvision ImageFolder style.

The classes are the sorted sub-folder names of root/train, and that one name -> id mapping is used
for every split; they are also the source's `class_names` (what CLIP prompt methods read).
Examples are ordered by (class id, file name), so the order is fixed. Missing folders and empty
class folders raise `DataNotFoundError` naming the path.

Bad image files. `tf.io.decode_image` inside the tf.data map fails mid-run with 'Unknown image
file format' or 'Invalid JPEG data' and no file name, and a graph op cannot catch that error to
add one. So the files are checked when the source is built (`find_bad_images`, also used by the
file-list sources of `file_list.py`), cheaply: an empty file or one whose first bytes are none of
decode_image's formats (JPEG, PNG, GIF, BMP, WebP, JPEG XL) is bad; a JPEG, PNG or GIF without
its end marker (FF D9, the IEND chunk, 0x3B) at the end, i.e. most truncated downloads, is
decoded once here, eagerly, and bad if that fails. The check reads 80 bytes a file, not the
pixels (measured: 50-70 µs a file from a warm local disk, about a minute for ImageNet's 1.28M),
so it misses only damage inside a complete-looking file. Bad files raise a ValueError naming
them, or, with `skip_bad_images=True` (`--config.dataset_kwargs.skip_bad_images=True`), are
dropped, with a warning giving the count and the first few, and listed in `dropped_images`.
`check_images=False` skips the check (huge folders on slow storage); `decode` still names a file
that is not an image at all (`decode_image_file`: a `tf.debugging.Assert` on the format with the
path in its message).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# decode_image's formats by their first bytes (TF's decode_image_op.cc; WebP: `image_format`).
IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
                    (b"GIF8", "GIF"), (b"BM", "BMP"), (b"\xff\x0a", "JPEG XL"),
                    (b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a", "JPEG XL"))
# The last bytes of a complete file, after any trailing NUL/whitespace padding.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b"\x3b"}
HEAD_BYTES, TAIL_BYTES = 16, 64
FORMAT_NAMES = "JPEG, PNG, GIF, BMP, WebP or JPEG XL"
SHOWN_BAD_IMAGES = 5  # bad files named in errors and warnings


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def image_format(head: bytes) -> Optional[str]:
  """The decode_image format that a file starting with `head` has, or None."""
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "WebP"
  return next((name for sig, name in IMAGE_SIGNATURES if head.startswith(sig)), None)


def image_problem(path: str) -> Optional[str]:
  """Why `tf.io.decode_image` cannot decode the file at `path`, or None (see module docstring)."""
  try:
    with open(path, "rb") as f:
      head = f.read(HEAD_BYTES)
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - TAIL_BYTES))
      tail = f.read()
  except OSError as e:
    return f"cannot be read ({e.strerror or e})"
  if not size:
    return "is empty"
  kind = image_format(head)
  if kind is None:
    return f"is not a {FORMAT_NAMES} image (it starts with {head[:8]!r})"
  marker = END_MARKERS.get(kind)
  if marker is None or tail.rstrip(b"\x00\r\n\t ").endswith(marker):
    return None
  try:  # no end marker: truncated, or data after the marker; only decoding tells
    with open(path, "rb") as f:
      tf.io.decode_image(f.read(), channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, ValueError) as e:
    reason = str(e).split("[Op:", 1)[0].split("}}")[-1].strip().rstrip(".")
    return f"is a {kind} file that does not decode, probably truncated ({reason})"
  return None


def find_bad_images(paths: Sequence[str]) -> dict[str, str]:
  """{path: problem} of the distinct `paths` that `image_problem` finds bad, in `paths` order."""
  unique = list(dict.fromkeys(paths))
  with concurrent.futures.ThreadPoolExecutor(min(16, (os.cpu_count() or 1) + 4)) as pool:
    problems = list(pool.map(image_problem, unique, chunksize=256))
  return {path: problem for path, problem in zip(unique, problems) if problem}


def report_bad_images(name: str, bad: dict[str, str], total: int, *, skip: bool,
                      where: str = "") -> None:
  """Raises a ValueError naming the first bad files, or (`skip`) logs a warning about dropping
  them."""
  if not bad:
    return
  shown = "; ".join(f"{path} {problem}" for path, problem in
                    list(bad.items())[:SHOWN_BAD_IMAGES])
  more = f" (and {len(bad) - SHOWN_BAD_IMAGES} more)" if len(bad) > SHOWN_BAD_IMAGES else ""
  counted = f"{len(bad)} of {total} image files{where}"
  if skip:
    logging.getLogger(__name__).warning(
        "Data source %r: skip_bad_images=True dropped %s that cannot be decoded: %s%s.", name,
        counted, shown, more)
    return
  raise ValueError(f"Data source {name!r}: {counted} cannot be decoded: {shown}{more}. Replace "
                   "or delete them, or pass skip_bad_images=True (in a config: "
                   "--config.dataset_kwargs.skip_bad_images=True) to drop them.")


def decode_image_file(path: tf.Tensor) -> tf.Tensor:
  """The image file at `path` (a string tensor) -> uint8 (H, W, 3), as tf.io.decode_image, but a
  file that is empty or not an image format fails naming `path` (a tf.debugging.Assert)."""
  data = tf.io.read_file(path)
  head = tf.strings.join([tf.strings.substr(data, 0, HEAD_BYTES), b"\x00" * HEAD_BYTES])
  known = tf.strings.substr(head, 0, 4) == b"RIFF"
  known &= tf.strings.substr(head, 8, 4) == b"WEBP"
  for signature, _ in IMAGE_SIGNATURES:
    known |= tf.strings.substr(head, 0, len(signature)) == signature
  check = tf.debugging.Assert(known, [
      "Image file", path, f"is empty or not a {FORMAT_NAMES} image; replace or delete it, or "
      "rebuild the data source with skip_bad_images=True to drop such files."])
  with tf.control_dependencies([check]):
    return tf.io.decode_image(tf.identity(data), channels=3, expand_animations=False)


class FolderSource(base.DataSource):
  """Splits and classes read from a folder tree (see module docstring)."""

  def __init__(self, root: str, *, name: str = "folder", skip_bad_images: bool = False,
               check_images: bool = True):
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
    if skip_bad_images and not check_images:
      raise ValueError(f"Data source {name!r}: skip_bad_images=True needs check_images=True (the "
                       "check finds the files to drop).")
    self._files = {split: self._list(split) for split in self.splits}
    self.dropped_images: tuple[str, ...] = ()  # the bad files skip_bad_images dropped
    if check_images:
      paths = np.concatenate([self._files[split][0] for split in self.splits]).tolist()
      bad = find_bad_images(paths)
      report_bad_images(name, bad, len(paths), skip=skip_bad_images, where=f" under {root}")
      if bad:
        self._files = {split: self._drop(split, bad) for split in self.splits}
        self.dropped_images = tuple(bad)

  def _drop(self, split: str, bad: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    paths, labels = self._files[split]
    keep = np.array([path not in bad for path in paths], bool)
    emptied = sorted(set(labels[~keep].tolist()) - set(labels[keep].tolist()))
    if emptied:
      folder = os.path.join(self.root, split, self.classes[emptied[0]])
      raise base.DataNotFoundError(f"Data source {self.name!r}: class folder {folder} has no "
                                   "decodable images left after skip_bad_images dropped the bad "
                                   "ones.")
    return paths[keep], labels[keep]

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
    return {"image": decode_image_file(example["image"]), "label": example["label"]}
