"""Detection data from COCO-format json files and image folders: COCO 2017, LVIS v1, any json.

Follows microsoft/GLIP `maskrcnn_benchmark/data/datasets/coco.py` (`COCODataset`,
`has_valid_annotation`), `modulated_coco.py` (`CocoGrounding`, the training dataset of the COCO
and ODinW recipes), `lvis.py` (`LvisDetection`) and `config/paths_catalog.py` (the file layout);
GLIP paper (Li et al., CVPR 2022) §4.

Per split, as the original:

  * images in ascending image-id order (`self.ids = sorted(self.ids)`);
  * contiguous labels 1..C in the order of the json's 'categories' list (pycocotools'
    `getCatIds()`, which is the list order; COCO's, LVIS' and ODinW's lists are sorted by id) -
    LVIS sorts the ids explicitly (`LvisDetection.categories`); `category_ids[label - 1]` maps a
    label back to the dataset's category id;
  * training splits drop the images without a valid annotation (`has_valid_annotation`: no
    annotation, or every box has w <= 1 or h <= 1; crowd boxes count, as in the original, so an
    image with only crowd boxes stays and trains on no boxes); the number dropped per split is
    `skipped_images[split]`, and logged. Evaluation splits keep every image (the original's test
    datasets are built with `remove_images_without_annotations=False`);
  * crowd annotations (`iscrowd` = 1; LVIS has no such field, read as 0) are not served;
  * boxes [x, y, w, h] -> xyxy with the +1 convention (`detection.xywh_to_xyxy`), clipped to the
    image and dropped when empty (x2 <= x1 or y2 <= y1: w or h <= 1, or outside the image), as
    `BoxList.clip_to_image(remove_empty=True)` does silently; here the count per split is
    `dropped_boxes[split]` and a warning names the json file and the first few (image id, box);
  * an annotation whose category id is not in 'categories', or whose bbox is not 4 finite
    numbers, or an image without width/height, is an error naming the json file, the image id
    and the value; so is an image file whose decoded size differs from the json's (checked in the
    tf.data graph, naming the file).

The images are read with `folder.decode_image_file`; with `check_images` (default) every image
file of a split is checked when the split is first used (`folder.find_bad_images`) and bad files
raise an error, or with `skip_bad_images=True` are dropped (`dropped_images`), and then are not
in `coco_ground_truth` either.

Splits are loaded lazily (COCO's and LVIS' training json files are large): the categories come
from the first split's json that exists (`category_split`), and every split loaded later must
have the same category ids and names.

`coco_ground_truth(split)` is the split's json restricted to the images the split serves (with
their annotations, crowd ones included; 'iscrowd' 0 and 'area' w·h filled in where missing, as
COCOeval needs them); LVIS' extra fields (images' `neg_category_ids`,
`not_exhaustive_category_ids`, categories' `frequency`) are kept for LVISEval.

Sources (`input_pipeline.get_source`):
  coco/2017: kwargs root=<folder with annotations/instances_{train,val}2017.json and
    train2017/, val2017/> (GLIP's DATASET/coco), or data_dir=<its parent> (data_dir/coco).
  lvis/v1: kwargs root=<the COCO folder: annotations/lvis_v1_{train,val}.json and, for the
    'minival' split, MDETR's annotations/lvis_v1_minival_inserted_image_name.json (GLIP's
    configs/lvis/minival.yaml); images train2017/, val2017/ found through each image's
    coco_url>, or data_dir=<its parent>; train_json / val_json / minival_json override a file.
  coco_json: kwargs train_json / val_json / test_json (any of them), image_root (one folder for
    all) or train_images / val_images / test_images, dataset_name (the source's name;
    relative paths are under data_dir when given), override_category ([{'id', 'name'}] or its
    json string: GLIP's OVERRIDE_CATEGORY).
All take vocab=<BERT vocab.txt> (required), max_text_len, separator, caption_prompts,
check_images, skip_bad_images, and per_image_captions, max_negatives (85), caption_seed: the
training splits (`train_splits`) of a class list whose caption overflows max_text_len (LVIS)
serve GLIP's per-image captions, each image's classes plus sampled negative names
(`detection.py`, `grounding.CaptionSampler`; GLIP's `SPECIAL_SAFEGUARD_FOR_COCO_GROUNDING` path
of `CocoGrounding`); per_image_captions=True turns them on for any class list, False off.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import base, detection, folder, grounding, object_crops

SHOWN = 5  # offending entries named in warnings
_log = logging.getLogger(__name__)


def load_json(path: str, name: str) -> dict:
  """The json dict at `path`; DataNotFoundError when missing, ValueError when not a COCO dict."""
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f"Data source {name!r}: annotation file {path} does not exist.")
  with open(path, encoding="utf-8") as f:
    try:
      dataset = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Data source {name!r}: {path} is not valid json ({e}).") from None
  if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list) or not (
      isinstance(dataset.get("categories"), list) and dataset["categories"]):
    raise ValueError(f"Data source {name!r}: {path} is not a COCO-format detection json (a dict "
                     "with an 'images' list and a non-empty 'categories' list).")
  return dataset


def json_categories(dataset: dict, path: str, *, sort_ids: bool = False
                    ) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """(category ids, names) in label order: the json list's order (pycocotools getCatIds), or
  ascending ids with `sort_ids` (GLIP's LVIS)."""
  categories = dataset["categories"]
  for c in categories:
    if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(
        c.get("name"), str):
      raise ValueError(f"{path}: category {c!r} needs an integer 'id' and a string 'name'.")
  ids = [c["id"] for c in categories]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{path}: category ids {sorted(i for i in set(ids) if ids.count(i) > 1)} "
                     "are listed twice.")
  if sort_ids:
    categories = sorted(categories, key=lambda c: c["id"])
  return tuple(c["id"] for c in categories), tuple(c["name"] for c in categories)


