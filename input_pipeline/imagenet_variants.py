"""ImageNet and its distribution shifts, the test sets of TPT and RLCF, from prepared TFDS data.

Follows azshue/TPT `data/datautils.py` (`build_dataset`), `tpt_classification.py` (the per-set
class lists) and `data/imagenet_variants.py` (the label masks), TPT paper §4.1; RLCF
(mzhaoshuai/RLCF) reads the same sets the same way. `get_source(<name>, data_dir=...)`:

  name             TFDS builder (version)                  TFDS split   classes
  imagenet/val     imagenet2012 (5.*.*)                    validation   1000
  imagenet_a       imagenet_a (0.1.*)                      test         200 (ImageNet-A's)
  imagenet_r       imagenet_r (0.*.*)                      test         200 (ImageNet-R's)
  imagenet_v2      imagenet_v2/<tfds_config> (3.*.*)       test         1000
  imagenet_sketch  imagenet_sketch (1.*.*)                 test         1000

Each source serves the one split 'test' (ImageNet's validation set is its test set, as in TPT and
CoOp), so a config switches between the five with the source name alone. kwargs: tfds_version to
override the version; for imagenet_v2, tfds_config = 'matched-frequency' (the default, the one TPT
reads), 'threshold-0.7' or 'topimages'.

Labels and `class_names`. Every builder labels an image with its 1000-way ImageNet index (a
ClassLabel over the sorted WordNet ids), and `class_names` are the CLIP names of
`imagenet_class_names.IMAGENET_CLASS_NAMES` (TPT's `imagenet_classes`) in that order.
ImageNet-A and -R hold only 200 classes. TPT reads their folders with torchvision's ImageFolder,
which numbers the 200 class folders 0..199 in sorted order, and keeps the class names of the same
sorted subset (`imagenet_a_mask`, `imagenet_r_mask`). Here too: label = the position of the image's
WordNet id among the sorted 200 (`IMAGENET_A_WNIDS`, `IMAGENET_R_WNIDS`), and class_names[i] = the
name of the i-th of them, so labels and names agree (when they do not, accuracy is near zero: TPT
issue #15). An image of a class outside the subset fails the read, naming its TFDS label.
ImageNet-V2: TPT's ImageFolder numbers the folders '0'..'999' in string order and re-orders the
names to match (`imagenet_v_mask`); TFDS's label is int(folder name), the ImageNet index itself,
so the names stay in the standard order.

Deliberate deviation: this library never downloads. Data not prepared in `data_dir` raises
`base.DataNotFoundError` with the `tfds build` line (and, for imagenet2012, where its manual
download goes).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import base, hta, vtab
from input_pipeline.imagenet_class_names import (IMAGENET_A_WNIDS, IMAGENET_CLASS_NAMES,
                                                 IMAGENET_R_WNIDS)

IMAGENET_V2_CONFIGS = ("matched-frequency", "threshold-0.7", "topimages")


@dataclasses.dataclass(frozen=True)
class ImagenetVariant:
  builder: str                         # TFDS name (the config is added for imagenet_v2)
  version: str                         # TFDS version pattern
  tfds_split: str                      # what the source's 'test' split reads
  subset_wnids: tuple[str, ...] = ()   # the label space when not all 1000 classes, sorted
  configs: tuple[str, ...] = ()        # TFDS builder configs, the default first


IMAGENET_VARIANTS: dict[str, ImagenetVariant] = {
    "imagenet/val": ImagenetVariant("imagenet2012", "5.*.*", "validation"),
    "imagenet_a": ImagenetVariant("imagenet_a", "0.1.*", "test", IMAGENET_A_WNIDS),
    "imagenet_r": ImagenetVariant("imagenet_r", "0.*.*", "test", IMAGENET_R_WNIDS),
    "imagenet_v2": ImagenetVariant("imagenet_v2", "3.*.*", "test", configs=IMAGENET_V2_CONFIGS),
    "imagenet_sketch": ImagenetVariant("imagenet_sketch", "1.*.*", "test"),
}


def _prepared_builder(name: str, builder_name: str, version: str, data_dir: str | None):
  """`hta`'s prepared-builder check, plus the manual-download note where TFDS has one."""
  try:  # pylint: disable-next=protected-access
    return hta._prepared_builder(name, builder_name, version, data_dir)
  except base.DataNotFoundError as e:
    _, manual = vtab._code_versions(builder_name)  # pylint: disable=protected-access
    if not manual:
      raise
    where = data_dir or tfds.core.constants.DATA_DIR
    raise base.DataNotFoundError(
        f"{e}\n'{builder_name}' needs a manual download first, into {where}/downloads/manual:\n  "
        + " ".join(manual.split())) from e


