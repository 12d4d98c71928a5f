"""The GLIP detector (Li et al., "Grounded Language-Image Pre-training", CVPR 2022, arXiv
2112.03857, §3.1–3.2): Swin + FPN, BERT, the deep-fusion VL-DyHead tower, the ATSS grounding head.

Follows microsoft/GLIP `maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py`
(`GeneralizedVLRCNN`: backbone, language backbone, rpn) and `modeling/rpn/vldyhead.py`
(`VLDyHead`: for each of DYHEAD.NUM_CONVS layers VLFuse -> BertEncoderLayer -> DyConv, then the
heads), with the settings of `configs/pretrain/glip_Swin_T_O365_GoldG.yaml` (GLIP-T, 6 fusion
layers) and `glip_Swin_L.yaml` (GLIP-L, 8):

  image (B, H, W, 3) BGR x255 normalised -> `backbone.SwinFPN` -> P3..P7 (B, H_l, W_l, 256)
  text_ids, text_mask (B, T) -> `bert.Model` (bert-base-uncased, no pooler) -> hidden (B, T, 768)
  tower layer i: (P3..P7, hidden) -> `fusion.BiAttentionBlock` -> hidden
                 -> `fusion.ClampedBertLayer` -> P3..P7 -> `dyconv.DyConv`
  -> `heads.PredictionHeads` -> token logits (B, N, T), box deltas (B, N, 4), centerness (B, N)

`Model.__call__(image, text_ids, text_mask, *, train)` returns `(token_logits, aux)`, aux holding
'box_regression', 'centerness', 'cls_logits' (GLIP's frozen class head: computed, never in a loss)
and 'level_shapes', the static (H_l, W_l) of P3..P7 (a tuple of Python ints, for anchors).
`train` makes every stochastic layer live (stochastic depth, DropBlock, BERT and attention
dropout; RNG 'dropout'), as the original's train mode does with nothing frozen.

Parameter names (`convert_glip` maps the official checkpoint's onto them):
  backbone/{body,fpn}/...              <- module.backbone.{body,fpn}.*
  language_backbone/...                <- module.language_backbone.body.model.*  (HF BertModel)
  head/dyhead_tower_{3i}/b_attn/...    <- module.rpn.head.dyhead_tower.{3i}.b_attn.*   (VLFuse)
  head/dyhead_tower_{3i+1}/...         <- module.rpn.head.dyhead_tower.{3i+1}.layer.*  (BERT layer)
  head/dyhead_tower_{3i+2}/...         <- module.rpn.head.dyhead_tower.{3i+2}.*        (DyConv)
  head/heads/{cls_logits,bbox_pred,centerness,scales_{l},dot_product_projection_text,log_scale,
       bias_lang,bias0}                <- module.rpn.head.* (the rest)

Sizes: 'T' and 'L' are GLIP-T and GLIP-L (231.8 M and 430.4 M parameters, GLIP's model zoo);
'tiny' keeps every component at CPU widths (Swin embed 16 with window 4, FPN/head 32 channels,
a 2-layer BERT of width 32, 2 fusion layers of attention width 64) for tests and the demos.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt.models import bert, swin
from jaxprompt.models.glip import backbone as backbone_lib
from jaxprompt.models.glip import dyconv, fusion, heads

# name -> the architecture: backbone variant (`backbone.VARIANTS`), BERT variant (`bert.SIZES`),
# fusion layers (DYHEAD.NUM_CONVS), head channels (DYHEAD.CHANNELS = FPN channels), the fusion
# attention width and heads (fuse_helper's BiAttentionBlock: 2048, 8), GroupNorm groups
# (MODEL.GROUP_NORM.NUM_GROUPS, 16 in GLIP's defaults.py).
SIZES = {
    "T": dict(backbone="T", text="base", layers=6, channels=256, fusion_dim=2048,
              fusion_heads=8, gn_groups=16),
    "L": dict(backbone="L", text="base", layers=8, channels=256, fusion_dim=2048,
              fusion_heads=8, gn_groups=16),
    "tiny": dict(backbone="tiny", text="mu", layers=2, channels=32, fusion_dim=64,
                 fusion_heads=2, gn_groups=8),
}
STRIDES = (8, 16, 32, 64, 128)  # P3..P7 (MODEL.RPN.ANCHOR_STRIDE)
# The head's params outside the fusion (bi-attention) blocks, cls_logits excluded: what SDPT's
# `froze_fuse 1` leaves trainable in the head (the release's set besides its prototypes).
HEAD_OUTSIDE_FUSION = r"head/(?!heads/cls_logits/)(?!dyhead_tower_\d+/b_attn/).*"


def decode_size(size: str) -> dict:
  if size not in SIZES:
    raise ValueError(f"Unknown GLIP size {size!r}: expected one of {sorted(SIZES)}.")
  return dict(SIZES[size])


def swin_trunk(size: str) -> dict:
  """The Swin trunk of a GLIP size: dict(embed_dim, depths, num_heads) (`swin.decode_variant`)."""
  return swin.decode_variant(backbone_lib.decode_variant(decode_size(size)["backbone"])[
      "swin_variant"])


def text_width(size: str) -> int:
  """The language backbone's width of a GLIP size (768: bert-base)."""
  return bert.decode_variant(decode_size(size)["text"])["width"]


