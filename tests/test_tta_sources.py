"""input_pipeline: the TTA test sets, ImageNet and its shifts (TFDS) and CoOp's fine-grained sets.

No real data: the TFDS sources run under `tfds.testing.mock_data` with split metadata of the real
sizes (and hand-made examples where the label matters); the CoOp sources read tiny split files,
txt lists and PNGs written by the tests. The ImageNet-A/-R label facts (1000-way index -> 200-way
label -> name) are TPT's (azshue/TPT `data/imagenet_variants.py` `thousand_k_to_200`,
`imagenet_r_mask`; `data/imagnet_prompts.py` `imagenet_classes`).
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from input_pipeline import coop_datasets, imagenet_variants
from input_pipeline.imagenet_class_names import IMAGENET_CLASS_NAMES
from test_input_pipeline import _write_metadata  # pylint: disable=import-error

# ---------------------------------------------------------------- ImageNet variants (TFDS)

REAL_SIZES = {  # TFDS builder: (version, split sizes)
    "imagenet2012": ("5.*.*", {"train": 1281167, "validation": 50000, "test": 100000}),
    "imagenet_a": ("0.1.*", {"test": 7500}),
    "imagenet_r": ("0.*.*", {"test": 30000}),
    **{f"imagenet_v2/{config}": ("3.*.*", {"test": 10000})
       for config in imagenet_variants.IMAGENET_V2_CONFIGS},
    "imagenet_sketch": ("1.*.*", {"test": 50889}),
}
SOURCE_SIZES = {"imagenet/val": (1000, 50000), "imagenet_a": (200, 7500),
                "imagenet_r": (200, 30000), "imagenet_v2": (1000, 10000),
                "imagenet_sketch": (1000, 50889)}
# TFDS (1000-way ImageNet) label -> (our label, its class name), from TPT's tables.
SUBSET_LABELS = {
    "imagenet_a": {6: (0, "stingray"), 11: (1, "goldfinch"), 13: (2, "junco"),
                   988: (199, "acorn")},
    "imagenet_r": {1: (0, "goldfish"), 2: (1, "great white shark"), 4: (2, "hammerhead shark"),
                   988: (199, "acorn")},
}
OUTSIDE_SUBSET = {"imagenet_a": 0, "imagenet_r": 3}  # tench, tiger shark


@pytest.fixture(scope="module")
def imagenet_metadata_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("imagenet_metadata"))
  for builder_name, (version, sizes) in REAL_SIZES.items():
    _write_metadata(data_dir, builder_name, version, sizes)
  return data_dir


def _labelled_examples(tfds_labels):
  """An as_dataset_fn for mock_data: PNG-encoded 5x7 images with the given TFDS labels."""
  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    png = tf.io.encode_png(np.full((5, 7, 3), 9, np.uint8)).numpy()
    return tf.data.Dataset.from_tensor_slices(
        {"image": [png] * len(tfds_labels), "label": np.array(tfds_labels, np.int64)})
  return as_dataset


@pytest.mark.parametrize("name", list(SOURCE_SIZES))
def test_imagenet_variant_sizes_and_names(name, imagenet_metadata_dir):
  with tfds.testing.mock_data(data_dir=imagenet_metadata_dir,
                              as_dataset_fn=_labelled_examples([988, 988])):  # acorn
    source = input_pipeline.get_source(name, data_dir=imagenet_metadata_dir)
    examples = list(source.dataset("test").as_numpy_iterator())
  num_classes, size = SOURCE_SIZES[name]
  assert source.splits == ("test",) and source.num_examples("test") == size
  assert source.num_classes == len(source.class_names) == len(source.wnids) == num_classes
  if num_classes == 1000:
    assert source.class_names == IMAGENET_CLASS_NAMES
  assert [int(ex["label"]) for ex in examples] == [988 if num_classes == 1000 else 199] * 2
  assert {source.class_names[ex["label"]] for ex in examples} == {"acorn"}
  assert all(ex["image"].dtype == np.uint8 and ex["image"].shape == (5, 7, 3) for ex in examples)


@pytest.mark.parametrize("name", list(SUBSET_LABELS))
def test_imagenet_a_r_labels_remapped_with_their_names(name, imagenet_metadata_dir):
  facts = SUBSET_LABELS[name]
  with tfds.testing.mock_data(data_dir=imagenet_metadata_dir,
                              as_dataset_fn=_labelled_examples(list(facts))):
    source = input_pipeline.get_source(name, data_dir=imagenet_metadata_dir)
    examples = list(source.dataset("test").as_numpy_iterator())
  assert [int(ex["label"]) for ex in examples] == [label for label, _ in facts.values()]
  assert [source.class_names[ex["label"]] for ex in examples] == [n for _, n in facts.values()]
  assert examples[0]["image"].shape == (5, 7, 3)
  assert sorted(source.wnids) == list(source.wnids) and len(set(source.wnids)) == 200
  assert (source.label_map >= 0).sum() == 200 and source.label_map.max() == 199

  with tfds.testing.mock_data(data_dir=imagenet_metadata_dir,
                              as_dataset_fn=_labelled_examples([OUTSIDE_SUBSET[name]])):
    source = input_pipeline.get_source(name, data_dir=imagenet_metadata_dir)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"outside the 200 classes of the data source {name}"):
      list(source.dataset("test"))


def test_imagenet_hosts_read_disjoint_blocks(imagenet_metadata_dir):
  read = []

  def record(self, split, decoders=None, read_config=None, **kwargs):
    read.append(str(split))
    return _labelled_examples([988])(self, split, decoders, read_config, **kwargs)

  with tfds.testing.mock_data(data_dir=imagenet_metadata_dir, as_dataset_fn=record):
    source = input_pipeline.get_source("imagenet/val", data_dir=imagenet_metadata_dir)
    for host in range(3):
      source.raw_dataset("test", process_index=host, process_count=3)
  assert read == ["validation[0:16666]", "validation[16666:33333]", "validation[33333:50000]"]
  with pytest.raises(ValueError, match="Unknown split 'validation' for data source "
                                       "'imagenet/val'; valid splits: test"):
    source.num_examples("validation")


def test_imagenet_v2_configs(imagenet_metadata_dir):
  with tfds.testing.mock_data(num_examples=1, data_dir=imagenet_metadata_dir):
    for config in imagenet_variants.IMAGENET_V2_CONFIGS:
      source = input_pipeline.get_source("imagenet_v2", data_dir=imagenet_metadata_dir,
                                         tfds_config=config)
      assert source._builder.builder_config.name == config  # pylint: disable=protected-access
    default = input_pipeline.get_source("imagenet_v2", data_dir=imagenet_metadata_dir)
    # pylint: disable-next=protected-access
    assert default._builder.builder_config.name == "matched-frequency"
    with pytest.raises(ValueError, match="tfds_config='top-images'; expected one of .*topimages"):
      input_pipeline.get_source("imagenet_v2", data_dir=imagenet_metadata_dir,
                                tfds_config="top-images")
    with pytest.raises(ValueError, match="'imagenet_a' has no TFDS configs"):
      input_pipeline.get_source("imagenet_a", data_dir=imagenet_metadata_dir,
                                tfds_config="matched-frequency")


def test_imagenet_variants_never_download(tmp_path):
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=f"(?s)'imagenet_a'.*tfds build imagenet_a:0.1.0 --data_dir {tmp_path}"):
    input_pipeline.get_source("imagenet_a", data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=f"(?s)tfds build imagenet2012:5.1.0 --data_dir {tmp_path}.*manual "
                           f"download first, into {tmp_path}/downloads/manual.*ILSVRC2012"):
    input_pipeline.get_source("imagenet/val", data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match="tfds build imagenet_v2/threshold-0.7:3.0.0"):
    input_pipeline.get_source("imagenet_v2", data_dir=str(tmp_path), tfds_config="threshold-0.7")


# ---------------------------------------------------------------- CoOp's fine-grained sets

def _write_image(path, index):
  """A 4x6 PNG whose pixel (0, 0) is (index, 0, 0)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.full((4, 6, 3), 50, np.uint8)
  image[0, 0, 0] = index
  tf.io.write_file(path, tf.io.encode_png(image))


