"""HTA: the 10 datasets of DAM-VP's head-tuning adaptation benchmark, split as DAM-VP and SA2VP do.

Follows shikiw/DAM-VP `data_utils/datasets/{cifar,dtd,food101,gtsrb,svhn}/dataset.py` and SA2VP
`datasets.py` (`*_DAM` classes and `build_dataset`, which picks the train and eval split of
each). `get_source('hta/<name>', ...)`:

  name      C    read from                     train                val                test
  cifar10   10   TFDS cifar10                  first 80% of train   last 20% of train  test
  cifar100  100  TFDS cifar100                 first 80% of train   last 20% of train  test
  dtd       47   TFDS dtd (partition 1)        train1               val1               test1
  cub       200  fgvc/cub (VPT json)           train.json           val.json           test.json
  nabirds   555  fgvc/nabirds                  train.json           val.json           test.json
  dogs      120  fgvc/dogs                     train.json           val.json           test.json
  flowers   102  fgvc/flowers                  train.json           val.json           test.json
  food101   101  TFDS food101                  random 80% of train  the other 20%      validation
  gtsrb     43   GTSRB folders + GT csv        random 80% of train  the other 20%      Final_Test
  svhn      10   TFDS svhn_cropped (32x32)     first 80% of train   last 20% of train  test

(TFDS food101's validation split is the official test set; GTSRB's train is its Training folder.)

"first 80%" = the ⌊0.8·N⌋ first examples in the original file order (DAM-VP's `int(0.8 * N)`),
found through the TFDS 'id' feature ("train_00042" = 43rd in the file): TFDS stores examples
in a key-hash order, so a TFDS slice train[:80%] would be a different subset. Each host reads its
block of the original order [lo + i·n/P, lo + (i+1)·n/P), filtered from the whole TFDS split in
TFDS's order (so the concatenation of the hosts' blocks is a reordering of the one-host split).

SA2VP evaluates on: cifar10 **val** (last 20% of train; the official test set is not used, a
quirk), dtd/food101/gtsrb/cifar100/svhn test; the FGVC four per mode (see `fgvc.py`; they take the
fgvc/<name> kwargs: root= or data_dir=, check_num_classes=).

Deliberate deviations:
  * The "random 80%" of food101 and gtsrb is unseeded `random.shuffle` in the original (and train
    and val shuffle separately, so they overlap). Here it is a fixed permutation,
    `np.random.default_rng(split_seed)`, split_seed=0 by default: train and val partition the
    official train set, the same on every run. food101's subset is read in TFDS's order, gtsrb's
    in the permutation's order.
  * food101 labels are the index of the class name in sorted order (SA2VP's `sorted(meta.keys())`);
    TFDS's own label order swaps cheese_plate and cheesecake.
  * TFDS has no GTSRB: it is read from torchvision's layout, root=<.../gtsrb> or data_dir=<its
    parent>: GTSRB/Training/<class>/*.ppm (classes = sorted folder names), GT-final_test.csv
    (';'-separated, Filename and ClassId columns) for GTSRB/Final_Test/Images/*.ppm. The .ppm
    (binary P6) files are decoded by `decode_ppm`, since TensorFlow has no PPM decoder.
  * This library never downloads: TFDS data must be prepared in data_dir (the error says how).
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import base, fgvc, file_list, folder, vtab

HTA_DATASETS = ("cifar10", "cifar100", "dtd", "cub", "nabirds", "dogs", "flowers", "food101",
                "gtsrb", "svhn")
HTA_SPLITS = ("train", "val", "test")
TRAIN_FRACTION = 0.8
GTSRB_CLASSES = 43


@dataclasses.dataclass(frozen=True)
class HtaTfdsDataset:
  builder: str
  version: str
  num_classes: int
  # our split -> (TFDS split, region); the region is 'all' (the whole TFDS split), 'first80' /
  # 'last20' (in the original file order, by 'id') or 'random80' / 'random20' (seeded).
  splits: dict[str, tuple[str, str]]
  sort_label_names: bool = False       # label = index of the class name in sorted order


_FIRST_80 = {"train": ("train", "first80"), "val": ("train", "last20"), "test": ("test", "all")}

HTA_TFDS: dict[str, HtaTfdsDataset] = {
    "cifar10": HtaTfdsDataset("cifar10", "3.*.*", 10, _FIRST_80),
    "cifar100": HtaTfdsDataset("cifar100", "3.*.*", 100, _FIRST_80),
    "dtd": HtaTfdsDataset("dtd", "3.*.*", 47, {"train": ("train", "all"),
                                               "val": ("validation", "all"),
                                               "test": ("test", "all")}),
    "food101": HtaTfdsDataset("food101", "2.*.*", 101,
                              {"train": ("train", "random80"), "val": ("train", "random20"),
                               "test": ("validation", "all")}, sort_label_names=True),
    "svhn": HtaTfdsDataset("svhn_cropped", "3.1.*", 10, _FIRST_80),  # 3.1 added 'id'
}
HTA_FGVC = ("cub", "nabirds", "dogs", "flowers")


def random_80_20(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(the ⌊0.8·N⌋ positions of train, the rest for val), both in a seeded random order."""
  order = np.random.default_rng(seed).permutation(num_examples)
  cut = int(TRAIN_FRACTION * num_examples)
  return order[:cut], order[cut:]


