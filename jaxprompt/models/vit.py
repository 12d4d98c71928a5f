"""Vision Transformer (Dosovitskiy et al., ICLR 2021) as Flax Linen modules.

Follows google-research/vision_transformer `vit_jax/models_vit.py`: the parameter tree uses the
same names as Google's released `.npz` checkpoints (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `head`), so loading one is a rename-free unflatten (`load` at the end
of this file, which also converts transformers' PyTorch `ViTModel` weights).

Deliberate choices:
  * GELU is exact (erf) by default, as in the PyTorch ports that VPT and SA2VP train with
    (KMnP/vpt `src/models/vit_backbones/vit.py`) and in transformers' `ViTModel`; Google's Flax code
    uses the tanh approximation (`gelu_approximate=True` reproduces it).
  * LayerNorm epsilon is a field: 1e-6 as in Google/VPT; transformers' ViT configs often say 1e-12.
  * `Encoder` takes an optional `block_hook(i, block, x) -> x` (`common.BlockHook`, the protocol
    shared with Swin and CLIP), run instead of `block(x)` on the token sequence. Prompt methods use
    it to insert or replace prompt tokens without a second copy of the encoder (see
    `jaxprompt/prompts/vpt.py`).
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from jaxprompt.models import common

# name -> (width, depth, mlp_dim, num_heads). 'mu' is a tiny size for tests and demos.
SIZES = {
    "mu": (32, 2, 64, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not match or match.group(1) not in SIZES:
    raise ValueError(
        f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size in "
        f"{sorted(SIZES)} and an integer patch, e.g. 'B/16'.")
  width, depth, mlp_dim, num_heads = SIZES[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(match.group(2)))


def _mix32(h):
  """A full-avalanche 32-bit integer mixer (the 'lowbias32' constants of C. Wellons' hash-prospector)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def counter_bits(key, shape: tuple[int, ...]):
  """uint32 random bits of `shape` from `key`: element i gets mix(mix(i ^ k0) ^ k1).

  A counter-based generator like threefry, but two rounds of a 7-operation mixer per element
  instead of 20 rounds of threefry per pair, computed from the element's position alone (an iota),
  so XLA fuses it into the consumer and no bits array is written. Being a function of the global
  position, the bits are the same however the array is sharded. Arrays of 2^32 elements or more
  are refused (positions would repeat).
  """
  if math.prod(shape) >= 2**32:
    raise ValueError(f"counter_bits: {math.prod(shape)} elements; at most 2^32 - 1 per draw.")
  k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
  position = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return _mix32(_mix32(position ^ k0) ^ k1)


class Dropout(nn.Module):
  """Inverted dropout with a mask from `counter_bits` (drop where bits < rate * 2^32).

  `nn.Dropout` draws threefry bits into a buffer and reads them back; with the backbone's dropout
  live (SA2VP trains that way) that was ~8 % of a CPU train step. Here the mask is a hash of each
  element's position and the draw's key, computed inside the fused multiply, and sharding-invariant
  (`tests/test_multidevice.py`).
  """
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = counter_bits(self.make_rng("dropout"), x.shape) >= jnp.uint32(round(self.rate * 2**32))
    # A multiply by the 0/1 mask fuses into one loop; select with zeros_like materialises zeros.
    return x * (keep.astype(x.dtype) * (1.0 / (1.0 - self.rate)))


class _Projection(nn.Module):
  """A projection's kernel (*in_shape, *out_shape) and bias (*out_shape), returned, not applied.

  The kernel is `kernel_init` of the flattened (in, out) matrix reshaped, as Flax's `DenseGeneral`
  stores it (Xavier-uniform by default; for 2-D shapes exactly `nn.Dense`'s kernel).
  """
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    flat = (math.prod(in_shape), math.prod(out_shape))
    init = lambda rng, shape: self.kernel_init(rng, flat).reshape(shape)
    kernel = self.param("kernel", init, (*in_shape, *out_shape))
    return kernel, self.param("bias", self.bias_init, out_shape)


class LayerNorm(nn.Module):
  """`nn.LayerNorm`'s params (`scale`, `bias`), applied directly or folded into the projection that
  follows it: LN(x) @ W + b = normalize(x) @ (scale[:, None] * W) + (bias @ W + b).

  Folded, the scale never meets the (tokens, D) activations: on CPU the backward pass otherwise
  materialises it broadcast to their shape, once per LayerNorm. The statistics are two-pass, in
  the compute dtype.
  """
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def affine(self, width: int):
    return (self.param("scale", nn.initializers.ones, (width,)),
            self.param("bias", nn.initializers.zeros, (width,)))

  def normalize(self, x):
    x = x.astype(self.dtype)
    centred = x - x.mean(-1, keepdims=True)
    return centred * jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + self.epsilon)

  def fold(self, kernel, bias):
    """(W, b) of a projection reading LN(x) -> (W', b') that read normalize(x)."""
    scale, shift = (p.astype(self.dtype) for p in self.affine(kernel.shape[0]))
    return scale[:, None] * kernel, shift @ kernel + bias

  def __call__(self, x):
    scale, shift = self.affine(x.shape[-1])
    return self.normalize(x) * scale.astype(self.dtype) + shift.astype(self.dtype)


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dropout -> Dense -> Dropout.

  `expand` (Dense_0 and GELU, optionally reading a LayerNorm folded in) and `contract` (the rest)
  are also callable apart, for callers that compute the expansion of an input-independent stream
  once and the dropout per example (SA2VP).
  """
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)

  def setup(self):
    self.Dense_0 = _Projection(self.kernel_init, self.bias_init)
    self.Dense_1 = _Projection(self.kernel_init, self.bias_init)
    self.Dropout_0 = Dropout(self.dropout)
    self.Dropout_1 = Dropout(self.dropout)

  def expand(self, x, norm: Optional[LayerNorm] = None):
    """GELU(Dense_0(x)), or GELU(Dense_0(norm(x))) with `norm` folded into Dense_0."""
    kernel, bias = (p.astype(self.dtype) for p in self.Dense_0((x.shape[-1],), (self.mlp_dim,)))
    if norm is not None:
      kernel, bias = norm.fold(kernel, bias)
      x = norm.normalize(x)
    return nn.gelu(x.astype(self.dtype) @ kernel + bias, approximate=self.gelu_approximate)

  def contract(self, hidden, width: int, *, deterministic: bool = True):
    hidden = self.Dropout_0(hidden, deterministic=deterministic)
    kernel, bias = (p.astype(self.dtype) for p in self.Dense_1((self.mlp_dim,), (width,)))
    return self.Dropout_1(hidden @ kernel + bias, deterministic=deterministic)

  def __call__(self, x, *, deterministic: bool = True):
    return self.contract(self.expand(x), x.shape[-1], deterministic=deterministic)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with the parameters of `nn.MultiHeadDotProductAttention`.

  Same names and shapes as Flax's module (`query|key|value/kernel` (D, H, D/H), `out/kernel`
  (H, D/H, D)), so Google's checkpoints load unchanged, but computed as one fused projection
  ((D, 3D) for self-attention) and head-major batched matmuls: on CPU this runs about 1.5x faster
  than Flax's einsum layout. `key_value` (cross-attention) and a boolean `mask` (Nq, Nk), True =
  may attend, are optional. The three steps, `qkv` (heads of Q, K, V), `attend` (softmax
  attention, heads merged) and `output` (the out projection), are callable apart, so a caller can
  reuse one projection for several attentions (SA2VP's cross adapters).
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.query, self.key, self.value, self.out = (_Projection() for _ in range(4))
    self.Dropout_0 = Dropout(self.dropout_rate)

  def _projections(self, width: int, names: tuple[str, ...]):
    """The (D, n * D) kernel and (n * D,) bias of the named projections, concatenated."""
    shapes = ((width,), (self.num_heads, width // self.num_heads))
    kernels, biases = zip(*[getattr(self, name)(*shapes) for name in names])
    return (jnp.concatenate([k.reshape(width, width) for k in kernels], 1).astype(self.dtype),
            jnp.concatenate([b.reshape(width) for b in biases]).astype(self.dtype))

  def _split_heads(self, y, n: int):  # (B, N, n * D) -> n x (B, H, N, D/H)
    batch, length, width = y.shape
    y = y.reshape(batch, length, n, self.num_heads, width // (n * self.num_heads))
    return list(y.transpose(2, 0, 3, 1, 4))

  def qkv(self, x, key_value=None, *, norm: Optional[LayerNorm] = None):
    """Q of `x` and K, V of `key_value` (default `x`), each (B, H, N, D/H). With `norm` (self-
    attention only), of norm(x), folded into the projection."""
    x = x.astype(self.dtype)
    width = x.shape[-1]
    if key_value is None:
      kernel, bias = self._projections(width, ("query", "key", "value"))
      if norm is not None:
        kernel, bias = norm.fold(kernel, bias)
        x = norm.normalize(x)
      return self._split_heads(x @ kernel + bias, 3)
    if norm is not None:
      raise ValueError("qkv: a folded LayerNorm is for self-attention (no key_value).")
    kernel, bias = self._projections(width, ("query",))
    (q,) = self._split_heads(x @ kernel + bias, 1)
    kernel, bias = self._projections(width, ("key", "value"))
    return [q, *self._split_heads(key_value.astype(self.dtype) @ kernel + bias, 2)]

  def attend(self, q, k, v, *, mask=None, deterministic: bool = True):
    """softmax(Q K^T / sqrt(D/H)) V with heads merged: (B, H, Nq, D/H) x 2 (B, H, Nk, D/H) ->
    (B, Nq, D)."""
    batch, heads, length, head_dim = q.shape
    logits = ((q * head_dim**-0.5) @ k.swapaxes(-1, -2)).astype(jnp.float32)  # (B, H, Nq, Nk)
    if mask is not None:  # an additive 0 / -1e30 bias: exp() makes masked weights exactly 0
      logits = logits + jnp.where(jnp.asarray(mask), 0.0, -1e30).astype(jnp.float32)
    if not deterministic and self.dropout_rate > 0:
      weights = self.Dropout_0(jax.nn.softmax(logits).astype(self.dtype), deterministic=False)
      out = weights @ v
    else:  # softmax's division after the matmul: on (Nq, D/H), not (Nq, Nk); same numbers
      weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
      out = (weights.astype(self.dtype) @ v) / weights.sum(-1, keepdims=True).astype(self.dtype)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)

  def output(self, y):
    """The out projection of merged heads (B, N, D)."""
    width = y.shape[-1]
    kernel, bias = self.out((self.num_heads, width // self.num_heads), (width,))
    return y @ kernel.reshape(width, width).astype(self.dtype) + bias.astype(self.dtype)

  def __call__(self, x, key_value=None, *, mask=None, deterministic: bool = True):
    q, k, v = self.qkv(x, key_value)
    return self.output(self.attend(q, k, v, mask=mask, deterministic=deterministic))


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  Dropout follows the PyTorch port VPT and SA2VP train with (jeonsworld/ViT-pytorch): `dropout`
  inside the MLP, `attention_dropout` on the attention weights and on its output (Google's Flax
  ViT uses `dropout` there instead; the two only differ when the backbone itself trains).
  `cross_attention` reuses this block's LayerNorm_0 and attention weights on two streams; the
  steps of `__call__` (`attention_qkv`, `attention`, `attention_residual`, `mlp_hidden`,
  `mlp_residual`) are callable apart for callers that share work between streams (SA2VP).
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.LayerNorm_0 = LayerNorm(self.layer_norm_eps, self.dtype)
    self.MultiHeadDotProductAttention_1 = MultiHeadAttention(
        self.num_heads, self.attention_dropout, self.dtype)
    self.attention_output_dropout = Dropout(self.attention_dropout)
    self.LayerNorm_2 = LayerNorm(self.layer_norm_eps, self.dtype)
    self.MlpBlock_3 = MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype)

  def attention_qkv(self, x):
    """Heads of Q, K, V of LN_0(x), each (B, H, N, D/H); LN_0 folded into the projection."""
    return self.MultiHeadDotProductAttention_1.qkv(x, norm=self.LayerNorm_0)

  @property
  def attention(self) -> MultiHeadAttention:
    return self.MultiHeadDotProductAttention_1

  def attention_residual(self, x, attended, *, deterministic: bool = True):
    """x + dropout(attended), `attended` being the out projection's output."""
    return x + self.attention_output_dropout(attended, deterministic=deterministic)

  def mlp_hidden(self, x):
    """GELU(Dense_0(LN_2(x))): the MLP up to its first dropout; LN_2 folded into Dense_0."""
    return self.MlpBlock_3.expand(x, norm=self.LayerNorm_2)

  def mlp_residual(self, x, hidden, *, deterministic: bool = True):
    """x + the rest of the MLP applied to `hidden` (from `mlp_hidden`)."""
    return x + self.MlpBlock_3.contract(hidden, x.shape[-1], deterministic=deterministic)

  def __call__(self, x, *, deterministic: bool = True):
    q, k, v = self.attention_qkv(x)
    y = self.attention.output(self.attention.attend(q, k, v, deterministic=deterministic))
    x = self.attention_residual(x, y, deterministic=deterministic)
    return self.mlp_residual(x, self.mlp_hidden(x), deterministic=deterministic)

  def cross_attention(self, query, key_value, *, mask=None, deterministic: bool = True):
    """Attention of LN_0(query) over LN_0(key_value) with this block's weights; no residual."""
    return self.attention(self.LayerNorm_0(query), self.LayerNorm_0(key_value), mask=mask,
                          deterministic=deterministic)


