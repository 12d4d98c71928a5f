"""SDPT on LVIS v1: prototype tokens in a frozen GLIP's fusion layers (jaxprompt/prompts/sdpt.py)
trained with the release's recipe on GLIP's per-image LVIS captions, evaluated with GLIP's LVIS
protocol.

  # Demo (no downloads): the embedded scenes of four shape classes with 12 never-drawn names added
  # (16 classes, input_pipeline/embedded_detection.py), a 32-token caption they overflow, so the
  # training examples carry per-image captions (their classes plus sampled negatives); evaluated
  # in chunks of 8 names, 300 detections per image; box AP on the test split:
  python -m jaxprompt.main --config configs/sdpt_lvis.py
  # The same with the LVIS evaluator (APr/APc/APf; needs `pip install lvis
  # opencv-python-headless matplotlib`):
  python -m jaxprompt.main --config configs/sdpt_lvis.py:api=lvis
  # LVIS v1 from GLIP-L (images in the COCO 2017 folders), scored on MDETR's minival:
  python -m jaxprompt.main --config configs/sdpt_lvis.py:data=/data/coco,size=L \
      --config.model_init.model=glip_large_model.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt

Arguments: data (the COCO folder with annotations/lvis_v1_train.json, lvis_v1_minival_inserted_
image_name.json (or lvis_v1_val.json with eval_split=val), train2017/, val2017/; default: the
demo), size (L or T), mask (release, paper and the baselines of configs/sdpt_coco.py's MASKS;
default release, and in the demo without it SDPT and two baselines side by side, as
configs/sdpt_coco.py), tokens (0: the method's default), eval_split (minival or val), api (lvis; the demo's default is
coco, as the `lvis` package is an optional install), runlocal.

Training captions (input_pipeline/grounding.py `CaptionSampler`): LVIS' 1203 names do not fit in
GLIP's 256 tokens, so each training image gets its own caption, as GLIP trains LVIS
(`maskrcnn_benchmark/data/datasets/modulated_coco.py` `CocoGrounding` with
`SPECIAL_SAFEGUARD_FOR_COCO_GROUNDING`, `od_to_grounding.py`): the image's classes (cut, with
their boxes, past 254 word pieces), then up to RANDOM_SAMPLE_NEG = 85 sampled negative names
(SDPT's yaml, as GLIP's), shuffled together (`DISABLE_SHUFFLE` False: the COCO command's True
would put all 1203 names in one caption). `--config.dataset_kwargs.max_negatives`,
`caption_seed` change them.

Evaluation (microsoft/GLIP README "LVIS Evaluation", configs/lvis/minival.yaml): TEST.
CHUNKED_EVALUATION 40 (the names in chunks of 40, one caption each, detections concatenated),
MDETR_STYLE_AGGREGATE_CLASS_NUM 3000 in the original, 300 detections per image (MODEL.ATSS.
DETECTIONS_PER_IMG 300 in its command; `config.glip.detections_per_image`), LVIS FixedAP
(`DATASETS.LVIS_USE_NORMAL_AP` False) with AP, APr, APc, APf; shorter side 800, longer <= 1333.

Recipe: configs/sdpt_coco.py's, the SDPT README command (AdamW, lr 1e-5, weight decay 0.01,
GLIP's 2000-iteration warm-up, 2000 iterations of batch 1, FREEZE_CONV_BODY_AT 1, evaluation every
100 iterations keeping the best). The SDPT release has no LVIS command and its paper's LVIS
tables could not be read here, so the COCO command's settings are kept and no target AP is
stated. Deviations: those of configs/sdpt_coco.py; negatives drawn per (seed, image) rather than
anew at every visit (input_pipeline/grounding.py); at most 300 boxes per training image (an
image with more is an error naming it).

Demo, measured (seed 0, 2 shared CPU cores, ~3 min): test AP 0.087 (api=lvis: AP 0.087, APr 0.095,
APc 0.179, APf 0.037; the frequency groups are assigned to the drawn classes). The same SDPT run
with a 64-token caption that holds all 16 names in a fixed order gives 0.237, and per-image
captions at 64 tokens 0.109: with the demo's frozen random BERT, shuffled captions are harder to
ground than one fixed caption (configs/glip_lvis.py's demo, which trains BERT too, gets 0.209).
"""
import ml_collections

from configs import common, glip_coco, sdpt_coco

DEMO_NAMES_PER_CHUNK = 8  # 8 demo names = 25 tokens <= the demo's 32
NAMES_PER_CHUNK = 40  # GLIP's TEST.CHUNKED_EVALUATION for LVIS
DETECTIONS_PER_IMAGE = 300  # GLIP's LVIS command (MODEL.ATSS.DETECTIONS_PER_IMG)
MAX_TRAIN_BOXES = 300


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", size="L", mask="", tokens=0, eval_split="minival",
                         api="", runlocal=False)
  demo = not arg.data
  api = arg.api or ("coco" if demo else "lvis")
  if api not in ("coco", "lvis"):
    raise ValueError(f"api={arg.api!r}: expected lvis (LVISEval, APr/APc/APf) or coco.")
  if arg.eval_split not in ("minival", "val"):
    raise ValueError(f"eval_split={arg.eval_split!r}: expected minival or val.")
  config = sdpt_coco.get_config(
      ",".join(f"{k}={arg[k]}" for k in ("size", "mask", "tokens"))
      + ("" if demo else f",data={arg.data}"))
  config.unlock()
  config.glip.detections_per_image = DETECTIONS_PER_IMAGE
  if demo:
    from input_pipeline import embedded_detection  # pylint: disable=import-outside-toplevel
    config.dataset_kwargs = ml_collections.ConfigDict(dict(
        max_text_len=32, extra_class_names=embedded_detection.DISTRACTOR_NAMES,
        lvis_fields=api == "lvis"))
    config.evals = common.evals("test", type="detection", api=api,
                                chunk_size=DEMO_NAMES_PER_CHUNK,
                                max_detections=DETECTIONS_PER_IMAGE)
  else:
    config.dataset = "lvis/v1"
    config.dataset_kwargs = ml_collections.ConfigDict(dict(root=arg.data, vocab=""))
    train_pp, eval_pp = glip_coco.detection_pp(800, 1333, 1344, MAX_TRAIN_BOXES)
    config.pp = ml_collections.ConfigDict(dict(train=train_pp, eval=eval_pp))
    config.evals = common.evals(arg.eval_split, type="detection", api=api,
                                chunk_size=NAMES_PER_CHUNK, max_detections=DETECTIONS_PER_IMAGE,
                                every_steps=100)
    config.keep_best = (f"{arg.eval_split}/AP", "max")
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
