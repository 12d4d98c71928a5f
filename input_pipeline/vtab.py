"""VTAB-1k: the 19 tasks read from prepared TFDS data, with VPT's exact 1k splits and labels.

Follows KMnP/vpt `src/data/vtab_datasets/*.py` (itself google-research/task_adaptation) and its
`tf_dataset.py` task list: the TFDS builder, config and version of each task, how the label is
derived, and which region of which TFDS split each of `train800`, `val200`, `train800val200`,
`test` is. The whole benchmark is the one table `VTAB_TASKS` below.

The splits, for every task:
  train800       = train[:800]
  val200         = the task's own validation region (NOT train[800:1000]): validation[:200] where
                   the task has a validation split, test[:200] for smallnorb, otherwise
                   train[T:T+200] with T = p% of |train| (p = the task's train/val boundary)
  train800val200 = train800 + val200
  test           = the task's test split (validation for clevr, train[80%:] for eurosat and
                   resisc45, train[90%:] for dsprites, test[50%:] for smallnorb)
Fractions of a split are taken from the builder's split info, as the original does.

Deliberate deviations:
  * This library never downloads or prepares data (the original calls download_and_prepare): a
    task whose data is not in `data_dir` raises `base.DataNotFoundError` with the `tfds build` line.
  * The original builds eurosat/resisc45 test as train[⌊60%N⌋+⌊20%N⌋:] and dsprites test as
    train[⌊80%N⌋+⌊10%N⌋:]; we write ⌊80%N⌋ and ⌊90%N⌋, the same index for the real N (27000,
    31500, 737280).
  * oxford_iiit_pet: VPT read version 3.x, which the current tensorflow_datasets can no longer
    build (it builds 4.0.0). The default stays 3.*.* (data prepared with an older TFDS works);
    `get_source('vtab/oxford_iiit_pet', tfds_version='4.*.*')` opts into the new version.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import base

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


@dataclasses.dataclass(frozen=True)
class TrainSlice:
  """train[T:T+length] (train[T:] when length is None), T = start_percent% of |train|, floored."""
  start_percent: int
  length: int | None = None

  def resolve(self, num_train: int) -> str:
    start = self.start_percent * num_train // 100
    return f"train[{start}:{'' if self.length is None else start + self.length}]"


@dataclasses.dataclass(frozen=True)
class VtabTask:
  builder: str                     # TFDS 'name' or 'name/config'
  version: str                     # TFDS version (pattern) that VPT/task_adaptation read
  num_classes: int
  val200: str | TrainSlice         # a TFDS split spec, or a region of train sized from split info
  test: str | TrainSlice
  label: str = "label"             # the TFDS feature holding the label ...
  group_values: bool = False       # ... its N values put in num_classes bins: ⌊v / (N/classes)⌋
  derive_label: Callable[[dict], tf.Tensor] | None = None  # or a function of the example ...
  derive_from: tuple[str, ...] = ()  # ... reading these sub-features of 'objects'
  image_scale: int = 1             # dsprites stores pixels as {0, 1}


def _clevr_count(example):
  """Number of objects − 3: CLEVR scenes hold 3..10 objects, so 8 classes."""
  return tf.size(example["objects"]["size"]) - 3


def _bucketize(value, thresholds):
  """Index of the last threshold strictly below `value` (task_adaptation's max(where(thr < v)))."""
  below = tf.cast(tf.constant(thresholds, tf.float32) < tf.cast(value, tf.float32), tf.int32)
  return tf.reduce_sum(below) - 1


def _clevr_distance(example):
  """Depth of the closest object, in 6 bins."""
  depth = tf.reduce_min(example["objects"]["pixel_coords"][:, 2])
  return _bucketize(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _kitti_closest_vehicle(example):
  """Distance (z, metres) of the closest Car/Van/Truck in 3 bins, plus class 3 for 'no vehicle'."""
  objects = example["objects"]
  vehicle_z = tf.boolean_mask(objects["location"][:, 2], objects["type"] < 3)
  distance = tf.reduce_min(tf.concat([vehicle_z, [1000.0]], axis=0))
  return _bucketize(distance, [-100.0, 8.0, 20.0, 999.0])


_CLEVR = dict(builder="clevr", version="3.*.*", val200=TrainSlice(90, 200), test="validation")
_DSPRITES = dict(builder="dsprites", version="2.*.*", num_classes=16, val200=TrainSlice(80, 200),
                 test=TrainSlice(90), group_values=True, image_scale=255)
_SMALLNORB = dict(builder="smallnorb", version="2.*.*", val200="test[:200]", test="test[50%:]")

VTAB_TASKS: dict[str, VtabTask] = {
    # Natural
    "cifar": VtabTask("cifar100", "3.*.*", 100, TrainSlice(90, 200), "test"),
    "caltech101": VtabTask("caltech101", "3.*.*", 102, TrainSlice(90, 200), "test"),
    "dtd": VtabTask("dtd", "3.*.*", 47, "validation[:200]", "test"),
    "oxford_flowers102": VtabTask("oxford_flowers102", "2.*.*", 102, "validation[:200]", "test"),
    "oxford_iiit_pet": VtabTask("oxford_iiit_pet", "3.*.*", 37, TrainSlice(80, 200), "test"),
    "svhn": VtabTask("svhn_cropped", "3.*.*", 10, TrainSlice(90, 200), "test"),
    "sun397": VtabTask("sun397/tfds", "4.*.*", 397, "validation[:200]", "test"),
    # Specialized
    "patch_camelyon": VtabTask("patch_camelyon", "2.*.*", 2, "validation[:200]", "test"),
    "eurosat": VtabTask("eurosat/rgb", "2.*.*", 10, TrainSlice(60, 200), TrainSlice(80)),
    "resisc45": VtabTask("resisc45", "3.*.*", 45, TrainSlice(60, 200), TrainSlice(80)),
    "diabetic_retinopathy": VtabTask("diabetic_retinopathy_detection/btgraham-300", "3.*.*", 5,
                                     "validation[:200]", "test"),
    # Structured
    "clevr_count": VtabTask(num_classes=8, derive_label=_clevr_count, derive_from=("size",),
                            **_CLEVR),
    "clevr_dist": VtabTask(num_classes=6, derive_label=_clevr_distance,
                           derive_from=("pixel_coords",), **_CLEVR),
    "dmlab": VtabTask("dmlab", "2.0.1", 6, "validation[:200]", "test"),
    "kitti": VtabTask("kitti", "3.2.0", 4, "validation[:200]", "test",
                      derive_label=_kitti_closest_vehicle, derive_from=("type", "location")),
    "dsprites_loc": VtabTask(label="label_x_position", **_DSPRITES),      # 32 values -> 16
    "dsprites_ori": VtabTask(label="label_orientation", **_DSPRITES),     # 40 values -> 16
    "smallnorb_azi": VtabTask(num_classes=18, label="label_azimuth", **_SMALLNORB),
    "smallnorb_ele": VtabTask(num_classes=9, label="label_elevation", **_SMALLNORB),
}


def split_specs(task: VtabTask, num_train: int) -> dict[str, str]:
  """The TFDS split spec of each VTAB-1k split; `num_train` = examples in the TFDS train split."""
  resolve = lambda s: s.resolve(num_train) if isinstance(s, TrainSlice) else s
  val200 = resolve(task.val200)
  return {"train800": "train[:800]", "val200": val200, "train800val200": f"train[:800]+{val200}",
          "test": resolve(task.test)}


def absolute_ranges(spec: str, split_sizes: dict[str, int]) -> list[tuple[str, int, int]]:
  """'train[:800]+test[50%:]' -> [('train', 0, 800), ('test', 12150, 24300)], TFDS rounding."""
  infos = {name: types.SimpleNamespace(num_examples=n) for name, n in split_sizes.items()}
  ranges = []
  for instr in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos):
    end = split_sizes[instr.splitname] if instr.to is None else instr.to
    ranges.append((instr.splitname, instr.from_ or 0, end))
  return ranges


def take_block(ranges: list[tuple[str, int, int]], start: int, end: int):
  """The ranges covering positions [start, end) of the concatenation of `ranges`."""
  block, offset = [], 0
  for name, lo, hi in ranges:
    a, b = max(lo, lo + start - offset), min(hi, lo + end - offset)
    if a < b:
      block.append((name, a, b))
    offset += hi - lo
  return block


def _code_versions(builder_name: str) -> tuple[list[str], str | None]:
  """Versions the installed tensorflow_datasets can build, and its manual-download note."""
  name, _, config = builder_name.partition("/")
  try:
    cls = tfds.builder_cls(name)
  except Exception:  # pylint: disable=broad-except
    return [], None
  configs = {c.name: c for c in getattr(cls, "BUILDER_CONFIGS", [])}
  main = (configs[config].version if config in configs else None) or cls.VERSION
  versions = [str(v) for v in [main, *getattr(cls, "SUPPORTED_VERSIONS", [])] if v]
  return versions, getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)


