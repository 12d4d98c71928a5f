"""MS-COCO and Flickr30K on the Karpathy splits, from LAVIS's annotation files: image-text
retrieval and captioning.

Follows salesforce/LAVIS (as vendored by mzhaoshuai/RLCF `retrieval/lavis/`):
`datasets/datasets/retrieval_datasets.py` (`RetrievalDataset`, `RetrievalEvalDataset`),
`configs/datasets/coco/defaults_ret.yaml`, `defaults_cap.yaml` and
`configs/datasets/flickr30k/defaults.yaml` (file names), `processors/blip_processors.py`
(`BlipCaptionProcessor.pre_caption`, max_words 50); for captioning RLCF `caption/image_llm/
datasets/coco_cap.py` (`COCOCapDatasetForEmbedding`, `Flickr30kCapDatasetForEmbedding`) and
`caption/tools/convert_dataset_gt.py` (the references the scorer reads).

  coco_karpathy        coco_karpathy_{train,val,test}.json: 5k val and 5k test images (about 5
                       captions each; 25,010 test captions), 113k train images
  flickr30k_karpathy   flickr30k_{train,val,test}.json: 1k val and 1k test images (5 captions
                       each), 29k train images

The annotation files are json lists. val/test: one entry per image, {'image': the image's path
relative to the image root, 'caption': [its captions]}; train: one entry per (image, caption)
pair, {'image', 'caption': one string, 'image_id'}. Every entry is one example

  {'image': the path (raw) -> uint8 (H, W, 3) after `decode`, 'captions': (C,) strings}

(train: C = 1, in the file's order, as LAVIS's `RetrievalDataset` and RLCF's captioning training
set, one example per (image, caption) pair; val/test: one example per image with all its
captions, the references of captioning), with `batch_keys` {'caption_tokens': int32}: the pp spec
tokenises 'captions' (`clip_tokenize(vocab, key='captions', max_captions=C_max)`). No labels
(`num_classes` = 0). `max_captions[split]` is the most captions an image of the split has.

Captions (kwarg captions=): 'clean' (the default, retrieval) as `pre_caption` does
(`clean_caption`): lower case; each of . ! " ( ) * # : ; ~ replaced by a space; runs of two or
more whitespace characters collapsed to one space; trailing newlines and surrounding spaces
stripped; then cut to the first 50 space-separated words. 'raw' (captioning): as the json has
them, unchanged, as RLCF's captioner trains on them and the COCO scorer reads them as references
(it tokenises them itself).

Image ids (`image_ids(split)`, the keys of `references(split)` = {image id: [captions]}, what
`jaxprompt.evaluators.caption_metrics.score_captions` takes): the number that ends the image's
file name, as the originals derive them (COCO 'val2014/COCO_val2014_000000391895.jpg' -> 391895,
LAVIS `COCOCapEvalDataset`; Flickr30K 'flickr30k-images/1000092795.jpg' -> 1000092795, RLCF
`Flickr30kCapDatasetForEmbedding`); kept host-side (Flickr30K ids overflow int32). A file name
without such a number is an error when the ids are asked for.

Files: kwargs root=<the folder holding the annotation jsons> or data_dir=<its parent> with the
folder named coco / flickr30k; image_root=<the folder the 'image' paths are relative to> (default:
root); annotations={split: path} to name other json files; splits=(...) to read only some splits
(default: every split whose json exists). Checked when the source is built: a missing annotation
file or image is a `base.DataNotFoundError` naming it (and, for images, the json listing them).
`CaptionedImagesSource` is the part that NoCaps (`nocaps.py`) shares.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import base, file_list, folder

MAX_WORDS = 50  # `BlipCaptionProcessor(max_words=50)`
# name -> (folder name under data_dir, annotation file per split)
DATASETS = {
    "coco_karpathy": ("coco", {s: f"coco_karpathy_{s}.json" for s in ("train", "val", "test")}),
    "flickr30k_karpathy": ("flickr30k", {s: f"flickr30k_{s}.json"
                                         for s in ("train", "val", "test")}),
}
CAPTION_MODES = ("clean", "raw")  # retrieval: LAVIS's pre_caption; captioning: as in the json
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_WHITESPACE_RUNS = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = MAX_WORDS) -> str:
  """LAVIS's `pre_caption` (module docstring)."""
  caption = _PUNCTUATION.sub(" ", caption.lower())
  caption = _WHITESPACE_RUNS.sub(" ", caption).rstrip("\n").strip(" ")
  words = caption.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else caption


def read_annotations(path: str) -> list[tuple[str, list[str]]]:
  """[(image path relative to the image root, [raw captions])] of a LAVIS retrieval json."""
  try:
    with open(path, encoding="utf-8") as f:
      entries = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid json ({e}).") from None
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"{path}: expected a non-empty json list of {{'image': path, 'caption': "
                     f"[captions] or a caption}}; got {type(entries).__name__}.")
  examples = []
  for i, entry in enumerate(entries):
    captions = entry.get("caption") if isinstance(entry, dict) else None
    captions = [captions] if isinstance(captions, str) else captions
    if (not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or
        not isinstance(captions, list) or not captions or
        not all(isinstance(c, str) for c in captions)):
      raise ValueError(f"{path}: entry {i} must be {{'image': a relative path, 'caption': a "
                       f"caption or a non-empty list of captions}}; got {entry!r:.200}.")
    examples.append((entry["image"], captions))
  return examples


def image_id_from_path(path: str) -> Optional[int]:
  """The number that ends the file name without its extension, or None (module docstring)."""
  match = _TRAILING_NUMBER.search(os.path.splitext(os.path.basename(path))[0])
  return int(match.group(1)) if match else None


