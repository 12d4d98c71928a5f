"""Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119), shallow and deep, on ViT.

Follows KMnP/vpt `src/models/vit_prompt/vit.py` (`PromptedTransformer`) and
`src/models/vit_models.py` (head) (paper §3.2):

  * after patch + position embedding the sequence is `[CLS, P_1..P_N, patch_1..patch_M]`;
    prompts get no position embedding and pass through prompt dropout;
  * shallow: the N prompt tokens are inserted once, before block 0;
  * deep: before every block i >= 1 the N slots after CLS are *replaced* by that layer's prompts;
  * init U(-v, v), v = sqrt(6 / (3 * p * p + D)) (0.0625 for ViT-B/16);
  * the head is Linear(D -> C) on the final-LayerNorm CLS token, kaiming-normal (fan-out) weight and
    bias -log(99);
  * the backbone runs in eval mode (no dropout) even when training: only prompt dropout is active.

The optional prompt projection (`PROJECT` > -1 in VPT) is not implemented: every published VPT
result uses `PROJECT=-1` (identity).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt import method
from jaxprompt.models import common, vit

# Parameters that train; everything else (the ViT backbone) is frozen.
TRAINABLE_PARAMS = r"prompt_embeddings|deep_prompt_embeddings|head/.*"


def prompt_init_bound(patch_size: int, width: int) -> float:
  """VPT's 'xavier uniform' bound, treating a prompt like a (p, p, 3) patch-embedding fan-in."""
  return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


def uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Model(nn.Module):
  """ViT with VPT prompts. Returns `(logits, {'pre_logits': (B, D)})`."""
  num_classes: int
  variant: str = "B/16"
  num_prompts: int = 10
  deep: bool = True
  prompt_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  def __post_init__(self):
    common.require(self, num_prompts=(self.num_prompts >= 1, "an integer >= 1"),
                   prompt_dropout=(0.0 <= self.prompt_dropout < 1.0, "a rate in [0, 1)"))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    v = vit.decode_variant(self.variant)
    width, depth, n = v["width"], v["depth"], self.num_prompts
    init = uniform_init(prompt_init_bound(v["patch_size"], width))
    shallow = self.param("prompt_embeddings", init, (1, n, width))
    deep = self.param("deep_prompt_embeddings", init, (depth - 1, n, width)) if self.deep else None
    dropout = vit.Dropout(self.prompt_dropout)

    def prompts_for(i, batch):
      p = shallow[0] if i == 0 else deep[i - 1]
      p = jnp.broadcast_to(p.astype(self.dtype), (batch, n, width))
      return dropout(p, deterministic=not train)

    def block_hook(i, block, x):  # x: (B, 1 + M, D) before block 0, (B, 1 + N + M, D) after
      if i == 0:
        x = jnp.concatenate([x[:, :1], prompts_for(0, x.shape[0]), x[:, 1:]], axis=1)
      elif deep is not None:
        x = jnp.concatenate([x[:, :1], prompts_for(i, x.shape[0]), x[:, 1 + n:]], axis=1)
      return block(x)

    tokens = vit.embed_patches(self, images, width=width, patch_size=v["patch_size"],
                               dtype=self.dtype)
    encoder = vit.Encoder(depth, v["mlp_dim"], v["num_heads"], layer_norm_eps=self.layer_norm_eps,
                          dtype=self.dtype, name="Transformer")
    encoded = encoder(tokens, deterministic=True, block_hook=block_hook)
    pre_logits = encoded[:, 0]
    head = nn.Dense(
        self.num_classes, dtype=self.dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        bias_init=nn.initializers.constant(-math.log(99.0)), name="head")
    return head(pre_logits).astype(jnp.float32), {"pre_logits": pre_logits}


def load(init_params, path: str):
  """Loads a ViT checkpoint (Google .npz or Hugging Face) into a VPT param tree."""
  return vit.load(init_params, path, dont_load=(TRAINABLE_PARAMS,))


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS,
                       loaders={"model": method.params_loader(load)})
