"""LMPT (Xia et al., arXiv 2305.04536) on VOC-LT: class-specific CoOp prompts on a frozen CLIP,
trained with the distribution-balanced loss plus the class-specific embedding loss against image
captions; see jaxprompt/prompts/lmpt.py.

  # Demo (no downloads): a tiny random-init CLIP (ViT-mu/8), generated long-tailed multi-label
  # squares with captions (10 classes, 600 train / 500 test, input_pipeline/embedded_multilabel.py),
  # the project's byte-level vocabulary; the seed's recipe (50 epochs, batch 64):
  python -m jaxprompt.main --config configs/lmpt_voc_lt.py
  # The baselines of the seed: zero-shot CLIP (same CLIP, no training) and fine-tuned CLIP
  # (a linear head on the frozen image features, DB loss, AdamW lr 1e-4, 30 epochs, batch 16):
  python -m jaxprompt.zeroshot --config configs/lmpt_voc_lt.py
  python -m jaxprompt.main --config configs/lmpt_voc_lt.py:baseline=finetune
  # (baseline=coop: the same prompts without the embedding loss, the seed's training_method coop)
  # The seed's VOC-LT (its data/ folder with voc/: voc_lt_{train,test}.txt, voc_lt_captions.txt,
  # optional class_freq.pkl, VOCdevkit/VOC2012 and VOC2007 JPEGImages), OpenAI CLIP ViT-B/16:
  python -m jaxprompt.main --config configs/lmpt_voc_lt.py:data=/path/to/LMPT/data \
      --config.model_init=ViT-B-16.pt --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz

Arguments: data (the seed's data/ folder; '' = the demo), variant (CLIP, ViT only), n_ctx (16),
m_ctx (2), csc (True; the seed cannot turn it off), init (ctx_init words, e.g. a_photo_of_a;
needs csc=False), position (end|middle|front), loss (the seed's --loss_function, dbl), lam (0.5),
count_transform (raw|softmax) and sign (as_coded|hinge_embedding) of the embedding loss (see
jaxprompt/prompts/lmpt_losses.py), baseline (''|coop|finetune), seed (0), runlocal.

The recipe is the seed's README/train.sh: CLIP ViT-B/16, n_ctx 16, m_ctx 2, class token at the
end, random context, --loss_function dbl (VOC-LT settings: neg_scale 5.0, map γ 0.3), --cseloss
softmargin, λ 0.5; SGD lr 5e-4, momentum 0.9, weight decay 1e-4; ReduceLROnPlateau on the test mAP
after every epoch (patience 5, ×0.1, min lr 1e-7); batch 64, 50 epochs; evaluated on test (the
seed has no val list) with softmax scores, threshold 0.3. Transforms: resize to 224×224 (no crop),
random flip in training, ImageNet mean/std.

Deviations: the epoch is ⌊N/64⌋ steps with batches straddling epochs (the seed: ⌈N/64⌉ batches,
the last one short), so 50 epochs are 850 steps on VOC-LT (the seed: 900); the final model is
reported (the seed saves the checkpoint of the best test mAP and reports that); the embedding
loss's class counts are raw (the seed's softmax gives NaN on VOC-LT, see lmpt.py); the zero-shot
baseline uses zeroshot.py's templates, averaged features (the seed's zero_shot_clip/test.py joins
its first CLIP templates into one text cut to 76 characters, about three templates: the closest
here is --templates='a bad photo of a {}.|a photo of many {}.|a sculpture of a {}.').

Expected results (the paper, ViT-B/16): VOC-LT mAP 87.88 (RN50 85.44, which this port cannot
run: ViT towers only). The demo's CLIP is random, so zero-shot is at the chance mAP (0.2, two
labels of ten per test image). Measured (seed 0, test split of 500, 2 CPU cores):

  demo run                                  test mAP  head / medium / tail   time
  zero-shot "a photo of a {}."              0.200     -                      25 s
  zero-shot, 7-template ensemble            0.186     -
  LMPT (this config, 450 steps)             0.333     0.314 / 0.413 / 0.246  55 s
  baseline=coop (no embedding loss)         0.335     0.318 / 0.452 / 0.195  52 s
  baseline=finetune (linear head, 1110 st.) 0.278     0.367 / 0.274 / 0.195  43 s
  lmpt_coco_lt.py (COCO-LT's DB settings)   0.361     0.382 / 0.434 / 0.244  59 s

(the random CLIP's text embeddings carry no meaning, so the embedding loss cannot help here.)
"""
import ml_collections