def references_by_image(image_ids: Sequence[int],
                        captions: Sequence[Sequence[str]]) -> dict[int, list[str]]:
  """{image id: its captions}, in order; examples of the same image (train pairs) merged."""
  references: dict[int, list[str]] = {}
  for image_id, texts in zip(image_ids, captions):
    references.setdefault(image_id, []).extend(texts)
  return references


class CaptionedImagesSource(base.DataSource):
  """Image files, each example with its captions and an image id (module docstring).

  examples: {split: (image paths, [[captions] per example], [image id or None per example])};
  listed_in: {split: the file that lists them}, for the errors."""

  num_classes = 0
  batch_keys = {"caption_tokens": tf.int32,
                "caption_ids": tf.int32}  # captioning: `opt_tokenize`

  def __init__(self, name: str, examples: Mapping[str, tuple], listed_in: Mapping[str, str]):
    self.name, self.splits = name, tuple(examples)
    self._examples = {split: (np.array(paths, dtype=object), captions, ids)
                      for split, (paths, captions, ids) in examples.items()}
    self.max_captions = {split: max(len(c) for c in captions)
                         for split, (_, captions, _) in examples.items()}
    file_list.check_files_exist(
        name, {split: (paths, []) for split, (paths, _, _) in examples.items()}, listed_in)
    self.listed_in = dict(listed_in)

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return len(self._examples[split][0])

  def captions(self, split: str) -> list[list[str]]:
    """The captions of every example of `split`, in order."""
    self.check_split(split)
    return self._examples[split][1]

  def image_ids(self, split: str) -> list[int]:
    """The image id of every example of `split`, in order (module docstring)."""
    self.check_split(split)
    paths, _, ids = self._examples[split]
    if None in ids:
      path = paths[ids.index(None)]
      raise ValueError(f"Data source {self.name!r}: image {path} (listed in "
                       f"{self.listed_in[split]}) has no image id: its file name does not end "
                       "with a number.")
    return list(ids)

  def references(self, split: str) -> dict[int, list[str]]:
    """{image id: its captions} of `split`, the references of the caption scorer."""
    return references_by_image(self.image_ids(split), self.captions(split))

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    paths, captions, _ = self._examples[split]
    start, end = base.host_range(len(paths), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(paths[start:end].astype(str)),
        "captions": tf.ragged.constant(captions[start:end], dtype=tf.string)})

  def decode(self, example: dict) -> dict:
    return {**example, "image": folder.decode_image_file(example["image"])}


class KarpathySource(CaptionedImagesSource):
  """LAVIS's Karpathy-split jsons: images on disk with their captions (module docstring)."""

  def __init__(self, name: str, annotations: Mapping[str, str], image_root: str,
               captions: str = "clean"):
    if captions not in CAPTION_MODES:
      raise ValueError(f"Data source {name!r}: captions={captions!r}; expected 'clean' (LAVIS's "
                       "pre_caption, for retrieval) or 'raw' (as in the json, for captioning).")
    self.image_root, self.caption_mode = image_root, captions
    self.annotations = dict(annotations)
    examples = {}
    for split, path in annotations.items():
      entries = read_annotations(path)
      paths = [os.path.join(image_root, image) for image, _ in entries]
      texts = [raw if captions == "raw" else [clean_caption(c) for c in raw]
               for _, raw in entries]
      examples[split] = (paths, texts, [image_id_from_path(p) for p in paths])
    super().__init__(name, examples, self.annotations)


def make_source(name: str, data_dir: Optional[str] = None, *, root: Optional[str] = None,
                image_root: Optional[str] = None,
                annotations: Optional[Mapping[str, str]] = None,
                splits: Optional[Sequence[str]] = None,
                captions: str = "clean") -> KarpathySource:
  """`coco_karpathy` or `flickr30k_karpathy` (module docstring)."""
  folder_name, file_names = DATASETS[name]
  given = dict(annotations or {})
  unknown = sorted(set(given) - set(file_names))
  if unknown:
    raise ValueError(f"Data source {name!r}: annotations for unknown split(s) {unknown}; its "
                     f"splits are {list(file_names)}.")
  if root is not None or data_dir is not None or not given:  # else: only the files given
    root = file_list.dataset_folder(name, root, data_dir, folder_name,
                                    holds=", ".join(file_names.values()))
  paths = {split: given[split] if split in given else os.path.join(root, file_names[split])
           for split in file_names if split in given or root is not None}
  if splits is None:
    splits = [s for s in paths if os.path.isfile(paths[s])]
    if not splits:
      raise base.DataNotFoundError(f"Data source {name!r}: none of its annotation files exists: "
                                   f"{', '.join(paths.values())}.")
  for split in splits:
    if split not in file_names:
      raise ValueError(f"Data source {name!r}: unknown split {split!r}; valid splits: "
                       f"{list(file_names)}.")
    if split not in paths:
      raise ValueError(f"Data source {name!r}: split {split!r} has no annotation file; pass "
                       f"root=<the folder holding {file_names[split]}> or annotations="
                       f"{{{split!r}: <its path>}}.")
    if not os.path.isfile(paths[split]):
      raise base.DataNotFoundError(f"Data source {name!r}: annotation file {paths[split]} of "
                                   f"split {split!r} does not exist.")
  image_root = image_root or root
  if image_root is None or not os.path.isdir(image_root):
    raise base.DataNotFoundError(f"Data source {name!r}: image folder {image_root} does not "
                                 "exist; pass image_root=<the folder the json's image paths are "
                                 "relative to>.")
  return KarpathySource(name, {split: paths[split] for split in splits}, image_root, captions)


# Name -> factory(data_dir=None, **kwargs), for `input_pipeline.SOURCES`.
SOURCES = {name: functools.partial(make_source, name) for name in DATASETS}
