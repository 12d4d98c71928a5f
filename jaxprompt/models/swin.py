"""Swin Transformer (Liu et al., ICCV 2021, arXiv 2103.14030) as Flax Linen modules.

Follows microsoft/Swin-Transformer `models/swin_transformer.py`: patch embedding + LayerNorm, four
stages of (shifted-)window attention blocks with a relative position bias, 2x2 patch merging
between stages, final LayerNorm, mean pool, optional head. The parameter tree mirrors Microsoft's
checkpoint names (`patch_embed/proj`, `layers_{i}/blocks_{j}/attn/qkv`, `layers_{i}/downsample`,
`norm`, `head`), so `load` (end of file) reads an official `.pth` by renaming and transposing only;
transformers' `SwinModel` weights are first renamed to Microsoft's names.

Deliberate choices:
  * Token maps stay (B, H, W, C) between blocks instead of Microsoft's (B, H*W, C) plus a stored
    resolution: modules need no resolution fields, and prompt maps that follow the image map
    through windows and merging (SA2VP) keep their layout.
  * As in the original, a block whose map is no larger than the window in some side uses one
    window of side min(H, W) and no shift. Unlike transformers, nothing is padded: an image
    whose stage maps do not tile into windows or halve evenly is rejected (`check_image_size`).
  * `pad_to_fit=True` switches to the detection Swin's padding instead (microsoft/GLIP
    `maskrcnn_benchmark/modeling/backbone/swint.py`, from Swin-Transformer-Object-Detection):
    the image is zero-padded right/bottom to a multiple of the patch; each block zero-pads its
    normalised map right/bottom to a multiple of the window (padded tokens are attended to, only
    the shift mask of the padded grid applies) and crops the result back; windows never shrink
    and the shift stays window // 2 however small the map; patch merging zero-pads odd sides, so
    a side n becomes (n + 1) // 2. Any image size is accepted.
  * Only stochastic depth (`drop_path_rate`) is offered; the original's dropout and attention
    dropout default to 0 and no released recipe (Swin, VPT, SA2VP) changes them.
  * Hooks for prompt methods: `Model.__call__` takes `block_hook(stage, index, block, x) -> x`,
    which runs instead of `block(x)` (it may call `block` on other maps too, or add to its result),
    and returns every stage's map before merging in `aux['stages']`. A hook's own modules must be
    created before the call (a module constructed inside the hook becomes a child of the running
    stage). Methods that need more (a second map through the frozen patch-embed norm) subclass
    `Model` and compose `make_patch_embed` and `make_stage` themselves.
  * Prompt tokens (VPT): `SwinBlock` and `PatchMerging` optionally carry `prompts` (B, P, C) that
    join every window's attention and are averaged back over windows; `make_stage(i, stage_class)`
    builds a `Stage` subclass with its own forward.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import common

# name -> (embed_dim, depths, num_heads). 'mu' and 'pico' are tiny sizes for tests and demos
# ('pico' keeps 16 channels per head in every stage, as GLIP-tiny's trunk).
SIZES = {
    "mu": (16, (2, 2, 2, 2), (2, 2, 4, 4)),
    "pico": (16, (2, 2, 2, 2), (1, 2, 4, 8)),
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
LAYER_NORM_EPS = 1e-5  # PyTorch's default, used by every Swin LayerNorm
MASKED = -100.0  # the original's additive logit for token pairs from different shifted regions

# block_hook(stage, index, block, x) -> x: `common.BlockHook` with the stage bound first; `block(y)`
# runs the frozen block on any (B, H, W, C) map.
BlockHook = Callable[[int, int, Callable[[jnp.ndarray], jnp.ndarray], jnp.ndarray], jnp.ndarray]
_dense_init = dict(kernel_init=nn.initializers.truncated_normal(0.02),
                   bias_init=nn.initializers.zeros)


def decode_variant(variant: str) -> dict:
  """'B' -> dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))."""
  if variant not in SIZES:
    raise ValueError(f"Unknown Swin variant {variant!r}: expected one of {sorted(SIZES)}.")
  embed_dim, depths, num_heads = SIZES[variant]
  return dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads)


def effective_window(height: int, width: int, window_size: int, *,
                     pad_to_fit: bool = False) -> tuple[int, int]:
  """(window, shift of the shifted blocks) on an height x width map, as the original clips them:
  a map no larger than the window in some side gets one window of that side and no shift.
  With `pad_to_fit` (the detection Swin) the window and shift never change."""
  if not pad_to_fit and min(height, width) <= window_size:
    return min(height, width), 0
  return window_size, window_size // 2


def check_image_size(height: int, width: int, *, patch_size: int, num_stages: int,
                     window_size: int) -> None:
  """Raises a ValueError unless every stage's map tiles into windows and halves evenly."""
  multiple = patch_size * 2 ** (num_stages - 1) * window_size
  hint = (f"Swin with patch {patch_size}, {num_stages} stages and window {window_size} needs "
          f"image sides that are multiples of {multiple} (e.g. {multiple}x{multiple}).")
  if height % patch_size or width % patch_size:
    raise ValueError(f"Image size {height}x{width} is not divisible by the patch size "
                     f"{patch_size}. {hint}")
  h, w = height // patch_size, width // patch_size
  for stage in range(num_stages):
    window, _ = effective_window(h, w, window_size)
    if h % window or w % window:
      raise ValueError(f"Image size {height}x{width}: the stage-{stage} map {h}x{w} does not "
                       f"tile into {window}x{window} windows. {hint}")
    if stage < num_stages - 1:
      if h % 2 or w % 2:
        raise ValueError(f"Image size {height}x{width}: the stage-{stage} map {h}x{w} cannot be "
                         f"merged 2x2 (odd side). {hint}")
      h, w = h // 2, w // 2


