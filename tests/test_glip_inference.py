"""GLIP post-processing (`jaxprompt.models.glip.inference`): class-score aggregation, static-shape
class-aware NMS against a numpy greedy reference, and `postprocess` on a hand-made head output
and against a numpy transcription of microsoft/GLIP's `ATSSPostProcessor` + `boxlist_ml_nms`."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.models.glip import boxes, inference

LEVEL_SHAPES = ((4, 4), (2, 2), (1, 1), (1, 1), (1, 1))  # a 32x32 image, N = 23
LEVEL_SIZES = boxes.level_sizes(LEVEL_SHAPES)
ANCHORS = boxes.anchors(LEVEL_SHAPES)


def logit(p):
  return math.log(p / (1 - p))


def sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


# ------------------------------------------------------------------------------ class scores
def test_class_scores_mean_and_max():
  probs = jnp.array([[[0.1, 0.8, 0.6, 0.3, 0.9]]])  # (B=1, N=1, T=5)
  # class 1 -> tokens 1, 2 (a normalised map row), class 2 -> token 3, class 3 -> no token.
  token_map = jnp.array([[0, 0.5, 0.5, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
  mean = jax.jit(inference.class_scores, static_argnums=2)(probs, token_map, "MEAN")
  top = jax.jit(inference.class_scores, static_argnums=2)(probs, token_map, "MAX")
  np.testing.assert_allclose(mean[0, 0], [0.7, 0.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(top[0, 0], [0.8, 0.3, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match="agg"):
    inference.class_scores(probs, token_map, "SUM")
  with pytest.raises(ValueError, match="class_token_map"):
    inference.class_scores(probs, token_map[:, :4], "MEAN")


# --------------------------------------------------------------------------------------- NMS
def numpy_iou(a, b):
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  wh = np.clip(rb - lt + 1, 0, None)
  inter = wh[0] * wh[1]
  area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)  # noqa: E731
  return inter / (area(a) + area(b) - inter)


def numpy_greedy_nms(boxes_, scores, labels, valid, threshold):
  """Kept indices in descending score order (stable: equal scores keep index order)."""
  order = [i for i in np.argsort(-scores, kind="stable") if valid[i]]
  kept = []
  for i in order:
    if all(labels[j] != labels[i] or numpy_iou(boxes_[i], boxes_[j]) <= threshold for j in kept):
      kept.append(i)
  return kept


nms_jit = jax.jit(inference.nms, static_argnames=("iou_threshold", "max_outputs"))


@pytest.mark.parametrize("seed", [0, 1])
def test_nms_matches_numpy_greedy_reference_with_ties(seed):
  rng = np.random.default_rng(seed)
  count = 80
  xy = rng.uniform(0, 60, (count, 2))
  cand = np.concatenate([xy, xy + rng.uniform(5, 40, (count, 2))], 1).astype(np.float32)
  cand[10] = cand[11]  # identical boxes ...
  scores = rng.choice(np.linspace(0.1, 0.9, 9), count).astype(np.float32)  # ... and many ties
  scores[10] = scores[11]
  labels = rng.integers(1, 4, count).astype(np.int32)
  labels[10] = labels[11]
  valid = rng.random(count) < 0.9
  for threshold in (0.3, 0.6):
    expected = numpy_greedy_nms(cand, scores, labels, valid, threshold)
    for max_outputs in (len(expected) + 5, 10):
      indices, kept = nms_jit(cand, scores, labels, valid, iou_threshold=threshold,
                              max_outputs=max_outputs)
      n = min(len(expected), max_outputs)
      assert int(np.sum(kept)) == n and np.all(np.asarray(kept)[:n])
      np.testing.assert_array_equal(np.asarray(indices)[:n], expected[:n])
  # Edge cases: IoU (+1 areas) exactly at the threshold is not suppressed; +1 areas matter.
  square = [0.0, 0.0, 9.0, 9.0]  # 10 x 10 px

  def pair(other):
    return (jnp.array([square, other]), jnp.array([0.9, 0.8]), jnp.array([1, 1]),
            jnp.array([True, True]))

  _, kept = nms_jit(*pair([0.0, 0.0, 9.0, 5.0]), iou_threshold=0.6, max_outputs=2)  # 60 / 100
  np.testing.assert_array_equal(kept, [True, True])
  _, kept = nms_jit(*pair([0.0, 0.0, 9.0, 4.0]), iou_threshold=0.45, max_outputs=2)  # 50 / 100
  np.testing.assert_array_equal(kept, [True, False])  # (36 / 81 = 0.44 without the +1)
  # Class-agnostic suppression would differ: the reference is class-aware here.
  assert numpy_greedy_nms(cand, scores, np.ones_like(labels), valid, 0.3) != \
      numpy_greedy_nms(cand, scores, labels, valid, 0.3)


# ------------------------------------------------------------------------------- postprocess
post_jit = jax.jit(inference.postprocess, static_argnums=(2,),
                   static_argnames=("score_threshold", "pre_nms_top_n", "nms_threshold",
                                    "detections_per_image", "score_agg"))

# Classes: 1 -> tokens {1, 2}, 2 -> token {4}, 3 -> token {5}.
CLASS_TOKEN_MAP = np.zeros((3, 6), np.float32)
CLASS_TOKEN_MAP[0, 1:3] = 1
CLASS_TOKEN_MAP[1, 4] = 1
CLASS_TOKEN_MAP[2, 5] = 1


def hand_made_outputs():
  """Image 0 holds five scored anchors (see the test); image 1 only background."""
  token_logits = np.full((2, 23, 6), -10.0, np.float32)  # p = 4.5e-5 < 0.05 everywhere
  centerness = np.zeros((2, 23), np.float32)
  deltas = np.zeros((2, 23, 4), np.float32)
  # Anchor 5 (level 0, row 1, col 1: centre (11.5, 11.5), 64 px): class 1 with token probs 0.8
  # and 0.6 (MEAN 0.7, MAX 0.8), centerness logit 1; deltas move the centre to (17.9, -1.3)
  # and halve the width: box [2.4, -32.8, 33.4, 30.2], clipped to (h, w) = (30, 32).
  token_logits[0, 5, 1], token_logits[0, 5, 2] = logit(0.8), logit(0.6)
  centerness[0, 5] = 1.0
  deltas[0, 5] = [1.0, -2.0, 5 * math.log(0.5), 0.0]
  # Anchor 6 (centre (19.5, 11.5)): the same box, class 1 at 0.5 -> suppressed by anchor 5.
  token_logits[0, 6, 1:3] = 0.0
  deltas[0, 6] = [-0.25, -2.0, 5 * math.log(0.5), 0.0]
  # Anchor 9 (centre (11.5, 19.5)): the same box, class 2 at 0.9 -> kept (other class).
  token_logits[0, 9, 4] = logit(0.9)
  deltas[0, 9] = [1.0, -3.25, 5 * math.log(0.5), 0.0]
  # Anchor 16 (level 1): class 1 at 0.04 < 0.05 with a high centerness -> never a candidate.
  token_logits[0, 16, 1:3] = logit(0.04)
  centerness[0, 16] = 10.0
  # Anchor 20 (level 2, 256 px, clipped to the whole image): class 3 at 0.06 (a candidate before
  # centerness), centerness logit -3.
  token_logits[0, 20, 5] = logit(0.06)
  centerness[0, 20] = -3.0
  return dict(token_logits=token_logits, box_regression=deltas, centerness=centerness)


def test_postprocess_hand_made_output():
  outputs = hand_made_outputs()
  image_size = np.array([[30, 32], [32, 32]], np.int32)
  for agg, class1 in (("MEAN", 0.7), ("MAX", 0.8)):
    got = post_jit(outputs, ANCHORS, LEVEL_SIZES, CLASS_TOKEN_MAP, image_size, score_agg=agg)
    assert got["boxes"].shape == (2, 100, 4) and got["labels"].dtype == jnp.int32
    valid = np.asarray(got["valid"])
    assert valid[0].sum() == 3 and valid[1].sum() == 0 and np.all(valid[0, :3])
    np.testing.assert_array_equal(got["labels"][0, :3], [1, 2, 3])
    np.testing.assert_allclose(got["scores"][0, :3],
                               np.sqrt([class1 * sigmoid(1.0), 0.9 * 0.5, 0.06 * sigmoid(-3.0)]),
                               rtol=1e-5)
    np.testing.assert_allclose(got["boxes"][0, :2], [[2.4, 0, 31, 29]] * 2, atol=1e-4)
    np.testing.assert_allclose(got["boxes"][0, 2], [0, 0, 31, 29], atol=1e-4)
    assert np.all(np.asarray(got["scores"])[~valid] == 0)
    assert np.all(np.asarray(got["labels"])[~valid] == 0)
  # At most one candidate per level: level 0 keeps only anchor 5 (0.7 * 0.73 > 0.9 * 0.5).
  got = post_jit(outputs, ANCHORS, LEVEL_SIZES, CLASS_TOKEN_MAP, image_size, pre_nms_top_n=1)
  np.testing.assert_array_equal(got["labels"][0, :3], [1, 3, 0])


def test_postprocess_rejects_bad_inputs():
  outputs = hand_made_outputs()
  image_size = np.array([[30, 32], [32, 32]], np.int32)
  with pytest.raises(ValueError, match="image_size"):
    inference.postprocess(outputs, ANCHORS, LEVEL_SIZES, CLASS_TOKEN_MAP, image_size[:1])
  with pytest.raises(ValueError, match="centerness"):
    inference.postprocess({k: v for k, v in outputs.items() if k != "centerness"}, ANCHORS,
                          LEVEL_SIZES, CLASS_TOKEN_MAP, image_size)
  with pytest.raises(ValueError, match="level_sizes"):
    inference.postprocess(outputs, ANCHORS, (16, 4, 1, 1), CLASS_TOKEN_MAP, image_size)


def numpy_postprocess(outputs, anchors, level_sizes, token_map, image_size, threshold, top_n,
                      nms_threshold, detections, agg):
  """ATSSPostProcessor.forward + select_over_all_levels for one image, in float32 numpy."""
  probs = sigmoid(outputs["token_logits"]).astype(np.float32)
  members = token_map > 0
  if agg == "MEAN":  # a class without tokens: NaN, never a candidate, as torch's empty mean
    with np.errstate(invalid="ignore"):
      scores = np.stack([probs[:, m].mean(-1) if m.any() else np.full(len(probs), np.nan)
                         for m in members], -1)
  else:
    scores = np.stack([probs[:, m].max(-1) if m.any() else np.zeros(len(probs))
                       for m in members], -1)
  ctr = sigmoid(outputs["centerness"]).astype(np.float32)
  all_boxes, all_scores, all_labels, start = [], [], [], 0
  for size in level_sizes:
    level = slice(start, start + size)
    cand = scores[level] > threshold
    ranked = (scores[level] * ctr[level, None])[cand]
    locs, classes = np.nonzero(cand)
    top = np.argsort(-ranked, kind="stable")[:min(int(cand.sum()), top_n)]
    loc = locs[top] + start
    d = outputs["box_regression"][loc].astype(np.float64)
    a = anchors[loc].astype(np.float64)
    aw, ah = a[:, 2] - a[:, 0] + 1, a[:, 3] - a[:, 1] + 1
    cx = d[:, 0] / 10 * aw + (a[:, 0] + a[:, 2]) / 2
    cy = d[:, 1] / 10 * ah + (a[:, 1] + a[:, 3]) / 2
    w = np.exp(np.minimum(d[:, 2] / 5, math.log(1000 / 16))) * aw
    h = np.exp(np.minimum(d[:, 3] / 5, math.log(1000 / 16))) * ah
    b = np.stack([cx - (w - 1) / 2, cy - (h - 1) / 2, cx + (w - 1) / 2, cy + (h - 1) / 2], 1)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, image_size[1] - 1)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, image_size[0] - 1)
    all_boxes.append(b)
    all_scores.append(np.sqrt(ranked[top]))
    all_labels.append(classes[top] + 1)
    start += size
  b, s, l = map(np.concatenate, (all_boxes, all_scores, all_labels))
  assert max(len(x) for x in all_scores) == top_n  # the per-level cut bites
  keep = numpy_greedy_nms(b, s, l, np.ones(len(s), bool), nms_threshold)
  b, s, l = b[keep], s[keep], l[keep]
  if len(s) > detections:  # kthvalue threshold: may keep a few more on ties
    keep = s >= np.sort(s)[len(s) - detections]
    b, s, l = b[keep], s[keep], l[keep]
  order = np.argsort(-s, kind="stable")
  return b[order], s[order], l[order]


@pytest.mark.parametrize("agg", ["MEAN", "MAX"])
def test_postprocess_matches_numpy_reference_of_the_original(agg):
  rng = np.random.default_rng(7)
  shapes = ((8, 8), (4, 4), (2, 2), (1, 1), (1, 1))
  anchors = boxes.anchors(shapes, sizes=(16, 32, 64, 128, 256))  # varied boxes on 64 px
  sizes = boxes.level_sizes(shapes)
  n, t = anchors.shape[0], 10
  token_map = np.zeros((4, t), np.float32)
  token_map[0, 1:3], token_map[1, 3], token_map[2, 5:8] = 1, 1, 1  # class 4: no token
  outputs = dict(token_logits=rng.normal(-2.5, 1.5, (2, n, t)).astype(np.float32),
                 box_regression=rng.normal(0, 0.4, (2, n, 4)).astype(np.float32),
                 centerness=rng.normal(0, 1, (2, n)).astype(np.float32))
  image_size = np.array([[60, 64], [64, 50]], np.int32)
  settings = dict(score_threshold=0.05, pre_nms_top_n=20, nms_threshold=0.6,
                  detections_per_image=15)
  got = post_jit(outputs, anchors, sizes, token_map, image_size, score_agg=agg, **settings)
  for i in range(2):
    ref_boxes, ref_scores, ref_labels = numpy_postprocess(
        {k: v[i] for k, v in outputs.items()}, anchors, sizes, token_map, image_size[i],
        *settings.values(), agg)
    assert len(ref_scores) == 15  # the final cut bites
    valid = np.asarray(got["valid"][i])
    assert valid.all()
    np.testing.assert_allclose(got["scores"][i], ref_scores, rtol=1e-5)
    np.testing.assert_array_equal(got["labels"][i], ref_labels)
    np.testing.assert_allclose(got["boxes"][i], ref_boxes, rtol=1e-5, atol=1e-3)
    assert set(np.asarray(got["labels"][i]).tolist()) <= {1, 2, 3}
