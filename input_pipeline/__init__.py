"""Datasets by name: `get_source('vtab/cifar')`, `('folder', root=...)`, `('embedded/shapes')`.

One module per dataset family (`vtab.py`, `vtab_files.py`, `fgvc.py`, `hta.py`,
`multilabel_lt.py`, `folder.py`, `coco_detection.py`, `odinw.py`, `imagenet_variants.py`,
`coop_datasets.py`, `embedded*.py`), all
implementing `base.DataSource` (`file_list.py` holds the source that the file-list families share;
`detection.py` the detection contract: boxes and the grounding caption of `grounding.py`);
`preprocess.py` builds the per-example transforms from a pp spec ('resize(224)|flip_lr|...':
`pp_registry.py` parses and composes it, `pp_ops.py`, `pp_ops_text.py` and `pp_ops_boxes.py` hold
the ops) and `pipeline.py` the batched train/eval streams. The pipeline knows nothing about models
(`clip_tokenize` borrows the text tower's vocabulary reader).
"""
from __future__ import annotations

import functools

from input_pipeline import (coco_detection, imagenet_variants, karpathy, nocaps, odinw,
                            video_retrieval)
from input_pipeline.base import DataNotFoundError, DataSource
from input_pipeline.coop_datasets import COOP_DATASETS, CoopSource
from input_pipeline.embedded import ShapesSource
from input_pipeline.embedded_captions import CaptionedShapesSource
from input_pipeline.embedded_clip import NamedShapesSource
from input_pipeline.embedded_detection import DetectionShapesSource
from input_pipeline.embedded_multilabel import MultilabelShapesSource
from input_pipeline.embedded_video import MovingShapesSource
from input_pipeline.fgvc import FGVC_DATASETS, FgvcSource
from input_pipeline.folder import FolderSource
from input_pipeline.hta import HTA_DATASETS, make_hta_source
from input_pipeline.multilabel_lt import MULTILABEL_LT_DATASETS, MultilabelLtSource
from input_pipeline.vtab import VTAB_TASKS, VtabSource
from input_pipeline.vtab_files import VtabFilesSource


def _family(prefix: str, members, make) -> dict:
  """'{prefix}/{member}' -> a factory (data_dir=None, **kwargs) -> source, for each member."""
  return {f"{prefix}/{m}": functools.partial(make, m) for m in members}


def _folder(*, data_dir=None, **kwargs) -> DataSource:
  if "root" not in kwargs:
    raise ValueError("Data source 'folder' needs root=... (root/<split>/<class_name>/*.jpg); "
                     f"got kwargs {sorted(kwargs)} and data_dir={data_dir!r}.")
  return FolderSource(**kwargs)


def _in_memory(cls):
  return lambda *, data_dir=None, **kwargs: cls(**kwargs)


# Name -> factory(data_dir=None, **kwargs). A new dataset family registers here (`register`) and
# touches no other file of the spine.
SOURCES: dict = {
    **_family("vtab", VTAB_TASKS, VtabSource),
    **_family("vtab1k_files", VTAB_TASKS, VtabFilesSource),
    **_family("fgvc", FGVC_DATASETS, FgvcSource),
    **_family("hta", HTA_DATASETS, make_hta_source),
    **_family("multilabel", MULTILABEL_LT_DATASETS, MultilabelLtSource),
    "folder": _folder,
    "embedded/shapes": _in_memory(ShapesSource),
    "embedded/named_shapes": _in_memory(NamedShapesSource),
    "embedded/multilabel_lt": _in_memory(MultilabelShapesSource),
    "embedded/detection_shapes": _in_memory(DetectionShapesSource),
    "embedded/moving_shapes": _in_memory(MovingShapesSource),
    "coco/2017": coco_detection.coco_2017,
    "lvis/v1": coco_detection.lvis_v1,
    "coco_json": coco_detection.coco_json,
    **odinw.odinw_sources(),
    **video_retrieval.SOURCES,
    **{name: functools.partial(imagenet_variants.ImagenetVariantSource, name)
       for name in imagenet_variants.IMAGENET_VARIANTS},
    **_family("coop", COOP_DATASETS, CoopSource),
    **karpathy.SOURCES,
    "embedded/captioned_shapes": _in_memory(CaptionedShapesSource),
    nocaps.NAME: nocaps.make_source,
}
SOURCE_NAMES = tuple(SOURCES)


def register(name: str, factory) -> None:
  """Adds the data source `name`: `factory(data_dir=None, **kwargs) -> DataSource`."""
  if name in SOURCES:
    raise ValueError(f"Data source {name!r} is already registered.")
  SOURCES[name] = factory


