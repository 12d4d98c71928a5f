"""ClipCap on COCO (Mokady et al. 2021) as RLCF trains its captioner (Zhao et al., ICLR 2024,
§4.3): a frozen CLIP ViT-B/16, the transformer mapping network, a frozen OPT-125m; see
jaxprompt/prompts/clipcap.py and jaxprompt/evaluators/captioning.py. configs/capdec_coco.py is
the same run trained on text (CapDec).

  # Demo (no downloads): a tiny random CLIP (ViT-mu/8) and OPT ('mu', a vocabulary generated from
  # the captions' words) on the generated captioned shapes; prints the test CIDEr etc. of the
  # untrained model (steps=0) and after training, in one table:
  python -m jaxprompt.main --config configs/clipcap_coco.py --workdir /tmp/clipcap
  # COCO Karpathy (LAVIS's coco_karpathy_*.json beside train2014/ val2014/), OpenAI CLIP and
  # facebook/opt-125m (its folder: config.json, model.safetensors, vocab.json, merges.txt):
  python -m jaxprompt.main --config configs/clipcap_coco.py:dataset=coco,opt=/w/opt-125m \
      --config.dataset_kwargs.root=/data/coco2014 --config.model_init.clip=ViT-B-16.pt \
      --workdir /tmp/clipcap_coco

Arguments: dataset ('' = the demo; coco), opt (the OPT-125m folder: weights and tokenizer),
vocab (CLIP's vocabulary, default bpe_simple_vocab_16e6.txt.gz: CLIP-S, CapDec's text input),
mapping (transformer, prefix 40 | mlp, ClipCap's MLP with prefix 10), steps (the demo's training
steps; 0 evaluates the untrained model),
runlocal.

The recipe is mzhaoshuai/RLCF `caption/scripts/train_clipcap_coco.sh` with `caption/train.py`:
AdamW lr 2e-5 (eps 1e-6, weight decay 0), 5000 linear warm-up steps then a linear decay to 0
(transformers' get_linear_schedule_with_warmup), 10 epochs of the Karpathy train pairs, batch 40,
the normalised CLIP ViT-B/16 image embedding through the transformer mapper (prefix 40, 8 layers),
the mapper alone trained. Images as CLIP preprocesses them (shorter side 224 bicubic, centre crop,
CLIP mean/std), captions as the json has them (`captions='raw'`), at most CAPTION_LENGTH OPT ids
with '</s>' (the original cuts at mean + 10 std of the train lengths, data-derived). The test
split is captioned with 5 beams, 50 new tokens (RLCF `predictions.py`) and scored by
pycocoevalcap (PTB tokenisation, Java).

Expected results (RLCF project page, captioners trained on COCO and tested cross-domain; CIDEr on
NoCaps val in / near / out-domain and Flickr30K Karpathy test):

  |                 | NoCaps in | near | out  | Flickr30K |
  | CapDec          |   62.6    | 54.0 | 31.7 |   37.0    |
  | CapDec + RLCF   |   68.0    | 57.9 | 35.5 |   41.9    |
  | ClipCap         |   76.9    | 73.5 | 54.6 |   49.3    |
  | ClipCap + RLCF  |   84.0    | 79.6 | 63.8 |   56.6    |

  Flickr30K BLEU-4 / SPICE / RefCLIP-S: CapDec 19.3 / 11.7 / 74.1 (+RLCF 20.3 / 12.7 / 75.7),
  ClipCap 21.8 / 13.1 / 76.7 (+RLCF 23.3 / 14.5 / 79.4). RLCF-S: CapDec 68.3 / 58.5 / 35.3; 41.6,
  ClipCap 84.7 / 79.7 / 63.1; 57.8. These need OpenAI's CLIP, OPT-125m and the datasets, which
  cannot be fetched here: not checked. The RLCF rows are test-time adaptation (not this config).

The demo keeps the architecture (CLIP -> normalised embedding -> transformer mapper -> prefix ->
OPT) and the loss at tiny sizes: CLIP 'ViT-mu/8' (16-d embedding), OPT 'mu' (2 layers, width 32)
with a vocabulary generated from the captions' words (`gpt2_tokenizer.write_tiny_vocabulary`),
prefix 8, 2 mapper layers, captions ending with the newline (the decoding EOS, which a random OPT
never learned to emit), 12 new tokens at most, the first 100 test images. Both towers are random:
a random CLIP embeds every image almost alike (cosine 0.99 to the mean embedding), so ClipCap's
demo trains the CLIP image tower, the mapper and the OPT (`trainable_params`; ClipCap's mode
without `--only_prefix` also trains the language model), 600 steps of AdamW lr 3e-3 with the
recipe's linear warm-up (60 steps) and decay. Scores use the Python tokenizer
(`tokenizer='simple'`) and BLEU / ROUGE-L / CIDEr, so no Java is needed. Measured (seed 42, 2 busy
CPU cores, 1.2 min wall for both variants), test CIDEr (pycocoevalcap's fraction; papers print
x100): untrained 0.000, trained 3.858 (BLEU-4 0.604). The templated references are near
duplicates, hence CIDEr far above COCO's range; the captions get the colour right more often
than the size or the position (e.g. "a large red square at the bottom centre" for a small red
square at the top left). configs/capdec_coco.py has CapDec's demo.
"""
import os
import tempfile

