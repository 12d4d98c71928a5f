"""NoCaps validation (Agrawal et al., ICCV 2019) for captioning, whole and by domain.

Follows mzhaoshuai/RLCF `caption/tools/convert_nocaps_gt.py` (the per-domain split of
`nocaps_val_4500_captions.json` by each image's 'domain') and `caption/image_llm/datasets/
coco_cap.py` `NocapsCapDatasetForEmbedding` (one example per image; the image id is the json's);
RLCF's cross-domain captioning (COCO -> NoCaps val: in-domain 417, near-domain 2,670,
out-domain 1,413 images, each domain scored on its own, `caption/scripts/tta_*_c2n.sh`).

The annotation file is NoCaps' own COCO-style json: {'images': [{'id', 'file_name', 'domain':
'in-domain' | 'near-domain' | 'out-domain', ...}], 'annotations': [{'image_id', 'caption', ...}]}
(10 captions per image). Splits: 'val' (all 4,500 images) and one per domain, named as the
domain ('in-domain', 'near-domain', 'out-domain'), each in the file's image order. One example
per image, as `karpathy.CaptionedImagesSource`:

  {'image': the path -> uint8 (H, W, 3) after `decode`, 'captions': (C,) strings}

with its captions as in the file (the references the COCO scorer tokenises itself), in the
file's annotation order; `image_ids(split)` are the json's ids, `references(split)` = {image id:
captions}, `domains(split)` each example's domain. No test split: its references are not public.

Files: kwargs root=<the folder holding nocaps_val_4500_captions.json> or data_dir=<its parent>
with the folder named nocaps; image_root=<the folder of the validation images> (default
root/val, where RLCF's scripts keep them); annotations=<another path to the json>. Checked when
the source is built: a missing file is a `base.DataNotFoundError` naming it; an image without
captions or with an unknown domain, or a caption of an unknown image, a ValueError naming it.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from input_pipeline import base, file_list, karpathy

NAME = "nocaps"
ANNOTATION_FILE = "nocaps_val_4500_captions.json"
DOMAINS = ("in-domain", "near-domain", "out-domain")


def read_nocaps(path: str) -> list[tuple[str, list[str], int, str]]:
  """[(file name, [captions], image id, domain)] per image of a NoCaps json, in its order."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid json ({e}).") from None
  if (not isinstance(data, dict) or not isinstance(data.get("images"), list) or
      not isinstance(data.get("annotations"), list) or not data["images"]):
    raise ValueError(f"{path}: expected NoCaps' json {{'images': [...], 'annotations': [...]}} "
                     f"with at least one image; got {str(data)[:200]}.")
  captions: dict[int, list[str]] = {}
  for i, image in enumerate(data["images"]):
    if (not isinstance(image, dict) or not isinstance(image.get("id"), int) or
        not isinstance(image.get("file_name"), str) or image.get("domain") not in DOMAINS):
      raise ValueError(f"{path}: image {i} must be {{'id': int, 'file_name': str, 'domain': one "
                       f"of {DOMAINS}, ...}}; got {image!r:.200}.")
    captions[image["id"]] = []
  for i, annotation in enumerate(data["annotations"]):
    image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
    if image_id not in captions or not isinstance(annotation.get("caption"), str):
      raise ValueError(f"{path}: annotation {i} must be {{'image_id': the id of a listed image, "
                       f"'caption': str, ...}}; got {annotation!r:.200}.")
    captions[image_id].append(annotation["caption"])
  empty = [image_id for image_id, texts in captions.items() if not texts]
  if empty:
    raise ValueError(f"{path}: image id(s) {empty[:5]} have no captions (empty reference list; "
                     f"{len(empty)} image(s) in all).")
  return [(image["file_name"], captions[image["id"]], image["id"], image["domain"])
          for image in data["images"]]


class NocapsSource(karpathy.CaptionedImagesSource):
  """NoCaps val and its domains: images on disk with their reference captions (module
  docstring)."""

  def __init__(self, annotations: str, image_root: str):
    self.annotations, self.image_root = annotations, image_root
    entries = read_nocaps(annotations)
    self._domains = {}
    examples = {}
    for split in ("val", *DOMAINS):  # a domain without images (a partial file) has no split
      kept = [e for e in entries if split in ("val", e[3])]
      if not kept:
        continue
      examples[split] = ([os.path.join(image_root, e[0]) for e in kept], [e[1] for e in kept],
                         [e[2] for e in kept])
      self._domains[split] = [e[3] for e in kept]
    super().__init__(NAME, examples, {split: annotations for split in examples})

  def domains(self, split: str) -> list[str]:
    """The domain of every example of `split`, in order."""
    self.check_split(split)
    return self._domains[split]


def make_source(data_dir: Optional[str] = None, *, root: Optional[str] = None,
                image_root: Optional[str] = None,
                annotations: Optional[str] = None) -> NocapsSource:
  """'nocaps' (module docstring)."""
  if annotations is None or root is not None or data_dir is not None:
    root = file_list.dataset_folder(NAME, root, data_dir, "nocaps", holds=ANNOTATION_FILE)
  annotations = annotations or os.path.join(root, ANNOTATION_FILE)
  if not os.path.isfile(annotations):
    raise base.DataNotFoundError(f"Data source {NAME!r}: annotation file {annotations} does not "
                                 "exist.")
  image_root = image_root or (os.path.join(root, "val") if root else None)
  if image_root is None or not os.path.isdir(image_root):
    raise base.DataNotFoundError(f"Data source {NAME!r}: image folder {image_root} does not "
                                 "exist; pass image_root=<the folder of the validation images>.")
  return NocapsSource(annotations, image_root)
