"""CapDec on COCO (Nukrai et al., EMNLP 2022 Findings) as RLCF trains its text-only captioner
(Zhao et al., ICLR 2024, §4.3): the mapper of configs/clipcap_coco.py trained on the normalised
CLIP *text* embedding of each caption plus Gaussian noise (variance 0.016), captioning images
from their CLIP image embedding; see jaxprompt/prompts/clipcap.py.

  # Demo (no downloads; configs/clipcap_coco.py's, trained on the captions' text): prints the test
  # CIDEr etc. of the untrained model (steps=0) and after training:
  python -m jaxprompt.main --config configs/capdec_coco.py --workdir /tmp/capdec
  # COCO Karpathy, OpenAI CLIP ViT-B/16 and facebook/opt-125m:
  python -m jaxprompt.main --config configs/capdec_coco.py:dataset=coco,opt=/w/opt-125m \
      --config.dataset_kwargs.root=/data/coco2014 --config.model_init.clip=ViT-B-16.pt \
      --workdir /tmp/capdec_coco

Arguments and recipe: configs/clipcap_coco.py's (mzhaoshuai/RLCF
`caption/scripts/train_capdec_coco.sh`: the same settings, `--cap_model CapDec` without
`--use_image_embedding`). The train pp spec also CLIP-tokenises each caption ('caption_tokens').

Expected results (RLCF project page; CIDEr on NoCaps val in / near / out-domain and Flickr30K
Karpathy test; the full table with ClipCap is in configs/clipcap_coco.py):

  |                 | NoCaps in | near | out  | Flickr30K |
  | CapDec          |   62.6    | 54.0 | 31.7 |   37.0    |
  | CapDec + RLCF   |   68.0    | 57.9 | 35.5 |   41.9    |

Not checked here (OpenAI's CLIP, OPT-125m and the datasets cannot be fetched).

The demo is configs/clipcap_coco.py's with CapDec's training: the mapper and the OPT learn from
the noisy CLIP text embedding of each caption. Its CLIP is random, so image and text embeddings
are not aligned (the premise of CapDec) and the trained captioner writes nearly one caption
whatever the image: the demo shows the text-only training running end to end, not CapDec's
transfer. Measured (seed 42, 2 busy CPU cores, about 1.2 min wall): test CIDEr untrained 0.000,
trained 1.545 (BLEU-4 0.407), from the templates' shared words.
"""
from configs import clipcap_coco


def get_config(arg=None):
  return clipcap_coco.captioning_config("capdec", clipcap_coco.parse(arg))