def get_source(name: str, *, data_dir: str | None = None, **kwargs) -> DataSource:
  """The data source called `name` (one of `SOURCE_NAMES`); `kwargs` come from
  `config.dataset_kwargs`, and an unknown one is an error naming the source.

  vtab/<task>: TFDS data prepared in `data_dir` (kwargs: tfds_version to override the version).
  vtab1k_files/<task>: the SSF/NOAH txt lists; kwargs root=<task folder>, or data_dir=<folder
    holding the task folders>.
  fgvc/<dataset>: VPT's json release; kwargs root=<dataset folder>, or data_dir=<folder holding
    SA2VP's dataset folders>; check_num_classes=False for subsets.
  hta/<dataset>: TFDS data in `data_dir` (cifar10, cifar100, dtd, food101, svhn; kwargs:
    split_seed for food101), as fgvc/<dataset> (cub, nabirds, dogs, flowers), or GTSRB folders
    (kwargs root=<gtsrb folder> or data_dir=<its parent>, split_seed, check_num_classes).
  multilabel/<dataset>: COCO-LT / VOC-LT from the LMPT lists (coco_lt, voc_lt); kwargs
    root=<the seed's data/coco or data/voc>, or data_dir=<its data/>; caption_chars,
    caption_tokenizer.
  folder: kwargs root=... holding root/<split>/<class_name>/*.{jpg,jpeg,png}; skip_bad_images,
    check_images.
  embedded/shapes: generated in memory, no kwargs.
  embedded/named_shapes: the same with class names for CLIP methods (kwargs: shots, seed;
    shift='zoom_out' for a distribution-shifted test split, test_examples to cut it).
  embedded/multilabel_lt: generated long-tailed multi-label squares with class names and
    captions, for LMPT (kwargs: caption_chars, caption_tokenizer).
  embedded/detection_shapes: generated detection scenes with boxes and their own BERT vocabulary,
    for GLIP (kwargs: vocab, max_text_len, separator, caption_prompts, extra_class_names for
    never-drawn names, lvis_fields for LVIS-style ground truth, and the per-image caption ones
    below).
  embedded/moving_shapes: generated video clips of a moving square with motion captions, for
    text-video retrieval (kwargs: num_frames, captions_per_video for multi-caption val/test).
  coco/2017, lvis/v1, coco_json: COCO-format json + image folders for GLIP (coco_detection.py;
    kwargs root= or data_dir=, or the json/image paths of coco_json; vocab, check_images,
    skip_bad_images, ...; per_image_captions, max_negatives, caption_seed: GLIP's per-image
    training captions with sampled negatives, on by themselves when the class list overflows the
    caption, as LVIS does).
  msrvtt, vatex, lsmdc, activitynet: text-video retrieval from the datasets' usual csv/json
    files and a folder of videos or frame folders (video_retrieval.py; kwargs root= or
    data_dir=, video_dir, fps, folder_fps, check_videos, skip_bad_videos; msrvtt: train_csv).
  odinw/<dataset>: the ODinW-13/35 datasets in GLIP's DATASET/odinw layout (odinw.py; kwargs
    root= or data_dir=, vocab, version, shots, seed, override_category, caption_prompt, ...).
  imagenet/val, imagenet_a, imagenet_r, imagenet_v2, imagenet_sketch: TFDS data in `data_dir`,
    split 'test', with CLIP `class_names`; A and R in their 200-class label spaces
    (imagenet_variants.py; kwargs tfds_version, and tfds_config for imagenet_v2).
  coop/<dataset>: TPT's fine-grained sets in CoOp's layout and split files (coop_datasets.py:
    oxford_flowers, dtd, oxford_pets, stanford_cars, ucf101, caltech101, food101, sun397,
    fgvc_aircraft, eurosat); kwargs root=<dataset folder> or data_dir=<CoOp's $DATA>,
    check_num_classes, skip_bad_images, check_images.
  coco_karpathy, flickr30k_karpathy: image-text retrieval and captioning on the Karpathy splits
    from LAVIS's annotation jsons and an image folder (karpathy.py; kwargs root= or data_dir=,
    image_root, annotations={split: path}, splits, captions='clean' (retrieval) or 'raw'
    (captioning)).
  nocaps: NoCaps val for captioning, splits 'val', 'in-domain', 'near-domain', 'out-domain'
    (nocaps.py; kwargs root= or data_dir=, image_root, annotations).
  embedded/captioned_shapes: the named shapes with 2-3 generated captions each, for retrieval
    and captioning (embedded_captions.py; kwargs limit, shots, seed, shift, train_pairs).
  """
  if name not in SOURCES:
    raise ValueError(f"Unknown data source {name!r}; valid names: {', '.join(SOURCE_NAMES)}.")
  try:
    return SOURCES[name](data_dir=data_dir, **kwargs)
  except TypeError as e:
    if "unexpected keyword argument" not in str(e):
      raise
    raise TypeError(f"Data source {name!r}: {e.args[0].split(' got ')[-1]} (from "
                    f"config.dataset_kwargs = {sorted(kwargs)}); see input_pipeline.get_source "
                    "for the keyword arguments each source takes.") from e


__all__ = ["DataNotFoundError", "DataSource", "get_source", "register", "SOURCE_NAMES",
           "SOURCES"]
