"""CLIP (Radford et al., ICML 2021, "Learning Transferable Visual Models From Natural Language
Supervision") as Flax Linen modules, with loaders for OpenAI's and Hugging Face's weights.

Follows openai/CLIP `clip/model.py`: a ViT or a modified ResNet image tower, a causal text
transformer pooled at the end-of-text token, linear projections into a joint space and a learned
logit scale. The parameter tree uses OpenAI's names with '.' -> '/' and list indices joined by '_'
(`visual.transformer.resblocks.0.ln_1` -> `visual/transformer/resblocks_0/ln_1`,
`visual.layer1.0.downsample.0` -> `visual/layer1_0/downsample_0`), so converting an OpenAI state
dict only reshapes: Linear (out, in) -> kernel (in, out), conv OIHW -> HWIO, packed
`attn.in_proj_*` -> Flax `MultiHeadDotProductAttention` query/key/value, BatchNorm running
statistics -> the 'batch_stats' collection. transformers' `CLIPModel` weights are first renamed to
OpenAI's names (`hf_to_openai_state_dict`), so both formats share one converter. `infer_config`
reads the architecture from either kind of state dict; `load_pretrained` does everything.

What matches the reference: QuickGELU (x * sigmoid(1.702 x)) in every MLP; pre-LN blocks; LayerNorm
and BatchNorm epsilon 1e-5 with LayerNorm statistics in float32; `ln_pre` in the ViT tower; the
text feature taken after `ln_final` at argmax(token ids) (the end-of-text id is the largest);
`text_projection` and `visual.proj` right-multiply without a transpose; logits are
exp(logit_scale) * cosine similarity.

Deliberate choices:
  * Images are NHWC (B, H, W, 3), as everywhere in jaxprompt; the first conv is HWIO.
  * `dtype` is the compute dtype; parameters stay float32 (OpenAI casts its weights to float16).
    Features come back in float32.
  * `encode_text_embeddings(token_embeddings, eot_indices)` runs the text tower on given token
    embeddings (positional embeddings are added inside), which is what CoOp-style prompt learners
    feed it; `embed_tokens` gives the frozen token embeddings to build them from.
  * Parameter initialisation is Flax's defaults plus OpenAI-like scales for the embeddings; CLIP is
    meant to be loaded, not trained from scratch here.
  * ResNet BatchNorm runs on running statistics unless `train=True` (then the caller must pass
    `mutable=['batch_stats']`), which LMPT's train-mode quirk needs.
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import common
from jaxprompt.models import vit

LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5

# name -> (embed_dim, image_size, vision_layers, vision_width, vision_heads, vision_patch_size,
#          text_width, text_heads, text_layers). vision_layers is the block count of a ViT tower
# and the per-stage bottleneck counts of a ResNet one (no patch size). Every released model has a
# 77-token context and a 49408-token vocabulary. The 'mu' sizes are tiny, for tests and demos.
SIZES = {
    "ViT-B/32": (512, 224, 12, 768, 12, 32, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 12, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 16, 14, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 16, 14, 768, 12, 12),
    "RN50": (1024, 224, (3, 4, 6, 3), 64, 32, None, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, 32, None, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, 40, None, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, 48, None, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, 64, None, 1024, 16, 12),
    "ViT-mu/8": (16, 32, 2, 32, 2, 8, 32, 2, 2),
    "ViT-mu/4": (16, 32, 2, 48, 2, 4, 32, 2, 2),  # finer patches, wider: the TTA demos' reward
    "RN-mu": (16, 64, (1, 1, 1, 1), 8, 4, None, 32, 2, 2),
}


def decode_variant(variant: str) -> dict:
  """'ViT-B/32' -> the `Model` fields of that released CLIP (see SIZES)."""
  if variant not in SIZES:
    raise ValueError(f"Unknown CLIP variant {variant!r}: expected one of {list(SIZES)}.")
  (embed_dim, image_size, vision_layers, vision_width, vision_heads, vision_patch_size,
   text_width, text_heads, text_layers) = SIZES[variant]
  return dict(embed_dim=embed_dim, image_size=image_size, vision_layers=vision_layers,
              vision_width=vision_width, vision_heads=vision_heads,
              vision_patch_size=vision_patch_size, context_length=77, vocab_size=49408,
              text_width=text_width, text_heads=text_heads, text_layers=text_layers)


def quick_gelu(x):
  """CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class Mlp(nn.Module):
  """c_fc (width -> 4 width) -> QuickGELU -> c_proj (-> width)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(4 * width, dtype=self.dtype, name="c_fc")(x)
    return nn.Dense(width, dtype=self.dtype, name="c_proj")(quick_gelu(x))


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x), mask), then x + mlp(ln_2(x))."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, attention_fn=nn.dot_product_attention):
    """`attention_fn`: the attention of the projected (B, L, heads, head_dim) queries, keys and
    values (`nn.MultiHeadDotProductAttention`'s; DGL passes its global-local attention)."""
    y = _layer_norm("ln_1", self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, deterministic=True, attention_fn=attention_fn,
        name="attn")(y, y, mask=mask)
    return x + Mlp(self.dtype, name="mlp")(_layer_norm("ln_2", self.dtype)(x))


class Transformer(nn.Module):
  """`layers` residual attention blocks ('resblocks_{i}'), no final norm."""
  layers: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, block_hook: Optional[common.BlockHook] = None):
    """x: (B, L, D); mask: broadcastable to (B, heads, L, L), True where attention is allowed.

    `block_hook(i, block, x) -> x` runs instead of block i (`common.BlockHook`: deep prompts).
    """
    for i in range(self.layers):
      block = ResidualAttentionBlock(self.num_heads, self.dtype, name=f"resblocks_{i}")
      x = common.run_block(i, functools.partial(block, mask=mask), x, block_hook)
    return x


