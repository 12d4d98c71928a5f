"""GLIP's per-image training captions for class lists that overflow one caption (LVIS): the
sampler (`grounding.CaptionSampler`: every positive, sampled negatives, the token budget, seeded
determinism, each box's positive-map row on its class's tokens), the detection sources serving
them in training batches, and GLIP / SDPT training on them (`configs/sdpt_lvis.py`'s demo data)."""
import numpy as np
import pytest

from conftest import train_batches
from configs import sdpt_lvis
from input_pipeline import detection, embedded_detection, grounding, pipeline, preprocess
from input_pipeline.multilabel_lt import COCO_CLASSES as COCO_NAMES  # COCO's official 80 names
from jaxprompt import train
from jaxprompt.evaluators import detection as detection_evaluator
from jaxprompt.prompts import glip_finetune

MAX_LENGTH = 40  # COCO's 80 names are 194 tokens: far over


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  """Special tokens, '.', every COCO word whole."""
  words = sorted({w for name in COCO_NAMES for w in name.split()})
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def sampler(vocab):
  return grounding.CaptionSampler(COCO_NAMES, vocab, MAX_LENGTH)


def counted(name: str) -> int:
  """GLIP's count of a name: its words (whole in this vocabulary) plus the '.' after it."""
  return len(name.split()) + 1


def image_labels(rng, count):
  return rng.choice(len(COCO_NAMES), size=count) + 1  # repeats: several boxes of one class


def test_captions_hold_every_positive_and_fill_the_budget_with_negatives(sampler, vocab):
  tokenizer = grounding.bert_tokenizer(vocab)
  rng = np.random.default_rng(0)
  for image_id in range(40):
    labels = image_labels(rng, int(rng.integers(1, 6)))
    caption = sampler.sample(labels, grounding.caption_rng(7, image_id))
    positives, negatives = set(caption.positive_labels), set(caption.negative_labels)
    assert positives == set(labels.tolist()) and caption.keep_box.all()
    assert negatives and not negatives & positives
    assert sorted(caption.labels) == sorted(positives | negatives)
    # The caption is those names joined by ". ", tokenised as a whole, within max_length.
    names = [grounding.clean_name(COCO_NAMES[l - 1]) for l in caption.labels]
    assert caption.caption == ". ".join(names)
    ids = tokenizer(caption.caption)["input_ids"]
    assert len(ids) <= MAX_LENGTH and caption.text_mask.sum() == len(ids)
    np.testing.assert_array_equal(caption.text_ids[:len(ids)], ids)
    assert (caption.text_ids[len(ids):] == tokenizer.pad_token_id).all()
    # GLIP's budget: the counts (name + '. ') of all captioned names stay under 254 -> here 38,
    # and the first drawn negative that did not fit is why it stopped (85 draws >= 80 classes).
    used = sum(counted(COCO_NAMES[l - 1]) for l in caption.labels)
    assert used < MAX_LENGTH - 2
    assert MAX_LENGTH - 2 - used <= max(counted(n) for n in COCO_NAMES)


def test_positive_map_rows_mark_each_box_class_tokens(sampler, vocab):
  tokenizer = grounding.bert_tokenizer(vocab)
  labels = np.array([3, 17, 3, 59])  # two boxes of one class; a two-word name
  caption = sampler.sample(labels, grounding.caption_rng(0, 5))
  assert caption.positive_map.shape == (4, MAX_LENGTH)
  for label, row in zip(labels, caption.positive_map):
    positions = np.flatnonzero(row)
    assert positions.size and (np.diff(positions) == 1).all()  # one contiguous run
    assert tokenizer.convert_ids_to_tokens(caption.text_ids[positions].tolist()) == \
        COCO_NAMES[label - 1].split()
    # ... at the place of this name in the caption, counted in names and '.' separators.
    index = caption.labels.index(int(label))
    first = 1 + sum(counted(COCO_NAMES[l - 1]) for l in caption.labels[:index])
    assert positions[0] == first
  np.testing.assert_array_equal(caption.positive_map[0], caption.positive_map[2])


def test_captions_are_a_function_of_seed_and_image(sampler):
  labels = np.array([1, 2])
  first = sampler.sample(labels, grounding.caption_rng(3, 11))
  again = sampler.sample(labels, grounding.caption_rng(3, 11))
  assert first.caption == again.caption
  np.testing.assert_array_equal(first.text_ids, again.text_ids)
  np.testing.assert_array_equal(first.positive_map, again.positive_map)
  others = {sampler.sample(labels, grounding.caption_rng(s, i)).caption
            for s, i in ((3, 12), (4, 11), (5, 13))}
  assert first.caption not in others