def _region_size(region: str, num_examples: int) -> int:
  cut = int(TRAIN_FRACTION * num_examples)
  return {"all": num_examples, "first80": cut, "random80": cut}.get(region, num_examples - cut)


def _prepared_builder(name: str, builder_name: str, version: str, data_dir: str | None):
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(f"{builder_name}:{version}", data_dir=data_dir)
    if builder.is_prepared():
      return builder
    cause = f"nothing prepared in {builder.data_dir}"
  except Exception as e:  # pylint: disable=broad-except  (no files and no code for this version)
    cause = str(e)
  buildable, _ = vtab._code_versions(builder_name)  # pylint: disable=protected-access
  matching = [v for v in buildable if tfds.core.Version(v).match(version)]
  how = (f"Prepare it once with:\n  tfds build {builder_name}:{matching[0]} --data_dir {where}"
         if matching else f"The installed tensorflow_datasets builds only {buildable or 'none'}.")
  raise base.DataNotFoundError(
      f"Data source {name!r} needs the TFDS dataset '{builder_name}' version {version} prepared "
      f"under data_dir={where} ({cause}). This library never downloads. {how}")


class HtaTfdsSource(base.DataSource):
  """An HTA dataset read from prepared TFDS data (see module docstring)."""

  def __init__(self, dataset: str, *, data_dir: str | None = None, split_seed: int = 0):
    spec = HTA_TFDS[dataset]
    self.name, self.num_classes, self.splits = f"hta/{dataset}", spec.num_classes, HTA_SPLITS
    self._spec = spec
    self._builder = _prepared_builder(self.name, spec.builder, spec.version, data_dir)
    features = self._builder.info.features
    label = features["label"]
    if label.num_classes != spec.num_classes:
      raise ValueError(f"{self.name}: TFDS feature 'label' of '{spec.builder}' has "
                       f"{label.num_classes} classes, the HTA table says {spec.num_classes}.")
    # TFDS id -> our id (identity unless the labels follow the sorted class names).
    names = list(label.names)
    self.label_map = (np.argsort(np.argsort(names, kind="stable")).astype(np.int32)
                      if spec.sort_label_names else np.arange(spec.num_classes, dtype=np.int32))
    self._image_feature = features["image"]
    regions = {region for _, region in spec.splits.values()}
    if regions & {"first80", "last20"} and "id" not in features:
      raise ValueError(f"{self.name}: the TFDS data of '{spec.builder}' in "
                       f"{self._builder.data_dir} has no 'id' feature, which gives the original "
                       f"file order; prepare version {spec.version}.")
    sizes = {s: info.num_examples for s, info in self._builder.info.splits.items()}
    for tfds_split, _ in spec.splits.values():
      if tfds_split not in sizes:
        raise ValueError(f"{self.name}: TFDS data in {self._builder.data_dir} has no "
                         f"'{tfds_split}' split (splits: {sorted(sizes)}).")
    self._sizes = sizes
    # Positions in TFDS's order of the random 80% / 20%, read in that (stored) order.
    self._random = {s: tuple(map(np.sort, random_80_20(n, split_seed))) for s, n in sizes.items()
                    if {(s, "random80"), (s, "random20")} & set(spec.splits.values())}

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    tfds_split, region = self._spec.splits[split]
    return _region_size(region, self._sizes[tfds_split])

  def _read(self, tfds_split: str, wanted: tuple[str, ...]) -> tf.data.Dataset:
    decoders = tfds.decode.PartialDecoding(  # the image stays encoded until `decode`
        {"image": True, "label": True, **{k: True for k in wanted}},
        decoders={"image": tfds.decode.SkipDecoding()})
    return self._builder.as_dataset(split=tfds_split, shuffle_files=False, decoders=decoders,
                                    read_config=tfds.ReadConfig(try_autocache=False))

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    tfds_split, region = self._spec.splits[split]
    start, end = base.host_range(self.num_examples(split), process_index, process_count)
    if start == end:  # more hosts than examples: this host reads nothing
      return tf.data.Dataset.from_tensor_slices(
          {"image": tf.zeros([0], tf.string), "label": tf.zeros([0], tf.int32)})
    if region == "all":
      ds = self._read(f"{tfds_split}[{start}:{end}]", ())
    elif region in ("first80", "last20"):
      low = 0 if region == "first80" else int(TRAIN_FRACTION * self._sizes[tfds_split])
      first, last = low + start, low + end

      def in_block(ex):
        index = tf.strings.to_number(tf.strings.regex_replace(ex["id"], r"^.*_", ""), tf.int64)
        return (index >= first) & (index < last)

      ds = self._read(tfds_split, ("id",)).filter(in_block)
    else:
      positions = self._random[tfds_split][0 if region == "random80" else 1][start:end]
      lo, hi = int(positions[0]), int(positions[-1]) + 1
      keep = np.zeros(hi - lo, bool)
      keep[positions - lo] = True
      keep = tf.constant(keep)

      def kept(position, ex):  # position in the read range [lo, hi)
        del ex
        return keep[position]

      ds = self._read(f"{tfds_split}[{lo}:{hi}]", ()).enumerate().filter(kept)
      ds = ds.map(lambda position, ex: ex)
    label_map = tf.constant(self.label_map)
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.gather(label_map, ex["label"])},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def decode(self, example: dict) -> dict:
    image = base.grey_to_rgb(self._image_feature.decode_example(example["image"]))
    return {"image": image, "label": example["label"]}


