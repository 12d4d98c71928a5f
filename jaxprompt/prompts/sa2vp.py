"""SA2VP: spatially aligned-and-adapted visual prompt (Pei et al., AAAI 2024, arXiv 2312.10376), ViT.

Follows tommy-xq/SA2VP `vpt_main/src/models/vit_backbones/vit_tinypara.py` (the reference, not the
`_acc` variant) and `vit_train_sa2vp.py` / `engine_for_train.py` (paper §3):

  * a second token stream, the *prompt map* (B, 1 + N, D), aligned one to one with the image
    tokens: `Dense_{d->D}(ppt) + pos_embedding`, ppt (1, 1 + N, d) ~ N(0, 0.02^2), then the
    embedding dropout; slot 0 is the prompt stream's CLS slot;
  * both streams run through the *same* frozen ViT blocks and the final LayerNorm;
  * before every block i a cross adapter is computed from the pre-block streams: block i's frozen
    LayerNorm_0 and attention weights, used as cross-attention in which each patch query sees only
    the clipped 3x3 neighbourhood of its grid position in the other stream (the CLS query sees all
    tokens, no patch query sees the CLS key), then `z = query + dropout(attention)`, and
    `F = MLP_{D->d->D}(LN_f(z))` (no outer residual). At layers (0, 4, 8) the prompt queries the
    image and `prompt += alpha * F` after block i; at the other layers the image queries the
    prompt and `image += alpha * F`;
  * deep prompt maps at layers 4 and 8: `block_i(Dense_{d->D}(deep_ppt[k])) * cross_conv[k]` is
    added to the prompt stream after block i;
  * one shared head on both CLS slots; loss 0.8 CE(image) + 0.2 CE(prompt) (`make_loss`);
    accuracy from the image logits only;
  * the frozen backbone's dropout (0.1) is live in training, unlike VPT.

Deliberate choices (numerically identical to the reference while the backbone is frozen):
  * the cross-attention reads block i's own LayerNorm_0 / attention parameters instead of frozen
    copies of them, so the checkpoint loads once and no weights are duplicated, and it reuses the
    Q/K/V that block i's self-attention projects from the same pre-block streams (the reference
    projects them twice); the cross and self attentions share one out-projection matmul;
  * the local attention reads the clipped 3x3 neighbourhood as nine shifted views of the padded
    key grid (`local_cross_attention`), out-of-grid neighbours at -inf, as the reference's
    per-token loop; `tests/test_sa2vp.py` checks it against a per-position version;
  * the image and prompt streams go through block i as one concatenated batch; the deep prompt
    map (input-independent) runs block i at batch 1 up to the MLP's first dropout, where it joins
    the batch so that dropout is still drawn per example, as in the reference's expanded batch;
  * `cross_attention='acc'` gives `vit_tinypara_acc.py`'s rule (one 768-wide head, zero-padded
    neighbourhood); same params, so prompts trained either way load into either.

Prompts trained with the original load as they are: `config.model_init=checkpoint-best.pth` (what
its `vit_train_sa2vp.py` saves, or a bare `VisionTransformer` state dict) goes to `load_original`,
told apart from a ViT checkpoint by its keys, and sets the whole tree: backbone, `ppt`, the cross
adapters, the deep prompt maps and the head (`class_head`). Set `model.cross_attention='acc'` when
it trained `vit_tinypara_acc.py` (the file does not record the variant), and the same `inter_dim`,
`deep_prompt_layers`, image size and number of classes; any other shape, a missing or extra key, or
a cross adapter's frozen LayerNorm_0/attention copy unlike block i's own (ours has no copy) is
refused naming the file and the original's key. `benchmarks/sa2vp_original.py --check_parity`
checks the logits of both variants against the original's code.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import method, optim
from jaxprompt.models import common, vit

# Parameters that train: the prompt maps and their projections, the cross adapters' LayerNorm and
# bottleneck MLP, the deep prompts' channel scales, and the head. The rest (ViT) is frozen.
TRAINABLE_PARAMS = (r"Transformer/(ppt|ppt_proj/.*|deep_ppt|deep_proj_\d+/.*|cross_conv"
                    r"|cross_block_\d+/.*)|head/.*")
# Loss weights of the image and the prompt branch (`engine_for_train.py`).
IMAGE_LOSS_WEIGHT, PROMPT_LOSS_WEIGHT = 0.8, 0.2


def local_attention_mask(grid_height: int, grid_width: int, *, cls_token: bool = True) -> np.ndarray:
  """Boolean (L, L) mask, True where query token may attend key token (L = [1 +] H * W).

  Patch (r, c) attends to the patches (r', c') with |r - r'| <= 1 and |c - c'| <= 1 (9 inside the
  grid, 6 on an edge, 4 in a corner) and never to the CLS token; the CLS query attends to all.
  """
  rows, cols = np.divmod(np.arange(grid_height * grid_width), grid_width)
  near = ((np.abs(rows[:, None] - rows[None, :]) <= 1)
          & (np.abs(cols[:, None] - cols[None, :]) <= 1))
  if not cls_token:
    return near
  mask = np.zeros((near.shape[0] + 1,) * 2, bool)
  mask[0, :] = True
  mask[1:, 1:] = near
  return mask


def _low_rank_dense(width: int, dtype, name: str) -> nn.Dense:
  """SA2VP's new d -> D (and D -> d) Linears: Xavier-uniform weight, N(0, 1e-6^2) bias."""
  return nn.Dense(width, dtype=dtype, kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.normal(stddev=1e-6), name=name)


