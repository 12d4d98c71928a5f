"""The 10 fine-grained sets of TPT and RLCF, in CoOp's folder layout with CoOp's fixed splits.

Follows KaiyangZhou/CoOp `DATASETS.md` and `datasets/*.py`: the folders, image folders and split
files, `datasets/oxford_pets.py` `read_split` (a split file is json {'train', 'val', 'test'}, each
a list of [image path relative to the image folder, label, class name]), `datasets/
fgvc_aircraft.py` (txt lists instead of a split file) and Dassl's `DatasetBase.get_lab2cname` (the
class names). TPT reads the same split files and lists (azshue/TPT `data/fewshot_datasets.py`,
`data/datautils.py`; TPT paper §4.1) and evaluates on 'test'.
`get_source('coop/<name>', root=<the dataset folder>)`, or data_dir=<CoOp's $DATA>:

  name            folder          images under           split file                         C
  oxford_flowers  oxford_flowers  jpg                    split_zhou_OxfordFlowers.json      102
  dtd             dtd             images                 split_zhou_DescribableTextures.json 47
  oxford_pets     oxford_pets     images                 split_zhou_OxfordPets.json         37
  stanford_cars   stanford_cars   (the folder)           split_zhou_StanfordCars.json       196
  ucf101          ucf101          UCF-101-midframes      split_zhou_UCF101.json             101
  caltech101      caltech-101     101_ObjectCategories   split_zhou_Caltech101.json         100
  food101         food-101        images                 split_zhou_Food101.json            101
  sun397          sun397          SUN397                 split_zhou_SUN397.json             397
  fgvc_aircraft   fgvc_aircraft   images                 variants.txt, images_variant_*.txt 100
  eurosat         eurosat         2750                   split_zhou_EuroSAT.json            10

(UCF101 is CoOp's middle frame of each video.) Splits 'train', 'val', 'test', in the files' order.

`class_names`: class c is named as the split file names it (the same name in every entry with
label c, in all three splits; labels must be 0..C-1), kept as stored: CoOp's prompt learner,
like `jaxprompt.prompts.tpt.hard_prompt_ids`, turns '_' into ' ' when it writes a prompt. TPT
hard-codes the same lists in `data/cls_to_names.py`: CoOp's code wrote its renamings (EuroSAT's
'Annual Crop Land', ..., Caltech101's 'face', 'leopard', ...) into the split files, and
OxfordPets' breeds are lower-cased there. FGVC-Aircraft: class c is
line c of variants.txt; images_variant_<split>.txt lines are '<image id> <variant name>', the
image images/<image id>.jpg.

The class count is checked against the table (check_num_classes=False for subsets and tests);
every listed image must exist and decode (`file_list.FileListSource`: skip_bad_images,
check_images). A missing file or a malformed split file is an error naming the file.

Deliberate deviations:
  * TPT's folder names differ (`ID_to_DIRNAME`, e.g. 'Flower102', 'OxfordPets') and for most
    sets TPT's folder is the image folder itself; we follow CoOp's documented layout. The split
    files, hence the examples and labels, are the same.
  * Dassl (KaiyangZhou/Dassl.pytorch `DatasetBase.get_lab2cname`) names the classes from the
    train entries alone; here every entry counts, and two names for one label are an error.
  * CoOp's few-shot subsets (num_shots) are not offered here.
"""
from __future__ import annotations

import dataclasses
import json
import os

from input_pipeline import base, file_list

COOP_SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class CoopDataset:
  folder: str       # CoOp's folder under $DATA
  image_dir: str    # image paths are relative to <folder>/<image_dir> ('' = the folder)
  split_file: str   # CoOp's split json; '' = FGVC-Aircraft's txt lists
  num_classes: int


COOP_DATASETS: dict[str, CoopDataset] = {
    "oxford_flowers": CoopDataset("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
    "dtd": CoopDataset("dtd", "images", "split_zhou_DescribableTextures.json", 47),
    "oxford_pets": CoopDataset("oxford_pets", "images", "split_zhou_OxfordPets.json", 37),
    "stanford_cars": CoopDataset("stanford_cars", "", "split_zhou_StanfordCars.json", 196),
    "ucf101": CoopDataset("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101),
    "caltech101": CoopDataset("caltech-101", "101_ObjectCategories",
                              "split_zhou_Caltech101.json", 100),
    "food101": CoopDataset("food-101", "images", "split_zhou_Food101.json", 101),
    "sun397": CoopDataset("sun397", "SUN397", "split_zhou_SUN397.json", 397),
    "fgvc_aircraft": CoopDataset("fgvc_aircraft", "images", "", 100),
    "eurosat": CoopDataset("eurosat", "2750", "split_zhou_EuroSAT.json", 10),
}

Entry = tuple[str, int, str]  # (image path relative to the image folder, label, class name)


def _require_file(path: str, name: str, what: str) -> None:
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f"Data source {name!r}: {path} does not exist; expected {what} "
                                 "(KaiyangZhou/CoOp DATASETS.md).")


def read_split_file(path: str, name: str) -> dict[str, list[Entry]]:
  """{split: [(image path, label, class name)]} from a CoOp split json, with clear errors."""
  _require_file(path, name, "CoOp's split file")
  with open(path) as f:
    try:
      content = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Data source {name!r}: {path} is not valid json: {e}") from e
  if not isinstance(content, dict) or not all(isinstance(content.get(s), list)
                                              for s in COOP_SPLITS):
    found = sorted(content) if isinstance(content, dict) else type(content).__name__
    raise ValueError(f"Data source {name!r}: {path} must be a json object with the lists "
                     f"{', '.join(COOP_SPLITS)}; found {found}.")
  splits = {}
  for split in COOP_SPLITS:
    entries = content[split]
    for i, entry in enumerate(entries):
      if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], int) and not isinstance(entry[1], bool)
              and isinstance(entry[2], str)):
        raise ValueError(f"Data source {name!r}: {path} {split}[{i}] is {entry!r}; expected "
                         "[image path, integer label, class name].")
    splits[split] = [tuple(entry) for entry in entries]
  return splits