class VisionTransformer(nn.Module):
  """conv1 patches, class token, positional embedding, ln_pre, blocks, ln_post on the class token,
  then `proj`."""
  width: int
  layers: int
  num_heads: int
  patch_size: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False,
               block_hook: Optional[common.BlockHook] = None):
    """images (B, H, W, 3) -> (B, output_dim). `block_hook(i, block, x) -> x` runs instead of
    block i (`Transformer`: deep prompts); ln_post and proj read token 0 of the last output."""
    del train  # no dropout, no batch statistics
    scale = self.width ** -0.5
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, name="conv1")(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)  # (B, grid*grid, D), row-major over the grid
    class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
    x = jnp.concatenate(
        [jnp.broadcast_to(class_embedding.astype(x.dtype), (batch, 1, self.width)), x], axis=1)
    positional_embedding = self.param("positional_embedding", nn.initializers.normal(scale),
                                      x.shape[1:])
    x = x + positional_embedding.astype(x.dtype)
    x = _layer_norm("ln_pre", self.dtype)(x)
    x = Transformer(self.layers, self.num_heads, self.dtype, name="transformer")(
        x, block_hook=block_hook)
    x = _layer_norm("ln_post", self.dtype)(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))
    return x @ proj.astype(x.dtype)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1) -> nn.Conv:
  """Bias-free conv padded by kernel // 2 on each side, as every conv of the modified ResNet."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name)


def _batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
  # PyTorch momentum 0.1 is Flax momentum 0.9.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BATCH_NORM_EPS,
                      dtype=dtype, name=name)


def _avg_pool(x, stride: int):
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4 channels), each conv with BN; an anti-aliased
  shortcut (avgpool(stride) -> 1x1 conv -> BN) when the shape changes; ReLU after the sum."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    out = x
    for i, kernel in ((1, 1), (2, 3)):
      out = _conv(self.planes, kernel, self.dtype, f"conv{i}")(out)
      out = nn.relu(_batch_norm(train, self.dtype, f"bn{i}")(out))
    out = _avg_pool(out, self.stride)
    out = _conv(4 * self.planes, 1, self.dtype, "conv3")(out)
    out = _batch_norm(train, self.dtype, "bn3")(out)
    if self.stride > 1 or x.shape[-1] != 4 * self.planes:
      x = _conv(4 * self.planes, 1, self.dtype, "downsample_0")(_avg_pool(x, self.stride))
      x = _batch_norm(train, self.dtype, "downsample_1")(x)
    return nn.relu(out + x)


class AttentionPool2d(nn.Module):
  """Mean token + positional embedding, then one attention with the mean token as the only query;
  the output projection maps to `output_dim`."""
  num_heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # (B, 1 + HW, C)
    positional_embedding = self.param("positional_embedding",
                                      nn.initializers.normal(channels ** -0.5), x.shape[1:])
    x = x + positional_embedding.astype(x.dtype)
    pooled = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, out_features=self.output_dim, dtype=self.dtype,
        deterministic=True, name="attn")(x[:, :1], x)
    return pooled[:, 0]


class ModifiedResNet(nn.Module):
  """CLIP's ResNet: 3-conv stem + avgpool, 4 stages of anti-aliased bottlenecks, attention pool."""
  layers: Sequence[int]
  width: int
  num_heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = images
    for i, (features, stride) in enumerate(
        ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1)), start=1):
      x = _conv(features, 3, self.dtype, f"conv{i}", stride)(x)
      x = nn.relu(_batch_norm(train, self.dtype, f"bn{i}")(x))
    x = _avg_pool(x, 2)  # (B, image_size / 4, image_size / 4, width)
    for stage, blocks in enumerate(self.layers):
      for j in range(blocks):
        stride = 2 if stage > 0 and j == 0 else 1
        x = Bottleneck(self.width * 2 ** stage, stride, self.dtype,
                       name=f"layer{stage + 1}_{j}")(x, train=train)
    # x: (B, image_size / 32, image_size / 32, 32 * width)
    return AttentionPool2d(self.num_heads, self.output_dim, self.dtype, name="attnpool")(x)


