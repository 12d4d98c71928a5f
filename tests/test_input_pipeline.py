"""input_pipeline: VTAB table and splits, per-host slicing, train/eval streams, folder and embedded.

No real dataset is downloaded. The 19 VTAB tasks run under `tfds.testing.mock_data`, with split
metadata of the real sizes written to a tmp data_dir (so split boundaries resolve as on the real
data). Split regions and host slices are checked on tiny REAL TFDS datasets, stored under the
VTAB builder names with `store_as_tfds_dataset`, whose images carry their own index in a pixel.
"""
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from input_pipeline import embedded, pipeline, preprocess, vtab

# The VTAB-1k table of the spec (§4.1): classes, VPT's val200 region on the real split sizes, and
# the size of the test split.
SPEC = {
    "cifar": (100, "train[45000:45200]", 10000),
    "caltech101": (102, "train[2754:2954]", 6084),
    "dtd": (47, "validation[0:200]", 1880),
    "oxford_flowers102": (102, "validation[0:200]", 6149),
    "oxford_iiit_pet": (37, "train[2944:3144]", 3669),
    "svhn": (10, "train[65931:66131]", 26032),
    "sun397": (397, "validation[0:200]", 21750),
    "patch_camelyon": (2, "validation[0:200]", 32768),
    "eurosat": (10, "train[16200:16400]", 5400),
    "resisc45": (45, "train[18900:19100]", 6300),
    "diabetic_retinopathy": (5, "validation[0:200]", 42670),
    "clevr_count": (8, "train[63000:63200]", 15000),
    "clevr_dist": (6, "train[63000:63200]", 15000),
    "dmlab": (6, "validation[0:200]", 22735),
    "kitti": (4, "validation[0:200]", 711),
    "dsprites_loc": (16, "train[589824:590024]", 73728),
    "dsprites_ori": (16, "train[589824:590024]", 73728),
    "smallnorb_azi": (18, "test[0:200]", 12150),
    "smallnorb_ele": (9, "test[0:200]", 12150),
}

# Sizes of the real TFDS splits (tensorflow_datasets catalog).
REAL_SPLIT_SIZES = {
    "cifar100": {"train": 50000, "test": 10000},
    "caltech101": {"train": 3060, "test": 6084},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn_cropped": {"train": 73257, "test": 26032, "extra": 531131},
    "sun397/tfds": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat/rgb": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection/btgraham-300": {"train": 35126, "validation": 10906,
                                                    "test": 42670},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites": {"train": 737280},
    "smallnorb": {"train": 24300, "test": 24300},
}


def _write_metadata(data_dir, builder_name, version, sizes, stored_version=None):
  """dataset_info.json + features.json as `tfds build` would leave them, without any examples."""
  builder = tfds.builder(f"{builder_name}:{version}", data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                          filename_template=tfds.core.ShardedFileTemplate(
                              data_dir=builder.data_dir, dataset_name=builder.name, split=split,
                              filetype_suffix="tfrecord"))
      for split, n in sizes.items()]))
  out = str(builder.data_dir)
  if stored_version:  # as prepared by an older tensorflow_datasets
    out = os.path.join(os.path.dirname(out), stored_version)
  os.makedirs(out, exist_ok=True)
  builder.info.write_to_directory(out)
  if stored_version:
    path = os.path.join(out, "dataset_info.json")
    with open(path) as f:
      info = json.load(f)
    with open(path, "w") as f:
      json.dump({**info, "version": stored_version}, f)


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_metadata"))
  versions = {task.builder: task.version for task in vtab.VTAB_TASKS.values()}
  for builder_name, sizes in REAL_SPLIT_SIZES.items():
    if builder_name == "oxford_iiit_pet":  # VPT's 3.x; the installed TFDS only has 4.0.0 code
      _write_metadata(data_dir, builder_name, "4.*.*", sizes, stored_version="3.2.0")
    else:
      _write_metadata(data_dir, builder_name, versions[builder_name], sizes)
  return data_dir


def _png(value=0):
  return tf.io.encode_png(np.full((4, 6, 3), value, np.uint8)).numpy()


def _objects_as_dataset(objects):
  """An as_dataset_fn for mock_data yielding hand-made 'objects' (clevr, kitti), images encoded."""
  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    key_a, key_b = objects[0].keys()
    examples = [{"image": _png(), "objects": o} for o in objects]
    signature = {"image": tf.TensorSpec((), tf.string), "objects": {
        key: tf.TensorSpec((None,) + np.shape(objects[0][key])[1:],
                           tf.as_dtype(np.asarray(objects[0][key]).dtype))
        for key in (key_a, key_b)}}
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
  return as_dataset


