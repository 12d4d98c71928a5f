"""GLIP's DyConv block (the DyHead step of the fusion tower) as a Flax Linen module.

Follows microsoft/GLIP `maskrcnn_benchmark/modeling/rpn/vldyhead.py` (`DyConv`, `Conv3x3Norm`,
`h_sigmoid`) and `maskrcnn_benchmark/layers/dyrelu.py` (`DYReLU`), i.e. DyHead (Dai et al.,
CVPR 2021, arXiv 2106.08322) as GLIP (Li et al., CVPR 2022, arXiv 2112.03857, Sec. 3.2) stacks
it after each fusion layer. Per pyramid level l (maps F_0..F_{L-1}, finest first):

  * an offset conv 3x3 C -> 27 on F_l: offsets = channels 0..17 (interleaved (dy, dx) per tap),
    modulation = sigmoid(channels 18..26);
  * three 3x3 modulated deformable convs + GroupNorm (`DyConv_0/1/2`, stride 1/1/2): mid from F_l,
    low from F_{l-1} with stride 2 (l > 0), high from F_{l+1} (l < L-1), bilinearly upsampled with
    align_corners=True to F_l's size; all three use F_l's offsets and modulation;
  * scale attention: for each branch, hsigmoid(ReLU(conv1x1 C -> 1 (global average pool))), one
    scalar per sample, and the mean over the 2 or 3 weighted branches;
  * DyReLU (K=2 with bias, reduction 4, no spatial branch) on each level's result.

The parameter tree mirrors the official names with '.' -> '/' and numbered children joined
('DyConv.0.conv.weight' -> 'DyConv_0/conv/kernel', 'AttnConv.1.bias' -> 'AttnConv_1/bias',
'relu.fc.2.weight' -> 'relu/fc_2/kernel', 'offset.weight' -> 'offset/kernel'); `convert_dyconv`
does the renaming and the OIHW -> HWIO / (out, in) -> (in, out) transposes.

GLIP's offset-buffer quirk is reproduced (`reinterpret_offset_buffer`): the conv on the coarser
level F_{l+1} receives F_l's offset and modulation buffers, and the CUDA kernel reads them with
F_{l+1}'s output grid, i.e. per sample the first 18*h'*w' (9*h'*w') values of the flattened
channel-major (18, H, W) ((9, H, W)) buffer as an (18, h', w') ((9, h', w')) array. Pretrained
DyHead weights were trained with this; it is not a geometric resampling of the offsets.

Deliberate choices:
  * Input and output channels are equal (`channels`): GLIP builds every DyConv with
    MODEL.BACKBONE.OUT_CHANNELS == MODEL.DYHEAD.CHANNELS (256).
  * GroupNorm is the only normalisation offered (GLIP's configs set MODEL.DYHEAD.USE_GN); the
    BatchNorm variants and the CONV_FUNC override of the original are not.
  * At least two levels are required, so that all three convs exist.
"""
from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import common
from jaxprompt.models.glip.deform_conv import (ModulatedDeformConv, conv_output_size,
                                               uniform_fan_in_init)

GROUP_NORM_EPS = 1e-5  # PyTorch's nn.GroupNorm default
OFFSET_CHANNELS = 18  # 2 * 3 * 3: (dy, dx) per tap of the 3x3 kernel
MASK_CHANNELS = 9
DYRELU_REDUCTION = 4  # DYReLU(reduction=4): squeeze = channels // 4
_normal_001 = nn.initializers.normal(0.01)  # DyConv.init_weights for nn.Conv2d children


def h_sigmoid(x):
  """ReLU6(x + 3) / 6, the original's `h_sigmoid` (h_max 1)."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def reinterpret_offset_buffer(values, out_hw: tuple[int, int]):
  """GLIP's read of a level's offset (or mask) buffer by a conv on another output grid.

  `values` (B, H, W, C) is the NHWC form of the PyTorch (B, C, H, W) buffer. The CUDA kernel
  reads, per sample, the first C*h*w entries of the (C, H, W) buffer flattened in C order as a
  (C, h, w) array; this returns that array in NHWC, (B, h, w, C). Identity when (h, w) == (H, W).

  Example (B = 1, C = 2, H = 2, W = 3, out_hw = (1, 2)): the channel-major buffer is
  [[a0 a1 a2; a3 a4 a5], [b0 b1 b2; b3 b4 b5]] -> flat a0..a5 b0..b5 -> first 4 values
  a0 a1 a2 a3 -> channel 0 = [a0 a1], channel 1 = [a2 a3].

  Raises:
    ValueError if h*w > H*W (the kernel would read past the buffer).
  """
  batch, height, width, channels = values.shape
  out_h, out_w = out_hw
  if (out_h, out_w) == (height, width):
    return values
  if out_h * out_w > height * width:
    raise ValueError(f"reinterpret_offset_buffer: a {out_h}x{out_w} output grid needs "
                     f"{channels * out_h * out_w} values per sample but the buffer {values.shape} "
                     f"holds {channels * height * width}.")
  channel_major = jnp.transpose(values, (0, 3, 1, 2)).reshape(batch, channels * height * width)
  prefix = channel_major[:, :channels * out_h * out_w].reshape(batch, channels, out_h, out_w)
  return jnp.transpose(prefix, (0, 2, 3, 1))


def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) linear-interpolation weights of PyTorch's align_corners=True resize."""
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  source = np.arange(size_out, dtype=np.float32) * np.float32(scale)
  low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = source - low
  matrix = np.zeros((size_out, size_in), np.float32)
  np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(size_out), high), frac)
  return matrix


