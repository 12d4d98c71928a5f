"""Modulated deformable convolution (DCNv2; Zhu et al., CVPR 2019, arXiv 1811.11168) in JAX.

Follows GLIP's (microsoft/GLIP) `maskrcnn_benchmark/layers/deform_conv.py` (`ModulatedDeformConv`)
and its CUDA kernel `maskrcnn_benchmark/csrc/cuda/deform_conv_kernel_cuda.cu`
(`modulated_deformable_im2col_gpu_kernel`, `dmcn_im2col_bilinear`), with one group and one
deformable group, as GLIP's DyHead uses it. For output position (oy, ox) and kernel tap
k = i * kw + j the kernel samples the input at

    (oy * stride - padding + i * dilation + dy_k,  ox * stride - padding + j * dilation + dx_k)

with bilinear interpolation in which corners outside the image contribute zero; a sample outside
(-1, H) x (-1, W) contributes zero altogether. The sample is multiplied by the tap's modulation
m_k, and the kernel sums taps and input channels (im2col + matmul).

Layout: NHWC maps, HWIO kernels. `offset` is (B, Ho, Wo, 2 * kh * kw) with the original's
channel order (dy_0, dx_0, dy_1, dx_1, ...), `mask` (B, Ho, Wo, kh * kw), already passed through
the sigmoid.

Implementation: gather-based. The input is zero-padded by one pixel so that a sample inside
(-1, H) x (-1, W) reads its out-of-image corners as zeros; the four corner rows are gathered from
the flattened map, weighted by bilinear weight x modulation x inside-flag, summed into
(B, Ho, Wo, taps, Cin) columns, and contracted with the kernel in one einsum. `jax.grad` gives
the gradients w.r.t. input, offsets, modulation and kernel: the corner weights and the einsum
are plain jnp, and the corner gather (`gather_bilinear`) has a written-out VJP that, like the
original's CUDA backward, keeps only its inputs and recomputes the gathered rows (a scatter-add
for the map, one dot per corner for the weights). Forward-mode differentiation (`jax.jvp`) of the
gather is therefore not available.

Deliberate choices:
  * Shapes are checked strictly: offsets and masks must be on the output grid. GLIP's DyHead
    passes buffers computed on another grid to the conv on the coarser level and the CUDA kernel
    reads them as a flat prefix; that reinterpretation is explicit in `dyconv.py`
    (`reinterpret_offset_buffer`), not hidden here.
  * As the original (`custom_fwd(cast_inputs=torch.float32)`), the computation runs in float32;
    the result is cast back to the input's dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def uniform_fan_in_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): `ModulatedDeformConv.reset_parameters`' weight init and
  PyTorch's default Conv2d/Linear weight and bias init (kaiming_uniform with a=sqrt(5))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv_output_size(size: int, kernel: int, *, stride: int, padding: int, dilation: int) -> int:
  """Output side of a convolution, as the original's `_infer_shape`."""
  return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def _corner_rows(index_low, row_length: int):
  """Flat row indices (N,) of the four corners (low-low, low-high, high-low, high-high)."""
  flat_index = index_low.reshape(-1)
  return [flat_index + step for step in (0, 1, row_length, row_length + 1)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_bilinear(flat, index_low, corner_weights, row_length: int):
  """sum_q corner_weights[..., q] * flat[index_low + step_q] -> index_low.shape + (C,).

  flat (N, C) is a flattened map with rows of `row_length` pixels; index_low (...) int32 is the
  row of each sample's upper-left corner; corner_weights (..., 4) weigh the corners in the order
  (+0, +1, +row_length, +row_length + 1). The backward is written out (a dot per corner for the
  weights, a scatter-add for the map) and keeps only the inputs as residuals, as the original's
  CUDA backward recomputes its columns; autodiff of the gathers would keep four column-sized
  arrays and, on XLA's CPU backend, reduce them ~5x slower.
  """
  columns = 0.0
  for corner, rows in enumerate(_corner_rows(index_low, row_length)):
    columns = columns + corner_weights.reshape(-1, 4)[:, corner, None] * flat[rows]
  return columns.reshape(*index_low.shape, flat.shape[-1])


def _gather_bilinear_forward(flat, index_low, corner_weights, row_length):
  return (gather_bilinear(flat, index_low, corner_weights, row_length),
          (flat, index_low, corner_weights))


def _gather_bilinear_backward(row_length, residuals, columns_grad):
  flat, index_low, corner_weights = residuals
  columns_grad = columns_grad.reshape(-1, flat.shape[-1])  # (N, C)
  weights = corner_weights.reshape(-1, 4)
  flat_grad, weight_grads = jnp.zeros_like(flat), []
  for corner, rows in enumerate(_corner_rows(index_low, row_length)):
    weight_grads.append(jnp.einsum("nc,nc->n", columns_grad, flat[rows]))
    flat_grad = flat_grad.at[rows].add(weights[:, corner, None] * columns_grad)
  return flat_grad, None, jnp.stack(weight_grads, axis=-1).reshape(corner_weights.shape)


gather_bilinear.defvjp(_gather_bilinear_forward, _gather_bilinear_backward)


def modulated_deform_conv(x, offset, mask, kernel, bias=None, *, stride: int = 1,
                          padding: int = 1, dilation: int = 1):
  """DCNv2 forward: (B, H, W, Cin) -> (B, Ho, Wo, Cout).

  Args:
    x: (B, H, W, Cin) input map.
    offset: (B, Ho, Wo, 2 * kh * kw) sampling offsets, interleaved (dy, dx) per tap k = i*kw + j.
    mask: (B, Ho, Wo, kh * kw) modulation (already sigmoid'ed).
    kernel: (kh, kw, Cin, Cout).
    bias: optional (Cout,).
    stride, padding, dilation: ints, the same along both axes.

  Raises:
    ValueError when a shape does not match.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"modulated_deform_conv: x must be (B, H, W, Cin) and kernel (kh, kw, Cin, "
                     f"Cout); got x {x.shape}, kernel {kernel.shape}.")
  batch, height, width, in_channels = x.shape
  kernel_h, kernel_w, kernel_in, out_channels = kernel.shape
  if kernel_in != in_channels:
    raise ValueError(f"modulated_deform_conv: kernel {kernel.shape} expects {kernel_in} input "
                     f"channels, x {x.shape} has {in_channels}.")
  out_h = conv_output_size(height, kernel_h, stride=stride, padding=padding, dilation=dilation)
  out_w = conv_output_size(width, kernel_w, stride=stride, padding=padding, dilation=dilation)
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"modulated_deform_conv: input {x.shape} is too small for kernel "
                     f"{kernel_h}x{kernel_w}, padding {padding}, dilation {dilation}.")
  taps = kernel_h * kernel_w
  for name, value, channels in (("offset", offset, 2 * taps), ("mask", mask, taps)):
    if tuple(value.shape) != (batch, out_h, out_w, channels):
      raise ValueError(f"modulated_deform_conv: {name} has shape {tuple(value.shape)}; expected "
                       f"{(batch, out_h, out_w, channels)} (output grid of x {tuple(x.shape)} "
                       f"with stride {stride}, padding {padding}, dilation {dilation}).")
  if bias is not None and tuple(bias.shape) != (out_channels,):
    raise ValueError(f"modulated_deform_conv: bias has shape {tuple(bias.shape)}; expected "
                     f"{(out_channels,)}.")
  out_dtype = x.dtype
  x, offset, mask, kernel = (jnp.asarray(a, jnp.float32) for a in (x, offset, mask, kernel))

  # Sampling positions (B, Ho, Wo, taps).
  tap_y = np.repeat(np.arange(kernel_h), kernel_w) * dilation  # (taps,)
  tap_x = np.tile(np.arange(kernel_w), kernel_h) * dilation
  grid_y = (np.arange(out_h) * stride - padding)[:, None, None] + tap_y  # (Ho, 1, taps)
  grid_x = (np.arange(out_w) * stride - padding)[None, :, None] + tap_x  # (1, Wo, taps)
  y = grid_y.astype(np.float32) + offset[..., 0::2]
  x_pos = grid_x.astype(np.float32) + offset[..., 1::2]
  inside = (y > -1) & (y < height) & (x_pos > -1) & (x_pos < width)
  y_low, x_low = jnp.floor(y), jnp.floor(x_pos)
  frac_y, frac_x = y - y_low, x_pos - x_low
  modulation = jnp.where(inside, mask, 0.0)

  # Row indices into the zero-padded, flattened map: a sample inside the open box has its low
  # corner in [-1, H-1], i.e. [0, H] after the one-pixel pad, and its high corner in [1, H + 1].
  # Samples outside are clipped into range; their weight is zero.
  padded_w = width + 2
  rows_low = jnp.clip(y_low.astype(jnp.int32) + 1, 0, height)
  cols_low = jnp.clip(x_low.astype(jnp.int32) + 1, 0, width)
  image_start = (jnp.arange(batch, dtype=jnp.int32) * (height + 2) * padded_w)[:, None, None, None]
  index_low = image_start + rows_low * padded_w + cols_low  # (B, Ho, Wo, taps)
  flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, in_channels)

  corner_weights = jnp.stack([(1 - frac_y) * (1 - frac_x), (1 - frac_y) * frac_x,
                              frac_y * (1 - frac_x), frac_y * frac_x], axis=-1)
  columns = gather_bilinear(flat, index_low, corner_weights * modulation[..., None], padded_w)
  # columns: (B, Ho, Wo, taps, Cin)
  out = jnp.einsum("bhwkc,kco->bhwo", columns, kernel.reshape(taps, in_channels, out_channels))
  if bias is not None:
    out = out + jnp.asarray(bias, jnp.float32)
  return out.astype(out_dtype)


class ModulatedDeformConv(nn.Module):
  """GLIP's `ModulatedDeformConv` (one group, one deformable group) on NHWC maps.

  Params `kernel` (kh, kw, Cin, features) ~ U(+-1/sqrt(Cin*kh*kw)) and `bias` (features,) = 0,
  the original's `reset_parameters`. `padding` defaults to kernel_size // 2.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = True
  padding: Optional[int] = None
  dilation: int = 1

  @nn.compact
  def __call__(self, x, offset, mask):
    fan_in = x.shape[-1] * self.kernel_size ** 2
    kernel = self.param("kernel", uniform_fan_in_init(fan_in),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    padding = self.kernel_size // 2 if self.padding is None else self.padding
    return modulated_deform_conv(x, offset, mask, kernel, bias, stride=self.stride,
                                 padding=padding, dilation=self.dilation)