def _missing_data_message(task_name, task, version, data_dir, looked_in, cause) -> str:
  where = data_dir or f"the TFDS default ({tfds.core.constants.DATA_DIR})"
  lines = [f"VTAB task 'vtab/{task_name}' needs the TFDS dataset '{task.builder}' version "
           f"{version}, which is not prepared under data_dir={where}"
           + (f" (looked in {looked_in})." if looked_in else ".")]
  if cause is not None:
    lines.append(f"TFDS said: {cause}")
  buildable, manual = _code_versions(task.builder)
  matching = [v for v in buildable if tfds.core.Version(v).match(version)]
  dir_arg = data_dir or tfds.core.constants.DATA_DIR
  if matching:
    lines.append("This library never downloads. Prepare it once with:\n"
                 f"  tfds build {task.builder}:{matching[0]} --data_dir {dir_arg}")
    if manual:
      lines.append(f"'{task.builder}' needs a manual download first, into {dir_arg}/downloads/"
                   f"manual:\n  " + " ".join(manual.split()))
  else:
    lines.append(f"The installed tensorflow_datasets {tfds.__version__} builds '{task.builder}' "
                 f"only at version(s) {buildable or 'none'}, not {version} (what VPT used). "
                 "Use data prepared with an older tensorflow_datasets"
                 + (f", or (a deviation from VPT) run `tfds build {task.builder}:{buildable[0]} "
                    f"--data_dir {dir_arg}` and pass tfds_version='{buildable[0]}' to get_source."
                    if buildable else "."))
  return "\n".join(lines)


