"""RLCF (Zhao et al., ICLR 2024, mzhaoshuai/RLCF): test-time adaptation of a CLIP ViT-B/16 policy by
REINFORCE with a frozen reward CLIP, on ImageNet and its shifted variants; see
jaxprompt/prompts/rlcf.py and jaxprompt/evaluators/tta.py.

  # Demo (no downloads, 1.5-2.5 min on 2 CPU cores): a tiny policy CLIP (ViT-mu/8) and a
  # different tiny reward CLIP (ViT-mu/4: finer patches, wider) pre-fit on the clean generated
  # named shapes, then TPT and RLCF adapt on each test image of a shifted split (shapes shrunk
  # and dulled) and report
  # 'tpt/accuracy', 'rlcf/accuracy' next to the zero-shot 'tpt/zeroshot_accuracy':
  python -m jaxprompt.main --config configs/rlcf_imagenet.py
  # RLCF prompt tuning on ImageNet-A (`scripts/rlcf-prompt.sh` with --load None), OpenAI's
  # ViT-B/16 policy and ViT-L/14 reward (TFDS data in --config.data_dir):
  python -m jaxprompt.main --config configs/rlcf_imagenet.py:dataset=imagenet_a \
      --config.model_init.model=ViT-B-16.pt --config.model_init.reward_0=ViT-L-14.pt \
      --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz --config.data_dir=$TFDS
  # RLCF + CoOp (the script's --load): variant=prompt_coop,coop_ctx=<CoOp prompt_learner .pth>
  # RLCF on the image encoder: variant=image
  # RLCF-S (three reward CLIPs, weights 0.56/0.17/0.28): variant=image,rewards=3 with
  #   --config.model_init.reward_0=ViT-L-14-336px.pt --config.model_init.reward_1=RN50x64.pt
  #   --config.model_init.reward_2=ViT-L-14.pt
  # RLCF-S-M (the momentum buffer over the reset target): variant=image,rewards=3,momentum

Arguments: dataset ('' = the demo; imagenet/val, imagenet_a, imagenet_v2, imagenet_r,
imagenet_sketch), variant (prompt | image | prompt_coop), coop_ctx (the CoOp checkpoint of
prompt_coop), rewards (1: ViT-L/14; 3: RLCF-S's ViT-L/14@336px, RN50x64, ViT-L/14), momentum
(RLCF-S-M: m 0.9998, refresh every 64 samples, w 1), batch (test samples adapted at once; 1 is the
originals' loop, any B gives the same numbers without momentum), batched (vmap the batch or loop).

The recipe is the scripts' (`TPT/scripts/rlcf-prompt.sh`, `rlcf-tune.sh`; paper §4.1): 64 views
at 224 px (the plain view + 63 RandomResizedCrop + flip, no AugMix on the ImageNet family), the
6 (10 %) lowest-entropy views kept, K = 3 sampled classes per view, reward 2.5 · max(cos, 0) of
the reward CLIP minus the mean over the K, AdamW (PyTorch defaults) with weight decay 5e-4;
prompt: 3 steps at lr 7e-3 on the 4 context vectors initialised from "a photo of a" (or the CoOp
checkpoint's ctx); image: 3 steps at lr 1e-5 on the whole visual tower, class prompts
"a_photo_of_a {class}." (the scripts' quirk, `image_prompt_quirk`). Params and optimizer state
are reset for every sample. ImageNet-A and -R are scored in their 200-class label spaces.

Expected results (RLCF project page, policy CLIP ViT-B/16, top-1 %; ImageNet / A / V2 / R /
Sketch / OOD average):

  CLIP-ViT-B/16                  66.73  47.87  60.86  73.98  46.09  57.20
  CLIP-ViT-L/14 (reward model)   73.44  68.82  67.80  85.40  57.84  69.97
  TPT (prompt)                   68.98  54.77  63.45  77.06  47.94  60.81
  TPT + CoOp                     73.61  57.95  66.83  77.27  49.29  62.84
  RLCF (prompt)                  73.23  65.45  69.77  83.35  54.74  68.33
  RLCF + CoOp                    76.05  69.74  70.62  84.51  56.49  70.34
  RLCF-S + CoOp                  76.50  71.11  70.92  84.73  56.97  70.93
  TPT (image encoder)            69.42  61.62  63.70  79.74  49.47  63.63
  RLCF (image encoder)           74.85  73.71  69.77  86.19  57.10  71.69
  RLCF-S                         75.34  75.00  70.08  86.97  57.75  72.45
  RLCF-S-M                       75.48  75.16  70.42  87.23  57.73  72.64

and, in the same harness: CoOp 71.51 / 49.71 / 64.20 / 75.21 / 47.99, CoCoOp 71.02 / 50.63 /
64.07 / 76.18 / 48.75, KD 70.92 / 66.39 / 65.01 / 82.12 / 53.51, pseudo-label 69.11 / 62.15 /
63.56 / 80.03 / 49.45. The OpenAI weights cannot be fetched here, so these are not checked.

Demo (no argument), measured: top-1 on the 500 shifted test images (zero-shot -> TPT -> RLCF;
`--config.seed` sets the pre-fit init and the views): seed 1 0.820 -> 0.838 -> 0.870, seed 2
0.554 -> 0.580 -> 0.630, seed 3 0.770 -> 0.812 -> 0.882 (the clean val split: 1.0 after the
800 pre-fit steps). The reward CLIP's own zero-shot accuracy on the shifted images: seed 1 0.796
(below the policy's 0.820), seed 2 0.854, seed 3 0.860; RLCF gains even at seed 1, as the reward
only re-ranks the policy's top-3 classes of each confident view. CPU time: user 60 s + system
25 s on 2 cores: 1.5 min of wall time with other jobs running (load 4), up to 4.5 min at load 9.
"""
import ml_collections

