"""COCO-json detection sources (`input_pipeline/coco_detection.py`) and ODinW (`odinw.py`) on tiny
json + PNG files written here: label order, crowd / empty boxes, skipped training images, the
decoded example contract, the ground truth for the evaluator, the registered names and their
file layouts, and the errors for bad annotation files."""
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import base, coco_detection, grounding, odinw

WORDS = ("zebra", "apple", "cat", "dog", "holes", "pothole", "there", "are", "some", "on", "the",
         "road")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS])
                  + "\n")
  return str(path)


def write_png(path, height, width, value=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.full((height, width, 3), value, np.uint8)
  pixels[0, 0] = (value + 1) % 256
  Image.fromarray(pixels).save(path)


# Categories listed out of id order: labels follow the list (pycocotools getCatIds).
CATEGORIES = [{"id": 7, "name": "zebra"}, {"id": 3, "name": "apple"}, {"id": 12, "name": "cat"}]


def train_json():
  """Images 5, 2, 9, 4 (unsorted); 4 has no annotation, 9 only degenerate boxes besides a crowd
  one... see the per-annotation comments."""
  images = [{"id": 5, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "sub/b.png", "height": 16, "width": 16},
            {"id": 9, "file_name": "c.png", "height": 12, "width": 10},
            {"id": 4, "file_name": "d.png", "height": 8, "width": 8}]
  annotations = [
      {"id": 1, "image_id": 5, "category_id": 3, "bbox": [2, 3, 10, 5], "iscrowd": 0, "area": 50},
      {"id": 2, "image_id": 5, "category_id": 12, "bbox": [0, 0, 30, 20], "iscrowd": 1,
       "area": 600},  # crowd: not served, kept in the ground truth
      {"id": 3, "image_id": 5, "category_id": 7, "bbox": [25, 15, 10, 10], "iscrowd": 0,
       "area": 100},  # runs off the image: clipped to [25, 15, 29, 19]
      {"id": 4, "image_id": 2, "category_id": 7, "bbox": [1, 1, 4, 6], "iscrowd": 0, "area": 24},
      {"id": 5, "image_id": 2, "category_id": 12, "bbox": [3, 4, 1, 5], "iscrowd": 0,
       "area": 5},  # w = 1: empty in xyxy (+1), dropped as GLIP's clip_to_image does
      {"id": 6, "image_id": 9, "category_id": 3, "bbox": [2, 2, 0.5, 3], "iscrowd": 0,
       "area": 1.5},  # 9's only box is degenerate: no valid annotation, skipped in training
  ]
  return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def val_json():
  images = [{"id": 31, "file_name": "v1.png", "height": 10, "width": 14},
            {"id": 30, "file_name": "v0.png", "height": 9, "width": 9}]  # 30: no annotation
  annotations = [{"id": 1, "image_id": 31, "category_id": 12, "bbox": [1, 2, 5, 4], "iscrowd": 0,
                  "area": 20}]
  return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def write_split(root, folder, dataset, json_path):
  for image in dataset["images"]:
    write_png(os.path.join(root, folder, image["file_name"]), image["height"], image["width"],
              value=image["id"])
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(dataset, f)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco"))
  write_split(root, "train2017", train_json(), os.path.join(root, "annotations",
                                                            "instances_train2017.json"))
  write_split(root, "val2017", val_json(), os.path.join(root, "annotations",
                                                        "instances_val2017.json"))
  return root


def examples(source, split):
  return list(source.dataset(split).as_numpy_iterator())


def test_coco_2017_labels_boxes_and_skipped_images(coco_root, vocab, caplog):
  source = input_pipeline.get_source("coco/2017", root=coco_root, vocab=vocab)
  assert source.splits == ("val", "train") and source.class_names == ("zebra", "apple", "cat")
  assert source.category_ids == (7, 3, 12)  # json list order, not sorted
  with caplog.at_level(logging.INFO, logger="input_pipeline.coco_detection"):
    assert source.num_examples("train") == 2  # 4 (no annotation) and 9 (degenerate) skipped
  assert source.skipped_images["train"] == 2 and source.dropped_boxes["train"] == 1
  assert "[3.0, 4.0, 1.0, 5.0]" in caplog.text and "instances_train2017.json" in caplog.text
  got = examples(source, "train")
  assert [int(e["image_id"]) for e in got] == [2, 5]  # ascending image ids
  first, second = got
  assert first["image"].shape == (16, 16, 3) and first["image"].dtype == np.uint8
  assert first["image"][0, 0, 0] == 3 and first["image"][1, 1, 0] == 2  # file sub/b.png
  np.testing.assert_array_equal(first["boxes"], [[1, 1, 4, 6]])  # [x, y, x+w-1, y+h-1]
  np.testing.assert_array_equal(first["box_labels"], [1])  # category 7 -> label 1
  np.testing.assert_array_equal(second["boxes"], [[2, 3, 11, 7], [25, 15, 29, 19]])
  np.testing.assert_array_equal(second["box_labels"], [2, 1])  # crowd box gone
  assert second["boxes"].dtype == np.float32 and second["box_labels"].dtype == np.int32
  np.testing.assert_array_equal(second["orig_size"], [20, 30])
  assert second["orig_size"].dtype == np.int32 and second["image_id"].dtype == np.int32
  g = source.grounding
  np.testing.assert_array_equal(second["positive_map"], g.class_token_map[[1, 0]])
  np.testing.assert_array_equal(second["text_ids"], g.text_ids)
  np.testing.assert_array_equal(second["text_mask"], g.text_mask)
  assert g.caption == "zebra. apple. cat"
  assert second["positive_map"].shape == (2, grounding.DEFAULT_MAX_LENGTH)


def test_eval_split_keeps_images_without_boxes_and_ground_truth(coco_root, vocab):
  source = input_pipeline.get_source("coco/2017", root=coco_root, vocab=vocab)
  got = examples(source, "val")
  assert [int(e["image_id"]) for e in got] == [30, 31] and source.skipped_images["val"] == 0
  assert got[0]["boxes"].shape == (0, 4) and got[0]["positive_map"].shape[0] == 0
  truth = source.coco_ground_truth("val")
  assert {i["id"] for i in truth["images"]} == {30, 31} and truth["categories"] == CATEGORIES
  train_truth = source.coco_ground_truth("train")
  # Only the served training images, with all their annotations (crowd and empty included).
  assert {i["id"] for i in train_truth["images"]} == {2, 5}
  assert sorted(a["id"] for a in train_truth["annotations"]) == [1, 2, 3, 4, 5]


def test_hosts_read_disjoint_blocks(coco_root, vocab):
  source = input_pipeline.get_source("coco/2017", root=coco_root, vocab=vocab)
  ids = [[int(e["image_id"]) for e in source.dataset("val", process_index=i,
                                                     process_count=2).as_numpy_iterator()]
         for i in range(2)]
  assert ids == [[30], [31]]


def test_coco_json_generic_with_override_and_caption_prompts(coco_root, vocab):
  source = input_pipeline.get_source(
      "coco_json", vocab=vocab, val_json=os.path.join(coco_root, "annotations",
                                                      "instances_val2017.json"),
      val_images=os.path.join(coco_root, "val2017"), dataset_name="mine",
      override_category=[{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"},
                         {"id": 12, "name": "apple"}],
      caption_prompts=[{"prefix": "", "name": "cat", "suffix": ""},
                       {"prefix": "the ", "name": "dog", "suffix": " on the road"},
                       {"prefix": "", "name": "apple", "suffix": ""}])
  assert source.name == "mine" and source.splits == ("val",)
  assert source.class_names == ("cat", "dog", "apple")  # names by id, labels in json order
  assert source.grounding.caption == "cat. the dog on the road. apple"
  with pytest.raises(ValueError, match=r"Unknown split 'train' for data source 'mine'; valid "
                                       r"splits: val"):
    source.check_split("train")
  with pytest.raises(ValueError, match=r"override_category has category ids \[3, 7\]"):
    input_pipeline.get_source("coco_json", vocab=vocab, val_json=os.path.join(
        coco_root, "annotations", "instances_val2017.json"), image_root=coco_root,
        override_category=[{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}])


def bad_source(tmp_path, vocab, mutate, *, split="train"):
  dataset = train_json()
  mutate(dataset)
  root = str(tmp_path)
  path = os.path.join(root, "bad.json")
  write_split(root, "img", dataset, path)
  source = input_pipeline.get_source("coco_json", vocab=vocab, image_root=os.path.join(root, "img"),
                                     **{f"{split}_json": path})
  return source, path


def test_unknown_category_id_is_an_error_naming_it(tmp_path, vocab):
  def mutate(dataset):
    dataset["annotations"][3]["category_id"] = 99
  source, path = bad_source(tmp_path, vocab, mutate)
  with pytest.raises(ValueError, match=rf"{path}: annotation 4 of image 2 has category_id 99, "
                                       r"which is not one of the 'categories' ids \[3, 7, 12\]"):
    source.num_examples("train")


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, float("nan"), 4], "1 2 3 4"])
def test_malformed_box_is_an_error_naming_file_image_and_box(tmp_path, vocab, bbox):
  def mutate(dataset):
    dataset["annotations"][0]["bbox"] = bbox
  source, path = bad_source(tmp_path, vocab, mutate)
  with pytest.raises(ValueError, match=rf"{path}: annotation 1 of image 5 has bbox"):
    source.num_examples("train")


