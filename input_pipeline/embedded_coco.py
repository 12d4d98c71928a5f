"""Generated LVIS-format detection data for RPL's demo: scenes with boxes, a category file, a pool.

Nothing can be downloaded here, so RPL's pipeline (`jaxprompt/rpl_pipeline.py`) runs out of the box
on data the project writes itself, shaped like what the original reads:

  * images/{train2017,val2017}/<12-digit id>.png: 64×64 scenes on a dark noisy background with one
    to three objects, each a coloured square or disc (`CATEGORIES`, 8 = 4 colours × 2 shapes),
    and now and then a tiny one (under RPL's 20 px² minimum, so it is skipped);
  * annotations/lvis_demo_{train,val}.json: COCO/LVIS format (images with `coco_url`, whose last
    two parts locate the file, as in LVIS; annotations with [x, y, w, h] boxes; categories).
    Like LVIS's `*_seen.json`, only the 6 base categories (`BASE_INDS`) are annotated and appear;
  * category_and_description.txt: "name name_which_is_description" for all 8 categories, in
    category order (RPL's `lvis_category_and_description.txt`), and base_inds.txt (", "-separated,
    as `lvis_base_inds.txt`);
  * pool/<id>.png: a retrieval pool standing in for LAION, single objects of all 8 categories
    (novel ones included) plus empty distractors, named so that the name tells nothing;
    pool_labels.json maps each file to its category (null for distractors), for measuring
    retrieval.

`demo_data()` writes all of that once per user into the temp folder (generated with numpy from a
fixed seed: the same bytes everywhere) and cuts the first round's crops from it
(`object_crops.make_crop_dataset`, 16 per category for train, 8 for val), returning the paths.
Every folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np
from PIL import Image

from input_pipeline import object_crops

SCENE_SIZE = 64
COLOURS = {"blue": (45, 70, 230), "green": (40, 205, 40), "red": (225, 40, 40),
           "yellow": (230, 210, 40)}
SHAPES = {"disc": "a_round_{}_token", "square": "a_small_{}_block"}
# (name, description), sorted by name like LVIS's categories.
CATEGORIES = tuple((f"{colour}_{shape}", template.format(colour))
                   for colour in sorted(COLOURS) for shape, template in sorted(SHAPES.items()))
BASE_INDS = (0, 1, 2, 3, 4, 5)  # yellow_disc and yellow_square are novel: never annotated
SCENES = {"train2017": 72, "val2017": 24}
POOL_PER_CATEGORY, POOL_DISTRACTORS = 6, 8
TRAIN_SHOTS, VAL_SHOTS = 16, 8
VERSION = 1


@dataclasses.dataclass(frozen=True)
class DemoData:
  """Paths of the generated data (see the module docstring)."""
  root: str
  image_root: str
  annotations: str
  val_annotations: str
  categories: str
  base_inds: str
  pool: str
  pool_labels: str
  round1: str  # the first round's crop folders (train/, val/, classnames.txt)


def _draw(image: np.ndarray, category: int, box: tuple[int, int, int, int],
          rng: np.random.Generator) -> None:
  """Paints category `category` into `image` inside box (x, y, w, h), in place."""
  name = CATEGORIES[category][0]
  colour, shape = name.split("_")
  x, y, w, h = box
  yy, xx = np.mgrid[y:y + h, x:x + w]
  if shape == "disc":
    inside = ((xx + 0.5 - x - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y - h / 2) / (h / 2)) ** 2 <= 1
  else:
    inside = np.ones((h, w), bool)
  rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, size=3), 0, 255)
  image[y:y + h, x:x + w][inside] = rgb


def _background(rng: np.random.Generator, size: int = SCENE_SIZE) -> np.ndarray:
  return rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)


def _scenes(split: str, count: int, first_id: int, rng: np.random.Generator, image_dir: str):
  """Writes `count` scenes; returns their (images, annotations) json entries."""
  images, annotations = [], []
  for n in range(count):
    image_id = first_id + n
    image = _background(rng)
    for k in range(int(rng.integers(1, 4))):
      category = int(rng.choice(BASE_INDS))
      side = int(rng.integers(10, 21)) if k or n % 6 else 4  # every 6th scene: one tiny object
      w = h = side
      if CATEGORIES[category][0].endswith("square"):
        h = max(4, side - int(rng.integers(0, 4)))
      x, y = (int(v) for v in rng.integers(0, SCENE_SIZE - np.array([w, h]) + 1))
      _draw(image, category, (x, y, w, h), rng)
      annotations.append(dict(id=first_id * 10 + len(annotations), image_id=image_id,
                              category_id=category + 1, bbox=[float(x), float(y), float(w),
                                                              float(h)],
                              area=float(w * h), iscrowd=0))
    file_name = f"{image_id:012d}.png"
    Image.fromarray(image).save(os.path.join(image_dir, file_name))
    images.append(dict(id=image_id, width=SCENE_SIZE, height=SCENE_SIZE,
                       coco_url=f"http://images.cocodataset.org/{split}/{file_name}"))
  return images, annotations


def generate(root: str) -> None:
  """Writes the raw demo data (scenes, annotation files, category files, pool) into `root`."""
  rng = np.random.default_rng([2022, 9, VERSION])
  with object_crops.staged_folder(root) as staging:
    categories = [dict(id=i + 1, name=name) for i, (name, _) in enumerate(CATEGORIES)]
    os.makedirs(os.path.join(staging, "annotations"))
    for first_id, (split, count) in zip((1, 10_001), SCENES.items()):
      image_dir = os.path.join(staging, "images", split)
      os.makedirs(image_dir)
      images, annotations = _scenes(split, count, first_id, rng, image_dir)
      name = f"lvis_demo_{split.removesuffix('2017')}.json"
      with open(os.path.join(staging, "annotations", name), "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    with open(os.path.join(staging, "category_and_description.txt"), "w") as f:
      f.writelines(f"{name} {name}{object_crops.DESCRIPTION_SEPARATOR}{description}\n"
                   for name, description in CATEGORIES)
    with open(os.path.join(staging, "base_inds.txt"), "w") as f:
      f.write(", ".join(map(str, BASE_INDS)) + "\n")
    pool = os.path.join(staging, "pool")
    os.makedirs(pool)
    members = [c for c in range(len(CATEGORIES)) for _ in range(POOL_PER_CATEGORY)]
    members += [None] * POOL_DISTRACTORS
    labels = {}
    for n, index in enumerate(rng.permutation(len(members))):
      category = members[index]
      image = _background(rng)
      if category is not None:
        side = int(rng.integers(24, 41))
        x, y = (int(v) for v in rng.integers(0, SCENE_SIZE - side + 1, size=2))
        _draw(image, category, (x, y, side, side), rng)
      file_name = f"{n:06d}.png"
      Image.fromarray(image).save(os.path.join(pool, file_name))
      labels[file_name] = None if category is None else CATEGORIES[category][0]
    with open(os.path.join(staging, "pool_labels.json"), "w") as f:
      json.dump(labels, f, indent=0, sort_keys=True)


def _once(make, path: str) -> None:
  """Runs make(path) unless `path` exists; a concurrent writer that finished first wins."""
  if os.path.isdir(path):
    return
  try:
    make(path)
  except OSError:
    if not os.path.isdir(path):
      raise


def demo_data(folder: str | None = None) -> DemoData:
  """The generated data and its first-round crops in `folder` (default: this user's temp folder),
  written on first use."""
  folder = folder or os.path.join(tempfile.gettempdir(), f"jaxprompt-{os.getuid()}",
                                  f"rpl_demo_v{VERSION}")
  raw = os.path.join(folder, "raw")
  data = DemoData(
      root=raw, image_root=os.path.join(raw, "images"),
      annotations=os.path.join(raw, "annotations", "lvis_demo_train.json"),
      val_annotations=os.path.join(raw, "annotations", "lvis_demo_val.json"),
      categories=os.path.join(raw, "category_and_description.txt"),
      base_inds=os.path.join(raw, "base_inds.txt"), pool=os.path.join(raw, "pool"),
      pool_labels=os.path.join(raw, "pool_labels.json"), round1=os.path.join(folder, "round1"))
  _once(generate, raw)
  _once(lambda out: object_crops.make_crop_dataset(
      out, annotations=data.annotations, val_annotations=data.val_annotations,
      image_root=data.image_root, categories=data.categories, shots=TRAIN_SHOTS,
      val_shots=VAL_SHOTS, seed=0), data.round1)
  return data
