"""PyTorch reference for GLIP's VLFuse ("MHA-B"), in-head BertEncoderLayer and prediction heads.

Written for the parity tests from the semantics of microsoft/GLIP
`maskrcnn_benchmark/utils/fuse_helper.py` (BiMultiHeadAttention, BiAttentionBlockForCheckpoint),
`maskrcnn_benchmark/modeling/rpn/vldyhead.py` (VLFuse, BertEncoderLayer, VLDyHead's heads) and
`maskrcnn_benchmark/modeling/rpn/modeling_bert.py` (clamped BERT sub-layers), with the GLIP-T/L
config (clamps on, one joint attention over all levels, dot-product token head). Attribute names
reproduce the official state-dict keys: a `VLFuse` gives 'b_attn.attn.v_proj.weight', ...; a
`BertEncoderLayer` 'attention.self.query.weight', ...; `PredictionHeads` 'cls_logits.weight',
'scales.0.scale', 'dot_product_projection_text.weight', 'log_scale', 'bias_lang', 'bias0' (to
compose the full `VLDyHead`, add a 'dyhead_tower' nn.Sequential attribute to a PredictionHeads).
Inputs and outputs are NCHW as in the original.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

CLAMP = 50000.0


def _clamp(x, lo=True, hi=True):
  if lo:
    x = torch.clamp(x, min=-CLAMP)
  if hi:
    x = torch.clamp(x, max=CLAMP)
  return x


class BiMultiHeadAttention(nn.Module):
  def __init__(self, v_dim, l_dim, embed_dim, num_heads, dropout=0.1, clamp_min=True,
               clamp_max=True):
    super().__init__()
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.head_dim = embed_dim // num_heads
    self.dropout, self.clamp_min, self.clamp_max = dropout, clamp_min, clamp_max
    self.v_proj = nn.Linear(v_dim, embed_dim)
    self.l_proj = nn.Linear(l_dim, embed_dim)
    self.values_v_proj = nn.Linear(v_dim, embed_dim)
    self.values_l_proj = nn.Linear(l_dim, embed_dim)
    self.out_v_proj = nn.Linear(embed_dim, v_dim)
    self.out_l_proj = nn.Linear(embed_dim, l_dim)
    for layer in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj,
                  self.out_v_proj, self.out_l_proj):
      nn.init.xavier_uniform_(layer.weight)
      nn.init.zeros_(layer.bias)

  def _heads(self, x):  # (B, L, E) -> (B, H, L, E/H)
    b, n, _ = x.shape
    return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

  def _merge(self, x):  # (B, H, L, E/H) -> (B, L, E)
    b, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(b, n, self.embed_dim)

  def forward(self, v, l, mask):
    q = self._heads(self.v_proj(v) * self.head_dim**-0.5)
    k = self._heads(self.l_proj(l))
    vv = self._heads(self.values_v_proj(v))
    vl = self._heads(self.values_l_proj(l))
    s = _clamp(q @ k.transpose(-1, -2), self.clamp_min, self.clamp_max)  # (B, H, N, T)
    s_t = s.transpose(-1, -2)
    s_t = _clamp(s_t - s_t.max(dim=-1, keepdim=True)[0], self.clamp_min, self.clamp_max)
    a_l = s_t.softmax(dim=-1)
    m = mask[:, None, None, :].to(s.dtype)
    a_v = (s + m.masked_fill(m == 0, -9e15)).softmax(dim=-1)
    a_v = F.dropout(a_v, self.dropout, self.training)
    a_l = F.dropout(a_l, self.dropout, self.training)
    return self.out_v_proj(self._merge(a_v @ vl)), self.out_l_proj(self._merge(a_l @ vv))


class BiAttentionBlockForCheckpoint(nn.Module):
  def __init__(self, v_dim, l_dim, embed_dim, num_heads, init_values, dropout=0.1,
               clamp_min=True, clamp_max=True):
    super().__init__()
    self.layer_norm_v = nn.LayerNorm(v_dim)
    self.layer_norm_l = nn.LayerNorm(l_dim)
    self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout, clamp_min,
                                     clamp_max)
    self.gamma_v = nn.Parameter(init_values * torch.ones(v_dim))
    self.gamma_l = nn.Parameter(init_values * torch.ones(l_dim))

  def forward(self, levels, l, mask):
    """levels: list of (B, C, H, W); returns (list of (B, C, H, W), (B, T, Dl))."""
    sizes = [x.shape[2:] for x in levels]
    v = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)  # (B, N, C), row-major
    v, l = self.layer_norm_v(v), self.layer_norm_l(l)
    dv, dl = self.attn(v, l, mask)
    v, l = v + self.gamma_v * dv, l + self.gamma_l * dl
    out, start = [], 0
    for h, w in sizes:
      out.append(v[:, start:start + h * w].transpose(1, 2).reshape(v.shape[0], -1, h, w))
      start += h * w
    return out, l


class VLFuse(nn.Module):
  def __init__(self, v_dim, l_dim, embed_dim, num_heads, init_values, dropout=0.1):
    super().__init__()
    self.b_attn = BiAttentionBlockForCheckpoint(v_dim, l_dim, embed_dim, num_heads, init_values,
                                                dropout)

  def forward(self, levels, hidden, mask):
    return self.b_attn(levels, hidden, mask)


class _SelfAttention(nn.Module):
  def __init__(self, width, num_heads):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, width // num_heads
    self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

  def forward(self, x, extended_mask, dropout, training):
    b, n, d = x.shape
    heads = lambda y: y.view(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    s = _clamp((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)) + extended_mask
    a = F.dropout(s.softmax(dim=-1), dropout, training)
    return (a @ v).permute(0, 2, 1, 3).reshape(b, n, d)


class _SelfOutput(nn.Module):
  def __init__(self, width, eps):
    super().__init__()
    self.dense = nn.Linear(width, width)
    self.LayerNorm = nn.LayerNorm(width, eps=eps)


class _Attention(nn.Module):
  def __init__(self, width, num_heads, eps):
    super().__init__()
    self.self = _SelfAttention(width, num_heads)
    self.output = _SelfOutput(width, eps)


class _Dense(nn.Module):
  def __init__(self, n_in, n_out):
    super().__init__()
    self.dense = nn.Linear(n_in, n_out)


class _Output(nn.Module):
  def __init__(self, n_in, n_out, eps):
    super().__init__()
    self.dense = nn.Linear(n_in, n_out)
    self.LayerNorm = nn.LayerNorm(n_out, eps=eps)


class BertEncoderLayer(nn.Module):
  """Post-LN BERT layer with GLIP's clamps; `forward(hidden (B, T, D), mask (B, T))`."""

  def __init__(self, width, num_heads, mlp_dim, dropout=0.1, eps=1e-12):
    super().__init__()
    self.dropout = dropout
    self.attention = _Attention(width, num_heads, eps)
    self.intermediate = _Dense(width, mlp_dim)
    self.output = _Output(mlp_dim, width, eps)

  def forward(self, hidden, mask):
    extended = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * -10000.0
    drop = lambda y: F.dropout(y, self.dropout, self.training)
    y = self.attention.self(hidden, extended, self.dropout, self.training)
    x = self.attention.output.LayerNorm(drop(self.attention.output.dense(y)) + hidden)
    y = _clamp(F.gelu(_clamp(self.intermediate.dense(x))))
    y = _clamp(drop(self.output.dense(y)))
    return _clamp(self.output.LayerNorm(y + x))


