"""GLIP fine-tuning: the GLIP detector trained on detection data with its own ATSS losses, fully or
with parts frozen; the baseline every GLIP prompt method (SDPT) is compared with.

Follows microsoft/GLIP (Li et al., CVPR 2022, arXiv 2112.03857, §3–4): `tools/train_net.py` with
the fine-tuning settings of the README ("COCO fine-tuning", "ODinW") on
`maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py`: the caption of the dataset's class
names goes through BERT, the image through Swin + FPN, both through the VL-DyHead tower
(`jaxprompt/models/glip/detector.py`), and the loss is `loss_dot_product_token + loss_reg +
loss_centerness` of `modeling/rpn/loss.py` (`jaxprompt/models/glip/atss.py`): token focal loss,
GIoU x 2 weighted by centerness, centerness BCE; GLIP's `loss_cls` is multiplied by 0 and left out.

What trains (`TRAINABLE_PARAMS`, overridable by `config.trainable_params`): every parameter but
the class head `cls_logits`, which GLIP freezes whenever the dot-product token loss is on
(`GeneralizedVLRCNN.__init__`). `TRAINABLE_SETS` also names GLIP's linear probe and BitFit, the
parameter-efficient baselines SDPT compares with. GLIP's `FREEZE_CONV_BODY_AT` / `BACKBONE.FREEZE` /
`LANGUAGE_BACKBONE.FREEZE` are regexes here (`freeze_regex`).

Batches carry (input_pipeline/detection.py) image, text_ids, text_mask (model inputs) and boxes,
box_mask, positive_map (the loss), per example: the dataset's caption, or for a class list that
overflows it (LVIS) each image's own caption of its classes and sampled negatives, as GLIP trains
LVIS (`od_to_grounding.py`, via `modulated_coco.py`); `config.glip` holds the anchor and
post-processing settings:

  anchor_sizes (64, 128, 256, 512, 1024)  MODEL.RPN.ANCHOR_SIZES (8 x stride)
  top_k 9                                  MODEL.ATSS.TOPK
  score_threshold 0.05, pre_nms_top_n 1000, nms_threshold 0.6, detections_per_image 100,
  score_agg 'MEAN'                         MODEL.ATSS.* / MODEL.DYHEAD.SCORE_AGG at test time

The 'detect' predict function (the 'detection' evaluator's) runs the model in eval mode and
`inference.postprocess` on a batch with a (C, T) class -> token map.
"""
from __future__ import annotations

import ml_collections

from jaxprompt import method
from jaxprompt.models.glip import atss, backbone, boxes, checkpoint, detector, inference

TRAINABLE_PARAMS = r"(?!head/heads/cls_logits/).*"
# GLIP's MODEL.LINEAR_PROB ('linear_prob' in tools/finetune.py): the head's output layers only
# (bbox_pred, centerness, the dot-product projection, log_scale, bias_lang, bias0, per-level
# scales are not in GLIP's list and stay frozen), cls_logits frozen as always.
LINEAR_PROBE = (r"head/heads/(?:bbox_pred|centerness|dot_product_projection_text)/.*"
                r"|head/heads/(?:log_scale|bias_lang|bias0)")
BITFIT = r"(?!head/heads/cls_logits/).*/bias"  # every bias (BitFit, an SDPT baseline)
TRAINABLE_SETS = {"full": TRAINABLE_PARAMS, "linear_probe": LINEAR_PROBE, "bitfit": BITFIT}
DEFAULTS = dict(anchor_sizes=boxes.ANCHOR_SIZES, top_k=atss.ATSS_TOP_K,
                score_threshold=inference.SCORE_THRESHOLD, pre_nms_top_n=inference.PRE_NMS_TOP_N,
                nms_threshold=inference.NMS_THRESHOLD,
                detections_per_image=inference.DETECTIONS_PER_IMAGE, score_agg="MEAN")


def settings(config) -> dict:
  """`config.glip` over `DEFAULTS`; an unknown key is an error naming the valid ones."""
  given = config.get("glip") or {}
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.glip: unknown setting(s) {unknown}; valid: {sorted(DEFAULTS)}.")
  return {**DEFAULTS, **given}