def apply_override(ids: Sequence[int], names: Sequence[str], override, path: str
                   ) -> tuple[str, ...]:
  """GLIP's `OVERRIDE_CATEGORY`: [{'id', 'name', ...}] replacing the names of the json's
  categories (same ids; the labels keep the json's order)."""
  if override is None:
    return tuple(names)
  if isinstance(override, str):
    override = json.loads(override)
  by_id = {}
  for entry in override:
    if not isinstance(entry, Mapping) or "id" not in entry or not isinstance(entry.get("name"),
                                                                             str):
      raise ValueError(f"override_category entry {entry!r}: expected {{'id': int, 'name': str}}.")
    by_id[int(entry["id"])] = entry["name"]
  if set(by_id) != set(ids):
    raise ValueError(f"override_category has category ids {sorted(by_id)}; {path} has "
                     f"{sorted(ids)}: they must be the same.")
  return tuple(by_id[i] for i in ids)


def has_valid_annotation(annotations: Sequence[dict]) -> bool:
  """GLIP's `has_valid_annotation` (boxes only): some annotation has a box with w > 1 and h > 1."""
  return any(not any(side <= 1 for side in a["bbox"][2:]) for a in annotations)


def _check_bbox(annotation: dict, path: str, image_id) -> list[float]:
  bbox = annotation.get("bbox")
  if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 for v in bbox)):
    raise ValueError(f"{path}: annotation {annotation.get('id')!r} of image {image_id!r} has "
                     f"bbox {bbox!r}; expected [x, y, w, h], 4 finite numbers.")
  return [float(v) for v in bbox]


class SplitIndex:
  """One split, ready to serve: per image its path, id, (h, w), boxes (n, 4) xyxy and labels."""

  def __init__(self, paths, image_ids, sizes, boxes, labels, *, skipped_images: int,
               dropped_boxes: int):
    self.paths = np.array(paths, dtype=object)
    self.image_ids = np.array(image_ids, np.int64)
    self.sizes = np.array(sizes, np.int32).reshape(-1, 2)
    self.boxes, self.labels = list(boxes), list(labels)
    self.skipped_images, self.dropped_boxes = skipped_images, dropped_boxes

  def keep(self, mask: np.ndarray) -> "SplitIndex":
    kept = SplitIndex(self.paths[mask], self.image_ids[mask], self.sizes[mask],
                      [b for b, k in zip(self.boxes, mask) if k],
                      [l for l, k in zip(self.labels, mask) if k],
                      skipped_images=self.skipped_images, dropped_boxes=self.dropped_boxes)
    return kept


