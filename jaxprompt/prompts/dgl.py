"""DGL (Yang et al., AAAI 2024, "DGL: Dynamic Global-Local Prompt Tuning for Text-Video
Retrieval", arXiv 2401.10588): local text and frame prompts generated from one shared latent space,
and global video prompts with a global-local attention over all frames, on a frozen CLIP.

Follows knightyxp/DGL `modules/clip.py` (`CLIP.encode_prompt`, `CLIP.encode_text`,
`VisualTransformer.incorporate_prompt` / `forward_deep_prompt`, `ResidualAttentionBlock` with
`visual=True`, `PromptTransformer`) and `modules/clip4clip.py` (similarity and loss), and the
paper's method section:

  * Shared latent space, `latent_space='transformer'` (DGL-Transformer): a table of
    U = P_t + N_l·T rows and Lp·D_v columns, N(0, 1) (`unified_prompt_embedding`); each row split
    layer-major into Lp chunks of D_v, so layer l has U tokens; ONE pre-LN block of width D_v
    (`PromptTransformer`: heads D_v // 64, at least 1; QuickGELU MLP 4x; no mask) runs on each
    layer's U tokens (layers are the batch); tokens [0, P_t) -> text MLP D_v -> 2 D_v -> QuickGELU
    -> D_t (`unified_prompt_mlp`), tokens P_t + N_l·t + j -> slot j of frame t (frame-major).
    `latent_space='linear'` (DGL-Linear): a table (N_l, Lp·D_v), U(±sqrt(6 / (3 p² + D_v)))
    (`visual_prompt_embedding`), split layer-major; every frame gets the same N_l prompts of a
    layer, and the text prompts are prefix_j = Linear(V[l, j]), postfix_j = Linear'(V[l, j])
    (`prefix_/postfix_text_prompt_proj_layer`), so P_t = 2 N_l. New Linear and attention layers
    have PyTorch's default inits (Linear: kaiming-uniform a=sqrt(5) weights, U(±1/sqrt(fan_in))
    biases; attention: xavier-uniform over the packed (3 D, D) in-projection, zero biases).
  * Global prompts G (N_g, D_v), U(±sqrt(6 / (3 p² + D_v))) (`visual.prompt_embeddings`).
  * Prompts do not depend on the input: computed once per call and shared by the batch.
  * Text (`encode_text`): [SOT, prefix_0..P_t/2-1, w_1..w_{L-1}, postfix...] of L + P_t tokens;
    positional embeddings 0..L-1 are added to the words only; before every block l >= 1 the prompt
    slots are overwritten with layer l's prompts; CLIP's causal mask over the L + P_t positions;
    the feature is read at (EOT index + P_t/2). The postfix prompts sit after every possible EOT,
    so under the causal mask they never reach the output and their generator gets exactly zero
    gradient (reproduced, not fixed).
  * Video (`encode_video`): each frame is patchified, gets its class token and positional
    embeddings and ln_pre; its layer-0 frame prompts go right after its class token (L_f =
    1 + N_l + grid² tokens per frame); the N_g global prompts are prepended once. Every frozen
    block is ONE self-attention over the S = N_g + T·L_f tokens with the mask M[i, j] = global(i)
    or global(j) or frame(i) == frame(j) (`global_local_attention`); before blocks 1..Lp-1 the
    frame prompt slots are overwritten with that layer's prompts. The video feature is the first
    global token after ln_post and proj.
  * similarity = exp(logit_scale) · t_i · v_j of the L2-normalised features, text rows x video
    columns (`_loose_similarity`; the scale is frozen, so CLIP4Clip's clamp of a trained scale does
    not apply), and the symmetric InfoNCE loss (`clip4clip.make_loss`); CLIP, logit scale
    included, is frozen.

Token order: the original orders a video's frame tokens token-major (position N_g + l·T + t holds
token l of frame t); here they are frame-major (N_g + t·L_f + l). Every operation on the sequence
is per token (LayerNorm, MLP, projections) or an attention whose mask depends only on which frame
a token belongs to, and the output is the global token 0, so the two orders give the same result:
a permutation of the frame tokens that the mask follows (the test checks this against a reference
in the original's order). Frame-major makes each frame one contiguous block, so the frame rows of
the attention are a batched (B·T) attention over [globals; own frame] whose global keys and values
are broadcast, never copied per frame (the original builds a (N_g + L_f, B·T, D) key tensor), and
no dense S x S score matrix exists.

Deliberate deviations:
  * fp32 (the original casts CLIP and the new Linear/attention weights to fp16, rounding their
    random init, and trains with AMP); `dtype` may be bfloat16, parameters stay fp32.
  * The global prompts' width and init bound use D_v (the original hard-codes 768, which is D_v
    for ViT-B, the only towers it supports).
  * Prompts are computed on every call (the original's `forward` computes them only when text and
    video are both given, so a text-only call, as in its VATEX multi-sentence evaluation, fails).
  * Lp is the depth of the towers, which must be equal (the original's `unified_transformer_layers`
    works only at that value: below it, its loops index past the prompt list; above it, the extra
    layers' prompts are never used).
  * N_l and N_g are independent here (the original's slicing needs N_l = N_g; the default 4 = 4).
  * Only the default video output (`visual_output_type='global_prompt0'`) is built; the ablation
    outputs (mean of the globals, of the frame class tokens, ...) are not.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt import method
from jaxprompt.models import clip, common
from jaxprompt.prompts import clip4clip, coop, vpt

# Parameters that train: the shared latent space and the global prompts; CLIP stays frozen.
TRAINABLE_PARAMS = r"shared_latent_space/.*|global_prompts"
LATENT_SPACES = ("transformer", "linear")
HEAD_WIDTH = 64  # the prompt transformer's heads: width // 64, as CLIP's


def global_local_attention(query, key, value, *, num_global: int, num_frames: int, dtype=None):
  """DGL's global-local attention as a `nn.MultiHeadDotProductAttention` attention function.

  query, key, value: (B, S, H, D_h) for the sequence [N_g globals; T frames of L_f tokens each],
  frame-major. Global rows attend to all S tokens; the rows of frame t to [globals; frame t]:
  the masked self-attention with M[i, j] = global(i) or global(j) or frame(i) == frame(j),
  computed without the S x S matrix and without per-frame copies of the globals' keys/values.
  Returns (B, S, H, D_h). Memory per video and layer in float32 at ViT-B/32 (12 heads) and
  T = 64 (S = 4 + 64 · 54 = 3,460): the scores of the frame rows (T, H, 54, 58) 9.2 MiB and of
  the global rows (H, 4, S) 0.6 MiB, beside q, k, v 30.4 MiB; a dense S x S mask would need
  548 MiB of scores (XLA's temporaries for one frozen block, forward: 81 MiB here, 1,096 MiB
  dense; forward and backward to the block input: 312 MiB, 2,262 MiB; `benchmarks/dgl.py`).
  """
  del dtype  # computed in the inputs' dtype, as `nn.dot_product_attention`
  batch, length, heads, depth = query.shape
  frame_length, remainder = divmod(length - num_global, num_frames)
  if remainder or frame_length < 1:
    raise ValueError(f"global_local_attention: {length} tokens are not {num_global} globals and "
                     f"{num_frames} frames of equal length.")
  query = query / jnp.sqrt(depth).astype(query.dtype)

  def split(x):  # -> globals (B, N_g, H, D_h), frames (B, T, L_f, H, D_h)
    return x[:, :num_global], x[:, num_global:].reshape(batch, num_frames, frame_length, heads,
                                                        depth)

  (query_global, query_frames), (key_global, key_frames), (value_global, value_frames) = (
      split(query), split(key), split(value))
  global_weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", query_global, key))
  global_out = jnp.einsum("bhqk,bkhd->bqhd", global_weights, value)  # (B, N_g, H, D_h)
  scores = jnp.concatenate([jnp.einsum("btqhd,bkhd->bthqk", query_frames, key_global),
                            jnp.einsum("btqhd,btkhd->bthqk", query_frames, key_frames)], axis=-1)
  weights = jax.nn.softmax(scores)  # (B, T, H, L_f, N_g + L_f)
  frame_out = (jnp.einsum("bthqk,bkhd->btqhd", weights[..., :num_global], value_global)
               + jnp.einsum("bthqk,btkhd->btqhd", weights[..., num_global:], value_frames))
  return jnp.concatenate(
      [global_out, frame_out.reshape(batch, num_frames * frame_length, heads, depth)], axis=1)


class TorchMlp(nn.Module):
  """c_fc -> QuickGELU -> c_proj with PyTorch's default Linear init (the prompt transformer's
  MLP, width -> 4 width -> width, and DGL-Transformer's text MLP, D_v -> 2 D_v -> D_t)."""
  hidden_features: int
  out_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _torch_dense(self.hidden_features, x.shape[-1], self.dtype, "c_fc")(x)
    return _torch_dense(self.out_features, self.hidden_features, self.dtype, "c_proj")(
        clip.quick_gelu(x))


