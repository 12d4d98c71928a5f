"""GLIP's deep vision-language fusion: the bi-directional attention block, the in-head BERT layer.

Follows microsoft/GLIP (Li et al., "Grounded Language-Image Pre-training", CVPR 2022, §3.2
language-aware deep fusion):
  * `maskrcnn_benchmark/utils/fuse_helper.py` `BiMultiHeadAttention` and
    `BiAttentionBlockForCheckpoint`, as `maskrcnn_benchmark/modeling/rpn/vldyhead.py` `VLFuse`
    builds them for FUSE_CONFIG.TYPE "MHA-B" (one joint attention over all pyramid levels,
    SEPARATE_BIDIRECTIONAL off) -> `BiAttentionBlock`;
  * `vldyhead.py` `BertEncoderLayer` with the clamped BERT attention / intermediate / output of
    `maskrcnn_benchmark/modeling/rpn/modeling_bert.py` -> `ClampedBertLayer`.

`BiAttentionBlock` (one VLFuse; params `b_attn/...`):
  1. the five NHWC levels are flattened row-major and concatenated P3..P7 -> X (B, N, Dv);
  2. X^ = LN_v(X), H^ = LN_l(H) (eps 1e-5); every later step sees only X^ and H^;
  3. q = (X^ W_q + b_q) / sqrt(head_dim), k = H^ W_k + b_k, values X^ W_vv + b_vv and
     H^ W_vl + b_vl, all of width embed_dim split into heads;
  4. one score matrix S = q k^T (B, H, N, T), clamped to [-5e4, 5e4] (clamp_min / clamp_max);
  5. text side: S^T minus its row max, clamped again, softmax over the N visual tokens, no mask;
  6. image side: S plus -9e15 on padded text columns and plus the mask value (1) on valid ones
     (the original adds the 0/1 mask after `masked_fill(mask == 0, -9e15)`; a per-row constant
     that the softmax ignores, kept for bit-level faithfulness), softmax over the T tokens;
  7. dropout on both attention maps in training;
  8. out_v = merge(A_v V_l) W_ov + b_ov, out_l = merge(A_l V_v) W_ol + b_ol;
  9. the residual goes onto the *normalised* inputs: X' = X^ + gamma_v * out_v,
     H' = H^ + gamma_l * out_l (layer scale, init 1 / NUM_CONVS); X' is split back into levels.
`extra_tokens=(P_v (B|1, K, Dv), P_l (B|1, K, Dl))` is the operation of SDPT (wuyongjianCODE/SDPT,
`fuse_helper.py`, `vpt_only == -4`), whose prototypes P_v / P_l the caller computes: append K
tokens to X^ and H^ after the LayerNorms, extend the text mask with K padded (0) entries, attend,
and drop the last K rows of both outputs before the residual. The rows that would be dropped are
never computed, and the masked P_l columns (weight exactly 0 after the -9e15) are left out, so the
cost is the K extra keys and values of the text side. K = 0 or None is plain GLIP.
`extra_text_visible=True` leaves the K appended text entries unmasked, so image tokens attend to
P_l too (the SDPT paper's reading, not its code).

`ClampedBertLayer` (one BertEncoderLayer, post-LN): scores = q k^T / sqrt(head_dim), clamped to
+-5e4 (CLAMP_BERTATTN_*), plus (1 - mask) * -10000 (the extended mask of the transformers 4.x GLIP
ran on); softmax; dropout; dense; dropout; LN(. + x). Then the MLP: dense, clamp, GELU (erf),
clamp; dense, dropout, clamp, LN(. + y), clamp; these four clamps are unconditional, as in the
original. Params have bert.Layer's names and shapes, so `bert.convert_hf_bert` converts them.

GLIP-T / GLIP-L sizes: v_dim 256, l_dim 768, embed_dim 2048, 8 heads, init_values 1/6 (T) or 1/8
(L), dropout 0.1; BERT layer 768 wide, 12 heads, MLP 3072, dropout 0.1.

Deliberate deviations:
  * `ClampedBertLayer` is its own module, not `bert.Layer` with an option: the attention-logit clamp
    and the -10000 mask would have to go into `vit.MultiHeadAttention`, shared by every ViT. Padded
    keys get -10000 (not bert.Layer's -1e30); in float32 both give padded keys a weight of exactly
    0 unless a row's logits spread by more than ~10^4. That happens when the clamps bind (a
    padded key clamped to 5e4 then gets 4e4 and can beat valid keys), so -10000 is kept.
  * Every clamp is computed in float32; the clamps exist for fp16 and never bind on sane float32
    inputs, but they are kept (and tested where they bind) so that outputs match the original.
    The text-side row-max subtraction and the +1 on valid image-side columns are softmax
    no-ops in float32; they are kept for fidelity, so no test can tell them apart.
  * Steps 4-8 are one function, `bi_attention`, with a written-out backward (as a fused
    attention kernel would have): its score-sized residuals are the scores and the two attention
    maps (before and after dropout), and it computes the text side in the (N, T) layout, normalising over N,
    instead of transposing S. The values are those of the steps above; the gradient differs
    from autodiff of them only in rounding and at exact clamp boundaries (the clamps pass
    gradient on the closed interval, as PyTorch's clamp does; the text-side row max gets none,
    its exact gradient being zero). Dropout's keep masks are drawn in that layout, so a text-side
    mask is the transpose of the original's (same distribution).
  * STABLE_SOFTMAX_2D (subtracting the global max of S; off in every GLIP config), DropPath (rate
    0 in VLFuse) and the activation checkpointing of USE_CHECKPOINT (no numerical effect; wrap
    with `nn.remat` if memory needs it) are not implemented.
  * In-head BERT layers init like the original: `BertEncoderLayer` never calls BERT's
    `init_weights`, so its Linears have PyTorch's default init (U(+-1/sqrt(fan_in)) for weight and
    bias), reproduced here; the fusion projections are Xavier-uniform with zero bias.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import bert
from jaxprompt.models import common
from jaxprompt.models import vit

CLAMP_VALUE = 50000.0  # GLIP's +-50000 fp16 overflow / underflow clamps
IMAGE_SIDE_MASK_VALUE = -9e15  # added to padded text columns of the image-side scores
BERT_MASK_VALUE = -10000.0  # transformers 4.x extended attention mask for padded keys


def clamp(x, clamp_min: bool = True, clamp_max: bool = True):
  """x clamped to [-5e4, 5e4] on the sides that are switched on."""
  if clamp_min:
    x = jnp.maximum(x, -CLAMP_VALUE)
  if clamp_max:
    x = jnp.minimum(x, CLAMP_VALUE)
  return x


# ---------------------------------------------------------------------------------------------
# Bi-directional attention (VLFuse "MHA-B").
# ---------------------------------------------------------------------------------------------

def _clamp_pass(x, clamp_min: bool, clamp_max: bool):
  """1 where `clamp` passes x's gradient (PyTorch's clamp: inside the closed interval), else 0."""
  inside = jnp.ones(x.shape, bool)
  if clamp_min:
    inside = inside & (x >= -CLAMP_VALUE)
  if clamp_max:
    inside = inside & (x <= CLAMP_VALUE)
  return inside


def _bi_attention_forward(query, key, value_v, value_l, image_bias, keep_v, keep_l, num_visual,
                          num_text, clamp_min, clamp_max):
  """Steps 4-8 of the module docstring on split heads; returns the outputs and the residuals."""
  dtype = query.dtype
  scores = jnp.einsum("bhnd,bhtd->bhnt", query, key).astype(jnp.float32)  # (B, H, N(+K), T(+K'))
  clamped = clamp(scores, clamp_min, clamp_max)
  # Text side, kept in the (N, T) layout and normalised over N (axis 2) instead of transposing.
  # The max is a per-column constant: it changes no softmax and passes no gradient (the softmax
  # gradient sums to zero over the column), so it is taken out of the gradient.
  scores_l = clamped[..., :num_text] if clamped.shape[3] != num_text else clamped
  text_max = jax.lax.stop_gradient(scores_l.max(2, keepdims=True))  # (B, H, 1, T)
  scores_l = scores_l - text_max
  # After the max is subtracted the column max is exactly 0, so softmax's own max is 0 too.
  exp_l = jnp.exp(clamp(scores_l, clamp_min, clamp_max))
  weights_l = exp_l / exp_l.sum(2, keepdims=True)
  scores_v = clamped[:, :, :num_visual] if clamped.shape[2] != num_visual else clamped
  weights_v = jax.nn.softmax(scores_v + image_bias, axis=-1)
  dropped_v = weights_v if keep_v is None else weights_v * keep_v
  dropped_l = weights_l if keep_l is None else weights_l * keep_l
  out_v = jnp.einsum("bhnt,bhtd->bhnd", dropped_v.astype(dtype), value_l)
  out_l = jnp.einsum("bhnt,bhnd->bhtd", dropped_l.astype(dtype), value_v)
  residuals = (query, key, value_v, value_l, scores, text_max, weights_v, dropped_v, weights_l,
               dropped_l)
  return (out_v, out_l), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def bi_attention(query, key, value_v, value_l, image_bias, keep_v, keep_l, num_visual: int,
                 num_text: int, clamp_min: bool, clamp_max: bool):
  """The shared-score bi-directional attention on split heads (steps 4-8 of the docstring).

  query (B, H, N', d) (already scaled by d^-0.5; N' = N visual tokens, then any extra ones),
  key / value_l (B, H, T', d) (T' = T text tokens, then any extra ones), value_v (B, H, N', d),
  image_bias (B, 1, 1, T') added to the image-side scores, keep_v (B, H, N, T') / keep_l
  (B, H, N', T) dropout's scaled keep masks or None. Returns (out_v (B, H, N, d), out_l
  (B, H, T, d)): image rows attend over all T' columns, text columns over all N' rows.

  The backward is written out (its score-sized residuals are the scores and the attention maps
  before and after dropout): autodiff of the clamps, the max subtraction and two softmaxes keeps
  and re-reads about a dozen score-sized arrays, a large share of a fusion layer's CPU time. The
  clamps pass gradient inside the closed interval, as PyTorch's clamp does. image_bias and the
  keep masks get no gradient.
  """
  return _bi_attention_forward(query, key, value_v, value_l, image_bias, keep_v, keep_l,
                               num_visual, num_text, clamp_min, clamp_max)[0]


def _bi_attention_fwd(query, key, value_v, value_l, image_bias, keep_v, keep_l, num_visual,
                      num_text, clamp_min, clamp_max):
  return _bi_attention_forward(query, key, value_v, value_l, image_bias, keep_v, keep_l,
                               num_visual, num_text, clamp_min, clamp_max)


def _bi_attention_bwd(num_visual, num_text, clamp_min, clamp_max, residuals, grads):
  (query, key, value_v, value_l, scores, text_max, weights_v, dropped_v, weights_l,
   dropped_l) = residuals
  grad_out_v, grad_out_l = grads
  dtype, f32 = query.dtype, jnp.float32
  num_rows, num_cols = scores.shape[2:]
  # Image side: d softmax = P (dP - sum_t P dP), with dP already through the dropout mask.
  grad_dropped_v = jnp.einsum("bhnd,bhtd->bhnt", grad_out_v, value_l).astype(f32)
  grad_v = dropped_v * grad_dropped_v
  grad_v = grad_v - weights_v * grad_v.sum(-1, keepdims=True)
  # Text side (normalised over axis 2); the inner clamp passes gradient where s - max >= -5e4.
  grad_dropped_l = jnp.einsum("bhtd,bhnd->bhnt", grad_out_l, value_v).astype(f32)
  grad_l = dropped_l * grad_dropped_l
  grad_l = grad_l - weights_l * grad_l.sum(2, keepdims=True)
  if clamp_min:
    scores_l = clamp(scores[..., :num_text] if num_cols != num_text else scores, clamp_min,
                     clamp_max)
    grad_l = jnp.where(scores_l - text_max >= -CLAMP_VALUE, grad_l, 0.0)
  if num_rows != num_visual:
    grad_v = jnp.pad(grad_v, ((0, 0), (0, 0), (0, num_rows - num_visual), (0, 0)))
  if num_cols != num_text:
    grad_l = jnp.pad(grad_l, ((0, 0), (0, 0), (0, 0), (0, num_cols - num_text)))
  grad_scores = jnp.where(_clamp_pass(scores, clamp_min, clamp_max), grad_v + grad_l, 0.0)
  grad_scores = grad_scores.astype(dtype)
  grad_query = jnp.einsum("bhnt,bhtd->bhnd", grad_scores, key)
  grad_key = jnp.einsum("bhnt,bhnd->bhtd", grad_scores, query)
  grad_value_l = jnp.einsum("bhnt,bhnd->bhtd", dropped_v.astype(dtype), grad_out_v)
  grad_value_v = jnp.einsum("bhnt,bhtd->bhnd", dropped_l.astype(dtype), grad_out_l)
  return grad_query, grad_key, grad_value_v, grad_value_l, None, None, None


bi_attention.defvjp(_bi_attention_fwd, _bi_attention_bwd)


class BiMultiHeadAttention(nn.Module):
  """The shared-score bi-directional attention on the normalised sequences (no residual).

  `__call__(v (B, N, Dv), l (B, T, Dl), lang_mask (B, T), *, deterministic)` returns
  (delta_v (B, N, Dv), delta_l (B, T, Dl)). `lang_mask` nonzero = valid text token.
  """
  embed_dim: int
  num_heads: int
  dropout: float = 0.1
  clamp_min: bool = True
  clamp_max: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, v, l, lang_mask, *, deterministic: bool = True, extra_v=None,
               extra_l=None):
    """`extra_v` (B, K, Dv): visual tokens the text side attends to beside `v` (SDPT's P_v);
    `extra_l` (B, K', Dl): text tokens the image side attends to beside `l`, unmasked (the paper's
    reading of SDPT). Their own output rows would be dropped, so they are never computed; and
    masked extra text columns (the code's reading) get exactly zero weight, so they are left out
    rather than masked."""
    batch, num_visual, v_dim = v.shape
    num_text, l_dim = l.shape[1:]
    heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros, name=name)

    def split_heads(y):  # (B, L, E) -> (B, H, L, E/H)
      return y.reshape(batch, y.shape[1], heads, head_dim).transpose(0, 2, 1, 3)

    def merge_heads(y):  # (B, H, L, E/H) -> (B, L, E)
      return y.transpose(0, 2, 1, 3).reshape(batch, y.shape[2], self.embed_dim)

    mask = jnp.asarray(lang_mask).astype(jnp.float32)
    if extra_v is not None:
      v = jnp.concatenate([v, extra_v.astype(v.dtype)], 1)
    if extra_l is not None:
      l = jnp.concatenate([l, extra_l.astype(l.dtype)], 1)
      mask = jnp.concatenate([mask, jnp.ones(extra_l.shape[:2], mask.dtype)], 1)
    query = split_heads(dense(self.embed_dim, "v_proj")(v) * head_dim**-0.5)
    key = split_heads(dense(self.embed_dim, "l_proj")(l))
    value_v = split_heads(dense(self.embed_dim, "values_v_proj")(v))
    value_l = split_heads(dense(self.embed_dim, "values_l_proj")(l))

    # Image side: padded text columns get -9e15, valid ones the mask value (1).
    image_bias = jnp.where(mask == 0, IMAGE_SIDE_MASK_VALUE, mask)[:, None, None, :]
    keep_v = keep_l = None  # dropout's scaled keep masks, (B, H, N, T(+K')) / (B, H, N(+K), T)
    if not deterministic and self.dropout > 0:
      ones = lambda rows, cols: jnp.ones((batch, heads, rows, cols), jnp.float32)
      keep_v = vit.Dropout(self.dropout)(ones(num_visual, key.shape[2]), deterministic=False)
      keep_l = vit.Dropout(self.dropout)(ones(query.shape[2], num_text), deterministic=False)
    out_v, out_l = bi_attention(query, key, value_v, value_l, image_bias, keep_v, keep_l,
                                num_visual, num_text, self.clamp_min, self.clamp_max)
    out_v, out_l = merge_heads(out_v), merge_heads(out_l)  # (B, N, E), (B, T, E)
    return dense(v_dim, "out_v_proj")(out_v), dense(l_dim, "out_l_proj")(out_l)


class LayerScaledBiAttention(nn.Module):
  """Pre-LN bi-attention with layer-scaled residuals on the normalised inputs, on flat sequences
  (`BiAttentionBlockForCheckpoint.single_attention_call`); `BiAttentionBlock` names it 'b_attn'.

  `__call__(visual (B, N, Dv), lang (B, T, Dl), lang_mask (B, T), *, deterministic,
  extra_tokens=None)` returns (visual' (B, N, Dv), lang' (B, T, Dl)).
  """
  embed_dim: int
  num_heads: int
  init_values: float
  dropout: float = 0.1
  clamp_min: bool = True
  clamp_max: bool = True
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visual, lang, lang_mask, *, deterministic: bool = True,
               extra_tokens: Optional[tuple] = None, extra_text_visible: bool = False):
    batch, _, v_dim = visual.shape
    l_dim = lang.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    v = norm("layer_norm_v")(visual)
    l = norm("layer_norm_l")(lang)
    extra_v = extra_l = None
    if extra_tokens is not None:
      extra_v, extra_l = (jnp.asarray(t) for t in extra_tokens)
      count = extra_v.shape[1] if extra_v.ndim == 3 else -1
      for what, extra, dim in (("P_v", extra_v, v_dim), ("P_l", extra_l, l_dim)):
        if extra.ndim != 3 or extra.shape[0] not in (1, batch) or extra.shape[1:] != (count, dim):
          raise ValueError(f"extra_tokens {what} has shape {extra.shape}; expected ({batch} or 1, "
                           f"K, {dim}) with the same K for P_v and P_l (P_v has K={count}).")
      if count == 0:
        extra_v = extra_l = None
      else:
        extra_v = jnp.broadcast_to(extra_v, (batch, count, v_dim))
        # Masked (the code's reading), P_l only feeds columns of weight 0 and dropped rows.
        extra_l = jnp.broadcast_to(extra_l, (batch, count, l_dim)) if extra_text_visible \
            else None
    delta_v, delta_l = BiMultiHeadAttention(
        self.embed_dim, self.num_heads, self.dropout, self.clamp_min, self.clamp_max, self.dtype,
        name="attn")(v, l, lang_mask, deterministic=deterministic, extra_v=extra_v,
                     extra_l=extra_l)
    gamma = lambda name, dim: self.param(name, nn.initializers.constant(self.init_values), (dim,))
    return v + gamma("gamma_v", v_dim) * delta_v, l + gamma("gamma_l", l_dim) * delta_l


def flatten_levels(levels: Sequence) -> tuple[jnp.ndarray, list[tuple[int, int]]]:
  """NHWC maps -> ((B, sum H*W, C) in level order, each row-major; the (H, W) of each level)."""
  sizes = [(level.shape[1], level.shape[2]) for level in levels]
  flat = [level.reshape(level.shape[0], h * w, level.shape[3]) for level, (h, w) in
          zip(levels, sizes)]
  return jnp.concatenate(flat, 1), sizes


def unflatten_levels(tokens, sizes: Sequence[tuple[int, int]]) -> list:
  """The inverse of `flatten_levels`: (B, N, C) -> NHWC maps of the given (H, W)."""
  out, start = [], 0
  for h, w in sizes:
    out.append(tokens[:, start:start + h * w].reshape(tokens.shape[0], h, w, tokens.shape[-1]))
    start += h * w
  return out


class BiAttentionBlock(nn.Module):
  """GLIP's VLFuse ("MHA-B"): bi-directional image-text attention over all pyramid levels.

  `__call__(visual_levels (list of NHWC (B, H_l, W_l, v_dim)), lang_hidden (B, T, l_dim),
  lang_mask (B, T), *, deterministic=True, extra_tokens=None)` returns (new_levels (same shapes),
  new_lang_hidden (B, T, l_dim)). Dropout on the attention maps is live unless `deterministic`
  (RNG 'dropout'). `init_values` is the layer-scale init: GLIP passes 1 / DYHEAD.NUM_CONVS.
  """
  v_dim: int
  l_dim: int
  embed_dim: int
  num_heads: int
  init_values: float
  dropout: float = 0.1
  clamp_min: bool = True
  clamp_max: bool = True
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visual_levels, lang_hidden, lang_mask, *, deterministic: bool = True,
               extra_tokens: Optional[tuple] = None, extra_text_visible: bool = False):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"BiAttentionBlock: embed_dim={self.embed_dim} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if not visual_levels:
      raise ValueError("BiAttentionBlock: visual_levels is empty; expected the pyramid maps.")
    batch = lang_hidden.shape[0]
    for i, level in enumerate(visual_levels):
      if level.ndim != 4 or level.shape[0] != batch or level.shape[3] != self.v_dim:
        raise ValueError(f"BiAttentionBlock: visual level {i} has shape {level.shape}; expected "
                         f"NHWC ({batch}, H, W, {self.v_dim}).")
    if lang_hidden.ndim != 3 or lang_hidden.shape[2] != self.l_dim:
      raise ValueError(f"BiAttentionBlock: lang_hidden has shape {lang_hidden.shape}; expected "
                       f"(B, T, {self.l_dim}).")
    if jnp.shape(lang_mask) != lang_hidden.shape[:2]:
      raise ValueError(f"BiAttentionBlock: lang_mask has shape {jnp.shape(lang_mask)}; expected "
                       f"{lang_hidden.shape[:2]} like lang_hidden's first two dimensions.")
    visual, sizes = flatten_levels(visual_levels)
    visual, lang = LayerScaledBiAttention(
        self.embed_dim, self.num_heads, self.init_values, self.dropout, self.clamp_min,
        self.clamp_max, self.layer_norm_eps, self.dtype, name="b_attn")(
            visual, lang_hidden, lang_mask, deterministic=deterministic, extra_tokens=extra_tokens,
            extra_text_visible=extra_text_visible)
    return unflatten_levels(visual, sizes), lang


# ---------------------------------------------------------------------------------------------
# In-head BERT layer (BertEncoderLayer with clamps).
# ---------------------------------------------------------------------------------------------

class _ClampedSelfAttention(nn.Module):
  """BERT self-attention with +-5e4 logit clamps and the -10000 padding bias; bert.Layer's
  `attention/{query,key,value,out}` params ((D, H, D/H) kernels, (H, D/H, D) output kernel)."""
  num_heads: int
  attention_dropout: float
  clamp_min: bool
  clamp_max: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, lang_mask, *, deterministic: bool):
    width = x.shape[-1]
    heads, head_dim = self.num_heads, width // self.num_heads
    kernel_init, bias_init = common.torch_linear_kernel_init(), common.torch_linear_bias_init(width)
    project = lambda name: nn.DenseGeneral((heads, head_dim), dtype=self.dtype,
                                           kernel_init=kernel_init, bias_init=bias_init, name=name)
    # (B, L, H, D/H) -> (B, H, L, D/H)
    query, key, value = (project(n)(x).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
    scores = (query @ key.swapaxes(-1, -2)).astype(jnp.float32) / math.sqrt(head_dim)
    scores = clamp(scores, self.clamp_min, self.clamp_max)
    mask = jnp.asarray(lang_mask).astype(jnp.float32)[:, None, None, :]  # (B, 1, 1, L)
    weights = jax.nn.softmax(scores + (1.0 - mask) * BERT_MASK_VALUE, axis=-1)
    weights = vit.Dropout(self.attention_dropout)(weights, deterministic=deterministic)
    context = (weights.astype(self.dtype) @ value).transpose(0, 2, 1, 3)  # (B, L, H, D/H)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=kernel_init,
                           bias_init=bias_init, name="out")(context)


class ClampedBertLayer(nn.Module):
  """GLIP's in-head BertEncoderLayer: a post-LN BERT layer with fp16 clamps.

  `__call__(hidden (B, T, D), lang_mask (B, T), *, deterministic=True)` -> hidden (B, T, D).
  Dropout (hidden and attention) is live unless `deterministic` (RNG 'dropout').
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  clamp_attention_min: bool = True  # CLAMP_BERTATTN_MIN_FOR_UNDERFLOW
  clamp_attention_max: bool = True  # CLAMP_BERTATTN_MAX_FOR_OVERFLOW
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, lang_mask, *, deterministic: bool = True):
    width = hidden.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"ClampedBertLayer: width {width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if jnp.shape(lang_mask) != hidden.shape[:2]:
      raise ValueError(f"ClampedBertLayer: lang_mask has shape {jnp.shape(lang_mask)}; expected "
                       f"{hidden.shape[:2]}.")
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    dense = lambda n, fan_in, name: nn.Dense(
        n, dtype=self.dtype, kernel_init=common.torch_linear_kernel_init(),
        bias_init=common.torch_linear_bias_init(fan_in), name=name)
    drop = lambda y: vit.Dropout(self.dropout)(y, deterministic=deterministic)
    y = _ClampedSelfAttention(self.num_heads, self.attention_dropout, self.clamp_attention_min,
                              self.clamp_attention_max, self.dtype, name="attention")(
                                  hidden, lang_mask, deterministic=deterministic)
    x = norm("attention_norm")(hidden + drop(y))
    y = clamp(dense(self.mlp_dim, width, "intermediate")(x))
    y = clamp(nn.gelu(y, approximate=False))
    y = clamp(drop(dense(width, self.mlp_dim, "output")(y)))
    return clamp(norm("output_norm")(x + y))


# ---------------------------------------------------------------------------------------------
# Official state dicts (prefix `module.rpn.head.dyhead_tower.{k}.` stripped) -> our params.
# ---------------------------------------------------------------------------------------------

def convert_torch_params(state_dict: Mapping[str, np.ndarray], names: Mapping[str, str], *,
                         part: str) -> dict:
  """Renames official PyTorch names to our '/'-joined names (`names`) and returns nested params.

  A 2-D weight mapped to '.../kernel' is an nn.Linear's (out, in) -> (in, out); a 4-D one an
  nn.Conv2d's (out, in, kh, kw) -> (kh, kw, in, out); everything else is copied. Names not in
  `names` and names of `names` missing from `state_dict` raise one ValueError listing both.
  """
  unknown = sorted(set(state_dict) - set(names))
  missing = sorted(set(names) - set(state_dict))
  if unknown or missing:
    lines = [f"{part}: the state dict does not match (expected names with the tower/head prefix "
             "stripped):"]
    if unknown:
      lines.append(f"  unknown ({len(unknown)}): " + ", ".join(unknown))
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    raise ValueError("\n".join(lines))
  flat = {}
  for torch_name, ours in names.items():
    value = np.asarray(state_dict[torch_name])
    if ours.endswith("/kernel") and value.ndim == 2:
      value = value.T
    elif ours.endswith("/kernel") and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    flat[ours] = value
  return common.unflatten(flat)


_FUSION_PROJECTIONS = ("v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj",
                       "out_l_proj")
FUSION_NAMES = {
    "b_attn.layer_norm_v.weight": "b_attn/layer_norm_v/scale",
    "b_attn.layer_norm_v.bias": "b_attn/layer_norm_v/bias",
    "b_attn.layer_norm_l.weight": "b_attn/layer_norm_l/scale",
    "b_attn.layer_norm_l.bias": "b_attn/layer_norm_l/bias",
    "b_attn.gamma_v": "b_attn/gamma_v",
    "b_attn.gamma_l": "b_attn/gamma_l",
    **{f"b_attn.attn.{p}.{w}": f"b_attn/attn/{p}/{'kernel' if w == 'weight' else 'bias'}"
       for p in _FUSION_PROJECTIONS for w in ("weight", "bias")},
}


def convert_fusion(state_dict: Mapping[str, np.ndarray]) -> dict:
  """One official VLFuse ('b_attn.layer_norm_v.weight', 'b_attn.attn.v_proj.weight', ...,
  'b_attn.gamma_l'; prefix 'module.rpn.head.dyhead_tower.{k}.' stripped) -> `BiAttentionBlock`
  params."""
  return convert_torch_params(state_dict, FUSION_NAMES, part="convert_fusion")


# Official BertEncoderLayer modules, the same as a transformers BERT layer's.
BERT_LAYER_NAMES = tuple(f"{module}.{leaf}" for module in bert._HF_LAYER_MODULES
                         for leaf in ("weight", "bias"))


def convert_bert_layer(state_dict: Mapping[str, np.ndarray], *, num_heads: int) -> dict:
  """One official in-head BertEncoderLayer ('attention.self.query.weight', ...,
  'output.LayerNorm.bias'; prefix 'module.rpn.head.dyhead_tower.{k}.' stripped) ->
  `ClampedBertLayer` params, through `bert.convert_hf_bert` (same names and head split)."""
  unknown = sorted(set(state_dict) - set(BERT_LAYER_NAMES))
  missing = sorted(set(BERT_LAYER_NAMES) - set(state_dict))
  if unknown or missing:
    raise ValueError("convert_bert_layer: the state dict does not match (expected names with the "
                     f"tower prefix stripped): unknown {unknown}, missing {missing}.")
  prefix = "encoder.layer.0."
  flat = bert.convert_hf_bert({prefix + k: v for k, v in state_dict.items()}, num_heads,
                              source="convert_bert_layer")
  return common.unflatten({name.removeprefix("encoder/layer_0/"): value
                           for name, value in flat.items()})