def pad_bottom_right(x, multiple: int):
  """Zero-pads the H and W axes of (B, H, W, C) at the end up to multiples of `multiple`."""
  height, width = x.shape[1:3]
  pad_h, pad_w = -height % multiple, -width % multiple
  if not (pad_h or pad_w):
    return x
  return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def window_partition(x, window: int):
  """(B, H, W, C) -> (B, H/w * W/w, w*w, C): windows in row-major order, tokens row-major inside."""
  batch, height, width, channels = x.shape
  if height % window or width % window:
    raise ValueError(f"A {height}x{width} map does not tile into {window}x{window} windows.")
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def window_reverse(windows, window: int, height: int, width: int):
  """Inverse of `window_partition`: (B, nW, w*w, C) -> (B, H, W, C)."""
  batch, channels = windows.shape[0], windows.shape[-1]
  x = windows.reshape(batch, height // window, width // window, window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def relative_position_index(window: int) -> np.ndarray:
  """(w*w, w*w) row into the ((2w-1)^2, heads) bias table for each (query, key) pair in a window.

  The offset (dy, dx) = query - key, each in [-(w-1), w-1], maps to (dy + w-1) * (2w-1) + dx + w-1,
  the original's order, so tables from its checkpoints are read unchanged.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"), -1)
  coords = coords.reshape(-1, 2)  # (w*w, 2) row-major
  offsets = coords[:, None, :] - coords[None, :, :] + (window - 1)  # (w*w, w*w, 2) in [0, 2w-2]
  return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """(nW, w*w, w*w) additive mask for attention after a cyclic shift by -shift.

  Rolling wraps the last `shift` rows/columns around to the start; windows at the border then mix
  tokens that were not neighbours. Each side is split in three regions ([0, H-w), [H-w, H-shift),
  [H-shift, H)) and token pairs from different (row, column) regions get MASKED.
  """
  def regions(size):
    index = np.arange(size)
    return (index >= size - window).astype(np.int32) + (index >= size - shift)

  labels = regions(height)[:, None] * 3 + regions(width)[None, :]  # (H, W)
  labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, w*w)
  return np.where(labels[:, :, None] != labels[:, None, :], MASKED, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside each window, with a learned relative position bias.

  Tokens in front of a window's w*w (VPT's prompts, the same in every window) get no position bias
  and no shift mask: both are zero-padded for their rows and columns.
  """
  num_heads: int
  window_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, windows, mask=None):
    # windows: (B, nW, N, C) with N = [P +] window_size^2; mask: (nW, w*w, w*w) or None.
    *lead, n, channels = windows.shape
    head_dim = channels // self.num_heads
    qkv = nn.Dense(3 * channels, dtype=self.dtype, name="qkv", **_dense_init)(windows)
    q, k, v = jnp.moveaxis(qkv.reshape(*lead, n, 3, self.num_heads, head_dim), -3, 0)
    logits = jnp.einsum("...qhd,...khd->...hqk", q * head_dim ** -0.5, k)  # (B, nW, H, N, N)
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(self.window_size)].transpose(2, 0, 1)  # (H, w*w, w*w)
    extra = n - self.window_size ** 2
    leading = ((0, 0), (extra, 0), (extra, 0))
    logits = logits.astype(jnp.float32) + jnp.pad(bias, leading)
    if mask is not None:
      logits = logits + jnp.pad(mask, leading)[:, None]
    probs = nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, v).reshape(*lead, n, channels)
    return nn.Dense(channels, dtype=self.dtype, name="proj", **_dense_init)(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2, the original's `Mlp` (its dropouts are 0)."""
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1", **_dense_init)(x)
    y = nn.gelu(y, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2", **_dense_init)(y)


class SwinBlock(nn.Module):
  """x + DropPath((S)W-MSA(LN(x))), then x + DropPath(MLP(LN(x))), on a (B, H, W, C) map.

  Odd blocks of a stage are `shifted`: the map is rolled by -window/2 before partitioning (and
  back after), so windows straddle the previous block's window borders.

  With `prompts` (B, P, C) (VPT on Swin) the block returns `(x, prompts)`: the normalised prompts
  lead every window's attention (no position bias, no shift mask), their outputs are averaged over
  the windows, and the residuals and MLP treat prompts and map tokens as one sequence per sample
  (one drop-path draw for both).

  `pad_to_fit` (detection Swin): attention runs on the normalised map zero-padded right/bottom to
  a multiple of the window, with the full window and shift, and its output is cropped back.
  """
  num_heads: int
  window_size: int
  shifted: bool
  drop_path: float = 0.0
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  pad_to_fit: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True, prompts=None):
    batch, height, width, channels = x.shape
    window, shift = effective_window(height, width, self.window_size, pad_to_fit=self.pad_to_fit)
    shift = shift if self.shifted else 0
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)
    # Stochastic depth: drop the whole residual branch per sample, scale survivors by 1/(1-p).
    drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))

    norm1 = norm("norm1")
    y = norm1(x)
    if self.pad_to_fit:
      y = pad_bottom_right(y, window)  # (B, Hp, Wp, C); the padding is zeros after the norm
    padded_height, padded_width = y.shape[1:3]
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask = shifted_window_mask(padded_height, padded_width, window, shift) if shift else None
    windows = window_partition(y, window)  # (B, nW, w*w, C)
    if prompts is not None:
      num_prompts = prompts.shape[1]
      shared = norm1(prompts)[:, None]  # (B, 1, P, C), the same in every window
      windows = jnp.concatenate(
          [jnp.broadcast_to(shared, (batch, windows.shape[1], num_prompts, channels)), windows],
          axis=2)
    y = WindowAttention(self.num_heads, window, self.dtype, name="attn")(windows, mask)
    if prompts is not None:
      prompt_out, y = y[:, :, :num_prompts].mean(axis=1), y[:, :, num_prompts:]
    y = window_reverse(y, window, padded_height, padded_width)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :height, :width]
    if prompts is not None:  # one (B, 1, P + H*W, C) sequence for the residuals and the MLP
      x = jnp.concatenate([prompts, x.reshape(batch, -1, channels)], axis=1)[:, None]
      y = jnp.concatenate([prompt_out, y.reshape(batch, -1, channels)], axis=1)[:, None]
    x = x + drop_path(y, deterministic=deterministic)

    y = Mlp(int(channels * self.mlp_ratio), self.dtype, name="mlp")(norm("norm2")(x))
    x = x + drop_path(y, deterministic=deterministic)
    if prompts is None:
      return x
    return x[:, 0, num_prompts:].reshape(batch, height, width, channels), x[:, 0, :num_prompts]


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> one token: (B, H, W, C) -> (B, H/2, W/2, 2C) via LN(4C) and Linear.

  With `prompts` (B, P, C) it returns `(x, prompts)`: each prompt is concatenated with three
  copies of itself to 4C (VPT's prompt "upsampling") and goes through the same LN and Linear.
  With `pad_to_fit` (detection Swin) odd sides are zero-padded at the end: (H+1)//2 x (W+1)//2.
  """
  dtype: Any = jnp.float32
  pad_to_fit: bool = False

  @nn.compact
  def __call__(self, x, *, prompts=None):
    if self.pad_to_fit:
      x = pad_bottom_right(x, 2)
    _, height, width, channels = x.shape
    if height % 2 or width % 2:
      raise ValueError(f"Patch merging needs even map sides, got {height}x{width}.")
    # The original's order: (even row, even col), (odd, even), (even, odd), (odd, odd).
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")
    reduction = nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, name="reduction",
                         kernel_init=_dense_init["kernel_init"])
    if prompts is None:
      return reduction(norm(x))
    return reduction(norm(x)), reduction(norm(jnp.tile(prompts, (1, 1, 4))))


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> (B, H/p, W/p, D), then LayerNorm.

  Setup-style so that a second stream can reuse the frozen `norm` alone (SA2VP normalises its
  prompt map with it): `embed.norm(prompt_map)`. With `pad_to_fit` (detection Swin) the image is
  first zero-padded right/bottom to a multiple of the patch size.
  """
  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32
  pad_to_fit: bool = False

  def setup(self):
    self.proj = nn.Conv(self.embed_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                        padding="VALID", dtype=self.dtype)
    self.norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype)

  def __call__(self, images):
    if self.pad_to_fit:
      images = pad_bottom_right(images, self.patch_size)
    return self.norm(self.proj(images))


