"""Helpers shared by every config file (in the manner of big_vision's `configs/common.py`).

A config is `configs/<method>_<benchmark>.py` with `get_config(arg=None)`; `arg` is the text after
the colon in `--config configs/x.py:task=dtd,runlocal`, parsed here into typed knobs once.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2,k3=v3' against `defaults` (their types convert the values).

  A bare `k` means `k=True`. Unknown keys raise with the list of valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      value = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      value = value.lower() in ("true", "1")
    elif default is not None:
      value = type(default)(value)
    parsed[key] = value
  return parsed


def base_config(*, model_name: str, model: dict,
                model_init_parts: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The spine's settings every config shares; method configs set data, optimizer and schedule.

  `model_init` is one path, or with `model_init_parts` (a method whose parts load from their own
  files: GLIP's Swin and BERT, ClipCap's CLIP and GPT-2) a dict part -> path, each set on the
  command line as `--config.model_init.<part>=PATH`; parts left '' keep their init."""
  config = ml_collections.ConfigDict()
  config.seed = 42
  config.mode = "train"  # or 'eval': evaluate the workdir's latest checkpoint
  # mode='eval' without a checkpoint or model_init evaluates the random init only when set: the
  # CLIP demos' zero-shot baseline on their random CLIP (a real run loads model_init).
  config.eval_random_init = False
  config.model_name = model_name
  config.model = ml_collections.ConfigDict(model)
  config.model_init = ml_collections.ConfigDict({part: "" for part in model_init_parts}) \
      if model_init_parts else ""  # pretrained weights (the method's `loaders`)
  config.trainable_params = ""  # '' = the method's own TRAINABLE_PARAMS regex
  config.compute_dtype = "float32"  # 'bfloat16' computes in bf16, params stay f32
  config.data_dir = ""  # TFDS data_dir; '' = TFDS default
  config.dataset_kwargs = ml_collections.ConfigDict()
  config.total_steps = 0  # 0: derived from num_epochs
  config.label_smoothing = 0.0
  config.mesh = ml_collections.ConfigDict(dict(num_devices=0, model=1))  # 0 = all devices
  config.param_sharding = "replicate"  # or 'fsdp'
  config.sharding_rules = "none"  # 'megatron': transformer matmuls split on mesh.model devices
  config.log_every_steps = 50
  # Evaluators by name (jaxprompt/evaluators/): {type, split, every_steps | every_epochs, ...};
  # their metrics are '{name}/{metric}'. `evals(...)` below makes the usual ones.
  config.evals = ml_collections.ConfigDict()
  config.keep_best = ()  # (metric, 'max'|'min'): also keep the best checkpoint by that metric
  config.eval_at_best = ()  # evaluator names rerun with the best checkpoint's params at the end
  # > 0: stop training after that many evaluations in a row without a better keep_best metric
  # (GLIP's SOLVER.AUTO_TERMINATE_PATIENCE); 0: train all steps.
  config.early_stop_patience = 0
  # Config arguments of variants of this file run one after another and compared in one table
  # (jaxprompt/variants.py), e.g. ('mask=release', 'mask=full'); () = one run.
  config.variants = ()
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  # A rerun resumes the workdir's run only when its state-shaping settings match the workdir's
  # config.json (jaxprompt/run_record.py); overwrite=True deletes its checkpoints and starts anew.
  config.overwrite = False
  config.strict_resume = False  # True: an unreadable latest checkpoint stops the run (no fallback)
  return config


def evals(*splits: str, type: str = "classification",  # pylint: disable=redefined-builtin
          **settings) -> ml_collections.ConfigDict:
  """`config.evals` with one evaluator of `type` per split, named after the split (so the metrics
  are 'test/accuracy', 'val/mAP', ...); `settings` go to every one (e.g. every_epochs=1)."""
  return ml_collections.ConfigDict(
      {split: dict(type=type, split=split, **settings) for split in splits})