class CrossAdapter(nn.Module):
  """The trainable half of SA2VP's Cross_Block: `MLP_{D->d->D}(LN_f(query + dropout(attended)))`.

  `attended` is the frozen cross-attention output (computed by the caller with block i's weights).
  The bottleneck MLP is `vit.MlpBlock` (Dense -> exact GELU -> dropout -> Dense -> dropout, Xavier
  weights, N(0, 1e-6^2) biases by default), exactly the reference's `Mlp_small`; the Swin variant
  passes its own initialisers.
  """
  inter_dim: int
  dropout: float = 0.1
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, query, attended, *, deterministic: bool = True):
    z = query + vit.Dropout(self.dropout)(attended, deterministic=deterministic)
    z = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="ffn_norm")(z)
    return vit.MlpBlock(self.inter_dim, self.dropout, dtype=self.dtype,
                        kernel_init=self.kernel_init, bias_init=self.bias_init, name="ffn")(
                            z, deterministic=deterministic)


def local_cross_attention(q, k, v, grid: tuple[int, int], *, zero_padded: bool = False):
  """SA2VP's spatially aligned cross-attention on heads (B, H, 1 + N, D/H) -> (B, 1 + N, H * D/H).

  The CLS query attends to every key; patch (r, c) to the keys of its clipped 3x3 neighbourhood
  (`local_attention_mask`) and never to the CLS key (`grid_neighbourhood_attention`).
  `zero_padded=True` is the `_acc` variant's rule instead: every patch has 9 neighbours, those
  outside the grid being zero keys and values (logit 0, nothing added).
  """
  batch, heads, length, head_dim = q.shape
  rows, cols = grid
  q = q * head_dim**-0.5
  cls_weights = jax.nn.softmax((q[:, :, :1] @ k.swapaxes(-1, -2)).astype(jnp.float32))
  cls_out = cls_weights.astype(v.dtype) @ v  # (B, H, 1, D/H)
  grid_of = lambda x: x[:, :, 1:].reshape(batch, heads, rows, cols, head_dim)
  patch_out = grid_neighbourhood_attention(grid_of(q), grid_of(k), grid_of(v),
                                           zero_padded=zero_padded)
  out = jnp.concatenate([cls_out, patch_out.reshape(batch, heads, rows * cols, head_dim)], 2)
  return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


