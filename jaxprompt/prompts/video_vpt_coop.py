"""Separate visual and text prompts for text-video retrieval: VPT-deep in CLIP's image tower (per
frame) and CoOp's learned context in its text tower, on a frozen CLIP pooled as CLIP4Clip-meanP.

The baseline that DGL (Yang et al., AAAI 2024, arXiv 2401.10588, §1 and Fig. 1) argues against:
each modality tuned with its own prompts, no shared latent space, no global video prompts, frames
encoded independently. Neither DGL (knightyxp/DGL) nor CLIP4Clip ships code for it (the VPT and
UPT numbers of DGL's Fig. 1 come from earlier papers), so this is our construction from the two
originals:

  * images: VPT-deep, KMnP/vpt `src/models/vit_prompt/vit.py` (`PromptedTransformer`, DEEP=True;
    paper §3.2): `num_visual_prompts` tokens inserted after the class token before block 0 and
    replaced by the next layer's before every later block, no position embedding, init U(-v, v)
    with v = sqrt(6 / (3 p² + D)) (p the patch size: 0.0395 for ViT-B/32), prompt dropout 0 (VPT's
    default `PROMPT.DROPOUT`, and DGL's). CLIP's ViT has `ln_pre` after the position embedding;
    the prompts go in after it, as DGL's frame prompts do. Every frame gets the same prompts;
    the frame features are pooled by CLIP4Clip's meanP (`clip4clip.py`).
  * text: CoOp, KaiyangZhou/CoOp `trainers/coop.py` (`PromptLearner`, paper §3.2):
    `num_text_prompts` context vectors shared by every caption, right after SOT:
    [SOT][ctx_1..ctx_M][caption words][EOT][pad]; positional embeddings are added to every
    position (as to CoOp's 'X' placeholders), the feature is read at the shifted EOT, init
    N(0, 0.02²) (`coop.PromptLearner`, the context `prompt_learner/ctx`). Shallow, as CoOp.
  * similarity, loss and recipe slots as every video-text method (`clip4clip.py`); CLIP, logit
    scale included, is frozen.

Defaults: 4 visual prompts per layer, DGL's local (frame) prompt count N_l; 4 text context
vectors, the number of DGL's per-layer text prompts that reach its output (its 4 postfix prompts
sit after every EOT under the causal mask). 0 turns either side off: `num_text_prompts=0` is VPT
alone (DGL's "VPT" comparator), `num_visual_prompts=0` CoOp alone, both 0 plain CLIP4Clip-meanP
(then nothing trains). Trainable at ViT-B/32: 12 x 4 x 768 + 4 x 512 = 38,912 parameters.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxprompt import method
from jaxprompt.models import common
from jaxprompt.prompts import clip4clip, coop, vpt

# Parameters that train; everything else (CLIP, logit scale included) is frozen.
TRAINABLE_PARAMS = r"visual_prompts|prompt_learner/ctx"


class Model(clip4clip.Model):
  """CLIP4Clip-meanP with VPT-deep frame prompts and CoOp caption context. Params: `clip/...`
  (frozen), `visual_prompts` (image layers, num_visual_prompts, vision width) and
  `prompt_learner/ctx` (num_text_prompts, text width), each present when its count is > 0."""
  num_visual_prompts: int = 4
  num_text_prompts: int = 4

  def __post_init__(self):
    common.require(self, num_visual_prompts=(self.num_visual_prompts >= 0, "an integer >= 0"),
                   num_text_prompts=(self.num_text_prompts >= 0, "an integer >= 0"))
    super().__post_init__()

  def setup(self):
    super().setup()
    tower = self.clip
    if self.num_visual_prompts:
      if tower.is_resnet:
        raise ValueError(f"num_visual_prompts={self.num_visual_prompts}: VPT prompts need a ViT "
                         f"image tower; CLIP {self.variant!r} has a ResNet one (set 0).")
      bound = vpt.prompt_init_bound(tower.vision_patch_size, tower.vision_width)
      self.visual_prompts = self.param(
          "visual_prompts", vpt.uniform_init(bound),
          (tower.vision_layers, self.num_visual_prompts, tower.vision_width))
    if self.num_text_prompts:
      self.prompt_learner = coop.PromptLearner((coop.ContextBlock("ctx", self.num_text_prompts),),
                                               num_classes=1)

  def frame_block_hook(self):
    """VPT-deep: the prompts of layer i after the class token of every frame before block i
    (inserted before block 0, replacing the previous layer's after it)."""
    if not self.num_visual_prompts:
      return None
    prompts, count = self.visual_prompts, self.num_visual_prompts

    def insert_prompts(i, block, x):  # x: (F, 1 + M, D) before block 0, (F, 1 + N + M, D) after
      layer_prompts = jnp.broadcast_to(prompts[i].astype(x.dtype),
                                       (x.shape[0],) + prompts.shape[1:])
      patches = x[:, 1:] if i == 0 else x[:, 1 + count:]
      return block(jnp.concatenate([x[:, :1], layer_prompts, patches], axis=1))

    return insert_prompts

  def caption_embeddings(self, caption_tokens):
    """[SOT][ctx][words][EOT][pad]: (N, L + num_text_prompts, W) and the shifted EOT positions."""
    if not self.num_text_prompts:
      return super().caption_embeddings(caption_tokens)
    count, (num, length) = self.num_text_prompts, caption_tokens.shape
    if length + count > self.clip.context_length:
      raise ValueError(f"Captions of {length} tokens plus {count} context vectors exceed CLIP's "
                       f"context length {self.clip.context_length}: tokenize captions to at most "
                       f"{self.clip.context_length - count} tokens.")
    ids = jnp.concatenate([caption_tokens[:, :1], jnp.zeros((num, count), caption_tokens.dtype),
                           caption_tokens[:, 1:]], axis=1)  # context slots hold id 0
    context_index = np.full((1, length + count), -1, np.int32)
    context_index[0, 1:1 + count] = np.arange(count)
    embeddings = self.prompt_learner(self.clip.embed_tokens(ids), context_index)
    return embeddings, jnp.argmax(ids, axis=-1)


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, inputs=("video", "caption_tokens"),
                       make_loss=clip4clip.make_loss, predict_fns=clip4clip.video_text_predict_fns,
                       loaders={"model": coop.load_clip})
