"""A whole PyTorch GLIP for parity tests, composed of the part references (`torch_glip_backbone`,
`torch_glip_fusion_heads`, `torch_glip_dyconv`) and transformers' `BertModel`, with the module
tree of microsoft/GLIP's `GeneralizedVLRCNN` (`backbone`, `language_backbone.body.model`,
`rpn.head.dyhead_tower.{k}` and the head's layers), so that `official_state_dict` carries the
released checkpoints' names ('module.' + ...). Written from the semantics, not the original code.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn

import torch_glip_backbone
import torch_glip_dyconv
import torch_glip_fusion_heads

from jaxprompt.models import bert, swin
from jaxprompt.models.glip import backbone as backbone_lib, detector


class _Wrapper(nn.Module):
  """An attribute path segment of the original ('body', 'rpn')."""

  def __init__(self, **children):
    super().__init__()
    for name, child in children.items():
      self.add_module(name, child)


class Head(torch_glip_fusion_heads.PredictionHeads):
  """VLDyHead: the tower ([VLFuse, BertEncoderLayer, DyConv] x layers) plus the heads."""

  def __init__(self, size: dict, text: dict, num_classes: int):
    super().__init__(size["channels"], text["width"], num_classes)
    tower = []
    for _ in range(size["layers"]):
      tower += [torch_glip_fusion_heads.VLFuse(size["channels"], text["width"], size["fusion_dim"],
                                               size["fusion_heads"], 1.0 / size["layers"]),
                torch_glip_fusion_heads.BertEncoderLayer(text["width"], text["num_heads"],
                                                         text["mlp_dim"]),
                torch_glip_dyconv.DyConv(size["channels"], size["gn_groups"])]
    self.dyhead_tower = nn.Sequential(*tower)

  def forward(self, levels, hidden, mask):
    for i in range(0, len(self.dyhead_tower), 3):
      levels, hidden = self.dyhead_tower[i](levels, hidden, mask)
      hidden = self.dyhead_tower[i + 1](hidden, mask)
      levels = self.dyhead_tower[i + 2](levels)
    return self.predict(levels, hidden)


class GLIP(nn.Module):
  """`forward(images NCHW, ids (B, T), mask (B, T))` -> dict(token_logits, box_regression,
  centerness, cls_logits), for a `detector.SIZES` entry (with `layers` overridable)."""

  def __init__(self, size: str = "tiny", num_classes: int = 4, layers: int | None = None):
    super().__init__()
    s = detector.decode_size(size)
    if layers is not None:
      s["layers"] = layers
    body = backbone_lib.decode_variant(s["backbone"])
    embed_dim, depths, heads = swin.SIZES[body["swin_variant"]]
    self.backbone = torch_glip_backbone.Backbone(embed_dim, depths, heads, body["window_size"],
                                                 body["fpn_channels"])
    text = bert.decode_variant(s["text"])
    config = transformers.BertConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"],
        num_hidden_layers=text["depth"], num_attention_heads=text["num_heads"],
        intermediate_size=text["mlp_dim"], max_position_embeddings=text["max_positions"],
        type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)
    self.language_backbone = _Wrapper(body=_Wrapper(model=transformers.BertModel(config)))
    self.rpn = _Wrapper(head=Head(s, text, num_classes))

  def forward(self, images, ids, mask):
    levels = self.backbone(images)
    hidden = self.language_backbone.body.model(
        input_ids=ids, attention_mask=mask).last_hidden_state
    return self.rpn.head(levels, hidden, mask)


randomize_ = torch_glip_backbone.randomize_


def official_state_dict(model: GLIP) -> dict[str, torch.Tensor]:
  """The model's state dict under the released checkpoints' names, buffers included."""
  return {f"module.{name}": value for name, value in model.state_dict().items()}
