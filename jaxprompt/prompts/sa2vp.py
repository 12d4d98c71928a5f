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
    copies of them, so the checkpoint loads once and no weights are duplicated;
  * the local attention is a full attention with a static boolean mask (`local_attention_mask`):
    masked logits are -inf, so the softmax runs over exactly the clipped neighbourhood, as the
    reference's per-token loop does; `tests/test_sa2vp.py` checks it against a per-position version;
  * the image stream, the prompt stream and (at layers 4, 8) the deep prompt map go through block i
    as one concatenated batch: the same result with fewer, larger matmuls.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
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


class Sa2vpEncoder(vit.Encoder):
  """vit.Encoder's blocks run on the image and the prompt stream, with the cross adapters.

  Params: the ViT's own (`posembed_input`, `encoderblock_i`, `encoder_norm`) plus `ppt`,
  `ppt_proj`, `deep_ppt`, `deep_proj_k`, `cross_conv` and `cross_block_i`.
  """
  inter_dim: int = 16
  inter_weight: float = 0.1
  prompt_queries_image_layers: tuple[int, ...] = (0, 4, 8)  # the reference's b2p_list
  deep_prompt_layers: tuple[int, ...] = (4, 8)  # those below `depth` are used

  @nn.compact
  def __call__(self, tokens, *, grid: tuple[int, int], deterministic: bool = True):
    batch, length, width = tokens.shape  # (B, 1 + N, D)
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
    mask = local_attention_mask(*grid)
    for i in range(self.depth):
      block = self.make_block(i)
      prompt_is_query = i in self.prompt_queries_image_layers
      query, key_value = (prompt, image) if prompt_is_query else (image, prompt)
      attended = block.cross_attention(query, key_value, mask=mask, deterministic=deterministic)
      fusion = CrossAdapter(self.inter_dim, self.dropout, self.layer_norm_eps, self.dtype,
                            name=f"cross_block_{i}")(query, attended, deterministic=deterministic)
      streams = [image, prompt]
      if i in deep_layers:
        k = deep_layers.index(i)
        deep = _low_rank_dense(width, self.dtype, f"deep_proj_{k}")(deep_ppt[k].astype(self.dtype))
        streams.append(jnp.broadcast_to(deep, (batch, length, width)))
      out = block(jnp.concatenate(streams, axis=0), deterministic=deterministic)
      image, prompt = out[:batch], out[batch:2 * batch]
      if i in deep_layers:
        prompt = prompt + out[2 * batch:] * cross_conv[k].astype(self.dtype)
      if prompt_is_query:
        prompt = prompt + self.inter_weight * fusion
      else:
        image = image + self.inter_weight * fusion
    norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")
    return norm(image), norm(prompt)


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
  dtype: Any = jnp.float32

  def __post_init__(self):
    common.require(self, inter_dim=(self.inter_dim >= 1, "an integer >= 1"),
                   dropout=(0.0 <= self.dropout < 1.0, "a rate in [0, 1)"))
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
                           deep_prompt_layers=tuple(self.deep_prompt_layers), name="Transformer")
    image, prompt = encoder(tokens, grid=grid, deterministic=not train)
    head = nn.Dense(self.num_classes, dtype=self.dtype,
                    kernel_init=nn.initializers.normal(stddev=0.02),
                    bias_init=common.torch_linear_bias_init(v["width"]), name="head")
    logits, prompt_logits = head(image[:, 0]), head(prompt[:, 0])
    return logits.astype(jnp.float32), {"prompt_logits": prompt_logits.astype(jnp.float32),
                                        "pre_logits": image[:, 0]}


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