# Hand-made objects and the labels task_adaptation derives from them.
_Z = lambda *zs: np.array([[0.0, 0.0, z] for z in zs], np.float32)
DERIVED = {
    # count = #objects - 3
    "clevr_count": ([{"size": np.zeros(n, np.int64), "pixel_coords": _Z(*[9.0] * n)}
                     for n in (3, 10, 6)], [0, 7, 3]),
    # closest depth in [0, 8, 8.5, 9, 9.5, 10, 100]
    "clevr_dist": ([{"size": np.zeros(len(z), np.int64), "pixel_coords": _Z(*z)}
                    for z in ((12.0, 8.2), (7.5,), (9.7, 11.0), (10.5, 99.0))], [1, 0, 4, 5]),
    # closest Car/Van/Truck (type < 3) in [-100, 8, 20, 999]; none -> 3
    "kitti": ([{"type": np.array(t, np.int64), "location": _Z(*z)}
               for t, z in (([3, 0], (2.0, 5.0)), ([1], (12.0,)), ([2, 0], (25.0, 40.0)),
                            ([5], (3.0,)))], [0, 1, 2, 3]),
}


@pytest.mark.parametrize("task", list(SPEC))
def test_vtab_task_under_mock_data(task, metadata_dir):
  num_classes, val200, test_size = SPEC[task]
  kwargs = {}
  if task in DERIVED:
    kwargs["as_dataset_fn"] = _objects_as_dataset(DERIVED[task][0])
  with tfds.testing.mock_data(num_examples=3, data_dir=metadata_dir, **kwargs):
    source = input_pipeline.get_source(f"vtab/{task}", data_dir=metadata_dir)
    assert source.num_classes == num_classes
    assert source.splits == ("train800", "val200", "train800val200", "test")
    sizes = {split: source.num_examples(split) for split in source.splits}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}
    assert source.tfds_split("val200") == val200
    assert source.tfds_split("train800val200") == f"train[0:800]+{val200}"
    examples = list(source.dataset("train800val200").as_numpy_iterator())
  for ex in examples:
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["image"].shape[2] == 3
    assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
    assert 0 <= ex["label"] < num_classes
  if task in DERIVED:
    assert [int(ex["label"]) for ex in examples] == DERIVED[task][1]


def test_vtab_table_names_match_the_spec():
  assert set(vtab.VTAB_TASKS) == set(SPEC)
  assert {t: vtab.VTAB_TASKS[t].num_classes for t in SPEC} == {t: s[0] for t, s in SPEC.items()}


# ---------------------------------------------------------------- tiny real TFDS data

def _indexed_split(n, split_code, num_classes):
  """n examples whose image pixel (0, 0) = (index % 256, index // 256, split_code)."""
  images = np.zeros((n, 4, 4, 3), np.uint8)
  images[:, 0, 0] = np.stack([np.arange(n) % 256, np.arange(n) // 256,
                              np.full(n, split_code)], axis=1)
  return tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(n, dtype=np.int64) % num_classes})


def _ids(dataset):
  """(split_code, index) of every example of a decoded dataset, in order."""
  return [(int(im[0, 0, 2]), int(im[0, 0, 0]) + 256 * int(im[0, 0, 1]))
          for im in (ex["image"] for ex in dataset.as_numpy_iterator())]


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """eurosat/rgb (train only, val200 = train[60%:+200]) and dtd (val200 = validation[:200])."""
  data_dir = str(tmp_path_factory.mktemp("tfds_tiny"))
  for name, config, version, classes, sizes in [
      ("eurosat", "rgb", "2.0.0", 10, {"train": 2000}),
      ("dtd", None, "3.0.1", 47, {"train": 850, "validation": 250, "test": 30})]:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(4, 4, 3)),
        "label": tfds.features.ClassLabel(num_classes=classes)})
    codes = {"train": 0, "validation": 1, "test": 2}
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, config=config, version=version, features=features, data_dir=data_dir,
        disable_shuffling=True,
        split_datasets={s: _indexed_split(n, codes[s], classes) for s, n in sizes.items()})
  return data_dir