def optimizer(name: str, lr: float, weight_decay: float, **kw) -> ml_collections.ConfigDict:
  """`config.optim` with every key the spine reads (see jaxprompt/optim.py).

  param_groups is a tuple of (name, dict(regex=..., lr_mult=1.0, weight_decay=None)) pairs, first
  match wins (a tuple, as ConfigDict sorts a dict's keys); schedule_unit 'epoch' is CoOp's
  per-epoch (Dassl) cosine, 'step' the per-step one; decay 'multistep' (with milestones as
  fractions of the training steps and decay_factor) is GLIP's WarmupMultiStepLR, and
  weight_decay_schedule_ratio > 0 lowers the weight decay by decay_factor ahead of each milestone
  (GLIP's SOLVER.WEIGHT_DECAY_SCHEDULE with its ratio 0.667); ema_decay > 0
  keeps a moving average of the trained params (GLIP's SOLVER.MODEL_EMA), which evaluators use with
  ema_for_eval (SOLVER.USE_EMA_FOR_MONITOR)."""
  settings = dict(name=name, lr=lr, momentum=0.9, weight_decay=weight_decay, no_weight_decay="",
                  warmup_epochs=0, warmup_steps=0, min_lr=0.0, grad_clip_norm=0.0,
                  grad_accum_steps=1, param_groups=(), schedule_unit="step", decay="cosine",
                  milestones=(), decay_factor=0.1, weight_decay_schedule_ratio=0.0,
                  warmup_init=0.0,
                  ema_decay=0.0, ema_for_eval=False)
  unknown = set(kw) - set(settings)
  if unknown:
    raise ValueError(f"Unknown optimizer settings {sorted(unknown)}; valid: {sorted(settings)}.")
  settings.update(kw)
  return ml_collections.ConfigDict(settings)


def use_embedded_demo(config, *, norm: str, variant: str = "mu/4", epochs: int = 8) -> None:
  """The out-of-the-box run: generated 32 px shapes, a tiny ViT trained from its random init;
  VTAB's preprocessing at 32 px with the caller's normalisation (`norm`: a `normalize` preset)."""
  config.dataset = "embedded/shapes"
  config.train_split, config.evals = "train", evals("test")
  config.model.variant = variant
  config.pp.image_size = 32
  config.pp.train = config.pp.eval = vtab_pp(32, norm)
  config.batch_size = 32
  config.eval_batch_size = 250
  config.num_epochs = epochs
  config.optim.warmup_epochs = 1


def apply_runlocal(config) -> None:
  """A smoke run: a few steps on whatever data is configured."""
  config.total_steps = 4
  config.batch_size = 8
  config.eval_batch_size = 8
  config.optim.warmup_epochs = 0
  config.optim.warmup_steps = 1
  config.optim.schedule_unit = "step"  # a one-step warmup is no whole epoch
  config.log_every_steps = 2


def vtab_pp(size: int, norm: str) -> str:
  """The pp spec of VPT's VTAB transform (`tf_dataset.py`): resize to exactly size × size,
  bilinear without antialiasing (`tf.image.resize`), [0, 1], then `normalize(norm)`."""
  return f"resize({size}, antialias=False)|value_range(0, 1)|normalize('{norm}')"


def fgvc_pp(size: int, norm: str) -> tuple[str, str]:
  """The (train, eval) pp specs of VPT's FGVC transforms (`transforms.py`): the shorter side to
  round(size · 256 / 224), then a random crop and flip (train) or the center crop (eval)."""
  resize = f"resize_shorter_side({round(size * 256 / 224)})"
  tail = f"value_range(0, 1)|normalize('{norm}')"
  return (f"{resize}|random_crop({size})|flip_lr|{tail}", f"{resize}|center_crop({size})|{tail}")