def test_zero_and_negative_size_boxes_are_dropped_and_counted(tmp_path, vocab, caplog):
  """GLIP's BoxList.clip_to_image(remove_empty=True) drops them silently; here counted + logged."""
  def mutate(dataset):
    dataset["annotations"][0]["bbox"] = [2, 3, 0, 5]
    dataset["annotations"][2]["bbox"] = [4, 4, -3, 2]
  source, path = bad_source(tmp_path, vocab, mutate)
  with caplog.at_level(logging.WARNING, logger="input_pipeline.coco_detection"):
    assert source.num_examples("train") == 2
  assert source.dropped_boxes["train"] == 3  # the two above and annotation 5 (w = 1)
  assert path in caplog.text and "(5, [4.0, 4.0, -3.0, 2.0])" in caplog.text
  got = {int(e["image_id"]): e for e in examples(source, "train")}
  assert got[5]["boxes"].shape == (0, 4)  # image 5 keeps a valid crowd box, so it stays


def test_image_size_differing_from_json_fails_naming_the_file(tmp_path, vocab):
  source, _ = bad_source(tmp_path, vocab, lambda d: None)
  write_png(str(tmp_path / "img" / "sub" / "b.png"), 15, 16)  # the json says 16 x 16
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"sub/b.png"):
    examples(source, "train")


