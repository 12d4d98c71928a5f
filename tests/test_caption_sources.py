"""Captioning data (input_pipeline/karpathy.py, nocaps.py, embedded_captions.py): on small files
the tests write, one training example per (image, caption) pair, one evaluation example per image
with all its references, the originals' image ids, NoCaps' domain splits, and the errors."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import input_pipeline
from input_pipeline import embedded_captions, karpathy, nocaps


def write_png(path, height, width, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
  tf.io.write_file(path, tf.io.encode_png(image))


def write_coco_karpathy(root):
  """LAVIS-style COCO files: 2 test images (3 and 2 raw captions), 3 train pairs of 2 images."""
  names = ["val2014/COCO_val2014_000000391895.jpg", "val2014/COCO_val2014_000000060623.jpg",
           "train2014/COCO_train2014_000000000009.jpg"]
  for i, name in enumerate(names):
    write_png(os.path.join(root, name), 10 + i, 12, i)
  test = [{"image": names[0], "caption": ["A man with a red helmet on a small moped. ",
                                          "Man riding a motor bike!", "a man rides"]},
          {"image": names[1], "caption": ["A young girl (inhaling) the scent.", "a girl"]}]
  train = [{"image": names[2], "caption": "Closeup of bins of food.", "image_id": "coco_9"},
           {"image": names[0], "caption": "A man rides a moped.", "image_id": "coco_391895"},
           {"image": names[2], "caption": "A meal in a box.", "image_id": "coco_9"}]
  for split, entries in (("test", test), ("train", train)):
    with open(os.path.join(root, f"coco_karpathy_{split}.json"), "w") as f:
      json.dump(entries, f)


def test_karpathy_captioning_pairs_references_and_image_ids(tmp_path):
  root = str(tmp_path / "coco")
  write_coco_karpathy(root)
  source = input_pipeline.get_source("coco_karpathy", data_dir=str(tmp_path), captions="raw")
  assert source.splits == ("train", "test")
  assert source.num_examples("train") == 3 and source.num_examples("test") == 2
  # Evaluation: one example per image, every raw caption (the scorer tokenises them itself).
  examples = list(source.dataset("test").as_numpy_iterator())
  assert [e["image"].shape for e in examples] == [(10, 12, 3), (11, 12, 3)]
  assert [[c.decode() for c in e["captions"]] for e in examples] == [
      ["A man with a red helmet on a small moped. ", "Man riding a motor bike!", "a man rides"],
      ["A young girl (inhaling) the scent.", "a girl"]]
  assert source.image_ids("test") == [391895, 60623]  # LAVIS `COCOCapEvalDataset`
  assert source.references("test") == {391895: source.captions("test")[0],
                                       60623: source.captions("test")[1]}
  # Training: one example per (image, caption) pair in the file's order, its image decoded.
  train = list(source.dataset("train").as_numpy_iterator())
  assert [(e["image"].shape, [c.decode() for c in e["captions"]]) for e in train] == [
      ((12, 12, 3), ["Closeup of bins of food."]), ((10, 12, 3), ["A man rides a moped."]),
      ((12, 12, 3), ["A meal in a box."])]
  assert source.image_ids("train") == [9, 391895, 9] and source.max_captions["train"] == 1
  assert source.references("train") == {9: ["Closeup of bins of food.", "A meal in a box."],
                                        391895: ["A man rides a moped."]}
  # Retrieval keeps LAVIS's cleaning by default.
  clean = input_pipeline.get_source("coco_karpathy", root=root)
  assert clean.captions("test")[1] == ["a young girl inhaling the scent", "a girl"]
  with pytest.raises(ValueError, match="captions='tokens'.*'clean'.*'raw'"):
    input_pipeline.get_source("coco_karpathy", root=root, captions="tokens")
  # Image ids: Flickr30K's file names, beyond int32; a name without a number is an error.
  flickr = str(tmp_path / "flickr30k")
  write_png(os.path.join(flickr, "flickr30k-images/4797050581.jpg"), 8, 8, 5)
  write_png(os.path.join(flickr, "flickr30k-images/dog.jpg"), 8, 8, 6)
  with open(os.path.join(flickr, "flickr30k_test.json"), "w") as f:
    json.dump([{"image": "flickr30k-images/4797050581.jpg", "caption": ["A dog.", "Dogs."]},
               {"image": "flickr30k-images/dog.jpg", "caption": ["A cat."]}], f)
  source = input_pipeline.get_source("flickr30k_karpathy", root=flickr, captions="raw")
  with pytest.raises(ValueError, match="dog.jpg.*flickr30k_test.json.*no image id"):
    source.image_ids("test")
  assert karpathy.image_id_from_path("flickr30k-images/4797050581.jpg") == 4797050581 > 2 ** 31


def write_nocaps(root, *, domains=("in-domain", "near-domain", "near-domain", "out-domain",
                                   "near-domain", "out-domain"), captions_per_image=(2, 3)):
  """NoCaps' val json with len(domains) images, their PNGs in root/val."""
  images, annotations = [], []
  for i, domain in enumerate(domains):
    name = f"{i:016x}.jpg"
    write_png(os.path.join(root, "val", name), 8 + i, 9, i)
    images.append({"id": i, "open_images_id": f"{i:016x}", "file_name": name,
                   "domain": domain, "height": 8 + i, "width": 9})
  for i in range(len(domains)):  # interleaved, as a file need not group them
    for k in range(captions_per_image[i % len(captions_per_image)]):
      annotations.append({"image_id": i, "id": len(annotations), "caption": f"Image {i}, #{k}."})
  annotations.sort(key=lambda a: (a["caption"][-3], a["image_id"]))
  with open(os.path.join(root, nocaps.ANNOTATION_FILE), "w") as f:
    json.dump({"licenses": [], "info": {}, "images": images, "annotations": annotations}, f)


