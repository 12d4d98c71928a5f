"""GLIP on COCO 2017: zero-shot evaluation of a released checkpoint, or fine-tuning with GLIP's
recipe; see jaxprompt/prompts/glip_finetune.py and jaxprompt/models/glip/.

  # Demo (no downloads): a tiny random-init GLIP trained on generated scenes of four shape classes
  # (input_pipeline/embedded_detection.py, its own BERT vocabulary), COCO-style box AP on the test
  # split before and after:
  python -m jaxprompt.main --config configs/glip_coco.py
  # Zero-shot COCO val2017 with the released GLIP-T (microsoft/GLIP README, Model Zoo):
  python -m jaxprompt.main --config configs/glip_coco.py:data=/data/coco,size=T,mode=eval \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt
  # Fine-tuning from it (GLIP's README COCO recipe):
  python -m jaxprompt.main --config configs/glip_coco.py:data=/data/coco,size=T \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt

Arguments: data (a folder with annotations/instances_{train,val}2017.json, train2017/, val2017/;
default: the embedded demo), size (T or L; the demo is 'tiny'), mode (train or eval), batch
(32, the README's fine-tuning batch), epochs (24), runlocal.

Recipe (microsoft/GLIP README "Fine-Tuning" on COCO with configs/pretrain/glip_Swin_T_O365_GoldG
.yaml; maskrcnn_benchmark/solver/build.py, lr_scheduler.py): AdamW (0.9, 0.999, eps 1e-8),
base lr 1e-5 and language-backbone lr 1e-5, weight decay 1e-4; biases at lr x2 without weight
decay (SOLVER.BIAS_LR_FACTOR 2, WEIGHT_DECAY_BIAS 0); linear warmup over 2000 iterations from
x0.001; x0.1 at 67 % and 89 % of the steps; full-model gradient clipping at 1.0; a 0.999 moving
average of the weights kept beside them (SOLVER.MODEL_EMA; evaluated with
--config.optim.ema_for_eval=True, GLIP's USE_EMA_FOR_MONITOR, off by default as there); 24 epochs
of batch 32; everything but GLIP's frozen cls_logits trains. Test: shorter side 800, longer at most
1333, class-aware NMS 0.6, 100 detections per image, pycocotools bbox AP.

Expected zero-shot COCO val2017 box AP of the released checkpoints (GLIP README, Model Zoo):
GLIP-T (O365, GoldG, CC3M, SBU) 46.6, GLIP-L 51.4 (fine-tuned: 55.2 and 61.7). These need the
released weights and COCO, which this project cannot download; not measured here.

Padding (GLIP: `to_image_list(size_divisible=32)`, DATALOADER.SIZE_DIVISIBILITY 32; its fusion
attends to the padded area, with no visual mask, so the padding can move the numbers):
  * evaluation on real data is GLIP's: each image is zero-padded to the multiple of 32 of its own
    resized size (an 800 x 1066 image to 800 x 1088) and batched only with images of that padded
    size (`pad_image(1344, 1344, size_divisible=32)`, input_pipeline/pipeline.py's shape
    buckets), which is what GLIP computes at its zero-shot TEST.IMS_PER_BATCH 1, whatever
    eval_batch_size is here. Each padded size compiles the detect step once (a few dozen sizes
    on COCO at 800/1333). This needs a single process; a multi-process evaluation is refused
    with an error and needs --config.pp.eval with pad_image(1344, 1344) (the fixed canvas, the
    deviation below) in place of pad_image(1344, 1344, size_divisible=32).
  * Deviation: training pads every image to one fixed canvas (1344 x 1344 at 800/1333), so that
    the train step has one compiled shape; GLIP pads each per-GPU training batch to the multiple
    of 32 of its largest image, a shape that changes every step (multi-scale training draws the
    shorter side per image), which would recompile the train step throughout the run. The
    embedded demo's scenes are all 128 x 128, so its canvas is exactly GLIP's padding.
"""
import ml_collections

from configs import common
from input_pipeline import pp_ops_boxes

DEMO_SIZE = 128  # the embedded scenes' side