class Scale(nn.Module):
  def __init__(self, init_value=1.0):
    super().__init__()
    self.scale = nn.Parameter(torch.FloatTensor([init_value]))

  def forward(self, x):
    return x * self.scale


class PredictionHeads(nn.Module):
  """VLDyHead's prediction layers; `predict(levels (list of (B, C, H, W)), hidden (B, T, Dl))`."""

  def __init__(self, channels, lang_dim, num_classes, num_levels=5, prior_prob=0.01,
               log_scale=0.0):
    super().__init__()
    bias_value = -math.log((1 - prior_prob) / prior_prob)
    self.cls_logits = nn.Conv2d(channels, num_classes, kernel_size=1)
    self.bbox_pred = nn.Conv2d(channels, 4, kernel_size=1)
    self.centerness = nn.Conv2d(channels, 1, kernel_size=1)
    self.dot_product_projection_image = nn.Identity()
    self.dot_product_projection_text = nn.Linear(lang_dim, channels, bias=True)
    self.log_scale = nn.Parameter(torch.Tensor([log_scale]))
    self.bias_lang = nn.Parameter(torch.zeros(lang_dim))
    self.bias0 = nn.Parameter(torch.Tensor([bias_value]))
    for conv in (self.cls_logits, self.bbox_pred, self.centerness):
      nn.init.normal_(conv.weight, std=0.01)
      nn.init.constant_(conv.bias, 0)
    self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
    nn.init.constant_(self.cls_logits.bias, bias_value)

  def predict(self, levels, hidden):
    flat = lambda y: y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])  # (B, HW, K)
    emb = F.normalize(hidden, p=2, dim=-1)
    tokens = self.dot_product_projection_text(emb / 2.0)
    token_bias = emb @ self.bias_lang + self.bias0
    cls, box, ctr, logits = [], [], [], []
    for i, y in enumerate(levels):
      cls.append(flat(self.cls_logits(y)))
      box.append(flat(self.scales[i](self.bbox_pred(y))))
      ctr.append(flat(self.centerness(y)))
      queries = flat(self.dot_product_projection_image(y))
      z = (queries @ tokens.transpose(-1, -2)) / self.log_scale.exp() + token_bias[:, None, :]
      logits.append(torch.clamp(torch.clamp(z, max=CLAMP), min=-CLAMP))
    return dict(token_logits=torch.cat(logits, 1), box_regression=torch.cat(box, 1),
                centerness=torch.cat(ctr, 1)[..., 0], cls_logits=torch.cat(cls, 1))
