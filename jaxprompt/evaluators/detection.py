"""Box detection AP: COCO's (pycocotools COCOeval 'bbox') or LVIS' (the `lvis` package's LVISEval).

After microsoft/GLIP `maskrcnn_benchmark/engine/inference.py` (`inference`,
`create_queries_and_maps_from_dataset`, `chunks`) and
`maskrcnn_benchmark/data/datasets/evaluation/coco/coco_eval.py` (`prepare_for_coco_detection`,
`evaluate_predictions_on_coco`) and `.../evaluation/lvis/lvis_eval.py` (`LvisEvaluatorFixedAP`);
GLIP paper (Li et al., CVPR 2022) §4.1-4.2.

The method exports the predict function

  'detect': (variables, batch, class_token_map (C, T)) -> {'boxes': (B, K, 4) xyxy in the
      resized image's frame, 'scores': (B, K), 'labels': (B, K) int in 1..C, 'valid': (B, K) bool}

and the data source (`input_pipeline.detection.DetectionSource`) the prompt (`grounding`: the
batch's 'text_ids'/'text_mask' and its (C, T) `class_token_map`), the contiguous label -> dataset
category id map (`category_ids`), the prompt chunks (`grounding_chunks(n)`) and the split's
ground truth (`coco_ground_truth(split)`: a COCO-format json dict). The batches carry 'image_id',
'orig_size' (h, w) and 'image_size' (h, w after resizing, before padding).

Per image, as the original: the valid detections' boxes are scaled back to the original image by
orig/resized per axis (x by the widths, y by the heights; BoxList.resize), turned into [x, y, w, h]
with w = x2 - x1 + 1, h = y2 - y1 + 1 (BoxList's +1 convention), labels mapped to category ids,
and all of them go to COCOeval('bbox') on every image of the ground truth (standard parameters,
maxDets (1, 10, `max_detections`)). Metrics: AP (@[.5:.95]), AP50, AP75, APs, APm, APl, read from
COCOeval's precision table as its `summarize` does (-1 where a range has no ground truth).

`chunk_size` n > 0 is GLIP's `TEST.CHUNKED_EVALUATION` (LVIS: 40): the categories in label order
are cut into consecutive chunks of n, each with its own prompt (`grounding_chunks(n)`: global
labels, a (C, T) map that is zero outside the chunk); every batch is run once per chunk with that
chunk's 'text_ids'/'text_mask' in place of the batch's and its class_token_map, only detections
labelled with the chunk's own labels are kept (the original scores only the labels of the chunk's
map), and the detections of all chunks are concatenated (no NMS across chunks).

`api='lvis'` is GLIP's LVIS evaluation (its README: "We follow MDETR to evaluate with the FixedAP
criterion"): with `fixed_ap=True` (the default there, `DATASETS.LVIS_USE_NORMAL_AP` False) each
category keeps its `fixed_ap_topk` (10000) best detections over the whole split and there is no
per-image limit (`LVISResults(max_dets=-1)`, `params.max_dets = -1`); with `fixed_ap=False`, the
standard LVIS protocol, the best `max_detections` (300) per image. Metrics add APr, APc, APf.
Boxes in this path are [x, y, x2 - x1, y2 - y1] (the original's `lvis_eval.convert_to_xywh` has no
+1, unlike its COCO path; kept so the numbers match). The `lvis` package is imported only here:
`import lvis` also imports its visualiser, which needs `cv2` (opencv-python-headless) and
matplotlib, and its last release (0.5.3) uses `np.float`, gone since NumPy 1.24, so the evaluator
defines `np.float = float` for the duration of the LVIS computation when NumPy lacks it.

Image shapes: batches may differ in image shape. With GLIP's padding
(`pad_image(H, W, size_divisible=32)` in the eval pp spec; microsoft/GLIP
`structures/image_list.py` `to_image_list`) the input pipeline cuts every image to the multiple of
32 of its own size and batches only images of one padded size (`input_pipeline/pipeline.py`), so
each image is run exactly as GLIP runs it alone (its zero-shot TEST.IMS_PER_BATCH 1). The jitted
step compiles once per distinct shape (logged per pass) and keeps them for later passes;
'image_size' (the resized size before padding) bounds the boxes as before. Bucketing needs a
single process; with several, the evaluator refuses such a `config.pp.eval` when it is built,
before training.

Processes: the detections come back replicated from the jitted step (every process sees every
image), process 0 runs COCOeval/LVISEval and the metrics are broadcast, so every process returns
the same numbers. pycocotools' printing is captured (logged at debug level).

  config.evals.coco = dict(type='detection', split='val')
  config.evals.lvis = dict(type='detection', split='minival', api='lvis', chunk_size=40)
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.evaluators import common

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = (*COCO_METRICS, "APr", "APc", "APf")
DEFAULT_MAX_DETECTIONS = {"coco": 100, "lvis": 300}
BATCH_KEYS = ("image_id", "image_size", "orig_size", "text_ids", "text_mask")
LVIS_INSTALL = "pip install lvis opencv-python-headless matplotlib"

_log = logging.getLogger(__name__)


def import_lvis():
  """The `lvis` package, or an ImportError saying what to install."""
  try:
    import lvis  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"The 'detection' evaluator with api='lvis' needs the `lvis` package (LVISEval), which "
        f"imports cv2 (opencv-python-headless) and matplotlib for its visualiser; importing it "
        f"failed: {e}. Install them with `{LVIS_INSTALL}`.") from e
  return lvis


@contextlib.contextmanager
def _numpy_float_alias():
  """`np.float` = float while inside (lvis 0.5.3's accumulate uses it; NumPy >= 1.24 lacks it)."""
  added = "float" not in np.__dict__
  if added:
    np.float = float  # pylint: disable=attribute-defined-outside-init
  try:
    yield
  finally:
    if added:
      del np.float


@contextlib.contextmanager
def _quiet():
  """Captures what pycocotools / lvis print; logs it at debug level."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    yield
  if buffer.getvalue():
    _log.debug("%s", buffer.getvalue())


def to_original_xywh(boxes: np.ndarray, image_size: np.ndarray, orig_size: np.ndarray, *,
                     plus_one: bool = True) -> np.ndarray:
  """(n, 4) xyxy boxes in the resized frame of size `image_size` (h, w) -> [x, y, w, h] in the
  original frame of size `orig_size` (h, w): x scaled by the widths' ratio, y by the heights'
  (BoxList.resize), then w = x2 - x1 (+ 1 with `plus_one`, BoxList's convention)."""
  (h, w), (orig_h, orig_w) = np.asarray(image_size, np.float64), np.asarray(orig_size, np.float64)
  if min(h, w, orig_h, orig_w) <= 0:
    raise ValueError(f"Image sizes must be positive; got resized (h, w) = {tuple(image_size)}, "
                     f"original (h, w) = {tuple(orig_size)}.")
  scaled = np.asarray(boxes, np.float64) * np.array([orig_w / w, orig_h / h] * 2)
  extra = 1.0 if plus_one else 0.0
  return np.stack([scaled[:, 0], scaled[:, 1], scaled[:, 2] - scaled[:, 0] + extra,
                   scaled[:, 3] - scaled[:, 1] + extra], axis=1)


def label_to_category(category_ids) -> dict[int, int]:
  """{contiguous label (1..C): dataset category id} from a source's `category_ids` (a mapping,
  or a sequence whose entry l - 1 is label l's category)."""
  if isinstance(category_ids, Mapping):
    return {int(k): int(v) for k, v in category_ids.items()}
  return {label: int(c) for label, c in enumerate(category_ids, 1)}


def coco_results(detections: Mapping[str, np.ndarray], category_of: Mapping[int, int], *,
                 plus_one: bool = True) -> list[dict]:
  """The COCO results list ({'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}) of
  `detections` (per detection: 'image_id' (n,), 'boxes' (n, 4) xyxy resized frame, 'scores',
  'labels', 'image_size' (n, 2), 'orig_size' (n, 2))."""
  labels = detections["labels"]
  unknown = sorted(set(np.unique(labels).tolist()) - set(category_of))
  if unknown:
    raise ValueError(f"The method's 'detect' returned label(s) {unknown[:10]} outside 1.."
                     f"{len(category_of)} (the data source's contiguous labels).")
  results = []
  sizes = np.concatenate([detections["image_size"], detections["orig_size"]], axis=1)
  # Group the rows by image so that each image's boxes are rescaled with its own sizes.
  keys = np.concatenate([detections["image_id"][:, None], sizes], axis=1)
  if not len(keys):
    return results
  groups, inverse = np.unique(keys, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  for g, (image_id, h, w, orig_h, orig_w) in enumerate(groups.tolist()):
    rows = np.nonzero(inverse == g)[0]
    boxes = to_original_xywh(detections["boxes"][rows], (h, w), (orig_h, orig_w),
                             plus_one=plus_one)
    for box, score, label in zip(boxes.tolist(), detections["scores"][rows].tolist(),
                                 labels[rows].tolist()):
      results.append({"image_id": int(image_id), "category_id": category_of[int(label)],
                      "bbox": box, "score": float(score)})
  return results


def summarize_precision(precision: np.ndarray, iou_thresholds: np.ndarray, area_index: int, *,
                        iou: float | None = None, max_dets_index: int = -1,
                        categories: Sequence[int] | None = None) -> float:
  """COCOeval.summarize's AP from its precision table (T, R, K, A, M): the mean of the entries
  > -1 at `iou` (all thresholds when None), area range `area_index`, maxDets `max_dets_index`
  and the category indices `categories` (all when None); -1 when there are none."""
  s = precision[..., area_index, max_dets_index]  # (T, R, K)
  if iou is not None:
    s = s[np.nonzero(np.isclose(iou_thresholds, iou))[0]]
  if categories is not None:
    s = s[:, :, list(categories)]
  s = s[s > -1]
  return float(np.mean(s)) if s.size else -1.0


def coco_metrics(ground_truth: dict, results: list[dict], max_detections: int) -> dict:
  """COCOeval('bbox') of `results` against the COCO-format dict `ground_truth` on all its images,
  maxDets (1, 10, max_detections): {AP, AP50, AP75, APs, APm, APl}."""
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel
  with _quiet():
    gt = COCO()
    gt.dataset = ground_truth
    gt.createIndex()
    if results:
      dt = gt.loadRes(results)
    else:  # loadRes cannot take an empty list: no detections, every AP with ground truth is 0
      dt = COCO()
      dt.dataset = {"images": list(ground_truth["images"]),
                    "categories": list(ground_truth["categories"]), "annotations": []}
      dt.createIndex()
    evaluation = COCOeval(gt, dt, "bbox")
    evaluation.params.maxDets = [1, 10, int(max_detections)]
    evaluation.evaluate()
    evaluation.accumulate()
  precision, p = evaluation.eval["precision"], evaluation.params
  areas = {label: i for i, label in enumerate(p.areaRngLbl)}
  return {
      "AP": summarize_precision(precision, p.iouThrs, areas["all"]),
      "AP50": summarize_precision(precision, p.iouThrs, areas["all"], iou=0.5),
      "AP75": summarize_precision(precision, p.iouThrs, areas["all"], iou=0.75),
      "APs": summarize_precision(precision, p.iouThrs, areas["small"]),
      "APm": summarize_precision(precision, p.iouThrs, areas["medium"]),
      "APl": summarize_precision(precision, p.iouThrs, areas["large"]),
  }


def fixed_ap_selection(results: list[dict], topk: int) -> list[dict]:
  """The `topk` best-scoring results of each category (FixedAP; Dave et al. 2021)."""
  by_category: dict[int, list[dict]] = {}
  for result in results:
    by_category.setdefault(result["category_id"], []).append(result)
  kept = []
  for category_results in by_category.values():
    kept += sorted(category_results, key=lambda r: r["score"], reverse=True)[:topk]
  return kept


def lvis_metrics(ground_truth: dict, results: list[dict], *, max_detections: int,
                 fixed_ap: bool, fixed_ap_topk: int, lvis_api=None) -> dict:
  """LVISEval('bbox') of `results`: {AP, AP50, AP75, APs, APm, APl, APr, APc, APf}; FixedAP (top
  `fixed_ap_topk` per category, no per-image limit) or the standard `max_detections` per image."""
  lvis_api = lvis_api or import_lvis()
  if not results:
    return {k: 0.0 for k in LVIS_METRICS}
  with tempfile.TemporaryDirectory() as folder, _quiet(), _numpy_float_alias():
    path = os.path.join(folder, "ground_truth.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(ground_truth, f)
    gt = lvis_api.LVIS(path)
    if fixed_ap:
      dt = lvis_api.LVISResults(gt, fixed_ap_selection(results, fixed_ap_topk), max_dets=-1)
    else:
      dt = lvis_api.LVISResults(gt, results, max_dets=max_detections)
    evaluation = lvis_api.LVISEval(gt, dt, iou_type="bbox")
    evaluation.params.max_dets = -1 if fixed_ap else max_detections
    evaluation.run()
  return {k: float(evaluation.results[k]) for k in LVIS_METRICS}


def check_lvis_ground_truth(ground_truth: dict, where: str) -> None:
  """LVISEval's fields: images' neg_category_ids / not_exhaustive_category_ids, categories'
  frequency."""
  for key, field in (("images", "neg_category_ids"), ("images", "not_exhaustive_category_ids"),
                     ("categories", "frequency")):
    missing = [entry.get("id") for entry in ground_truth.get(key, ()) if field not in entry]
    if missing:
      raise ValueError(f"{where}: api='lvis' needs '{field}' in every entry of the ground "
                       f"truth's '{key}' (LVIS v1 json); {len(missing)} lack it (ids "
                       f"{missing[:5]}). Use api='coco' for COCO-format data.")


@common.register("detection")
class DetectionEvaluator(common.Evaluator):
  """COCO / LVIS box AP of the method's 'detect' on `split` (see the module docstring)."""
  NEEDS = ("detect",)

  def __init__(self, ctx: common.EvalContext, *, split: str, api: str = "coco",
               chunk_size: int = 0, max_detections: int | None = None, fixed_ap: bool = True,
               fixed_ap_topk: int = 10000):
    super().__init__(ctx, split=split)
    if api not in DEFAULT_MAX_DETECTIONS:
      raise ValueError(f"api={api!r}: expected 'coco' (pycocotools COCOeval) or 'lvis' "
                       "(LVISEval with APr/APc/APf).")
    for key, value, low in (("chunk_size", chunk_size, 0), ("max_detections", max_detections, 1),
                            ("fixed_ap_topk", fixed_ap_topk, 1)):
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < low):
        raise ValueError(f"{key}={value!r}: expected an integer >= {low}.")
    if not isinstance(fixed_ap, bool):
      raise ValueError(f"fixed_ap={fixed_ap!r}: expected True or False.")
    source = ctx.source
    needed = ["coco_ground_truth", "category_ids", "grounding_chunks" if chunk_size else
              "grounding"]
    missing = [name for name in needed if not hasattr(source, name)]
    if missing:
      raise ValueError(f"The 'detection' evaluator needs a detection data source (with "
                       f"{missing}); {getattr(source, 'name', source)!r} is "
                       f"{type(source).__name__}.")
    self.api, self.chunk_size, self.fixed_ap, self.fixed_ap_topk = (
        api, chunk_size, fixed_ap, fixed_ap_topk)
    self.max_detections = max_detections or DEFAULT_MAX_DETECTIONS[api]
    self._lvis = import_lvis() if api == "lvis" else None
    self.category_of = label_to_category(source.category_ids)
    self.ground_truth = source.coco_ground_truth(split)
    where = f"split {split!r} of data source {getattr(source, 'name', '?')!r}"
    if api == "lvis":
      check_lvis_ground_truth(self.ground_truth, where)
    unknown = sorted(set(self.category_of.values())
                     - {c["id"] for c in self.ground_truth.get("categories", ())})
    if unknown:
      raise ValueError(f"{where}: category ids {unknown[:10]} of the source's labels are not "
                       "categories of its ground truth.")
    self._prompts = self._make_prompts(source)
    if jax.process_count() > 1:
      self._check_eval_stream()
    detect = ctx.predict_fns["detect"]

    def step(variables, batch, class_token_map, text_ids, text_mask):
      if text_ids is not None:  # a chunk's prompt replaces the batch's
        rows = batch["text_ids"].shape[0]
        batch = {**batch,
                 "text_ids": jnp.broadcast_to(text_ids, (rows, *text_ids.shape)).astype(
                     batch["text_ids"].dtype),
                 "text_mask": jnp.broadcast_to(text_mask, (rows, *text_mask.shape)).astype(
                     batch["text_mask"].dtype)}
      out = detect(variables, batch, class_token_map)
      real = batch["_mask"].astype(bool)
      return {"boxes": out["boxes"].astype(jnp.float32),
              "scores": out["scores"].astype(jnp.float32),
              "labels": out["labels"].astype(jnp.int32),
              "valid": out["valid"].astype(bool) & real[:, None], "_mask": real,
              # Passed through so that every process can read them (replicated outputs).
              **{k: batch[k].astype(jnp.int32) for k in ("image_id", "image_size", "orig_size")}}

    self._step = self.jit(step, key="step")

  def _check_eval_stream(self) -> None:
    """With several processes, refuses before training an eval pp spec (`config.pp.eval`) whose
    batches are bucketed by image size (`pipeline.check_eval_buckets`), which the eval stream
    would otherwise refuse at the first evaluation."""
    spec = (self.ctx.config.get("pp") or {}).get("eval")
    if not isinstance(spec, str):
      return
    # Imported here: the input pipeline pulls in TensorFlow, which the evaluators do not need.
    from input_pipeline import pipeline, preprocess  # pylint: disable=import-outside-toplevel
    pipeline.check_eval_buckets(self.ctx.source, self.split, preprocess.make_preprocess_fn(spec),
                                process_count=jax.process_count())

  def _make_prompts(self, source) -> list[tuple[object, np.ndarray, object, object]]:
    """[(the prompt's labels (None: all), class_token_map (C, T), text_ids (T,) or None,
    text_mask or None)]: the batch's own prompt, or one entry per chunk
    (`source.grounding_chunks(n)` -> [(labels, Grounding)], maps with all C rows, zero outside
    the chunk; labels global)."""
    num_labels = len(self.category_of)
    if not self.chunk_size:
      maps = [(None, np.asarray(source.grounding.class_token_map), None, None)]
    else:
      maps = [(np.asarray(labels), np.asarray(chunk.class_token_map), np.asarray(chunk.text_ids),
               np.asarray(chunk.text_mask))
              for labels, chunk in source.grounding_chunks(self.chunk_size)]
      covered = sorted(int(l) for labels, *_ in maps for l in labels)
      if covered != list(range(1, num_labels + 1)):
        raise ValueError(f"The source's prompt chunks cover labels {covered[:10]}...; expected "
                         f"each of 1..{num_labels} once.")
    for _, class_token_map, _, _ in maps:
      if class_token_map.shape[0] != num_labels:
        raise ValueError(f"The source's class_token_map has {class_token_map.shape[0]} rows; "
                         f"it has {num_labels} labels.")
    return maps

  def metric_names(self) -> tuple[str, ...]:
    return (*(LVIS_METRICS if self.api == "lvis" else COCO_METRICS), "examples")

  def detections(self, variables) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(every valid detection of the split over all chunks: 'image_id', 'boxes' (n, 4) xyxy
    resized frame, 'scores', 'labels' (global), 'image_size', 'orig_size'; the split's image ids
    in batch order)."""
    parts, image_ids, first, shapes = [], [], True, set()
    for batch in self.ctx.batches(self.split):
      if first:
        common.check_batch(self, batch, *BATCH_KEYS, "_mask")
        first = False
      shapes.add(tuple(batch["image"].shape[1:]))
      for index, (labels, class_token_map, text_ids, text_mask) in enumerate(self._prompts):
        out = jax.device_get(self._step(variables, batch, class_token_map, text_ids, text_mask))
        meta = {k: np.asarray(out[k]) for k in ("image_id", "image_size", "orig_size")}
        if index == 0:
          image_ids.append(meta["image_id"][np.asarray(out["_mask"])])
        valid = np.asarray(out["valid"])
        if labels is not None:  # a chunk scores its own labels only (the original's map)
          valid = valid & np.isin(np.asarray(out["labels"]), labels)
        rows, cols = np.nonzero(valid)
        parts.append({"image_id": meta["image_id"][rows],
                      "image_size": meta["image_size"][rows], "orig_size": meta["orig_size"][rows],
                      "boxes": np.asarray(out["boxes"])[rows, cols],
                      "scores": np.asarray(out["scores"])[rows, cols],
                      "labels": np.asarray(out["labels"])[rows, cols]})
    if first:
      raise ValueError(f"Split {self.split!r} of evaluator {self.name!r} gave no batches.")
    _log.info("evaluator %r: split %r in %d image shape(s) %s", self.name, self.split,
              len(shapes), sorted(shapes)[:8])
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return merged, np.concatenate(image_ids)

  def results(self, variables) -> tuple[list[dict], int]:
    """(the COCO/LVIS results list of the split, the number of images)."""
    detections, image_ids = self.detections(variables)
    served, expected = set(image_ids.tolist()), {i["id"] for i in self.ground_truth["images"]}
    if len(served) != len(image_ids) or served != expected:
      raise ValueError(
          f"Evaluator {self.name!r}: split {self.split!r} served {len(image_ids)} images "
          f"({len(served)} distinct ids); its ground truth has {len(expected)}; not in the "
          f"ground truth: {sorted(served - expected)[:5]}, never served: "
          f"{sorted(expected - served)[:5]}.")
    results = coco_results(detections, self.category_of, plus_one=self.api == "coco")
    return results, len(image_ids)

  def run(self, variables) -> dict[str, float]:
    results, examples = self.results(variables)
    names = LVIS_METRICS if self.api == "lvis" else COCO_METRICS
    values = np.zeros(len(names), np.float64)
    if jax.process_index() == 0:
      if self.api == "lvis":
        metrics = lvis_metrics(self.ground_truth, results, max_detections=self.max_detections,
                               fixed_ap=self.fixed_ap, fixed_ap_topk=self.fixed_ap_topk,
                               lvis_api=self._lvis)
      else:
        metrics = coco_metrics(self.ground_truth, results, self.max_detections)
      values = np.array([metrics[k] for k in names], np.float64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return {**{k: float(v) for k, v in zip(names, values)}, "examples": int(examples)}
