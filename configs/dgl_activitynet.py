"""DGL on ActivityNet Captions (paragraph-to-video retrieval, val_1): the linear latent space with
64 frames and 64-token paragraphs; built by `configs/dgl_msrvtt.py` (its docstring lists the
arguments, methods and the recipe).

  # Demo (no downloads): the generated moving-shapes clips, DGL beside zero-shot CLIP:
  python -m jaxprompt.main --config configs/dgl_activitynet.py
  # The original's run (knightyxp/DGL scripts/activitynet.sh):
  python -m jaxprompt.main \
      --config configs/dgl_activitynet.py:data=/data/anet,vocab=bpe_simple_vocab_16e6.txt.gz \
      --config.model_init=ViT-B-32.pt

ActivityNet's settings (scripts/activitynet.sh): linear latent space (the script's; the released
checkpoint is the transformer one: latent=transformer), lr 1e-2, 10 epochs, contrastive batch 128
(16 x 8 GPUs), 64 frames (TSN segments for training), paragraphs of 64 tokens (all of a video's
sentences joined, the whole video one clip; input_pipeline/video_retrieval.py). The demo keeps
the demo's 8 frames and 32 tokens (its captions are short).

Paper: the ActivityNet table of arXiv 2401.10588 could not be read here (unverified).
"""
from configs import dgl_msrvtt


def get_config(arg=None):
  return dgl_msrvtt.build(arg, dataset="activitynet", latent="linear", lr=1e-2, epochs=10,
                          batch=128, words=64, frames=64)
