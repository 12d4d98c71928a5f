"""The 'detection' evaluator (`jaxprompt/evaluators/detection.py`) with a fake 'detect' that
returns boxes carried in the batch: ground-truth boxes give AP 1; perturbed ones give the AP that
pycocotools (or the lvis package) computes directly on the same results; the chunked path; the
rescaling to the original image; padding rows; and the errors."""
import copy
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxprompt.evaluators import common, detection
from test_evaluators import make_ctx

T = 8  # text length
CATEGORY_IDS = (7, 3, 12)  # label l -> CATEGORY_IDS[l - 1]
FREQUENCY = {7: "f", 3: "c", 12: "r"}


class Prompt:
  def __init__(self, marker, labels):
    self.text_ids = np.array([1, marker] + [0] * (T - 2), np.int32)
    self.text_mask = (self.text_ids > 0).astype(np.int32)
    self.class_token_map = np.zeros((3, T), np.float32)
    for label in labels:
      self.class_token_map[label - 1, 1 + label] = 1.0


class FakeSource:
  """A detection source's evaluation surface: categories, prompts and the ground truth."""
  name = "fake_det"
  splits = ("train", "val")
  category_ids = CATEGORY_IDS

  def __init__(self, truth):
    self.truth = truth
    self.grounding = Prompt(99, (1, 2, 3))

  def check_split(self, split):
    if split not in self.splits:
      raise ValueError(f"Unknown split {split!r}")

  def coco_ground_truth(self, split):
    return copy.deepcopy(self.truth)

  def grounding_chunks(self, chunk_size):
    labels = np.arange(1, 4)
    return [(labels[i:i + chunk_size], Prompt(100 + i // chunk_size, labels[i:i + chunk_size]))
            for i in range(0, 3, chunk_size)]


def fake_detect(variables, batch, class_token_map):
  """The batch's 'pred_*' detections whose label is in the prompt (a non-zero map row) and whose
  chunk marker (variables['marker'][label - 1]) is the prompt's second token."""
  labels = batch["pred_labels"]
  in_prompt = class_token_map.sum(-1)[labels - 1] > 0
  marker = jnp.asarray(variables["marker"])[labels - 1] == batch["text_ids"][:, 1:2]
  return {"boxes": batch["pred_boxes"], "scores": batch["pred_scores"], "labels": labels,
          "valid": batch["pred_valid"] & in_prompt & marker}


# Six images; orig (h, w) and resized (h, w) differ per axis by powers of two (exact in float32).
ORIG = np.array([[128, 256], [256, 512], [64, 64], [512, 256], [128, 128], [256, 256]], np.int32)
RESIZED = np.array([[64, 64], [64, 256], [64, 32], [128, 128], [128, 32], [64, 128]], np.int32)
IMAGE_IDS = np.array([11, 4, 25, 9, 30, 2], np.int32)


def make_truth(rng, *, lvis=False):
  images, annotations = [], []
  for image_id, (h, w) in zip(IMAGE_IDS.tolist(), ORIG.tolist()):
    image = {"id": image_id, "height": h, "width": w}
    if lvis:
      image.update(neg_category_ids=[12], not_exhaustive_category_ids=[])
    images.append(image)
    for _ in range(rng.integers(1, 4)):
      side = int(rng.choice([12, 50, 120]))  # small, medium, large
      bw, bh = min(side, w - 2), min(side + int(rng.integers(0, 8)), h - 2)
      x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
      category = int(rng.choice(CATEGORY_IDS[:2] if lvis else CATEGORY_IDS))
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": category, "bbox": [x, y, bw, bh], "area": bw * bh,
                          "iscrowd": 0})
  if not lvis:  # a crowd region: ignored by COCOeval, never predicted
    annotations.append({"id": len(annotations) + 1, "image_id": 4, "category_id": 3,
                        "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1})
  categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
  if lvis:
    for c in categories:
      c["frequency"] = FREQUENCY[c["id"]]
  return {"images": images, "annotations": annotations, "categories": categories}


LABEL_OF = {c: l for l, c in enumerate(CATEGORY_IDS, 1)}


def predictions(truth, rng, *, perturb, plus_one=True, k=6):
  """Per image up to k detections, xyxy in the ORIGINAL frame: the ground truth (crowd excluded),
  or jittered / relabelled / rescored copies plus false positives."""
  boxes = np.zeros((len(IMAGE_IDS), k, 4), np.float32)
  scores = np.zeros((len(IMAGE_IDS), k), np.float32)
  labels = np.ones((len(IMAGE_IDS), k), np.int32)
  valid = np.zeros((len(IMAGE_IDS), k), bool)
  extra = 1.0 if plus_one else 0.0
  for row, image_id in enumerate(IMAGE_IDS.tolist()):
    own = [a for a in truth["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
    for j, a in enumerate(own):
      x, y, w, h = a["bbox"]
      boxes[row, j] = [x, y, x + w - extra, y + h - extra]
      labels[row, j] = LABEL_OF[a["category_id"]]
      scores[row, j] = 0.9 - 0.1 * j
      valid[row, j] = True
    if perturb:
      n = len(own)
      boxes[row, :n] += rng.integers(-6, 7, size=(n, 4))
      scores[row, :n] = rng.random(n)
      flip = rng.random(n) < 0.2
      labels[row, :n][flip] = rng.integers(1, 4, size=int(flip.sum()))
      boxes[row, n:n + 2] = [[2, 2, 30, 30], [10, 5, 60, 40]]  # false positives
      labels[row, n:n + 2] = rng.integers(1, 4, size=2)
      scores[row, n:n + 2] = rng.random(2)
      valid[row, n:n + 2] = True
  return boxes, scores, labels, valid


def batch_arrays(truth, rng, *, perturb, plus_one=True):
  boxes, scores, labels, valid = predictions(truth, rng, perturb=perturb, plus_one=plus_one)
  ratio = np.concatenate([ORIG[:, ::-1] / RESIZED[:, ::-1]] * 2, axis=1)[:, None, :]  # (x, y)*2
  arrays = {"image": np.zeros((len(IMAGE_IDS), 2, 2, 3), np.float32), "image_id": IMAGE_IDS,
            "orig_size": ORIG, "image_size": RESIZED,
            "text_ids": np.tile(Prompt(99, ()).text_ids, (len(IMAGE_IDS), 1)),
            "text_mask": np.tile(Prompt(99, ()).text_mask, (len(IMAGE_IDS), 1)),
            "pred_boxes": (boxes / ratio).astype(np.float32), "pred_scores": scores,
            "pred_labels": labels, "pred_valid": valid}
  expected = [{"image_id": int(i), "category_id": CATEGORY_IDS[l - 1],
               "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0] + (1 if plus_one else 0)),
                        float(b[3] - b[1] + (1 if plus_one else 0))], "score": float(s)}
              for i, bs, ss, ls, vs in zip(IMAGE_IDS, boxes, scores, labels, valid)
              for b, s, l, v in zip(bs, ss, ls, vs) if v]
  return arrays, expected


def direct_coco(truth, results):
  gt = COCO()
  gt.dataset = copy.deepcopy(truth)
  gt.createIndex()
  evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
  evaluation.evaluate()
  evaluation.accumulate()
  evaluation.summarize()
  return dict(zip(detection.COCO_METRICS, evaluation.stats[:6].tolist()))


MARKERS = {"one": {"marker": jnp.full((3,), 99)},
           "chunks_of_2": {"marker": jnp.array([100, 100, 101])},
           "chunks_of_1": {"marker": jnp.array([100, 101, 102])}}


def build(arrays, truth, **settings):
  ctx = make_ctx(arrays, {"detect": fake_detect}, source=FakeSource(truth), batch_size=4,
                 padding=3)
  return common.build("det", {"type": "detection", "split": "val", **settings}, ctx)


def test_ground_truth_boxes_give_ap_one_and_padding_does_not_count():
  truth = make_truth(np.random.default_rng(0))
  arrays, _ = batch_arrays(truth, np.random.default_rng(1), perturb=False)
  evaluator = build(arrays, truth)
  assert evaluator.metric_names() == (*detection.COCO_METRICS, "examples")
  got = evaluator.run(MARKERS["one"])
  assert got == {**{k: 1.0 for k in detection.COCO_METRICS}, "examples": 6}


@pytest.mark.parametrize("chunk_size, marker", [(0, "one"), (2, "chunks_of_2"),
                                                (1, "chunks_of_1")])
def test_perturbed_boxes_match_pycocotools_directly(chunk_size, marker):
  truth = make_truth(np.random.default_rng(2))
  arrays, expected = batch_arrays(truth, np.random.default_rng(3), perturb=True)
  got = build(arrays, truth, chunk_size=chunk_size).run(MARKERS[marker])
  direct = direct_coco(truth, expected)
  assert 0.1 < got["AP"] < 0.99 and got["examples"] == 6
  for key in detection.COCO_METRICS:
    assert got[key] == pytest.approx(direct[key], abs=1e-12), key


def test_chunks_replace_the_batch_prompt():
  """With the chunk markers but no chunking, no detection matches its prompt: AP 0."""
  truth = make_truth(np.random.default_rng(0))
  arrays, _ = batch_arrays(truth, np.random.default_rng(1), perturb=False)
  assert build(arrays, truth, chunk_size=0).run(MARKERS["chunks_of_2"])["AP"] == 0.0
  assert build(arrays, truth, chunk_size=2).run(MARKERS["chunks_of_2"])["AP"] == 1.0


def test_rescaling_to_the_original_image():
  boxes = np.array([[10, 20, 30, 40]], np.float32)  # resized frame (h 50, w 100)
  np.testing.assert_array_equal(
      detection.to_original_xywh(boxes, (50, 100), (100, 400)), [[40, 40, 81, 41]])
  np.testing.assert_array_equal(
      detection.to_original_xywh(boxes, (50, 100), (100, 400), plus_one=False), [[40, 40, 80, 40]])
  results = detection.coco_results(
      {"image_id": np.array([5, 6]), "boxes": np.array([[10, 20, 30, 40]] * 2, np.float32),
       "scores": np.array([0.5, 0.25]), "labels": np.array([3, 1]),
       "image_size": np.array([[50, 100], [10, 10]]),
       "orig_size": np.array([[100, 400], [10, 10]])}, detection.label_to_category(CATEGORY_IDS))
  assert results == [{"image_id": 5, "category_id": 12, "bbox": [40.0, 40.0, 81.0, 41.0],
                      "score": 0.5},
                     {"image_id": 6, "category_id": 7, "bbox": [10.0, 20.0, 21.0, 21.0],
                      "score": 0.25}]


def test_no_detections_give_zero_ap():
  truth = make_truth(np.random.default_rng(0))
  arrays, _ = batch_arrays(truth, np.random.default_rng(1), perturb=False)
  arrays["pred_valid"] = np.zeros_like(arrays["pred_valid"])
  got = build(arrays, truth).run(MARKERS["one"])
  assert got["AP"] == 0.0 and got["AP50"] == 0.0 and got["examples"] == 6


def test_errors_at_construction_and_on_mismatched_images():
  truth = make_truth(np.random.default_rng(0))
  arrays, _ = batch_arrays(truth, np.random.default_rng(1), perturb=False)
  with pytest.raises(ValueError, match=r"api='cocoo': expected 'coco'"):
    build(arrays, truth, api="cocoo")
  with pytest.raises(ValueError, match=r"chunk_size=-1: expected an integer >= 0"):
    build(arrays, truth, chunk_size=-1)
  ctx = make_ctx(arrays, {"detect": fake_detect})  # a classification source
  with pytest.raises(ValueError, match=r"needs a detection data source \(with \['coco_ground_"):
    common.build("det", {"type": "detection", "split": "test"}, ctx)
  fewer = {k: v[:5] for k, v in arrays.items()}
  with pytest.raises(ValueError, match=r"served 5 images .* never served: \[2\]"):
    build(fewer, truth).run(MARKERS["one"])
  arrays["pred_labels"] = arrays["pred_labels"] * 0 + 4
  wide = lambda v, batch, m: {**fake_detect(v, batch, jnp.ones((4, T))),  # noqa: E731
                              "valid": batch["pred_valid"]}
  ctx = make_ctx(arrays, {"detect": wide}, source=FakeSource(truth))
  with pytest.raises(ValueError, match=r"label\(s\) \[4\] outside 1..3"):
    common.build("det", {"type": "detection", "split": "val"}, ctx).run(MARKERS["one"])


def test_lvis_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "lvis", None)
  truth = make_truth(np.random.default_rng(0), lvis=True)
  arrays, _ = batch_arrays(truth, np.random.default_rng(1), perturb=False)
  with pytest.raises(ImportError, match=r"pip install lvis opencv-python-headless matplotlib"):
    build(arrays, truth, api="lvis")


@pytest.fixture
def lvis_api(monkeypatch):
  """The lvis package with stand-ins for its visualiser's cv2 / matplotlib imports."""
  if "lvis" not in sys.modules:
    matplotlib = types.ModuleType("matplotlib")
    patches = types.ModuleType("matplotlib.patches")
    patches.Polygon = object
    for name, module in (("cv2", types.ModuleType("cv2")), ("matplotlib", matplotlib),
                         ("matplotlib.pyplot", types.ModuleType("matplotlib.pyplot")),
                         ("matplotlib.patches", patches)):
      if name not in sys.modules:
        monkeypatch.setitem(sys.modules, name, module)
  return pytest.importorskip("lvis")


def direct_lvis(lvis_api, truth, results, tmp_path, *, max_dets):
  path = tmp_path / "gt.json"
  path.write_text(__import__("json").dumps(truth))
  added = "float" not in np.__dict__
  if added:
    np.float = float
  try:
    gt = lvis_api.LVIS(str(path))
    evaluation = lvis_api.LVISEval(gt, lvis_api.LVISResults(gt, copy.deepcopy(results),
                                                            max_dets=max_dets), iou_type="bbox")
    evaluation.params.max_dets = max_dets
    evaluation.run()
  finally:
    if added:
      del np.float
  return {k: float(evaluation.results[k]) for k in detection.LVIS_METRICS}


@pytest.mark.parametrize("fixed_ap", [True, False])
def test_lvis_api_matches_lvis_eval_directly(lvis_api, tmp_path, fixed_ap):
  truth = make_truth(np.random.default_rng(4), lvis=True)
  perfect, _ = batch_arrays(truth, np.random.default_rng(5), perturb=False, plus_one=False)
  got = build(perfect, truth, api="lvis", chunk_size=2, fixed_ap=fixed_ap).run(
      MARKERS["chunks_of_2"])
  assert got["AP"] == 1.0 and got["APf"] == 1.0 and got["APc"] == 1.0 and got["examples"] == 6
  arrays, expected = batch_arrays(truth, np.random.default_rng(6), perturb=True, plus_one=False)
  evaluator = build(arrays, truth, api="lvis", fixed_ap=fixed_ap, max_detections=3,
                    fixed_ap_topk=4)
  assert evaluator.metric_names() == (*detection.LVIS_METRICS, "examples")
  got = evaluator.run(MARKERS["one"])
  if fixed_ap:
    expected = detection.fixed_ap_selection(expected, 4)
  direct = direct_lvis(lvis_api, truth, expected, tmp_path, max_dets=-1 if fixed_ap else 3)
  assert 0.05 < got["AP"] < 0.99
  for key in detection.LVIS_METRICS:
    assert got[key] == pytest.approx(direct[key], abs=1e-12), key
  assert "float" not in np.__dict__  # the evaluator's np.float alias is gone again


def test_fixed_ap_keeps_the_best_per_category():
  results = [{"category_id": c, "score": s, "image_id": 1} for c, s in
             ((1, 0.1), (1, 0.9), (2, 0.3), (1, 0.5), (2, 0.2))]
  kept = detection.fixed_ap_selection(results, 2)
  assert sorted((r["category_id"], r["score"]) for r in kept) == [(1, 0.5), (1, 0.9), (2, 0.2),
                                                                  (2, 0.3)]
