"""COCO-LT and VOC-LT, the long-tailed multi-label benchmarks of Wu et al. 2020, as LMPT reads them.

Follows LMPT (Xia et al., "LMPT: Prompt Tuning with Class-Specific Embedding Loss for Long-tailed
Multi-Label Visual Recognition"; Richard88888/LMPT) `lmpt/imagelist.py` (`ImageList`,
`ImageListCaption`), `lmpt/datasets.py`, the class lists of `lmpt/train.py` and the head/medium/tail
split of `lmpt/metrics.py` `ltAnalysis`. `get_source('multilabel/coco_lt', root=<folder>)` or
data_dir=<the folder holding coco/ and voc/> (the seed's `data/`):

  source               folder  classes  lists (in the folder)              images (in the folder)
  multilabel/coco_lt   coco    80       coco_lt_{train,val,test}.txt       train2017/, val2017/
  multilabel/voc_lt    voc     20       voc_lt_{train,val,test}.txt        VOCdevkit/VOC2012/...,
                                                                           VOCdevkit/VOC2007/...

Files (the seed ships the lists and captions; class_freq.pkl is DistributionBalancedLoss's):
  * `<ds>_lt_<split>.txt`: one image per line, "relative/path id id ...", 0-based class ids,
    space-separated (a trailing space is fine; a path-only line is an image with no labels, as
    48 COCO-LT test images are). Blank lines are skipped. The seed's files: COCO-LT 1,909 train /
    5,000 test (COCO val2017), VOC-LT 1,142 train (VOC2012; no final newline) / 4,952 test
    (VOC2007 test). train and test must exist; val is served only when `<ds>_lt_val.txt` exists
    (the seed's README lists it, its repository does not ship it, and its training evaluates on
    test).
  * `<ds>_lt_captions.txt`: "relative/path caption words ..." aligned **by line** with the train
    list (the paths must agree line by line). Caption = the words after the path joined by single
    spaces, cut to the first `caption_chars` = 75 characters (the seed's `[:75]`, done before CLIP
    tokenisation); train examples carry it as 'caption'. Optional: without it there are no captions.
  * `class_freq.pkl`: a pickled dict; 'class_freq' (int [C], positive training images per class)
    is required, 'neg_class_freq' (N_train - class_freq) is checked when present. Both must agree
    with the train list, which is how the file was made (checked for both seed datasets). Without
    the file the counts are computed from the train list.

Examples: {'image': uint8 (H, W, 3), 'labels': float32 multi-hot (C,), 'caption': string (train,
with a caption file)}; with `caption_tokenizer` (e.g. `clip_tokenizer.Tokenizer(...)`, any
callable list[str] -> int [N, L]) the train examples also carry 'caption_tokens' int32 (L,), the
captions tokenised once when the source is built (the seed tokenises them once too).

Besides the DataSource API: `class_names`, `class_freq` (int64 [C]), `num_train_images` (N of the
DB loss), `class_groups`, `captions` (train order, or None) and `labels(split)` (float32 [N, C],
the split's labels in order, for host-side metrics).

Class names are the seed's `dataset_classes` lists of train.py, '_' -> ' ' (as CoOp writes them
into prompts): COCO "traffic light", VOC "diningtable" (VOC's names are written as one word).
Head / medium / tail (`class_groups`): classes with >= 100, [20, 100), < 20 training images
(`ltAnalysis`: VOC-LT 6/6/8, COCO-LT 22/33/25; VOC's pottedplant, with exactly 100, is head).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import base, file_list, safe_pickle

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")

SPLITS = ("train", "val", "test")
CAPTION_CHARS = 75       # imagelist.py: ' '.join(words)[:75]
HEAD_MIN_IMAGES = 100    # metrics.py ltAnalysis: head n >= 100, medium 20 <= n < 100, tail n < 20
TAIL_BELOW_IMAGES = 20


@dataclasses.dataclass(frozen=True)
class LtDataset:
  folder: str                    # the seed's data/<folder>
  prefix: str                    # <prefix>_lt_train.txt, ...
  class_names: tuple[str, ...]


MULTILABEL_LT_DATASETS: dict[str, LtDataset] = {
    "coco_lt": LtDataset("coco", "coco", COCO_CLASSES),
    "voc_lt": LtDataset("voc", "voc", VOC_CLASSES),
}


def class_groups(class_freq) -> dict[str, np.ndarray]:
  """{'head', 'medium', 'tail'}: sorted class ids with >= 100, [20, 100), < 20 training images."""
  counts = np.asarray(class_freq)
  return {"head": np.flatnonzero(counts >= HEAD_MIN_IMAGES),
          "medium": np.flatnonzero((counts >= TAIL_BELOW_IMAGES) & (counts < HEAD_MIN_IMAGES)),
          "tail": np.flatnonzero(counts < TAIL_BELOW_IMAGES)}


def read_label_list(path: str, num_classes: int, name: str) -> tuple[list[str], np.ndarray]:
  """(relative paths, multi-hot uint8 [N, C]) of a "path id id ..." list, with clear errors."""
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f"Data source {name!r}: {path} does not exist; expected the "
                                 "LMPT list 'relative/image/path id id ...' per line.")
  paths, rows = [], []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      try:
        ids = [int(v) for v in fields[1:]]
      except ValueError:
        raise ValueError(f"Data source {name!r}: {path}:{line_number} has a non-integer label in "
                         f"{line.strip()!r}; expected 'path id id ...'.") from None
      bad = [i for i in ids if not 0 <= i < num_classes]
      if bad:
        raise ValueError(f"Data source {name!r}: {path}:{line_number} gives {fields[0]} the label "
                         f"{bad[0]}; expected 0 <= label < {num_classes}.")
      paths.append(fields[0])
      rows.append(ids)
  if not paths:
    raise ValueError(f"Data source {name!r}: {path} lists no images.")
  labels = np.zeros((len(paths), num_classes), np.uint8)
  for row, ids in enumerate(rows):
    labels[row, ids] = 1
  return paths, labels


def read_captions(path: str, train_paths: Sequence[str], name: str,
                  caption_chars: int | None) -> list[str]:
  """Captions of the train list, aligned by line; the paths must agree line by line."""
  paths, captions = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      fields = line.split()
      if fields:
        paths.append(fields[0])
        captions.append(" ".join(fields[1:])[:caption_chars])
  if len(paths) != len(train_paths):
    raise ValueError(f"Data source {name!r}: {path} has {len(paths)} captions for "
                     f"{len(train_paths)} training images; they are matched by line.")
  for line_number, (caption_path, train_path) in enumerate(zip(paths, train_paths), 1):
    if caption_path != train_path:
      raise ValueError(f"Data source {name!r}: caption line {line_number} of {path} is for "
                       f"{caption_path}, but line {line_number} of the train list is "
                       f"{train_path}; captions are matched by line.")
  return captions


def read_class_freq(path: str, train_labels: np.ndarray, name: str) -> np.ndarray:
  """class_freq of class_freq.pkl (int64 [C]), checked against the train list's counts.

  The pickle is read with `safe_pickle.load` (numpy arrays and builtin containers only): it comes
  with a downloaded data folder, and plain `pickle.load` would run any code it names."""
  content = safe_pickle.load(path)
  if not isinstance(content, dict) or "class_freq" not in content:
    keys = sorted(content) if isinstance(content, dict) else type(content).__name__
    raise ValueError(f"Data source {name!r}: {path} must hold a dict with key 'class_freq'; got "
                     f"{keys}.")
  class_freq = np.asarray(content["class_freq"]).astype(np.int64)
  num_train, num_classes = train_labels.shape
  if class_freq.shape != (num_classes,):
    raise ValueError(f"Data source {name!r}: {path} has class_freq of shape {class_freq.shape}; "
                     f"expected ({num_classes},), one count per class.")
  counted = train_labels.sum(0, dtype=np.int64)
  if not np.array_equal(class_freq, counted):
    c = int(np.flatnonzero(class_freq != counted)[0])
    raise ValueError(f"Data source {name!r}: {path} gives class {c} {class_freq[c]} training "
                     f"images, but the train list has {counted[c]}; class_freq.pkl must be made "
                     "from this train list.")
  if "neg_class_freq" in content:
    neg = np.asarray(content["neg_class_freq"]).astype(np.int64)
    if neg.shape != (num_classes,) or not np.all(class_freq + neg == num_train):
      raise ValueError(f"Data source {name!r}: {path} has neg_class_freq that does not add up "
                       f"with class_freq to the {num_train} training images.")
  return class_freq


class MultilabelLtSource(base.DataSource):
  """COCO-LT or VOC-LT from the LMPT lists (see module docstring)."""
  batch_keys = {"labels": tf.float32, "caption_tokens": tf.int32}  # caption_tokens: train only

  def __init__(self, dataset: str, *, root: str | None = None, data_dir: str | None = None,
               caption_chars: int | None = CAPTION_CHARS,
               caption_tokenizer: Callable[[list[str]], np.ndarray] | None = None,
               name: str | None = None):
    if dataset not in MULTILABEL_LT_DATASETS:
      raise ValueError(f"Unknown long-tailed multi-label dataset {dataset!r}; valid: "
                       f"{', '.join(MULTILABEL_LT_DATASETS)}.")
    spec, name = MULTILABEL_LT_DATASETS[dataset], name or f"multilabel/{dataset}"
    self.name, self.class_names = name, spec.class_names
    self.num_classes = len(spec.class_names)
    self.root = root = file_list.dataset_folder(
        name, root, data_dir, spec.folder,
        holds=f"{spec.prefix}_lt_train.txt, {spec.prefix}_lt_test.txt and the image folders")
    self.list_files = {split: os.path.join(root, f"{spec.prefix}_lt_{split}.txt")
                       for split in SPLITS}
    self.splits = tuple(s for s in SPLITS if s != "val" or os.path.isfile(self.list_files[s]))
    lists = {split: read_label_list(self.list_files[split], self.num_classes, name)
             for split in self.splits}
    self._paths = {split: [os.path.join(root, p) for p in paths]
                   for split, (paths, _) in lists.items()}
    self._labels = {split: labels for split, (_, labels) in lists.items()}
    file_list.check_files_exist(name, {s: (p, None) for s, p in self._paths.items()},
                                self.list_files)

    self.caption_file = os.path.join(root, f"{spec.prefix}_lt_captions.txt")
    self.captions: list[str] | None = None
    if os.path.isfile(self.caption_file):
      self.captions = read_captions(self.caption_file, lists["train"][0], name, caption_chars)
    self._caption_tokens = None
    if caption_tokenizer is not None:
      if self.captions is None:
        raise base.DataNotFoundError(f"Data source {name!r}: caption_tokenizer was given but "
                                     f"{self.caption_file} does not exist.")
      self._caption_tokens = np.asarray(caption_tokenizer(self.captions), np.int32)

    self.class_freq_file = os.path.join(root, "class_freq.pkl")
    if os.path.isfile(self.class_freq_file):
      self.class_freq = read_class_freq(self.class_freq_file, self._labels["train"], name)
    else:
      self.class_freq = self._labels["train"].sum(0, dtype=np.int64)
    self.num_train_images = len(self._paths["train"])
    self.class_groups = class_groups(self.class_freq)

  def check_split(self, split: str) -> None:
    if split == "val" and "val" not in self.splits:
      raise base.DataNotFoundError(
          f"Data source {self.name!r} has no split 'val': {self.list_files['val']} does not exist "
          "(the LMPT repository does not ship it; its training evaluates on test).")
    super().check_split(split)

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return len(self._paths[split])

  def labels(self, split: str) -> np.ndarray:
    """The split's multi-hot labels, float32 [N, C], in the split's order (for host metrics)."""
    self.check_split(split)
    return self._labels[split].astype(np.float32)

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    start, end = base.host_range(len(self._paths[split]), process_index, process_count)
    columns = {"image": tf.constant(self._paths[split][start:end], tf.string),
               "labels": self._labels[split][start:end].astype(np.float32)}
    if split == "train" and self.captions is not None:
      columns["caption"] = tf.constant(self.captions[start:end], tf.string)
      if self._caption_tokens is not None:
        columns["caption_tokens"] = self._caption_tokens[start:end]
    return tf.data.Dataset.from_tensor_slices(columns)

  def decode(self, example: dict) -> dict:
    image = tf.io.decode_image(tf.io.read_file(example["image"]), channels=3,
                               expand_animations=False)
    return {**example, "image": image}