def grid_neighbourhood_attention(q, k, v, *, rows_axis: int = -3, zero_padded: bool = False):
  """Each query of a grid attends to the keys of its clipped 3x3 neighbourhood in the key/value
  grids; `q` comes scaled. Rows and columns are axes `rows_axis` and `rows_axis + 1`, features
  the last axis: head-major (..., rows, cols, D) by default, token-major (B, rows, cols, heads, D)
  with `rows_axis=1`.

  The neighbourhood is read as nine shifted views of the zero-padded key/value grids, so the cost
  is 9 dot products per query rather than a masked (rows * cols)^2 attention; out-of-grid
  neighbours get a -inf logit, exactly as `local_attention_mask`. `zero_padded=True` keeps them
  as zero keys and values instead (logit 0, nothing added: the `_acc` variant).
  """
  rows_axis %= q.ndim
  rows, cols = q.shape[rows_axis:rows_axis + 2]
  padding = [(0, 0)] * q.ndim
  padding[rows_axis] = padding[rows_axis + 1] = (1, 1)
  k, v = jnp.pad(k, padding), jnp.pad(v, padding)
  shifts = [(dr, dc) for dr in range(3) for dc in range(3)]

  def view(x, dr, dc):
    x = jax.lax.slice_in_dim(x, dr, dr + rows, axis=rows_axis)
    return jax.lax.slice_in_dim(x, dc, dc + cols, axis=rows_axis + 1)

  logits = jnp.stack([jnp.sum(q * view(k, dr, dc), -1) for dr, dc in shifts], -1)
  logits = logits.astype(jnp.float32)
  if not zero_padded:
    r, c = np.arange(rows)[:, None, None], np.arange(cols)[None, :, None]
    dr, dc = np.array(shifts).T - 1
    inside = (0 <= r + dr) & (r + dr < rows) & (0 <= c + dc) & (c + dc < cols)  # (rows, cols, 9)
    inside = inside.reshape(rows, cols, *[1] * (q.ndim - rows_axis - 3), 9)
    logits = jnp.where(inside, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, -1).astype(v.dtype)
  return sum(weights[..., j, None] * view(v, dr, dc) for j, (dr, dc) in enumerate(shifts))


def _single_head(x):
  """(B, H, L, D/H) -> (B, 1, L, D): the `_acc` variant attends with one 768-wide head."""
  batch, heads, length, head_dim = x.shape
  return x.transpose(0, 2, 1, 3).reshape(batch, 1, length, heads * head_dim)


