"""RPL's image folders: object crops cut from LVIS/COCO-format boxes, then retrieved images added.

PromptDet's regional prompt learning (RPL) trains prompts on object-centric crops and, from the
second round on, on crops plus images retrieved for each category. This module builds those
training sets as image folders (`folder.py`: root/<split>/<class>/*, classes = the sorted
sub-folders of root/train) and knows nothing about models. It follows fcjian/RPL
`tools/promptdet/save_object_crops.py`, `sample_image.py` and `align_val_with_train.py`:

  * crops (`large_enough`, `crop_box`): an annotation's box [x, y, w, h] is skipped when
    w·h < `min_area` (20 px²; the original calls it "min size", it is an area), otherwise
    enlarged by `scaling_factor` s (1.0) of its width and height on every side,
    [x − s·w, y − s·h, x + (1+s)·w, y + (1+s)·h], truncated to int (`int()`, towards zero) and
    clipped to the image; the image path is the last two parts of the image's `coco_url` (LVIS:
    'train2017/000000391895.jpg') under the image root, or its `file_name` when there is none;
  * category folders (`category_folder`): LVIS names, with the two renames the RPL README applies
    by hand, "speaker_(stero_equipment)" -> "speaker_(stereo_equipment)" and
    "monitor_(computer_equipment) computer_monitor" -> "..._computer_monitor" (every space becomes
    '_', which also covers COCO names such as "traffic light");
  * sampling: per category, `shots` crops drawn at random (200 in RPL; all when fewer), seeded;
  * val aligned with train: val keeps only the categories train has (labels are the sorted train
    folders in every split, so the splits agree);
  * `classnames.txt` in the root: "folder name_which_is_description" per train class (the
    `lvis_and_laion_data/imagenet/classnames.txt` of the original), from a category file;
  * next round (`add_retrieved_images`): the previous round's folders plus, per train category,
    its top-K retrieved images in rank order (the original's `sample_image.py --laion-image`).

Category files (`read_category_file`): lines "folder name_which_is_description" (RPL's
`lvis_category_and_description.txt`, 1203 lines in LVIS order) or just "name_which_is_description";
'_' reads as a space in the prompt text.

Deliberate deviations: crops are named '<annotation id>_<image file name>' (the original numbers
them within each of its worker threads, which can collide), only the sampled annotations are cut
(the original cuts every box, then links a random 200), sampling is seeded (the original's
`random.shuffle` is not), and a train category without val crops gets no empty val folder (the
original creates one; the folder source takes every split's labels from train's folders anyway).
Outputs are written to a temporary folder that is renamed at the end; files are symlinked (as the
original does) or, with `copy=True`, copied.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import random
import shutil
import tempfile
from typing import Iterable, Sequence

from PIL import Image

from input_pipeline import base
from input_pipeline.folder import IMAGE_EXTENSIONS

DESCRIPTION_SEPARATOR = "_which_is_"
CLASSNAMES_FILE = "classnames.txt"
# The RPL README's renames of LVIS category folders (after spaces became '_').
CATEGORY_NAME_FIXES = {"speaker_(stero_equipment)": "speaker_(stereo_equipment)"}
RETRIEVED_PREFIX = "retrieved_"


def category_folder(name: str) -> str:
  """The folder of an LVIS/COCO category: spaces -> '_', then `CATEGORY_NAME_FIXES`."""
  folder = "_".join(name.split())
  folder = CATEGORY_NAME_FIXES.get(folder, folder)
  if not folder or "/" in folder or folder in (".", ".."):
    raise ValueError(f"Category name {name!r} cannot be a folder name.")
  return folder


def read_category_file(path: str) -> dict[str, str]:
  """{folder: 'name_which_is_description'} in file order (see the module docstring)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Category file {path!r} does not exist; expected lines "
                            f"'folder name{DESCRIPTION_SEPARATOR}description'.")
  entries = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      entry = fields[-1]
      name, separator, description = entry.partition(DESCRIPTION_SEPARATOR)
      if len(fields) > 2 or not separator or not name or not description:
        raise ValueError(f"{path}:{number}: expected 'folder name{DESCRIPTION_SEPARATOR}"
                         f"description' (no spaces inside either field); got {line.strip()!r}.")
      folder = fields[0] if len(fields) == 2 else name
      if folder in entries:
        raise ValueError(f"{path}:{number}: category {folder!r} is listed twice.")
      entries[folder] = entry
  if not entries:
    raise ValueError(f"Category file {path!r} has no categories.")
  return entries


def large_enough(bbox: Sequence[float], min_area: float) -> bool:
  """Whether COCO box [x, y, w, h] is kept: w·h >= min_area."""
  return bbox[2] * bbox[3] >= min_area