def index_split(dataset: dict, path: str, image_root: str, label_of: Mapping[int, int], *,
                train: bool, image_path: Callable[[dict, str], str], name: str) -> SplitIndex:
  """The served images of one split json (see the module docstring for the rules)."""
  images = {}
  for image in dataset["images"]:
    image_id = image.get("id") if isinstance(image, dict) else None
    if not isinstance(image_id, int) or not 0 <= image_id < 2**31:
      raise ValueError(f"{path}: image entry {str(image)[:200]} needs an integer 'id' in "
                       "[0, 2**31) (batches carry it as int32).")
    if image_id in images:
      raise ValueError(f"{path}: image id {image_id} is listed twice.")
    for key in ("height", "width"):
      if not isinstance(image.get(key), int) or image[key] < 1:
        raise ValueError(f"{path}: image {image_id} has {key}={image.get(key)!r}; expected a "
                         "positive integer.")
    images[image_id] = image
  per_image = {i: [] for i in images}
  for annotation in dataset.get("annotations", []):
    image_id = annotation.get("image_id")
    if image_id not in per_image:
      raise ValueError(f"{path}: annotation {annotation.get('id')!r} refers to image "
                       f"{image_id!r}, which is not in 'images'.")
    if annotation.get("category_id") not in label_of:
      raise ValueError(f"{path}: annotation {annotation.get('id')!r} of image {image_id} has "
                       f"category_id {annotation.get('category_id')!r}, which is not one of the "
                       f"'categories' ids {sorted(label_of)[:20]}.")
    annotation = {**annotation, "bbox": _check_bbox(annotation, path, image_id)}
    per_image[image_id].append(annotation)
  paths, ids, sizes, all_boxes, all_labels, skipped, dropped = [], [], [], [], [], 0, []
  for image_id in sorted(images):
    annotations = per_image[image_id]
    if train and not has_valid_annotation(annotations):
      skipped += 1
      continue
    image = images[image_id]
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = detection.xywh_to_xyxy([a["bbox"] for a in kept])
    boxes, keep = detection.clip_and_drop_empty(boxes, image["height"], image["width"])
    dropped += [(image_id, a["bbox"]) for a, k in zip(kept, keep) if not k]
    paths.append(image_path(image, image_root))
    ids.append(image_id)
    sizes.append((image["height"], image["width"]))
    all_boxes.append(boxes[keep])
    all_labels.append(np.array([label_of[a["category_id"]] for a in kept], np.int32)[keep])
  if skipped:
    _log.info("Data source %r: %s: %d of %d training images have no valid box and are skipped "
              "(as GLIP's has_valid_annotation).", name, path, skipped, len(images))
  if dropped:
    _log.warning("Data source %r: %s: %d boxes are empty after clipping to their image (w or h "
                 "<= 1, or outside it) and are dropped, as GLIP's clip_to_image(remove_empty="
                 "True) does; (image id, [x, y, w, h]): %s%s.", name, path, len(dropped),
                 dropped[:SHOWN], " ..." if len(dropped) > SHOWN else "")
  return SplitIndex(paths, ids, sizes, all_boxes, all_labels, skipped_images=skipped,
                    dropped_boxes=len(dropped))


def file_name_path(image: dict, image_root: str) -> str:
  """COCO: the image's 'file_name' under the split's image folder."""
  if not isinstance(image.get("file_name"), str) or not image["file_name"]:
    raise ValueError(f"Image {image.get('id')!r} has no 'file_name'.")
  return os.path.join(image_root, image["file_name"])