class Sa2vpEncoder(vit.Encoder):
  """vit.Encoder's blocks run on the image and the prompt stream, with the cross adapters.

  Params: the ViT's own (`posembed_input`, `encoderblock_i`, `encoder_norm`) plus `ppt`,
  `ppt_proj`, `deep_ppt`, `deep_proj_k`, `cross_conv` and `cross_block_i`. Returns the final
  LayerNorm of the two CLS tokens (the only tokens the heads read).

  Work shared, exactly: block i's LN_0 and Q/K/V projections of the two streams serve both its
  self-attention and the cross adapter's attention (the reference recomputes them in frozen
  copies), and the cross and self attentions share one out-projection matmul. The deep prompt map
  does not depend on the input: its block runs at batch 1 up to the MLP's first dropout, which is
  drawn per example (as the reference's expanded batch draws it).
  """
  inter_dim: int = 16
  inter_weight: float = 0.1
  prompt_queries_image_layers: tuple[int, ...] = (0, 4, 8)  # the reference's b2p_list
  deep_prompt_layers: tuple[int, ...] = (4, 8)  # those below `depth` are used
  cross_attention: str = "reference"  # or 'acc' (`local_cross_attention`, `Model`)

  @nn.compact
  def __call__(self, tokens, *, grid: tuple[int, int], deterministic: bool = True):
    batch, length, width = tokens.shape  # (B, 1 + N, D)
    if self.attention_dropout:
      raise ValueError(f"attention_dropout={self.attention_dropout}: SA2VP's ViT has none (the "
                       "batch-1 deep prompt block relies on it).")
    dropout = vit.Dropout(self.dropout)
    add_position = vit.AddPositionEmbs(name="posembed_input")
    ppt = self.param("ppt", nn.initializers.normal(stddev=0.02), (1, length, self.inter_dim))
    deep_layers = [i for i in self.deep_prompt_layers if i < self.depth]
    if deep_layers:
      deep_ppt = self.param("deep_ppt", nn.initializers.normal(stddev=0.02),
                            (len(deep_layers), 1, length, self.inter_dim))
      cross_conv = self.param("cross_conv", nn.initializers.normal(stddev=0.02),
                              (len(deep_layers), width))

    image = dropout(add_position(tokens), deterministic=deterministic)
    prompt = _low_rank_dense(width, self.dtype, "ppt_proj")(ppt.astype(self.dtype))
    prompt = dropout(add_position(jnp.broadcast_to(prompt, (batch, length, width))),
                     deterministic=deterministic)
    for i in range(self.depth):
      block = self.make_block(i)
      prompt_is_query = i in self.prompt_queries_image_layers
      streams = jnp.concatenate([image, prompt])  # (2B, 1 + N, D)
      q, k, v = block.attention_qkv(streams)
      own, other = (slice(batch, None), slice(None, batch))
      if not prompt_is_query:
        own, other = other, own
      cross_qkv = (q[own], k[other], v[other])
      if self.cross_attention == "acc":
        cross_qkv = [_single_head(x) for x in cross_qkv]
      attended = [block.attention.attend(q, k, v, deterministic=deterministic),
                  local_cross_attention(*cross_qkv, grid, zero_padded=self.cross_attention == "acc")]
      attended = block.attention.output(jnp.concatenate(attended))  # (3B, 1 + N, D)
      streams = block.attention_residual(streams, attended[:2 * batch],
                                         deterministic=deterministic)
      query = prompt if prompt_is_query else image
      fusion = CrossAdapter(self.inter_dim, self.dropout, self.layer_norm_eps, self.dtype,
                            name=f"cross_block_{i}")(query, attended[2 * batch:],
                                                     deterministic=deterministic)
      hidden = block.mlp_hidden(streams)
      if i in deep_layers:
        k_deep = deep_layers.index(i)
        deep = _low_rank_dense(width, self.dtype, f"deep_proj_{k_deep}")(
            deep_ppt[k_deep].astype(self.dtype))  # (1, 1 + N, D)
        deep = block.attention_residual(deep, block.attention.output(
            block.attention.attend(*block.attention_qkv(deep))))
        expand = lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:]))
        hidden = jnp.concatenate([hidden, expand(block.mlp_hidden(deep))])
        streams = jnp.concatenate([streams, expand(deep)])
      out = block.mlp_residual(streams, hidden, deterministic=deterministic)
      image, prompt = out[:batch], out[batch:2 * batch]
      if i in deep_layers:
        prompt = prompt + out[2 * batch:] * cross_conv[k_deep].astype(self.dtype)
      if prompt_is_query:
        prompt = prompt + self.inter_weight * fusion
      else:
        image = image + self.inter_weight * fusion
    norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")
    return norm(image[:, 0]), norm(prompt[:, 0])