class Stage(nn.Module):
  """`depth` blocks (even ones plain, odd ones shifted), then patch merging unless last.

  Returns `(output, features)`: the merged map for the next stage and the map before merging.
  `pad_to_fit` goes to the blocks and the merging (detection Swin, see the module docstring).
  """
  depth: int
  num_heads: int
  window_size: int
  drop_path_rates: tuple[float, ...]
  downsample: bool
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  pad_to_fit: bool = False

  def make_block(self, j: int) -> SwinBlock:
    """Block `j` with its checkpoint name; prompt methods that run blocks themselves call this."""
    return SwinBlock(self.num_heads, self.window_size, shifted=j % 2 == 1,
                     drop_path=self.drop_path_rates[j], mlp_ratio=self.mlp_ratio,
                     dtype=self.dtype, pad_to_fit=self.pad_to_fit, name=f"blocks_{j}")

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True,
               block_hook: Optional[common.BlockHook] = None):
    for j in range(self.depth):
      block = functools.partial(self.make_block(j), deterministic=deterministic)
      x = common.run_block(j, block, x, block_hook)
    if not self.downsample:
      return x, x
    return PatchMerging(self.dtype, pad_to_fit=self.pad_to_fit, name="downsample")(x), x


class Model(nn.Module):
  """Swin classifier: patch embedding, 4 stages, final LayerNorm, mean pool, linear head.

  Returns `(logits, aux)`: aux holds `stages` (each stage's (B, H_i, W_i, C_i) map before merging;
  the last one before the final norm), `encoded` (B, N, C) after the final norm (transformers'
  `last_hidden_state`) and `pre_logits` (B, C), their mean (its `pooler_output`). With
  `num_classes=0` there is no head and logits are the pre-logits. `pad_to_fit=True` pads as the
  detection Swin does (module docstring) and accepts any image size.
  """
  num_classes: int
  variant: str = "B"
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  pad_to_fit: bool = False

  def make_patch_embed(self) -> PatchEmbed:
    embed_dim = decode_variant(self.variant)["embed_dim"]
    return PatchEmbed(embed_dim, self.patch_size, self.dtype, pad_to_fit=self.pad_to_fit,
                      name="patch_embed")

  def make_stage(self, i: int, stage_class: Optional[type] = None) -> Stage:
    """Stage `i` (Microsoft's `layers.{i}`); drop-path rates rise linearly over all blocks.

    `stage_class`: a `Stage` subclass with the same fields (a prompt method's own forward).
    """
    v = decode_variant(self.variant)
    depths = v["depths"]
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    rates = tuple(float(r) for r in rates[sum(depths[:i]):sum(depths[:i + 1])])
    return (stage_class or Stage)(
        depths[i], v["num_heads"][i], self.window_size, rates, downsample=i < len(depths) - 1,
        mlp_ratio=self.mlp_ratio, dtype=self.dtype, pad_to_fit=self.pad_to_fit,
        name=f"layers_{i}")

  @nn.compact
  def __call__(self, images, *, train: bool = False, block_hook: Optional[BlockHook] = None):
    num_stages = len(decode_variant(self.variant)["depths"])
    if not self.pad_to_fit:
      check_image_size(*images.shape[1:3], patch_size=self.patch_size, num_stages=num_stages,
                       window_size=self.window_size)
    x = self.make_patch_embed()(images)  # (B, H/4, W/4, D)
    stages = []
    for i in range(num_stages):
      hook = None if block_hook is None else functools.partial(block_hook, i)
      x, features = self.make_stage(i)(x, deterministic=not train, block_hook=hook)
      stages.append(features)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
    encoded = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, 49, 1024) for B at 224
    pre_logits = encoded.mean(axis=1)
    aux = {"stages": tuple(stages), "encoded": encoded, "pre_logits": pre_logits}
    if not self.num_classes:
      return pre_logits, aux
    kernel_init = nn.initializers.zeros if self.head_zeroinit else _dense_init["kernel_init"]
    logits = nn.Dense(self.num_classes, kernel_init=kernel_init, dtype=self.dtype, name="head")(
        pre_logits)
    return logits.astype(jnp.float32), aux


