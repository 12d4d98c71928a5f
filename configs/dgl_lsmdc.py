"""DGL on LSMDC (LSMDC16 training clips, the 1000-clip challenge test): the linear latent space;
built by `configs/dgl_msrvtt.py` (its docstring lists the arguments, methods and the recipe).

  # Demo (no downloads): the generated moving-shapes clips, DGL beside zero-shot CLIP:
  python -m jaxprompt.main --config configs/dgl_lsmdc.py
  # The original's run (knightyxp/DGL scripts/lsmdc.sh):
  python -m jaxprompt.main \
      --config configs/dgl_lsmdc.py:data=/data/lsmdc,vocab=bpe_simple_vocab_16e6.txt.gz \
      --config.model_init=ViT-B-32.pt

LSMDC's settings (scripts/lsmdc.sh): linear latent space, lr 1e-2, 10 epochs, contrastive batch
512 (64 x 8 GPUs), 12 frames (TSN segments for training), 32 tokens.

Paper: the LSMDC table of arXiv 2401.10588 could not be read here (unverified).
"""
from configs import dgl_msrvtt


def get_config(arg=None):
  return dgl_msrvtt.build(arg, dataset="lsmdc", latent="linear", lr=1e-2, epochs=10, batch=512,
                          words=32, frames=12)
