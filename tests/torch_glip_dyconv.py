"""PyTorch reference of GLIP's modulated deformable conv and DyConv block, for parity tests.

Written from the semantics of microsoft/GLIP `maskrcnn_benchmark/layers/deform_conv.py` + its CUDA
kernel, `maskrcnn_benchmark/modeling/rpn/vldyhead.py` (`DyConv`, `Conv3x3Norm`, `h_sigmoid`) and
`maskrcnn_benchmark/layers/dyrelu.py` (`DYReLU`), in pure torch ops on the CPU (NCHW). Attribute
names reproduce the official state-dict keys (`DyConv.0.conv.weight`, `DyConv.0.bn.weight`,
`offset.weight`, `AttnConv.1.weight`, `relu.fc.0.weight`, ...).

The offset-buffer quirk lives where it happens in the original: `modulated_deform_conv` reads,
per sample, the buffers as the CUDA kernel does, i.e. the first C*Ho*Wo values of the flattened
(C, H, W) buffer viewed as (C, Ho, Wo), whatever grid the buffer was computed on.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def _read_like_cuda(buffer: torch.Tensor, channels: int, out_h: int, out_w: int) -> torch.Tensor:
  """(B, C, H, W) -> (B, C, out_h, out_w): per sample the flat C-order prefix of the buffer."""
  batch = buffer.shape[0]
  flat = buffer.reshape(batch, -1)
  need = channels * out_h * out_w
  if flat.shape[1] < need:
    raise ValueError(f"buffer {tuple(buffer.shape)} is smaller than {channels}x{out_h}x{out_w}")
  return flat[:, :need].reshape(batch, channels, out_h, out_w)


def _bilinear_zero_outside(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
  """image (B, C, H, W); y, x (B, P) sample positions -> (B, C, P): bilinear with out-of-image
  corners read as 0; points outside (-1, H) x (-1, W) give 0."""
  batch, channels, height, width = image.shape
  flat = image.reshape(batch, channels, height * width)
  inside = (y > -1) & (y < height) & (x > -1) & (x < width)
  y0, x0 = torch.floor(y), torch.floor(x)
  ly, lx = y - y0, x - x0
  y0, x0 = y0.long(), x0.long()
  result = torch.zeros(batch, channels, y.shape[1], dtype=image.dtype)
  for cy, cx, weight in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                         (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
    valid = inside & (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
    index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1))  # (B, P)
    values = torch.gather(flat, 2, index[:, None, :].expand(batch, channels, -1))
    result = result + values * (weight * valid)[:, None, :]
  return result


def modulated_deform_conv(input, offset, mask, weight, bias=None, stride=1, padding=1,
                          dilation=1):
  """DCNv2 on NCHW tensors: input (B, Cin, H, W), offset (B, 2K, .., ..), mask (B, K, .., ..),
  weight (Cout, Cin, kh, kw) -> (B, Cout, Ho, Wo)."""
  batch, in_channels, height, width = input.shape
  out_channels, _, kernel_h, kernel_w = weight.shape
  out_h = (height + 2 * padding - (dilation * (kernel_h - 1) + 1)) // stride + 1
  out_w = (width + 2 * padding - (dilation * (kernel_w - 1) + 1)) // stride + 1
  taps = kernel_h * kernel_w
  offset = _read_like_cuda(offset, 2 * taps, out_h, out_w)
  mask = _read_like_cuda(mask, taps, out_h, out_w)
  base_y = (torch.arange(out_h, dtype=input.dtype) * stride - padding)[:, None].expand(out_h, out_w)
  base_x = (torch.arange(out_w, dtype=input.dtype) * stride - padding)[None, :].expand(out_h, out_w)
  columns = []
  for i in range(kernel_h):
    for j in range(kernel_w):
      k = i * kernel_w + j
      y = base_y + i * dilation + offset[:, 2 * k]  # (B, Ho, Wo)
      x = base_x + j * dilation + offset[:, 2 * k + 1]
      sampled = _bilinear_zero_outside(input, y.reshape(batch, -1), x.reshape(batch, -1))
      columns.append(sampled * mask[:, k].reshape(batch, 1, -1))  # (B, Cin, Ho*Wo)
  columns = torch.stack(columns, dim=2)  # (B, Cin, K, Ho*Wo)
  out = torch.einsum("bckp,ock->bop", columns, weight.reshape(out_channels, in_channels, taps))
  if bias is not None:
    out = out + bias[None, :, None]
  return out.reshape(batch, out_channels, out_h, out_w)


class ModulatedDeformConv(nn.Module):
  """Parameters `weight` (Cout, Cin, k, k) ~ U(+-1/sqrt(Cin*k*k)) and `bias` = 0."""

  def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1):
    super().__init__()
    self.stride, self.padding = stride, padding
    self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
    self.bias = nn.Parameter(torch.zeros(out_channels))
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    with torch.no_grad():
      self.weight.uniform_(-bound, bound)

  def forward(self, input, offset, mask):
    return modulated_deform_conv(input, offset, mask, self.weight, self.bias, self.stride,
                                 self.padding)


class Conv3x3Norm(nn.Module):
  def __init__(self, in_channels, out_channels, stride, gn_groups, deformable=True):
    super().__init__()
    if deformable:
      self.conv = ModulatedDeformConv(in_channels, out_channels, 3, stride=stride, padding=1)
    else:
      self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    self.bn = nn.GroupNorm(gn_groups, out_channels)

  def forward(self, x, **conv_args):
    return self.bn(self.conv(x, **conv_args))


class HSigmoid(nn.Module):
  def forward(self, x):
    return F.relu6(x + 3.0) / 6.0


class DYReLU(nn.Module):
  """K=2 with bias, reduction 4, lambda_a 1 (x2), init_a (1, 0), init_b (0, 0), no spatial."""

  def __init__(self, channels):
    super().__init__()
    self.channels = channels
    self.avg_pool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Sequential(nn.Linear(channels, channels // 4), nn.ReLU(),
                            nn.Linear(channels // 4, 4 * channels), HSigmoid())

  def forward(self, x):
    coefficients = self.fc(self.avg_pool(x).flatten(1))[:, :, None, None]
    a1, b1, a2, b2 = coefficients.split(self.channels, dim=1)
    first = x * ((a1 - 0.5) * 2.0 + 1.0) + (b1 - 0.5)
    second = x * ((a2 - 0.5) * 2.0) + (b2 - 0.5)
    return torch.maximum(first, second)


class DyConv(nn.Module):
  """One DyHead block: forward(list of (B, C, H, W)) -> list of (B, C, H, W)."""

  def __init__(self, channels, gn_groups=16, use_dyrelu=True, use_deform=True, use_dyfuse=True):
    super().__init__()
    self.use_deform = use_deform
    self.DyConv = nn.ModuleList([Conv3x3Norm(channels, channels, stride, gn_groups, use_deform)
                                 for stride in (1, 1, 2)])
    if use_dyfuse:
      self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU())
      self.h_sigmoid = HSigmoid()
    else:
      self.AttnConv = None
    self.relu = DYReLU(channels) if use_dyrelu else nn.ReLU()
    self.offset = nn.Conv2d(channels, 27, 3, padding=1) if use_deform else None
    for module in list(self.DyConv.modules()) + list(
        self.AttnConv.modules() if self.AttnConv is not None else []):
      if type(module) is nn.Conv2d:
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)

  def forward(self, features):
    outputs = []
    for level, feature in enumerate(features):
      conv_args = {}
      if self.use_deform:
        offset_mask = self.offset(feature)
        conv_args = dict(offset=offset_mask[:, :18], mask=offset_mask[:, 18:].sigmoid())
      branches = [self.DyConv[1](feature, **conv_args)]
      if level > 0:
        branches.append(self.DyConv[2](features[level - 1], **conv_args))
      if level < len(features) - 1:
        high = self.DyConv[0](features[level + 1], **conv_args)
        branches.append(F.interpolate(high, size=feature.shape[2:], mode="bilinear",
                                      align_corners=True))
      stacked = torch.stack(branches)
      if self.AttnConv is not None:
        weights = self.h_sigmoid(torch.stack([self.AttnConv(b) for b in branches]))
        stacked = stacked * weights
      outputs.append(stacked.mean(dim=0))
    return [self.relu(x) for x in outputs]