class Encoder(nn.Module):
  """Position embedding, `depth` blocks and the final LayerNorm (Google's 'Transformer')."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  def make_block(self, i: int) -> Encoder1DBlock:
    """Block `i` with its checkpoint name; prompt methods that run blocks themselves call this."""
    return Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout, self.attention_dropout,
                          self.layer_norm_eps, self.gelu_approximate, self.dtype,
                          name=f"encoderblock_{i}")

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True,
               block_hook: Optional[common.BlockHook] = None):
    # x: (B, 1 + N, D) with the CLS token first.
    x = AddPositionEmbs(name="posembed_input")(x)
    x = Dropout(self.dropout)(x, deterministic=deterministic)
    for i in range(self.depth):
      block = functools.partial(self.make_block(i), deterministic=deterministic)
      x = common.run_block(i, block, x, block_hook)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")(x)


class AddPositionEmbs(nn.Module):
  """Learned position embedding (1, L, D), added to every token (CLS included)."""

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                               (1, *x.shape[1:]))
    return x + pos_embedding.astype(x.dtype)


def embed_patches(module: nn.Module, images, *, width: int, patch_size: int, dtype=jnp.float32):
  """Patchify `images` (B, H, W, 3) and prepend the CLS token -> (B, 1 + H*W/p^2, width).

  Must be called from inside a compact method of `module`: the patch convolution becomes its
  child `embedding` and the CLS token its param `cls`, Google's names.
  """
  _, height, image_width, _ = images.shape
  if height % patch_size or image_width % patch_size:
    raise ValueError(
        f"Image size {height}x{image_width} is not divisible by the patch size {patch_size}; "
        f"use an image size that is a multiple of {patch_size} (e.g. {patch_size * 14}).")
  x = nn.Conv(width, (patch_size, patch_size), strides=(patch_size, patch_size),
              padding="VALID", dtype=dtype, name="embedding")(images)
  batch, gh, gw, _ = x.shape
  x = x.reshape(batch, gh * gw, width)  # row-major over the patch grid
  cls = module.param("cls", nn.initializers.zeros, (1, 1, width))
  return jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)).astype(x.dtype), x], axis=1)


class Model(nn.Module):
  """ViT classifier: patch embedding, encoder, linear head on the CLS token (or mean of patches).

  Returns `(logits, aux)` where aux holds `encoded` (B, 1+N, D) and `pre_logits` (B, D).
  With `num_classes=0` there is no head and logits are the pre-logits.
  """
  num_classes: int
  variant: str = "B/16"
  pool_type: str = "tok"  # 'tok' (CLS) or 'gap'
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  head_zeroinit: bool = True
  dtype: Any = jnp.float32

  def encoder(self) -> Encoder:
    v = decode_variant(self.variant)
    return Encoder(v["depth"], v["mlp_dim"], v["num_heads"], self.dropout, 0.0,
                   self.layer_norm_eps, self.gelu_approximate, self.dtype, name="Transformer")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    v = decode_variant(self.variant)
    x = embed_patches(self, images, width=v["width"], patch_size=v["patch_size"], dtype=self.dtype)
    encoded = self.encoder()(x, deterministic=not train)
    pre_logits = encoded[:, 0] if self.pool_type == "tok" else encoded[:, 1:].mean(axis=1)
    aux = {"encoded": encoded, "pre_logits": pre_logits}
    if not self.num_classes:
      return pre_logits, aux
    kernel_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, kernel_init=kernel_init, dtype=self.dtype, name="head")(
        pre_logits)
    return logits.astype(jnp.float32), aux


# ---------------------------------------------------------------------------------------------
# Pretrained weights.
#
# Google's `.npz` (google-research/vision_transformer; VPT and SA2VP use imagenet21k_ViT-B_16.npz)
# already uses our names. Hugging Face `ViTModel` / `ViTForImageClassification` weights are renamed
# and reshaped by `convert_hf_vit`. Both end in `common.merge_params`, which is strict.
# ---------------------------------------------------------------------------------------------

POSEMB_NAME = "Transformer/posembed_input/pos_embedding"
QUERY_KERNEL_NAME = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"

# Checkpoint entries our Model has no place for, dropped when the model lacks them: Google's
# `pre_logits` (Dense + tanh on CLS, used only for upstream pretraining) and its transformers
# counterpart `pooler.dense`, which `convert_hf_vit` renames to `pre_logits`.
KNOWN_EXTRAS = (r"pre_logits/.*",)


def _weight_and_bias(hf_module: str, our_module: str, weight: str = "kernel") -> dict[str, str]:
  """('m', 'M') -> {'m.weight': 'M/kernel', 'm.bias': 'M/bias'}; LayerNorms pass weight='scale'."""
  return {f"{hf_module}.weight": f"{our_module}/{weight}",
          f"{hf_module}.bias": f"{our_module}/bias"}


# transformers module (after an optional 'vit.' prefix) -> our module, outside the blocks.
_HF_NAMES = {
    "embeddings.cls_token": "cls",
    "embeddings.position_embeddings": POSEMB_NAME,
    **_weight_and_bias("embeddings.patch_embeddings.projection", "embedding"),
    **_weight_and_bias("layernorm", "Transformer/encoder_norm", weight="scale"),
    **_weight_and_bias("classifier", "head"),
    **_weight_and_bias("pooler.dense", "pre_logits"),
}
# '<block prefix>.{i}.<module>' -> 'Transformer/encoderblock_{i}/<module>'. transformers writes
# files (Hub checkpoints, `save_pretrained`) with the legacy names under 'encoder.layer'; since v5
# its modules (`model.state_dict()`) live under 'layers' with q/k/v/o_proj and mlp.fc1/fc2. We read
# both.
_HF_BLOCK_PREFIX = r"(?:encoder\.layer|layers)"
_HF_BLOCK_LINEARS = {
    # legacy (file) names
    "attention.attention.query": "MultiHeadDotProductAttention_1/query",
    "attention.attention.key": "MultiHeadDotProductAttention_1/key",
    "attention.attention.value": "MultiHeadDotProductAttention_1/value",
    "attention.output.dense": "MultiHeadDotProductAttention_1/out",
    "intermediate.dense": "MlpBlock_3/Dense_0",
    "output.dense": "MlpBlock_3/Dense_1",
    # transformers >= 5 module names
    "attention.q_proj": "MultiHeadDotProductAttention_1/query",
    "attention.k_proj": "MultiHeadDotProductAttention_1/key",
    "attention.v_proj": "MultiHeadDotProductAttention_1/value",
    "attention.o_proj": "MultiHeadDotProductAttention_1/out",
    "mlp.fc1": "MlpBlock_3/Dense_0",
    "mlp.fc2": "MlpBlock_3/Dense_1",
}
_HF_BLOCK_NAMES = {
    **_weight_and_bias("layernorm_before", "LayerNorm_0", weight="scale"),
    **_weight_and_bias("layernorm_after", "LayerNorm_2", weight="scale"),
    **{hf_name: our_name for hf_module, our_module in _HF_BLOCK_LINEARS.items()
       for hf_name, our_name in _weight_and_bias(hf_module, our_module).items()},
}


def load_google_vit_npz(path: str) -> dict:
  """Reads a Google ViT `.npz` (keys are '/'-joined param names) into a nested param dict.

  Keys follow google-research/vision_transformer `vit_jax/checkpoint.py`: e.g.
  `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel` (D, H, D/H). The
  upstream `head/*` and `pre_logits/*` are returned too; `load` decides what to drop. Read with
  `common.load_npz` (allow_pickle=False): a truncated, non-zip or object-array file is one
  ValueError naming it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ViT checkpoint {path!r} does not exist.")
  return common.unflatten(common.load_npz(path))