import ml_collections

from configs import common
from input_pipeline import embedded_captions, embedded_clip
from jaxprompt.prompts import clipcap

CAPTION_LENGTH = 40  # OPT ids per training caption, '</s>' included (COCO: an estimate, above)
DEMO_CAPTION_LENGTH = 16  # the longest template caption is 11 words + '</s>' + newline
DEMO_STEPS = 600
CLIP_PP = "resize_shorter_side(224, method='bicubic')|center_crop(224)|value_range(0, 1)|" \
          "normalize('clip')"


def demo_vocabulary() -> str:
  """The demo's OPT tokenizer folder (written on first use): every word of the captioned shapes'
  captions one token (`embedded_captions.TEMPLATES` with their colours, sizes and places)."""
  from jaxprompt.models import gpt2_tokenizer  # pylint: disable=g-import-not-at-top
  folder = os.path.join(tempfile.gettempdir(), f"jaxprompt-{os.getuid()}", "opt_shapes_vocab")
  words = [w for t in embedded_captions.TEMPLATES for w in t.split() if "{" not in w]
  words += [*embedded_clip.COLOUR_NAMES, "small", "medium", "large", "top", "bottom", "left",
            "centre", "right"]
  if not os.path.isfile(os.path.join(folder, gpt2_tokenizer.MERGES_FILE)):
    gpt2_tokenizer.write_tiny_vocabulary(folder, words)
  return folder


