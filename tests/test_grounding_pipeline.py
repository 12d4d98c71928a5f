"""GLIP's detection input side: captions and positive maps (`grounding.py`), the detection source
contract (`detection.py`), the box-aware pp ops (`pp_ops_boxes.py`) and the generated
'embedded/detection_shapes' source through the batched train/eval streams."""
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import detection, embedded_detection, grounding, pipeline, pp_ops_boxes
from input_pipeline import preprocess
from input_pipeline.multilabel_lt import COCO_CLASSES as COCO_NAMES  # COCO's official 80 names

TRAIN_SPEC = ("resize_glip(128, 128)|flip_lr_boxes|to_bgr255_normalize|pad_image(128,128)|"
              "pad_boxes(8)")
EVAL_SPEC = "resize_glip(128, 128)|to_bgr255_normalize|pad_image(128,128)|pad_boxes(8)"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  """Special tokens, '.', every COCO word whole, and the pieces the hand-made cases need."""
  words = sorted({w for name in COCO_NAMES for w in name.split()})
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "there", "are", "some", "on",
            "the", "road", "hole", "##s"] + words
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(tokens) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def source():
  return input_pipeline.get_source("embedded/detection_shapes")


# ----------------------------------------------------------------------------- captions, maps


def test_clean_name_follows_glip():
  assert grounding.clean_name("potted_plant (x)") == "potted plant "  # trailing space stays
  assert grounding.clean_name("hair  drier") == "hair drier"
  assert grounding.clean_name("a_(b)_c") == "a c"
  assert grounding.clean_name("traffic light") == "traffic light"


def test_build_caption_spans():
  caption, spans = grounding.build_caption(["person", "potted_plant (x)", "tv"])
  assert caption == "person. potted plant . tv"
  assert spans == [(0, 6), (8, 21), (23, 25)]
  assert [caption[s:e] for s, e in spans] == ["person", "potted plant ", "tv"]
  prompts = [{"prefix": "", "name": "cat", "suffix": ""},
             {"prefix": "there are some ", "name": "holes", "suffix": " on the road"}]
  caption, spans = grounding.build_caption(["x", "y"], caption_prompts=prompts)
  assert caption == "cat. there are some holes on the road"
  assert [caption[s:e] for s, e in spans] == ["cat", "holes"]
  with pytest.raises(ValueError, match="caption_prompts"):
    grounding.build_caption(["x", "y"], caption_prompts=prompts[:1])


def test_char_to_token_fallbacks(vocab):
  # The span of "potted plant " ends on a space (no token): GLIP falls back to end - 2.
  g = grounding.make_grounding(["person", "potted_plant (x)"], vocab, max_length=16)
  encoding = grounding.bert_tokenizer(vocab)(g.caption)
  start, end = g.char_spans[1]
  assert encoding.char_to_token(end - 1) is None
  assert g.token_spans() == {1: (1, 1), 2: (3, 4)}  # [CLS] person . potted plant [SEP]
  # A prompt name starting with a space: the start falls back to start + 1; "holes" is 2 pieces.
  prompts = [{"prefix": "", "name": "person", "suffix": ""},
             {"prefix": "there are some", "name": " holes", "suffix": " on the road"}]
  g = grounding.make_grounding(["a", "b"], vocab, max_length=16, caption_prompts=prompts)
  encoding = grounding.bert_tokenizer(vocab)(g.caption)
  assert encoding.char_to_token(g.char_spans[1][0]) is None
  # [CLS] person . there are some hole ##s on the road [SEP]
  assert g.token_spans() == {1: (1, 1), 2: (6, 7)}
  np.testing.assert_array_equal(g.class_token_map[1], np.eye(16)[6] + np.eye(16)[7])
  assert g.num_tokens == 12 and g.text_ids.dtype == np.int32
  np.testing.assert_array_equal(g.text_mask, (np.arange(16) < 12).astype(np.int32))
  # A name that maps to no token (ODinW-35 ChessPieces has one named '  ') keeps a zero row, as
  # GLIP skips it, and says so.
  with pytest.warns(UserWarning, match="map to no token"):
    g = grounding.make_grounding(["person", "(only a comment)"], vocab, max_length=16)
  assert g.class_token_map[0].sum() == 1 and not g.class_token_map[1].any()


