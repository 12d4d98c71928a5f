"""ClipCap and CapDec: a trainable mapping network between a frozen CLIP and a frozen OPT decoder.

The captioners RLCF adapts at test time (Zhao et al., ICLR 2024, §4.3): ClipCap (Mokady et al.
2021, "ClipCap: CLIP Prefix for Image Captioning", rmokady/CLIP_prefix_caption) maps the CLIP
image embedding to `prefix_length` embeddings that the language model reads before the caption;
CapDec (Nukrai et al., EMNLP 2022 Findings, DavidHuji/CapDec) trains the same mapper on text
only, from the CLIP *text* embedding of the caption plus Gaussian noise, and captions images from
their CLIP image embedding. Follows mzhaoshuai/RLCF `caption/image_llm/models/modules.py`
(`TransformerMapper`, `MLP`, `ClipCaptionModelV2`, `ClipCaptionPrefixV2`), `caption/train.py`
(the loss), `caption/image_llm/utils.py` (`noise_injection`) and `caption/image_llm/datasets/
coco_cap.py` (`COCOCLIPCapTrainDataset`: tokens and mask), with the scripts
`caption/scripts/train_{clipcap,capdec}_coco.sh`:

  * prefix: the CLIP embedding L2-normalised (`--normalize_prefix`); CapDec's training prefix is
    normalise(normalise(text embedding) + N(0, noise_variance)), noise_variance 0.016;
  * mapper 'transformer' (`TransformerMapper`): Linear(E, clip_length * D) reshaped to
    (clip_length, D), followed by a learned [prefix_length, D] constant (initialised N(0, 1) as
    torch.randn); `mapper_layers` pre-LN layers of width D (x + Attn(LN(x)), x + MLP(LN(x)); the
    attention's query and key/value projections without bias, its output projection with bias,
    8 heads, MLP ratio 2 with ReLU, LayerNorm epsilon 1e-5); the outputs at the last
    prefix_length positions are the prefix. RLCF: E = 512 (ViT-B/16), D = 768 (OPT-125m),
    clip_length = prefix_length = 40, 8 layers: 53,587,968 parameters;
  * mapper 'mlp' (ClipCap's `MLP`): Linear(E, P * D // 2), Tanh, Linear(P * D // 2, P * D);
  * decoder input: concat(prefix, embed(caption ids)) with the mask ones over the prefix; the
    caption ids are '</s>' + the caption's BPE (`opt_tokenize`), padded; logits at positions
    P - 1 .. P + L - 2 predict the ids, so the first target is '</s>' itself; cross-entropy with
    ignore_index 0 (the padding, which the original writes as 0), averaged over the batch's
    counted tokens (`make_loss`);
  * trainable: the mapper only (`ClipCaptionPrefixV2` hands only `clip_project` to AdamW and
    keeps OPT in eval mode; the CLIP is frozen, its embeddings precomputed by
    `extractor_pickle.py`). ClipCap's own non-prefix-only mode also trains the language model:
    `config.trainable_params` (the embedded demo, whose tiny OPT is random, does).

Without `caption_ids` (initialisation, `predict_fns`) the model returns the logits of the first
caption token after the decoding prompt, prefix + '</s>' (RLCF's `generate_opt.py`, prompt "").
Param tree: `clip/...` (`models.clip.Model`), `mapper/...`, `opt/...` (`models.opt.Model`).
`config.model_init` parts: 'clip' (OpenAI CLIP weights, `coop.load_clip`) and 'opt' (a
transformers OPT folder or file, `models.opt.load`).

Deliberate deviations:
  * The CLIP embeddings are computed on the fly from the batch's images (ClipCap) or caption
    tokens (CapDec) by the frozen tower, not read from a precomputed pickle; the same numbers up
    to the original's fp16 extraction.
  * Caption ids have a fixed length from the config (`opt_tokenize(length=...)`), truncated as
    the original truncates to its data-derived max_seq_len (mean + 10 std of the lengths, at most
    the longest).
  * Float32 throughout (the original trains under autocast with OPT in float16).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import method
from jaxprompt.models import clip, common, gpt2_tokenizer, opt
from jaxprompt.prompts import coop

MODES = ("clipcap", "capdec")
MAPPINGS = ("transformer", "mlp")
TRAINABLE_PARAMS = r"mapper/.*"
NOISE_VARIANCE = 0.016  # RLCF's train_{clipcap,capdec}_coco.sh --noise_variance
MAPPER_HEADS = 8  # `TransformerMapper` builds `Transformer(dim_embedding, 8, num_layers)`
MAPPER_MLP_RATIO = 2  # `Transformer(..., mlp_ratio=2.)`
LAYER_NORM_EPS = 1e-5


class MapperLayer(nn.Module):
  """One pre-LN layer of ClipCap's mapper (`TransformerLayer`, self-attention, no mask)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm1")(x)
    query = nn.Dense(width, use_bias=False, dtype=self.dtype, name="to_queries")(y)
    keys_values = nn.Dense(2 * width, use_bias=False, dtype=self.dtype, name="to_keys_values")(y)
    query = query.reshape(batch, length, self.num_heads, head_dim)
    keys_values = keys_values.reshape(batch, length, 2, self.num_heads, head_dim)
    key, value = keys_values[:, :, 0], keys_values[:, :, 1]
    scores = jnp.einsum("bnhd,bmhd->bhnm", query, key).astype(jnp.float32) * head_dim**-0.5
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights, value).reshape(batch, length, width)
    x = x + nn.Dense(width, dtype=self.dtype, name="project")(out)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm2")(x)
    y = nn.relu(nn.Dense(MAPPER_MLP_RATIO * width, dtype=self.dtype, name="fc1")(y))
    return x + nn.Dense(width, dtype=self.dtype, name="fc2")(y)