def test_positives_over_the_budget_are_cut_with_their_boxes(sampler):
  labels = np.arange(1, 31)  # 30 classes: ~70 counted tokens > 38
  caption = sampler.sample(np.repeat(labels, 2), grounding.caption_rng(0, 0))
  kept = set(caption.positive_labels)
  assert 0 < len(kept) < 30 and not caption.negative_labels  # no room left for negatives
  assert sum(counted(COCO_NAMES[l - 1]) for l in kept) <= MAX_LENGTH - 2
  np.testing.assert_array_equal(caption.keep_box, np.isin(np.repeat(labels, 2), list(kept)))
  assert not caption.positive_map[~caption.keep_box].any()
  assert caption.positive_map[caption.keep_box].any(axis=1).all()


def test_negative_counts_follow_the_control_probability(vocab):
  names = COCO_NAMES[:20]
  full = grounding.CaptionSampler(names, vocab, 256, max_negatives=5)
  some = grounding.CaptionSampler(names, vocab, 256, max_negatives=5,
                                  full_negatives_probability=0.0)
  none = grounding.CaptionSampler(names, vocab, 256, max_negatives=0)
  labels = np.array([1])
  counts = {len(some.sample(labels, grounding.caption_rng(0, i)).labels) - 1 for i in range(60)}
  assert counts <= {0, 1, 2, 3, 4, 5} and len(counts) >= 4  # 1..5 drawn, minus label 1
  assert {len(full.sample(labels, grounding.caption_rng(0, i)).labels) - 1
          for i in range(20)} <= {4, 5}
  assert none.sample(labels, grounding.caption_rng(0, 0)).labels == (1,)


def test_bad_settings_and_labels_are_clear_errors(vocab, sampler):
  with pytest.raises(ValueError, match=r"max_negatives=-1: expected an int >= 0"):
    grounding.CaptionSampler(COCO_NAMES, vocab, MAX_LENGTH, max_negatives=-1)
  with pytest.raises(ValueError, match=r"full_negatives_probability=1.5"):
    grounding.CaptionSampler(COCO_NAMES, vocab, MAX_LENGTH, full_negatives_probability=1.5)
  with pytest.raises(ValueError, match=r"max_length=1"):
    grounding.CaptionSampler(COCO_NAMES, vocab, 1)
  with pytest.raises(ValueError, match=r"box_labels \[0, 81\] are outside .*1..80"):
    sampler.sample(np.array([0, 3, 81]), grounding.caption_rng(0, 0))
  with pytest.raises(ValueError, match="per_image_captions='yes'"):
    detection.DetectionSource("d", COCO_NAMES, ("train",), vocab=vocab, per_image_captions="yes")
  prompts = [{"prefix": "", "name": n, "suffix": ""} for n in COCO_NAMES]
  with pytest.raises(ValueError, match="per-image captions cannot use caption_prompts"):
    detection.DetectionSource("d", COCO_NAMES, ("train",), vocab=vocab, max_text_len=MAX_LENGTH,
                              caption_prompts=prompts, per_image_captions=True)
  prompted = detection.DetectionSource("d", COCO_NAMES, ("train",), vocab=vocab,
                                       max_text_len=MAX_LENGTH, caption_prompts=prompts)
  assert prompted.caption_overflow and not prompted.samples_captions("train")  # not automatic


# ------------------------------------------------------------------ sources, batches, training

def demo_source(**kwargs):
  return embedded_detection.DetectionShapesSource(
      extra_class_names=embedded_detection.DISTRACTOR_NAMES, **kwargs)