from configs import common
from input_pipeline import embedded_multilabel

BASELINES = ("", "coop", "finetune")


def seed_plateau() -> ml_collections.ConfigDict:
  """ReduceLROnPlateau(mode='max', patience=5, min_lr=1e-7) stepped on the test mAP."""
  return ml_collections.ConfigDict(dict(metric="test/mAP", mode="max", factor=0.1, patience=5,
                                        min_lr=1e-7))


def lmpt_pp(size: int) -> tuple[str, str]:
  """The (train, eval) pp specs of the seed's `imagelist.py`: resize to exactly size × size (PIL,
  so antialiased), a random flip for training, ImageNet mean/std."""
  tail = "value_range(0, 1)|normalize('imagenet')"
  return f"resize({size})|flip_lr|{tail}", f"resize({size})|{tail}"


def lmpt_config(dataset: str, arg=None) -> ml_collections.ConfigDict:
  """The config of LMPT on `dataset` ('voc_lt' or 'coco_lt'), shared by both config files."""
  arg = common.parse_arg(arg, data="", variant="ViT-B/16", n_ctx=16, m_ctx=2, csc=True, init="",
                         position="end", loss="dbl", lam=0.5, count_transform="raw",
                         sign="as_coded", baseline="", seed=0, runlocal=False)
  if arg.baseline not in BASELINES:
    raise ValueError(f"baseline={arg.baseline!r}: expected one of {BASELINES}.")
  config = common.base_config(model_name="prompts.lmpt", model=dict(
      variant=arg.variant, vocab_path="", n_ctx=arg.n_ctx, ctx_init=arg.init.replace("_", " "),
      csc=arg.csc, class_token_position=arg.position, classifier="prompt"))
  config.seed = arg.seed
  config.lmpt = ml_collections.ConfigDict(dict(
      loss_function=arg.loss, dbl_dataset=dataset, neg_scale=2.0, gamma=0.2, cse=True,
      m_ctx=arg.m_ctx, lam=arg.lam, count_transform=arg.count_transform, sign=arg.sign,
      threshold=0.3))
  train_pp, eval_pp = lmpt_pp(224)
  config.pp = ml_collections.ConfigDict(dict(image_size=224, train=train_pp, eval=eval_pp))
  # Constant lr (min_lr = lr: no decay), lowered only by the plateau rule.
  config.optim = common.optimizer("sgd", lr=5e-4, weight_decay=1e-4, momentum=0.9, min_lr=5e-4)
  config.optim.plateau = seed_plateau()
  config.batch_size, config.eval_batch_size = 64, 64
  config.num_epochs = 50
  # The seed evaluates test after every epoch and reports the best mAP (its plateau rule steps on
  # it too): keep_best follows that report.
  config.train_split = "train"
  config.evals = common.evals("test", type="multilabel", every_epochs=1)
  config.keep_best = ("test/mAP", "max")
  config.log_every_steps = 50

  if arg.baseline == "coop":
    config.lmpt.cse = False
  elif arg.baseline == "finetune":  # finetune_clip/fc.py defaults
    config.model.classifier = "linear"
    config.lmpt.cse = False
    config.optim = common.optimizer("adamw", lr=1e-4, weight_decay=1e-4, min_lr=1e-4)
    config.optim.plateau = seed_plateau()
    config.batch_size, config.num_epochs = 16, 30

  if arg.data:
    config.dataset = f"multilabel/{dataset}"
    config.data_dir = arg.data
  else:
    config.dataset = embedded_multilabel.NAME
    common.use_tiny_clip(config, variant=arg.variant, paper_variant="ViT-B/16")
    config.pp.train, config.pp.eval = lmpt_pp(config.pp.image_size)
  if arg.runlocal:
    common.apply_runlocal(config)
    config.evals.test.every_epochs = 0
    config.evals.test.every_steps = 2
  return config


def get_config(arg=None):
  return lmpt_config("voc_lt", arg)