class Model(nn.Module):
  """SA2VP on ViT. Returns `(image_logits, {'prompt_logits', 'pre_logits'})`."""
  num_classes: int
  variant: str = "B/16"
  inter_dim: int = 16
  inter_weight: float = 0.1
  dropout: float = 0.1
  prompt_queries_image_layers: tuple[int, ...] = (0, 4, 8)
  deep_prompt_layers: tuple[int, ...] = (4, 8)  # (4,) for Stanford Cars, per the seed's comment
  layer_norm_eps: float = 1e-6
  # 'reference' (`vit_tinypara.py`: the block's heads, clipped 3x3 neighbourhood) or 'acc'
  # (`vit_tinypara_acc.py`, which the original README recommends for speed: one head over all D
  # channels, scale D^-0.5, the 3x3 neighbourhood zero-padded at the border).
  cross_attention: str = "reference"
  dtype: Any = jnp.float32

  def __post_init__(self):
    common.require(self, inter_dim=(self.inter_dim >= 1, "an integer >= 1"),
                   dropout=(0.0 <= self.dropout < 1.0, "a rate in [0, 1)"),
                   cross_attention=(self.cross_attention in ("reference", "acc"),
                                    "'reference' or 'acc'"))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    v = vit.decode_variant(self.variant)
    tokens = vit.embed_patches(self, images, width=v["width"], patch_size=v["patch_size"],
                               dtype=self.dtype)
    grid = (images.shape[1] // v["patch_size"], images.shape[2] // v["patch_size"])
    encoder = Sa2vpEncoder(v["depth"], v["mlp_dim"], v["num_heads"], dropout=self.dropout,
                           layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                           inter_dim=self.inter_dim, inter_weight=self.inter_weight,
                           prompt_queries_image_layers=tuple(self.prompt_queries_image_layers),
                           deep_prompt_layers=tuple(self.deep_prompt_layers),
                           cross_attention=self.cross_attention, name="Transformer")
    image, prompt = encoder(tokens, grid=grid, deterministic=not train)  # the CLS tokens
    head = nn.Dense(self.num_classes, dtype=self.dtype,
                    kernel_init=nn.initializers.normal(stddev=0.02),
                    bias_init=common.torch_linear_bias_init(v["width"]), name="head")
    logits, prompt_logits = head(image), head(prompt)
    return logits.astype(jnp.float32), {"prompt_logits": prompt_logits.astype(jnp.float32),
                                        "pre_logits": image}


def make_loss(config, source):
  """Per-example 0.8 CE(image logits) + 0.2 CE(prompt logits) on batch['label']."""
  smoothing = config.get("label_smoothing", 0.0)

  def loss(logits, aux, batch):
    ce = lambda z: optim.cross_entropy(z, batch["label"], source.num_classes, smoothing)
    return IMAGE_LOSS_WEIGHT * ce(logits) + PROMPT_LOSS_WEIGHT * ce(aux["prompt_logits"])

  return loss


def load(init_params, path: str):
  """Loads `config.model_init` into an SA2VP param tree: a ViT checkpoint (Google .npz or Hugging
  Face; the SA2VP params keep their init) or, told apart by its keys, a checkpoint of the original
  SA2VP (`load_original`: backbone, prompts, cross adapters, deep prompt maps and head)."""
  path = os.fspath(path)
  if os.path.splitext(path)[1].lower() in (".safetensors", *common.TORCH_EXTENSIONS):
    state = _read_torch_checkpoint(path)  # vit.load reads a Hugging Face file again: once per run
    if any(key.startswith(_ORIGINAL_PREFIXES) or key == _ORIGINAL_MARKER for key in state):
      return load_original(init_params, state, path)
  return vit.load(init_params, path, dont_load=(TRAINABLE_PARAMS,))


# ---------------------------------------------------------------------------------------------
# Checkpoints of the original (tommy-xq/SA2VP): `utils.save_model` writes
# {'model': Dual_model.state_dict(), 'optimizer', 'epoch', 'scaler', 'args'} with torch.save, the
# ViT under 'vit_base.' (`vit_tinypara.py` or `vit_tinypara_acc.py`: the same keys) and the shared
# head as 'class_head.'. Keys below are without 'vit_base.'; a bare `VisionTransformer(num_classes=
# C)` state dict (head 'head.') loads too.
# ---------------------------------------------------------------------------------------------

# Keys that only the original's files have: the training script's prefixes, and its prompt.
_ORIGINAL_PREFIXES = ("vit_base.", "class_head.")
_ORIGINAL_MARKER = "transformer.embeddings.ppt"
# Our module (regex over '/'-joined names) -> the original's module; the leaf maps by
# _ORIGINAL_LEAVES (Linear/Conv2d 'weight', LayerNorm 'weight', 'bias').
_ORIGINAL_MODULES = (
    (r"embedding", "transformer.embeddings.patch_embeddings"),
    (r"Transformer/ppt_proj", "transformer.embeddings.ppt_proj"),
    (r"Transformer/deep_proj_(\d+)", r"transformer.encoder.deep_proj.\1"),
    (r"Transformer/encoder_norm", "transformer.encoder.encoder_norm"),
    (r"Transformer/encoderblock_(\d+)/LayerNorm_0", r"transformer.encoder.layer.\1.attention_norm"),
    (r"Transformer/encoderblock_(\d+)/LayerNorm_2", r"transformer.encoder.layer.\1.ffn_norm"),
    (r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_1/(query|key|value|out)",
     r"transformer.encoder.layer.\1.attn.\2"),
    (r"Transformer/encoderblock_(\d+)/MlpBlock_3/Dense_0", r"transformer.encoder.layer.\1.ffn.fc1"),
    (r"Transformer/encoderblock_(\d+)/MlpBlock_3/Dense_1", r"transformer.encoder.layer.\1.ffn.fc2"),
    (r"Transformer/cross_block_(\d+)/ffn_norm", r"transformer.encoder.cross_attn.\1.ffn_norm"),
    (r"Transformer/cross_block_(\d+)/ffn/Dense_0", r"transformer.encoder.cross_attn.\1.ffn.fc1"),
    (r"Transformer/cross_block_(\d+)/ffn/Dense_1", r"transformer.encoder.cross_attn.\1.ffn.fc2"),
    (r"head", "head"),
)
_ORIGINAL_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Our params that are whole nn.Parameters in the original.
_ORIGINAL_PARAMS = {
    "cls": "transformer.embeddings.cls_token",
    "Transformer/posembed_input/pos_embedding": "transformer.embeddings.position_embeddings",
    "Transformer/ppt": "transformer.embeddings.ppt",
    "Transformer/deep_ppt": "transformer.encoder.deep_ppt",
    "Transformer/cross_conv": "transformer.encoder.cross_conv",
}
# The original's Cross_Block i holds frozen copies of block i's LayerNorm_0 and attention (its
# `load_from` copies them from the same .npz entries): `_block_key_of_copy`.
_ORIGINAL_COPY = (r"transformer\.encoder\.cross_attn\.(\d+)\.(attention_norm|attn\.to_(q|k|v|out))"
                  r"\.(weight|bias)")
_ORIGINAL_ATTENTION_COPIES = {"q": "query", "k": "key", "v": "value", "out": "out"}
_ORIGINAL_SHAPES_HINT = (
    "The model's config sets these shapes: model.variant (width, depth, heads, MLP width), "
    "model.inter_dim (last axis of ppt and deep_ppt, the cross adapters' bottleneck), "
    "model.deep_prompt_layers (one deep_ppt / cross_conv / deep_proj per layer; the original's "
    "Stanford Cars setting has one), the image size (the token count, 197 at 224 px) and the "
    "data's number of classes (class_head).")


def _original_key(name: str) -> str:
  """Our '/'-joined param name -> the original's state dict key (without 'vit_base.')."""
  if name in _ORIGINAL_PARAMS:
    return _ORIGINAL_PARAMS[name]
  module, leaf = name.rsplit("/", 1)
  for pattern, original in _ORIGINAL_MODULES:
    if re.fullmatch(pattern, module) and leaf in _ORIGINAL_LEAVES:
      return f"{re.sub(pattern, original, module)}.{_ORIGINAL_LEAVES[leaf]}"
  raise ValueError(f"SA2VP param {name!r} has no counterpart in the original's checkpoints.")


def _block_key_of_copy(key: str) -> str | None:
  """'transformer.encoder.cross_attn.i.attn.to_q.weight' -> block i's 'attn.query.weight' (and
  so on, LayerNorm included); None for a key that is no such copy."""
  match = re.fullmatch(_ORIGINAL_COPY, key)
  if not match:
    return None
  module = ("attention_norm" if match[3] is None
            else f"attn.{_ORIGINAL_ATTENTION_COPIES[match[3]]}")
  return f"transformer.encoder.layer.{match[1]}.{module}.{match[4]}"


def _torch_layout(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], Callable]:
  """(the original's shape of our param `name` of `shape`, its array -> ours).

  Conv2d (D, 3, p, p) -> (p, p, 3, D); Linear weights (out, in) are transposed and reshaped to
  Flax's attention layout (query/key/value (D, H, D/H), out (H, D/H, D)); biases and LayerNorm
  weights are flat vectors reshaped to ours ((H, D/H) for the attention's); nn.Parameters stay.
  """
  if name == "embedding/kernel":
    return (shape[3], shape[2], shape[0], shape[1]), lambda x: x.transpose(2, 3, 1, 0)
  if name.endswith("/kernel"):
    fan_in = 2 if name.endswith("MultiHeadDotProductAttention_1/out/kernel") else 1
    fan_in, fan_out = math.prod(shape[:fan_in]), math.prod(shape[fan_in:])
    return (fan_out, fan_in), lambda x: x.T.reshape(shape)
  if name.endswith(("/bias", "/scale")):
    return (math.prod(shape),), lambda x: x.reshape(shape)
  return tuple(shape), lambda x: x