def freeze_regex(*, frozen_stages: int = -1, body: bool = False, fpn: bool = False,
                 language: bool = False) -> str:
  """The trainable regex with GLIP's freeze switches: MODEL.BACKBONE.FREEZE_CONV_BODY_AT
  (`frozen_stages`: >= 0 the patch embedding, >= 2 also Swin stages 1..k-1), MODEL.BACKBONE.FREEZE
  (the whole Swin body), MODEL.FPN.FREEZE, MODEL.LANGUAGE_BACKBONE.FREEZE; cls_logits always
  frozen. (The frozen stages also run in eval mode: the model's `frozen_stages`.)"""
  frozen = ["head/heads/cls_logits/"] + (["backbone/body/"] if body else []) + (
      ["backbone/fpn/"] if fpn else []) + (["language_backbone/"] if language else [])
  stages = backbone.frozen_param_regex(frozen_stages)
  if stages and not body:
    frozen.append("backbone/" + stages.removesuffix(".*"))
  return "(?!" + "|".join(frozen) + ").*"


def anchors_of(aux, anchor_sizes):
  """(anchors (N, 4), level_sizes) of the model's pyramid (`aux['level_shapes']`, static)."""
  shapes = aux["level_shapes"]
  return (boxes.anchors(shapes, detector.STRIDES, tuple(anchor_sizes)),
          boxes.level_sizes(shapes))


def head_outputs(logits, aux) -> dict:
  return dict(token_logits=logits, box_regression=aux["box_regression"],
              centerness=aux["centerness"])


def make_loss(config, source):
  """GLIP's training loss (module docstring). A source without one caption for all its classes
  (LVIS) trains on per-image captions (`input_pipeline/detection.py`: each example its own
  'text_ids', 'text_mask' and 'positive_map', GLIP's sampled negatives), which the loss takes as
  they come; training such a source without them is refused before training starts."""
  glip = settings(config)
  overflow = getattr(source, "caption_overflow", None)
  split = config.get("train_split", "train")
  samples = getattr(source, "samples_captions", None)
  if (overflow and config.get("mode", "train") == "train"
      and not (samples is not None and samples(split))):
    raise ValueError(f"Data source {source.name!r} cannot train GLIP here on split {split!r}: "
                     f"{overflow} Its training split needs per-image captions (GLIP's sampled "
                     "negatives: config.dataset_kwargs.per_image_captions=True or None, on a "
                     "split in the source's caption_sampling_splits); evaluate it with the "
                     "detection evaluator's chunk_size.")

  def loss(logits, aux, batch):
    anchors, level_sizes = anchors_of(aux, glip["anchor_sizes"])
    return atss.glip_losses(head_outputs(logits, aux), batch, anchors, level_sizes,
                            top_k=glip["top_k"])["total"]

  return loss


def predict_fns(model, config) -> dict:
  """'detect': (variables, batch, class_token_map (C, T)) -> fixed-size detections."""
  glip = settings(config)

  def detect(variables, batch, class_token_map):
    logits, aux = model.apply(variables, batch["image"], batch["text_ids"], batch["text_mask"],
                              train=False)
    anchors, level_sizes = anchors_of(aux, glip["anchor_sizes"])
    return inference.postprocess(
        head_outputs(logits, aux), anchors, level_sizes, class_token_map, batch["image_size"],
        score_threshold=glip["score_threshold"], pre_nms_top_n=glip["pre_nms_top_n"],
        nms_threshold=glip["nms_threshold"], detections_per_image=glip["detections_per_image"],
        score_agg=glip["score_agg"])

  return {"detect": detect}


def glip_prompt_method(model, trainable: str, new_params: str) -> method.Method:
  """The `METHOD` of a method that adds params (`new_params`: a regex of their names) to a GLIP
  whose weights load around them (`checkpoint.load_glip_keeping`), trained with GLIP's loss and
  evaluated with its 'detect': SDPT's baselines (prompt tuning, VPT, LoRA, MaPLe, UPT)."""
  return method.Method(
      model=model, trainable=trainable,
      loaders={"model": checkpoint.load_glip_keeping(new_params), "image": checkpoint.load_swin,
               "text": checkpoint.load_bert},
      inputs=("image", "text_ids", "text_mask"), make_loss=make_loss, predict_fns=predict_fns)


METHOD = method.Method(
    model=detector.Model, trainable=TRAINABLE_PARAMS,
    loaders={"model": checkpoint.load_glip, "image": checkpoint.load_swin,
             "text": checkpoint.load_bert},
    inputs=("image", "text_ids", "text_mask"), make_loss=make_loss, predict_fns=predict_fns)
