"""SA2VP (Pei et al., AAAI 2024, arXiv 2312.10376) on Swin-B.

Follows tommy-xq/SA2VP `vpt_main/src/models/vit_backbones/swin_transformer_tinypara.py`,
`build_swin_backbone.py` (`swinb_imagenet22k_224`) and `vit_train_swin.py` (paper §3 and its Swin
experiments); the ViT version and the shared pieces are in `sa2vp.py`.

  * the prompt map (B, H/4, W/4, 128) = patch-embed LN(Dense_{d->128}(deep_ppt)), deep_ppt
    (1, 56*56, d) ~ N(0, 0.02^2); no position embedding (Swin has none);
  * image and prompt maps run through the same frozen blocks, shifts, masks and patch merging, so
    the prompt map stays aligned with the image map at every resolution (56^2 -> ... -> 7^2);
  * only the 18-block stage (`cross_stage=2`, 14x14 at 224 px) has cross adapters: before block j
    the cross-attention uses block j's frozen norm1 scale/bias (with eps 1e-6, as the original's
    copy into a LayerNorm(eps=1e-6) computes; Swin's own norm1 uses 1e-5) and its fused qkv and
    proj weights, 16 heads x 32, on the global map with no window, shift or position bias; every
    query attends to its clipped 3x3 neighbourhood in the other map (no CLS). Then
    `F = MLP_{512->d->512}(LN_f(query + dropout(attention)))` (`sa2vp.CrossAdapter`). Blocks with
    j % 6 == 0: the prompt queries the image and `prompt += alpha * F` after block j; the others:
    the image queries the prompt and `image += alpha * F`. alpha = 0.5 (the code's default);
  * both maps: final LN -> mean over tokens -> one shared head Linear(1024 -> C); loss 0.8/0.2
    (`sa2vp.make_loss`); accuracy from the image logits;
  * the whole model trains in train mode: stochastic depth (0.2, linear over the 24 blocks) is live,
    drawn independently per sample and so per stream, and the adapters' dropout (0.1) too;
  * the new Linears (proj_ppt, the adapters' MLPs) start N(0, 0.02^2) with zero biases: the
    original's final `self.apply(_init_weights)` overrides their Xavier init; ffn_norm ones/zeros.
    timm's `trunc_normal_(std=0.02)` truncates at +-2 absolute, so it is a plain normal here.

Deliberate choices:
  * as for ViT, the cross-attention reads block j's own params (no frozen copies), and the local
    attention reads nine shifted views of the 14x14 maps (`sa2vp.grid_neighbourhood_attention`)
    where the original loops over the 196 queries; `tests/test_swin_prompts.py` checks it
    against a per-position loop;
  * the two maps travel stacked on the batch axis (image first): `PromptMapEmbed` stacks them after
    the patch embedding and `swin.Model`'s stages, merging, final norm and head run unchanged, with
    a block hook adding the adapters in `cross_stage`; drop-path draws stay per sample, so the
    streams draw independently as in the original's two calls;
  * before `cross_stage` each block runs on the two maps separately, the image maps under
    `stop_gradient`: nothing trainable is upstream of them there, so the trainables' gradients are
    unchanged and the backward pass skips the image half of the first stages (45 of 1,143 GFLOP
    per Swin-B step; 5 % of its time); drop path still draws independently for every sample;
  * `cross_stage` generalises the original's `depth == 18` test (so tiny sizes have adapters too);
  * the head is `swin.Model`'s: weight truncated normal 0.02 (at 2 std), bias 0; the original's
    bias starts at PyTorch's default U(+-1/32). Only the random start differs.
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt import method
from jaxprompt.models import common, swin
from jaxprompt.prompts import sa2vp

# Trainable: the prompt map and its projection, the cross adapters' LN and MLP, the head.
TRAINABLE_PARAMS = r"patch_embed/(deep_ppt|proj_ppt/.*)|cross_block_\d+/.*|head/.*"
# The new Linears' effective init (the original's `_init_weights` override).
_NEW_DENSE_INIT = dict(kernel_init=nn.initializers.normal(stddev=0.02),
                       bias_init=nn.initializers.zeros)


def local_cross_attention(block_params, query, key_value, *, num_heads: int,
                          layer_norm_eps: float = 1e-6, dtype=jnp.float32):
  """Attention of the (B, H, W, C) `query` map over the clipped 3x3 neighbourhood of the same
  position in `key_value`, with a Swin block's norm1 (at `layer_norm_eps`) and fused qkv / proj.

  Q is the first third of qkv(LN(query)), K and V the second and third of qkv(LN(key_value)).
  """
  batch, height, width, channels = query.shape
  head_dim = channels // num_heads
  norm = nn.LayerNorm(epsilon=layer_norm_eps, dtype=dtype)
  qkv, proj = block_params["attn"]["qkv"], block_params["attn"]["proj"]

  def project(x, parts):  # parts (first, end) of q, k, v = 0, 1, 2 -> (B, H, W, heads, head_dim)
    x = norm.apply({"params": block_params["norm1"]}, x)
    cols = slice(parts[0] * channels, parts[1] * channels)
    y = x @ jnp.asarray(qkv["kernel"][:, cols], dtype) + jnp.asarray(qkv["bias"][cols], dtype)
    return jnp.split(y.reshape(batch, height, width, -1, head_dim), parts[1] - parts[0], axis=3)

  # Token-major (B, H, W, heads, head_dim): 14 ms for Swin-B's 14x14x16 heads at batch 8
  # (forward and backward) against 20 ms head-major and 45 ms for a masked 196^2 attention.
  (q,), (k, v) = project(query, (0, 1)), project(key_value, (1, 3))
  out = sa2vp.grid_neighbourhood_attention(q * head_dim**-0.5, k, v, rows_axis=1)
  out = out.reshape(batch, height, width, channels)
  return out @ jnp.asarray(proj["kernel"], dtype) + jnp.asarray(proj["bias"], dtype)


class PromptMapEmbed(swin.PatchEmbed):
  """`swin.PatchEmbed` that also builds the prompt map and stacks it under the image map:
  (B, H, W, 3) -> (2B, H/p, W/p, D), images first. Params: `proj`, `norm`, `deep_ppt`, `proj_ppt`
  (the original keeps the last two in `patch_embed` too)."""
  inter_dim: int = 8

  def setup(self):
    super().setup()
    self.proj_ppt = nn.Dense(self.embed_dim, dtype=self.dtype, **_NEW_DENSE_INIT)

  @nn.compact
  def __call__(self, images):
    x = super().__call__(images)  # (B, h, w, D)
    batch, height, width, channels = x.shape
    deep_ppt = self.param("deep_ppt", nn.initializers.normal(stddev=0.02),
                          (1, height * width, self.inter_dim))
    prompt = self.norm(self.proj_ppt(deep_ppt.astype(self.dtype)))  # (1, h*w, D)
    prompt = jnp.broadcast_to(prompt.reshape(1, height, width, channels), x.shape)
    return jnp.concatenate([x, prompt], axis=0)


class Model(swin.Model):
  """SA2VP on Swin. Returns `(image_logits, {'prompt_logits', 'pre_logits'})`."""
  inter_dim: int = 8
  inter_weight: float = 0.5
  dropout: float = 0.1  # the adapters' attention-output and MLP dropout
  cross_stage: int = 2
  prompt_queries_image_every: int = 6  # block j % 6 == 0: the prompt queries the image
  cross_layer_norm_eps: float = 1e-6
  drop_path_rate: float = 0.2
  head_zeroinit: bool = False

  def __post_init__(self):
    common.require(self, inter_dim=(self.inter_dim >= 1, "an integer >= 1"),
                   dropout=(0.0 <= self.dropout < 1.0, "a rate in [0, 1)"),
                   prompt_queries_image_every=(self.prompt_queries_image_every >= 1,
                                               "an integer >= 1"))
    super().__post_init__()

  def make_patch_embed(self) -> PromptMapEmbed:
    embed_dim = swin.decode_variant(self.variant)["embed_dim"]
    return PromptMapEmbed(embed_dim, self.patch_size, self.dtype, inter_dim=self.inter_dim,
                          name="patch_embed")

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    v = swin.decode_variant(self.variant)
    if not 0 <= self.cross_stage < len(v["depths"]):
      raise ValueError(f"cross_stage={self.cross_stage}: Swin-{self.variant} has stages "
                       f"0..{len(v['depths']) - 1}.")
    adapters = [sa2vp.CrossAdapter(self.inter_dim, self.dropout, self.cross_layer_norm_eps,
                                   self.dtype, **_NEW_DENSE_INIT, name=f"cross_block_{j}")
                for j in range(v["depths"][self.cross_stage])]

    def hook(stage, j, block, maps):  # maps: (2B, h, w, C), the image maps, then the prompt maps
      if stage < self.cross_stage:  # no backward through the image maps before the adapters
        image, prompt = jnp.split(maps, 2)
        return jnp.concatenate([block(jax.lax.stop_gradient(image)), block(prompt)])
      out = block(maps)
      if stage != self.cross_stage:
        return out
      image, prompt = jnp.split(maps, 2)
      prompt_is_query = j % self.prompt_queries_image_every == 0
      query, key_value = (prompt, image) if prompt_is_query else (image, prompt)
      # block.func is the frozen SwinBlock; after the call above its params exist at init too.
      attended = local_cross_attention(
          block.func.variables["params"], query, key_value, num_heads=block.func.num_heads,
          layer_norm_eps=self.cross_layer_norm_eps, dtype=self.dtype)
      fusion = self.inter_weight * adapters[j](query, attended, deterministic=not train)
      image, prompt = jnp.split(out, 2)
      if prompt_is_query:
        return jnp.concatenate([image, prompt + fusion])
      return jnp.concatenate([image + fusion, prompt])

    logits, aux = super().__call__(images, train=train, block_hook=hook)
    logits, prompt_logits = jnp.split(logits, 2)
    return logits, {"prompt_logits": prompt_logits,
                    "pre_logits": jnp.split(aux["pre_logits"], 2)[0]}


def load(init_params, path: str):
  """Loads a Swin checkpoint (Microsoft .pth or transformers) into an SA2VP-Swin param tree."""
  return swin.load(init_params, path, dont_load=(TRAINABLE_PARAMS,))


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS,
                       loaders={"model": method.params_loader(load)}, make_loss=sa2vp.make_loss)