def _read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """`common.load_torch_state_dict`, allowing `argparse.Namespace` in a torch.save file: the
  'args' entry the original's `save_model` writes beside the state dict (attribute values only;
  nothing runs)."""
  if os.path.splitext(path)[1].lower() == ".safetensors":
    return common.load_torch_state_dict(path)
  torch = common.import_torch(path)
  with torch.serialization.safe_globals([argparse.Namespace]):
    return common.load_torch_state_dict(path)


def load_original(init_params, state: dict[str, np.ndarray], path: str):
  """Merges the state dict `state` of an original SA2VP ViT checkpoint (tommy-xq/SA2VP
  `vit_train_sa2vp.py`'s `checkpoint-*.pth`, either variant), read from `path`, into an SA2VP
  param tree, strictly.

  Every key of the file and every param of the model must pair up with the same shape; otherwise
  one ValueError names the file and lists each missing, unexpected and mis-shaped key in the
  original's names. The cross adapters' frozen copies of block i's LayerNorm_0 and attention
  (`cross_attn.i.attention_norm`, `cross_attn.i.attn.to_q|k|v|out`) must equal block i's, since
  ours reads block i's own. Which variant trained the prompts is not in the file: set
  `config.model.cross_attention` ('acc' for `vit_tinypara_acc.py`, 'reference' for
  `vit_tinypara.py`).
  """
  entries = {}
  for key, value in state.items():
    ours = re.sub(r"^class_head\.", "head.", key.removeprefix("vit_base."))
    if ours in entries:
      raise ValueError(f"{path}: keys {entries[ours][0]!r} and {key!r} are the same parameter.")
    entries[ours] = (key, value)
  if _ORIGINAL_MARKER not in entries:
    raise ValueError(
        f"{path} is not a checkpoint of the original SA2VP on ViT (tommy-xq/SA2VP "
        f"vit_train_sa2vp.py): it has no 'vit_base.{_ORIGINAL_MARKER}'; its first keys: "
        f"{sorted(state)[:5]}. (A Swin SA2VP checkpoint has 'vit_base.layers.*'.)")
  training_script = any(key.startswith("vit_base.") for key, _ in entries.values())

  def display(key):  # a key as the file has it, or would have it
    if key in entries:
      return entries[key][0]
    if not training_script:
      return key
    return f"class_head.{key[5:]}" if key.startswith("head.") else f"vit_base.{key}"

  loaded, missing, wrong_shape, used, loaded_keys = {}, [], [], set(), set()
  for name, param in common.flatten(init_params).items():
    key = _original_key(name)
    expected, to_ours = _torch_layout(name, tuple(param.shape))
    if key not in entries:
      missing.append(f"{display(key)} {expected} (for {name})")
      continue
    used.add(key)
    value = entries[key][1]
    if value.shape != expected:
      wrong_shape.append(f"{display(key)}: checkpoint {value.shape} vs expected {expected} "
                         f"(for {name})")
    else:
      loaded[name] = to_ours(value)
      loaded_keys.add(key)
  unexpected, copies_differ = [], []
  for key in sorted(set(entries) - used):
    block_key = _block_key_of_copy(key)
    if block_key is None or block_key not in used:
      unexpected.append(display(key))
    elif block_key in loaded_keys and not np.array_equal(entries[key][1], entries[block_key][1]):
      copies_differ.append(f"{display(key)} differs from {display(block_key)}")
  if missing or unexpected or wrong_shape or copies_differ:
    lines = [f"Checkpoint {path} does not match the SA2VP model as configured (keys in the "
             "original's names, tommy-xq/SA2VP vit_tinypara.py):"]
    for title, keys in (("missing from the checkpoint", missing),
                        ("in the checkpoint but not in the model", unexpected),
                        ("wrong shape", wrong_shape),
                        ("a cross adapter's frozen copy unlike its block's weight (ours reads "
                         "block i's own)", copies_differ)):
      if keys:
        lines += [f"  {title} ({len(keys)}):", *(f"    {key}" for key in keys)]
    if wrong_shape or missing:
      lines.append(_ORIGINAL_SHAPES_HINT)
    raise ValueError("\n".join(lines))
  return common.merge_params(loaded, init_params, source=path)


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS,
                       loaders={"model": method.params_loader(load)}, make_loss=make_loss)
