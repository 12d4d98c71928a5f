"""Corrupt and non-image files in image folders and file lists: named when the source is built,
dropped and counted with skip_bad_images=True, and named by the decoder if they turn bad later
(the 'folder' source, `folder.py`; the file-list sources, `file_list.py`)."""
import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import file_list, folder, pipeline


def PP(example):  # pylint: disable=invalid-name
  """A fixed-size image, as any preprocess function makes (the pipeline needs one)."""
  return {"image": tf.image.resize(example["image"], (8, 8)), "label": example["label"]}


def _jpeg(value, size=(24, 20)):
  image = np.random.default_rng(value).integers(0, 256, (*size, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(image).save(out, "JPEG", quality=90)
  return out.getvalue()


def _write_folder(root, bad=None):
  """root/train/{cat,dog}/0..2.jpg (6 images); `bad`: {relative path: bytes} written over/added."""
  for c, class_name in enumerate(("cat", "dog")):
    (root / "train" / class_name).mkdir(parents=True)
    for i in range(3):
      (root / "train" / class_name / f"{i}.jpg").write_bytes(_jpeg(10 * c + i))
  for relative, data in (bad or {}).items():
    (root / relative).write_bytes(data)
  return str(root)


def _labels(source, split="train"):
  batches = pipeline.make_eval_dataset(source, split, PP, global_batch_size=2)
  return [int(label) for b in batches.as_numpy_iterator() for label in b["label"][b["_mask"]]]


BAD = {"train/cat/1.jpg": _jpeg(1)[:300],  # truncated download
       "train/dog/notes.jpg": b"not an image, a text file renamed .jpg\n"}


def test_bad_files_are_named_when_the_source_is_built(tmp_path):
  root = _write_folder(tmp_path, BAD)
  with pytest.raises(ValueError) as error:
    input_pipeline.get_source("folder", root=root)
  message = str(error.value)
  assert "'folder': 2 of 7 image files under" in message
  assert f"{root}/train/cat/1.jpg is a JPEG file that does not decode, probably truncated" in (
      message)
  assert f"{root}/train/dog/notes.jpg is not a JPEG, PNG, GIF, BMP, WebP or JPEG XL image" in (
      message)
  assert "skip_bad_images=True" in message


def test_skip_bad_images_drops_and_reports_them(tmp_path, caplog):
  root = _write_folder(tmp_path, BAD)
  with caplog.at_level(logging.WARNING):
    source = input_pipeline.get_source("folder", root=root, skip_bad_images=True)
  assert source.num_examples("train") == 5
  assert source.dropped_images == (f"{root}/train/cat/1.jpg", f"{root}/train/dog/notes.jpg")
  assert "dropped 2 of 7 image files" in caplog.text and "cat/1.jpg" in caplog.text
  assert _labels(source) == [0, 0, 1, 1, 1]  # every kept file decodes, in order


def test_a_file_that_turns_bad_after_listing_is_named_by_the_decoder(tmp_path):
  """As training would meet it: the source was built, then a file was overwritten."""
  root = _write_folder(tmp_path)
  source = input_pipeline.get_source("folder", root=root)
  (tmp_path / "train" / "dog" / "2.jpg").write_text("<html>404 Not Found</html>")
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"dog/2\.jpg.*is empty or not a JPEG"):
    _labels(source)
  train = pipeline.make_train_dataset(source, "train", PP, global_batch_size=6, seed=0)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"dog/2\.jpg"):
    next(iter(train))
  # check_images=False skips the build-time check; the decoder still names the file.
  unchecked = input_pipeline.get_source("folder", root=root, check_images=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"dog/2\.jpg"):
    _labels(unchecked)


def test_good_unusual_files_are_kept(tmp_path):
  """Data after the JPEG end marker, a PNG named .jpg, a one-channel PNG: all decode."""
  root = _write_folder(tmp_path, {
      "train/cat/0.jpg": _jpeg(0) + b"\x00" * 100 + b"trailer" * 50,
      "train/cat/1.jpg": tf.io.encode_png(np.zeros((4, 5, 3), np.uint8)).numpy(),
      "train/dog/3.png": tf.io.encode_png(np.zeros((4, 5, 1), np.uint8)).numpy()})
  source = input_pipeline.get_source("folder", root=root)
  assert source.num_examples("train") == 7 and source.dropped_images == ()
  assert _labels(source) == [0, 0, 0, 1, 1, 1, 1]


def test_file_list_sources_share_the_check(tmp_path):
  """FGVC / VTAB-1k lists (`FileListSource`) check their images the same way."""
  root = _write_folder(tmp_path, BAD)
  paths = [f"{root}/train/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(3)]
  paths.append(f"{root}/train/dog/notes.jpg")
  labels = [0, 0, 0, 1, 1, 1, 1]
  files, listed_in = {"train": (paths, labels), "test": (paths[:2], labels[:2])}, {
      "train": "train.txt", "test": "test.txt"}
  with pytest.raises(ValueError, match=r"'lists': 2 of 7 image files listed in test.txt, "
                                       r"train.txt cannot be decoded: .*cat/1\.jpg is a JPEG"):
    file_list.FileListSource("lists", 2, files, listed_in)
  source = file_list.FileListSource("lists", 2, files, listed_in, skip_bad_images=True)
  assert source.num_examples("train") == 5 and source.num_examples("test") == 1
  assert _labels(source, "test") == [0]
  assert len(source.dropped_images) == 2


def test_skip_bad_images_errors(tmp_path):
  root = _write_folder(tmp_path, {"train/cat/0.jpg": b"", "train/cat/1.jpg": b"",
                                  "train/cat/2.jpg": b""})
  with pytest.raises(ValueError, match=r"cat/0\.jpg is empty"):
    input_pipeline.get_source("folder", root=root)
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match=r"train/cat has no decodable images left"):
    input_pipeline.get_source("folder", root=root, skip_bad_images=True)
  with pytest.raises(ValueError, match="skip_bad_images=True needs check_images=True"):
    input_pipeline.get_source("folder", root=root, skip_bad_images=True, check_images=False)
  assert folder.image_problem(f"{root}/train/dog/0.jpg") is None
  assert "cannot be read" in folder.image_problem(f"{root}/missing.jpg")