def subset_label_map(tfds_wnids: tuple[str, ...], subset_wnids: tuple[str, ...]) -> np.ndarray:
  """int32 [len(tfds_wnids)]: TFDS label -> the position of its WordNet id in `subset_wnids`
  (-1 outside the subset); the identity when `subset_wnids` is empty."""
  if not subset_wnids:
    return np.arange(len(tfds_wnids), dtype=np.int32)
  label_map = np.full(len(tfds_wnids), -1, np.int32)
  label_map[[tfds_wnids.index(wnid) for wnid in subset_wnids]] = np.arange(len(subset_wnids))
  return label_map


class ImagenetVariantSource(base.DataSource):
  """ImageNet val or one of its shifts, split 'test' (see module docstring)."""

  splits = ("test",)

  def __init__(self, name: str, *, data_dir: str | None = None, tfds_version: str | None = None,
               tfds_config: str | None = None):
    if name not in IMAGENET_VARIANTS:
      raise ValueError(f"Unknown ImageNet variant {name!r}; valid: {', '.join(IMAGENET_VARIANTS)}.")
    spec = IMAGENET_VARIANTS[name]
    builder_name = spec.builder
    if spec.configs:
      tfds_config = tfds_config or spec.configs[0]
      if tfds_config not in spec.configs:
        raise ValueError(f"Data source {name!r}: tfds_config={tfds_config!r}; expected one of "
                         f"{', '.join(spec.configs)}.")
      builder_name = f"{spec.builder}/{tfds_config}"
    elif tfds_config is not None:
      raise ValueError(f"Data source {name!r} has no TFDS configs; got tfds_config="
                       f"{tfds_config!r}.")
    self.name, self._tfds_split = name, spec.tfds_split
    self._builder = _prepared_builder(name, builder_name, tfds_version or spec.version, data_dir)
    features = self._builder.info.features
    tfds_wnids = tuple(features["label"].names)
    if tfds_wnids != tuple(sorted(tfds_wnids)) or len(tfds_wnids) != len(IMAGENET_CLASS_NAMES):
      raise ValueError(f"Data source {name!r}: the TFDS label of '{builder_name}' has "
                       f"{len(tfds_wnids)} names (first {tfds_wnids[:2]}); expected the "
                       f"{len(IMAGENET_CLASS_NAMES)} sorted ImageNet WordNet ids.")
    self.wnids = spec.subset_wnids or tfds_wnids
    self.class_names = tuple(IMAGENET_CLASS_NAMES[tfds_wnids.index(w)] for w in self.wnids)
    self.num_classes = len(self.class_names)
    self.label_map = subset_label_map(tfds_wnids, spec.subset_wnids)  # TFDS label -> ours
    self._image_feature = features["image"]
    sizes = {s: info.num_examples for s, info in self._builder.info.splits.items()}
    if spec.tfds_split not in sizes:
      raise ValueError(f"Data source {name!r}: TFDS data in {self._builder.data_dir} has no "
                       f"'{spec.tfds_split}' split (splits: {sorted(sizes)}).")
    self._num_examples = sizes[spec.tfds_split]

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return self._num_examples

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    start, end = base.host_range(self.num_examples(split), process_index, process_count)
    if start == end:  # more hosts than examples: this host reads nothing
      return tf.data.Dataset.from_tensor_slices(
          {"image": tf.zeros([0], tf.string), "label": tf.zeros([0], tf.int32)})
    decoders = tfds.decode.PartialDecoding(  # the image stays encoded until `decode`
        {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()})
    ds = self._builder.as_dataset(split=f"{self._tfds_split}[{start}:{end}]",
                                  shuffle_files=False, decoders=decoders,
                                  read_config=tfds.ReadConfig(try_autocache=False))
    label_map = tf.constant(self.label_map)
    outside = (f"is the ImageNet index of a class outside the {self.num_classes} classes of "
               f"the data source {self.name}")  # no quotes: TF's message escapes them

    def relabel(example):
      label = tf.gather(label_map, example["label"])
      check = tf.debugging.Assert(label >= 0, ["TFDS label", example["label"], outside])
      with tf.control_dependencies([check]):
        return {"image": example["image"], "label": tf.identity(label)}

    return ds.map(relabel, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def decode(self, example: dict) -> dict:
    image = base.grey_to_rgb(self._image_feature.decode_example(example["image"]))
    return {"image": image, "label": example["label"]}