def test_bad_image_files_raise_or_are_skipped(tmp_path, vocab):
  source, _ = bad_source(tmp_path, vocab, lambda d: None)
  (tmp_path / "img" / "a.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match=r"a.png is not a"):
    source.num_examples("train")
  skipping, _ = bad_source(tmp_path, vocab, lambda d: None)
  (tmp_path / "img" / "a.png").write_bytes(b"not an image")
  skipping.skip_bad_images = True
  assert skipping.num_examples("train") == 1 and skipping.dropped_images["train"][0].endswith(
      "a.png")
  assert [i["id"] for i in skipping.coco_ground_truth("train")["images"]] == [2]


def test_missing_files_name_the_expected_paths(tmp_path, vocab):
  with pytest.raises(base.DataNotFoundError, match=r"instances_val2017.json.*instances_train"):
    input_pipeline.get_source("coco/2017", root=str(tmp_path), vocab=vocab)
  with pytest.raises(ValueError, match=r"needs vocab="):
    input_pipeline.get_source("coco/2017", root=str(tmp_path))
  with pytest.raises(ValueError, match=r"needs root=<"):
    input_pipeline.get_source("lvis/v1", vocab=vocab)


def test_lvis_images_by_coco_url_and_extra_fields_kept(tmp_path, vocab):
  root = str(tmp_path)
  categories = [{"id": 2, "name": "cat", "frequency": "r"}, {"id": 1, "name": "apple_(fruit)",
                                                             "frequency": "f"}]
  images = [{"id": 8, "coco_url": "http://images.cocodataset.org/val2017/000008.png",
             "height": 10, "width": 12, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
            {"id": 3, "coco_url": "http://images.cocodataset.org/train2017/000003.png",
             "height": 6, "width": 6, "neg_category_ids": [], "not_exhaustive_category_ids": [2]}]
  annotations = [{"id": 1, "image_id": 8, "category_id": 2, "bbox": [1, 1, 4, 4], "area": 16},
                 {"id": 2, "image_id": 3, "category_id": 1, "bbox": [0, 0, 3, 3], "area": 9}]
  write_png(os.path.join(root, "val2017", "000008.png"), 10, 12)
  write_png(os.path.join(root, "train2017", "000003.png"), 6, 6)
  os.makedirs(os.path.join(root, "annotations"))
  with open(os.path.join(root, "annotations", coco_detection.LVIS_FILES["minival"]), "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
  source = input_pipeline.get_source("lvis/v1", root=root, vocab=vocab)
  assert source.splits == ("minival",) and source.category_ids == (1, 2)  # sorted, as GLIP's LVIS
  assert source.grounding.caption == "apple . cat"  # clean_name drops "(fruit)"
  got = examples(source, "minival")
  assert [int(e["image_id"]) for e in got] == [3, 8] and got[1]["image"].shape == (10, 12, 3)
  np.testing.assert_array_equal(got[1]["box_labels"], [2])
  truth = source.coco_ground_truth("minival")
  assert truth["images"][0]["neg_category_ids"] == [1] and truth["categories"][0]["frequency"]
  assert all(a["iscrowd"] == 0 for a in truth["annotations"])  # filled in for COCOeval
  with pytest.raises(base.DataNotFoundError, match=r"split 'val' needs .*lvis_v1_val.json"):
    source.check_split("val")


def write_odinw(root, *, export=False, fewshot=False):
  dataset = {"images": [{"id": 1, "file_name": "p1.png", "height": 8, "width": 8},
                        {"id": 2, "file_name": "p2.png", "height": 8, "width": 10}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                              "area": 9, "iscrowd": 0},
                             {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 1, 3, 4],
                              "area": 12, "iscrowd": 0}],
             "categories": [{"id": 1, "name": "potholes", "supercategory": "none"}]}
  for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
    if export:
      write_split(root, "", dataset, os.path.join(root, f"{split}_annotations_without_background"
                                                  ".json"))
    else:
      write_split(root, folder, dataset, os.path.join(root, folder, odinw.ANNOTATIONS))
  if fewshot:
    one = {**dataset, "images": dataset["images"][1:], "annotations": dataset["annotations"][1:]}
    with open(os.path.join(root, "train", "fewshot_train_shot1_seed30.json"), "w") as f:
      json.dump(one, f)


def test_odinw_tables_match_the_glip_yamls():
  assert len(odinw.ODINW_13) == 13 and len(odinw.ODINW_35) == 35
  assert set(odinw.ODINW_13) <= set(odinw.ODINW_35)
  assert "plantdoc_100x100" in odinw.ODINW_DATASETS and "plantdoc_100x100" not in odinw.ODINW_35
  sizes = {n: len(odinw.ODINW_DATASETS[n].categories) for n in odinw.ODINW_13}
  assert sizes == {"AerialMaritimeDrone_large": 5, "Aquarium": 7, "CottontailRabbits": 1,
                   "EgoHands_generic": 1, "NorthAmericaMushrooms": 2, "Packages_Raw": 1,
                   "PascalVOC": 20, "Raccoon": 1, "ShellfishOpenImages": 3,
                   "VehiclesOpenImages_416x416": 5, "pistols": 1, "pothole": 1,
                   "thermalDogsAndPeople": 2}
  assert {n for n in odinw.ODINW_DATASETS if odinw.ODINW_DATASETS[n].caption_prompt} == {
      "Aquarium", "EgoHands_generic", "Packages_Raw", "pothole"}
  assert odinw.ODINW_DATASETS["VehiclesOpenImages_416x416"].eval_split == "minival"
  files = odinw.ODINW_DATASETS["pistols"].split_files("/d")
  assert files["train"] == ("/d/train_annotations_without_background.json", "/d")
  files = odinw.ODINW_DATASETS["EgoHands_generic"].split_files("/d")
  assert list(files)[0] == "minival" and files["minival"] == (
      "/d/mini_val/annotations_without_background.json", "/d/mini_val")
  assert odinw.ODINW_DATASETS["PascalVOC"].split_files("/d")["test"][1] == "/d/valid"
  assert all(f"odinw/{n}" in input_pipeline.SOURCE_NAMES for n in odinw.ODINW_DATASETS)


def test_odinw_pothole_prompt_versions_and_few_shot(tmp_path, vocab):
  data_dir = str(tmp_path)
  root = os.path.join(data_dir, "odinw", "pothole")
  write_odinw(root, fewshot=True)
  v13 = input_pipeline.get_source("odinw/pothole", data_dir=data_dir, vocab=vocab)
  assert v13.odinw_version == 13 and v13.eval_split == "val"
  assert v13.class_names == ("pothole",) and v13.grounding.caption == "pothole"  # override
  v35 = input_pipeline.get_source("odinw/pothole", root=root, vocab=vocab, version=35)
  assert v35.grounding.caption == "there are some holes on the road"
  assert v35.grounding.token_spans() == {1: (4, 4)}  # only "holes" is positive
  raw = input_pipeline.get_source("odinw/pothole", root=root, vocab=vocab, version=35,
                                  override_category=False, caption_prompt=False)
  assert raw.grounding.caption == "potholes"
  assert v13.num_examples("train") == 2 and v13.splits == ("val", "train", "test")
  few = input_pipeline.get_source("odinw/pothole", root=root, vocab=vocab, shots=1, seed=30)
  assert few.num_examples("train") == 1 and few.num_examples("val") == 2
  with pytest.raises(ValueError, match=r"shots=2, seed=30"):
    input_pipeline.get_source("odinw/pothole", root=root, vocab=vocab, shots=2, seed=30)
  with pytest.raises(ValueError, match=r"version=13; expected 35 \(it is not an ODinW-13"):
    input_pipeline.get_source("odinw/WildfireSmoke", root=root, vocab=vocab, version=13)
  with pytest.raises(base.DataNotFoundError, match=r"DATASET/odinw/pistols/export"):
    input_pipeline.get_source("odinw/pistols", data_dir=data_dir, vocab=vocab)


def test_odinw_export_layout(tmp_path, vocab):
  root = str(tmp_path / "export")
  write_odinw(root, export=True)
  source = input_pipeline.get_source("odinw/pistols", root=root, vocab=vocab)
  assert source.class_names == ("pistol",) and source.num_examples("test") == 2
  got = examples(source, "val")
  np.testing.assert_array_equal(got[1]["boxes"], [[2, 1, 4, 4]])