def captioning_config(mode: str, arg) -> ml_collections.ConfigDict:
  """The ClipCap (mode 'clipcap') or CapDec ('capdec') config of `arg` (module docstring)."""
  tokenizer_path = arg.opt if arg.dataset else demo_vocabulary()
  if arg.mapping not in clipcap.MAPPINGS:
    raise ValueError(f"mapping={arg.mapping!r}: expected one of {clipcap.MAPPINGS}.")
  prefix_length = 40 if arg.mapping == "transformer" else 10  # ClipCap's README: MLP prefix 10
  model = dict(variant="ViT-B/16", vocab_path=arg.vocab, opt_variant="125m",
               tokenizer_path=tokenizer_path, mode=mode, mapping=arg.mapping,
               prefix_length=prefix_length, clip_length=prefix_length, mapper_layers=8,
               noise_variance=clipcap.NOISE_VARIANCE)
  config = common.base_config(model_name="prompts.clipcap", model=model,
                              model_init_parts=("clip", "opt"))
  if arg.dataset:
    if arg.dataset != "coco":
      raise ValueError(f"dataset={arg.dataset!r}: expected 'coco' (or none: the demo).")
    if not arg.opt:
      raise ValueError("dataset=coco needs opt=<the facebook/opt-125m folder> (weights and "
                       "tokenizer).")
    config.model_init.opt = arg.opt
    config.dataset = "coco_karpathy"
    config.dataset_kwargs = ml_collections.ConfigDict(dict(captions="raw"))
    config.train_split, config.num_epochs = "train", 10
    config.batch_size, config.eval_batch_size = 40, 40
    config.optim = common.optimizer("adamw", lr=2e-5, weight_decay=0.0, warmup_steps=5000,
                                    decay="linear")
    train_pp, length, tokenizer = CLIP_PP, CAPTION_LENGTH, "ptb"
    eval_pp, evals = CLIP_PP, dict(type="captioning", split="test")
  else:
    config.model.update(variant="ViT-mu/8", vocab_path=embedded_clip.byte_vocabulary(),
                        opt_variant="mu", opt_vocab_size=demo_vocab_size(tokenizer_path),
                        prefix_length=8, clip_length=8, mapper_layers=2)
    # Random towers: ClipCap's demo trains the image tower too (a random CLIP embeds every image
    # almost alike), CapDec's cannot use it (its training never sees an image).
    config.trainable_params = r"(mapper|opt|clip/visual)/.*" if mode == "clipcap" else \
        r"(mapper|opt)/.*"
    config.dataset = embedded_captions.NAME
    config.dataset_kwargs = ml_collections.ConfigDict(dict(train_pairs=True, limit=100))
    config.train_split = "train"
    config.total_steps = arg.steps if arg.steps > 0 else DEMO_STEPS
    config.batch_size, config.eval_batch_size = 32, 100
    config.optim = common.optimizer("adamw", lr=3e-3, weight_decay=0.0, warmup_steps=60,
                                    decay="linear")
    config.log_every_steps = 100
    config.checkpoint_every_steps = DEMO_STEPS
    if arg.steps == 0:  # the untrained model (the table's 'before')
      config.mode, config.eval_random_init = "eval", True
    if arg.steps < 0:
      config.variants = ("steps=0", f"steps={DEMO_STEPS}")
    # The shapes' class label is no captioning target (the trainer would score it as one).
    train_pp = f"{common.vtab_pp(32, 'clip')}|drop('label')"
    length, tokenizer = DEMO_CAPTION_LENGTH, "simple"
    eval_pp = common.vtab_pp(32, "clip")
    evals = dict(type="captioning", split="test", max_new_tokens=12, tokenizer=tokenizer,
                 metrics=("bleu", "rouge", "cider"))
  config.optim.eps = 1e-6  # caption/train.py's AdamW
  suffix = "" if arg.dataset else "\\n"
  train_pp += f"|opt_tokenize('{tokenizer_path}', length={length}, suffix='{suffix}')"
  if mode == "capdec":  # the caption's CLIP ids: the text embedding CapDec trains on
    train_pp += f"|clip_tokenize('{config.model.vocab_path}', key='captions', max_captions=1)"
  config.pp = ml_collections.ConfigDict(dict(
      image_size=224 if arg.dataset else 32, train=train_pp, eval=eval_pp))
  config.evals = ml_collections.ConfigDict(dict(test=evals))
  if arg.runlocal:
    common.apply_runlocal(config)
  return config


def demo_vocab_size(folder: str) -> int:
  from jaxprompt.models import gpt2_tokenizer  # pylint: disable=g-import-not-at-top
  return gpt2_tokenizer.Tokenizer(folder).vocab_size


def parse(arg):
  return common.parse_arg(arg, dataset="", opt="", vocab="bpe_simple_vocab_16e6.txt.gz",
                          mapping="transformer", steps=-1, runlocal=False)


def get_config(arg=None):
  return captioning_config("clipcap", parse(arg))
