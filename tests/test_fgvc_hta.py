"""input_pipeline: FGVC json sources, VTAB-1k file lists, HTA (TFDS, FGVC and GTSRB sources).

Everything runs on tiny data written by the tests: image folders with json/txt/csv lists, tiny
REAL TFDS datasets stored under the HTA builder names (images carry their index in a pixel, so
split regions and host slices are checked exactly), and `tfds.testing.mock_data` with split
metadata of the real sizes for the HTA split sizes and class counts.
"""
import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from input_pipeline import fgvc, hta, pipeline, preprocess
from test_input_pipeline import _write_metadata  # pylint: disable=import-error


def _index_image(index, shape=(6, 5)):
  """uint8 (H, W, 3) whose pixel (0, 0) is (index % 256, index // 256, 7)."""
  image = np.full((*shape, 3), 100, np.uint8)
  image[0, 0] = (index % 256, index // 256, 7)
  return image


def _write_png(path, index, shape=(6, 5)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(tf.io.encode_png(_index_image(index, shape)).numpy())


def _index(image):
  return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def _examples(source, split, **kw):
  """[(index pixel, label)] of a decoded split."""
  return [(_index(ex["image"]), int(ex["label"]))
          for ex in source.dataset(split, **kw).as_numpy_iterator()]


def _check_host_slices(source, split):
  everything = _examples(source, split)
  for count in (2, 3):
    blocks = [_examples(source, split, process_index=i, process_count=count)
              for i in range(count)]
    assert sum(blocks, []) == everything
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


# ---------------------------------------------------------------- FGVC (VPT json release)

# NABirds-style raw labels: not contiguous, not starting at 0 or 1.
RAW_LABELS = (295, 313, 1002)


def _write_fgvc(root, image_root="images", sizes=(("train", 9), ("val", 3), ("test", 6))):
  """train/val/test.json over images <image_root>/<class>/<i>.jpg; index = running number."""
  index = 0
  for split, n in sizes:
    content = {}
    for i in range(n):
      name = f"{RAW_LABELS[i % 3]}.bird/{split}_{i}.jpg"
      _write_png(os.path.join(root, image_root, name), index)
      content[name] = RAW_LABELS[i % 3]
      index += 1
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      json.dump(content, f)


def test_fgvc_json_source_layout_labels_and_splits(tmp_path):
  _write_fgvc(tmp_path / "nabirds")
  with pytest.raises(ValueError, match="3 distinct labels, expected 555.*check_num_classes"):
    input_pipeline.get_source("fgvc/nabirds", data_dir=str(tmp_path))
  source = input_pipeline.get_source("fgvc/nabirds", data_dir=str(tmp_path),
                                     check_num_classes=False)
  assert source.name == "fgvc/nabirds" and source.num_classes == 3
  assert source.classes == RAW_LABELS  # the json's values, sorted; ids are their positions
  assert source.splits == ("train", "val", "trainval", "test")
  sizes = {s: source.num_examples(s) for s in source.splits}
  assert sizes == {"train": 9, "val": 3, "trainval": 12, "test": 6}
  train, val, test = (_examples(source, s) for s in ("train", "val", "test"))
  assert train == [(i, i % 3) for i in range(9)]         # json order, contiguous labels
  assert val == [(9 + i, i % 3) for i in range(3)]
  assert test == [(12 + i, i % 3) for i in range(6)]
  assert _examples(source, "trainval") == train + val
  ex = next(source.dataset("test").as_numpy_iterator())
  assert ex["image"].shape == (6, 5, 3) and ex["image"].dtype == np.uint8
  assert ex["label"].dtype == np.int32
  _check_host_slices(source, "trainval")


@pytest.mark.parametrize("dataset, image_root", [("cub", "images"), ("dogs", "Images"),
                                                 ("flowers", ""), ("cars", "")])
def test_fgvc_image_roots_and_folder_names(tmp_path, dataset, image_root):
  spec = fgvc.FGVC_DATASETS[dataset]
  assert spec.image_root == image_root
  _write_fgvc(tmp_path / spec.folder, image_root)
  by_root = input_pipeline.get_source(f"fgvc/{dataset}", root=str(tmp_path / spec.folder),
                                      check_num_classes=False)
  by_dir = input_pipeline.get_source(f"fgvc/{dataset}", data_dir=str(tmp_path),
                                     check_num_classes=False)
  assert _examples(by_root, "val") == _examples(by_dir, "val") == [(9, 0), (10, 1), (11, 2)]


def test_fgvc_class_counts():
  assert {d: s.num_classes for d, s in fgvc.FGVC_DATASETS.items()} == {
      "cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}


def test_fgvc_errors(tmp_path):
  root = tmp_path / "CUB_200_2011"
  with pytest.raises(input_pipeline.DataNotFoundError, match="CUB_200_2011 does not exist"):
    input_pipeline.get_source("fgvc/cub", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="root=.*data_dir="):
    input_pipeline.get_source("fgvc/cub")
  with pytest.raises(ValueError, match="valid names: .*fgvc/cub"):
    input_pipeline.get_source("fgvc/aircraft", data_dir=str(tmp_path))
  _write_fgvc(root)
  open_cub = lambda: input_pipeline.get_source("fgvc/cub", root=str(root), check_num_classes=False)
  os.remove(root / "images" / "295.bird" / "test_3.jpg")
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=r"1 listed image.*test_3.jpg \(listed in .*test.json\)"):
    open_cub()
  _write_png(str(root / "images" / "295.bird" / "test_3.jpg"), 0)
  val = json.loads((root / "val.json").read_text())
  (root / "val.json").write_text(json.dumps({**val, "295.bird/val_0.jpg": 7}))
  with pytest.raises(ValueError, match="val.json gives '295.bird/val_0.jpg' the label 7, which "
                                       "train.json never uses"):
    open_cub()
  (root / "val.json").write_text(json.dumps({**val, "295.bird/val_0.jpg": 1.5}))
  with pytest.raises(ValueError, match="val.json gives .* the label 1.5; expected a non-negative"):
    open_cub()
  (root / "val.json").write_text("[]")
  with pytest.raises(ValueError, match="val.json must be a non-empty json object"):
    open_cub()
  os.remove(root / "val.json")
  with pytest.raises(input_pipeline.DataNotFoundError, match="val.json does not exist"):
    open_cub()


def test_fgvc_end_to_end_batches_with_fgvc_augmentation(tmp_path):
  _write_fgvc(tmp_path / "dogs", "Images")
  source = input_pipeline.get_source("fgvc/dogs", data_dir=str(tmp_path), check_num_classes=False)
  tail = "value_range(0, 1)|normalize('inception')"  # VPT's FGVC transforms at 4 px
  train_pp = preprocess.make_preprocess_fn(f"resize_shorter_side(5)|random_crop(4)|flip_lr|{tail}")
  eval_pp = preprocess.make_preprocess_fn(f"resize_shorter_side(5)|center_crop(4)|{tail}")
  train = pipeline.make_train_dataset(source, "train", train_pp, global_batch_size=4, seed=0)
  batches = [b for _, b in zip(range(5), train.as_numpy_iterator())]
  assert all(b["image"].shape == (4, 4, 4, 3) and b["image"].dtype == np.float32 for b in batches)
  first_epoch = np.concatenate([b["label"] for b in batches])[:9]
  assert np.bincount(first_epoch).tolist() == [3, 3, 3]
  evals = list(pipeline.make_eval_dataset(source, "test", eval_pp, global_batch_size=4)
               .as_numpy_iterator())
  assert [b["image"].shape for b in evals] == [(4, 4, 4, 3)] * 2
  assert [int(b["_mask"].sum()) for b in evals] == [4, 2]


# ---------------------------------------------------------------- VTAB-1k file lists

def _write_vtab_task(folder, sizes, num_classes):
  """The four SSF lists; image paths images/<split>/<i>.jpg, label = index % num_classes."""
  index = 0
  lines = {}
  for split in ("train800", "val200", "test"):
    lines[split] = []
    for i in range(sizes[split]):
      relative = f"images/{split}/{i:06d}.jpg"
      _write_png(os.path.join(folder, relative), index)
      lines[split].append(f"{relative} {index % num_classes}")
      index += 1
  lines["train800val200"] = lines["train800"] + lines["val200"]
  for split, split_lines in lines.items():
    with open(os.path.join(folder, f"{split}.txt"), "w") as f:
      f.write("\n".join(split_lines) + "\n")


def test_vtab1k_file_lists(tmp_path):
  _write_vtab_task(tmp_path / "dmlab", {"train800": 8, "val200": 2, "test": 5}, num_classes=6)
  source = input_pipeline.get_source("vtab1k_files/dmlab", data_dir=str(tmp_path))
  assert source.num_classes == 6 and source.splits == ("train800", "val200", "train800val200",
                                                       "test")
  assert {s: source.num_examples(s) for s in source.splits} == {
      "train800": 8, "val200": 2, "train800val200": 10, "test": 5}
  assert _examples(source, "train800val200") == [(i, i % 6) for i in range(10)]
  assert _examples(source, "test") == [(i, i % 6) for i in range(10, 15)]
  _check_host_slices(source, "train800val200")
  same = input_pipeline.get_source("vtab1k_files/dmlab", root=str(tmp_path / "dmlab"))
  assert _examples(same, "val200") == [(8, 2), (9, 3)]
  assert {f"vtab1k_files/{t}" for t in input_pipeline.VTAB_TASKS} <= set(
      input_pipeline.SOURCE_NAMES)


def test_vtab1k_file_list_errors(tmp_path):
  folder = tmp_path / "kitti"  # 4 classes
  _write_vtab_task(folder, {"train800": 3, "val200": 1, "test": 2}, num_classes=4)
  open_kitti = lambda: input_pipeline.get_source("vtab1k_files/kitti", data_dir=str(tmp_path))
  (folder / "val200.txt").write_text("images/val200/000000.jpg 4\n")
  with pytest.raises(ValueError, match=r"val200.txt gives .*000000.jpg the label 4; expected 0 <= "
                                       r"label < 4"):
    open_kitti()
  (folder / "val200.txt").write_text("images/val200/000000.jpg\n")
  with pytest.raises(ValueError, match="val200.txt line 1 is 'images/val200/000000.jpg'"):
    open_kitti()
  (folder / "val200.txt").write_text("images/val200/000099.jpg 1\n")
  with pytest.raises(input_pipeline.DataNotFoundError, match="000099.jpg.*val200.txt"):
    open_kitti()
  os.remove(folder / "test.txt")
  with pytest.raises(input_pipeline.DataNotFoundError, match="split file .*test.txt does not"):
    open_kitti()
  with pytest.raises(input_pipeline.DataNotFoundError, match="nowhere does not exist"):
    input_pipeline.get_source("vtab1k_files/kitti", root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- HTA under mock_data

REAL_SIZES = {  # builder: (version, TFDS split sizes)
    "cifar10": ("3.*.*", {"train": 50000, "test": 10000}),
    "cifar100": ("3.*.*", {"train": 50000, "test": 10000}),
    "dtd": ("3.*.*", {"train": 1880, "validation": 1880, "test": 1880}),
    "food101": ("2.*.*", {"train": 75750, "validation": 25250}),
    "svhn_cropped": ("3.1.*", {"train": 73257, "test": 26032, "extra": 531131}),
}
HTA_SIZES = {  # (classes, train, val, test): DAM-VP's int(0.8 N) / N - int(0.8 N)
    "cifar10": (10, 40000, 10000, 10000),
    "cifar100": (100, 40000, 10000, 10000),
    "dtd": (47, 1880, 1880, 1880),
    "food101": (101, 60600, 15150, 25250),
    "svhn": (10, 58605, 14652, 26032),
}


@pytest.fixture(scope="module")
def hta_metadata_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("hta_metadata"))
  for builder_name, (version, sizes) in REAL_SIZES.items():
    _write_metadata(data_dir, builder_name, version, sizes)
  return data_dir


@pytest.mark.parametrize("dataset", list(HTA_SIZES))
def test_hta_tfds_sizes_under_mock_data(dataset, hta_metadata_dir):
  with tfds.testing.mock_data(num_examples=3, data_dir=hta_metadata_dir):
    source = input_pipeline.get_source(f"hta/{dataset}", data_dir=hta_metadata_dir)
    num_classes, *sizes = HTA_SIZES[dataset]
    assert source.num_classes == num_classes and source.splits == ("train", "val", "test")
    assert [source.num_examples(s) for s in source.splits] == sizes
    examples = list(source.dataset("test").as_numpy_iterator())
  assert examples and all(ex["image"].shape[2] == 3 and ex["image"].dtype == np.uint8 and
                          0 <= ex["label"] < num_classes for ex in examples)
  if dataset == "food101":  # labels by sorted class name: TFDS has cheesecake before cheese_plate
    assert source.label_map[16] == 17 and source.label_map[17] == 16
    assert sorted(source.label_map.tolist()) == list(range(101))


def test_hta_names_and_missing_tfds_data(tmp_path):
  assert {n for n in input_pipeline.SOURCE_NAMES if n.startswith("hta/")} == {
      f"hta/{d}" for d in ("cifar10", "cifar100", "dtd", "cub", "nabirds", "dogs", "flowers",
                           "food101", "gtsrb", "svhn")}
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=f"(?s)'hta/svhn'.*svhn_cropped.*tfds build svhn_cropped:3.1.0 "
                           f"--data_dir {tmp_path}"):
    input_pipeline.get_source("hta/svhn", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="valid names: .*hta/gtsrb"):
    input_pipeline.get_source("hta/imagenet")


# ---------------------------------------------------------------- HTA on tiny real TFDS data

def _store(data_dir, name, version, features, splits):
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=features, data_dir=data_dir, disable_shuffling=True,
      split_datasets={s: tf.data.Dataset.from_tensor_slices(d) for s, d in splits.items()})


