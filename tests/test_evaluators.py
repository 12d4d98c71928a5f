"""Evaluators (`jaxprompt/evaluators/`): each one on a tiny hand-written method against a numpy
computation of its metric, with junk padding rows ('_mask' False) that must not count; the
registry's errors; zero-shot on the real tiny CLIP; retrieval against numpy argsort; the same on
4 devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.metrics import average_precision_score

from input_pipeline import embedded_clip, preprocess
from jaxprompt import sharding
from jaxprompt.evaluators import common, multilabel, retrieval, zeroshot
from jaxprompt.models import clip
from jaxprompt.prompts import coop
from conftest import run_on_cpu_devices  # pylint: disable=import-error

NAMES = ("cat", "big_dog", "red square")


class FakeSource:
  name = "fake"
  splits = ("train", "test")
  class_names = NAMES
  class_groups = {"head": np.array([0]), "medium": np.array([1]), "tail": np.array([2])}

  def check_split(self, split):
    if split not in self.splits:
      raise ValueError(f"Unknown split {split!r} for data source {self.name!r}; valid splits: "
                       f"{', '.join(self.splits)}.")


def junk_like(array, rng):
  """Padding rows that would change every metric if they counted."""
  if array.dtype.kind in "iu":
    return rng.integers(0, 2, size=array.shape).astype(array.dtype)
  return (100 * rng.normal(size=array.shape)).astype(array.dtype)


def make_ctx(arrays, predict_fns, *, config=None, batch_size=4, padding=3, source=None):
  """An EvalContext whose 'test' split is `arrays` (dict of (N, ...) numpy) in batches of
  `batch_size`, followed by `padding` junk rows with '_mask' False."""
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(7)
  n = len(next(iter(arrays.values())))
  padded = {k: np.concatenate([v, junk_like(v[:padding], rng)]) for k, v in arrays.items()}
  total = -(-(n + padding) // batch_size) * batch_size
  padded = {k: np.concatenate([v, junk_like(v[:total - len(v)], rng)]) if total > len(v) else v
            for k, v in padded.items()}
  padded["_mask"] = np.arange(total) < n

  def batches(split):
    for start in range(0, total, batch_size):
      local = {k: v[start:start + batch_size] for k, v in padded.items()}
      yield sharding.global_batch(local, mesh)

  return common.EvalContext(config or ml_collections.ConfigDict(), source or FakeSource(), mesh,
                            batches, predict_fns)


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------------
# A linear "method" on (N, 2, 2, 3) images.

RNG = np.random.default_rng(0)
W = RNG.normal(size=(12, 3)).astype(np.float32)
IMAGES = RNG.normal(size=(9, 2, 2, 3)).astype(np.float32)
LABEL = RNG.integers(0, 3, size=9).astype(np.int32)
VARIABLES = {"params": {"w": jnp.asarray(W)}}


def linear_logits(variables, batch):
  return batch["image"].reshape(len(batch["image"]), -1) @ variables["params"]["w"]


def linear_loss(variables, batch):
  return optax.softmax_cross_entropy_with_integer_labels(linear_logits(variables, batch),
                                                         batch["label"])


LINEAR_FNS = {"logits": linear_logits, "loss": linear_loss}


def test_classification_matches_numpy_and_ignores_padding():
  ctx = make_ctx({"image": IMAGES, "label": LABEL}, LINEAR_FNS)
  got = common.build("val", {"type": "classification", "split": "test"}, ctx).run(VARIABLES)
  logits = IMAGES.reshape(9, -1) @ W
  assert got["examples"] == 9
  np.testing.assert_allclose(got["accuracy"], np.mean(logits.argmax(-1) == LABEL), atol=1e-7)
  np.testing.assert_allclose(got["loss"], -np.mean(log_softmax(logits)[np.arange(9), LABEL]),
                             rtol=1e-5)


def test_classification_scalar_loss_counts_once_per_real_example():
  """A method whose loss is one scalar per batch: each real example counts it once."""
  fns = {"logits": linear_logits, "loss": lambda v, batch: jnp.sum(batch["_mask"]) * 1.0}
  ctx = make_ctx({"image": IMAGES, "label": LABEL}, fns, batch_size=4, padding=3)
  got = common.build("val", {"type": "classification", "split": "test"}, ctx).run(VARIABLES)
  # Batches of 4, 4, 1 real examples: each example's loss is its batch's real count.
  np.testing.assert_allclose(got["loss"], (4 * 4 + 4 * 4 + 1 * 1) / 9, rtol=1e-6)


def test_multilabel_matches_sklearn_and_ignores_padding():
  labels = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0], [1, 0, 0],
                     [0, 0, 1], [1, 1, 1]], np.float32)
  config = ml_collections.ConfigDict({"lmpt": {"threshold": 0.4}})
  ctx = make_ctx({"image": IMAGES, "labels": labels}, {"logits": linear_logits}, config=config)
  evaluator = common.build("ml", {"type": "multilabel", "split": "test"}, ctx)
  assert evaluator.threshold == 0.4  # config.lmpt.threshold is the default
  got = evaluator.run(VARIABLES)
  scores = np.exp(log_softmax((IMAGES.reshape(9, -1) @ W).astype(np.float64)))
  aps = average_precision_score(labels, scores, average=None)
  assert got["examples"] == 9
  np.testing.assert_allclose(got["mAP"], aps.mean(), rtol=1e-5)
  for group, c in (("head", 0), ("medium", 1), ("tail", 2)):
    np.testing.assert_allclose(got[f"{group}_mAP"], aps[c], rtol=1e-5)
  predicted = scores > 0.4
  tp = (predicted & (labels == 1)).sum()
  np.testing.assert_allclose(got["OP"], tp / predicted.sum(), rtol=1e-6)
  np.testing.assert_allclose(got["OR"], tp / labels.sum(), rtol=1e-6)
  explicit = common.build("ml", {"type": "multilabel", "split": "test", "threshold": 0.9}, ctx)
  assert explicit.threshold == 0.9
  assert common.build("ml", {"type": "multilabel", "split": "test"},
                      make_ctx({"image": IMAGES, "labels": labels}, {"logits": linear_logits})
                      ).threshold == multilabel.DEFAULT_THRESHOLD


# ------------------------------------------------------------------------------------------------
# Zero-shot with a hand-written "CLIP": token ids -> sum of table rows (pad 0 ignored).

TABLE = RNG.normal(size=(10, 5)).astype(np.float32)
W_IMAGE = RNG.normal(size=(12, 5)).astype(np.float32)
CLIP_VARIABLES = {"params": {"table": jnp.asarray(TABLE), "w": jnp.asarray(W_IMAGE),
                             "scale": jnp.asarray(np.log(5.0), jnp.float32)}}


def fake_tokenize(texts):
  """[SOT=1] + one id in 2..8 per character (first 4) + [EOT=9], zero-padded to 8."""
  ids = np.zeros((len(texts), 8), np.int32)
  for i, text in enumerate(texts):
    row = [1] + [2 + ord(c) % 7 for c in text[:4]] + [9]
    ids[i, :len(row)] = row
  return ids


def fake_embed_text(variables, ids):
  one_hot = jax.nn.one_hot(ids, 10) * (ids > 0)[..., None]
  features = one_hot.sum(1) @ variables["params"]["table"]
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def fake_embed_image(variables, images):
  features = images.reshape(len(images), -1) @ variables["params"]["w"]
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


FAKE_CLIP = {"tokenize": fake_tokenize, "embed_text": fake_embed_text,
             "embed_image": fake_embed_image,
             "logit_scale": lambda variables: jnp.exp(variables["params"]["scale"])}


def numpy_zero_shot_logits(templates):
  per_template = []
  for template in templates:
    ids = fake_tokenize([template.format(n.replace("_", " ")) for n in NAMES])
    counts = np.stack([np.bincount(row[row > 0], minlength=10) for row in ids])
    per_template.append(normalize(counts @ TABLE))
  classifier = normalize(np.mean(per_template, axis=0))
  return 5.0 * normalize(IMAGES.reshape(9, -1) @ W_IMAGE) @ classifier.T


@pytest.mark.parametrize("templates", ["default", "ensemble", "{} a.|the {} b."])
def test_zero_shot_matches_numpy_template_ensemble(templates):
  ctx = make_ctx({"image": IMAGES, "label": LABEL}, FAKE_CLIP)
  got = common.build("zs", {"type": "zeroshot", "split": "test", "templates": templates},
                     ctx).run(CLIP_VARIABLES)
  logits = numpy_zero_shot_logits(zeroshot.parse_templates(templates))
  assert got["examples"] == 9
  np.testing.assert_allclose(got["accuracy"], np.mean(logits.argmax(-1) == LABEL), atol=1e-7)
  np.testing.assert_allclose(got["loss"], -np.mean(log_softmax(logits)[np.arange(9), LABEL]),
                             rtol=1e-5)


def test_zero_shot_multilabel_metrics():
  labels = (RNG.random(size=(9, 3)) < 0.5).astype(np.float32)
  labels[:3] = np.eye(3)  # every class has a positive
  ctx = make_ctx({"image": IMAGES, "labels": labels}, FAKE_CLIP)
  got = common.build("zs", {"type": "zeroshot", "split": "test", "metrics": "multilabel",
                            "threshold": 0.35}, ctx).run(CLIP_VARIABLES)
  expected = multilabel.evaluate(labels, numpy_zero_shot_logits(["a photo of a {}."]),
                                 FakeSource.class_groups, 0.35)
  assert got["examples"] == 9 and set(got) == set(expected) | {"examples"}
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_zero_shot_on_the_tiny_clip_equals_hand_computation(tmp_path):
  vocab = embedded_clip.write_byte_vocabulary(str(tmp_path / "bytes.txt.gz"))
  model = coop.Model(num_classes=3, class_names=NAMES, vocab_path=vocab, variant="ViT-mu/8",
                     n_ctx=2)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (5, 32, 32, 3)))
  label = np.array([0, 1, 2, 1, 0], np.int32)
  ctx = make_ctx({"image": images, "label": label}, coop.clip_predict_fns(model), padding=2)
  got = common.build("zs", {"type": "zeroshot", "split": "test"}, ctx).run(variables)

  params = variables["params"]["clip"]
  tower = clip.Model(**clip.decode_variant("ViT-mu/8"))
  tokens = coop.get_tokenizer(vocab)([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
  text = normalize(np.asarray(tower.apply({"params": params}, jnp.asarray(tokens),
                                          method=clip.Model.encode_text)))  # all 77 positions
  image = normalize(np.asarray(tower.apply({"params": params}, jnp.asarray(images),
                                           method=clip.Model.encode_image)))
  logits = np.exp(float(params["logit_scale"])) * image @ text.T
  assert got["examples"] == 5
  np.testing.assert_allclose(got["accuracy"], np.mean(logits.argmax(-1) == label), atol=1e-7)
  np.testing.assert_allclose(got["loss"], -np.mean(log_softmax(logits)[np.arange(5), label]),
                             rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Retrieval: caption i is token id ids[i]; its feature is table[ids[i]].

RETRIEVAL_FNS = {
    "embed_image": lambda v, images: fake_embed_image({"params": {"w": jnp.eye(12)}}, images),
    "embed_text": lambda v, ids: v["params"]["table"][ids[:, 0]] / jnp.linalg.norm(
        v["params"]["table"][ids[:, 0]], axis=-1, keepdims=True)}


def test_retrieval_perfect_pairs_give_recall_one():
  table = RNG.normal(size=(30, 12)).astype(np.float32)
  ids = RNG.permutation(30)[:11].astype(np.int32)[:, None]
  images = table[ids[:, 0]].reshape(11, 2, 2, 3)
  ctx = make_ctx({"image": images, "caption_tokens": ids}, RETRIEVAL_FNS, padding=5)
  got = common.build("ret", {"type": "retrieval", "split": "test"}, ctx).run(
      {"params": {"table": jnp.asarray(table)}})
  assert got == {"img2txt_R@1": 1.0, "img2txt_R@5": 1.0, "img2txt_R@10": 1.0,
                 "txt2img_R@1": 1.0, "txt2img_R@5": 1.0, "txt2img_R@10": 1.0, "examples": 11}


def test_retrieval_recall_matches_numpy_argsort():
  n = 40
  table = RNG.normal(size=(n, 12)).astype(np.float32)
  ids = RNG.permutation(n).astype(np.int32)[:, None]
  # Images near their own caption, but noisy enough that many are not first.
  images = (table[ids[:, 0]] + 1.5 * RNG.normal(size=(n, 12))).astype(np.float32)
  ctx = make_ctx({"image": images.reshape(n, 2, 2, 3), "caption_tokens": ids}, RETRIEVAL_FNS,
                 batch_size=8, padding=6)
  got = common.build("ret", {"type": "retrieval", "split": "test", "ks": (1, 3, 5)}, ctx).run(
      {"params": {"table": jnp.asarray(table)}})
  similarity = normalize(images.astype(np.float64)) @ normalize(table[ids[:, 0]].astype(
      np.float64)).T
  for direction, sims in (("img2txt", similarity), ("txt2img", similarity.T)):
    rank = np.argsort(-sims, axis=1)
    for k in (1, 3, 5):
      expected = np.mean([i in rank[i, :k] for i in range(n)])
      assert got[f"{direction}_R@{k}"] == pytest.approx(expected), (direction, k)
  assert 0 < got["img2txt_R@1"] < 1 and got["examples"] == n  # the test can tell


def test_recall_at_k_counts_only_the_own_pair():
  top = np.array([[0, 2], [0, 1], [1, 0]])
  assert retrieval.recall_at_k(top, (1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


# ------------------------------------------------------------------------------------------------
# The registry: config syntax, scheduling and errors at construction.


def test_from_config_builds_names_periods_and_prefixed_metrics():
  ctx = make_ctx({"image": IMAGES, "label": LABEL}, LINEAR_FNS)
  evals = ml_collections.ConfigDict({
      "val": {"type": "classification", "split": "test", "every_steps": 10},
      "end": {"type": "classification", "split": "train", "every_epochs": 0.5}})
  evaluators = common.from_config(evals, ctx)
  assert {k: e.name for k, e in evaluators.items()} == {"val": "val", "end": "end"}
  assert evaluators["val"].interval(steps_per_epoch=7) == 10
  assert evaluators["end"].interval(steps_per_epoch=8) == 4
  assert evaluators["val"].due(20, 7) and not evaluators["val"].due(25, 7)
  assert set(common.run_all(evaluators, VARIABLES, step=10, steps_per_epoch=100)) == {
      "val/accuracy", "val/loss", "val/examples"}
  assert set(common.run_all(evaluators, VARIABLES)) == {
      f"{n}/{m}" for n in ("val", "end") for m in ("accuracy", "loss", "examples")}


@pytest.mark.parametrize("entry, fns, message", [
    ({"type": "topk", "split": "test"}, LINEAR_FNS,
     r"config.evals.bad: unknown evaluator type 'topk'; known types: \['captioning', "
     r"'classification', 'detection', 'multilabel', 'retrieval', 'tta', 'tta_captioning', "
     r"'tta_retrieval', 'video_retrieval', 'zeroshot'\]"),
    ({"type": "classification", "split": "tset"}, LINEAR_FNS,
     r"config.evals.bad: Unknown split 'tset' for data source 'fake'; valid splits: train, test"),
    ({"type": "classification"}, LINEAR_FNS, r"needs a 'split'"),
    ({"type": "multilabel", "split": "test", "treshold": 0.5}, LINEAR_FNS,
     r"config.evals.bad \(type 'multilabel'\): unknown setting\(s\) \['treshold'\]; valid: "
     r"\['every_epochs', 'every_steps', 'split', 'threshold', 'type'\]"),
    ({"type": "multilabel", "split": "test", "threshold": 1.5}, LINEAR_FNS,
     r"threshold=1.5: expected a number in \(0, 1\)"),
    ({"type": "retrieval", "split": "test", "ks": (0, 5)}, RETRIEVAL_FNS, r"ks=\(0, 5\)"),
    ({"type": "zeroshot", "split": "test", "metrics": "map"}, FAKE_CLIP, r"metrics='map'"),
    ({"type": "zeroshot", "split": "test", "templates": "no slot"}, FAKE_CLIP,
     r"bad: \['no slot'\]"),
    ({"type": "classification", "split": "test", "every_steps": 5, "every_epochs": 1},
     LINEAR_FNS, r"set every_steps or every_epochs, not both"),
    ({"type": "classification", "split": "test", "every_steps": -1}, LINEAR_FNS,
     r"every_steps=-1: expected a number >= 0"),
    ({"type": "zeroshot", "split": "test"}, LINEAR_FNS,
     r"The 'zeroshot' evaluator needs the method's predict function\(s\) \['tokenize', "
     r"'embed_text', 'embed_image', 'logit_scale'\]; the method exports \['logits', 'loss'\]"),
    ({"type": "classification", "split": "test"}, {"logits": linear_logits},
     r"needs the method's predict function\(s\) \['loss'\]"),
])
def test_bad_entries_fail_at_construction_with_clear_errors(entry, fns, message):
  ctx = make_ctx({"image": IMAGES, "label": LABEL}, fns)
  with pytest.raises(ValueError, match=message):
    common.from_config({"bad": entry}, ctx)


def test_missing_batch_key_names_the_evaluator_and_split():
  ctx = make_ctx({"image": IMAGES, "label": LABEL}, {"logits": linear_logits})
  evaluator = common.build("ml", {"type": "multilabel", "split": "test"}, ctx)
  with pytest.raises(ValueError, match=r"'multilabel' evaluator 'ml' needs batches with "
                                       r"\['labels'\]; split 'test' has \['_mask', 'image', "
                                       r"'label'\]"):
    evaluator.run(VARIABLES)


def test_eval_batches_cover_every_example_once():
  """The shared eval input (input pipeline + global batches): a constant 'class 0' method's
  accuracy is the split's share of label 0, and padding rows do not count."""
  source = embedded_clip.NamedShapesSource()
  eval_pp = preprocess.make_preprocess_fn("value_range(0, 1)")
  batches = common.eval_batches(source, eval_pp, 48, sharding.make_mesh())
  ctx = common.EvalContext(ml_collections.ConfigDict(), source, sharding.make_mesh(), batches,
                           {"logits": lambda v, b: jnp.zeros((len(b["image"]), 10)).at[:, 0].set(1),
                            "loss": lambda v, b: jnp.zeros(len(b["image"]))})
  got = common.build("val", {"type": "classification", "split": "val"}, ctx).run({})
  labels = np.array([int(e["label"]) for e in source.dataset("val").as_numpy_iterator()])
  assert got["examples"] == source.num_examples("val") == len(labels) == 500  # 11 batches of 48
  assert got["accuracy"] == pytest.approx(np.mean(labels == 0))


MULTI_DEVICE_CHECK = """
import jax, test_evaluators as t
assert jax.device_count() == 4, jax.devices()
t.test_classification_matches_numpy_and_ignores_padding()
t.test_multilabel_matches_sklearn_and_ignores_padding()
t.test_retrieval_recall_matches_numpy_argsort()
print("OK")
"""


def test_evaluators_on_4_devices_match_numpy():
  """Batches split over 4 devices (padding rows on some of them), metrics replicated back."""
  assert "OK" in run_on_cpu_devices(MULTI_DEVICE_CHECK, 4)