class Model(nn.Module):
  """CLIP: `encode_image`, `encode_text`, `encode_text_embeddings`; `__call__` gives the logits.

  Build one with `Model(**decode_variant('ViT-B/32'))` or from weights with `load_pretrained`.
  `vision_layers` is an int for a ViT image tower and a tuple of stage depths for a ResNet.
  Param paths (OpenAI names): `visual/...`, `token_embedding/embedding` (vocab, text_width),
  `positional_embedding` (context_length, text_width), `transformer/resblocks_{i}/...`,
  `ln_final`, `text_projection` (text_width, embed_dim), `logit_scale` ().
  """
  embed_dim: int
  image_size: int
  vision_layers: Union[int, Sequence[int]]
  vision_width: int
  vision_heads: int
  vision_patch_size: Optional[int] = None
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_heads: int = 8
  text_layers: int = 12
  dtype: Any = jnp.float32

  @property
  def is_resnet(self) -> bool:
    return not isinstance(self.vision_layers, int)

  def setup(self):
    if self.is_resnet:
      self.visual = ModifiedResNet(tuple(self.vision_layers), self.vision_width,
                                   self.vision_heads, self.embed_dim, self.dtype)
    else:
      if not self.vision_patch_size:
        raise ValueError("A ViT image tower (integer vision_layers) needs vision_patch_size.")
      self.visual = VisionTransformer(self.vision_width, self.vision_layers, self.vision_heads,
                                      self.vision_patch_size, self.embed_dim, self.dtype)
    self.token_embedding = nn.Embed(self.vocab_size, self.text_width,
                                    embedding_init=nn.initializers.normal(0.02), dtype=self.dtype)
    self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                           (self.context_length, self.text_width))
    self.transformer = Transformer(self.text_layers, self.text_heads, self.dtype)
    self.ln_final = _layer_norm(None, self.dtype)
    self.text_projection = self.param("text_projection",
                                      nn.initializers.normal(self.text_width ** -0.5),
                                      (self.text_width, self.embed_dim))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                  ())

  def encode_image(self, images, *, train: bool = False, block_hook=None):
    """images (B, H, W, 3), normalised with CLIP's mean/std -> unnormalised features (B, E).
    `block_hook`: optional `(i, block, x) -> x` run instead of image block i (ViT towers)."""
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"CLIP expects images of shape (B, {self.image_size}, {self.image_size}, "
                       f"3) (NHWC); got {images.shape}.")
    if block_hook is not None and self.is_resnet:
      raise ValueError("block_hook needs a ViT image tower; this CLIP has a ResNet one.")
    hook = {} if block_hook is None else {"block_hook": block_hook}
    return self.visual(images.astype(self.dtype), train=train, **hook).astype(jnp.float32)

  def embed_tokens(self, token_ids):
    """(N, L) int ids -> token embeddings (N, L, text_width), without positional embeddings."""
    return self.token_embedding(token_ids)

  def encode_text_embeddings(self, token_embeddings, eot_indices, *, block_hook=None):
    """The text tower on given token embeddings.

    Args:
      token_embeddings: (N, L, text_width) with L <= context_length, e.g. `embed_tokens(ids)`
        with learned context vectors written in (CoOp).
      eot_indices: (N,) int, position of the end-of-text token of each sequence, whose output
        becomes the feature (argmax of the token ids for CLIP's tokenizer).
      block_hook: optional `(i, block, x) -> x` run instead of text block i (`Transformer`).

    Returns:
      Unnormalised text features (N, embed_dim), float32.
    """
    num, length, width = token_embeddings.shape
    if length > self.context_length or width != self.text_width:
      raise ValueError(f"Token embeddings must be (N, L <= {self.context_length}, "
                       f"{self.text_width}); got {token_embeddings.shape}.")
    x = token_embeddings.astype(self.dtype) + self.positional_embedding[:length].astype(self.dtype)
    causal = nn.make_causal_mask(jnp.ones((num, length), jnp.bool_))  # (N, 1, L, L)
    x = self.ln_final(self.transformer(x, causal, block_hook=block_hook))
    x = jnp.take_along_axis(x, jnp.asarray(eot_indices)[:, None, None], axis=1)[:, 0]  # (N, W)
    return (x @ self.text_projection.astype(x.dtype)).astype(jnp.float32)

  def encode_text(self, token_ids):
    """(N, L) token ids from `clip_tokenizer` -> unnormalised text features (N, embed_dim)."""
    return self.encode_text_embeddings(self.embed_tokens(token_ids),
                                       jnp.argmax(token_ids, axis=-1))

  def __call__(self, images, token_ids, *, train: bool = False):
    """Returns (logits_per_image (B, N), aux) with aux: 'image_features', 'text_features' (both
    L2-normalised), 'logits_per_text' (N, B) and 'logit_scale' (the exp'd scale)."""
    image_features = normalize(self.encode_image(images, train=train))
    text_features = normalize(self.encode_text(token_ids))
    logit_scale = jnp.exp(self.logit_scale)
    logits_per_image = logit_scale * image_features @ text_features.T
    return logits_per_image, {"image_features": image_features, "text_features": text_features,
                              "logits_per_text": logits_per_image.T, "logit_scale": logit_scale}


