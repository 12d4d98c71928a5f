"""PyTorch reference of GLIP's image backbone for parity tests (written from the semantics of
microsoft/GLIP `maskrcnn_benchmark/modeling/backbone/{swint,fpn,__init__}.py` and
`layers/dropblock.py`; not their code).

`Backbone(...)` is an `nn.Sequential` of `body` (detection Swin with right/bottom zero padding of
the image, of each block's normalised map to the window and of odd sides before merging, output
LayerNorms `norm1..norm3`) and `fpn` (laterals `fpn_inner2..4`, outputs `fpn_layer2..4`,
`top_blocks.p6/p7`, DropBlock on the P3/P4 inner maps in training), so `state_dict()` carries
GLIP's names after 'backbone.'. Inputs and outputs are NCHW.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def pad_bottom_right(x, multiple):
  """Zero-pads the last two axes of (..., H, W) at the end up to multiples of `multiple`."""
  height, width = x.shape[-2:]
  return F.pad(x, (0, -width % multiple, 0, -height % multiple))


def windows_of(x, window):
  """(B, H, W, C) -> (B * nW, w*w, C), windows row-major."""
  b, h, w, c = x.shape
  x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def map_of(windows, window, b, h, w):
  """Inverse of `windows_of`."""
  c = windows.shape[-1]
  x = windows.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shift_mask(height, width, window, shift):
  """(nW, w*w, w*w) with -100 between tokens of different regions of the rolled padded grid."""
  labels = torch.zeros(1, height, width, 1)
  bands = lambda: (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, rows in enumerate(bands()):
    for j, cols in enumerate(bands()):
      labels[:, rows, cols, :] = 3 * i + j
  labels = windows_of(labels, window)[..., 0]  # (nW, w*w)
  different = labels[:, None, :] != labels[:, :, None]
  return torch.where(different, -100.0, 0.0)


class WindowAttention(nn.Module):

  def __init__(self, dim, window, heads):
    super().__init__()
    self.heads, self.window = heads, window
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, w*w)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1
    self.register_buffer("relative_position_index", delta[0] * (2 * window - 1) + delta[1])
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask=None):
    n_windows, n, c = x.shape
    q, k, v = self.qkv(x).view(n_windows, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    logits = (q * (c // self.heads) ** -0.5) @ k.transpose(-1, -2)
    bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
    logits = logits + bias.view(n, n, -1).permute(2, 0, 1)[None]
    if mask is not None:
      nw = mask.shape[0]
      logits = (logits.view(-1, nw, self.heads, n, n) + mask[None, :, None]).view(-1, self.heads,
                                                                                    n, n)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n_windows, n, c)
    return self.proj(out)


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, heads, window, shift, drop_path):
    super().__init__()
    self.window, self.shift, self.drop_path = window, shift, drop_path
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, window, heads)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, 4 * dim)

  def dropped(self, y):
    if not self.training or self.drop_path == 0:
      return y
    keep = (torch.rand(y.shape[0], 1, 1) >= self.drop_path).to(y.dtype)
    return y * keep / (1 - self.drop_path)

  def forward(self, x, height, width):  # x: (B, H*W, C)
    b, _, c = x.shape
    y = self.norm1(x).view(b, height, width, c)
    y = pad_bottom_right(y.permute(0, 3, 1, 2), self.window).permute(0, 2, 3, 1)
    hp, wp = y.shape[1:3]
    mask = None
    if self.shift:
      y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
      mask = shift_mask(hp, wp, self.window, self.shift)
    y = map_of(self.attn(windows_of(y, self.window), mask), self.window, b, hp, wp)
    if self.shift:
      y = torch.roll(y, (self.shift, self.shift), (1, 2))
    y = y[:, :height, :width].reshape(b, height * width, c)
    x = x + self.dropped(y)
    return x + self.dropped(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.norm = nn.LayerNorm(4 * dim)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x, height, width):
    b, _, c = x.shape
    x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class Stage(nn.Module):

  def __init__(self, dim, depth, heads, window, drop_paths, downsample):
    super().__init__()
    self.blocks = nn.ModuleList(
        Block(dim, heads, window, 0 if j % 2 == 0 else window // 2, drop_paths[j])
        for j in range(depth))
    self.downsample = PatchMerging(dim) if downsample else None

  def forward(self, x, height, width):
    for block in self.blocks:
      x = block(x, height, width)
    if self.downsample is None:
      return x, x, height, width
    return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):

  def __init__(self, dim, patch):
    super().__init__()
    self.patch = patch
    self.proj = nn.Conv2d(3, dim, patch, patch)
    self.norm = nn.LayerNorm(dim)

  def forward(self, images):
    x = self.proj(pad_bottom_right(images, self.patch))
    height, width = x.shape[-2:]
    return self.norm(x.flatten(2).transpose(1, 2)), height, width


class SwinBody(nn.Module):
  """Detection Swin returning [C2, C3, C4, C5] NCHW; stage 0 has an Identity output norm."""

  def __init__(self, embed_dim, depths, heads, window, drop_path_rate=0.0, patch=4):
    super().__init__()
    self.patch_embed = PatchEmbed(embed_dim, patch)
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    self.layers = nn.ModuleList(
        Stage(embed_dim * 2 ** i, depths[i], heads[i], window,
              rates[sum(depths[:i]):sum(depths[:i + 1])], i < len(depths) - 1)
        for i in range(len(depths)))
    self.dims = [embed_dim * 2 ** i for i in range(len(depths))]
    self.norm0 = nn.Identity()
    for i in range(1, len(depths)):
      self.add_module(f"norm{i}", nn.LayerNorm(self.dims[i]))

  def forward(self, images):
    x, height, width = self.patch_embed(images)
    outs = []
    for i, stage in enumerate(self.layers):
      features, x, next_height, next_width = stage(x, height, width)
      features = getattr(self, f"norm{i}")(features)
      outs.append(features.view(-1, height, width, self.dims[i]).permute(0, 3, 1, 2))
      height, width = next_height, next_width
    return outs


class DropBlock2D(nn.Module):
  """DropBlock on NCHW in training. `keep_masks`, when set to a list, supplies the (B, H, W) keep
  masks to use in call order (for parity with masks drawn elsewhere)."""

  def __init__(self, drop_prob, block_size):
    super().__init__()
    self.drop_prob, self.block_size = drop_prob, block_size
    self.keep_masks = None

  def keep_mask(self, seeds):
    pooled = F.max_pool2d(seeds[:, None], self.block_size, 1, self.block_size // 2)
    if self.block_size % 2 == 0:
      pooled = pooled[:, :, :-1, :-1]
    return 1 - pooled[:, 0]

  def forward(self, x):
    if not self.training or self.drop_prob == 0:
      return x
    if self.keep_masks is not None:
      keep = self.keep_masks.pop(0)
    else:
      gamma = self.drop_prob / self.block_size ** 2
      keep = self.keep_mask((torch.rand(x.shape[0], *x.shape[2:]) < gamma).float())
    return x * keep[:, None] * keep.numel() / keep.sum()


class LastLevelP6P7(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
    self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)

  def forward(self, p5):
    p6 = self.p6(p5)
    return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
  """[C3, C4, C5] -> (P3, P4, P5, P6, P7)."""

  def __init__(self, in_channels, channels, drop_prob=0.3, block_size=3):
    super().__init__()
    for index, c in enumerate(in_channels, 2):
      self.add_module(f"fpn_inner{index}", nn.Conv2d(c, channels, 1))
      self.add_module(f"fpn_layer{index}", nn.Conv2d(channels, channels, 3, 1, 1))
    self.top_blocks = LastLevelP6P7(channels)
    self.drop_block = DropBlock2D(drop_prob, block_size)

  def forward(self, features):
    inner = self.fpn_inner4(features[2])
    results = [self.fpn_layer4(inner)]
    for index in (3, 2):
      lateral = getattr(self, f"fpn_inner{index}")(features[index - 2])
      inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
      results.insert(0, getattr(self, f"fpn_layer{index}")(self.drop_block(inner)))
    return tuple(results + self.top_blocks(results[-1]))


class Backbone(nn.Sequential):
  """`body` then `fpn` on C3..C5: images (B, 3, H, W) -> (P3, ..., P7)."""

  def __init__(self, embed_dim, depths, heads, window, channels, drop_path_rate=0.0):
    body = SwinBody(embed_dim, depths, heads, window, drop_path_rate)
    fpn = FPN(body.dims[1:], channels)
    super().__init__(OrderedDict([("body", body), ("fpn", fpn)]))

  def forward(self, images):
    return self.fpn(self.body(images)[1:])


def randomize_(module, seed=0):
  """Perturbs every parameter (PyTorch inits biases, tables, norms and scalars to constants) so
  that each one counts in a parity test; the GLIP references share it (`torch_glip`)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name.endswith("relative_position_bias_table"):
        p.copy_(0.5 * noise)
      elif p.ndim == 1 and ("norm" in name.lower() or ".bn." in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim <= 1:
        p.add_(0.05 * noise)
      else:
        p.copy_(noise / p[0].numel() ** 0.5)
  return module