def _prepared_builder(task_name: str, task: VtabTask, version: str, data_dir: str | None):
  try:
    builder = tfds.builder(f"{task.builder}:{version}", data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (no files and no code for this version)
    raise base.DataNotFoundError(
        _missing_data_message(task_name, task, version, data_dir, None, e)) from e
  if not builder.is_prepared():
    raise base.DataNotFoundError(
        _missing_data_message(task_name, task, version, data_dir, builder.data_dir, None))
  return builder


def _label_fn(task_name: str, task: VtabTask, features) -> Callable[[dict], tf.Tensor]:
  if task.derive_label is not None:
    return lambda ex: tf.cast(task.derive_label(ex), tf.int32)
  num_values = features[task.label].num_classes
  if not task.group_values:
    if num_values != task.num_classes:
      raise ValueError(f"vtab/{task_name}: TFDS feature '{task.label}' has {num_values} classes, "
                       f"the VTAB table says {task.num_classes}.")
    return lambda ex: tf.cast(ex[task.label], tf.int32)
  values_per_class = num_values / task.num_classes  # dsprites: 32/16 = 2, 40/16 = 2.5
  if values_per_class < 1:
    raise ValueError(f"vtab/{task_name}: cannot group {num_values} values into "
                     f"{task.num_classes} classes.")
  return lambda ex: tf.cast(
      tf.math.floordiv(tf.cast(ex[task.label], tf.float32), values_per_class), tf.int32)


class VtabSource(base.DataSource):
  """One VTAB-1k task from prepared TFDS data in `data_dir`."""

  def __init__(self, task_name: str, *, data_dir: str | None = None,
               tfds_version: str | None = None):
    if task_name not in VTAB_TASKS:
      raise ValueError(f"Unknown VTAB task {task_name!r}; valid: {', '.join(VTAB_TASKS)}.")
    task = VTAB_TASKS[task_name]
    self.name, self.num_classes, self.splits = f"vtab/{task_name}", task.num_classes, VTAB_SPLITS
    self._task = task
    self._builder = _prepared_builder(task_name, task, tfds_version or task.version, data_dir)
    features = self._builder.info.features
    self._image_feature = features["image"]
    self._label = _label_fn(task_name, task, features)
    sizes = {name: info.num_examples for name, info in self._builder.info.splits.items()}
    if "train" not in sizes:
      raise ValueError(f"{self.name}: TFDS data in {self._builder.data_dir} has no 'train' split "
                       f"(splits: {sorted(sizes)}).")
    try:
      self._ranges = {split: absolute_ranges(spec, sizes)
                      for split, spec in split_specs(task, sizes["train"]).items()}
    except (ValueError, KeyError) as e:
      raise ValueError(f"{self.name}: the VTAB splits {split_specs(task, sizes['train'])} do not "
                       f"fit the TFDS splits {sizes} in {self._builder.data_dir}: {e}") from e

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return sum(end - start for _, start, end in self._ranges[split])

  def tfds_split(self, split: str, *, process_index: int = 0, process_count: int = 1) -> str:
    """The TFDS split spec this host reads for `split`, e.g. 'train[0:500]'."""
    self.check_split(split)
    start, end = base.host_range(self.num_examples(split), process_index, process_count)
    block = take_block(self._ranges[split], start, end)
    return "+".join(f"{name}[{a}:{b}]" for name, a, b in block)

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    spec = self.tfds_split(split, process_index=process_index, process_count=process_count)
    if not spec:  # more hosts than examples: this host reads nothing
      return tf.data.Dataset.from_tensor_slices(
          {"image": tf.zeros([0], tf.string), "label": tf.zeros([0], tf.int32)})
    task = self._task
    wanted = {"objects": list(task.derive_from)} if task.derive_label else {task.label: True}
    decoders = tfds.decode.PartialDecoding(  # only what the label needs; the image stays encoded
        {"image": True, **wanted}, decoders={"image": tfds.decode.SkipDecoding()})
    ds = self._builder.as_dataset(split=spec, shuffle_files=False, decoders=decoders,
                                  read_config=tfds.ReadConfig(try_autocache=False))
    return ds.map(lambda ex: {"image": ex["image"], "label": self._label(ex)},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def decode(self, example: dict) -> dict:
    image = base.grey_to_rgb(self._image_feature.decode_example(example["image"]))
    if self._task.image_scale != 1:
      image = image * tf.constant(self._task.image_scale, tf.uint8)
    return {"image": image, "label": example["label"]}