# ---------------------------------------------------------------------------------------------
# Pretrained weights.
#
# Microsoft's `.pth` files (state dict under 'model'; SA2VP uses swin_base_patch4_window7_224_22k)
# differ from our tree only in separators, 'weight' -> 'kernel'/'scale' and PyTorch layouts
# (`convert_microsoft_swin`). transformers' `SwinModel`/`SwinForImageClassification` names are
# first renamed to Microsoft's (`convert_hf_swin`). Both end in `common.merge_params` (strict).
# ---------------------------------------------------------------------------------------------

_MICROSOFT_PARAM = re.compile(
    r"(?:patch_embed\.(?:proj|norm)|norm|head|layers\.\d+\.downsample\.(?:norm|reduction)"
    r"|layers\.\d+\.blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))"
    r"\.(?:weight|bias)|layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table")
# Buffers saved next to the weights; both are functions of the window and recomputed here.
_MICROSOFT_BUFFER = re.compile(
    r"layers\.\d+\.blocks\.\d+\.(?:attn\.relative_position_index|attn_mask)")

# transformers names -> Microsoft names: substitutions applied in order, after dropping an optional
# 'swin.' prefix. Files (the Hub, `save_pretrained`) use the legacy names ('attention.self.query');
# transformers >= 5 modules the new ones ('attention.q_proj'). Query, key and value become
# '.attn.q/k/v.' and are then concatenated into the fused 'attn.qkv'.
_HF_RENAMES = tuple((re.compile(pattern), target) for pattern, target in (
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.layers\.", "layers."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.(?:self|relative_position_bias)\.relative_", ".attn.relative_"),
    (r"\.attention\.(?:self\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(?:self\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:self\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.(?:intermediate\.dense|mlp\.fc1)\.", ".mlp.fc1."),
    (r"\.(?:output\.dense|mlp\.fc2)\.", ".mlp.fc2."),
))
_QKV_PART = re.compile(r"(layers\.\d+\.blocks\.\d+\.attn)\.([qkv])\.(weight|bias)")