def test_overflowing_source_serves_per_image_captions_in_training_only():
  source = demo_source(max_text_len=9)  # room for two names: 3-class images lose one class
  assert source.caption_overflow and source.samples_captions("train")
  assert not source.samples_captions("test")
  assert not demo_source(per_image_captions=False).samples_captions("train")
  assert demo_source(max_text_len=64, per_image_captions=True).samples_captions("train")
  assert not demo_source(max_text_len=64).samples_captions("train")  # 16 names fit in 64
  spec = "resize_glip(128, 128)|to_bgr255_normalize|pad_image(128, 128)|pad_boxes(8)"
  batches = [next(pipeline.make_train_dataset(
      source, "train", preprocess.make_preprocess_fn(spec), global_batch_size=32,
      seed=0).as_numpy_iterator()) for _ in range(2)]
  np.testing.assert_array_equal(batches[0]["text_ids"], batches[1]["text_ids"])  # seeded
  batch = batches[0]
  assert batch["text_ids"].shape == (32, 9) and batch["positive_map"].shape == (32, 8, 9)
  assert len({tuple(row) for row in batch["text_ids"]}) > 8  # captions differ per image
  tokens = source.caption_sampler.tokenizer.convert_ids_to_tokens
  images, boxes, labels, counts = source.arrays("train")
  cut = 0
  for i, image_id in enumerate(batch["image_id"]):
    served = batch["box_labels"][i][batch["box_mask"][i]]
    cut += counts[image_id - 1] - len(served)
    assert set(served) <= set(labels[image_id - 1][:counts[image_id - 1]].tolist())
    for label, row in zip(served, batch["positive_map"][i]):
      words = tokens(batch["text_ids"][i][row > 0].tolist())
      assert words == source.class_names[label - 1].split()
  assert cut > 0  # some images had more classes than the caption holds; their boxes went
  test = next(source.dataset("test").as_numpy_iterator())  # evaluation: the first chunk's
  np.testing.assert_array_equal(test["text_ids"], source.grounding.text_ids)


def test_lvis_fields_of_the_demo_ground_truth():
  source = demo_source(lvis_fields=True)
  truth = source.coco_ground_truth("test")
  detection_evaluator.check_lvis_ground_truth(truth, "demo")
  shown = {}
  for annotation in truth["annotations"]:
    shown.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
  for image in truth["images"]:
    assert set(image["neg_category_ids"]) == set(range(1, 17)) - shown.get(image["id"], set())
  assert [c["frequency"] for c in truth["categories"]][:5] == ["f", "c", "r", "f", "r"]


def test_glip_refuses_an_overflowing_source_without_per_image_captions():
  config = sdpt_lvis.get_config("runlocal")
  config.model_name = "prompts.glip_finetune"
  with pytest.raises(ValueError, match=r"cannot train GLIP here on split 'train'.*"
                                       r"per_image_captions"):
    glip_finetune.make_loss(config, demo_source(per_image_captions=False))
  glip_finetune.make_loss(config, demo_source())  # per-image captions: trains


def test_glip_trains_on_per_image_captions():
  """configs/sdpt_lvis.py's demo (16 names over a 32-token caption): a few steps on one batch of
  per-image captions lower the loss (GLIP's linear probe, the cheapest backward to compile)."""
  config = sdpt_lvis.get_config("runlocal,mask=linear_probe")
  config.batch_size = 4
  config.optim.warmup_steps, config.optim.lr, config.optim.decay = 1, 1e-2, "cosine"
  config.total_steps = 100
  exp = train.build(config)
  assert exp.data.source.samples_captions(config.train_split)
  batch = train_batches(exp, 1)[0]
  assert len({tuple(row) for row in np.asarray(batch["text_ids"])}) > 1
  state, losses = exp.state, []
  for _ in range(10):
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses


def test_lvis_configs_follow_glips_lvis_protocol():
  """Real data: lvis/v1, chunks of 40 names, 300 detections, LVISEval; SDPT's release recipe."""
  from configs import glip_lvis, sdpt_coco  # pylint: disable=import-outside-toplevel
  sdpt = sdpt_lvis.get_config("data=/coco,size=L")
  glip = glip_lvis.get_config("data=/coco,size=T")
  for config in (sdpt, glip):
    assert config.dataset == "lvis/v1" and config.glip.detections_per_image == 300
    assert dict(config.evals.minival) == dict(type="detection", split="minival", api="lvis",
                                              chunk_size=40, max_detections=300,
                                              **({"every_steps": 100} if config is sdpt else {}))
  assert glip.mode == "eval" and glip.model_name == "prompts.glip_finetune"
  coco = sdpt_coco.get_config("data=/coco,size=L")
  assert (sdpt.model_name, sdpt.trainable_params) == sdpt_coco.MASKS["release"]
  assert (sdpt.optim.to_dict(), sdpt.total_steps, sdpt.batch_size) == (
      coco.optim.to_dict(), coco.total_steps, coco.batch_size)
  assert sdpt_lvis.get_config("api=lvis").dataset_kwargs.lvis_fields
  with pytest.raises(ValueError, match="api='cocoo'"):
    sdpt_lvis.get_config("api=cocoo")
