"""SDPT on COCO 2017: prototype tokens in a frozen GLIP's fusion layers (jaxprompt/prompts/sdpt.py),
with the release's recipe.

  # Demo (no downloads): a tiny random-init GLIP on the generated scenes of four shape classes
  # (input_pipeline/embedded_detection.py), trained three times from the same init: SDPT (8
  # prototypes per fusion layer, the release's set), full fine-tuning and GLIP's language prompt
  # tuning; a table of their COCO-style box AP on the test split (one of them: add mask=...):
  python -m jaxprompt.main --config configs/sdpt_coco.py
  # The README command of wuyongjianCODE/SDPT (GLIP-L, 700 prototypes, 2000 iterations of batch 1):
  python -m jaxprompt.main --config configs/sdpt_coco.py:data=/data/coco,size=L \
      --config.model_init.model=glip_large_model.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt
  # Prototypes alone (the paper's reading of what trains): add mask=paper.

Arguments: data (COCO folder: annotations/instances_{train,val}2017.json, train2017/, val2017/;
default: the demo), size (L as the release, or T), mask (SDPT's release or paper; the baselines in
the same detector and recipe: full, linear_probe, bitfit, language_prompt, vpt, lora,
lora_release, maple, upt; default release, and
in the demo without it the side-by-side runs `DEMO_VARIANTS`), tokens (0: the method's default,
700 prototypes per fusion layer for SDPT, 100 Swin prompts for VPT), recipe (release or
short_warmup, below), runlocal.

Which set trains (`sdpt.TRAINABLE_SETS`): mask=release is what the README command trains
(`froze_fuse 1`, `FROZEE_SWINT`, `FROZEE_BERT`): the prototypes and the whole DyHead outside the
bi-attention blocks, 83.7 M parameters on GLIP-L (11.47 M of them prototypes), 62.8 M on GLIP-T;
mask=paper trains the prototypes alone, 11.47 M (2.7 % of GLIP-L) / 8.60 M (3.7 % of GLIP-T).
The paper reports 0.04 % trained parameters, which neither set reproduces (0.04 % of GLIP-L is
~172 K); the release's numbers come from mask=release. Baselines: full (GLIP fine-tuning without
cls_logits), linear_probe (GLIP's LINEAR_PROB), bitfit (every bias), language_prompt (GLIP's
language_prompt_v2 table, lr 0.05, weight decay 0.25, everything in eval mode as GLIP runs it),
and the release's own re-implementations (each module docstring says what of the release is
kept): vpt (VPT prompts in GLIP's Swin, prompts/glip_vpt.py), lora and lora_release (LoRA r=16 on
Swin's qkv and the fusion projections; lora_release also trains the Swin qkv biases, as the
release does, prompts/glip_lora.py), maple and upt (prompts/glip_maple.py, glip_upt.py). On the
demo's random tiny GLIP, measured from this config: SDPT 0.157, full 0.203, language_prompt
0.000 test AP (2026-12-01; with the earlier threefry dropout masks 0.199, 0.215, 0.000); bitfit
0.026, linear_probe 0.005, vpt, lora, maple, upt 0.000 (these six with threefry masks, the last
four also before the fusion attention's written-out backward, which moves the rounding; a random
frozen GLIP gives the small sets nothing to adapt).

Recipe (the README command on SDPT's copy of configs/pretrain/glip_Swin_L.yaml): AdamW with GLIP's
groups (biases lr x2, no decay), lr 1e-5 for everything, weight decay 0.01, GLIP's warm-up of 2000
iterations from x0.001 over a 2000-iteration run (so the run never leaves the warm-up), x0.1 at
67 % and 89 %, gradient clipping 1.0, batch 1, MULT_MIN_SIZE_TRAIN (800,), FREEZE_CONV_BODY_AT 1
(the patch embedding in eval mode), evaluation every 100 iterations with the best checkpoint kept,
and the yaml's SOLVER.WEIGHT_DECAY_SCHEDULE: the weight decay x0.1 from update 894 and again from
1188 (0.667 of the lr milestones 1340 and 1780; `optim.weight_decay_schedule_ratio`).
recipe=short_warmup is the documented alternative: the same run with a warm-up of 10 % of it (200
iterations), so the lr reaches 1e-5 before the x0.1 steps at 67 % and 89 %, and a constant weight
decay; the release's schedule never leaves its warm-up (its lr peaks at ~6.7e-6 just before the
first step) and lowers the weight decay at 894 iterations, before the lr has peaked.
Not reproduced: AMP (f32 here), and the release's evaluation quirks (a 79-phrase cut of the label map that never scores "toothbrush";
nucleus phrases prepended to the query outside training). The paper's result tables could not be
read here, so no target AP is stated.
"""
import ml_collections

from configs import common, glip_coco
from jaxprompt.prompts import (glip_finetune, glip_lora, glip_maple, glip_prompt_tuning, glip_upt,
                               glip_vpt, sdpt)