def decode_ppm(data: tf.Tensor) -> tf.Tensor:
  """A binary PPM file (P6, maxval 255, no comments; GTSRB's format) -> uint8 (H, W, 3)."""
  head = tf.io.decode_raw(tf.strings.substr(data, 0, 32), tf.uint8)
  space = ((head == 32) | (head == 10) | (head == 13) | (head == 9))
  starts = tf.cast(tf.where(~space & tf.concat([[True], space[:-1]], 0))[:, 0], tf.int32)
  ends = tf.cast(tf.where(space & tf.concat([[False], ~space[:-1]], 0))[:, 0], tf.int32)
  field = lambda i: tf.strings.substr(data, starts[i], ends[i] - starts[i])
  width, height = (tf.strings.to_number(field(i), tf.int32) for i in (1, 2))
  check = tf.debugging.Assert(
      (field(0) == "P6") & (field(3) == "255"),
      ["Expected a binary PPM (P6, maxval 255); header fields:", field(0), field(3)])
  with tf.control_dependencies([check]):
    pixels = tf.io.decode_raw(tf.strings.substr(data, ends[3] + 1, width * height * 3), tf.uint8)
  return tf.reshape(pixels, tf.stack([height, width, 3]))


class GtsrbSource(file_list.FileListSource):
  """GTSRB from torchvision's folder layout (see module docstring)."""

  def __init__(self, *, root: str | None = None, data_dir: str | None = None, split_seed: int = 0,
               check_num_classes: bool = True, name: str = "hta/gtsrb"):
    root = file_list.dataset_folder(
        name, root, data_dir, "gtsrb",
        holds="GTSRB/Training/<class>/*.ppm, GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv")
    self.root = root
    training = os.path.join(root, "GTSRB", "Training")
    if not os.path.isdir(training):
      raise base.DataNotFoundError(f"Data source {name!r}: {training} does not exist; expected "
                                   "GTSRB's Training/<class>/*.ppm there.")
    self.classes = tuple(folder._subdirs(training))  # pylint: disable=protected-access
    if check_num_classes and len(self.classes) != GTSRB_CLASSES:
      raise ValueError(f"Data source {name!r}: {training} has {len(self.classes)} class folders, "
                       f"expected {GTSRB_CLASSES}; pass check_num_classes=False for a subset.")
    paths, labels = [], []
    for label, class_name in enumerate(self.classes):
      class_folder = os.path.join(training, class_name)
      files = sorted(f for f in os.listdir(class_folder) if f.lower().endswith(".ppm"))
      paths += [os.path.join(class_folder, f) for f in files]
      labels += [label] * len(files)
    train, val = random_80_20(len(paths), split_seed)
    pick = lambda positions: ([paths[i] for i in positions], [labels[i] for i in positions])
    gt_csv = os.path.join(root, "GT-final_test.csv")
    files = {"train": pick(train), "val": pick(val), "test": self._read_test(gt_csv, name)}
    listed_in = {"train": f"{training} (seeded 80%)", "val": f"{training} (seeded 20%)",
                 "test": gt_csv}
    super().__init__(name, len(self.classes), files, listed_in)

  @staticmethod
  def _read_test(gt_csv: str, name: str) -> tuple[list[str], list[int]]:
    if not os.path.isfile(gt_csv):
      raise base.DataNotFoundError(f"Data source {name!r}: {gt_csv} does not exist; expected "
                                   "GTSRB's test ground truth (GT-final_test.csv).")
    images = os.path.join(os.path.dirname(gt_csv), "GTSRB", "Final_Test", "Images")
    with open(gt_csv, newline="") as f:
      rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    if not rows or not {"Filename", "ClassId"} <= set(rows[0]):
      raise ValueError(f"Data source {name!r}: {gt_csv} needs ';'-separated columns Filename and "
                       f"ClassId; got {sorted(rows[0]) if rows else 'no rows'}.")
    bad = [row for row in rows if not (row["ClassId"] or "").strip().isdigit()]
    if bad:
      raise ValueError(f"Data source {name!r}: {gt_csv} gives {bad[0]['Filename']} the ClassId "
                       f"{bad[0]['ClassId']!r}; expected a non-negative integer.")
    return ([os.path.join(images, row["Filename"]) for row in rows],
            [int(row["ClassId"]) for row in rows])

  def decode(self, example: dict) -> dict:
    return {"image": decode_ppm(tf.io.read_file(example["image"])), "label": example["label"]}


def make_hta_source(dataset: str, *, data_dir: str | None = None, **kwargs) -> base.DataSource:
  """'hta/<dataset>': TFDS-backed (kwargs: split_seed for food101), fgvc, or gtsrb."""
  if dataset in HTA_TFDS:
    return HtaTfdsSource(dataset, data_dir=data_dir, **kwargs)
  if dataset in HTA_FGVC:
    return fgvc.FgvcSource(dataset, data_dir=data_dir, name=f"hta/{dataset}", **kwargs)
  if dataset == "gtsrb":
    return GtsrbSource(data_dir=data_dir, **kwargs)
  raise ValueError(f"Unknown HTA dataset {dataset!r}; valid: {', '.join(HTA_DATASETS)}.")
