"""RLCF test-time adaptation of a captioner (Zhao et al., ICLR 2024, §4.3): ClipCap or CapDec
trained on COCO, adapted per test image on Flickr30K or NoCaps with a CLIP reward; see
jaxprompt/prompts/rlcf_captioning.py and jaxprompt/evaluators/tta_captioning.py.

  # Demo (no downloads): ClipCap's embedded demo (configs/clipcap_coco.py) pre-fit together with a
  # tiny reward CLIP, then every test image adapted; prints CIDEr etc. before ('zeroshot_') and
  # after RLCF:
  python -m jaxprompt.main --config configs/rlcf_captioning.py --workdir /tmp/rlcf_cap
  # COCO -> Flickr30K Karpathy test with a ClipCap run of this library (configs/clipcap_coco.py),
  # OpenAI CLIP ViT-B/16 (policy) and ViT-L/14 (reward), facebook/opt-125m:
  python -m jaxprompt.main --config configs/rlcf_captioning.py:target=flickr,opt=/w/opt-125m \
      --config.dataset_kwargs.root=/data/flickr30k --config.model_init.clip=ViT-B-16.pt \
      --config.model_init.captioner=/tmp/clipcap_coco --config.model_init.reward_0=ViT-L-14.pt \
      --workdir /tmp/rlcf_cap_flickr
  # COCO -> NoCaps val, scored per domain (in / near / out), CapDec:
  python -m jaxprompt.main --config configs/rlcf_captioning.py:target=nocaps,captioner=capdec,\
opt=/w/opt-125m --config.dataset_kwargs.root=/data/nocaps ...

Arguments: target ('' = the demo; flickr | nocaps), captioner (clipcap | capdec: which mapper
`model_init.captioner` holds and which script's K and lr apply), opt (the OPT-125m folder: weights
and tokenizer), vocab (CLIP's vocabulary), rlcf_s (three reward CLIPs, RLCF-S: model_init parts
reward_0..2 = ViT-L/14@336px, RN50x64, ViT-L/14), runlocal.

The settings are mzhaoshuai/RLCF `caption/scripts/tta_{clipcap,capdec}_{c2f,c2n}.sh` (case 01;
case 02 with rlcf_s): 4 steps of AdamW (eps 1e-6, weight decay 0) on the mapper, K beams sampled
per step (ClipCap K 10 lr 2e-6; CapDec K 6, lr 5e-6 on Flickr30K and 3e-6 on NoCaps), reward
ViT-L/14's CLIP-S minus the mean, the final caption a 5-beam search, lower-cased, the mapper and
optimizer reset after each image. Images as CLIP preprocesses them (224, bicubic, centre crop);
test_batch_size images adapt at once (each its own mapper copy). The real runs are `mode='eval'`.

Expected results (RLCF project page; CIDEr on NoCaps val in / near / out-domain and Flickr30K
Karpathy test):

  |                 | NoCaps in | near | out  | Flickr30K |
  | CapDec          |   62.6    | 54.0 | 31.7 |   37.0    |
  | CapDec + RLCF   |   68.0    | 57.9 | 35.5 |   41.9    |
  | CapDec + RLCF-S |   68.3    | 58.5 | 35.3 |   41.6    |
  | ClipCap         |   76.9    | 73.5 | 54.6 |   49.3    |
  | ClipCap + RLCF  |   84.0    | 79.6 | 63.8 |   56.6    |
  | ClipCap + RLCF-S|   84.7    | 79.7 | 63.1 |   57.8    |

  Flickr30K BLEU-4 / SPICE / RefCLIP-S: CapDec 19.3 / 11.7 / 74.1 -> RLCF 20.3 / 12.7 / 75.7;
  ClipCap 21.8 / 13.1 / 76.7 -> RLCF 23.3 / 14.5 / 79.4. These need OpenAI's CLIPs, OPT-125m, a
  COCO-trained captioner and the datasets, which cannot be fetched here: not checked.

The demo is configs/clipcap_coco.py's ClipCap demo (tiny random CLIP 'ViT-mu/8' and OPT 'mu',
600 steps on the generated captioned shapes) with the reward CLIP TTA_DEMO_REWARD ('ViT-mu/4')
pre-fit alongside it by CLIP's contrastive loss on the same (image, caption) pairs; then the first
DEMO_TEST_IMAGES test images are adapted. RLCF keeps the script's K 10 and 4 steps, with 12 new
tokens at most and lr DEMO_LR (2e-6 leaves a tiny mapper's captions unchanged); scores by the
Python tokenizer (no Java). The demo's captioner says "bottom centre" for most images; the
adaptation moves captions towards what the reward CLIP sees (size and half). The test split is not
shifted: with the 'zoom_out' shift of the retrieval demo the adapted captions call the shrunken
squares "small" while the references, written from the clean scene, say "medium" / "large", and
CIDEr falls although CLIP-S rises (seed 42: CIDEr 3.45 -> 2.97, CLIP-S 0.35 -> 0.86).

Measured (60 test images; 62 s wall on the idle 2-core CPU, about 4 min on a busy one):

  seed 42  CIDEr 3.74 -> 4.61  BLEU-4 0.596 -> 0.653  CLIP-S 1.09 -> 1.31  (reward top-1 0.45)
  seed 7   CIDEr 3.51 -> 2.79  BLEU-4 0.463 -> 0.401  CLIP-S 1.03 -> 1.05  (reward top-1 0.20)

where "reward top-1" is how often the reward CLIP ranks an image's own first reference first
among the 60 images' (near-duplicate references count as misses). RLCF follows its reward: with
the better pre-fit reward (seed 42) the captions gain; with the weaker one (seed 7) they lose, at
any lr tried (3e-4: CIDEr 3.44, 3e-3: 2.09). CLIP-S here is the evaluator's, with the "A photo
depicts" prefix, so it is not the reward itself.
"""
import ml_collections