def normalize(x, axis: int = -1):
  """x / ||x||_2 along `axis`."""
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Pretrained weights.
#
# OpenAI's `.pt` files (`clip.load` downloads them) are TorchScript archives; `read_state_dict`
# reads their tensors without running their code (`common.read_torchscript_state_dict`, not
# `torch.jit.load`), and everything else (plain state dicts, `.safetensors`) with
# `common.load_torch_state_dict`. transformers' `CLIPModel` names are mapped to OpenAI's first.
# ---------------------------------------------------------------------------------------------

# Scalars that OpenAI's TorchScript state dicts carry besides the weights (not parameters).
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")

_HF_TOP_LEVEL = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# Linear weights (out, in) that OpenAI stores as right-multiplied (in, out) parameters.
_HF_PROJECTIONS = {"text_projection.weight": "text_projection",
                   "visual_projection.weight": "visual.proj"}
_HF_TOWERS = {"text_model.encoder.layers": "transformer.resblocks",
              "vision_model.encoder.layers": "visual.transformer.resblocks"}
_HF_BLOCK_MODULES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                     "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_QKV = ("q_proj", "k_proj", "v_proj")  # packed in this order into OpenAI's in_proj


def is_hf_state_dict(state_dict) -> bool:
  return any(name.startswith(("text_model.", "vision_model.")) for name in state_dict)