def _hf_to_ours(name: str) -> Optional[str]:
  """transformers ViT param name -> our '/'-joined name, or None if it is not a ViT param."""
  name = name.removeprefix("vit.")
  if name in _HF_NAMES:
    return _HF_NAMES[name]
  match = re.fullmatch(_HF_BLOCK_PREFIX + r"\.(\d+)\.(.+)", name)
  if match and match.group(2) in _HF_BLOCK_NAMES:
    return f"Transformer/encoderblock_{match.group(1)}/{_HF_BLOCK_NAMES[match.group(2)]}"
  return None


def convert_hf_vit(state_dict: dict[str, np.ndarray], *, num_heads: int,
                   source: str = "<state dict>") -> dict:
  """transformers `ViTModel`/`ViTForImageClassification` state dict -> our nested params.

  Follows the module layout of transformers `models/vit/modeling_vit.py`. Renames as in
  `_HF_NAMES`/`_HF_BLOCK_NAMES`, then
    * patch projection (D, 3, p, p) -> (p, p, 3, D) (OIHW -> HWIO);
    * every Linear weight (out, in) -> (in, out);
    * query/key/value kernels (D, D) -> (D, H, D/H) and biases (D,) -> (H, D/H); the output
      projection kernel (D, D) -> (H, D/H, D): Flax's `MultiHeadDotProductAttention` layout;
    * `pooler.dense` -> `pre_logits` (see KNOWN_EXTRAS), `classifier` -> `head`.
  Names it does not know raise a ValueError listing them all.
  """
  unknown = sorted(name for name in state_dict if _hf_to_ours(name) is None)
  if unknown:
    raise ValueError(f"{source}: not transformers ViT parameters ({len(unknown)}): "
                     + ", ".join(unknown))
  flat, hf_names = {}, {}
  for hf_name, value in state_dict.items():
    name = _hf_to_ours(hf_name)
    if name in flat:
      raise ValueError(f"{source}: {hf_names[name]!r} and {hf_name!r} both map to {name!r} "
                       "(a mix of legacy and transformers>=5 names?).")
    value = np.asarray(value)
    if name == "embedding/kernel":
      value = value.transpose(2, 3, 1, 0)  # (D, 3, p, p) -> (p, p, 3, D)
    elif name.endswith("kernel"):
      value = value.T  # nn.Linear (out, in) -> (in, out)
    if "/MultiHeadDotProductAttention_1/" in name:
      value = _split_heads(name, value, num_heads, where=f"{source}: {hf_name}")
    flat[name], hf_names[name] = value, hf_name
  return common.unflatten(flat)


