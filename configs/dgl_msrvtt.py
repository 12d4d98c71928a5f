"""DGL on MSR-VTT (9k train, 1k-A test): global-local prompts on a frozen CLIP ViT-B/32, the
transformer latent space (jaxprompt/prompts/dgl.py); the other DGL configs build on this file.

  # Demo (no downloads): a tiny random-init CLIP (ViT-mu/8) on generated clips of a square moving
  # left/right/up/down (input_pipeline/embedded_video.py: 8 of 16 frames, captions that name the
  # motion), the project's byte-level vocabulary; DGL trained, then zero-shot CLIP (mean-pooled
  # frames, the same random CLIP) evaluated: one table of their test T2V/V2T R@1/5/10.
  python -m jaxprompt.main --config configs/dgl_msrvtt.py
  # The original's run (knightyxp/DGL scripts/msrvtt.sh), given the videos (3 fps transcodes or
  # originals), MSR-VTT's csv/json files and OpenAI's CLIP ViT-B/32 weights:
  python -m jaxprompt.main \
      --config configs/dgl_msrvtt.py:data=/data/msrvtt,vocab=bpe_simple_vocab_16e6.txt.gz \
      --config.model_init=ViT-B-32.pt

Arguments: data (the dataset folder, see input_pipeline/video_retrieval.py; default: the demo),
vocab (CLIP's BPE vocabulary, needed with data: captions are tokenised in the input pipeline),
method (dgl; the baselines in the same harness: zeroshot = CLIP mean-pooled over frames, untrained;
clip4clip = CLIP4Clip meanP full fine-tuning; vpt_coop = VPT-deep frame prompts + CoOp text
context, the "separate prompts" baseline), latent (transformer | linear), variant (CLIP ViT),
frames (T), words (caption tokens), batch (global contrastive batch), lr, epochs, runlocal.

Recipe (knightyxp/DGL `main.py`, `params.py`, `utils/lr_scheduler.py`, `scripts/msrvtt.sh`):
AdamW (0.9, 0.98, eps 1e-6), weight decay 0.2 except parameters named '*bias*', lr 2e-3 with a
linear warmup from 1e-8 over the first 10 % of the steps and a half cosine after it (per step),
global grad-norm clipping 1.0, contrastive batch 512 (128 x 4 GPUs), 5 epochs, 12 frames at 3 fps
(TSN segments for training, segment centres for test), captions of 32 tokens, the test split
evaluated after every epoch and the best epoch by its T2V R@1 kept (`config.keep_best`). DGL's
schedule floors the lr at 1e-8; ours ends the cosine at `min_lr` 1e-8 (a difference below 1e-8).
method=clip4clip follows ArrowLuo/CLIP4Clip's README run instead: CLIP trained at lr 1e-4 x
coef_lr 1e-3 = 1e-7 (the demo: its lr x 1e-3), under the same schedule.

Paper (arXiv 2401.10588, Fig. 1b; ViT-B/32): MSR-VTT T2V R@1 45.8 (transformer, 9.57 M trained
parameters) and 44.7 (linear, 0.83 M); CLIP4Clip full fine-tuning 43.1, VPT 42.0.
"""
from __future__ import annotations

import ml_collections

from configs import common

# config.model_name of each method argument.
METHODS = {"dgl": "prompts.dgl", "zeroshot": "prompts.clip4clip",
           "clip4clip": "prompts.clip4clip", "vpt_coop": "prompts.video_vpt_coop"}
DEMO_VARIANTS = ("method=dgl", "method=zeroshot")
# The demo: tiny CLIP, 8 of the generated clips' 16 frames, batch 32, short training.
DEMO = dict(frames=8, batch=32, lr=1e-2, epochs=40)
CLIP4CLIP_LR = 1e-4  # ArrowLuo/CLIP4Clip README, MSR-VTT meanP
DEMO_WORDS = 32  # the tiny CLIP's context; the demo's captions take at most 30 tokens
DEMO_CAPTIONS = 3  # captions per demo clip in the multi-sentence (VATEX) demo