def coop_recipe(config, *, crop_scale: tuple[float, float] = (0.08, 1.0)) -> None:
  """CoOp's training recipe, which RPL and the CLIP demos share (Dassl's `build_transform` and
  `lr_scheduler.py` as CoOp configures them): train images through RandomResizedCrop(224,
  `crop_scale`, bicubic) and a flip, test images resized (shorter side, bicubic) and
  center-cropped, CLIP mean/std; SGD lr 0.002 (momentum 0.9, wd 5e-4), one warmup epoch held at
  1e-5, then a cosine stepped once per epoch; batch 32 (evaluation 100)."""
  tail = "value_range(0, 1)|normalize('clip')"
  config.pp = ml_collections.ConfigDict(dict(
      image_size=224,
      train=f"random_resized_crop(224, scale={tuple(crop_scale)})|flip_lr|{tail}",
      eval=f"resize_shorter_side(224, method='bicubic')|center_crop(224)|{tail}"))
  config.optim = optimizer("sgd", lr=0.002, weight_decay=5e-4, momentum=0.9, warmup_epochs=1,
                           schedule_unit="epoch")
  config.optim.warmup_init = 1e-5
  config.optim.warmup_type = "constant"
  config.batch_size, config.eval_batch_size = 32, 100


def use_tiny_clip(config, *, variant: str, paper_variant: str) -> None:
  """The CLIP demos: a tiny random CLIP ('ViT-mu/8' unless another variant was asked for), the
  byte-level vocabulary the project writes itself, 32 px generated images, and a linear warmup:
  from its random init the tiny CLIP trains far better with the ramp than with CoOp's constant
  warmup (CoOp demo test accuracy 0.425 vs 0.159). The caller sets the 32 px pp specs."""
  from input_pipeline import embedded_clip  # pylint: disable=g-import-not-at-top
  config.model.variant = "ViT-mu/8" if variant == paper_variant else variant
  config.model.vocab_path = embedded_clip.byte_vocabulary()
  config.pp.image_size = 32
  config.eval_batch_size = 250
  config.optim.warmup_type = "linear"
  config.optim.schedule_unit = "step"  # as the demo numbers were measured


# ------------------------------------------------------------------------------------------------
# Test-time adaptation (TPT, RLCF): configs/tpt_imagenet.py, rlcf_imagenet.py, rlcf_finegrained.py.