def test_vtab_split_regions_on_real_tiny_data(tiny_tfds_dir):
  eurosat = input_pipeline.get_source("vtab/eurosat", data_dir=tiny_tfds_dir)
  sizes = {s: eurosat.num_examples(s) for s in eurosat.splits}
  assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 400}
  assert _ids(eurosat.dataset("train800")) == [(0, i) for i in range(800)]
  # val200 = train[T:T+200], T = 60% of 2000; NOT train[800:1000]
  assert _ids(eurosat.dataset("val200")) == [(0, i) for i in range(1200, 1400)]
  assert _ids(eurosat.dataset("test")) == [(0, i) for i in range(1600, 2000)]  # train[80%:]

  dtd = input_pipeline.get_source("vtab/dtd", data_dir=tiny_tfds_dir)
  assert _ids(dtd.dataset("val200")) == [(1, i) for i in range(200)]  # validation[:200]
  assert _ids(dtd.dataset("train800val200")) == (
      [(0, i) for i in range(800)] + [(1, i) for i in range(200)])
  assert _ids(dtd.dataset("test")) == [(2, i) for i in range(30)]
  labels = [int(ex["label"]) for ex in dtd.dataset("test").as_numpy_iterator()]
  assert labels == list(range(30))


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_slices_are_disjoint_and_cover_the_split(tiny_tfds_dir, process_count):
  source = input_pipeline.get_source("vtab/eurosat", data_dir=tiny_tfds_dir)
  slices = [_ids(source.dataset("train800val200", process_index=i, process_count=process_count))
            for i in range(process_count)]
  everything = _ids(source.dataset("train800val200"))
  assert sum(slices, []) == everything
  assert len(set(everything)) == 1000
  assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_missing_tfds_data_error_says_how_to_prepare(tmp_path):
  with pytest.raises(input_pipeline.DataNotFoundError) as e:
    input_pipeline.get_source("vtab/dtd", data_dir=str(tmp_path))
  message = str(e.value)
  assert "'dtd'" in message and "3.*.*" in message and str(tmp_path) in message
  assert f"tfds build dtd:3.0.1 --data_dir {tmp_path}" in message
  with pytest.raises(input_pipeline.DataNotFoundError, match="manual"):
    input_pipeline.get_source("vtab/diabetic_retinopathy", data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DataNotFoundError, match="tfds_version"):
    input_pipeline.get_source("vtab/oxford_iiit_pet", data_dir=str(tmp_path))


def test_unknown_names_and_splits_are_clear_errors(tiny_tfds_dir):
  for name in ("vtab/imagenet", "cifar", "embedded/circles"):
    with pytest.raises(ValueError, match="valid names: vtab/cifar.*embedded/shapes"):
      input_pipeline.get_source(name)
  source = input_pipeline.get_source("vtab/dtd", data_dir=tiny_tfds_dir)
  with pytest.raises(ValueError, match="'vtab/dtd'.*train800, val200, train800val200, test"):
    source.dataset("train")


# ---------------------------------------------------------------- embedded/shapes