def crop_box(bbox: Sequence[float], width: int, height: int, *,
             scaling_factor: float = 1.0) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of the enlarged crop of COCO box [x, y, w, h], clipped to a
  width x height image."""
  x, y, w, h = bbox
  s = scaling_factor
  return (max(0, int(x - s * w)), max(0, int(y - s * h)),
          min(width, int(x + (1 + s) * w)), min(height, int(y + (1 + s) * h)))


def image_path(image: dict, image_root: str) -> str:
  """Where an annotation file's image lies: `coco_url`'s last two parts, else `file_name`."""
  if image.get("coco_url"):
    relative = os.path.join(*image["coco_url"].split("/")[-2:])
  elif image.get("file_name"):
    relative = image["file_name"]
  else:
    raise ValueError(f"Image {image.get('id')!r} has neither 'coco_url' nor 'file_name'.")
  return os.path.join(image_root, relative)


def load_annotations(path: str):
  """A pycocotools `COCO` of an LVIS/COCO-format detection file (its progress prints muted)."""
  from pycocotools.coco import COCO
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Annotation file {path!r} does not exist.")
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(path)
  for key in ("images", "annotations", "categories"):
    if key not in coco.dataset:
      raise ValueError(f"Annotation file {path!r} has no {key!r} list (COCO/LVIS format: "
                       "images, annotations, categories).")
  return coco


def sample_annotations(coco, *, shots: int, seed: int, min_area: float) -> dict[str, list[dict]]:
  """{category folder: up to `shots` annotations}, drawn per category (sorted folders, ids sorted
  first) by `random.Random(seed)` among the boxes that are not too small."""
  if shots < 1:
    raise ValueError(f"shots must be >= 1; got {shots}.")
  folders = {cat_id: category_folder(cat["name"]) for cat_id, cat in coco.cats.items()}
  per_category = collections.defaultdict(list)
  for ann in coco.anns.values():
    if ann["category_id"] not in folders:
      raise ValueError(f"Annotation {ann['id']} has category_id {ann['category_id']}, which is "
                       f"not among the file's categories.")
    if ann["image_id"] not in coco.imgs:
      raise ValueError(f"Annotation {ann['id']} refers to image {ann['image_id']}, which is not "
                       f"among the file's images.")
    if large_enough(ann["bbox"], min_area):
      per_category[folders[ann["category_id"]]].append(ann)
  rng = random.Random(seed)
  chosen = {}
  for folder in sorted(per_category):
    anns = sorted(per_category[folder], key=lambda a: a["id"])
    rng.shuffle(anns)
    chosen[folder] = sorted(anns[:shots], key=lambda a: a["id"])
  return chosen


def write_crops(coco, chosen: dict[str, list[dict]], image_root: str, split_dir: str, *,
                scaling_factor: float) -> int:
  """Cuts the `chosen` annotations into split_dir/<folder>/<ann id>_<image file>; returns the
  number of crops. Every image is checked first: missing ones raise naming them."""
  paths = {ann["image_id"]: image_path(coco.imgs[ann["image_id"]], image_root)
           for anns in chosen.values() for ann in anns}
  missing = sorted(p for p in set(paths.values()) if not os.path.isfile(p))
  if missing:
    raise base.DataNotFoundError(
        f"{len(missing)} of the {len(set(paths.values()))} images the annotations need are "
        f"missing under image root {image_root!r}, e.g. {missing[:3]}.")
  count = 0
  by_image = collections.defaultdict(list)
  for folder, anns in chosen.items():
    for ann in anns:
      by_image[ann["image_id"]].append((folder, ann))
  for image_id in sorted(by_image):
    with Image.open(paths[image_id]) as image:
      for folder, ann in by_image[image_id]:
        box = crop_box(ann["bbox"], image.width, image.height, scaling_factor=scaling_factor)
        os.makedirs(os.path.join(split_dir, folder), exist_ok=True)
        name = f"{ann['id']}_{os.path.basename(paths[image_id])}"
        image.crop(box).save(os.path.join(split_dir, folder, name))
        count += 1
  return count


def default_mode(directory: bool) -> int:
  """The permissions a plain open()/mkdir() would give under the current umask (mkstemp and
  mkdtemp make private files, 0600 and 0700)."""
  umask = os.umask(0)
  os.umask(umask)
  return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def staged_folder(out_root: str):
  """Yields a temporary folder next to `out_root`, renamed to `out_root` when the block ends
  without error (and removed when it fails). Refuses an existing `out_root`."""
  out_root = os.path.abspath(out_root)
  if os.path.exists(out_root):
    raise FileExistsError(f"Output folder {out_root!r} already exists; remove it or pick "
                          "another (each round writes a new folder).")
  parent = os.path.dirname(out_root)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_root)}.partial-")
  try:
    yield staging
    os.chmod(staging, default_mode(directory=True))
    os.rename(staging, out_root)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def write_classnames(root: str, folders: Iterable[str], categories: dict[str, str],
                     source: str) -> None:
  """root/classnames.txt: 'folder name_which_is_description' for each of `folders`."""
  unknown = [f for f in folders if f not in categories]
  if unknown:
    raise ValueError(f"Categories {unknown[:5]} ({len(unknown)} in all) are not in the category "
                     f"file {source!r} ({len(categories)} categories, e.g. "
                     f"{list(categories)[:3]}); add 'folder name{DESCRIPTION_SEPARATOR}"
                     "description' lines for them.")
  with open(os.path.join(root, CLASSNAMES_FILE), "w", encoding="utf-8") as f:
    f.writelines(f"{folder} {categories[folder]}\n" for folder in folders)


def make_crop_dataset(out_root: str, *, annotations: str, image_root: str,
                      val_annotations: str = "", categories: str = "", shots: int = 200,
                      val_shots: int = 200, seed: int = 0, scaling_factor: float = 1.0,
                      min_area: float = 20.0) -> dict[str, int]:
  """Writes RPL's first-round image folders: out_root/train/<category>/ with `shots` crops per
  category, out_root/val/<category>/ (when `val_annotations`) for the train categories only, and
  out_root/classnames.txt (when `categories`, a category file). Returns crops per split."""
  known = read_category_file(categories) if categories else None
  counts = {}
  with staged_folder(out_root) as staging:
    coco = load_annotations(annotations)
    chosen = sample_annotations(coco, shots=shots, seed=seed, min_area=min_area)
    if not chosen:
      raise ValueError(f"Annotation file {annotations!r} has no box of at least {min_area} px².")
    if known is not None:  # fail before cutting anything
      write_classnames(staging, sorted(chosen), known, categories)
    counts["train"] = write_crops(coco, chosen, image_root, os.path.join(staging, "train"),
                                  scaling_factor=scaling_factor)
    if val_annotations:
      val_coco = load_annotations(val_annotations)
      val_chosen = sample_annotations(val_coco, shots=val_shots, seed=seed, min_area=min_area)
      val_chosen = {k: v for k, v in val_chosen.items() if k in chosen}
      counts["val"] = write_crops(val_coco, val_chosen, image_root, os.path.join(staging, "val"),
                                  scaling_factor=scaling_factor)
  return counts


def _place(source: str, target: str, copy: bool) -> None:
  if copy:
    shutil.copyfile(source, target)
  else:
    os.symlink(os.path.abspath(source), target)


def _image_files(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def read_ranked_list(path: str) -> list[str]:
  """The image paths of a retrieval list (one per line, rank order), deduplicated."""
  with open(path, encoding="utf-8") as f:
    return list(dict.fromkeys(line.strip() for line in f if line.strip()))


def add_retrieved_images(data_root: str, retrieved: str, out_root: str, *, top_k: int = 200,
                         copy: bool = False) -> dict[str, int]:
  """The next round's folders: everything of `data_root` (splits and classnames.txt) plus, for
  each train category with a list `retrieved/<category>.txt`, its first `top_k` images as
  out_root/train/<category>/retrieved_<rank>.<ext>. Returns the images added per category."""
  train = os.path.join(data_root, "train")
  if not os.path.isdir(train):
    raise base.DataNotFoundError(f"{train!r} does not exist; data_root must hold the current "
                                 "round's train/<category>/ folders.")
  if not os.path.isdir(retrieved):
    raise base.DataNotFoundError(f"Retrieval folder {retrieved!r} does not exist.")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1; got {top_k}.")
  classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
  lists = {c: os.path.join(retrieved, f"{c}.txt") for c in classes}
  lists = {c: p for c, p in lists.items() if os.path.isfile(p)}
  if not lists:
    raise base.DataNotFoundError(f"{retrieved!r} has no <category>.txt list for any of the "
                                 f"{len(classes)} train categories (e.g. {classes[:3]}).")
  added = {}
  with staged_folder(out_root) as staging:
    for split in sorted(os.listdir(data_root)):
      source = os.path.join(data_root, split)
      if not os.path.isdir(source):
        if split == CLASSNAMES_FILE:
          shutil.copyfile(source, os.path.join(staging, split))
        continue
      for category in sorted(os.listdir(source)):
        os.makedirs(os.path.join(staging, split, category))
        for name in _image_files(os.path.join(source, category)):
          _place(os.path.join(source, category, name), os.path.join(staging, split, category,
                                                                     name), copy)
    for category, path in lists.items():
      ranked = read_ranked_list(path)[:top_k]
      for rank, image in enumerate(ranked):
        extension = os.path.splitext(image)[1].lower()
        if extension not in IMAGE_EXTENSIONS or not os.path.isfile(image):
          raise base.DataNotFoundError(f"{path}: retrieved image {image!r} (rank {rank}) does not "
                                       f"exist or is not a {'/'.join(IMAGE_EXTENSIONS)} file.")
        target = f"{RETRIEVED_PREFIX}{rank:06d}{extension}"
        _place(image, os.path.join(staging, "train", category, target), copy)
      added[category] = len(ranked)
  return added