def glip_recipe(config, *, lr: float, lang_lr: float, weight_decay: float,
                bias_group: bool = True) -> None:
  """GLIP's AdamW with its parameter groups, warm-up and multi-step schedule (module docstring).

  The language-backbone group exists only when its lr differs; `bias_group=False` leaves out the
  biases' group, for trainable sets without biases (SDPT's prototypes alone)."""
  groups = (("bias", dict(regex=r".*/bias", lr_mult=2.0, weight_decay=0.0)),) if bias_group \
      else ()
  if lang_lr != lr:
    groups += (("language", dict(regex=r"language_backbone/.*", lr_mult=lang_lr / lr)),)
  config.optim = common.optimizer(
      "adamw", lr=lr, weight_decay=weight_decay, grad_clip_norm=1.0, decay="multistep",
      milestones=(0.67, 0.89), warmup_steps=2000, warmup_init=lr * 0.001, param_groups=groups)


def detection_pp(min_size: int, max_size: int, canvas: int, max_boxes: int, *,
                 size_divisible: int = pp_ops_boxes.GLIP_SIZE_DIVISIBILITY) -> tuple[str, str]:
  """(train, eval) pp specs of GLIP's transforms (input_pipeline/pp_ops_boxes.py). Training pads
  to the fixed `canvas`; evaluation, with `size_divisible` d > 0 (GLIP's 32), at the multiple of
  d of each image's own size, batched by that size (0: the fixed canvas, as training)."""
  resize = f"resize_glip({min_size}, {max_size})"
  canvas_pad = f"pad_image({canvas}, {canvas})"
  eval_pad = (f"pad_image({canvas}, {canvas}, size_divisible={size_divisible})" if size_divisible
              else canvas_pad)
  return (f"{resize}|flip_lr_boxes|to_bgr255_normalize|{canvas_pad}|pad_boxes({max_boxes})",
          f"{resize}|to_bgr255_normalize|{eval_pad}|pad_boxes({max_boxes}, drop_extra=True)")


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", size="T", mode="train", batch=32, epochs=24,
                         runlocal=False)
  demo = not arg.data
  config = common.base_config(model_name="prompts.glip_finetune",
                              model=dict(size="tiny" if demo else arg.size),
                              model_init_parts=("model", "image", "text"))
  config.mode = arg.mode
  config.glip = ml_collections.ConfigDict()  # prompts/glip_finetune.DEFAULTS: GLIP's values
  config.train_split = "train"
  config.batch_size, config.eval_batch_size = arg.batch, 8
  config.num_epochs = arg.epochs
  glip_recipe(config, lr=1e-5, lang_lr=1e-5, weight_decay=1e-4)
  config.optim.ema_decay = 0.999  # SOLVER.MODEL_EMA of configs/pretrain/glip_Swin_T_O365_GoldG
  config.evals = common.evals("val", type="detection")
  config.keep_best = ()
  config.log_every_steps = 100
  train_pp, eval_pp = detection_pp(800, 1333, 1344, 100)
  if demo:
    config.dataset = "embedded/detection_shapes"
    config.dataset_kwargs = ml_collections.ConfigDict(dict(max_text_len=32))
    # All scenes are 128 x 128: the fixed canvas is exactly GLIP's padding.
    train_pp, eval_pp = detection_pp(DEMO_SIZE, DEMO_SIZE, DEMO_SIZE, 8, size_divisible=0)
    config.evals = common.evals("test", type="detection")
    config.batch_size, config.eval_batch_size = 8, 16
    config.total_steps = 300
    # A random-init model needs a larger lr than fine-tuning a pre-trained one.
    glip_recipe(config, lr=1e-3, lang_lr=1e-3, weight_decay=1e-4)  # (no moving average)
    config.optim.warmup_steps, config.optim.warmup_init = 30, 1e-5
    # The scenes' objects are 20..44 px: anchors at 4 x stride (the spec's GLIP-tiny choice).
    config.glip.anchor_sizes = (32, 64, 128, 256, 512)
    config.log_every_steps = 50
  else:
    config.dataset = "coco/2017"
    config.dataset_kwargs = ml_collections.ConfigDict(dict(root=arg.data, vocab=""))
  config.pp = ml_collections.ConfigDict(dict(train=train_pp, eval=eval_pp))
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