def test_embedded_shapes_is_deterministic_balanced_and_learnable():
  start = time.perf_counter()
  source = input_pipeline.get_source("embedded/shapes")
  assert time.perf_counter() - start < 2.0
  again = embedded.ShapesSource()
  assert source.num_classes == 10 and source.splits == ("train", "val", "test")
  for split, n in (("train", 2000), ("val", 500), ("test", 1000)):
    images, labels = source.arrays(split)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert np.array_equal(images, again.arrays(split)[0])
    assert np.array_equal(labels, again.arrays(split)[1])
    assert source.num_examples(split) == n
  # The class signal is strong: nearest class mean on 8x8-pooled pixels already gets > 90%.
  pooled = lambda x: x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), -1)
  train_x, train_y = source.arrays("train")
  means = np.stack([pooled(train_x)[train_y == c].mean(0) for c in range(10)])
  test_x, test_y = source.arrays("test")
  guess = np.argmin(((pooled(test_x)[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(guess == test_y) > 0.9
  halves = [list(source.dataset("val", process_index=i, process_count=2).as_numpy_iterator())
            for i in range(2)]
  assert [len(h) for h in halves] == [250, 250]
  assert np.array_equal(np.stack([ex["image"] for ex in halves[0] + halves[1]]),
                        source.arrays("val")[0])


# ---------------------------------------------------------------- train / eval streams

def _take(dataset, n):
  return [b for _, b in zip(range(n), dataset.as_numpy_iterator())]


def _same(a, b):
  return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
             for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("spec", [
    "resize(16, antialias=False)|value_range(0, 1)|normalize('inception')",
    "resize_shorter_side(18)|random_crop(16)|flip_lr|value_range(0, 1)|normalize('inception')"],
                         ids=["resize", "crop_flip"])
def test_train_stream_is_deterministic_and_resumes_exactly(spec):
  source = input_pipeline.get_source("embedded/shapes")
  pp = preprocess.make_preprocess_fn(spec)
  make = lambda **kw: pipeline.make_train_dataset(source, "val", pp, global_batch_size=32,
                                                  **{"seed": 7, **kw})
  straight = _take(make(), 40)  # 500 examples: 40 steps cross two epoch boundaries
  assert straight[0]["image"].shape == (32, 16, 16, 3) and straight[0]["image"].dtype == np.float32
  assert straight[0]["label"].shape == (32,) and straight[0]["label"].dtype == np.int32
  assert _same(_take(make(), 40), straight)
  assert not np.array_equal(_take(make(seed=8), 1)[0]["label"], straight[0]["label"])
  for start in (1, 16, 33):
    assert _same(_take(make(start_step=start), 40 - start), straight[start:])
  # Each epoch is a permutation of the split.
  epoch = np.concatenate([b["label"] for b in _take(make(), 40)])[:500]
  assert np.bincount(epoch).tolist() == [50] * 10


@pytest.mark.parametrize("process_count", [2, 3])
def test_train_global_batches_do_not_depend_on_the_host_count(process_count):
  """Host p's batch k is rows [p·b, (p+1)·b) of the one-host batch k, augmentation included, and
  a run resumed on another host count continues the same global stream."""
  source = input_pipeline.get_source("embedded/shapes")
  pp = preprocess.make_preprocess_fn(
      "resize_shorter_side(18)|random_crop(16)|flip_lr|value_range(0, 1)")
  make = lambda **kw: pipeline.make_train_dataset(source, "val", pp, global_batch_size=24,
                                                  seed=3, **kw)
  straight = _take(make(), 25)  # 500 examples: 25 steps of 24 cross an epoch boundary
  for start in (0, 19):
    hosts = [_take(make(start_step=start, process_index=i, process_count=process_count),
                   25 - start) for i in range(process_count)]
    joined = [{k: np.concatenate([h[step][k] for h in hosts]) for k in ("image", "label")}
              for step in range(25 - start)]
    assert _same(joined, straight[start:])
    assert all(len(h[0]["label"]) == 24 // process_count for h in hosts)
  with pytest.raises(ValueError, match="process_index=2, process_count=2"):
    make(process_index=2, process_count=2)


def test_train_stream_on_tfds_source_skips_encoded_examples(tiny_tfds_dir):
  source = input_pipeline.get_source("vtab/eurosat", data_dir=tiny_tfds_dir)
  pp = lambda ex: {**ex, "image": tf.cast(ex["image"], tf.float32)}  # keep the index pixels
  make = lambda start: pipeline.make_train_dataset(
      source, "train800val200", pp, global_batch_size=200, seed=0, start_step=start)
  straight = _take(make(0), 7)
  assert _same(_take(make(6), 1), straight[6:])
  first_epoch = [(int(im[0, 0, 0]) + 256 * int(im[0, 0, 1]))
                 for b in straight[:5] for im in b["image"]]
  assert sorted(first_epoch) == list(range(800)) + list(range(1200, 1400))


def test_train_local_batch_and_divisibility():
  source = input_pipeline.get_source("embedded/shapes")
  pp = preprocess.make_preprocess_fn(
      "resize(8, antialias=False)|value_range(0, 1)|normalize('imagenet')")
  batch = _take(pipeline.make_train_dataset(source, "val", pp, global_batch_size=64, seed=0,
                                            process_index=1, process_count=2), 1)[0]
  assert batch["image"].shape == (32, 8, 8, 3)
  with pytest.raises(ValueError, match="global_batch_size=63.*process_count=2"):
    pipeline.make_train_dataset(source, "val", pp, global_batch_size=63, seed=0, process_count=2)


def _write_png_folder(root, layout):
  """layout: {split: {class_name: n_images}}; image i of a class has pixel value i."""
  for split, classes in layout.items():
    for class_name, n in classes.items():
      folder = root / split / class_name
      folder.mkdir(parents=True)
      for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(
            tf.io.encode_png(np.full((5 + i, 7, 1 if i == 0 else 3), i, np.uint8)).numpy())


def test_folder_source_and_padded_eval(tmp_path):
  _write_png_folder(tmp_path, {"train": {"dog": 3, "cat": 4, "fox": 3},
                               "test": {"fox": 2, "cat": 1}})
  source = input_pipeline.get_source("folder", root=str(tmp_path))
  assert source.classes == ("cat", "dog", "fox") and source.num_classes == 3
  assert source.splits == ("test", "train") and source.num_examples("train") == 10
  test = list(source.dataset("test").as_numpy_iterator())
  assert [int(ex["label"]) for ex in test] == [0, 2, 2]  # the train mapping, also for test
  assert all(ex["image"].dtype == np.uint8 and ex["image"].shape[2] == 3 for ex in test)
  with pytest.raises(ValueError, match="'folder'.*valid splits: test, train"):
    source.dataset("val")

  pp = preprocess.make_preprocess_fn(
      "resize(6, antialias=False)|value_range(0, 1)|normalize('imagenet')")
  batches = list(pipeline.make_eval_dataset(source, "train", pp, global_batch_size=4)
                 .as_numpy_iterator())
  assert len(batches) == 3 and [int(b["_mask"].sum()) for b in batches] == [4, 4, 2]
  assert all(b["image"].shape == (4, 6, 6, 3) for b in batches)
  real = np.concatenate([b["label"][b["_mask"]] for b in batches])
  assert sorted(real.tolist()) == [0] * 4 + [1] * 3 + [2] * 3
  # 3 hosts with 3, 3, 4 examples and local batch 1: every host yields 4 batches.
  per_host = [list(pipeline.make_eval_dataset(source, "train", pp, global_batch_size=3,
                                              process_index=i, process_count=3)
                   .as_numpy_iterator()) for i in range(3)]
  assert [len(h) for h in per_host] == [4, 4, 4]
  assert [sum(int(b["_mask"].sum()) for b in h) for h in per_host] == [3, 3, 4]
  labels = np.concatenate([b["label"][b["_mask"]] for h in per_host for b in h])
  assert sorted(labels.tolist()) == sorted(real.tolist())


def test_folder_errors(tmp_path):
  with pytest.raises(input_pipeline.DataNotFoundError, match="does not exist"):
    input_pipeline.get_source("folder", root=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="root="):
    input_pipeline.get_source("folder")
  _write_png_folder(tmp_path, {"train": {"a": 1, "b": 0}})
  with pytest.raises(input_pipeline.DataNotFoundError, match="b has no .jpg"):
    input_pipeline.get_source("folder", root=str(tmp_path))


def test_eval_on_tiny_vtab_split_with_resize(tiny_tfds_dir):
  source = input_pipeline.get_source("vtab/dtd", data_dir=tiny_tfds_dir)
  pp = preprocess.make_preprocess_fn(
      "resize(8, antialias=False)|value_range(0, 1)|normalize('imagenet')")
  batches = list(pipeline.make_eval_dataset(source, "test", pp, global_batch_size=8)
                 .as_numpy_iterator())
  assert len(batches) == 4 and sum(int(b["_mask"].sum()) for b in batches) == 30
  assert batches[-1]["_mask"].tolist() == [True] * 6 + [False] * 2


# ---------------------------------------------------------------- preprocessing

def test_preprocess_modes():
  white = {"image": tf.fill((40, 60, 3), tf.constant(255, tf.uint8)), "label": tf.constant(3)}
  pp = preprocess.make_preprocess_fn(
      "resize(32, antialias=False)|value_range(0, 1)|normalize('imagenet')")
  out = pp(white)
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.float32
  expected = (1 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
  np.testing.assert_allclose(out["image"][0, 0], expected, rtol=1e-5)
  assert out["label"].dtype == tf.int32
  tail = "value_range(0, 1)|normalize('inception')"
  fgvc_eval = preprocess.make_preprocess_fn(f"resize_shorter_side(37)|center_crop(32)|{tail}")
  np.testing.assert_allclose(fgvc_eval(white)["image"], np.ones((32, 32, 3)), rtol=1e-5)
  fgvc_train = preprocess.make_preprocess_fn(
      f"resize_shorter_side(37)|random_crop(32)|flip_lr|{tail}")
  seeded = {**white, "_seed": tf.constant([1, 2], tf.int64)}
  np.testing.assert_array_equal(fgvc_train(seeded)["image"], fgvc_train(seeded)["image"])
  assert "_seed" not in fgvc_train(seeded)
  with pytest.raises(ValueError, match="_seed"):
    fgvc_train(white)
  with pytest.raises(ValueError, match="Unknown pp op 'flip'; known ops: .*flip_lr"):
    preprocess.make_preprocess_fn("resize(8)|flip")
