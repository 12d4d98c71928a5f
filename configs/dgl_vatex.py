"""DGL on VATEX: the linear latent space, multi-sentence test retrieval; built by
`configs/dgl_msrvtt.py` (its docstring lists the arguments, methods and the common recipe).

  # Demo (no downloads): the generated moving-shapes clips with 3 caption phrasings per clip,
  # evaluated with VATEX's multi-sentence protocol; DGL beside zero-shot CLIP:
  python -m jaxprompt.main --config configs/dgl_vatex.py
  # The original's run (knightyxp/DGL scripts/vatex.sh):
  python -m jaxprompt.main \
      --config configs/dgl_vatex.py:data=/data/vatex,vocab=bpe_simple_vocab_16e6.txt.gz \
      --config.model_init=ViT-B-32.pt

VATEX's settings (scripts/vatex.sh): linear latent space, lr 5e-3, 10 epochs, contrastive batch
512 (64 x 8 GPUs), 12 frames, 32 tokens. DGL's VATEX loader samples the segment centres for
training too (`dataloaders/dataloader_vatex_retrieval.py`), so `train_sampling='centre'`. Each test
video carries all its English captions (10), every caption a text query (`video_retrieval`'s
multi-sentence protocol, after CLIP4Clip/DGL `eval_epoch`).

Paper: the VATEX table of arXiv 2401.10588 could not be read here (unverified).
"""
from configs import dgl_msrvtt

TEST_CAPTIONS = 10  # English captions per VATEX test video


def get_config(arg=None):
  return dgl_msrvtt.build(arg, dataset="vatex", latent="linear", lr=5e-3, epochs=10, batch=512,
                          words=32, frames=12, train_sampling="centre", captions=TEST_CAPTIONS)
