"""UPT (Zang et al., "Unified Vision and Language Prompt Learning", arXiv 2210.07225, §3) in a
frozen GLIP, as SDPT's release builds it for its comparison (ECCV 2024, arXiv 2407.11414, §4): a
small transformer layer maps a random seed vector to a prompt added to the first Swin patch.

Follows wuyongjianCODE/SDPT `maskrcnn_benchmark/modeling/backbone/swint.py` (`SwinTransformer`,
`use_upt`: `self.UPT = UPT(192, 192)`, used in `forward`) and `modeling/language_backbone/
bert_model.py` (`BertEncoder`, `use_upt`: `UPT(768, 100)`). The release's `UPT` block on a seed U
(1, E), with one LayerNorm used three times:

  U0 = SA(U, U, U) + ln(U)          SA: nn.MultiheadAttention(E, num_heads=1)
  U^ = FFN(ln(U0)) + ln(U0)         FFN: Linear(E, F), ReLU, Linear(F, E)

with PyTorch's inits (in_proj xavier-uniform, zero biases; out_proj and FFN nn.Linear defaults);
params `sa_in_proj`, `sa_out_proj`, `ffn_0`, `ffn_2`, `ln`.
Image side (`upt_image`): E = F = 192, the seed U ~ N(0, 1) is drawn anew every forward and U^ is
added to the patch embedding (after its norm, before the stages) at patch (0, 0) of every image.
With one seed token the attention weight is 1, so SA(U) = out_proj(v_proj(U)); the query and key
projections exist (as in the release) but get no gradient.

Text side: the release's text UPT (E = 768, F = 100) adds its output to `embedded[:, :1]`, which
GLIP's head never reads (with USE_FUSED_FEATURES_DOT_PRODUCT, as GLIP-T/L, the fusion and the
dot-product head read `hidden`), so it has no effect and its params no gradient. It is not built by
default; `text_side=True` builds it (`upt_text`) and adds its output to the first position of
`hidden`, the paper's reading (a unified prompt on both encoders).

Deliberate deviations:
  * seeds: training draws them from the 'dropout' RNG stream (one per step and side); evaluation
    uses fixed seeds (`jax.random.PRNGKey(0)`, folded per side), so predictions are reproducible;
    the release draws a new seed at every forward, at test time too.
  * the release hard-codes E = 192, GLIP-L's Swin width (GLIP-T's 96 cannot run there); here E = F
    = the Swin width of the size (192 on GLIP-L).
Not neutral at the release's init (ln(U0) is added whatever the weights); the model computes plain
GLIP only when `ln` and `ffn_2` are zero.

What trains: `UPT` (the default) the image UPT, 222,720 params on GLIP-L (0.052 % of its 430.4 M)
and 56,064 on GLIP-T (0.024 %); with `text_side` the text UPT adds 2,518,372 (`jax.eval_shape`).
SDPT's README command (`FROZEE_SWINT True`) would freeze the image UPT (requires_grad False on
every backbone parameter whose name lacks 'adapter'); the release does not say which switches its
UPT runs used. `UPT_AND_HEAD` adds the DyHead outside the fusion blocks (what SDPT's own command
trains besides its prototypes).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt.models import common
from jaxprompt.models.glip import detector
from jaxprompt.prompts import glip_finetune

NEW_PARAMS = r"upt_image|upt_text"  # top-level names, kept by the loader
UPT = r"upt_(?:image|text)/.*"
UPT_AND_HEAD = UPT + "|" + detector.HEAD_OUTSIDE_FUSION
TRAINABLE_SETS = {"upt": UPT, "upt_and_head": UPT_AND_HEAD}
TEXT_FFN_DIM = 100  # the release's UPT(768, 100)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default


class UnifiedPromptBlock(nn.Module):
  """The release's `UPT` block on seeds (L, E) -> (L, E) (module docstring)."""
  ffn_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, seeds):
    width = seeds.shape[-1]
    ln = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="ln")
    in_proj = nn.Dense(3 * width, dtype=self.dtype, name="sa_in_proj",
                       kernel_init=nn.initializers.xavier_uniform(),
                       bias_init=nn.initializers.zeros)
    q, k, v = jnp.split(in_proj(seeds), 3, axis=-1)
    probs = nn.softmax((q * width ** -0.5) @ k.T, axis=-1)  # one head of width E
    attended = nn.Dense(width, dtype=self.dtype, name="sa_out_proj",
                        kernel_init=common.torch_linear_kernel_init(),
                        bias_init=nn.initializers.zeros)(probs @ v)
    u0 = attended + ln(seeds)
    normed = ln(u0)
    dense = lambda features, fan_in, name: nn.Dense(
        features, dtype=self.dtype, name=name, kernel_init=common.torch_linear_kernel_init(),
        bias_init=common.torch_linear_bias_init(fan_in))
    hidden = nn.relu(dense(self.ffn_dim, width, "ffn_0")(normed))
    return dense(width, self.ffn_dim, "ffn_2")(hidden) + normed


class Model(detector.Model):
  """GLIP with UPT's seeded prompt: `(image, text_ids, text_mask, *, train)` ->
  `(token_logits, aux)` as `detector.Model`; training needs the 'dropout' RNG (the seeds)."""
  text_side: bool = False

  def seed(self, side: int, width: int, train: bool):
    key = self.make_rng("dropout") if train else jax.random.PRNGKey(0)
    return jax.random.normal(jax.random.fold_in(key, side), (1, width), self.dtype)

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False):
    width = detector.swin_trunk(self.size)["embed_dim"]
    patch_delta = UnifiedPromptBlock(width, self.dtype, name="upt_image")(
        self.seed(0, width, train))[0]
    text_delta = None
    if self.text_side:
      text = detector.text_width(self.size)
      text_delta = detector.first_token_delta(
          UnifiedPromptBlock(TEXT_FFN_DIM, self.dtype, name="upt_text")(
              self.seed(1, text, train))[0], text_ids.shape[1])
    return detector.Model.__call__(self, image, text_ids, text_mask, train=train,
                                   text_delta=text_delta, patch_delta=patch_delta)


METHOD = glip_finetune.glip_prompt_method(Model, UPT, NEW_PARAMS)