def _torch_dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=common.torch_linear_kernel_init(),
                  bias_init=common.torch_linear_bias_init(fan_in), name=name)


class PromptTransformerBlock(nn.Module):
  """The original's `PromptTransformer` (one `PromptResidualAttentionBlock`): pre-LN, unmasked
  multi-head self-attention, QuickGELU MLP 4x; PyTorch's inits (`nn.MultiheadAttention`:
  xavier-uniform packed in-projection, zero biases, default-Linear out-projection)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # (batch, tokens, width)
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=clip.LAYER_NORM_EPS, dtype=self.dtype, name="ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, deterministic=True,
        kernel_init=vpt.uniform_init(math.sqrt(6.0 / (width + 3 * width))),
        out_kernel_init=common.torch_linear_kernel_init(), bias_init=nn.initializers.zeros,
        name="attn")(y, y)
    y = nn.LayerNorm(epsilon=clip.LAYER_NORM_EPS, dtype=self.dtype, name="ln_2")(x)
    return x + TorchMlp(4 * width, width, self.dtype, name="mlp")(y)


class TransformerLatentSpace(nn.Module):
  """DGL-Transformer: `table` (P_t + N_l·T, Lp·D_v) -> `prompt_transformer` per layer ->
  (text prompts (Lp, P_t, D_t) through `text_mlp`, frame prompts (Lp, T, N_l, D_v))."""
  num_layers: int
  width: int
  text_width: int
  num_frames: int
  num_local_prompts: int
  num_text_prompts: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    rows = self.num_text_prompts + self.num_local_prompts * self.num_frames
    table = self.param("table", nn.initializers.normal(1.0),
                       (rows, self.num_layers * self.width))
    tokens = table.reshape(rows, self.num_layers, self.width).transpose(1, 0, 2)  # (Lp, U, D_v)
    tokens = PromptTransformerBlock(max(1, self.width // HEAD_WIDTH), self.dtype,
                                    name="prompt_transformer")(tokens.astype(self.dtype))
    text = TorchMlp(2 * self.width, self.text_width, self.dtype,
                    name="text_mlp")(tokens[:, :self.num_text_prompts])
    frames = tokens[:, self.num_text_prompts:].reshape(
        self.num_layers, self.num_frames, self.num_local_prompts, self.width)  # frame-major
    return text, frames


class LinearLatentSpace(nn.Module):
  """DGL-Linear: `table` (N_l, Lp·D_v) -> frame prompts (Lp, T, N_l, D_v), the same for every
  frame, and text prompts (Lp, 2 N_l, D_t) = [prefix_proj(V_l); postfix_proj(V_l)]."""
  num_layers: int
  width: int
  text_width: int
  num_frames: int
  num_local_prompts: int
  init_bound: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    table = self.param("table", vpt.uniform_init(self.init_bound),
                       (self.num_local_prompts, self.num_layers * self.width))
    tokens = table.reshape(self.num_local_prompts, self.num_layers, self.width).transpose(1, 0, 2)
    tokens = tokens.astype(self.dtype)  # (Lp, N_l, D_v)
    text = jnp.concatenate([
        _torch_dense(self.text_width, self.width, self.dtype, name)(tokens)
        for name in ("prefix_proj", "postfix_proj")], axis=1)
    frames = jnp.broadcast_to(tokens[:, None],
                              (self.num_layers, self.num_frames) + tokens.shape[1:])
    return text, frames


class Model(nn.Module):
  """DGL on a frozen CLIP ViT (`variant`). `__call__(video (B, T, S, S, 3), caption_tokens (B, L),
  *, train)` -> `(similarity (B, B), aux)`, text rows x video columns, with aux 'text_features'
  and 'video_features' (normalised). `num_classes` is ignored (the trainer passes it).
  Params: `clip/...` (frozen), `shared_latent_space/...`, `global_prompts` (N_g, D_v)."""
  num_classes: int = 0
  variant: str = "ViT-B/32"
  vocab_path: str = ""
  num_frames: int = 12
  num_global_prompts: int = 4
  num_local_prompts: int = 4
  num_text_prompts: int = 8
  latent_space: str = "transformer"
  dtype: Any = jnp.float32

  def __post_init__(self):
    common.require(
        self, latent_space=(self.latent_space in LATENT_SPACES, f"one of {LATENT_SPACES}"),
        num_frames=(self.num_frames >= 1, "an integer >= 1"),
        num_global_prompts=(self.num_global_prompts >= 1,
                            "an integer >= 1 (the video feature is the first global prompt)"),
        num_local_prompts=(self.num_local_prompts >= 1, "an integer >= 1"),
        num_text_prompts=(self.num_text_prompts >= 1, "an integer >= 1"))
    if self.latent_space == "linear":
      common.require(self, num_text_prompts=(
          self.num_text_prompts == 2 * self.num_local_prompts,
          f"2 x num_local_prompts = {2 * self.num_local_prompts} with latent_space='linear' "
          "(a prefix and a postfix prompt from each local prompt)"))
    super().__post_init__()

  def setup(self):
    self.clip = clip.Model(**coop.clip_config(self.variant, self.dtype))
    if self.clip.is_resnet or self.clip.text_layers != self.clip.vision_layers:
      raise ValueError(f"DGL needs a ViT CLIP whose two towers have the same depth (one prompt "
                       f"layer each); config.model.variant={self.variant!r} does not.")
    width, layers = self.clip.vision_width, self.clip.vision_layers
    init_bound = vpt.prompt_init_bound(self.clip.vision_patch_size, width)
    shared = dict(num_layers=layers, width=width, text_width=self.clip.text_width,
                  num_frames=self.num_frames, num_local_prompts=self.num_local_prompts,
                  dtype=self.dtype)
    if self.latent_space == "transformer":
      self.shared_latent_space = TransformerLatentSpace(
          **shared, num_text_prompts=self.num_text_prompts)
    else:
      self.shared_latent_space = LinearLatentSpace(**shared, init_bound=init_bound)
    self.global_prompts = self.param("global_prompts", vpt.uniform_init(init_bound),
                                     (self.num_global_prompts, width))

  def prompts(self):
    """(text prompts (Lp, P_t, D_t), frame prompts (Lp, T, N_l, D_v), global prompts (N_g, D_v)),
    the same for every input."""
    text, frames = self.shared_latent_space()
    return text, frames, self.global_prompts

  def encode_text(self, caption_tokens, text_prompts):
    """token ids (N, L) with text prompts (Lp, P, D_t) -> unnormalised features (N, E), float32:
    [SOT, P // 2 prefix prompts, w_1..w_{L-1}, the rest as postfix] (module docstring). With
    P = 0 this is `clip.Model.encode_text`."""
    length, num_prefix = caption_tokens.shape[1], text_prompts.shape[1] // 2
    words = self.clip.embed_tokens(caption_tokens)  # (N, L, D_t); positions added by CLIP
    total = length + text_prompts.shape[1]  # L + P positions, prompts without positions
    causal = nn.make_causal_mask(jnp.ones((caption_tokens.shape[0], total)))

    def block_hook(i, block, x):
      prompts = jnp.broadcast_to(text_prompts[i].astype(x.dtype),
                                 x.shape[:1] + text_prompts.shape[1:])
      prefix, postfix = prompts[:, :num_prefix], prompts[:, num_prefix:]
      if i == 0:
        x = jnp.concatenate([x[:, :1], prefix, x[:, 1:], postfix], axis=1)  # (N, L + P, D_t)
      else:
        x = jnp.concatenate([x[:, :1], prefix, x[:, 1 + num_prefix:length + num_prefix],
                             postfix], axis=1)
      return block(x, mask=causal)

    eot_indices = jnp.argmax(caption_tokens, axis=-1) + num_prefix
    return self.clip.encode_text_embeddings(words, eot_indices, block_hook=block_hook)

  def encode_video(self, video, frame_prompts, global_prompts):
    """video (B, T, S, S, 3) with frame prompts (Lp, T, N_l, D_v) and global prompts (N_g, D_v)
    -> unnormalised features (B, E), float32: the first token after the global-local blocks,
    ln_post and proj (module docstring). With N_g = N_l = 0 this is CLIP's image feature of the
    first frame (the frames do not interact)."""
    frames = clip4clip.frames_of(video, self.clip.image_size)  # (B·T, S, S, 3)
    batch, num_frames = video.shape[:2]
    if frame_prompts.shape[1] != num_frames:
      raise ValueError(f"DGL was built for num_frames={frame_prompts.shape[1]} frames per video; "
                       f"got a video batch of shape {tuple(video.shape)}.")
    num_global, num_local = global_prompts.shape[0], frame_prompts.shape[2]
    attention = functools.partial(global_local_attention, num_global=num_global,
                                  num_frames=num_frames)

    def block_hook(i, block, x):
      width = x.shape[-1]
      prompts = jnp.broadcast_to(frame_prompts[i].astype(x.dtype),
                                 (batch,) + frame_prompts.shape[1:])  # (B, T, N_l, D_v)
      if i == 0:  # x: (B·T, 1 + grid², D_v) after ln_pre -> [globals; frames with prompts]
        x = x.reshape(batch, num_frames, -1, width)
        x = jnp.concatenate([x[:, :, :1], prompts, x[:, :, 1:]], axis=2)
        x = jnp.concatenate([
            jnp.broadcast_to(global_prompts.astype(x.dtype), (batch, num_global, width)),
            x.reshape(batch, -1, width)], axis=1)
      else:  # the frame prompt slots take layer i's prompts
        frames_x = x[:, num_global:].reshape(batch, num_frames, -1, width)
        frames_x = jnp.concatenate([frames_x[:, :, :1], prompts, frames_x[:, :, 1 + num_local:]],
                                   axis=2)
        x = jnp.concatenate([x[:, :num_global], frames_x.reshape(batch, -1, width)], axis=1)
      return block(x, attention_fn=attention)

    return self.clip.encode_image(frames, block_hook=block_hook)

  def embed_video(self, video):
    """video (B, T, S, S, 3) -> video features (B, E), L2-normalised float32."""
    _, frame_prompts, global_prompts = self.prompts()
    return clip.normalize(self.encode_video(video, frame_prompts, global_prompts))

  def embed_text(self, caption_tokens):
    """token ids (N, L) -> text features (N, E), L2-normalised float32."""
    return clip.normalize(self.encode_text(caption_tokens, self.prompts()[0]))

  def __call__(self, video, caption_tokens, *, train: bool = False):
    del train  # no dropout (the original's prompt dropout is 0)
    text_prompts, frame_prompts, global_prompts = self.prompts()
    text_features = clip.normalize(self.encode_text(caption_tokens, text_prompts))
    video_features = clip.normalize(self.encode_video(video, frame_prompts, global_prompts))
    similarity = jnp.exp(self.clip.logit_scale) * text_features @ video_features.T
    return similarity, {"text_features": text_features, "video_features": video_features}


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, inputs=("video", "caption_tokens"),
                       make_loss=clip4clip.make_loss,
                       predict_fns=clip4clip.video_text_predict_fns,
                       loaders={"model": coop.load_clip})