def hf_to_openai_state_dict(state_dict: dict[str, np.ndarray],
                            source: str = "<state dict>") -> dict[str, np.ndarray]:
  """transformers `CLIPModel` state dict -> OpenAI `clip/model.py` names and layouts.

  Follows transformers `models/clip/modeling_clip.py`: q/k/v projections are concatenated (in
  that order) into `attn.in_proj_weight`/`in_proj_bias`; `text_projection.weight` and
  `visual_projection.weight` are transposed into `text_projection` and `visual.proj`;
  `position_ids` buffers are dropped. Unknown names raise a ValueError listing them all.
  """
  towers = "|".join(map(re.escape, _HF_TOWERS))
  block = re.compile(rf"({towers})\.(\d+)\.(.+)\.(weight|bias)")  # tower, index, module, leaf
  converted, qkv, unknown = {}, {}, []
  for name, value in state_dict.items():
    if name.endswith("embeddings.position_ids"):
      continue
    value, match = np.asarray(value), block.fullmatch(name)
    if name in _HF_TOP_LEVEL:
      converted[_HF_TOP_LEVEL[name]] = value
    elif name in _HF_PROJECTIONS:
      converted[_HF_PROJECTIONS[name]] = value.T
    elif match and match.group(3) in _HF_BLOCK_MODULES:
      tower, i, module, leaf = match.groups()
      converted[f"{_HF_TOWERS[tower]}.{i}.{_HF_BLOCK_MODULES[module]}.{leaf}"] = value
    elif match and match.group(3).removeprefix("self_attn.") in _HF_QKV:
      tower, i, module, leaf = match.groups()
      key = f"{_HF_TOWERS[tower]}.{i}.attn.in_proj_{leaf}"
      qkv.setdefault(key, {})[module.removeprefix("self_attn.")] = value
    else:
      unknown.append(name)
  if unknown:
    raise ValueError(f"{source}: not transformers CLIPModel parameters ({len(unknown)}): "
                     + ", ".join(sorted(unknown)))
  for key, parts in qkv.items():
    missing = [p for p in _HF_QKV if p not in parts]
    if missing:
      raise ValueError(f"{source}: {key} needs q_proj, k_proj and v_proj; missing {missing}.")
    converted[key] = np.concatenate([parts[p] for p in _HF_QKV], axis=0)
  return converted


def _count_indices(state_dict, pattern: str) -> int:
  """Number of distinct integers captured by `pattern` (one group) over the names."""
  return len({m.group(1) for name in state_dict if (m := re.match(pattern, name))})


def infer_config(state_dict: dict[str, np.ndarray], *, head_dim: int = 64) -> dict:
  """The `Model` fields of the CLIP that `state_dict` (OpenAI or transformers names) holds.

  As openai/CLIP `build_model`: a ViT if `visual.proj` exists, else a ResNet; widths, patch size,
  depths, context length and vocabulary from shapes and names; image size from the number of
  positional embeddings (patch * grid for ViT, 32 * grid for ResNet). The state dict has no head
  counts: like OpenAI, they are width / head_dim (ViT and text) and 32 * width / head_dim (ResNet).
  """
  if is_hf_state_dict(state_dict):
    state_dict = hf_to_openai_state_dict(state_dict)

  def get(name):
    if name not in state_dict:
      raise ValueError(f"Cannot infer the CLIP architecture: the state dict has no {name!r} "
                       "(not an OpenAI or transformers CLIP checkpoint?).")
    return np.shape(state_dict[name])

  text_width = get("ln_final.weight")[0]
  config = dict(embed_dim=get("text_projection")[1], context_length=get("positional_embedding")[0],
                vocab_size=get("token_embedding.weight")[0], text_width=text_width,
                text_heads=text_width // head_dim,
                text_layers=_count_indices(state_dict, r"transformer\.resblocks\.(\d+)\."))
  if "visual.proj" in state_dict:
    width, _, patch_size, _ = get("visual.conv1.weight")
    grid = math.isqrt(get("visual.positional_embedding")[0] - 1)
    config.update(vision_layers=_count_indices(state_dict,
                                               r"visual\.transformer\.resblocks\.(\d+)\."),
                  vision_width=width, vision_heads=width // head_dim,
                  vision_patch_size=patch_size, image_size=patch_size * grid)
  else:
    width = get("visual.layer1.0.conv1.weight")[0]
    grid = math.isqrt(get("visual.attnpool.positional_embedding")[0] - 1)
    config.update(vision_layers=tuple(_count_indices(state_dict, rf"visual\.layer{i}\.(\d+)\.")
                                      for i in range(1, 5)),
                  vision_width=width, vision_heads=32 * width // head_dim,
                  vision_patch_size=None, image_size=32 * grid)
  return config