def _write_split_file(root, split_file, image_dir, splits):
  """CoOp's split json {split: [[path, label, class name]]}, and the images it lists."""
  os.makedirs(root, exist_ok=True)
  index = 0
  for entries in splits.values():
    for image, _, _ in entries:
      _write_image(os.path.join(root, image_dir, image), index)
      index += 1
  with open(os.path.join(root, split_file), "w") as f:
    json.dump(splits, f)


DTD_SPLITS = {  # labels out of name order in the file; class names as CoOp stores them
    "train": [["cracked/c_1.png", 1, "cracked"], ["banded/b_1.png", 0, "banded"],
              ["zig_zagged/z_1.png", 2, "zig_zagged"]],
    "val": [["banded/b_2.png", 0, "banded"]],
    "test": [["zig_zagged/z_2.png", 2, "zig_zagged"], ["cracked/c_2.png", 1, "cracked"]],
}
CARS_SPLITS = {  # StanfordCars' paths are relative to the dataset folder itself
    "train": [["cars_train/00001.png", 0, "2000 AM General Hummer SUV"]],
    "val": [["cars_train/00002.png", 1, "2012 Acura RL Sedan"]],
    "test": [["cars_test/00001.png", 1, "2012 Acura RL Sedan"],
             ["cars_test/00002.png", 0, "2000 AM General Hummer SUV"]],
}


