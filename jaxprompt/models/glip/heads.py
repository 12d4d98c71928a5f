"""GLIP's prediction heads on the fused pyramid: boxes, centerness, class logits, token logits.

Follows microsoft/GLIP `maskrcnn_benchmark/modeling/rpn/vldyhead.py` (`VLDyHead.__init__` and the
end of `VLDyHead.forward`, with USE_DOT_PRODUCT_TOKEN_LOSS and USE_FUSED_FEATURES_DOT_PRODUCT on,
as in every GLIP config) and the ATSS-style heads of Li et al., "Grounded Language-Image
Pre-training", CVPR 2022, §3.1 (Eq. 3: alignment scores S_ground = O P^T).

For each level l of the final tower maps Y_l (NHWC, C channels), with one anchor per location:
  * box_regression = scales_l * conv1x1(Y_l) -> 4 (learnable scalar per level, init 1);
  * centerness = conv1x1(Y_l) -> 1;
  * cls_logits = conv1x1(Y_l) -> num_classes (NUM_CLASSES - 1; prior bias -log(99)): GLIP keeps it
    frozen and multiplies its loss by 0, so it only sizes the class scores; freeze `cls_logits/.*`;
  * token logits: E = L2-normalise(H) (eps 1e-12) of the final tower text hidden H (B, T, Dl),
    P = dot_product_projection_text(E / 2) (Dl -> C), beta = E . bias_lang + bias0 (B, T);
    z = (Y P^T) / exp(log_scale) + beta, clamped to +-5e4 (CLAMP_DOT_PRODUCT). The image side
    (`dot_product_projection_image`) is nn.Identity in the original: raw, unnormalised Y.
Every output is flattened P3..P7, each level row-major (h, then w), like GLIP's
`permute_and_flatten` with one anchor: token_logits (B, N, T), box_regression (B, N, 4),
centerness (B, N), cls_logits (B, N, num_classes).

Inits as in the original: the three 1x1 convs N(0, 0.01) with zero bias (cls_logits' bias
-log((1 - p) / p), p = PRIOR_PROB = 0.01); dot_product_projection_text PyTorch's default Linear
init; bias_lang 0, bias0 -log(99), log_scale LOG_SCALE = 0, scales 1.

Deliberate deviations: only one anchor per location (GLIP's ASPECT_RATIOS (1.0,) and
SCALES_PER_OCTAVE 1); the unused heads of other configs (token_logits conv of USE_TOKEN_LOSS,
contrastive projections, the MLM head) are not built.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import common
from jaxprompt.models.glip import fusion


class Scale(nn.Module):
  """x times a learnable scalar (`scale`, shape (1,)), GLIP's `layers.misc.Scale`."""
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x):
    return x * self.param("scale", nn.initializers.constant(self.init_value), (1,))


class PredictionHeads(nn.Module):
  """`__call__(levels (list of NHWC (B, H_l, W_l, C)), lang_hidden (B, T, Dl))` -> dict(
  token_logits (B, N, T), box_regression (B, N, 4), centerness (B, N), cls_logits (B, N,
  num_classes)), flattened P3..P7 row-major."""
  num_classes: int  # GLIP's MODEL.DYHEAD.NUM_CLASSES - 1 (background excluded)
  num_levels: int = 5
  prior_prob: float = 0.01
  log_scale_init: float = 0.0
  clamp_dot_product: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence, lang_hidden) -> dict:
    if len(levels) != self.num_levels:
      raise ValueError(f"PredictionHeads: got {len(levels)} levels; expected num_levels="
                       f"{self.num_levels}.")
    batch, channels = levels[0].shape[0], levels[0].shape[-1]
    for i, level in enumerate(levels):
      if level.ndim != 4 or level.shape[0] != batch or level.shape[3] != channels:
        raise ValueError(f"PredictionHeads: level {i} has shape {level.shape}; expected NHWC "
                         f"({batch}, H, W, {channels}) like level 0.")
    if lang_hidden.ndim != 3 or lang_hidden.shape[0] != batch:
      raise ValueError(f"PredictionHeads: lang_hidden has shape {lang_hidden.shape}; expected "
                       f"({batch}, T, Dl).")
    lang_dim = lang_hidden.shape[-1]
    prior_bias = -math.log((1 - self.prior_prob) / self.prior_prob)
    conv = lambda features, name, bias=0.0: nn.Conv(
        features, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.constant(bias), name=name)
    cls_conv = conv(self.num_classes, "cls_logits", prior_bias)
    box_conv, centerness_conv = conv(4, "bbox_pred"), conv(1, "centerness")

    flat = lambda y: y.reshape(batch, -1, y.shape[-1])  # (B, H, W, K) -> (B, H*W, K), row-major
    visual, _ = fusion.flatten_levels(levels)  # (B, N, C)
    cls_logits = jnp.concatenate([flat(cls_conv(y)) for y in levels], 1)
    box_regression = jnp.concatenate(
        [flat(Scale(name=f"scales_{i}")(box_conv(y))) for i, y in enumerate(levels)], 1)
    centerness = jnp.concatenate([flat(centerness_conv(y)) for y in levels], 1)[..., 0]

    embedding = lang_hidden.astype(jnp.float32)
    embedding = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=-1, keepdims=True), 1e-12)
    proj_tokens = nn.Dense(channels, dtype=self.dtype,
                           kernel_init=common.torch_linear_kernel_init(),
                           bias_init=common.torch_linear_bias_init(lang_dim),
                           name="dot_product_projection_text")(embedding / 2.0)  # (B, T, C)
    bias_lang = self.param("bias_lang", nn.initializers.zeros, (lang_dim,))
    bias0 = self.param("bias0", nn.initializers.constant(prior_bias), (1,))
    log_scale = self.param("log_scale", nn.initializers.constant(self.log_scale_init), (1,))
    token_bias = embedding @ bias_lang + bias0  # (B, T)
    token_logits = ((visual @ proj_tokens.swapaxes(-1, -2)).astype(jnp.float32)
                    / jnp.exp(log_scale) + token_bias[:, None, :])  # (B, N, T)
    if self.clamp_dot_product:
      token_logits = fusion.clamp(token_logits)
    return dict(token_logits=token_logits, box_regression=box_regression, centerness=centerness,
                cls_logits=cls_logits)


def head_names(num_levels: int = 5) -> dict[str, str]:
  """Official VLDyHead prediction-head names (prefix 'module.rpn.head.' stripped) -> ours."""
  names = {f"{conv}.{w}": f"{conv}/{'kernel' if w == 'weight' else 'bias'}"
           for conv in ("cls_logits", "bbox_pred", "centerness", "dot_product_projection_text")
           for w in ("weight", "bias")}
  names.update({f"scales.{i}.scale": f"scales_{i}/scale" for i in range(num_levels)})
  names.update({name: name for name in ("log_scale", "bias_lang", "bias0")})
  return names


def convert_heads(state_dict: Mapping[str, np.ndarray], *, num_levels: int = 5) -> dict:
  """The official prediction heads ('cls_logits.weight', 'bbox_pred.*', 'centerness.*',
  'scales.{l}.scale', 'dot_product_projection_text.*', 'log_scale', 'bias_lang', 'bias0'; prefix
  'module.rpn.head.' stripped, no 'dyhead_tower.*') -> `PredictionHeads` params."""
  return fusion.convert_torch_params(state_dict, head_names(num_levels), part="convert_heads")