DEMO_VARIANTS = ("mask=release", "mask=full", "mask=language_prompt")
RECIPES = ("release", "short_warmup")
WEIGHT_DECAY_SCHEDULE_RATIO = 0.667  # SOLVER.WEIGHT_DECAY_SCHEDULE(_RATIO) of glip_Swin_L.yaml
# mask -> (method, trainable regex): SDPT's two sets and the baselines of the same detector.
MASKS = {
    "release": ("prompts.sdpt", sdpt.SDPT_RELEASE),
    "paper": ("prompts.sdpt", sdpt.SDPT_PAPER),
    "full": ("prompts.glip_finetune", glip_finetune.TRAINABLE_PARAMS),
    "linear_probe": ("prompts.glip_finetune", glip_finetune.LINEAR_PROBE),
    "bitfit": ("prompts.glip_finetune", glip_finetune.BITFIT),
    "language_prompt": ("prompts.glip_prompt_tuning", glip_prompt_tuning.TRAINABLE_PARAMS),
    "vpt": ("prompts.glip_vpt", glip_vpt.PROMPTS),
    "lora": ("prompts.glip_lora", glip_lora.LORA_PARAMS),
    "lora_release": ("prompts.glip_lora", glip_lora.LORA_RELEASE),
    "maple": ("prompts.glip_maple", glip_maple.MAPLE),
    "upt": ("prompts.glip_upt", glip_upt.UPT),
}
# Trainable sets without a bias (no 'bias' parameter group: AdamW's bias group would be empty).
MASKS_WITHOUT_BIASES = ("paper", "language_prompt", "vpt", "lora", "maple")
# tokens=0: each method's default count (SDPT's prototypes per fusion layer, VPT's prompts).
DEFAULT_TOKENS = {"release": sdpt.NUM_TOKENS, "paper": sdpt.NUM_TOKENS, "vpt": glip_vpt.NUM_TOKENS}


def apply_mask(config, mask: str, *, lr: float, weight_decay: float, tokens: int) -> None:
  """Switches a GLIP config to `mask`'s method and trainable set, with GLIP's optimizer at `lr`
  (the language prompt baseline: its own lr 0.05 and weight decay 0.25, all of GLIP in eval
  mode, as GLIP's README runs it). The schedule settings of the config are kept."""
  if mask not in MASKS:
    raise ValueError(f"mask={mask!r}: expected one of {sorted(MASKS)}.")
  config.model_name, config.trainable_params = MASKS[mask]
  if mask in ("release", "paper"):
    config.model.num_tokens = tokens or DEFAULT_TOKENS[mask]
  if mask == "vpt":
    config.model.num_prompts = tokens or DEFAULT_TOKENS[mask]
  if mask == "language_prompt":
    lr, weight_decay = 0.05, 0.25
    config.model.update(drop_path_rate=0.0, drop_block_prob=0.0, dropout=0.0, fusion_dropout=0.0)
  schedule = {k: config.optim[k] for k in ("decay", "milestones", "warmup_steps", "warmup_init",
                                            "weight_decay_schedule_ratio")}
  glip_coco.glip_recipe(config, lr=lr, lang_lr=lr, weight_decay=weight_decay,
                        bias_group=mask not in MASKS_WITHOUT_BIASES)
  config.optim.update(schedule)
  if config.optim.warmup_init:  # GLIP's warm-up starts at 0.001 x the lr
    config.optim.warmup_init = lr * 0.001


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", size="L", mask="", tokens=0, recipe="release",
                         runlocal=False)
  if arg.recipe not in RECIPES:
    raise ValueError(f"recipe={arg.recipe!r}: expected one of {RECIPES}.")
  demo, mask = not arg.data, arg.mask or "release"
  config = glip_coco.get_config(f"size={arg.size},batch=1" + ("" if demo else f",data={arg.data}"))
  config.unlock()
  config.total_steps = 2000
  if demo and not arg.mask:  # SDPT and two baselines side by side (jaxprompt/variants.py)
    config.variants = DEMO_VARIANTS
  if demo:
    config.batch_size, config.total_steps = 8, 300
    config.evals = common.evals("test", type="detection")
    apply_mask(config, mask, lr=1e-3, weight_decay=0.01, tokens=8)
    config.optim.warmup_steps, config.optim.warmup_init = 30, 1e-5
  else:
    apply_mask(config, mask, lr=1e-5, weight_decay=0.01, tokens=arg.tokens)
    if arg.recipe == "release":
      config.optim.weight_decay_schedule_ratio = WEIGHT_DECAY_SCHEDULE_RATIO
    else:  # short_warmup: the base lr reached after 10 % of the run; a constant weight decay
      config.optim.warmup_steps = config.total_steps // 10
    config.model.frozen_stages = 1
    train_pp, eval_pp = glip_coco.detection_pp(800, 1333, 1344, 100)
    config.pp = ml_collections.ConfigDict(dict(train=train_pp, eval=eval_pp))
    config.evals = common.evals("val", type="detection", every_steps=100)
    config.keep_best = ("val/AP", "max")
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