def convert_microsoft_swin(state_dict: dict[str, np.ndarray], *,
                           source: str = "<state dict>") -> dict:
  """Microsoft Swin state dict -> our nested params.

  'layers.0.blocks.1.attn.qkv.weight' -> 'layers_0/blocks_1/attn/qkv/kernel', transposed from
  (out, in) to (in, out); the patch convolution goes OIHW -> HWIO; LayerNorm weights become
  'scale'. `relative_position_index` and `attn_mask` buffers are dropped. Other names raise a
  ValueError listing them all (e.g. `absolute_pos_embed`: `ape=True` is not supported).
  """
  unknown = sorted(name for name in state_dict
                   if not (_MICROSOFT_PARAM.fullmatch(name) or _MICROSOFT_BUFFER.fullmatch(name)))
  if unknown:
    raise ValueError(f"{source}: not Swin parameters ({len(unknown)}): " + ", ".join(unknown))
  flat = {}
  for name, value in state_dict.items():
    if _MICROSOFT_BUFFER.fullmatch(name):
      continue
    value = np.asarray(value)
    path = re.sub(r"(layers|blocks)\.(\d+)", r"\1_\2", name).split(".")
    if path[-1] == "weight":
      if value.ndim == 4:
        value, path[-1] = value.transpose(2, 3, 1, 0), "kernel"  # (D, 3, p, p) -> (p, p, 3, D)
      elif value.ndim == 2:
        value, path[-1] = value.T, "kernel"  # nn.Linear (out, in) -> (in, out)
      else:
        path[-1] = "scale"
    flat["/".join(path)] = value
  return common.unflatten(flat)