def get_config(arg=None):
  return build(arg, dataset="msrvtt", latent="transformer", lr=2e-3, epochs=5, batch=512,
               words=32, frames=12)


def build(arg, *, dataset: str, latent: str, lr: float, epochs: int, batch: int, words: int,
          frames: int, train_sampling: str = "segments",
          captions: int = 0) -> ml_collections.ConfigDict:
  """The config of one DGL benchmark: `dataset` (a registered source name) with the original's
  settings for it (`train_sampling`: 'segments' or 'centre', VATEX's loader; `captions` > 0: the
  test split's captions per video, the multi-sentence protocol), overridden by the config
  arguments (module docstring)."""
  arg = common.parse_arg(arg, data="", vocab="", method="dgl", latent=latent, variant="ViT-B/32",
                         frames=0, words=0, batch=0, lr=0.0, epochs=0, runlocal=False)
  if arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}: expected one of {sorted(METHODS)}.")
  demo = not arg.data
  if not demo and not arg.vocab:
    raise ValueError(f"data={arg.data!r} needs vocab=<CLIP's bpe_simple_vocab_16e6.txt.gz>: the "
                     "captions are tokenised in the input pipeline with the model's vocabulary.")
  settings = DEMO if demo else dict(frames=frames, batch=batch, lr=lr, epochs=epochs)
  frames = arg.frames or settings["frames"]
  words = arg.words or (DEMO_WORDS if demo else words)
  epochs = arg.epochs or settings["epochs"]
  model = dict(variant=arg.variant, vocab_path=arg.vocab, num_frames=frames)
  if arg.method == "dgl":
    model.update(latent_space=arg.latent)
  config = common.base_config(model_name=METHODS[arg.method], model=model)
  config.optim = common.optimizer(
      "adamw", lr=arg.lr or settings["lr"], weight_decay=0.2, no_weight_decay=r".*bias.*",
      grad_clip_norm=1.0, warmup_epochs=0.1 * epochs, warmup_init=1e-8, min_lr=1e-8)
  config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.98, 1e-6
  if arg.method == "clip4clip":  # CLIP at lr x coef_lr (1e-3); CLIP4Clip's README: lr 1e-4
    config.optim.lr = (arg.lr or (settings["lr"] if demo else CLIP4CLIP_LR)) * 1e-3
  config.num_epochs = epochs
  config.batch_size = arg.batch or settings["batch"]
  config.train_split = "train"
  config.evals = common.evals("test", type="video_retrieval", every_epochs=1)
  config.keep_best = ("test/t2v_R@1", "max")
  config.log_every_steps = 50
  if arg.method == "zeroshot":
    config.mode = "eval"
    config.eval_random_init = demo  # the demo's CLIP is random; a real run loads model_init

  if demo:
    from input_pipeline import embedded_clip, embedded_video  # pylint: disable=g-import-not-at-top
    config.dataset = embedded_video.NAME
    if captions:
      config.dataset_kwargs = ml_collections.ConfigDict(dict(captions_per_video=DEMO_CAPTIONS))
    config.model.variant = "ViT-mu/8" if arg.variant == "ViT-B/32" else arg.variant
    config.model.vocab_path = embedded_clip.byte_vocabulary()
    config.eval_batch_size = 60
    config.log_every_steps = 50
    if arg.method == "dgl" and not arg.runlocal:  # DGL and zero-shot CLIP side by side
      config.variants = DEMO_VARIANTS
    crop, vocab, captions = "", config.model.vocab_path, DEMO_CAPTIONS if captions else 0
  else:
    config.dataset = dataset
    config.dataset_kwargs = ml_collections.ConfigDict(dict(root=arg.data, fps=3))
    config.eval_batch_size = 16
    crop, vocab = "center_crop(224)|", arg.vocab
  tail = f"value_range(0, 1)|normalize('clip')|clip_tokenize({vocab!r}, context_length={words}"
  config.pp = ml_collections.ConfigDict(dict(
      train=f"sample_frames_{train_sampling}({frames})|{crop}{tail})",
      eval=f"sample_frames_centre({frames})|{crop}{tail}" +
      (f", max_captions={captions})" if captions else ")")))
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