def resize_bilinear_align_corners(x, out_hw: tuple[int, int]):
  """(B, h, w, C) -> (B, H, W, C), bilinear with align_corners=True (`F.upsample_bilinear`)."""
  rows = jnp.asarray(_align_corners_matrix(x.shape[1], out_hw[0]))
  cols = jnp.asarray(_align_corners_matrix(x.shape[2], out_hw[1]))
  x = jnp.einsum("oh,bhwc->bowc", rows, x)
  return jnp.einsum("pw,bowc->bopc", cols, x)


class Conv3x3Norm(nn.Module):
  """The original's `Conv3x3Norm` with GroupNorm: `conv` (DCNv2, or a plain 3x3 conv when not
  deformable, N(0, 0.01) weights as `DyConv.init_weights` gives it) then `bn` (GroupNorm)."""
  features: int
  stride: int
  gn_groups: int
  deformable: bool = True

  @nn.compact
  def __call__(self, x, offset=None, mask=None):
    if self.deformable:
      x = ModulatedDeformConv(self.features, stride=self.stride, name="conv")(x, offset, mask)
    else:
      x = nn.Conv(self.features, (3, 3), strides=self.stride, padding=1, kernel_init=_normal_001,
                  bias_init=nn.initializers.zeros, name="conv")(x)
    return nn.GroupNorm(self.gn_groups, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                        name="bn")(x)