class TransformerMapper(nn.Module):
  """CLIP embedding (B, E) -> prefix (B, prefix_length, width) (`TransformerMapper`)."""
  width: int
  prefix_length: int = 40
  clip_length: int = 40
  num_layers: int = 8
  num_heads: int = MAPPER_HEADS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embedding):
    x = nn.Dense(self.clip_length * self.width, dtype=self.dtype, name="linear")(embedding)
    x = x.reshape(embedding.shape[0], self.clip_length, self.width)
    const = self.param("prefix_const", nn.initializers.normal(1.0),
                       (self.prefix_length, self.width))
    x = jnp.concatenate([x, jnp.broadcast_to(const.astype(x.dtype),
                                             (x.shape[0], *const.shape))], axis=1)
    for i in range(self.num_layers):
      x = MapperLayer(self.num_heads, self.dtype, name=f"layers_{i}")(x)
    return x[:, self.clip_length:]


class MlpMapper(nn.Module):
  """CLIP embedding (B, E) -> prefix (B, prefix_length, width) (ClipCap's `MLP`, Tanh)."""
  width: int
  prefix_length: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embedding):
    size = self.prefix_length * self.width
    x = jnp.tanh(nn.Dense(size // 2, dtype=self.dtype, name="fc1")(embedding))
    x = nn.Dense(size, dtype=self.dtype, name="fc2")(x)
    return x.reshape(embedding.shape[0], self.prefix_length, self.width)


def check_caption_ids(caption_ids) -> None:
  if caption_ids.ndim != 2:
    raise ValueError(f"caption_ids must be (B, L) OPT ids ('</s>' first, -1 padding; the pp op "
                     f"opt_tokenize); got shape {caption_ids.shape}.")


class Model(nn.Module):
  """Frozen CLIP -> trainable mapper -> frozen OPT (module docstring).

  `__call__(images, *, train, caption_ids=None, caption_tokens=None) -> (logits, aux)`: with
  caption_ids (B, L) the logits (B, L, V) that predict them; without, the logits (B, V) of the
  first caption token. caption_tokens (B, 1, 77) or (B, 77): the caption's CLIP ids, CapDec's
  training input. aux: 'prefix' (B, P, D).
  """
  num_classes: int = 0
  variant: str = "ViT-B/16"  # the CLIP
  vocab_path: str = ""  # the CLIP vocabulary (CLIP-S, `coop.clip_predict_fns`)
  opt_variant: str = "125m"
  opt_vocab_size: Optional[int] = None  # a generated demo vocabulary's size
  tokenizer_path: str = ""  # the OPT tokenizer folder (vocab.json + merges.txt), for decoding
  mode: str = "clipcap"
  mapping: str = "transformer"
  prefix_length: int = 40
  clip_length: int = 40
  mapper_layers: int = 8
  noise_variance: float = NOISE_VARIANCE
  dtype: Any = jnp.float32

  def __post_init__(self):
    common.require(self, mode=(self.mode in MODES, f"one of {MODES}"),
                   mapping=(self.mapping in MAPPINGS, f"one of {MAPPINGS}"),
                   prefix_length=(self.prefix_length >= 1, "an integer >= 1"),
                   clip_length=(self.clip_length >= 1, "an integer >= 1"),
                   mapper_layers=(self.mapper_layers >= 1, "an integer >= 1"),
                   noise_variance=(self.noise_variance >= 0, "a variance >= 0"))
    super().__post_init__()

  def setup(self):
    self.clip = clip.Model(**coop.clip_config(self.variant, self.dtype))
    self.opt = opt.Model(self.opt_variant, self.opt_vocab_size, self.dtype)
    width = opt.decode_variant(self.opt_variant, self.opt_vocab_size)["width"]
    if self.mapping == "transformer":
      self.mapper = TransformerMapper(width, self.prefix_length, self.clip_length,
                                      self.mapper_layers, dtype=self.dtype)
    else:
      self.mapper = MlpMapper(width, self.prefix_length, self.dtype)

  def image_prefix(self, images):
    """The prefix (B, P, D) of the normalised CLIP image embedding (ClipCap; CapDec at test)."""
    return self.mapper(clip.normalize(self.clip.encode_image(images)))

  def text_prefix(self, caption_tokens, noise_rng):
    """CapDec's training prefix (B, P, D): the normalised CLIP text embedding of caption_tokens
    (B, 77) plus N(0, noise_variance), normalised again (`noise_injection`, dont_norm)."""
    embedding = clip.normalize(self.clip.encode_text(caption_tokens))
    noise = jax.random.normal(noise_rng, embedding.shape) * np.sqrt(self.noise_variance)
    return self.mapper(clip.normalize(embedding + noise))

  def prompt_embeds(self, images):
    """The decoding prompt (B, P + 1, D): the image prefix, then '</s>'."""
    return self.embedding_prompt(clip.normalize(self.clip.encode_image(images)))

  def embedding_prompt(self, embedding):
    """The decoding prompt (B, P + 1, D) of normalised CLIP embeddings (B, E): the mapped
    prefix, then '</s>' (RLCF's `generate_opt.py` with prompt "")."""
    prefix = self.mapper(embedding)
    bos = self.opt.embed(jnp.full((prefix.shape[0], 1), opt.BOS_TOKEN_ID, jnp.int32))
    return jnp.concatenate([prefix, bos.astype(prefix.dtype)], axis=1)

  def caption_logits(self, prefix, token_ids, token_mask):
    """Teacher forcing: the logits (B, L, V) at positions P - 1 .. P + L - 2 of the decoder run on
    concat(prefix (B, P, D), embed(token_ids (B, L))), the mask ones over the prefix then
    token_mask (B, L); so position j's logits predict token_ids[:, j]."""
    mask = jnp.concatenate([jnp.ones(prefix.shape[:2], jnp.int32),
                            token_mask.astype(jnp.int32)], axis=1)
    embeds = jnp.concatenate([prefix, self.opt.embed(token_ids).astype(prefix.dtype)], axis=1)
    return self.opt(embeds, mask)[:, prefix.shape[1] - 1:-1]

  def __call__(self, images, *, train: bool = False, caption_ids=None, caption_tokens=None):
    if self.is_initializing():  # the whole CLIP (its text tower too: CapDec, CLIP-S)
      self.clip.encode_text(jnp.zeros((1, self.clip.context_length), jnp.int32))
    if caption_ids is None:
      prefix = self.image_prefix(images)
      logits = self.opt(self.prompt_embeds(images))[:, -1]
      return logits, {"prefix": prefix}
    check_caption_ids(caption_ids)
    if self.mode == "capdec" and train:
      if caption_tokens is None:
        raise ValueError("CapDec trains on the captions' CLIP ids: the batch needs "
                         "'caption_tokens' (the pp op clip_tokenize(..., key='captions')).")
      tokens = caption_tokens[:, 0] if caption_tokens.ndim == 3 else caption_tokens
      if caption_tokens.ndim == 3 and caption_tokens.shape[1] != 1:
        raise ValueError(f"CapDec trains on one caption per example (train pairs): "
                         f"caption_tokens has shape {caption_tokens.shape}.")
      prefix = self.text_prefix(tokens, self.make_rng("dropout"))
    else:
      prefix = self.image_prefix(images)
    logits = self.caption_logits(prefix, jnp.maximum(caption_ids, 0), caption_ids >= 0)
    return logits, {"prefix": prefix}


def caption_loss(logits, caption_ids):
  """RLCF train.py's loss: cross-entropy of logits (B, L, V) on the ids (B, L) with ignore_index
  0, where -1 padding reads as 0; mean over the counted tokens of the batch (one scalar)."""
  targets = jnp.maximum(caption_ids, 0)
  counted = (targets != 0).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_losses = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(token_losses * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def make_loss(unused_config, unused_source):
  def loss(logits, unused_aux, batch):
    if "caption_ids" not in batch:
      raise ValueError("The captioning loss needs the batch key 'caption_ids' (the pp op "
                       f"opt_tokenize); the batch has {sorted(batch)}.")
    return caption_loss(logits, batch["caption_ids"])
  return loss


@functools.lru_cache(maxsize=4)
def get_tokenizer(folder: str) -> gpt2_tokenizer.Tokenizer:
  return gpt2_tokenizer.Tokenizer(folder)


def predict_fns(model: Model, config=None) -> dict:
  """'caption_beams' (variables, images, *, num_beams, max_new_tokens, eos_token_id) ->
  dict(tokens (B, K, T), lengths (B, K), scores (B, K)): beam search after prefix + '</s>'
  (`opt.generate_beams`); 'caption_tokenizer' () -> the OPT `gpt2_tokenizer.Tokenizer` of
  `model.tokenizer_path`; and the CLIP's functions (`coop.clip_predict_fns`)."""
  decoder = opt.Model(model.opt_variant, model.opt_vocab_size, model.dtype)

  def caption_beams(variables, images, *, num_beams: int, max_new_tokens: int,
                    eos_token_id: int):
    embeds = model.apply(variables, images, method=Model.prompt_embeds)
    return opt.generate_beams(decoder, variables["params"]["opt"], embeds, num_beams=num_beams,
                              num_return_sequences=num_beams, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id)

  def caption_tokenizer():
    if not model.tokenizer_path:
      raise ValueError("Decoding captions needs config.model.tokenizer_path: the OPT tokenizer "
                       "folder (vocab.json + merges.txt, e.g. facebook/opt-125m's).")
    return get_tokenizer(model.tokenizer_path)

  return {**coop.clip_predict_fns(model, config), "caption_beams": caption_beams,
          "caption_tokenizer": caption_tokenizer}


def load_opt(variables, path: str):
  """transformers OPT weights (`opt.load`) into params['opt']; the rest unchanged."""
  params = variables["params"]
  return {**variables, "params": {**params, "opt": opt.load(params["opt"], path)}}


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS,
                       loaders={"clip": coop.load_clip, "opt": load_opt},
                       optional_inputs=("caption_ids", "caption_tokens"), make_loss=make_loss,
                       predict_fns=predict_fns)