def _split_heads(name: str, value: np.ndarray, num_heads: int, where: str) -> np.ndarray:
  """Flax attention layout: q/k/v kernel (D, D) -> (D, H, D/H) and bias (D,) -> (H, D/H);
  out kernel (D, D) -> (H, D/H, D); out bias (D,) unchanged."""
  if name.endswith("out/bias"):
    return value
  head_axis = 0 if name.endswith("out/kernel") else value.ndim - 1
  width = value.shape[head_axis]
  if width % num_heads:
    raise ValueError(f"{where} has {width} features, not divisible by num_heads={num_heads}.")
  shape = value.shape[:head_axis] + (num_heads, width // num_heads) + value.shape[head_axis + 1:]
  return value.reshape(shape)


def resize_pos_embedding(posemb: np.ndarray, target_len: int) -> np.ndarray:
  """(1, 1 + N, D) -> (1, target_len, D): keeps the CLS row, resizes the patch grid bilinearly.

  As google-research/vision_transformer `vit_jax/checkpoint.py::load_pretrained` and VPT's
  PyTorch port (`src/models/vit_backbones/vit.py`) do: `scipy.ndimage.zoom(grid, order=1)` on the
  sqrt(N) x sqrt(N) grid. Note this is corner-aligned linear interpolation, not the half-pixel
  `jax.image.resize` that big_vision uses; we follow the code VPT and SA2VP were trained with.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"Position embedding must be (1, 1 + N, D), got {posemb.shape}.")
  old_side, new_side = math.isqrt(posemb.shape[1] - 1), math.isqrt(target_len - 1)
  if old_side * old_side != posemb.shape[1] - 1 or new_side * new_side != target_len - 1:
    raise ValueError(
        f"Cannot resize a position embedding of {posemb.shape[1]} tokens to {target_len}: both "
        f"must be 1 + a square number of patches (CLS + a square grid).")
  if old_side == new_side:
    return posemb
  cls, grid = posemb[:, :1], posemb[0, 1:].astype(np.float32)
  grid = grid.reshape(old_side, old_side, -1)
  zoom = new_side / old_side
  grid = scipy.ndimage.zoom(grid, (zoom, zoom, 1), order=1)  # (new_side, new_side, D)
  grid = grid.reshape(1, new_side * new_side, -1).astype(posemb.dtype)
  return np.concatenate([cls, grid], axis=1)


def load(init_params: dict, path: str, *, dont_load=("head/.*",)) -> dict:
  """Loads pretrained ViT weights into `init_params` (the 'params' collection, nested).

  The format follows the extension: `.npz` is a Google checkpoint (`load_google_vit_npz`);
  `.safetensors`/`.bin`/`.pt`/`.pth` is a transformers state dict (`convert_hf_vit`, with the head
  count read from `init_params`). The position embedding is resized to the model's grid when the
  image size differs (`resize_pos_embedding`). Merging is strict (`common.merge_params`): model
  params matching a `dont_load` regex keep their init values, checkpoint entries matching one are
  dropped, and so are KNOWN_EXTRAS the model has no place for. Prompt methods pass their own
  params, e.g. `dont_load=('head/.*', '.*prompt.*')`.
  """
  path = os.fspath(path)
  if set(init_params) == {"params"}:
    raise ValueError("vit.load takes the 'params' collection: pass variables['params'], not the "
                     "whole variables dict.")
  init = common.flatten(init_params)
  extension = os.path.splitext(path)[1].lower()
  if extension == ".npz":
    loaded = common.flatten(load_google_vit_npz(path))
  elif extension == ".safetensors" or extension in common.TORCH_EXTENSIONS:
    if QUERY_KERNEL_NAME not in init:
      raise ValueError(f"Cannot infer the number of heads for {path!r}: init params have no "
                       f"{QUERY_KERNEL_NAME!r}.")
    num_heads = init[QUERY_KERNEL_NAME].shape[1]
    loaded = common.flatten(convert_hf_vit(common.load_torch_state_dict(path),
                                           num_heads=num_heads, source=path))
  else:
    raise ValueError(f"Cannot load ViT weights from {path!r}: unknown extension {extension!r}; "
                     f"expected '.npz', '.safetensors' or one of {common.TORCH_EXTENSIONS}.")

  dont_load = tuple(dont_load)
  if (POSEMB_NAME in loaded and POSEMB_NAME in init
      and not any(re.fullmatch(p, POSEMB_NAME) for p in dont_load)):
    old, new = loaded[POSEMB_NAME].shape, init[POSEMB_NAME].shape
    if len(old) == len(new) == 3 and old[2] == new[2] and old[1] != new[1]:
      loaded[POSEMB_NAME] = resize_pos_embedding(loaded[POSEMB_NAME], new[1])
  extras = tuple(p for p in KNOWN_EXTRAS if not any(re.fullmatch(p, name) for name in init))
  return common.merge_params(loaded, init_params, dont_load=dont_load + extras, source=path)