def test_too_long_caption_is_an_error_suggesting_chunks(vocab):
  with pytest.raises(grounding.CaptionTooLongError, match=r"176 tokens.*max_length=100.*chunk"):
    grounding.make_grounding(COCO_NAMES, vocab, max_length=100)


def test_a_source_whose_caption_overflows_serves_its_first_chunk_and_says_so(vocab):
  """LVIS' 1203 names: evaluated in chunks only; the source records why it cannot train."""
  source = detection.DetectionSource("many", COCO_NAMES, ("val",), vocab=vocab, max_text_len=100)
  assert "176 tokens" in source.caption_overflow
  spans = source.grounding.token_spans()
  assert spans and max(spans) < len(COCO_NAMES) and source.grounding.num_tokens <= 100
  assert source.grounding.class_token_map.shape == (len(COCO_NAMES), 100)
  # The longest leading run that fits: one more class would overflow.
  with pytest.raises(grounding.CaptionTooLongError):
    grounding.make_grounding(COCO_NAMES[:max(spans) + 1], vocab, max_length=100)
  fits = detection.DetectionSource("few", COCO_NAMES[:5], ("val",), vocab=vocab, max_text_len=100)
  assert fits.caption_overflow is None


def test_coco_prompt_spans_with_whole_word_vocab(vocab):
  from jaxprompt.models import bert  # the text tower's tokenizer gives the same ids
  g = grounding.make_grounding(COCO_NAMES, vocab)
  assert g.caption == ". ".join(COCO_NAMES)
  expected, position = {}, 1  # [CLS] at 0; each word one token, '.' between classes
  for label, name in enumerate(COCO_NAMES, start=1):
    expected[label] = (position, position + len(name.split()) - 1)
    position += len(name.split()) + 1
  assert g.token_spans() == expected
  assert g.num_tokens == 1 + 95 + 79 + 1
  assert g.class_token_map.shape == (80, 256) and g.class_token_map.sum() == 95
  ids, mask = bert.tokenize(vocab, [g.caption], 256)
  np.testing.assert_array_equal(g.text_ids, ids[0])
  np.testing.assert_array_equal(g.text_mask, mask[0])


# bert-base-uncased's vocab.txt: BERT_VOCAB_PATH, or a copy beside the checkout (optional data;
# the project does not require it).
BERT_VOCAB = os.environ.get("BERT_VOCAB_PATH", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
    "data", "bert", "vocab.txt"))


@pytest.mark.skipif(not os.path.isfile(BERT_VOCAB),
                    reason=f"bert-base-uncased's vocab.txt not found at {BERT_VOCAB} (set "
                           "BERT_VOCAB_PATH); the project does not require it")
def test_coco_prompt_with_bert_base_uncased_vocab():
  """GLIP's positive map of the 80-name COCO prompt with the real bert-base-uncased vocabulary,
  computed here as GLIP does (`create_queries_and_maps` + `create_positive_map`: each name's
  character span mapped by the fast tokenizer's char_to_token, with its +1/+2 and -2/-3
  fallbacks) and compared row by row."""
  from tokenizers import BertWordPieceTokenizer  # pylint: disable=import-outside-toplevel
  vocab = BERT_VOCAB
  g = grounding.make_grounding(COCO_NAMES, vocab)
  caption, char_spans = "", []
  for i, name in enumerate(COCO_NAMES):
    char_spans.append((len(caption), len(caption) + len(name)))
    caption += name + (". " if i < len(COCO_NAMES) - 1 else "")
  assert g.caption == caption
  tokenizer = BertWordPieceTokenizer(vocab, lowercase=True)  # built apart from ours
  tokenizer.enable_padding(length=256)
  encoded = tokenizer.encode(caption)
  expected = np.zeros((80, 256), np.float32)
  for row, (begin, end) in enumerate(char_spans):
    first = next((encoded.char_to_token(c) for c in (begin, begin + 1, begin + 2)
                  if encoded.char_to_token(c) is not None), None)
    last = next((encoded.char_to_token(c) for c in (end - 1, end - 2, end - 3)
                 if encoded.char_to_token(c) is not None), None)
    expected[row, first:last + 1] = 1
  np.testing.assert_array_equal(g.class_token_map, expected)
  np.testing.assert_array_equal(g.text_ids, encoded.ids)
  spans = g.token_spans()
  assert g.num_tokens == 194
  assert spans[1] == (1, 1) and spans[2] == (3, 3) and spans[80] == (191, 192)
  assert sum(last > first for first, last in spans.values()) == 26