from configs import clipcap_coco, common
from jaxprompt.prompts import clipcap, rlcf, rlcf_captioning

TARGETS = {"flickr": ("flickr30k_karpathy", ("test",)),
           "nocaps": ("nocaps", ("in-domain", "near-domain", "out-domain"))}
DEMO_TEST_IMAGES = 60
DEMO_LR = 1e-3
DEMO_MAX_NEW_TOKENS = 12


def tta_eval(split: str, num_samples: int, lr: float, **settings) -> dict:
  """One 'tta_captioning' evaluator: K = num_samples, lr, the scripts' 4 steps."""
  return dict(type="tta_captioning", split=split, num_samples=num_samples, lr=lr,
              steps=rlcf_captioning.STEPS, **settings)


def get_config(arg=None):
  arg = common.parse_arg(arg, target="", captioner="clipcap", opt="",
                         vocab="bpe_simple_vocab_16e6.txt.gz", rlcf_s=False, runlocal=False)
  if arg.target and arg.target not in TARGETS:
    raise ValueError(f"target={arg.target!r}: expected one of {sorted(TARGETS)} (or none: the "
                     "demo).")
  if arg.captioner not in clipcap.MODES:
    raise ValueError(f"captioner={arg.captioner!r}: expected one of {clipcap.MODES}.")
  reward_variants = rlcf.RLCF_S_REWARD_ARCHS if arg.rlcf_s else ("ViT-L/14",)
  if arg.target:
    if not arg.opt:
      raise ValueError(f"target={arg.target} needs opt=<the facebook/opt-125m folder> (weights "
                       "and tokenizer).")
    model = clipcap_coco.captioning_config(arg.captioner, clipcap_coco.parse(
        f"dataset=coco,opt={arg.opt},vocab={arg.vocab}")).model.to_dict()
    config = common.tta_base(
        model_name="prompts.rlcf_captioning",
        model={**model, "reward_variants": reward_variants},
        model_init_parts=("clip", "opt", "captioner", "reward_0", "reward_1", "reward_2"),
        batch_size=16)  # capdec_tta.py's test loader
    config.model_init.opt = arg.opt
    name, splits = TARGETS[arg.target]
    config.dataset = name
    config.dataset_kwargs = ml_collections.ConfigDict(
        dict(splits=splits, captions="raw") if arg.target == "flickr" else {})
    config.pp.eval = clipcap_coco.CLIP_PP
    num_samples, lr = rlcf_captioning.SCRIPT_SETTINGS[arg.captioner, arg.target]
    config.evals = ml_collections.ConfigDict({
        split: tta_eval(split, num_samples, lr) for split in splits})
  else:
    config = clipcap_coco.captioning_config("clipcap", clipcap_coco.parse(
        f"steps={clipcap_coco.DEMO_STEPS}"))
    config.model_name = "prompts.rlcf_captioning"
    config.model.reward_variants = (common.TTA_DEMO_REWARD,)
    config.trainable_params = r"(mapper|opt|clip/visual|reward_\d+)/.*"
    config.pp.train += (f"|clip_tokenize('{config.model.vocab_path}', key='captions', "
                        f"max_captions=1)")
    config.dataset_kwargs.update(limit=DEMO_TEST_IMAGES)
    config.eval_batch_size = DEMO_TEST_IMAGES // 2
    config.evals = ml_collections.ConfigDict(dict(test=tta_eval(
        "test", 10, DEMO_LR, max_new_tokens=DEMO_MAX_NEW_TOKENS, tokenizer="simple",
        metrics=("bleu", "rouge", "cider"))))
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