def convert_hf_swin(state_dict: dict[str, np.ndarray], *,
                    source: str = "<state dict>") -> dict[str, np.ndarray]:
  """transformers `SwinModel`/`SwinForImageClassification` state dict -> Microsoft names.

  Follows transformers `models/swin/modeling_swin.py`, whose stage `encoder.layers.{i}` ends
  with its `downsample` just as Microsoft's `layers.{i}` does. Query, key and value weights are
  concatenated in that order into `qkv`; `classifier` becomes `head`. Names it does not know
  raise a ValueError listing them all.
  """
  renamed, unknown = {}, []
  for hf_name, value in state_dict.items():
    name = hf_name.removeprefix("swin.")
    for pattern, target in _HF_RENAMES:
      name = pattern.sub(target, name)
    if not (_MICROSOFT_PARAM.fullmatch(name) or _MICROSOFT_BUFFER.fullmatch(name)
            or _QKV_PART.fullmatch(name)):
      unknown.append(hf_name)
    elif name in renamed:
      raise ValueError(f"{source}: {renamed[name][0]!r} and {hf_name!r} both map to {name!r} "
                       "(a mix of legacy and transformers>=5 names?).")
    else:
      renamed[name] = (hf_name, np.asarray(value))
  if unknown:
    raise ValueError(f"{source}: not transformers Swin parameters ({len(unknown)}): "
                     + ", ".join(sorted(unknown)))
  out, qkv = {}, {}
  for name, (_, value) in renamed.items():
    match = _QKV_PART.fullmatch(name)
    if match:
      qkv.setdefault(f"{match[1]}.qkv.{match[3]}", {})[match[2]] = value
    else:
      out[name] = value
  for name, parts in qkv.items():
    if len(parts) != 3:
      raise ValueError(f"{source}: {name!r} needs query, key and value (q, k, v); found only "
                       f"{', '.join(sorted(parts))}.")
    out[name] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return out


def resize_relative_position_bias_table(table: np.ndarray, target_rows: int) -> np.ndarray:
  """((2w-1)^2, heads) -> (target_rows, heads) for another window size.

  As Microsoft's `utils.py::load_pretrained` when fine-tuning at a new window: the table is a
  (2w-1) x (2w-1) grid per head, resized with PyTorch's bicubic `F.interpolate` (reproduced here
  in numpy, separably).
  """
  table = np.asarray(table)
  old_side, new_side = np.sqrt([table.shape[0], target_rows]).round().astype(int)
  if table.ndim != 2 or old_side ** 2 != table.shape[0] or new_side ** 2 != target_rows:
    raise ValueError(f"Cannot resize a relative position bias table {table.shape} to "
                     f"{target_rows} rows: both must be square numbers of rows.")
  matrix = common.torch_bicubic_matrix(old_side, new_side)
  grid = table.reshape(old_side, old_side, -1).astype(np.float64)
  grid = np.einsum("ai,bj,ijh->abh", matrix, matrix, grid)
  return grid.reshape(target_rows, -1).astype(table.dtype)


def load(init_params: dict, path: str, *, dont_load=("head/.*",)) -> dict:
  """Loads pretrained Swin weights into `init_params` (the 'params' collection, nested).

  `path` is a `.pth`/`.pt`/`.bin`/`.safetensors` state dict (`common.load_torch_state_dict`
  unwraps Microsoft's 'model' entry). Names decide the format: transformers' ('embeddings.',
  'encoder.', optionally under 'swin.') or Microsoft's. Relative position bias tables are
  resized when the model's window differs from the checkpoint's. Merging is strict
  (`common.merge_params`): model params matching a `dont_load` regex keep their init values and
  checkpoint entries matching one are dropped.
  """
  path = os.fspath(path)
  if set(init_params) == {"params"}:
    raise ValueError("swin.load takes the 'params' collection: pass variables['params'], not the "
                     "whole variables dict.")
  state = common.load_torch_state_dict(path)
  if any(name.removeprefix("swin.").startswith(("embeddings.", "encoder.")) for name in state):
    state = convert_hf_swin(state, source=path)
  loaded = common.flatten(convert_microsoft_swin(state, source=path))

  dont_load = tuple(dont_load)
  init = common.flatten(init_params)
  for name, table in loaded.items():
    if (name.endswith("relative_position_bias_table") and name in init
        and not any(re.fullmatch(p, name) for p in dont_load)):
      old, new = np.shape(table), np.shape(init[name])
      if len(old) == len(new) == 2 and old[1] == new[1] and old[0] != new[0]:
        loaded[name] = resize_relative_position_bias_table(table, new[0])
  return common.merge_params(loaded, init_params, dont_load=dont_load, source=path)
