"""RLCF (Zhao et al., ICLR 2024, mzhaoshuai/RLCF) and TPT (Shu et al., NeurIPS 2022, azshue/TPT)
on TPT's 10 fine-grained sets (the CoOp splits): test-time adaptation of CLIP ViT-B/16 on AugMix-ed
views; see jaxprompt/prompts/rlcf.py, jaxprompt/prompts/tpt.py and jaxprompt/evaluators/tta.py.

  # Demo (no downloads, 2-3 min on 2 CPU cores): configs/rlcf_imagenet.py's demo with
  # AugMix-ed views and RLCF's 5 fine-grained steps:
  python -m jaxprompt.main --config configs/rlcf_finegrained.py
  # RLCF prompt tuning on DTD (`TPT/scripts/rlcf-prompt-fine.sh`, with its undefined $augmix set
  # to 1), data in CoOp's layout (KaiyangZhou/CoOp DATASETS.md) under $DATA:
  python -m jaxprompt.main --config configs/rlcf_finegrained.py:dataset=dtd \
      --config.model_init.model=ViT-B-16.pt --config.model_init.reward_0=ViT-L-14.pt \
      --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz --config.data_dir=$DATA
  # TPT on the same set (`scripts/test_tpt_fs.sh`): method=tpt (only model_init.model)
  # RLCF on the image encoder: variant=image; RLCF-S: rewards=3; RLCF-S-M: rewards=3,momentum

Arguments: dataset ('' = the demo; oxford_flowers, dtd, oxford_pets, stanford_cars, ucf101,
caltech101, food101, sun397, fgvc_aircraft, eurosat: the source `coop/<dataset>`, split 'test'),
method (rlcf | tpt), variant (prompt | image | prompt_coop; tpt: prompt | image), coop_ctx,
rewards (1 | 3), momentum, batch, batched, policy: as configs/rlcf_imagenet.py.

The recipe is the fine-grained scripts': as on ImageNet (64 views at 224 px, 6 kept, K = 3, AdamW
weight decay 5e-4) but every augmented view AugMix-ed (3 chains of 1-3 ops at severity 1), and
RLCF's prompt tuning takes 5 steps at lr 7e-3 (the image encoder: 3 steps at lr 1e-5); TPT:
1 step at lr 5e-3, weight decay 0.01.

Expected results (ViT-B/16, top-1 %): TPT (prompt), from the TPT paper as recalled in our notes
and not checked against it: Flowers 68.98, DTD 47.75, Pets 87.79, Cars 66.87, UCF101 68.04,
Caltech101 94.16, Food101 84.67, SUN397 65.50, Aircraft 24.78, EuroSAT 42.44 (average 65.10).
The RLCF project page publishes no per-dataset fine-grained table. The OpenAI weights cannot be
fetched here, so nothing is checked.

Demo (no argument), measured: top-1 on the 500 shifted test images with AugMix-ed views
(zero-shot -> TPT -> RLCF with 5 steps): seed 1 0.820 -> 0.836 -> 0.872, seed 2 0.554 -> 0.570
-> 0.614. AugMix makes the views dearer: user 81-85 s + system 25 s of CPU time on 2 cores
(3.5-4.5 min of wall time on a machine shared with other jobs).
"""
from configs import common
from configs import rlcf_imagenet
from configs import tpt_imagenet

METHODS = ("rlcf", "tpt")
PROMPT_STEPS = 5  # `rlcf-prompt-fine.sh`: --tta_steps 5


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", method="rlcf", variant="prompt", coop_ctx="",
                         rewards=1, momentum=False, batch=16, batched=True, policy="ViT-B/16")
  if arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}: expected one of {METHODS}.")
  if arg.variant not in rlcf_imagenet.VARIANTS:
    raise ValueError(f"variant={arg.variant!r}: expected one of {rlcf_imagenet.VARIANTS}.")
  if (arg.variant == "prompt_coop") != bool(arg.coop_ctx):
    raise ValueError("variant=prompt_coop needs coop_ctx=<CoOp checkpoint>, and coop_ctx is only "
                     f"read by it; got variant={arg.variant!r}, coop_ctx={arg.coop_ctx!r}.")
  if arg.rewards not in rlcf_imagenet.REWARDS:
    raise ValueError(f"rewards={arg.rewards}: expected 1 (ViT-L/14) or 3 (RLCF-S).")
  if arg.method == "tpt" and (arg.rewards != 1 or arg.momentum):
    raise ValueError("method=tpt has no reward CLIP and no momentum buffer: drop rewards and "
                     "momentum.")
  if not arg.dataset:
    return common.tta_demo(augmix=True, rlcf_steps=PROMPT_STEPS)
  if arg.dataset not in common.TTA_FINEGRAINED:
    raise ValueError(f"dataset={arg.dataset!r}: expected one of {common.TTA_FINEGRAINED} ('' = "
                     f"the demo; the ImageNet family is configs/rlcf_imagenet.py).")
  dataset = f"coop/{arg.dataset}"
  if arg.method == "tpt":
    return tpt_imagenet.tpt_config(
        dataset=dataset, mode="image" if arg.variant == "image" else "prompt",
        coop_ctx=arg.coop_ctx, policy=arg.policy, batch=arg.batch, batched=arg.batched,
        augmix=True)
  return rlcf_imagenet.rlcf_config(
      dataset=dataset, variant=arg.variant, coop_ctx=arg.coop_ctx,
      rewards=rlcf_imagenet.REWARDS[arg.rewards], momentum=arg.momentum, batch=arg.batch,
      batched=arg.batched, policy=arg.policy, augmix=True, prompt_steps=PROMPT_STEPS)
