"""OPT decoder-only language model as Flax Linen modules, with a key/value cache for decoding.

The frozen language model of RLCF's captioners (ClipCap and CapDec on OPT-125m): Zhang et al.
2022, "OPT: Open Pre-trained Transformer Language Models" (§2.1, Table 1: 12 layers, width 768,
12 heads for 125M). Follows huggingface transformers `models/opt/modeling_opt.py`
(`OPTForCausalLM`) for the OPT-125m layout:
  * learned positions with OPT's offset of 2: position ids are cumsum(mask) * mask - 1 over the
    attention mask (so padded positions read row 1, the first real token row 2);
  * pre-LN layers (`do_layer_norm_before`): x + Attn(LN(x)), then x + fc2(ReLU(fc1(LN(x)))), and a
    final LayerNorm (epsilon 1e-5, PyTorch's default);
  * the query is scaled by head_dim**-0.5 after its projection (bias included), as transformers;
  * the output projection is tied to the token embedding (logits = h @ E^T).
Prefix embeddings (ClipCap's mapped CLIP embedding) go in front of the token embeddings as
`input_embeds` = concat(prefix, embed(tokens)) with the mask ones over the prefix, the way
mzhaoshuai/RLCF `caption/image_llm/models/modeling_opt.py` (its `query_embeds`) and
`caption/image_llm/models/modules.py` (`ClipCaptionModelV2.forward`) feed them; ClipCap itself is
rmokady/CLIP_prefix_caption (`train.py`, on GPT-2).

`Model.__call__` is the full causal forward (training, teacher forcing); `Model.decode` runs a
chunk of new positions against a cache made by `init_cache`: first the whole prompt (prefix + BOS),
then one token at a time. Every cache leaf is batch-leading, so beam search reorders it with one
gather. `generate_beams` / `generate_greedy` are the jitted decoders of `jaxprompt.decoding` on
this model (RLCF: the prompt is the prefix then '</s>', EOS the newline token).

Parameter names (nested dicts, Flax style):
  embed_tokens/embedding (V, D), embed_positions/embedding (max_positions + 2, D),
  layers_{i}/self_attn/{q,k,v,out}_proj/{kernel (D, D), bias}, layers_{i}/self_attn_layer_norm,
  layers_{i}/fc1, layers_{i}/fc2, layers_{i}/final_layer_norm, final_layer_norm.
`load` reads a transformers OPT checkpoint (safetensors or pytorch_model.bin) into them.

Deliberate deviations:
  * Only the OPT-125m layout (also that of 1.3B and larger): OPT-350m's post-LN layers and its
    512-wide embedding with project_in/project_out are refused with a clear error.
  * No dropout: RLCF keeps OPT in eval mode throughout (`ClipCaptionPrefixV2.train` calls
    `llm.eval()`), and the decoder is never trained here.
  * Computation is float32 (or `dtype`); RLCF loads OPT in float16 under autocast.
  * Masked attention scores are set to the float32 minimum instead of adding it; a query whose keys
    are all masked (a left-padded position) averages them instead of whatever transformers' kernel
    gives. Only such padded positions differ; their outputs are never used.
  * The cache holds one write position for the whole batch (all rows decode in lockstep).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import decoding
from jaxprompt.models import common

# name -> (depth, width, num_heads, mlp_dim, max_positions, vocab_size). 'mu' is a tiny size for
# tests and demos; '125m' is facebook/opt-125m (RLCF's captioning decoder).
SIZES = {
    "mu": (2, 32, 4, 64, 64, 64),
    "125m": (12, 768, 12, 3072, 2048, 50272),
}
POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (`OPTLearnedPositionalEmbedding`)
LAYER_NORM_EPS = 1e-5
# OPT's special tokens (facebook/opt-125m's vocab.json): '<s>' 0, '<pad>' 1, '</s>' 2, '<unk>' 3.
# Its tokenizer starts every text with '</s>' (BOS id 2) and pads with id 1.
PAD_TOKEN_ID = 1
BOS_TOKEN_ID = 2


def decode_variant(variant: str, vocab_size: Optional[int] = None) -> dict:
  """'125m' -> dict(depth=12, width=768, num_heads=12, mlp_dim=3072, max_positions=2048,
  vocab_size=50272); `vocab_size` overrides the variant's (a generated demo vocabulary)."""
  if variant not in SIZES:
    raise ValueError(f"Unknown OPT variant {variant!r}: expected one of {sorted(SIZES)}.")
  depth, width, num_heads, mlp_dim, max_positions, default_vocab = SIZES[variant]
  if vocab_size is not None and int(vocab_size) < 1:
    raise ValueError(f"OPT vocab_size={vocab_size!r}: expected a positive integer.")
  return dict(depth=depth, width=width, num_heads=num_heads, mlp_dim=mlp_dim,
              max_positions=max_positions,
              vocab_size=default_vocab if vocab_size is None else int(vocab_size))


