"""Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119) on Swin, shallow and deep.

Follows KMnP/vpt `src/models/vit_prompt/swin_transformer.py` (`PromptedSwinTransformer`,
`PromptedSwinTransformerBlock`, `PromptedWindowAttention`, `PromptedPatchMerging`, location
"prepend") and `src/models/vit_models.py` (head) (VPT paper §3.2 and appendix); the ViT version is `vpt.py`.

  * P prompt tokens of width 128 are put in front of the 56*56 patch tokens after the patch
    embedding; init U(-v, v), v = sqrt(6 / (3 * 4 * 4 + 128)), the same v at every stage;
  * in every block the prompts pass norm1 with the tokens, then the same P prompts lead each
    window's attention (zero relative position bias and no shift mask for their rows and columns)
    and their outputs are averaged over the windows; residuals and MLP run on the whole sequence
    (`swin.SwinBlock(prompts=...)`);
  * patch merging: a prompt is concatenated with three copies of itself (C -> 4C) and goes
    through the same LN(4C) and reduction (`swin.PatchMerging(prompts=...)`);
  * deep: before every block except the first of stage 0 the prompts are replaced by that block's
    `deep_prompt_embeddings_{stage}` row (shapes (depth_0 - 1, P, 128), (depth_s, P, 128 * 2^s));
  * final LN over all tokens, prompts included, mean over them, then the head: Linear(1024 -> C),
    kaiming-normal (fan-out) weight, bias -log(99);
  * the backbone stays in eval mode even in training (no stochastic depth, although VPT's builder
    sets 0.5): only prompt dropout is live. As in the original, the shallow prompts get a dropout
    draw per sample, a deep table one draw shared by the batch (dropout before the expand).

Deliberate deviation: the original pairs windows and prompts in mismatched orders (windows are
batch-major, the expanded prompts window-major, and the window average is taken in the prompts'
order), so for batch size > 1 a sample's prompts mix in other samples' windows and every output
depends on the rest of the batch. Here each sample's prompts see and average that sample's windows
only; at batch size 1 both agree.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxprompt import method
from jaxprompt.models import common, swin
from jaxprompt.prompts import vpt

# Parameters that train; everything else (the Swin backbone) is frozen.
TRAINABLE_PARAMS = r"prompt_embeddings|deep_prompt_embeddings_\d+|head/.*"


class PromptedStage(swin.Stage):
  """`swin.Stage` carrying (B, P, C) prompts through its blocks and patch merging.

  `deep_prompts[j]`, where given, replaces the prompts before block j. Returns
  `((x, prompts), (x, prompts) before merging)`.
  """

  @nn.compact
  def __call__(self, x, prompts, *, deep_prompts=None, deterministic: bool = True):
    for j in range(self.depth):
      if deep_prompts is not None and j in deep_prompts:
        prompts = deep_prompts[j]
      x, prompts = self.make_block(j)(x, prompts=prompts, deterministic=deterministic)
    if not self.downsample:
      return (x, prompts), (x, prompts)
    return swin.PatchMerging(self.dtype, name="downsample")(x, prompts=prompts), (x, prompts)


class Model(swin.Model):
  """Swin with VPT prompts. Returns `(logits, aux)`; aux: `pre_logits` (B, C_last), `stages`
  and `prompts` (each stage's map and prompts before merging)."""
  num_prompts: int = 10
  deep: bool = True
  prompt_dropout: float = 0.0

  def __post_init__(self):
    common.require(self, num_prompts=(self.num_prompts >= 1, "an integer >= 1"),
                   prompt_dropout=(0.0 <= self.prompt_dropout < 1.0, "a rate in [0, 1)"))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    v = swin.decode_variant(self.variant)
    depths, width, n = v["depths"], v["embed_dim"], self.num_prompts
    swin.check_image_size(*images.shape[1:3], patch_size=self.patch_size,
                          num_stages=len(depths), window_size=self.window_size)
    init = vpt.uniform_init(vpt.prompt_init_bound(self.patch_size, width))
    dropout = nn.Dropout(self.prompt_dropout)

    x = self.make_patch_embed()(images)  # (B, H/4, W/4, 128)
    batch = x.shape[0]
    shallow = self.param("prompt_embeddings", init, (1, n, width))
    prompts = dropout(jnp.broadcast_to(shallow.astype(self.dtype), (batch, n, width)),
                      deterministic=not train)
    stages, stage_prompts = [], []
    for i, depth in enumerate(depths):
      deep, first = None, int(i == 0)  # stage 0's first block keeps the shallow prompts
      if self.deep and depth > first:
        table = self.param(f"deep_prompt_embeddings_{i}", init, (depth - first, n, width * 2 ** i))
        table = dropout(table.astype(self.dtype), deterministic=not train)
        deep = {j: jnp.broadcast_to(table[j - first], (batch, n, width * 2 ** i))
                for j in range(first, depth)}
      (x, prompts), features = self.make_stage(i, PromptedStage)(
          x, prompts, deep_prompts=deep, deterministic=True)
      stages.append(features[0])
      stage_prompts.append(features[1])
    tokens = jnp.concatenate([prompts, x.reshape(batch, -1, x.shape[-1])], axis=1)
    encoded = nn.LayerNorm(epsilon=swin.LAYER_NORM_EPS, dtype=self.dtype, name="norm")(tokens)
    pre_logits = encoded.mean(axis=1)  # (B, 1024), prompts included
    head = nn.Dense(
        self.num_classes, dtype=self.dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        bias_init=nn.initializers.constant(-math.log(99.0)), name="head")
    return head(pre_logits).astype(jnp.float32), {
        "pre_logits": pre_logits, "stages": tuple(stages), "prompts": tuple(stage_prompts)}


def load(init_params, path: str):
  """Loads a Swin checkpoint (Microsoft .pth or transformers) into a VPT-Swin param tree."""
  return swin.load(init_params, path, dont_load=(TRAINABLE_PARAMS,))


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS,
                       loaders={"model": method.params_loader(load)})