def first_token_delta(vector, num_tokens: int):
  """(T, D) rows that add `vector` (D,) to the first text position only (a `text_delta`)."""
  return jnp.zeros((num_tokens, vector.shape[-1]), vector.dtype).at[0].set(vector)


def level_shapes(height: int, width: int, patch_size: int = 4) -> tuple[tuple[int, int], ...]:
  """(H_l, W_l) of P3..P7 for an input of height x width: Swin pads the image to the patch and
  odd sides before each merge (so each stride halves with ceil), P6 and P7 are 3x3 stride-2
  convs with padding 1 (ceil too)."""
  side = lambda n: -(-n // patch_size)
  shapes, (h, w) = [], (side(height), side(width))  # C2, stride 4
  for _ in range(5):
    h, w = -(-h // 2), -(-w // 2)
    shapes.append((h, w))
  return tuple(shapes)


class VLDyHead(nn.Module):
  """GLIP's `rpn.head`: the fusion tower ([VLFuse, BERT layer, DyConv] x layers, params
  `dyhead_tower_{k}` as the original's nn.Sequential indices) and the prediction heads (`heads`).
  `__call__(levels, hidden, text_mask, *, deterministic, fusion_tokens=None)` -> the
  `PredictionHeads` dict; `fusion_tokens[i]`: (P_v, P_l) appended in fusion layer i
  (`fusion.BiAttentionBlock`'s `extra_tokens`: SDPT's prototypes), None for plain GLIP."""
  num_classes: int
  size: str = "T"
  fusion_dropout: float = 0.1
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels, hidden, text_mask, *, deterministic: bool = True,
               fusion_tokens: Optional[Sequence] = None, fusion_text_visible: bool = False):
    s = decode_size(self.size)
    text = bert.decode_variant(s["text"])
    fusion_tokens = tuple(fusion_tokens or (None,) * s["layers"])
    if len(fusion_tokens) != s["layers"]:
      raise ValueError(f"fusion_tokens: got {len(fusion_tokens)} entries for the {s['layers']} "
                       f"fusion layers of GLIP size {self.size!r}.")
    for i in range(s["layers"]):
      levels, hidden = fusion.BiAttentionBlock(
          s["channels"], text["width"], s["fusion_dim"], s["fusion_heads"],
          init_values=1.0 / s["layers"], dropout=self.fusion_dropout, dtype=self.dtype,
          name=f"dyhead_tower_{3 * i}")(levels, hidden, text_mask, deterministic=deterministic,
                                        extra_tokens=fusion_tokens[i],
                                        extra_text_visible=fusion_text_visible)
      hidden = fusion.ClampedBertLayer(
          text["mlp_dim"], text["num_heads"], dropout=self.dropout,
          attention_dropout=self.dropout, dtype=self.dtype,
          name=f"dyhead_tower_{3 * i + 1}")(hidden, text_mask, deterministic=deterministic)
      levels = dyconv.DyConv(s["channels"], gn_groups=s["gn_groups"],
                             name=f"dyhead_tower_{3 * i + 2}")(levels)
    return heads.PredictionHeads(self.num_classes, dtype=self.dtype, name="heads")(levels, hidden)


class Model(nn.Module):
  """GLIP: `(image, text_ids, text_mask, *, train) -> (token_logits, aux)` (module docstring).

  `num_classes` sizes GLIP's frozen `cls_logits` (MODEL.DYHEAD.NUM_CLASSES - 1); detection
  itself is open-vocabulary through the caption. `drop_path_rate` / `frozen_stages` default to
  the size's yaml values (None); `drop_block_prob` 0 turns DropBlock off; `dropout` is BERT's
  hidden and attention dropout (0.1 in bert-base-uncased), in the language backbone and in the
  tower's BERT layers; `fusion_dropout` the fusion block's attention dropout.
  """
  num_classes: int
  size: str = "T"
  drop_path_rate: Optional[float] = None
  frozen_stages: Optional[int] = None
  drop_block_prob: float = backbone_lib.DROP_BLOCK_PROB
  fusion_dropout: float = 0.1
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False,
               fusion_tokens: Optional[Sequence] = None, fusion_text_visible: bool = False,
               text_delta=None, swin_prompts=None, swin_deep_prompts: Optional[Sequence] = None,
               swin_prompted_stage=None, patch_delta=None):
    """`fusion_tokens`, `fusion_text_visible`: see `VLDyHead` (SDPT); `text_delta` (T', D), if
    given, has its first T rows added to the language backbone's hidden states before the head
    (GLIP's own prompt tuning, `ADD_LINEAR_LAYER`). `swin_prompts` (B, P, D_swin),
    `swin_deep_prompts` (per stage: {block: (B, P, D_i)} or None), the stage class that runs them
    (`swin_prompted_stage`) and `patch_delta` (D_swin,) go to the Swin body (`backbone.SwinBody`:
    VPT's prompt tokens; MaPLe's / UPT's vector added to patch (0, 0))."""
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"GLIP takes images (B, H, W, 3); got shape {image.shape}.")
    if text_ids.shape != text_mask.shape or text_ids.shape[0] != image.shape[0]:
      raise ValueError(f"GLIP: text_ids {text_ids.shape} and text_mask {text_mask.shape} must be "
                       f"(B, T) with B = {image.shape[0]} (the images').")
    s = decode_size(self.size)
    body = backbone_lib.decode_variant(s["backbone"])
    if self.drop_path_rate is not None:
      body["drop_path_rate"] = self.drop_path_rate
    if self.frozen_stages is not None:
      body["frozen_stages"] = self.frozen_stages
    levels = backbone_lib.SwinFPN(**body, drop_block_prob=self.drop_block_prob,
                                  dtype=self.dtype, name="backbone")(
                                      image, train=train, prompts=swin_prompts,
                                      deep_prompts=swin_deep_prompts,
                                      prompted_stage=swin_prompted_stage, patch_delta=patch_delta)
    hidden = bert.Model(s["text"], dropout=self.dropout, attention_dropout=self.dropout,
                        dtype=self.dtype, name="language_backbone")(
                            text_ids, text_mask, train=train)["hidden"]
    if text_delta is not None:
      hidden = hidden + text_delta[None, :hidden.shape[1]].astype(hidden.dtype)
    out = VLDyHead(self.num_classes, self.size, self.fusion_dropout, self.dropout, self.dtype,
                   name="head")(levels, hidden, text_mask, deterministic=not train,
                                fusion_tokens=fusion_tokens,
                                fusion_text_visible=fusion_text_visible)
    aux = dict(box_regression=out["box_regression"], centerness=out["centerness"],
               cls_logits=out["cls_logits"],
               level_shapes=tuple((int(x.shape[1]), int(x.shape[2])) for x in levels))
    return out["token_logits"], aux


def count_params(size: str, num_classes: int = 80) -> int:
  """Parameters of a GLIP size, from shapes only (no weights are built)."""
  model = Model(num_classes=num_classes, size=size)
  text = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             text, text))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))