_INIT = nn.initializers.normal(stddev=0.02)  # OPT's init_std


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_INIT, name=name)


def _layer_norm(dtype, name: Optional[str] = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class Attention(nn.Module):
  """Causal multi-head self-attention with optional key/value cache (`OPTAttention`)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, cache=None, write_index=None):
    """x (B, T, D); mask (B, 1, T, S) bool, True = may attend; cache {'key', 'value'} (B, S, H,
    D/H) with the new keys written at `write_index`, or None (then S = T). Returns (out, cache)."""
    batch, length, width = x.shape
    heads = self.num_heads
    head_dim = width // heads
    split = lambda y: y.reshape(batch, length, heads, head_dim)
    query = split(_dense(width, "q_proj", self.dtype)(x)) * head_dim**-0.5
    key = split(_dense(width, "k_proj", self.dtype)(x))
    value = split(_dense(width, "v_proj", self.dtype)(x))
    if cache is not None:
      start = (0, write_index, 0, 0)
      key = jax.lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype), start)
      value = jax.lax.dynamic_update_slice(cache["value"], value.astype(cache["value"].dtype),
                                           start)
      cache = dict(key=key, value=value)
    scores = jnp.einsum("bthd,bshd->bhts", query, key.astype(self.dtype)).astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, value.astype(self.dtype))
    return _dense(width, "out_proj", self.dtype)(out.reshape(batch, length, width)), cache


class Layer(nn.Module):
  """Pre-LN OPT layer (`OPTDecoderLayer`, do_layer_norm_before=True)."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, cache=None, write_index=None):
    y, cache = Attention(self.num_heads, self.dtype, name="self_attn")(
        _layer_norm(self.dtype, "self_attn_layer_norm")(x), mask, cache, write_index)
    x = x + y
    y = _layer_norm(self.dtype, "final_layer_norm")(x)
    y = nn.relu(_dense(self.mlp_dim, "fc1", self.dtype)(y))
    return x + _dense(x.shape[-1], "fc2", self.dtype)(y), cache


class Model(nn.Module):
  """OPTForCausalLM without dropout.

  `__call__(input_embeds (B, T, D), attention_mask (B, T) or None) -> logits (B, T, V)` (float32).
  `decode(input_embeds (B, T, D), attention_mask (B, T) or None, cache) -> (logits, cache)`.
  `embed(token_ids (B, T)) -> (B, T, D)`: the token embedding; a prefix goes in front of it.
  """
  variant: str = "125m"
  vocab_size: Optional[int] = None
  dtype: Any = jnp.float32

  def setup(self):
    v = decode_variant(self.variant, self.vocab_size)
    self.embed_tokens = nn.Embed(v["vocab_size"], v["width"], embedding_init=_INIT,
                                 dtype=self.dtype)
    self.embed_positions = nn.Embed(v["max_positions"] + POSITION_OFFSET, v["width"],
                                    embedding_init=_INIT, dtype=self.dtype)
    self.layers = [Layer(v["num_heads"], v["mlp_dim"], self.dtype) for _ in range(v["depth"])]
    self.final_layer_norm = _layer_norm(self.dtype)

  def embed(self, token_ids):
    return self.embed_tokens(jnp.asarray(token_ids))

  def _check_embeds(self, input_embeds, attention_mask):
    v = decode_variant(self.variant, self.vocab_size)
    if input_embeds.ndim != 3 or input_embeds.shape[-1] != v["width"]:
      raise ValueError(f"OPT input_embeds must be (B, T, {v['width']}); got "
                       f"{input_embeds.shape}.")
    if attention_mask is None:
      return jnp.ones(input_embeds.shape[:2], jnp.int32)
    if tuple(attention_mask.shape) != tuple(input_embeds.shape[:2]):
      raise ValueError(f"OPT attention_mask has shape {attention_mask.shape}; expected "
                       f"{input_embeds.shape[:2]} (batch, length of input_embeds).")
    return jnp.asarray(attention_mask).astype(jnp.int32)

  def _run(self, input_embeds, mask, query_start, caches=None, write_index=None):
    """Layers over `input_embeds` (B, T, D) at absolute positions query_start + [0, T) of the
    key sequence whose mask is `mask` (B, S) (positions come from it, as transformers)."""
    v = decode_variant(self.variant, self.vocab_size)
    batch, length = input_embeds.shape[:2]
    if mask.shape[1] > v["max_positions"]:
      raise ValueError(f"Sequence length {mask.shape[1]} exceeds OPT's {v['max_positions']} "
                       "learned positions.")
    positions = jnp.cumsum(mask, axis=1) * mask - 1 + POSITION_OFFSET  # (B, S)
    positions = jax.lax.dynamic_slice(positions, (0, query_start), (batch, length))
    x = input_embeds.astype(self.dtype) + self.embed_positions(positions)
    query_index = query_start + jnp.arange(length)
    causal = query_index[:, None] >= jnp.arange(mask.shape[1])[None, :]  # (T, S)
    attend = causal[None, None] & mask.astype(bool)[:, None, None, :]  # (B, 1, T, S)
    new_caches = []
    for i, layer in enumerate(self.layers):
      x, cache = layer(x, attend, None if caches is None else caches[i], write_index)
      new_caches.append(cache)
    x = self.final_layer_norm(x)
    logits = self.embed_tokens.attend(x).astype(jnp.float32)  # tied output projection
    return logits, new_caches

  def __call__(self, input_embeds, attention_mask=None):
    input_embeds = jnp.asarray(input_embeds)
    mask = self._check_embeds(input_embeds, attention_mask)
    return self._run(input_embeds, mask, 0)[0]

  def decode(self, input_embeds, attention_mask, cache):
    """Runs T new positions after the cache's `index` and writes their keys/values there.

    `cache` comes from `init_cache` (or a previous `decode`): dict(index (B,) int32, the same
    write position in every row; mask (B, S); layers_{i}: dict(key, value) (B, S, H, D/H)).
    Returns (logits (B, T, V), the updated cache with index + T).
    """
    input_embeds = jnp.asarray(input_embeds)
    new_mask = self._check_embeds(input_embeds, attention_mask)
    index = cache["index"][0]
    mask = jax.lax.dynamic_update_slice(cache["mask"], new_mask.astype(cache["mask"].dtype),
                                        (0, index))
    layer_caches = [cache[f"layers_{i}"] for i in range(len(self.layers))]
    logits, layer_caches = self._run(input_embeds, mask, index, layer_caches, index)
    new_cache = dict(index=cache["index"] + input_embeds.shape[1], mask=mask)
    new_cache.update({f"layers_{i}": c for i, c in enumerate(layer_caches)})
    return logits, new_cache


def init_cache(model: Model, batch_size: int, max_length: int, dtype=None) -> dict:
  """An empty cache for `model.decode`: room for `max_length` positions (prefix + prompt + new
  tokens) per row, nothing written (index 0, mask 0)."""
  v = decode_variant(model.variant, model.vocab_size)
  if max_length > v["max_positions"]:
    raise ValueError(f"Cache length {max_length} exceeds OPT's {v['max_positions']} learned "
                     "positions.")
  dtype = model.dtype if dtype is None else dtype
  shape = (batch_size, max_length, v["num_heads"], v["width"] // v["num_heads"])
  cache = dict(index=jnp.zeros((batch_size,), jnp.int32),
               mask=jnp.zeros((batch_size, max_length), jnp.int32))
  for i in range(v["depth"]):
    cache[f"layers_{i}"] = dict(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
  return cache


def start_decoding(model: Model, params, input_embeds, attention_mask, max_new_tokens: int):
  """Runs the prompt (prefix + token embeddings) into a fresh cache with room for
  `max_new_tokens` more positions. Returns (logits after the prompt (B, V), cache, step_fn) for
  `jaxprompt.decoding`: step_fn(token_ids (N,), cache) -> (logits (N, V), cache)."""
  input_embeds = jnp.asarray(input_embeds)
  variables = {"params": params}
  cache = init_cache(model, input_embeds.shape[0], input_embeds.shape[1] + int(max_new_tokens))
  logits, cache = model.apply(variables, input_embeds, attention_mask, cache, method=Model.decode)

  def step_fn(token_ids, cache):
    embeds = model.apply(variables, token_ids[:, None], method=Model.embed)
    step_logits, cache = model.apply(variables, embeds, None, cache, method=Model.decode)
    return step_logits[:, 0], cache

  return logits[:, -1], cache, step_fn


_DECODE_STATIC = ("model", "max_new_tokens", "eos_token_id", "pad_token_id", "min_new_tokens")


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC + (
    "num_beams", "num_return_sequences", "length_penalty"))
def generate_beams(model: Model, params, input_embeds, attention_mask=None, *, num_beams: int,
                   num_return_sequences: Optional[int] = None, max_new_tokens: int = 50,
                   eos_token_id: int, pad_token_id: int = PAD_TOKEN_ID,
                   length_penalty: float = 1.0, min_new_tokens: int = 0) -> dict:
  """Jitted beam search after the prompt `input_embeds` (B, T, D) (`decoding.beam_search`):
  dict(tokens (B, K, max_new_tokens), lengths (B, K), scores (B, K))."""
  first_logits, cache, step_fn = start_decoding(model, params, input_embeds, attention_mask,
                                                max_new_tokens)
  return decoding.beam_search(
      step_fn, first_logits, cache, num_beams=num_beams,
      num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
      eos_token_id=eos_token_id, pad_token_id=pad_token_id, length_penalty=length_penalty,
      min_new_tokens=min_new_tokens)


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC)
def generate_greedy(model: Model, params, input_embeds, attention_mask=None, *,
                    max_new_tokens: int = 50, eos_token_id: int,
                    pad_token_id: int = PAD_TOKEN_ID, min_new_tokens: int = 0) -> dict:
  """Jitted greedy decoding after the prompt `input_embeds` (B, T, D) (`decoding.greedy_search`):
  dict(tokens (B, max_new_tokens), lengths (B,))."""
  first_logits, cache, step_fn = start_decoding(model, params, input_embeds, attention_mask,
                                                max_new_tokens)
  return decoding.greedy_search(step_fn, first_logits, cache, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                min_new_tokens=min_new_tokens)


# ---------------------------------------------------------------------------------------------
# Pretrained weights: a transformers `OPTForCausalLM` / `OPTModel` state dict, renamed by
# `convert_hf_opt` and merged strictly by `common.merge_params`.
# ---------------------------------------------------------------------------------------------

_HF_NAMES = {
    "decoder.embed_tokens.weight": "embed_tokens/embedding",
    "decoder.embed_positions.weight": "embed_positions/embedding",
    "decoder.final_layer_norm.weight": "final_layer_norm/scale",
    "decoder.final_layer_norm.bias": "final_layer_norm/bias",
}
_HF_LAYER_MODULES = {
    "self_attn.q_proj": "self_attn/q_proj", "self_attn.k_proj": "self_attn/k_proj",
    "self_attn.v_proj": "self_attn/v_proj", "self_attn.out_proj": "self_attn/out_proj",
    "self_attn_layer_norm": "self_attn_layer_norm", "fc1": "fc1", "fc2": "fc2",
    "final_layer_norm": "final_layer_norm",
}
_LAYOUT_350M = ("OPT-350m's layout (a {0}-wide token embedding with project_in/project_out "
                "around a {1}-wide decoder, post-LN layers) is not supported; only OPT-125m's "
                "(pre-LN, embedding width = hidden width) is")
# config.json entries whose value must be the OPT-125m layout's.
_REQUIRED_CONFIG = {
    "do_layer_norm_before": True, "activation_function": "relu", "enable_bias": True,
    "layer_norm_elementwise_affine": True, "_remove_final_layer_norm": False,
}


def check_hf_config(config: dict, *, source: str = "<config>") -> None:
  """Refuses a transformers OPTConfig (as a dict) that is not OPT-125m's layout."""
  hidden = config.get("hidden_size")
  projected = config.get("word_embed_proj_dim", hidden)
  if projected != hidden:
    raise ValueError(f"{source}: word_embed_proj_dim={projected} != hidden_size={hidden}: "
                     + _LAYOUT_350M.format(projected, hidden) + ".")
  for key, expected in _REQUIRED_CONFIG.items():
    if key in config and config[key] != expected:
      raise ValueError(f"{source}: {key}={config[key]!r}, expected {expected!r} (the OPT-125m "
                       "layout this decoder implements).")


def _hf_to_ours(name: str) -> Optional[str]:
  """transformers OPT param name -> our '/'-joined name, or None if it is not one."""
  name = name.removeprefix("model.")
  if name in _HF_NAMES:
    return _HF_NAMES[name]
  match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
  if not match or match.group(2) not in _HF_LAYER_MODULES:
    return None
  module = _HF_LAYER_MODULES[match.group(2)]
  leaf = "bias" if match.group(3) == "bias" else (
      "scale" if module.endswith("layer_norm") else "kernel")
  return f"layers_{match.group(1)}/{module}/{leaf}"


def convert_hf_opt(state_dict: dict[str, np.ndarray], *,
                   source: str = "<state dict>") -> dict[str, np.ndarray]:
  """transformers OPT state dict -> our flat '/'-joined params (pure; no model needed).

  Accepts names with and without the 'model.' prefix (OPTForCausalLM / OPTModel files);
  transposes Linear weights (out, in) -> (in, out). 'lm_head.weight' is dropped when it equals the
  token embedding (tied, as OPT's) and refused otherwise; project_in/project_out (OPT-350m) and
  any other unknown name raise a ValueError naming them.
  """
  projections = [n for n in state_dict if re.search(r"project_(in|out)\.weight$", n)]
  if projections:
    shape = np.shape(state_dict[projections[0]])
    raise ValueError(f"{source}: has {', '.join(sorted(projections))}: "
                     + _LAYOUT_350M.format(min(shape), max(shape)) + ".")
  sources: dict[str, list[str]] = {}  # our name -> the file's names for it
  unknown = []
  for hf_name in state_dict:
    name = _hf_to_ours(hf_name)
    if name is not None:
      sources.setdefault(name, []).append(hf_name)
    elif hf_name != "lm_head.weight":
      unknown.append(hf_name)
  if unknown:
    raise ValueError(f"{source}: not transformers OPT parameters ({len(unknown)}): "
                     + ", ".join(sorted(unknown)))
  clashes = [f"{' and '.join(names)} -> {name}" for name, names in sources.items()
             if len(names) > 1]
  if clashes:
    raise ValueError(f"{source}: several entries map to one parameter (a file with and without "
                     f"the 'model.' prefix?): {'; '.join(clashes)}.")
  flat = {}
  for name, (hf_name,) in sources.items():
    value = np.asarray(state_dict[hf_name])
    flat[name] = value.T if name.endswith("/kernel") else value  # (out, in) -> (in, out)
  if "lm_head.weight" in state_dict:
    embedding = flat.get("embed_tokens/embedding")
    head = np.asarray(state_dict["lm_head.weight"])
    if embedding is None or head.shape != embedding.shape or not np.array_equal(head, embedding):
      raise ValueError(f"{source}: lm_head.weight differs from the token embedding; this decoder "
                       "ties them (as OPT does) and cannot load an untied head.")
  return flat


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load(init_params: dict, path: str) -> dict:
  """Loads transformers OPT weights into `init_params` (the 'params' collection, nested).

  `path` is a Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin) or
  one weight file (.safetensors / .bin / .pt / .pth; a config.json beside it is checked too).
  torch files are read with weights_only=True. Merging is strict (`common.merge_params`): a
  missing, unexpected or mis-shaped name is one ValueError naming `path`.
  """
  path = os.fspath(path)
  if set(init_params) == {"params"}:
    raise ValueError("opt.load takes the 'params' collection: pass variables['params'], not the "
                     "whole variables dict.")
  if os.path.isdir(path):
    found = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise FileNotFoundError(f"OPT folder {path!r} has none of {_WEIGHT_FILES}.")
    weights_path, folder = found[0], path
  else:
    weights_path, folder = path, os.path.dirname(path)
  config_path = os.path.join(folder, "config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      check_hf_config(json.load(f), source=config_path)
  loaded = convert_hf_opt(common.load_torch_state_dict(weights_path), source=weights_path)
  return common.merge_params(loaded, init_params, source=weights_path)