def test_coop_split_file_sources(tmp_path):
  data_dir = str(tmp_path)
  _write_split_file(os.path.join(data_dir, "dtd"), "split_zhou_DescribableTextures.json",
                    "images", DTD_SPLITS)
  _write_split_file(os.path.join(data_dir, "stanford_cars"), "split_zhou_StanfordCars.json", "",
                    CARS_SPLITS)
  dtd = input_pipeline.get_source("coop/dtd", data_dir=data_dir, check_num_classes=False)
  assert dtd.class_names == ("banded", "cracked", "zig_zagged") and dtd.num_classes == 3
  assert dtd.splits == ("train", "val", "test")
  assert [dtd.num_examples(s) for s in dtd.splits] == [3, 1, 2]
  test = list(dtd.dataset("test").as_numpy_iterator())
  assert [int(ex["label"]) for ex in test] == [2, 1]
  assert [ex["image"].shape for ex in test] == [(4, 6, 3)] * 2
  assert [int(ex["image"][0, 0, 0]) for ex in test] == [4, 5]  # the file's order, images/...

  cars = input_pipeline.get_source("coop/stanford_cars",
                                   root=os.path.join(data_dir, "stanford_cars"),
                                   check_num_classes=False)
  assert cars.class_names == ("2000 AM General Hummer SUV", "2012 Acura RL Sedan")
  assert [cars.num_examples(s) for s in cars.splits] == [1, 1, 2]
  test = list(cars.dataset("test").as_numpy_iterator())
  assert [(int(ex["label"]), int(ex["image"][0, 0, 0])) for ex in test] == [(1, 2), (0, 3)]
  with pytest.raises(ValueError, match="split_zhou_StanfordCars.json has 2 classes, expected 196"):
    input_pipeline.get_source("coop/stanford_cars", data_dir=data_dir)