@pytest.fixture(scope="module")
def tiny_hta_dir(tmp_path_factory):
  """cifar10 (train 50 stored in a shuffled order, ids = original index) and food101."""
  data_dir = str(tmp_path_factory.mktemp("hta_tiny"))
  order = np.random.default_rng(3).permutation(50)
  images = lambda idx: np.stack([_index_image(i, (32, 32)) for i in idx])
  _store(data_dir, "cifar10", "3.0.2", tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(32, 32, 3)),
      "label": tfds.features.ClassLabel(num_classes=10), "id": tfds.features.Text()}), {
          "train": {"image": images(order), "label": order % 10,
                    "id": [f"train_{i:05d}" for i in order]},
          "test": {"image": images(range(100, 107)), "label": np.arange(7),
                   "id": [f"test_{i:05d}" for i in range(7)]}})
  names = tfds.builder_cls("food101")(data_dir=data_dir).info.features["label"].names
  _store(data_dir, "food101", "2.0.0", tfds.features.FeaturesDict({
      "image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=names)}), {
          "train": {"image": images(range(20)), "label": np.full(20, 16)},
          "validation": {"image": images(range(100, 105)), "label": np.full(5, 17)}})
  return data_dir


def test_hta_first_80_percent_in_original_order(tiny_hta_dir):
  source = input_pipeline.get_source("hta/cifar10", data_dir=tiny_hta_dir)
  assert [source.num_examples(s) for s in source.splits] == [40, 10, 7]
  train, val = _examples(source, "train"), _examples(source, "val")
  assert sorted(train) == [(i, i % 10) for i in range(40)]  # ids 0..39, not TFDS's first 40
  assert sorted(val) == [(i, i % 10) for i in range(40, 50)]
  assert _examples(source, "test") == [(100 + i, i) for i in range(7)]
  with pytest.raises(ValueError, match="'hta/cifar10'.*valid splits: train, val, test"):
    source.dataset("train800")
  for count in (2, 3):  # host i: original indices [i n/P, (i+1) n/P), in TFDS's order
    blocks = [_examples(source, "train", process_index=i, process_count=count)
              for i in range(count)]
    assert [sorted(b) for b in blocks] == [
        [(j, j % 10) for j in range(i * 40 // count, (i + 1) * 40 // count)] for i in range(count)]
    _check_host_slices(source, "test")


def test_hta_seeded_random_80_percent(tiny_hta_dir):
  source = input_pipeline.get_source("hta/food101", data_dir=tiny_hta_dir)
  assert [source.num_examples(s) for s in source.splits] == [16, 4, 5]
  train, val = _examples(source, "train"), _examples(source, "val")
  assert sorted(i for i, _ in train + val) == list(range(20))
  assert train != [(i, 17) for i in range(16)]                    # random, not the first 16
  assert {label for _, label in train + val} == {17}              # TFDS 16 = cheesecake -> 17
  assert _examples(source, "test")[0] == (100, 16)
  assert _examples(input_pipeline.get_source("hta/food101", data_dir=tiny_hta_dir), "val") == val
  other = input_pipeline.get_source("hta/food101", data_dir=tiny_hta_dir, split_seed=1)
  assert _examples(other, "val") != val
  _check_host_slices(source, "train")


# ---------------------------------------------------------------- HTA: GTSRB and FGVC datasets

def _ppm(index):
  image = _index_image(index, (5, 4))
  return b"P6\n4 5\n255\n" + image.tobytes()


def _write_gtsrb(root, per_class=(4, 3, 3), test_labels=(2, 0, 1, 1)):
  index = 0
  for label, n in enumerate(per_class):
    folder = root / "GTSRB" / "Training" / f"{label:05d}"
    folder.mkdir(parents=True)
    (folder / f"GT-{label:05d}.csv").write_text("not an image")
    for i in range(n):
      (folder / f"00000_{i:05d}.ppm").write_bytes(_ppm(index))
      index += 1
  images = root / "GTSRB" / "Final_Test" / "Images"
  images.mkdir(parents=True)
  with open(root / "GT-final_test.csv", "w", newline="") as f:
    writer = csv.writer(f, delimiter=";")
    writer.writerow(["Filename", "Width", "Height", "ClassId"])
    for i, label in enumerate(test_labels):
      (images / f"{i:05d}.ppm").write_bytes(_ppm(100 + i))
      writer.writerow([f"{i:05d}.ppm", 4, 5, label])


def test_gtsrb_folders_ppm_and_seeded_split(tmp_path):
  _write_gtsrb(tmp_path / "gtsrb")
  with pytest.raises(ValueError, match="3 class folders, expected 43"):
    input_pipeline.get_source("hta/gtsrb", data_dir=str(tmp_path))
  source = input_pipeline.get_source("hta/gtsrb", data_dir=str(tmp_path), check_num_classes=False)
  assert source.num_classes == 3 and [source.num_examples(s) for s in source.splits] == [8, 2, 4]
  labels = [0] * 4 + [1] * 3 + [2] * 3
  train, val = _examples(source, "train"), _examples(source, "val")
  assert sorted(train + val) == [(i, labels[i]) for i in range(10)]
  assert train != sorted(train)  # a seeded shuffle
  assert _examples(source, "test") == [(100, 2), (101, 0), (102, 1), (103, 1)]
  ex = next(source.dataset("test").as_numpy_iterator())
  np.testing.assert_array_equal(ex["image"], _index_image(100, (5, 4)))
  _check_host_slices(source, "train")
  with pytest.raises(ValueError, match="'hta/gtsrb'.*valid splits: train, val, test"):
    source.dataset("trainval")
  os.remove(tmp_path / "gtsrb" / "GT-final_test.csv")
  with pytest.raises(input_pipeline.DataNotFoundError, match="GT-final_test.csv does not exist"):
    input_pipeline.get_source("hta/gtsrb", root=str(tmp_path / "gtsrb"), check_num_classes=False)


def test_hta_fgvc_datasets_are_the_fgvc_sources(tmp_path):
  _write_fgvc(tmp_path / "OxfordFlower", "")
  source = input_pipeline.get_source("hta/flowers", data_dir=str(tmp_path),
                                     check_num_classes=False)
  assert source.name == "hta/flowers" and isinstance(source, fgvc.FgvcSource)
  assert _examples(source, "val") == [(9, 0), (10, 1), (11, 2)]
  assert set(hta.HTA_FGVC) == {"cub", "nabirds", "dogs", "flowers"}
