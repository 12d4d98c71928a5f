"""MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023, arXiv 2210.03117, §3)
in a frozen GLIP, as SDPT's release builds it for its comparison (ECCV 2024, arXiv 2407.11414, §4):
one learnable text-side vector, coupled by a small MLP to a vector added to the first Swin patch.

Follows wuyongjianCODE/SDPT `maskrcnn_benchmark/modeling/language_backbone/bert_model.py`
(`BertEncoder`, `use_maple`), `modeling/detector/generalized_vl_rcnn.py` (the coupled vector goes
with the images into the backbone) and `modeling/backbone/swint.py` (`SwinTransformer.forward`):

  * `maple_lang_input` (768,), init U(-1, 1) (the release's (1, 1, 768));
  * `maple_coupling_proj`: fc1 (768 -> H, no bias), ReLU, fc2 (H -> D, no bias), ReLU (the
    release's `Mlp` with both activations and dropout 0), PyTorch's default nn.Linear init;
    H = `coupling_hidden`, 192 in the release (96 with its `weight96` switch);
  * its output (D,) is added to the patch embedding, after the patch norm and before the stages,
    at patch (0, 0) of every image (`x[:, :192, :1, :1] += maple_project_out`).

The text side has no effect in the release: it adds `maple_lang_input` to `embedded[:, :1]`, the
language backbone's masked last-layer features, which GLIP's head never reads (with
USE_FUSED_FEATURES_DOT_PRODUCT, as in GLIP-T/L, the fusion and the dot-product head read `hidden`),
so the vector learns through the coupling alone. That is the default here (nothing is added to the
text); `text_side=True` adds it to the first position of `hidden` instead, the paper's reading
(the text prompt acts on the text features).

Deliberate deviation: the release hard-codes D = 192, the width of GLIP-L's Swin (GLIP-T's 96
cannot run there); here D is the Swin width of the size and `coupling_hidden` defaults to it
(192 on GLIP-L, the release's value).
With `maple_lang_input` at zero the coupled vector is zero (no biases) and the model is plain GLIP;
the release's U(-1, 1) start is not neutral.

What trains: `MAPLE` (the default) the vector and the coupling MLP, 185,088 params on GLIP-L
(768 + 768 x 192 + 192 x 192; 0.043 % of its 430.4 M) and 83,712 on GLIP-T (H = D = 96; 0.036 %)
(`jax.eval_shape`). SDPT's README command (`FROZEE_BERT True`) would freeze them (requires_grad
False on every language-backbone parameter whose name lacks 'adapter'); the release does not say
which switches its MaPLe runs used. `MAPLE_AND_HEAD` adds the DyHead outside the fusion blocks (what
SDPT's own command trains besides its prototypes).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt.models import common
from jaxprompt.models.glip import detector
from jaxprompt.prompts import glip_finetune

NEW_PARAMS = r"maple_lang_input|maple_coupling_proj"  # top-level names, kept by the loader
MAPLE = r"maple_lang_input|maple_coupling_proj/.*"
MAPLE_AND_HEAD = MAPLE + "|" + detector.HEAD_OUTSIDE_FUSION
TRAINABLE_SETS = {"maple": MAPLE, "maple_and_head": MAPLE_AND_HEAD}


class CouplingMlp(nn.Module):
  """The release's MaPLe coupling: ReLU(fc2(ReLU(fc1(x)))), no biases, PyTorch's default init."""
  hidden_dim: int
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(
        features, use_bias=False, dtype=self.dtype, name=name,
        kernel_init=common.torch_linear_kernel_init())
    return nn.relu(dense(self.out_dim, "fc2")(nn.relu(dense(self.hidden_dim, "fc1")(x))))


def _uniform_plus_minus_one(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


class Model(detector.Model):
  """GLIP with MaPLe's coupled prompt: `(image, text_ids, text_mask, *, train)` ->
  `(token_logits, aux)` as `detector.Model`."""
  coupling_hidden: Optional[int] = None  # None: the Swin width (192 on GLIP-L, the release's)
  text_side: bool = False

  def __post_init__(self):
    common.require(self, coupling_hidden=(
        self.coupling_hidden is None
        or (isinstance(self.coupling_hidden, int) and self.coupling_hidden >= 1),
        "None (the Swin width) or an integer >= 1 (the release's 192, or 96 with weight96)"))
    super().__post_init__()

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False):
    width = detector.swin_trunk(self.size)["embed_dim"]
    lang = self.param("maple_lang_input", _uniform_plus_minus_one, (detector.text_width(self.size),))
    coupled = CouplingMlp(self.coupling_hidden or width, width, self.dtype,
                          name="maple_coupling_proj")(lang)
    text_delta = detector.first_token_delta(lang, text_ids.shape[1]) if self.text_side else None
    return detector.Model.__call__(self, image, text_ids, text_mask, train=train,
                                   text_delta=text_delta, patch_delta=coupled)


METHOD = glip_finetune.glip_prompt_method(Model, MAPLE, NEW_PARAMS)