def test_coop_fgvc_aircraft_txt_lists(tmp_path):
  root = tmp_path / "fgvc_aircraft"
  root.mkdir()
  (root / "variants.txt").write_text("707-320\nFalcon 2000\nDC-10\n")
  lists = {"train": ["0034309 DC-10", "0056978 707-320", "1025794 Falcon 2000"],
           "val": ["0062765 Falcon 2000"], "test": ["0112905 707-320", "1201512 DC-10"]}
  index = 0
  for split, lines in lists.items():
    (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
      _write_image(str(root / "images" / f"{line.split()[0]}.jpg"), index)
      index += 1
  source = input_pipeline.get_source("coop/fgvc_aircraft", root=str(root),
                                     check_num_classes=False)
  assert source.class_names == ("707-320", "Falcon 2000", "DC-10")
  assert [source.num_examples(s) for s in source.splits] == [3, 1, 2]
  train = list(source.dataset("train").as_numpy_iterator())
  assert [(int(ex["label"]), int(ex["image"][0, 0, 0])) for ex in train] == [(2, 0), (0, 1),
                                                                              (1, 2)]
  (root / "images_variant_val.txt").write_text("0062765 Falcon 2000\n0062766 Falcon 900\n")
  with pytest.raises(ValueError, match=r"images_variant_val.txt line 2 gives image '0062766' the "
                                       r"variant 'Falcon 900', which is not in .*variants.txt"):
    input_pipeline.get_source("coop/fgvc_aircraft", root=str(root), check_num_classes=False)
  (root / "images_variant_val.txt").write_text("0062765 Falcon 2000\n")
  os.remove(root / "images_variant_test.txt")
  with pytest.raises(input_pipeline.DataNotFoundError, match="images_variant_test.txt does not"):
    input_pipeline.get_source("coop/fgvc_aircraft", root=str(root), check_num_classes=False)


def _split_file_error(tmp_path, content):
  root = tmp_path / "eurosat"
  root.mkdir(exist_ok=True)
  (root / "split_zhou_EuroSAT.json").write_text(content)
  return input_pipeline.get_source("coop/eurosat", root=str(root), check_num_classes=False)


def test_coop_errors(tmp_path):
  assert {n for n in input_pipeline.SOURCE_NAMES if n.startswith("coop/")} == {
      f"coop/{d}" for d in ("oxford_flowers", "dtd", "oxford_pets", "stanford_cars", "ucf101",
                            "caltech101", "food101", "sun397", "fgvc_aircraft", "eurosat")}
  assert [d.num_classes for d in coop_datasets.COOP_DATASETS.values()] == [
      102, 47, 37, 196, 101, 100, 101, 397, 100, 10]
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=f"'coop/sun397': folder {tmp_path}/sun397 does not exist; expected "
                           "split_zhou_SUN397.json and the images"):
    input_pipeline.get_source("coop/sun397", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'coop/ucf101' needs root=<its folder> or data_dir="):
    input_pipeline.get_source("coop/ucf101")
  (tmp_path / "eurosat").mkdir()
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match="eurosat/split_zhou_EuroSAT.json does not exist; expected CoOp's split"):
    input_pipeline.get_source("coop/eurosat", data_dir=str(tmp_path))
  bad = {
      "{'train': []": "split_zhou_EuroSAT.json is not valid json",
      '{"train": [], "val": []}': r"must be a json object with the lists train, val, test; found "
                                  r"\['train', 'val'\]",
      '{"train": [["a.jpg", "0", "Forest"]], "val": [], "test": []}':
          r"split_zhou_EuroSAT.json train\[0\] is \['a.jpg', '0', 'Forest'\]; expected \[image "
          r"path, integer label, class name\]",
      '{"train": [["a.jpg", 0, "Forest"]], "val": [["b.jpg", 0, "River"]], "test": []}':
          "names class 0 both 'Forest' and 'River' \\(val: b.jpg\\)",
      '{"train": [["a.jpg", 0, "Forest"]], "val": [["b.jpg", 2, "River"]], "test": []}':
          r"labels in .*split_zhou_EuroSAT.json are 0..2; expected every label 0..1 \(missing "
          r"\[1\]\)",
      '{"train": [], "val": [], "test": []}': "split_zhou_EuroSAT.json lists no images",
  }
  for content, message in bad.items():
    with pytest.raises(ValueError, match=message):
      _split_file_error(tmp_path, content)
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=r"1 listed image\(s\) do not exist, e.g. .*eurosat/2750/Forest/a.jpg "
                           r"\(listed in .*split_zhou_EuroSAT.json \(train\)\)"):
    _split_file_error(tmp_path, '{"train": [["Forest/a.jpg", 0, "Forest"]], "val": [], '
                                '"test": []}')