class CocoJsonSource(detection.DetectionSource):
  """Detection splits from COCO-format json files (see the module docstring).

  split_files: {split: (json path, image folder)}, in the order categories are looked for.
  """

  def __init__(self, split_files: Mapping[str, tuple[str, str]], *, vocab: str,
               name: str = "coco_json", train_splits: Sequence[str] = ("train",),
               override_category=None, caption_prompts: Sequence[dict] | None = None,
               lvis: bool = False, max_text_len: int = grounding.DEFAULT_MAX_LENGTH,
               separator: str = grounding.DEFAULT_SEPARATOR,
               check_images: bool = True, skip_bad_images: bool = False,
               per_image_captions: bool | None = None,
               max_negatives: int = grounding.DEFAULT_MAX_NEGATIVES, caption_seed: int = 0):
    if not split_files:
      raise ValueError(f"Data source {name!r}: no split files given.")
    if skip_bad_images and not check_images:
      raise ValueError(f"Data source {name!r}: skip_bad_images=True needs check_images=True (the "
                       "check finds the files to drop).")
    self.split_files = {s: (str(j), str(d)) for s, (j, d) in split_files.items()}
    present = [s for s, (j, _) in self.split_files.items() if os.path.isfile(j)]
    if not present:
      raise base.DataNotFoundError(
          f"Data source {name!r}: none of its annotation files exists: "
          + "; ".join(f"{s}: {j}" for s, (j, _) in self.split_files.items()) + ".")
    self.train_splits = tuple(train_splits)
    self.lvis, self.check_images, self.skip_bad_images = lvis, check_images, skip_bad_images
    self.category_split = present[0]
    path = self.split_files[present[0]][0]
    ids, json_names = json_categories(load_json(path, name), path, sort_ids=lvis)
    self.json_class_names = json_names
    names = apply_override(ids, json_names, override_category, path)
    super().__init__(name, names, present, vocab=vocab, max_text_len=max_text_len,
                     separator=separator, caption_prompts=caption_prompts, category_ids=ids,
                     per_image_captions=per_image_captions, max_negatives=max_negatives,
                     caption_seed=caption_seed, caption_sampling_splits=self.train_splits)
    self._index: dict[str, SplitIndex] = {}
    self.skipped_images: dict[str, int] = {}  # per loaded split: training images without boxes
    self.dropped_boxes: dict[str, int] = {}  # per loaded split: empty boxes dropped
    self.dropped_images: dict[str, tuple[str, ...]] = {}  # per split: bad files skipped

  def check_split(self, split: str) -> None:
    if split in self.split_files and split not in self.splits:
      raise base.DataNotFoundError(
          f"Data source {self.name!r}: split {split!r} needs {self.split_files[split][0]}, which "
          f"does not exist (available splits: {', '.join(self.splits)}).")
    super().check_split(split)

  def _image_path(self, image: dict, image_root: str) -> str:
    if self.lvis:
      return object_crops.image_path(image, image_root)
    return file_name_path(image, image_root)

  def _read(self, split: str) -> dict:
    """The split's json, its categories checked against the source's."""
    path = self.split_files[split][0]
    dataset = load_json(path, self.name)
    ids, names = json_categories(dataset, path, sort_ids=self.lvis)
    if ids != self.category_ids or names != self.json_class_names:
      raise ValueError(f"Data source {self.name!r}: the categories of {path} differ from those of "
                       f"{self.split_files[self.category_split][0]} (ids {list(ids)[:10]}... vs "
                       f"{list(self.category_ids)[:10]}...); all splits need the same list.")
    return dataset

  def split_index(self, split: str) -> SplitIndex:
    """The split's served images (loaded, filtered and checked on first use)."""
    self.check_split(split)
    if split not in self._index:
      path, image_root = self.split_files[split]
      index = index_split(self._read(split), path, image_root, self.label_of_category(),
                          train=split in self.train_splits, image_path=self._image_path,
                          name=self.name)
      dropped: tuple[str, ...] = ()
      if self.check_images:
        paths = index.paths.tolist()
        bad = folder.find_bad_images(paths)
        folder.report_bad_images(self.name, bad, len(paths), skip=self.skip_bad_images,
                                 where=f" of split {split!r}")
        if bad:
          index = index.keep(np.array([p not in bad for p in paths], bool))
          dropped = tuple(bad)
      if not len(index.image_ids):
        raise base.DataNotFoundError(f"Data source {self.name!r}: split {split!r} "
                                     f"({self.split_files[split][0]}) has no images to serve.")
      self._index[split] = index
      self.skipped_images[split] = index.skipped_images
      self.dropped_boxes[split] = index.dropped_boxes
      self.dropped_images[split] = dropped
    return self._index[split]

  def num_examples(self, split: str) -> int:
    return len(self.split_index(split).image_ids)

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    index = self.split_index(split)
    start, end = base.host_range(len(index.image_ids), process_index, process_count)
    boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in index.boxes[start:end]]
    labels = [np.asarray(l, np.int32).reshape(-1) for l in index.labels[start:end]]
    lengths = [len(l) for l in labels]
    flat_boxes = np.concatenate(boxes) if boxes else np.zeros([0, 4], np.float32)
    flat_labels = np.concatenate(labels) if labels else np.zeros([0], np.int32)
    return tf.data.Dataset.from_tensor_slices(self.mark_caption_sampling({
        "image": tf.constant(index.paths[start:end].astype(str), tf.string),
        "boxes": tf.RaggedTensor.from_row_lengths(flat_boxes.reshape(-1, 4), lengths),
        "box_labels": tf.RaggedTensor.from_row_lengths(flat_labels, lengths),
        "orig_size": index.sizes[start:end],
        "image_id": index.image_ids[start:end].astype(np.int32),
    }, split, end - start))

  def decode_detection(self, example: dict) -> dict:
    image = folder.decode_image_file(example["image"])
    shape = tf.shape(image)[:2]
    check = tf.debugging.Assert(tf.reduce_all(shape == example["orig_size"]), [
        f"Data source {self.name!r}: the image file", example["image"],
        "has (height, width)", shape, "but its json entry says", example["orig_size"]])
    with tf.control_dependencies([check]):
      image = tf.identity(image)
    decoded = {"image": image, "boxes": tf.reshape(example["boxes"], [-1, 4]),
               "box_labels": example["box_labels"], "orig_size": example["orig_size"],
               "image_id": example["image_id"], "file_name": example["image"]}
    if detection.SAMPLE_CAPTION_KEY in example:
      decoded[detection.SAMPLE_CAPTION_KEY] = example[detection.SAMPLE_CAPTION_KEY]
    return decoded

  def coco_ground_truth(self, split: str) -> dict:
    index = self.split_index(split)
    dataset = self._read(split)
    served = set(index.image_ids.tolist())
    annotations = []
    for annotation in dataset.get("annotations", []):
      if annotation["image_id"] in served:
        annotation = dict(annotation)
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
          annotation["area"] = float(annotation["bbox"][2] * annotation["bbox"][3])
        annotations.append(annotation)
    return {**dataset, "images": [i for i in dataset["images"] if i["id"] in served],
            "annotations": annotations}