def test_chunk_groundings(vocab):
  chunks = grounding.chunk_groundings(COCO_NAMES, 30, vocab, max_length=128)
  assert [labels.tolist() for labels, _ in chunks] == [
      list(range(1, 31)), list(range(31, 61)), list(range(61, 81))]
  covered = np.zeros(80, int)
  for labels, g in chunks:
    assert g.class_token_map.shape == (80, 128)
    present = g.class_token_map.sum(1) > 0
    np.testing.assert_array_equal(np.flatnonzero(present) + 1, labels)
    covered += present
    alone = grounding.make_grounding([COCO_NAMES[i - 1] for i in labels], vocab, 128)
    assert g.caption == alone.caption
    np.testing.assert_array_equal(g.text_ids, alone.text_ids)
    np.testing.assert_array_equal(g.class_token_map[labels - 1], alone.class_token_map)
  np.testing.assert_array_equal(covered, 1)
  with pytest.raises(ValueError, match="chunk_size"):
    grounding.chunk_groundings(COCO_NAMES, 0, vocab)


# ----------------------------------------------------------------------------- pp ops


def _run(spec: str, example: dict, seed=None) -> dict:
  example = {k: tf.convert_to_tensor(v) for k, v in example.items()}
  if seed is not None:
    example["_seed"] = tf.constant(seed, tf.int64)
  return {k: v.numpy() for k, v in preprocess.make_preprocess_fn(spec)(example).items()}


def test_glip_output_size_numbers():
  assert pp_ops_boxes.glip_output_size(480, 640, 800, 1333) == (800, 1066)
  assert pp_ops_boxes.glip_output_size(640, 480, 800, 1333) == (1066, 800)
  assert pp_ops_boxes.glip_output_size(500, 2000, 800, 1333) == (333, 1332)  # long side capped
  assert pp_ops_boxes.glip_output_size(800, 1333, 800, 1333) == (800, 1333)
  assert pp_ops_boxes.glip_output_size(427, 640, 800, None) == (800, 1199)
  rng = np.random.default_rng(0)
  for h, w in rng.integers(50, 1500, size=(40, 2)).tolist():
    new = pp_ops_boxes._glip_output_size_tf(tf.constant(h), tf.constant(w), 800, 1333)
    assert tuple(int(x) for x in new) == pp_ops_boxes.glip_output_size(h, w, 800, 1333), (h, w)


def test_resize_glip_scales_boxes_and_sets_image_size():
  boxes = np.array([[10, 20, 100, 200], [0, 0, 639, 479]], np.float32)
  out = _run("resize_glip(800, 1333)", {"image": np.zeros((480, 640, 3), np.uint8),
                                        "boxes": boxes})
  assert out["image"].shape == (800, 1066, 3) and out["image"].dtype == np.float32
  np.testing.assert_array_equal(out["image_size"], [800, 1066])
  ratio = np.float32([1066 / 640, 800 / 480, 1066 / 640, 800 / 480])
  np.testing.assert_allclose(out["boxes"], boxes * ratio, rtol=1e-6)


