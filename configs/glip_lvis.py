"""GLIP on LVIS v1: zero-shot evaluation of a released checkpoint with GLIP's LVIS protocol, or
training on GLIP's per-image LVIS captions; see jaxprompt/prompts/glip_finetune.py.

  # Demo (no downloads): a tiny random-init GLIP trained on the embedded scenes with 12
  # never-drawn names added (16 classes over a 32-token caption, so training uses per-image
  # captions), evaluated in chunks of 8 names with 300 detections per image; box AP on test:
  python -m jaxprompt.main --config configs/glip_lvis.py
  # Zero-shot LVIS minival with the released GLIP-T (microsoft/GLIP README, "LVIS Evaluation"):
  python -m jaxprompt.main --config configs/glip_lvis.py:data=/data/coco,size=T \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt

Arguments: data (the COCO folder with annotations/lvis_v1_minival_inserted_image_name.json or
lvis_v1_val.json, lvis_v1_train.json for training, and the COCO 2017 images; default: the demo),
size (T or L), mode (eval with data, train for the demo), eval_split (minival or val), api (lvis;
the demo's default is coco, as the `lvis` package is an optional install), runlocal.

Evaluation (GLIP README "LVIS Evaluation", configs/lvis/minival.yaml and val.yaml): the 1203
names in chunks of 40 (TEST.CHUNKED_EVALUATION 40), 300 detections per image, LVIS FixedAP with
APr / APc / APf, shorter side 800, longer <= 1333. Expected zero-shot minival numbers (README
Model Zoo): "LVIS [2]", the last pre-training checkpoint (its footnote says minival APr), GLIP-T
17.6, GLIP-L 29.3; "LVIS [3]", the best checkpoint, 20.1 and 30.1. These need the released weights
and LVIS, which this project cannot download; not measured here. mode=train uses
configs/glip_coco.py's fine-tuning recipe on GLIP's per-image captions
(input_pipeline/grounding.py `CaptionSampler`, 85 sampled negatives); GLIP publishes no LVIS
fine-tuning recipe.

Demo, measured (seed 0, 2 shared CPU cores, ~3 min): test AP 0.209 after 300 steps.
"""
import ml_collections

from configs import common, glip_coco, sdpt_lvis


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", size="T", mode="", eval_split="minival", api="",
                         runlocal=False)
  demo = not arg.data
  mode = arg.mode or ("train" if demo else "eval")
  api = arg.api or ("coco" if demo else "lvis")
  if api not in ("coco", "lvis"):
    raise ValueError(f"api={arg.api!r}: expected lvis (LVISEval, APr/APc/APf) or coco.")
  if arg.eval_split not in ("minival", "val"):
    raise ValueError(f"eval_split={arg.eval_split!r}: expected minival or val.")
  config = glip_coco.get_config(f"size={arg.size},mode={mode}"
                                + ("" if demo else f",data={arg.data}"))
  config.unlock()
  config.glip.detections_per_image = sdpt_lvis.DETECTIONS_PER_IMAGE
  if demo:
    from input_pipeline import embedded_detection  # pylint: disable=import-outside-toplevel
    config.dataset_kwargs = ml_collections.ConfigDict(dict(
        max_text_len=32, extra_class_names=embedded_detection.DISTRACTOR_NAMES,
        lvis_fields=api == "lvis"))
    config.evals = common.evals("test", type="detection", api=api,
                                chunk_size=sdpt_lvis.DEMO_NAMES_PER_CHUNK,
                                max_detections=sdpt_lvis.DETECTIONS_PER_IMAGE)
  else:
    config.dataset = "lvis/v1"
    config.dataset_kwargs = ml_collections.ConfigDict(dict(root=arg.data, vocab=""))
    train_pp, eval_pp = glip_coco.detection_pp(800, 1333, 1344, sdpt_lvis.MAX_TRAIN_BOXES)
    config.pp = ml_collections.ConfigDict(dict(train=train_pp, eval=eval_pp))
    config.evals = common.evals(arg.eval_split, type="detection", api=api,
                                chunk_size=sdpt_lvis.NAMES_PER_CHUNK,
                                max_detections=sdpt_lvis.DETECTIONS_PER_IMAGE)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
