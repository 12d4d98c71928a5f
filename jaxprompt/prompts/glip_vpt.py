"""VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119, §3.2) in the Swin backbone
of a frozen GLIP: the visual-prompt baseline of SDPT (ECCV 2024, arXiv 2407.11414, §4).

Follows wuyongjianCODE/SDPT `maskrcnn_benchmark/modeling/backbone/swint.py` (`build_swint_backbone`:
`vpt_only > 0` builds `PromptedSwinTransformer` of `backbone/vpt_version_ori_swin_transformer.py`,
the release's copy of KMnP/vpt `src/models/vit_prompt/swin_transformer.py`) with the `MODEL.PROMPT`
defaults of `maskrcnn_benchmark/config/defaults.py` (NUM_TOKENS 100, LOCATION 'prepend',
INITIATION 'random', PROJECT -1, DROPOUT 0.0, DEEP False). The prompt machinery is VPT-Swin's
own (`prompts/vpt_swin.py`, `PromptedStage`), run inside GLIP's detection Swin
(`models/glip/backbone.py`, `SwinBody(prompts=...)`):

  * P = `num_prompts` prompt tokens of the Swin width D (192 on GLIP-L, 96 on GLIP-T) are put in
    front of the patch tokens after the patch embedding and its norm; init U(-v, v) with
    v = sqrt(6 / (3 * 4 * 4 + D)), the same v for every table (params `prompt_embeddings` (1, P, D),
    and with `deep` `deep_prompt_embeddings_{i}`: (depth_0 - 1, P, D), (depth_i, P, D * 2^i));
  * in every block the prompts pass norm1 with the tokens, lead each window's attention (zero
    relative position bias and no shift mask for their rows and columns) and their outputs are
    averaged over the windows; residuals and MLP run on the whole sequence; patch merging
    concatenates a prompt with three copies of itself (C -> 4C) into the same LN and reduction;
  * deep: before every block but the first of stage 0 the prompts are replaced by that block's
    row of the stage's table;
  * prompt dropout (`prompt_dropout`, DROPOUT 0.0): one draw per sample for the shallow prompts, one
    per deep table (dropout before the batch expand), as VPT;
  * `PromptedSwinTransformer.train` keeps the whole Swin body in eval mode: no stochastic depth
    there in training; the FPN (DropBlock), BERT and the head keep GLIP's train mode.

`deep` (default True) is the VPT-deep baseline the SDPT comparison names; `deep=False` is
VPT-shallow, the only setting the release's GLIP branch runs (with DEEP True its
`forward_features` returns a pooled vector, which the FPN cannot take).

Deliberate deviations (the release's GLIP branch of `forward_features` is not reproduced):
  * it returns as C2..C5 the patch embedding and the maps after the patch merging of stages 0..2
    (so C3 is the merged stage-0 output and stage 3 never reaches the FPN), without GLIP's output
    norms norm1..3 (commented out there, so their checkpoint weights are not loaded), each cut as
    `x[:, :-100]`, which keeps the 100 prompt tokens (they lead the sequence) as map positions and
    drops the last 100 patch tokens. Here the prompts stay apart and C3..C5 are GLIP's (stage
    outputs before merging, through norm1..3).
  * its patch embedding accepts 800 x 800 images only, its blocks do not pad (no window of GLIP-L
    (12) or GLIP-T (7) tiles the 200 x 200 map) and it hard-codes the width 192: here GLIP's
    detection Swin pads each block's map to the window, and any image whose sides are multiples of
    32 works (GLIP's size_divisibility; VPT's prompted merging does not pad odd sides).
  * each sample's prompts see and average that sample's windows only (VPT pairs windows and prompts
    across the batch; `prompts/vpt_swin.py`); at batch size 1, the release's, both agree.
Not neutral at any init: zero prompts still take part in every window's softmax, so a VPT model
never computes plain GLIP.

What trains: `PROMPTS` (the default) the prompt tables alone; at P = 100 (`jax.eval_shape`), deep:
441,600 on GLIP-T (9,600 shallow + 432,000 deep; 0.19 % of its 231.8 M) and 1,804,800 on GLIP-L
(19,200 + 1,785,600; 0.42 % of its 430.4 M); shallow: 9,600 / 19,200.
The release's switches cannot say more: SDPT's README command (`FROZEE_SWINT True`) sets
requires_grad False on every backbone parameter whose name lacks 'adapter', the prompts included,
so its VPT runs must have used other switches, which it does not give. `PROMPTS_AND_HEAD` adds the
DyHead outside the fusion blocks, what SDPT's own command trains besides its prototypes
(`froze_fuse 1`), for a comparison in that recipe.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxprompt.models import common
from jaxprompt.models.glip import detector
from jaxprompt.prompts import glip_finetune, vpt, vpt_swin

PROMPTS = r"prompt_embeddings|deep_prompt_embeddings_\d+"
PROMPTS_AND_HEAD = PROMPTS + "|" + detector.HEAD_OUTSIDE_FUSION
TRAINABLE_SETS = {"vpt": PROMPTS, "vpt_and_head": PROMPTS_AND_HEAD}
NUM_TOKENS = 100  # MODEL.PROMPT.NUM_TOKENS, the release's default


def expand_prompts(shallow, tables: dict, depths, batch: int):
  """The Swin body's prompt inputs from VPT's tables: shallow (1, P, D) -> (B, P, D) prompts, and
  per stage i {block j: (B, P, D_i)} from `tables[i]` ((depth_i - 1, P, D) for stage 0, whose
  first block keeps the shallow prompts; (depth_i, P, D_i) else), None where `tables` has none."""
  prompts = jnp.broadcast_to(shallow, (batch,) + shallow.shape[1:])
  deep = []
  for i, depth in enumerate(depths):
    first = int(i == 0)
    table = tables.get(i)
    deep.append(None if table is None else {
        j: jnp.broadcast_to(table[j - first], (batch,) + table.shape[1:])
        for j in range(first, depth)})
  return prompts, deep


class Model(detector.Model):
  """GLIP with VPT prompts in its Swin body: `(image, text_ids, text_mask, *, train)` ->
  `(token_logits, aux)` as `detector.Model`. Image sides must be multiples of 32."""
  num_prompts: int = NUM_TOKENS
  deep: bool = True
  prompt_dropout: float = 0.0

  def __post_init__(self):
    common.require(
        self, num_prompts=(isinstance(self.num_prompts, int) and self.num_prompts >= 1,
                           "an integer >= 1 (prompt tokens; the release's default is 100)"),
        prompt_dropout=(0.0 <= self.prompt_dropout < 1.0, "a rate in [0, 1)"))
    super().__post_init__()

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False):
    trunk = detector.swin_trunk(self.size)
    depths, width, n = trunk["depths"], trunk["embed_dim"], self.num_prompts
    init = vpt.uniform_init(vpt.prompt_init_bound(4, width))  # GLIP's Swin: patch 4
    # Dropout before the batch expand: one draw per sample for the shallow prompts (expanded
    # first), one per deep table, as VPT.
    dropout = lambda x: nn.Dropout(self.prompt_dropout)(x, deterministic=not train)
    batch = image.shape[0]
    shallow = self.param("prompt_embeddings", init, (1, n, width)).astype(self.dtype)
    shallow = dropout(jnp.broadcast_to(shallow, (batch, n, width)))
    tables = {}
    for i, depth in enumerate(depths if self.deep else ()):
      rows = depth - int(i == 0)  # stage 0's first block keeps the shallow prompts
      if rows:
        tables[i] = dropout(self.param(f"deep_prompt_embeddings_{i}", init,
                                       (rows, n, width * 2 ** i)).astype(self.dtype))
    prompts, deep = expand_prompts(shallow, tables, depths, batch)
    return detector.Model.__call__(self, image, text_ids, text_mask, train=train,
                                   swin_prompts=prompts,
                                   swin_deep_prompts=deep if self.deep else None,
                                   swin_prompted_stage=vpt_swin.PromptedStage)


METHOD = glip_finetune.glip_prompt_method(Model, PROMPTS, PROMPTS)