from configs import common
from jaxprompt.prompts import rlcf

VARIANTS = ("prompt", "image", "prompt_coop")
REWARDS = {1: ("ViT-L/14",), 3: rlcf.RLCF_S_REWARD_ARCHS}
MOMENTUM = dict(momentum=0.9998, update_freq=64, update_w=1.0)  # the scripts' RLCF-S-M buffer


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", variant="prompt", coop_ctx="", rewards=1,
                         momentum=False, batch=16, batched=True, policy="ViT-B/16")
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant={arg.variant!r}: expected one of {VARIANTS}.")
  if arg.rewards not in REWARDS:
    raise ValueError(f"rewards={arg.rewards}: expected 1 (ViT-L/14) or 3 (RLCF-S).")
  if (arg.variant == "prompt_coop") != bool(arg.coop_ctx):
    raise ValueError("variant=prompt_coop needs coop_ctx=<CoOp checkpoint> (RLCF + CoOp), and "
                     f"coop_ctx is only read by it; got variant={arg.variant!r}, "
                     f"coop_ctx={arg.coop_ctx!r}.")
  if not arg.dataset:
    return common.tta_demo()
  if arg.dataset not in common.TTA_IMAGENET:
    raise ValueError(f"dataset={arg.dataset!r}: expected one of {common.TTA_IMAGENET} ('' = the "
                     f"demo; the fine-grained sets are configs/rlcf_finegrained.py).")
  return rlcf_config(dataset=arg.dataset, variant=arg.variant, coop_ctx=arg.coop_ctx,
                     rewards=REWARDS[arg.rewards], momentum=arg.momentum, batch=arg.batch,
                     batched=arg.batched, policy=arg.policy, augmix=False, prompt_steps=3)


def rlcf_config(*, dataset: str, variant: str, coop_ctx: str, rewards: tuple, momentum: bool,
                batch: int, batched: bool, policy: str, augmix: bool,
                prompt_steps: int) -> ml_collections.ConfigDict:
  """A real RLCF run (also configs/rlcf_finegrained.py's): `prompt_steps` 3 on the ImageNet
  family, 5 on the fine-grained sets; the image mode always 3."""
  mode = "image" if variant == "image" else "prompt"
  config = common.tta_base(
      model_name="prompts.rlcf",
      model=dict(variant=policy, vocab_path="", ctx_init="a photo of a",
                 reward_variants=tuple(rewards), reward_weights=()),
      model_init_parts=("model",) + tuple(f"reward_{i}" for i in range(len(rewards))),
      batch_size=batch)
  config.dataset = dataset
  config.pp.eval = common.tta_pp(common.TTA_VIEWS, common.TTA_SIZE, augmix)
  config.evals = ml_collections.ConfigDict(dict(test=common.tta_eval(
      "rlcf", mode=mode, steps=prompt_steps if mode == "prompt" else 3,
      lr=rlcf.DEFAULT_LR[mode], weight_decay=5e-4, top_k=3, selection=0.1,
      ctx_init="a photo of a", coop_ctx=coop_ctx, image_prompt_quirk=True,
      momentum=MOMENTUM if momentum else None, batched=batched)))
  return config