@pytest.mark.parametrize("size_hw, min_size", [((64, 80), 40), ((48, 64), 60)])
def test_resize_glip_matches_pil_bilinear(size_hw, min_size):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (*size_hw, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(image).resize((size_hw[1] // 4, size_hw[0] // 4))
                     .resize(size_hw[::-1], Image.BICUBIC))  # smooth, so rounding dominates
  out = _run(f"resize_glip({min_size}, 1333)", {"image": image, "boxes": np.zeros((0, 4))})
  new_h, new_w = pp_ops_boxes.glip_output_size(*size_hw, min_size, 1333)
  pil = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32)
  assert np.abs(out["image"] - pil).max() <= 1.001  # PIL rounds to uint8


def test_resize_glip_multi_draws_from_min_sizes():
  image, boxes = np.zeros((60, 90, 3), np.uint8), np.array([[3, 6, 30, 60]], np.float32)
  shorter = set()
  for seed in range(12):
    out = _run("resize_glip_multi((20, 30, 40), 1000)", {"image": image, "boxes": boxes},
               seed=[seed, 0])
    h, w = out["image_size"]
    shorter.add(int(h))
    assert out["image"].shape[:2] == (h, w) and w == int(h * 90 / 60)
    np.testing.assert_allclose(out["boxes"], boxes * np.float32([w / 90, h / 60] * 2), rtol=1e-6)
  assert shorter == {20, 30, 40}


def test_flip_lr_boxes_plus_one_convention():
  image = np.zeros((6, 10, 3), np.uint8)
  image[2:5, 1:4] = 255  # pixels x 1..3, y 2..4 -> box [1, 2, 3, 4] (+1 convention)
  boxes = np.array([[1, 2, 3, 4]], np.float32)
  out = _run("flip_lr_boxes(1.0)", {"image": image, "boxes": boxes}, seed=[0, 0])
  np.testing.assert_array_equal(out["boxes"], [[10 - 3 - 1, 2, 10 - 1 - 1, 4]])
  ys, xs = np.nonzero(out["image"][..., 0])
  np.testing.assert_array_equal([xs.min(), ys.min(), xs.max(), ys.max()], out["boxes"][0])
  same = _run("flip_lr_boxes(0.0)", {"image": image, "boxes": boxes}, seed=[0, 0])
  np.testing.assert_array_equal(same["boxes"], boxes)
  np.testing.assert_array_equal(same["image"], image)
  flips = {bool(_run("flip_lr_boxes", {"image": image, "boxes": boxes}, seed=[s, 1])["boxes"][0, 0]
                != 1) for s in range(16)}
  assert flips == {True, False}


def test_to_bgr255_normalize_values():
  image = np.array([[[10, 20, 30]]], np.uint8)  # RGB
  out = _run("to_bgr255_normalize", {"image": image})["image"]
  expected = [(30 - 103.53) / 57.375, (20 - 116.28) / 57.12, (10 - 123.675) / 58.395]
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  assert out.dtype == np.float32


def test_pad_image_and_its_errors():
  image = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3) + 1
  out = _run("pad_image(8, 10)", {"image": image})
  assert out["image"].shape == (8, 10, 3)
  np.testing.assert_array_equal(out["image"][:5, :7], image)
  assert out["image"][5:].sum() == 0 and out["image"][:, 7:].sum() == 0
  np.testing.assert_array_equal(out["image_size"], [5, 7])
  with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the canvas"):
    _run("pad_image(4, 10)", {"image": image, "image_id": np.int32(7)})


def test_pad_boxes_masks_and_limits():
  boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
  labels = np.array([2, 1, 2], np.int32)
  positive_map = np.eye(3, 6, dtype=np.float32)
  example = {"boxes": boxes, "box_labels": labels, "positive_map": positive_map,
             "image_id": np.int32(42)}
  out = _run("pad_boxes(5)", example)
  assert out["boxes"].shape == (5, 4) and out["positive_map"].shape == (5, 6)
  np.testing.assert_array_equal(out["boxes"][:3], boxes)
  np.testing.assert_array_equal(out["box_labels"], [2, 1, 2, 0, 0])
  np.testing.assert_array_equal(out["box_mask"], [True] * 3 + [False] * 2)
  assert out["boxes"][3:].sum() == 0 and out["positive_map"][3:].sum() == 0
  with pytest.raises(tf.errors.InvalidArgumentError, match="more boxes than max_boxes"):
    _run("pad_boxes(2)", example)
  cut = _run("pad_boxes(2, drop_extra=True)", example)
  np.testing.assert_array_equal(cut["boxes"], boxes[:2])
  np.testing.assert_array_equal(cut["box_mask"], [True, True])
  with pytest.raises(ValueError, match="max_boxes"):
    preprocess.make_preprocess_fn("pad_boxes(0)")


# ----------------------------------------------------------------------------- detection source


def test_box_helpers_follow_glip():
  np.testing.assert_array_equal(detection.xywh_to_xyxy([[10, 20, 5, 1]]), [[10, 20, 14, 20]])
  np.testing.assert_array_equal(detection.xyxy_to_xywh([[10, 20, 14, 25]]), [[10, 20, 5, 6]])
  clipped, keep = detection.clip_and_drop_empty([[-5, 2, 20, 9], [3, 4, 3, 8]], 10, 15)
  np.testing.assert_array_equal(clipped[0], [0, 2, 14, 9])
  np.testing.assert_array_equal(keep, [True, False])
  with pytest.raises(ValueError, match=r"img 7\.jpg.*zero or negative"):
    detection.check_boxes([[3, 4, 3, 8]], [1], 4, "img 7.jpg")
  with pytest.raises(ValueError, match=r"img 7\.jpg.*\[0, 5\].*1\.\.4"):
    detection.check_boxes([[1, 1, 3, 3]] * 3, [0, 5, 2], 4, "img 7.jpg")


