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
"""
from __future__ import annotations

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
  (`local_attention_mask`) and never to the CLS key. The neighbourhood is read as nine shifted
  views of the zero-padded key/value grid, so the cost is 9 dot products per query rather than a
  masked (1 + N)^2 attention; out-of-grid neighbours get a -inf logit, exactly as the mask.
  `zero_padded=True` is the `_acc` variant's rule instead: every patch has 9 neighbours, those
  outside the grid being zero keys and values (logit 0, nothing added).
  """
  batch, heads, length, head_dim = q.shape
  rows, cols = grid
  q = q * head_dim**-0.5
  cls_weights = jax.nn.softmax((q[:, :, :1] @ k.swapaxes(-1, -2)).astype(jnp.float32))
  cls_out = cls_weights.astype(v.dtype) @ v  # (B, H, 1, D/H)

  def grid_of(x, pad):
    x = x[:, :, 1:].reshape(batch, heads, rows, cols, head_dim)
    return jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0))) if pad else x

  patch_q, patch_k, patch_v = grid_of(q, False), grid_of(k, True), grid_of(v, True)
  shifts = [(dr, dc) for dr in range(3) for dc in range(3)]
  view = lambda x, dr, dc: x[:, :, dr:dr + rows, dc:dc + cols]
  logits = jnp.stack([jnp.sum(patch_q * view(patch_k, dr, dc), -1) for dr, dc in shifts], -1)
  logits = logits.astype(jnp.float32)
  if not zero_padded:
    r, c = np.arange(rows)[:, None, None], np.arange(cols)[None, :, None]
    dr, dc = np.array(shifts).T - 1
    inside = (0 <= r + dr) & (r + dr < rows) & (0 <= c + dc) & (c + dc < cols)  # (rows, cols, 9)
    logits = jnp.where(inside, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, -1).astype(v.dtype)
  patch_out = sum(weights[..., j, None] * view(patch_v, dr, dc) for j, (dr, dc) in enumerate(shifts))
  out = jnp.concatenate([cls_out, patch_out.reshape(batch, heads, rows * cols, head_dim)], 2)
  return out.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


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
  """Loads a ViT checkpoint (Google .npz or Hugging Face) into an SA2VP param tree."""
  return vit.load(init_params, path, dont_load=(TRAINABLE_PARAMS,))


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS,
                       loaders={"model": method.params_loader(load)}, make_loss=make_loss)
