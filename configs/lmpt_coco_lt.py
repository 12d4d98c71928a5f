"""LMPT (Xia et al., arXiv 2305.04536) on COCO-LT; everything as configs/lmpt_voc_lt.py (its
arguments, recipe, baselines and deviations) except the data and the DB loss settings.

  # Demo (no downloads): the same generated squares as lmpt_voc_lt.py, COCO-LT's loss settings:
  python -m jaxprompt.main --config configs/lmpt_coco_lt.py
  python -m jaxprompt.zeroshot --config configs/lmpt_coco_lt.py           # zero-shot baseline
  python -m jaxprompt.main --config configs/lmpt_coco_lt.py:baseline=finetune
  # The seed's COCO-LT (its data/ folder with coco/: coco_lt_{train,test}.txt,
  # coco_lt_captions.txt, optional class_freq.pkl, train2017/ and val2017/), CLIP ViT-B/16:
  python -m jaxprompt.main --config configs/lmpt_coco_lt.py:data=/path/to/LMPT/data \
      --config.model_init=ViT-B-16.pt --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz

The seed's train.sh for COCO-LT: the README recipe with --loss_function dbl at COCO-LT's settings
(neg_scale 2.0, map γ 0.2); 1,909 train images (29 steps per epoch, 1,450 steps), tested on the
5,000 COCO val2017 images of coco_lt_test.txt (48 of them without labels, kept as the seed keeps
them).

Expected results (the paper, ViT-B/16): COCO-LT mAP 66.19 (RN50 58.97, not runnable here).
"""
from configs import lmpt_voc_lt


def get_config(arg=None):
  return lmpt_voc_lt.lmpt_config("coco_lt", arg)