TTA_VIEWS, TTA_SIZE = 64, 224  # TPT's 63 augmented views + the plain one, at CLIP's 224 px
TTA_IMAGENET = ("imagenet/val", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
# TPT's fine-grained sets (`coop/<name>`), in the order of its tables.
TTA_FINEGRAINED = ("oxford_flowers", "dtd", "oxford_pets", "stanford_cars", "ucf101",
                   "caltech101", "food101", "sun397", "fgvc_aircraft", "eurosat")
# The demo: views, selection and pre-fit of the embedded run (`tta_demo`).
TTA_DEMO_VIEWS, TTA_DEMO_SELECTION = 16, 0.25  # 16 views keep 4 (0.1 would keep 1)
TTA_DEMO_POLICY, TTA_DEMO_REWARD = "ViT-mu/8", "ViT-mu/4"
TTA_DEMO_TEST_EXAMPLES = 500


def tta_pp(num_views: int, size: int, augmix: bool) -> str:
  """TPT's test-time views (the pp op `tta_views`), each to [0, 1] and CLIP-normalised."""
  return (f"tta_views({num_views}, {size}, augmix={augmix})|value_range(0, 1)|"
          f"normalize('clip')")


def tta_base(*, model_name: str, model: dict, model_init_parts: tuple[str, ...],
             batch_size: int) -> ml_collections.ConfigDict:
  """A real TTA run: `mode='eval'` of pretrained CLIPs (`config.model_init.<part>=PATH`: 'model'
  the policy, 'reward_0'.. the reward CLIPs), no training; `batch_size` test samples adapted at
  once (vmapped), each with its own params; the test views are seeded by `config.seed`."""
  config = base_config(model_name=model_name, model=model, model_init_parts=model_init_parts)
  config.mode = "eval"  # nothing trains but each sample's episode (no optimizer state is built)
  config.seed = 0  # TPT's `set_random_seed(0)`: the views' draws
  # The spine's training settings, unused: evaluation never steps.
  config.train_split, config.total_steps = "train", 1
  config.optim = optimizer("adamw", lr=0.0, weight_decay=0.0)
  config.batch_size, config.eval_batch_size = batch_size, batch_size
  # pp.train only shapes the model's init (a source with a train split): view 0's transform.
  config.pp = ml_collections.ConfigDict(dict(
      image_size=TTA_SIZE, train=f"resize_shorter_side({TTA_SIZE}, method='bicubic')|"
      f"center_crop({TTA_SIZE})|value_range(0, 1)|normalize('clip')", eval=""))
  return config


def tta_eval(method: str, **settings) -> dict:
  """One 'tta' evaluator's settings on the 'test' split (jaxprompt/evaluators/tta.py)."""
  return dict(type="tta", split="test", method=method, **settings)


def tta_demo(*, augmix: bool = False, rlcf_steps: int = 3) -> ml_collections.ConfigDict:
  """The TTA configs' embedded demo: the named shapes with the 'zoom_out' shift of the test split
  (squares shrunk and dulled; its first TTA_DEMO_TEST_EXAMPLES examples), the policy CLIP
  TTA_DEMO_POLICY and a different reward CLIP TTA_DEMO_REWARD (finer patches and wider, as
  ViT-L/14 against ViT-B/16; on the shifted split it is not always the more accurate one, see
  configs/rlcf_imagenet.py), both random-init and pre-fit together for 800 steps on the clean
  train split (`prompts.rlcf`'s loss: the cross-entropy of each CLIP on the class prompts
  "a photo of a {name}.", i.e. CLIP's contrastive loss on the class captions); then TPT and RLCF
  adapt on every shifted test sample and report their accuracy next to zero-shot's
  ('tpt/accuracy', 'rlcf/accuracy', '*/zeroshot_accuracy'). The originals' per-sample settings
  (TPT 1 step lr 5e-3 wd 0.01; RLCF `rlcf_steps` steps lr 7e-3 wd 5e-4 K 3) on TTA_DEMO_VIEWS
  views of 32 px (AugMix-ed with `augmix`), of which TTA_DEMO_SELECTION keep 4."""
  from input_pipeline import embedded_clip  # pylint: disable=g-import-not-at-top
  config = base_config(model_name="prompts.rlcf", model=dict(
      variant=TTA_DEMO_POLICY, vocab_path=embedded_clip.byte_vocabulary(),
      ctx_init="a photo of a", reward_variants=(TTA_DEMO_REWARD,), reward_weights=()))
  config.trainable_params = ".*"
  config.dataset = embedded_clip.NAME
  config.dataset_kwargs = ml_collections.ConfigDict(dict(shift="zoom_out",
                                                         test_examples=TTA_DEMO_TEST_EXAMPLES))
  config.train_split = "train"
  config.seed = 1
  config.pp = ml_collections.ConfigDict(dict(
      image_size=32, train=vtab_pp(32, "clip"), eval=tta_pp(TTA_DEMO_VIEWS, 32, augmix)))
  config.batch_size, config.eval_batch_size = 32, 250
  config.total_steps = 800
  config.optim = optimizer("adamw", lr=2e-3, weight_decay=0.01, warmup_steps=80)
  config.log_every_steps = 200
  config.checkpoint_every_steps = 800
  config.evals = ml_collections.ConfigDict(dict(
      tpt=tta_eval("tpt", selection=TTA_DEMO_SELECTION),
      rlcf=tta_eval("rlcf", steps=rlcf_steps, lr=7e-3, weight_decay=5e-4, top_k=3,
                    selection=TTA_DEMO_SELECTION)))
  return config