def class_names_of(splits: dict[str, list[Entry]], listed_in: str, name: str) -> tuple[str, ...]:
  """The class names in label order, as the entries name them (labels must be 0..C-1)."""
  names = {}
  for split, entries in splits.items():
    for image, label, class_name in entries:
      if names.setdefault(label, class_name) != class_name:
        raise ValueError(f"Data source {name!r}: {listed_in} names class {label} both "
                         f"{names[label]!r} and {class_name!r} ({split}: {image}).")
  if not names:
    raise ValueError(f"Data source {name!r}: {listed_in} lists no images.")
  missing = sorted(set(range(len(names))) - set(names))
  if missing:
    raise ValueError(f"Data source {name!r}: the labels in {listed_in} are {min(names)}.."
                     f"{max(names)}; expected every label 0..{len(names) - 1} (missing "
                     f"{missing[:5]}).")
  return tuple(names[label] for label in range(len(names)))


def read_aircraft_lists(root: str, name: str) -> dict[str, list[Entry]]:
  """{split: [(image path, label, variant)]} from FGVC-Aircraft's variants.txt and
  images_variant_<split>.txt (CoOp `datasets/fgvc_aircraft.py`)."""
  variants_path = os.path.join(root, "variants.txt")
  _require_file(variants_path, name, "FGVC-Aircraft's variants.txt (one class name a line)")
  with open(variants_path) as f:
    variants = [line.strip() for line in f if line.strip()]
  label_of = {variant: label for label, variant in enumerate(variants)}
  if len(label_of) != len(variants):
    raise ValueError(f"Data source {name!r}: {variants_path} lists a class name twice.")
  splits = {}
  for split in COOP_SPLITS:
    path = os.path.join(root, f"images_variant_{split}.txt")
    _require_file(path, name, "FGVC-Aircraft's images_variant_<split>.txt lists")
    entries = []
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in label_of:
          raise ValueError(f"Data source {name!r}: {path} line {line_number} gives image "
                           f"{image_id!r} the variant {variant!r}, which is not in "
                           f"{variants_path}.")
        entries.append((f"{image_id}.jpg", label_of[variant], variant))
    splits[split] = entries
  return splits


class CoopSource(file_list.FileListSource):
  """One fine-grained set in CoOp's layout (see module docstring)."""

  def __init__(self, dataset: str, *, root: str | None = None, data_dir: str | None = None,
               check_num_classes: bool = True, name: str | None = None,
               **image_checks):  # skip_bad_images, check_images (file_list.FileListSource)
    if dataset not in COOP_DATASETS:
      raise ValueError(f"Unknown CoOp dataset {dataset!r}; valid: {', '.join(COOP_DATASETS)}.")
    spec, name = COOP_DATASETS[dataset], name or f"coop/{dataset}"
    holds = (f"{spec.split_file} and the images" if spec.split_file else
             "variants.txt, images_variant_<split>.txt and images/")
    self.root = root = file_list.dataset_folder(name, root, data_dir, spec.folder, holds=holds)
    if spec.split_file:
      listed = os.path.join(root, spec.split_file)
      splits = read_split_file(listed, name)
      listed_in = {split: f"{listed} ({split})" for split in COOP_SPLITS}
    else:
      splits = read_aircraft_lists(root, name)
      listed = os.path.join(root, "images_variant_<split>.txt")
      listed_in = {split: os.path.join(root, f"images_variant_{split}.txt")
                   for split in COOP_SPLITS}
    self.class_names = class_names_of(splits, listed, name)
    if check_num_classes and len(self.class_names) != spec.num_classes:
      raise ValueError(f"Data source {name!r}: {listed} has {len(self.class_names)} classes, "
                       f"expected {spec.num_classes}; pass check_num_classes=False for a subset.")
    image_root = os.path.join(root, spec.image_dir)
    files = {split: ([os.path.join(image_root, image) for image, _, _ in entries],
                     [label for _, label, _ in entries]) for split, entries in splits.items()}
    super().__init__(name, len(self.class_names), files, listed_in, **image_checks)