def test_nocaps_val_and_domain_splits(tmp_path):
  root = str(tmp_path / "nocaps")
  write_nocaps(root)
  source = input_pipeline.get_source("nocaps", data_dir=str(tmp_path))
  assert source.splits == ("val", "in-domain", "near-domain", "out-domain")
  assert [source.num_examples(s) for s in source.splits] == [6, 1, 3, 2]
  assert source.image_ids("val") == list(range(6))
  assert source.image_ids("near-domain") == [1, 2, 4] and source.image_ids("out-domain") == [3, 5]
  assert source.domains("near-domain") == ["near-domain"] * 3
  assert source.domains("val")[:2] == ["in-domain", "near-domain"]
  assert source.references("out-domain") == {3: ["Image 3, #0.", "Image 3, #1.", "Image 3, #2."],
                                             5: ["Image 5, #0.", "Image 5, #1.", "Image 5, #2."]}
  assert source.max_captions == {"val": 3, "in-domain": 2, "near-domain": 3, "out-domain": 3}
  examples = list(source.dataset("near-domain").as_numpy_iterator())
  assert [e["image"].shape for e in examples] == [(9, 9, 3), (10, 9, 3), (12, 9, 3)]
  assert [len(e["captions"]) for e in examples] == [3, 2, 2]
  assert examples[0]["captions"][0].decode() == "Image 1, #0."


def test_nocaps_errors(tmp_path):
  root = str(tmp_path / "nocaps")
  write_nocaps(root, domains=("in-domain", "out-domain"), captions_per_image=(2,))
  path = os.path.join(root, nocaps.ANNOTATION_FILE)
  with open(path) as f:
    data = json.load(f)
  assert input_pipeline.get_source("nocaps", root=root).splits == ("val", "in-domain",
                                                                    "out-domain")

  def rewrite(**changes):
    with open(path, "w") as f:
      json.dump({**data, **changes}, f)

  rewrite(annotations=[a for a in data["annotations"] if a["image_id"] != 1])
  with pytest.raises(ValueError, match=r"image id\(s\) \[1\] have no captions"):
    nocaps.make_source(root=root)
  rewrite(images=[data["images"][0], {**data["images"][1], "domain": "far-domain"}])
  with pytest.raises(ValueError, match="image 1 must be.*far-domain"):
    nocaps.make_source(root=root)
  rewrite(annotations=data["annotations"] + [{"image_id": 7, "caption": "a"}])
  with pytest.raises(ValueError, match="annotation 4 must be"):
    nocaps.make_source(root=root)
  rewrite()
  os.remove(os.path.join(root, "val", data["images"][1]["file_name"]))
  with pytest.raises(FileNotFoundError, match="0000000000000001.jpg.*nocaps_val_4500"):
    nocaps.make_source(root=root)
  with pytest.raises(FileNotFoundError, match="image folder .*elsewhere"):
    nocaps.make_source(root=root, image_root=str(tmp_path / "elsewhere"))
  with pytest.raises(FileNotFoundError, match="nocaps_val_4500_captions.json"):
    nocaps.make_source(root=str(tmp_path))


def test_embedded_captioned_shapes_for_captioning():
  pairs = embedded_captions.CaptionedShapesSource(limit=4, train_pairs=True)
  per_image = embedded_captions.CaptionedShapesSource(limit=4)
  images, labels = per_image.arrays("train")
  captions = per_image.captions("train")
  # Training: one example per (image, caption) pair, in image order.
  assert pairs.num_examples("train") == sum(len(c) for c in captions) == 5 * len(images) // 2
  owner = pairs.image_ids("train")
  assert owner[:5] == [0, 0, 0, 1, 1] and pairs.max_captions["train"] == 1
  assert pairs.captions("train") == [[c] for texts in captions for c in texts]
  pair_images, pair_labels = pairs.arrays("train")
  np.testing.assert_array_equal(pair_images, images[owner])
  np.testing.assert_array_equal(pair_labels, labels[owner])
  assert pairs.references("train") == dict(enumerate(captions))
  first = next(pairs.dataset("train").as_numpy_iterator())
  assert first["captions"].tolist() == [captions[0][0].encode()]
  # Evaluation: one example per image with its 2-3 template captions, the references.
  assert pairs.num_examples("test") == 4 and pairs.image_ids("test") == [0, 1, 2, 3]
  assert pairs.references("test") == dict(enumerate(per_image.captions("test")))
  assert [len(r) for r in pairs.references("test").values()] == [3, 2, 3, 2]
  assert pairs.max_captions["test"] == embedded_captions.MAX_CAPTIONS
  with pytest.raises(ValueError, match="train_pairs=1"):
    embedded_captions.CaptionedShapesSource(train_pairs=1)
