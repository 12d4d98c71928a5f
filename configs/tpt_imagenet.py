"""TPT (Shu et al., NeurIPS 2022, azshue/TPT): test-time prompt tuning of CLIP by marginal-entropy
minimisation over the confident augmented views of each test image, on ImageNet and its shifted
variants; see jaxprompt/prompts/tpt.py and jaxprompt/evaluators/tta.py.

  # Demo (no downloads, 1.5-2.5 min on 2 CPU cores; the same run as configs/rlcf_imagenet.py's):
  # a tiny policy CLIP (ViT-mu/8) and a different tiny reward CLIP (ViT-mu/4) pre-fit on the clean
  # generated named shapes, then TPT and RLCF adapt on each image of a shifted test split (shapes
  # shrunk and dulled): 'tpt/accuracy' and 'rlcf/accuracy' against 'tpt/zeroshot_accuracy':
  python -m jaxprompt.main --config configs/tpt_imagenet.py
  # TPT on ImageNet-A (`scripts/test_tpt.sh`), OpenAI's CLIP ViT-B/16 (TFDS data in data_dir):
  python -m jaxprompt.main --config configs/tpt_imagenet.py:dataset=imagenet_a \
      --config.model_init.model=ViT-B-16.pt \
      --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz --config.data_dir=$TFDS
  # TPT + CoOp (TPT's --load): coop_ctx=<CoOp ImageNet 16-shot n_ctx=4 checkpoint>
  # TPT's README numbers use RN50: policy=RN50 --config.model_init.model=RN50.pt
  # RLCF's TPT image-encoder baseline (`TPT/scripts/tpt-tune.sh`): mode=image

Arguments: dataset ('' = the demo; imagenet/val, imagenet_a, imagenet_v2, imagenet_r,
imagenet_sketch), mode (prompt | image), coop_ctx (a CoOp checkpoint whose ctx initialises the
prompt), policy (the CLIP: ViT-B/16, RN50, ...), batch (test samples adapted at once; 1 is the
original's loop, any B gives the same numbers), batched (vmap the batch or loop over it).

The recipe is TPT's (`tpt_classification.py`, `scripts/test_tpt.sh`; paper §3.2, §4): 64 views
at 224 px (the plain view + 63 RandomResizedCrop + flip; no AugMix on the ImageNet family), the
6 (10 %) lowest-entropy views kept, the marginal entropy of their mean prediction minimised by one
AdamW step (lr 5e-3, PyTorch's default weight decay 0.01) on the 4 context vectors initialised from
"a photo of a", then view 0 classified; params and optimizer state reset for every sample. The
image mode tunes the visual tower for 3 steps at lr 1e-5, weight decay 5e-4, on the class prompts
"a_photo_of_a {class}." (RLCF's script quirk, `image_prompt_quirk`). ImageNet-A and -R are scored
in their 200-class label spaces.

Expected results (top-1 %; ImageNet / A / V2 / R / Sketch; TPT README for RN50, RLCF Table 1 for
ViT-B/16 with the OOD average of A, V2, R, Sketch):

  RN50      CLIP          58.16  21.83  51.41  56.15  33.37
            TPT           60.74  26.67  54.70  59.11  35.09
            TPT + CoOp    64.73  30.32  57.83  58.99  35.86
            TPT + CoCoOp  62.93  27.40  56.60  59.88  35.43
  ViT-B/16  CLIP          66.73  47.87  60.86  73.98  46.09  (57.20)
            TPT           68.98  54.77  63.45  77.06  47.94  (60.81)
            TPT + CoOp    73.61  57.95  66.83  77.27  49.29  (62.84)
            TPT (image)   69.42  61.62  63.70  79.74  49.47  (63.63)

The OpenAI weights cannot be fetched here, so these are not checked. TPT + CoCoOp (a per-sample
CoCoOp meta-net context) is not implemented.

Demo (no argument): the same run as configs/rlcf_imagenet.py's; its docstring has the measured
numbers (seed 1: zero-shot 0.820, TPT 0.838, RLCF 0.870).
"""
import ml_collections

from configs import common
from jaxprompt.prompts import tpt

MODES = tpt.MODES


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", mode="prompt", coop_ctx="", policy="ViT-B/16",
                         batch=16, batched=True)
  if arg.mode not in MODES:
    raise ValueError(f"mode={arg.mode!r}: expected one of {MODES}.")
  if arg.coop_ctx and arg.mode != "prompt":
    raise ValueError(f"coop_ctx initialises the prompt context; mode={arg.mode!r} tunes the "
                     f"visual tower.")
  if not arg.dataset:
    return common.tta_demo()
  if arg.dataset not in common.TTA_IMAGENET:
    raise ValueError(f"dataset={arg.dataset!r}: expected one of {common.TTA_IMAGENET} ('' = the "
                     f"demo; TPT on the fine-grained sets: configs/rlcf_finegrained.py:"
                     f"method=tpt).")
  return tpt_config(dataset=arg.dataset, mode=arg.mode, coop_ctx=arg.coop_ctx, policy=arg.policy,
                    batch=arg.batch, batched=arg.batched, augmix=False)


def tpt_config(*, dataset: str, mode: str, coop_ctx: str, policy: str, batch: int,
               batched: bool, augmix: bool) -> ml_collections.ConfigDict:
  """A real TPT run (also configs/rlcf_finegrained.py's method=tpt): `tpt.MODE_DEFAULTS`' steps,
  lr and weight decay of `mode`."""
  config = common.tta_base(
      model_name="prompts.tpt", model=dict(variant=policy, vocab_path="", ctx_init="a photo of a"),
      model_init_parts=("model",), batch_size=batch)
  config.dataset = dataset
  config.pp.eval = common.tta_pp(common.TTA_VIEWS, common.TTA_SIZE, augmix)
  config.evals = ml_collections.ConfigDict(dict(test=common.tta_eval(
      "tpt", mode=mode, **tpt.MODE_DEFAULTS[mode], selection=tpt.SELECTION,
      ctx_init="a photo of a", coop_ctx=coop_ctx, image_prompt_quirk=True, batched=batched)))
  return config