class DyReLU(nn.Module):
  """`DYReLU(C, C)` as GLIP builds it: K=2 with bias, reduction 4, lambda 1 (so the coefficient
  scale is 2), init_a (1, 0), init_b (0, 0), no spatial branch.

  g = GAP(x) -> fc_0 (C -> C/4) -> ReLU -> fc_2 (C/4 -> 4C) -> hsigmoid, split in the order
  (a1, b1, a2, b2); a1 = 2(a1 - 0.5) + 1, a2 = 2(a2 - 0.5), b = b - 0.5;
  y = max(a1 x + b1, a2 x + b2) per channel. Both Linears keep PyTorch's default init.
  """
  channels: int

  @nn.compact
  def __call__(self, x):  # (B, H, W, C)
    squeeze = self.channels // DYRELU_REDUCTION
    pooled = jnp.mean(x, axis=(1, 2))  # (B, C)
    hidden = nn.relu(nn.Dense(squeeze, kernel_init=uniform_fan_in_init(self.channels),
                              bias_init=uniform_fan_in_init(self.channels), name="fc_0")(pooled))
    coefficients = h_sigmoid(nn.Dense(4 * self.channels, kernel_init=uniform_fan_in_init(squeeze),
                                      bias_init=uniform_fan_in_init(squeeze), name="fc_2")(hidden))
    a1, b1, a2, b2 = jnp.split(coefficients[:, None, None, :], 4, axis=-1)
    a1 = (a1 - 0.5) * 2.0 + 1.0
    a2 = (a2 - 0.5) * 2.0
    return jnp.maximum(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class DyConv(nn.Module):
  """One DyHead block over a feature pyramid (list of (B, H_l, W_l, channels) maps, finest
  first) -> list of maps of the same shapes. See the module docstring."""
  channels: int
  gn_groups: int = 16
  use_dyrelu: bool = True
  use_deform: bool = True
  use_dyfuse: bool = True

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    features = list(features)
    if len(features) < 2:
      raise ValueError(f"DyConv needs at least 2 pyramid levels; got {len(features)}.")
    for level, feature in enumerate(features):
      if feature.ndim != 4 or feature.shape[-1] != self.channels:
        raise ValueError(f"DyConv: level {level} has shape {feature.shape}; expected "
                         f"(B, H, W, {self.channels}).")
    convs = [Conv3x3Norm(self.channels, stride, self.gn_groups, self.use_deform,
                         name=f"DyConv_{k}") for k, stride in enumerate((1, 1, 2))]
    fan_in = self.channels * 9
    offset_conv = nn.Conv(OFFSET_CHANNELS + MASK_CHANNELS, (3, 3), padding=1,
                          kernel_init=uniform_fan_in_init(fan_in),
                          bias_init=uniform_fan_in_init(fan_in), name="offset")
    attention = nn.Conv(1, (1, 1), kernel_init=_normal_001, bias_init=nn.initializers.zeros,
                        name="AttnConv_1")

    outputs = []
    for level, feature in enumerate(features):
      height, width = feature.shape[1:3]
      if self.use_deform:
        offset_mask = offset_conv(feature)
        offset = offset_mask[..., :OFFSET_CHANNELS]
        mask = jax.nn.sigmoid(offset_mask[..., OFFSET_CHANNELS:])

      def apply_conv(conv: Conv3x3Norm, x):
        if not self.use_deform:
          return conv(x)
        out_hw = tuple(conv_output_size(size, 3, stride=conv.stride, padding=1, dilation=1)
                       for size in x.shape[1:3])
        return conv(x, reinterpret_offset_buffer(offset, out_hw),
                    reinterpret_offset_buffer(mask, out_hw))

      branches = [apply_conv(convs[1], feature)]
      if level > 0:
        branches.append(apply_conv(convs[2], features[level - 1]))
      if level < len(features) - 1:
        branches.append(resize_bilinear_align_corners(apply_conv(convs[0], features[level + 1]),
                                                      (height, width)))
      stacked = jnp.stack(branches)  # (branches, B, H, W, C)
      if self.use_dyfuse:
        pooled = jnp.mean(stacked, axis=(2, 3), keepdims=True)  # (branches, B, 1, 1, C)
        stacked = stacked * h_sigmoid(nn.relu(attention(pooled)))
      outputs.append(jnp.mean(stacked, axis=0))

    if self.use_dyrelu:
      relu = DyReLU(self.channels, name="relu")
      return [relu(x) for x in outputs]
    return [nn.relu(x) for x in outputs]


# ---------------------------------------------------------------------------------------------
# Official weights: one tower block's keys with 'module.rpn.head.dyhead_tower.{k}.' stripped.
# ---------------------------------------------------------------------------------------------


def dyconv_param_names(*, use_dyrelu: bool = True, use_deform: bool = True,
                       use_dyfuse: bool = True) -> list[str]:
  """The official state-dict names of one DyConv block (without the tower prefix)."""
  names = [f"DyConv.{k}.{part}.{leaf}" for k in range(3) for part in ("conv", "bn")
           for leaf in ("weight", "bias")]
  if use_deform:
    names += ["offset.weight", "offset.bias"]
  if use_dyfuse:
    names += ["AttnConv.1.weight", "AttnConv.1.bias"]
  if use_dyrelu:
    names += [f"relu.fc.{k}.{leaf}" for k in (0, 2) for leaf in ("weight", "bias")]
  return names


def convert_dyconv(state_dict: dict[str, np.ndarray], *, use_dyrelu: bool = True,
                   use_deform: bool = True, use_dyfuse: bool = True,
                   source: str = "<state dict>") -> dict:
  """Official DyConv state dict (tower prefix stripped) -> our nested params.

  'DyConv.0.conv.weight' (O, I, 3, 3) -> 'DyConv_0/conv/kernel' (3, 3, I, O);
  'relu.fc.0.weight' (out, in) -> 'relu/fc_0/kernel' (in, out); GroupNorm 'DyConv.k.bn.weight'
  -> 'DyConv_k/bn/scale'; biases keep their names. Raises one ValueError listing every unknown
  and missing name.
  """
  expected = set(dyconv_param_names(use_dyrelu=use_dyrelu, use_deform=use_deform,
                                    use_dyfuse=use_dyfuse))
  unknown = sorted(set(state_dict) - expected)
  missing = sorted(expected - set(state_dict))
  if unknown or missing:
    raise ValueError(f"{source}: does not match DyConv(use_dyrelu={use_dyrelu}, use_deform="
                     f"{use_deform}, use_dyfuse={use_dyfuse}); unknown ({len(unknown)}): "
                     f"{', '.join(unknown) or '-'}; missing ({len(missing)}): "
                     f"{', '.join(missing) or '-'}.")
  flat = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    path = re.sub(r"\.(\d+)", r"_\1", name).split(".")
    if path[-1] == "weight":
      if value.ndim == 4:
        value, path[-1] = value.transpose(2, 3, 1, 0), "kernel"  # OIHW -> HWIO
      elif value.ndim == 2:
        value, path[-1] = value.T, "kernel"  # nn.Linear (out, in) -> (in, out)
      else:
        path[-1] = "scale"  # GroupNorm
    flat["/".join(path)] = value
  return common.unflatten(flat)