def test_decode_checks_boxes_and_labels(source):
  good = {"image": np.zeros((8, 8, 3), np.uint8), "boxes": np.array([[1, 1, 5, 5]], np.float32),
          "box_labels": np.array([3], np.int32), "orig_size": np.array([8, 8], np.int32),
          "image_id": np.int32(17)}
  out = source.with_grounding(good)
  np.testing.assert_array_equal(out["positive_map"], source.grounding.class_token_map[[2]])
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"zero or negative size[\s\S]*17"):
    source.with_grounding({**good, "boxes": np.array([[5, 1, 5, 5]], np.float32)})
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"outside 1\.\.4[\s\S]*17"):
    source.with_grounding({**good, "box_labels": np.array([5], np.int32)})


def test_embedded_source_contract(source):
  assert isinstance(source, detection.DetectionSource)
  assert source.class_names == embedded_detection.CLASS_NAMES and source.num_classes == 4
  assert source.category_ids == (1, 2, 3, 4)
  assert {s: source.num_examples(s) for s in source.splits} == {"train": 512, "val": 64,
                                                                "test": 128}
  assert source.grounding.caption == "red square. blue circle. green triangle. yellow bar"
  assert source.grounding.token_spans() == {1: (1, 2), 2: (4, 5), 3: (7, 8), 4: (10, 11)}
  vocab_tokens = open(source.vocab).read().split("\n")
  assert "[UNK]" in vocab_tokens and vocab_tokens.index("[UNK]") not in source.grounding.text_ids
  images, boxes, labels, num_boxes = source.arrays("train")
  assert images.shape == (512, 128, 128, 3) and images.dtype == np.uint8
  assert set(num_boxes.tolist()) <= {1, 2, 3, 4} and set(labels[labels > 0]) == {1, 2, 3, 4}
  for i in range(100):  # the centre pixel of each box has its class's colour: a learnable signal
    for box, label in zip(boxes[i, :num_boxes[i]], labels[i, :num_boxes[i]]):
      x1, y1, x2, y2 = box.astype(int)
      assert 0 <= x1 < x2 <= 127 and 0 <= y1 < y2 <= 127
      centre = images[i, (y1 + y2 + 1) // 2, (x1 + x2) // 2].astype(int)
      assert np.abs(centre - embedded_detection.COLOURS[label - 1]).max() <= 25
  again = embedded_detection.make_detection_shapes(512, 0)  # the same seed, the same bytes
  for a, b in zip(again, source.arrays("train")):
    np.testing.assert_array_equal(a, b)


def _check_batch(batch, source, flip_allowed: bool):
  images, boxes, labels, num_boxes = source.arrays(batch["_split"])
  class_token_map = source.grounding.class_token_map
  for i, image_id in enumerate(batch["image_id"]):
    if "_mask" in batch and not batch["_mask"][i]:
      continue
    n = num_boxes[image_id - 1]
    np.testing.assert_array_equal(batch["box_mask"][i], np.arange(8) < n)
    np.testing.assert_array_equal(batch["box_labels"][i, :n], labels[image_id - 1, :n])
    np.testing.assert_array_equal(batch["positive_map"][i, :n],
                                  class_token_map[labels[image_id - 1, :n] - 1])
    assert batch["positive_map"][i, n:].sum() == 0 and batch["boxes"][i, n:].sum() == 0
    original = boxes[image_id - 1, :n]
    flipped = np.stack([127 - original[:, 2], original[:, 1], 127 - original[:, 0],
                        original[:, 3]], 1)
    got = batch["boxes"][i, :n]
    assert np.array_equal(got, original) or (flip_allowed and np.array_equal(got, flipped))
    np.testing.assert_array_equal(batch["text_ids"][i], source.grounding.text_ids)
    np.testing.assert_array_equal(batch["image_size"][i], [128, 128])
    np.testing.assert_array_equal(batch["orig_size"][i], [128, 128])


def test_embedded_source_through_the_streams(source):
  train_pp = preprocess.make_preprocess_fn(TRAIN_SPEC)
  stream = pipeline.make_train_dataset(source, "train", train_pp, global_batch_size=16, seed=3)
  batches = list(stream.take(3).as_numpy_iterator())
  expected = {"image": ((16, 128, 128, 3), np.float32), "boxes": ((16, 8, 4), np.float32),
              "box_labels": ((16, 8), np.int32), "box_mask": ((16, 8), np.bool_),
              "positive_map": ((16, 8, 32), np.float32), "text_ids": ((16, 32), np.int32),
              "text_mask": ((16, 32), np.int32), "image_size": ((16, 2), np.int32),
              "orig_size": ((16, 2), np.int32), "image_id": ((16,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == expected
  flipped_any = False
  for batch in batches:
    _check_batch({**batch, "_split": "train"}, source, flip_allowed=True)
    originals = source.arrays("train")[1][batch["image_id"] - 1]
    flipped_any |= not np.array_equal(batch["boxes"][:, :4] * batch["box_mask"][:, :4, None],
                                      originals)
  assert flipped_any
  # BGR normalisation of the untouched (not flipped) pixels of an image.
  image_id = batches[0]["image_id"][0]
  raw = source.arrays("train")[0][image_id - 1].astype(np.float32)
  bgr = (raw[..., ::-1] - np.float32(pp_ops_boxes.GLIP_PIXEL_MEAN)) / np.float32(
      pp_ops_boxes.GLIP_PIXEL_STD)
  got = batches[0]["image"][0]
  assert np.allclose(got, bgr, atol=1e-5) or np.allclose(got, bgr[:, ::-1], atol=1e-5)

  eval_pp = preprocess.make_preprocess_fn(EVAL_SPEC)
  eval_batches = list(pipeline.make_eval_dataset(source, "val", eval_pp, global_batch_size=24)
                      .as_numpy_iterator())
  assert len(eval_batches) == 3  # 64 examples -> 24 + 24 + 16 and 8 masked
  ids = np.concatenate([b["image_id"][b["_mask"]] for b in eval_batches])
  np.testing.assert_array_equal(np.sort(ids), np.arange(1, 65))
  for batch in eval_batches:
    _check_batch({**batch, "_split": "val"}, source, flip_allowed=False)
  spec = pipeline.batch_spec(source, "train", train_pp, train=True)
  assert spec["positive_map"].shape.as_list() == [None, 8, 32]


def test_coco_ground_truth_matches_the_boxes(source):
  from pycocotools.coco import COCO
  truth = source.coco_ground_truth("test")
  images, boxes, labels, num_boxes = source.arrays("test")
  assert [im["id"] for im in truth["images"]] == list(range(1, 129))
  assert all((im["height"], im["width"]) == (128, 128) for im in truth["images"])
  assert truth["categories"] == [{"id": i + 1, "name": n}
                                 for i, n in enumerate(embedded_detection.CLASS_NAMES)]
  assert len(truth["annotations"]) == num_boxes.sum()
  coco = COCO()
  coco.dataset = truth
  coco.createIndex()
  for image_id in (1, 50, 128):
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    n = num_boxes[image_id - 1]
    xywh = np.array([a["bbox"] for a in annotations], np.float32)
    np.testing.assert_array_equal(detection.xywh_to_xyxy(xywh), boxes[image_id - 1, :n])
    np.testing.assert_array_equal(xywh[:, 2], boxes[image_id - 1, :n, 2]
                                  - boxes[image_id - 1, :n, 0] + 1)
    assert [a["category_id"] for a in annotations] == labels[image_id - 1, :n].tolist()
    assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3]
               for a in annotations)


def test_demo_vocabulary_is_written_atomically(tmp_path):
  path = embedded_detection.write_vocabulary(str(tmp_path / "sub" / "vocab.txt"))
  assert open(path).read().split("\n")[:-1] == list(embedded_detection.VOCAB_TOKENS)
  assert os.listdir(tmp_path / "sub") == ["vocab.txt"]  # no partial file left behind
  assert embedded_detection.vocabulary() == embedded_detection.vocabulary()
  other = embedded_detection.DetectionShapesSource(vocab=path, max_text_len=16)
  assert other.grounding.text_ids.shape == (16,)
