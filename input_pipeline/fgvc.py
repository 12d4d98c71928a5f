"""FGVC: CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars in VPT's json release.

Follows VPT's FGVC json release and its reader, KMnP/vpt `src/data/datasets/json_dataset.py`,
and SA2VP `datasets.py` (`FGVC_*` classes and `build_dataset`: folder names, modes). A dataset
folder holds `train.json`, `val.json` and `test.json`, each a dict {image path relative to the
image root: class label}, and the images:

  dataset   SA2VP folder    image root        classes   SA2VP label
  cub       CUB_200_2011    <folder>/images   200       json - 1
  nabirds   nabirds         <folder>/images   555       json as is
  flowers   OxfordFlower    <folder>          102       json - 1
  dogs      dogs            <folder>/Images   120       json - 1
  cars      cars            <folder>          196       json - 1

`get_source('fgvc/cub', root=<the dataset folder>)`, or data_dir=<the folder holding the SA2VP
folders above> (SA2VP's `./data/fgvc`).

Labels: the sorted distinct labels of train.json get ids 0..C-1 (VPT's contiguous remap), and
that one mapping is used for every split; a val/test label that train.json lacks is an error.
This equals SA2VP's `json - 1` when train.json holds 1..C and its as-is NABirds labels when
they are 0..554, and it works whatever ids the NABirds json carries.
Examples are in the json's own order (train then val for trainval).

Splits:
  train     train.json
  val       val.json (carved out of the official train set by VPT where there is no official val)
  test      test.json
  trainval  train.json + val.json
Which split trains and which evaluates is the config's choice. SA2VP's modes: `train_val`
trains on train and evaluates on val (keeping the best epoch); `trainval_test` trains on
**train only** (val is not merged in) and evaluates on test. VPT's `train.py` also trains FGVC on
train.json only (its trainval loader serves VTAB); `trainval` is offered for a final refit on
train + val, which neither original does.

Deliberate deviations:
  * VPT remaps each split with its own sorted labels (so a val/test json missing a class would
    shift the ids after it); we use train.json's mapping for every split.
  * The class count is checked against the table: a train.json with another number of distinct
    labels raises, unless check_num_classes=False (for subsets and tests), in which case
    num_classes is the number found.
"""
from __future__ import annotations

import dataclasses
import json
import os

from input_pipeline import base, file_list

FGVC_SPLITS = ("train", "val", "trainval", "test")


@dataclasses.dataclass(frozen=True)
class FgvcDataset:
  folder: str        # SA2VP's folder name under ./data/fgvc
  image_root: str    # json names are relative to <folder>/<image_root> ('' = the folder itself)
  num_classes: int


FGVC_DATASETS: dict[str, FgvcDataset] = {
    "cub": FgvcDataset("CUB_200_2011", "images", 200),
    "nabirds": FgvcDataset("nabirds", "images", 555),
    "flowers": FgvcDataset("OxfordFlower", "", 102),
    "dogs": FgvcDataset("dogs", "Images", 120),
    "cars": FgvcDataset("cars", "", 196),
}


def read_json_labels(path: str, name: str) -> list[tuple[str, int]]:
  """[(relative image name, integer label)] in the file's order, with clear errors."""
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f"Data source {name!r}: {path} does not exist; expected VPT's "
                                 "FGVC json release (train.json, val.json, test.json in the "
                                 "dataset folder).")
  with open(path) as f:
    try:
      content = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Data source {name!r}: {path} is not valid json: {e}") from e
  if not isinstance(content, dict) or not content:
    raise ValueError(f"Data source {name!r}: {path} must be a non-empty json object "
                     f"{{image name: label}}; got {str(content)[:80]!r}.")
  items = []
  for image, label in content.items():
    if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).isdigit():
      raise ValueError(f"Data source {name!r}: {path} gives {image!r} the label {label!r}; "
                       "expected a non-negative integer.")
    items.append((image, int(label)))
  return items


class FgvcSource(file_list.FileListSource):
  """One FGVC dataset from VPT's json release (see module docstring)."""

  def __init__(self, dataset: str, *, root: str | None = None, data_dir: str | None = None,
               check_num_classes: bool = True, name: str | None = None,
               **image_checks):  # skip_bad_images, check_images (file_list.FileListSource)
    if dataset not in FGVC_DATASETS:
      raise ValueError(f"Unknown FGVC dataset {dataset!r}; valid: {', '.join(FGVC_DATASETS)}.")
    spec, name = FGVC_DATASETS[dataset], name or f"fgvc/{dataset}"
    self.root = root = file_list.dataset_folder(
        name, root, data_dir, spec.folder, holds="train.json, val.json, test.json and the images")
    image_root = os.path.join(root, spec.image_root)
    jsons = {split: os.path.join(root, f"{split}.json") for split in ("train", "val", "test")}
    items = {split: read_json_labels(path, name) for split, path in jsons.items()}

    self.classes = tuple(sorted({label for _, label in items["train"]}))  # the json's label values
    if check_num_classes and len(self.classes) != spec.num_classes:
      raise ValueError(f"Data source {name!r}: {jsons['train']} has {len(self.classes)} distinct "
                       f"labels, expected {spec.num_classes}; pass check_num_classes=False for a "
                       "subset.")
    class_ids = {label: i for i, label in enumerate(self.classes)}
    files = {}
    for split, split_items in items.items():
      unknown = [(image, label) for image, label in split_items if label not in class_ids]
      if unknown:
        raise ValueError(f"Data source {name!r}: {jsons[split]} gives {unknown[0][0]!r} the label "
                         f"{unknown[0][1]}, which train.json never uses ({len(unknown)} such "
                         "images); the labels are train.json's distinct values.")
      files[split] = ([os.path.join(image_root, image) for image, _ in split_items],
                      [class_ids[label] for _, label in split_items])
    files["trainval"] = tuple(a + b for a, b in zip(files["train"], files["val"]))
    listed_in = {**jsons, "trainval": f"{jsons['train']} + {jsons['val']}"}
    super().__init__(name, len(self.classes), {s: files[s] for s in FGVC_SPLITS}, listed_in,
                     **image_checks)