def _rename_openai(name: str) -> str:
  """'visual.layer1.0.downsample.0.weight' -> 'visual/layer1_0/downsample_0/weight'."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")


# OpenAI attention modules whose (out, in) Linear weights become Flax attention kernels.
_ATTN_LINEARS = {"attn/out_proj": "attn/out", "attnpool/q_proj": "attnpool/attn/query",
                 "attnpool/k_proj": "attnpool/attn/key", "attnpool/v_proj": "attnpool/attn/value",
                 "attnpool/c_proj": "attnpool/attn/out"}


def _convert_openai_entry(name: str, value: np.ndarray, source: str) -> dict[str, np.ndarray]:
  """One OpenAI entry -> {'params/...' or 'batch_stats/...': array} with Flax layouts (heads not
  yet split)."""
  path = _rename_openai(name)
  module, _, leaf = path.rpartition("/")
  if leaf in ("in_proj_weight", "in_proj_bias"):
    if value.shape[0] % 3 or value.ndim != (2 if leaf == "in_proj_weight" else 1):
      raise ValueError(f"{source}: {name} has shape {value.shape}; expected packed q, k, v: "
                       "(3 D, D) for the weight, (3 D,) for the bias.")
    parts = np.split(value, 3, axis=0)  # q, k, v stacked along the output axis
    kind = "kernel" if leaf == "in_proj_weight" else "bias"
    return {f"params/{module}/{qkv}/{kind}": part.T if kind == "kernel" else part
            for qkv, part in zip(("query", "key", "value"), parts)}
  if leaf in ("running_mean", "running_var"):
    return {f"batch_stats/{module}/{leaf.removeprefix('running_')}": value}
  for old, new in _ATTN_LINEARS.items():
    if module == old or module.endswith("/" + old):
      module = module[:len(module) - len(old)] + new
  if leaf == "weight":
    if module == "token_embedding":
      return {"params/token_embedding/embedding": value}
    if value.ndim == 4:
      return {f"params/{module}/kernel": value.transpose(2, 3, 1, 0)}  # OIHW -> HWIO
    if value.ndim == 2:
      return {f"params/{module}/kernel": value.T}  # Linear (out, in) -> (in, out)
    return {f"params/{module}/scale": value}  # LayerNorm / BatchNorm
  return {f"params/{module}/{leaf}" if module else f"params/{leaf}": value}


def convert_openai_clip(state_dict: dict[str, np.ndarray], *, vision_heads: int, text_heads: int,
                        source: str = "<state dict>") -> dict:
  """OpenAI CLIP state dict (`clip/model.py` names) -> nested variables {'params', 'batch_stats'}.

  Renames as described in the module docstring; attention kernels are reshaped to Flax's
  `MultiHeadDotProductAttention` layout (q/k/v (D, H, D/H), out (H, D/H, D_out)) with
  `vision_heads` in the image tower and `text_heads` in the text tower. Drops OpenAI's metadata
  scalars and BatchNorm `num_batches_tracked`. 'batch_stats' exists only for ResNet towers.
  """
  flat = {}
  for name, value in state_dict.items():
    if name in OPENAI_METADATA or name.endswith(".num_batches_tracked"):
      continue
    for our_name, array in _convert_openai_entry(name, np.asarray(value), source).items():
      if "/attn/" in our_name:
        heads = vision_heads if our_name.startswith("params/visual/") else text_heads
        array = vit._split_heads(our_name, array, heads, where=f"{source}: {name}")
      flat[our_name] = array
  return common.unflatten(flat)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads CLIP weights into numpy: an OpenAI TorchScript archive (the state dict that
  `torch.jit.load(path).state_dict()` gives, read by `common.read_torchscript_state_dict` without
  torch and without running the archive's code), or any file `common.load_torch_state_dict` reads
  (a plain OpenAI or transformers state dict: `.pt`/`.pth`/`.bin` with weights_only=True,
  `.safetensors`). float16 stays as stored (bfloat16 becomes float32); `merge_params` casts
  later. An unreadable file is a ValueError naming it and the expected format."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP checkpoint {path!r} does not exist.")
  return common.load_torch_state_dict(path)  # TorchScript archives included


def convert_state_dict(state_dict: dict[str, np.ndarray], *, vision_heads: int, text_heads: int,
                       source: str = "<state dict>") -> dict:
  """OpenAI or transformers CLIP state dict -> nested variables (see `convert_openai_clip`)."""
  if is_hf_state_dict(state_dict):
    state_dict = hf_to_openai_state_dict(state_dict, source)
  return convert_openai_clip(state_dict, vision_heads=vision_heads, text_heads=text_heads,
                             source=source)


def _heads(init: dict, names: Sequence[str], path: str) -> int:
  for name in names:
    if name in init:
      return init[name].shape[1]
  raise ValueError(f"Cannot infer the number of heads for {path!r}: init variables have none of "
                   f"{list(names)}.")


def load(init_variables: dict, path: str, *, dont_load: Sequence[str] = ()) -> dict:
  """Loads CLIP weights (OpenAI `.pt`, TorchScript or not, or transformers `CLIPModel` weights)
  into `init_variables`, the whole variables dict ({'params': ..., 'batch_stats': ...} for ResNet
  towers).

  Head counts come from `init_variables`. Merging is strict (`common.merge_params`) over names
  like 'params/visual/conv1/kernel' and 'batch_stats/visual/bn1/mean': `dont_load` regexes are
  full-matched against those names.
  """
  path = os.fspath(path)
  if "params" not in init_variables:
    raise ValueError("clip.load takes the whole variables dict ({'params': ...}), not the params.")
  init = common.flatten(init_variables)
  query = "attn/query/kernel"
  vision_heads = _heads(init, (f"params/visual/transformer/resblocks_0/{query}",
                               f"params/visual/attnpool/{query}"), path)
  text_heads = _heads(init, (f"params/transformer/resblocks_0/{query}",), path)
  loaded = convert_state_dict(read_state_dict(path), vision_heads=vision_heads,
                              text_heads=text_heads, source=path)
  return common.merge_params(loaded, init_variables, dont_load=dont_load, source=path)


def init_variables_like(model: Model) -> dict:
  """Zero-filled variables of `model`'s shapes and dtypes, without running its initialisers."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def load_pretrained(path: str, *, dtype=jnp.float32, head_dim: int = 64) -> tuple[Model, dict]:
  """(model, variables) from a CLIP checkpoint, architecture inferred (`infer_config`).

  >>> model, variables = load_pretrained('ViT-B-32.pt')  # OpenAI's TorchScript archive
  >>> features = model.apply(variables, images, method=Model.encode_image)
  """
  path = os.fspath(path)
  state_dict = read_state_dict(path)
  model = Model(**infer_config(state_dict, head_dim=head_dim), dtype=dtype)
  init = init_variables_like(model)
  loaded = convert_state_dict(state_dict, vision_heads=model.vision_heads,
                              text_heads=model.text_heads, source=path)
  return model, common.merge_params(loaded, init, source=path)