def require_vocab(name: str, vocab) -> str:
  if not vocab:
    raise ValueError(f"Data source {name!r} needs vocab=<path of a BERT WordPiece vocab.txt> "
                     "(bert-base-uncased's for GLIP) to tokenise the class-name prompt.")
  return vocab


def resolve_root(name: str, root, data_dir, subfolder: str, expected: str) -> str:
  """The dataset folder: `root`, else `data_dir`/`subfolder`; an error naming the source when
  neither is given or the folder is missing."""
  if root is None and data_dir is not None:
    root = os.path.join(data_dir, subfolder)
  if root is None:
    raise ValueError(f"Data source {name!r} needs root=<{expected}> or data_dir=<its parent, "
                     f"holding {subfolder}/>.")
  if not os.path.isdir(root):
    raise base.DataNotFoundError(f"Data source {name!r}: folder {root} does not exist; expected "
                                 f"{expected}.")
  return root


def coco_2017(*, data_dir: str | None = None, root: str | None = None, vocab: str | None = None,
              **kwargs) -> CocoJsonSource:
  """'coco/2017': GLIP's coco_2017_{train,val} (instances_*.json, train2017/, val2017/)."""
  name = "coco/2017"
  root = resolve_root(name, root, data_dir, "coco",
                      "the COCO folder with annotations/, train2017/, val2017/")
  files = {split: (os.path.join(root, "annotations", f"instances_{split}2017.json"),
                   os.path.join(root, f"{split}2017")) for split in ("val", "train")}
  return CocoJsonSource(files, vocab=require_vocab(name, vocab), name=name, **kwargs)


LVIS_FILES = {"val": "lvis_v1_val.json", "minival": "lvis_v1_minival_inserted_image_name.json",
              "train": "lvis_v1_train.json"}


def lvis_v1(*, data_dir: str | None = None, root: str | None = None, vocab: str | None = None,
            train_json: str | None = None, val_json: str | None = None,
            minival_json: str | None = None, **kwargs) -> CocoJsonSource:
  """'lvis/v1': LVIS v1 json files, images from the COCO 2017 folders through their coco_url."""
  name = "lvis/v1"
  root = resolve_root(name, root, data_dir, "coco",
                      "the COCO folder with annotations/lvis_v1_*.json, train2017/, val2017/")
  given = {"train": train_json, "val": val_json, "minival": minival_json}
  files = {split: (given[split] or os.path.join(root, "annotations", file_name), root)
           for split, file_name in LVIS_FILES.items()}
  return CocoJsonSource(files, vocab=require_vocab(name, vocab), name=name, lvis=True, **kwargs)


def coco_json(*, data_dir: str | None = None, vocab: str | None = None,
              dataset_name: str = "coco_json",
              train_json: str | None = None, val_json: str | None = None,
              test_json: str | None = None, image_root: str | None = None,
              train_images: str | None = None, val_images: str | None = None,
              test_images: str | None = None, **kwargs) -> CocoJsonSource:
  """'coco_json': any COCO-format json files (a custom dataset, GLIP README's custom data)."""
  name = dataset_name
  files = {}
  for split, path, images in (("val", val_json, val_images), ("test", test_json, test_images),
                              ("train", train_json, train_images)):
    if path is None:
      continue
    images = images or image_root
    if images is None:
      raise ValueError(f"Data source {name!r}: the {split} split needs {split}_images=<folder> or "
                       "image_root=<folder> (file names in the json are relative to it).")
    if data_dir is not None:
      path, images = os.path.join(data_dir, path), os.path.join(data_dir, images)
    files[split] = (path, images)
  if not files:
    raise ValueError(f"Data source {name!r} needs at least one of train_json, val_json, "
                     "test_json.")
  return CocoJsonSource(files, vocab=require_vocab(name, vocab), name=name, **kwargs)
