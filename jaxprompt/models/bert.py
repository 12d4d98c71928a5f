"""BERT text encoder as Flax Linen modules: the language backbone of GLIP.

Follows huggingface transformers `models/bert/modeling_bert.py` (`BertModel`: embeddings, then
post-LN layers of self-attention and a GELU MLP) and what microsoft/GLIP
`maskrcnn_benchmark/modeling/language_backbone/bert_model.py` (`BertEncoder`, with N_LAYERS=1)
returns from it: `hidden` (the last layer's hidden states, padded positions included), `embedded`
(`hidden` times the attention mask), `aggregate` (the mean of `hidden` over the valid tokens) and
`masks` (the attention mask). GLIP uses bert-base-uncased: 12 layers, width 768, 12 heads, MLP 3072,
exact (erf) GELU, LayerNorm epsilon 1e-12, dropout 0.1 on hidden states and attention weights,
learned absolute positions (512) and 2 token types. `load` reads transformers `BertModel` weights.

Parameter names (nested dicts, Flax style):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias},
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}  (`vit.MultiHeadAttention`:
      q/k/v kernels (D, H, D/H), out kernel (H, D/H, D)),
  encoder/layer_{i}/attention_norm, encoder/layer_{i}/intermediate, encoder/layer_{i}/output,
  encoder/layer_{i}/output_norm.
transformers' pooler maps to `pooler/dense/{kernel,bias}`; our Model has no pooler (GLIP never
uses it), so `load` drops it by default.

Deliberate deviations:
  * Padded keys get an additive bias of -1e30 (`vit.MultiHeadAttention`) rather than the dtype's
    minimum (transformers today) or -10000 (the transformers GLIP was built on). In float32 all
    three give padded keys a weight of exactly 0 whenever a row has at least one valid key, so the
    outputs are the same up to float error.
  * `aggregate` divides by max(number of valid tokens, 1): an all-padding row gives 0, not NaN.
  * GLIP can also return the average of the last N_LAYERS layers; it configures N_LAYERS=1, the
    only case here.
  * Each layer runs through `common.run_block` (the project's `BlockHook`), so prompt methods can
    change the token sequence around any layer.
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import common
from jaxprompt.models import vit

# name -> (depth, width, num_heads, mlp_dim, max_positions, vocab_size). 'mu' is a tiny size for
# tests and demos; 'base' is bert-base-uncased (GLIP's language backbone).
SIZES = {
    "mu": (2, 32, 2, 64, 64, 100),
    "base": (12, 768, 12, 3072, 512, 30522),
    "large": (24, 1024, 16, 4096, 512, 30522),
}


def decode_variant(variant: str) -> dict:
  """'base' -> dict(depth=12, width=768, num_heads=12, mlp_dim=3072, max_positions=512,
  vocab_size=30522)."""
  if variant not in SIZES:
    raise ValueError(f"Unknown BERT variant {variant!r}: expected one of {sorted(SIZES)}.")
  depth, width, num_heads, mlp_dim, max_positions, vocab_size = SIZES[variant]
  return dict(depth=depth, width=width, num_heads=num_heads, mlp_dim=mlp_dim,
              max_positions=max_positions, vocab_size=vocab_size)


_EMBED_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


class Embeddings(nn.Module):
  """Word + learned position + token-type embeddings, then LayerNorm and dropout."""
  vocab_size: int
  width: int
  max_positions: int
  type_vocab_size: int = 2
  dropout: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids, token_type_ids, *, deterministic: bool = True):
    length = token_ids.shape[1]
    if length > self.max_positions:
      raise ValueError(f"Sequence length {length} exceeds the {self.max_positions} position "
                       "embeddings of this BERT; tokenize with a smaller max_length.")
    embed = lambda n, name: nn.Embed(n, self.width, embedding_init=_EMBED_INIT, dtype=self.dtype,
                                     name=name)
    x = embed(self.vocab_size, "word_embeddings")(token_ids)
    x = x + embed(self.max_positions, "position_embeddings")(jnp.arange(length)[None])
    x = x + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
    return vit.Dropout(self.dropout)(x, deterministic=deterministic)


class Layer(nn.Module):
  """Post-LN BERT layer: x = LN(x + Drop(Attn(x))), then x = LN(x + Drop(MLP(x)))."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, deterministic: bool = True):
    """x (B, L, D); mask broadcastable to (B, H, L, L), True = may attend."""
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=_EMBED_INIT, name=name)
    y = vit.MultiHeadAttention(self.num_heads, self.attention_dropout, self.dtype,
                               name="attention")(x, mask=mask, deterministic=deterministic)
    x = norm("attention_norm")(x + vit.Dropout(self.dropout)(y, deterministic=deterministic))
    y = nn.gelu(dense(self.mlp_dim, "intermediate")(x), approximate=False)
    y = dense(width, "output")(y)
    return norm("output_norm")(x + vit.Dropout(self.dropout)(y, deterministic=deterministic))


class Encoder(nn.Module):
  """`depth` layers, each run through `common.run_block` with the padding mask bound."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  def make_layer(self, i: int) -> Layer:
    """Layer `i` with its param name; prompt methods that run layers themselves call this."""
    return Layer(self.mlp_dim, self.num_heads, self.dropout, self.attention_dropout,
                 self.layer_norm_eps, self.dtype, name=f"layer_{i}")

  @nn.compact
  def __call__(self, x, attention_mask, *, deterministic: bool = True,
               block_hook: Optional[common.BlockHook] = None):
    # Keys at padded positions are masked for every query: (B, 1, 1, L).
    mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    for i in range(self.depth):
      layer = functools.partial(self.make_layer(i), mask=mask, deterministic=deterministic)
      x = common.run_block(i, layer, x, block_hook)
    return x


class Model(nn.Module):
  """BERT text encoder with GLIP's outputs (no pooler).

  `__call__(token_ids (B, L) int, attention_mask (B, L) int/bool, token_type_ids=None, *,
  train=False, block_hook=None)` returns dict(hidden (B, L, D), embedded (B, L, D),
  aggregate (B, D), masks (B, L) int32). Dropout is live when `train` (RNG 'dropout').
  """
  variant: str = "base"
  dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  type_vocab_size: int = 2
  dtype: Any = jnp.float32

  def encoder(self) -> Encoder:
    v = decode_variant(self.variant)
    return Encoder(v["depth"], v["mlp_dim"], v["num_heads"], self.dropout,
                   self.attention_dropout, self.layer_norm_eps, self.dtype, name="encoder")

  @nn.compact
  def __call__(self, token_ids, attention_mask, token_type_ids=None, *, train: bool = False,
               block_hook: Optional[common.BlockHook] = None):
    v = decode_variant(self.variant)
    token_ids = jnp.asarray(token_ids)
    attention_mask = jnp.asarray(attention_mask)
    if token_ids.ndim != 2 or attention_mask.shape != token_ids.shape:
      raise ValueError(f"BERT expects token_ids and attention_mask of the same shape (B, L); got "
                       f"{token_ids.shape} and {attention_mask.shape}.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(token_ids)
    elif jnp.shape(token_type_ids) != token_ids.shape:
      raise ValueError(f"token_type_ids has shape {jnp.shape(token_type_ids)}, expected "
                       f"{token_ids.shape} like token_ids.")
    x = Embeddings(v["vocab_size"], v["width"], v["max_positions"], self.type_vocab_size,
                   self.dropout, self.layer_norm_eps, self.dtype, name="embeddings")(
                       token_ids, token_type_ids, deterministic=not train)
    hidden = self.encoder()(x, attention_mask, deterministic=not train, block_hook=block_hook)
    masks = attention_mask.astype(jnp.int32)
    weights = masks.astype(hidden.dtype)[..., None]
    embedded = hidden * weights
    aggregate = embedded.sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return dict(hidden=hidden, embedded=embedded, aggregate=aggregate, masks=masks)


# ---------------------------------------------------------------------------------------------
# Pretrained weights: a transformers `BertModel` (or BertFor*) state dict, renamed by
# `convert_hf_bert` and merged strictly by `common.merge_params`.
# ---------------------------------------------------------------------------------------------

QUERY_KERNEL_NAME = "encoder/layer_0/attention/query/kernel"

# transformers names (after an optional 'bert.' prefix) outside the layers -> ours.
_HF_NAMES = {
    "embeddings.word_embeddings.weight": "embeddings/word_embeddings/embedding",
    "embeddings.position_embeddings.weight": "embeddings/position_embeddings/embedding",
    "embeddings.token_type_embeddings.weight": "embeddings/token_type_embeddings/embedding",
    "embeddings.LayerNorm.weight": "embeddings/LayerNorm/scale",
    "embeddings.LayerNorm.bias": "embeddings/LayerNorm/bias",
    "pooler.dense.weight": "pooler/dense/kernel",
    "pooler.dense.bias": "pooler/dense/bias",
}
# 'encoder.layer.{i}.<module>' -> 'encoder/layer_{i}/<module>'.
_HF_LAYER_MODULES = {
    "attention.self.query": "attention/query",
    "attention.self.key": "attention/key",
    "attention.self.value": "attention/value",
    "attention.output.dense": "attention/out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
# Entries that are not BertModel weights and are skipped: the position-id buffer of older files
# and the pretraining heads of BertForPreTraining / BertForMaskedLM ('cls.*').
_HF_SKIPPED = (r"embeddings\.position_ids", r"cls\..*")


def _hf_to_ours(name: str) -> Optional[str]:
  """transformers BERT param name -> our '/'-joined name, or None if it is not one."""
  name = name.removeprefix("bert.")
  # Original Google-converted files (bert-base-uncased's pytorch_model.bin) say gamma/beta.
  name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
  name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
  if name in _HF_NAMES:
    return _HF_NAMES[name]
  match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
  if not match or match.group(2) not in _HF_LAYER_MODULES:
    return None
  module = _HF_LAYER_MODULES[match.group(2)]
  if match.group(3) == "bias":
    leaf = "bias"
  else:
    leaf = "scale" if module.endswith("norm") else "kernel"
  return f"encoder/layer_{match.group(1)}/{module}/{leaf}"


def convert_hf_bert(state_dict: dict[str, np.ndarray], num_heads: int, *,
                    source: str = "<state dict>") -> dict[str, np.ndarray]:
  """transformers `BertModel` state dict -> our flat '/'-joined params (pure; no model needed).

  Accepts names with and without the 'bert.' prefix and LayerNorm gamma/beta; renames as in
  `_HF_NAMES`/`_HF_LAYER_MODULES`; transposes every Linear weight (out, in) -> (in, out) and splits
  heads for `vit.MultiHeadAttention`: q/k/v kernels -> (D, H, D/H), biases -> (H, D/H), the output
  kernel -> (H, D/H, D). Skips `_HF_SKIPPED`. Unknown names raise one ValueError listing them.
  """
  unknown = sorted(name for name in state_dict
                   if _hf_to_ours(name) is None
                   and not any(re.fullmatch(p, name.removeprefix("bert.")) for p in _HF_SKIPPED))
  if unknown:
    raise ValueError(f"{source}: not transformers BERT parameters ({len(unknown)}): "
                     + ", ".join(unknown))
  flat, hf_names = {}, {}
  for hf_name, value in state_dict.items():
    name = _hf_to_ours(hf_name)
    if name is None:
      continue
    if name in flat:
      raise ValueError(f"{source}: {hf_names[name]!r} and {hf_name!r} both map to {name!r} "
                       "(a file with and without the 'bert.' prefix?).")
    value = np.asarray(value)
    if name.endswith("/kernel"):
      value = value.T  # nn.Linear (out, in) -> (in, out)
    if "/attention/" in name and not name.endswith("out/bias"):
      head_axis = 0 if name.endswith("out/kernel") else value.ndim - 1
      width = value.shape[head_axis]
      if width % num_heads:
        raise ValueError(f"{source}: {hf_name} has {width} features, not divisible by "
                         f"num_heads={num_heads}.")
      value = value.reshape(value.shape[:head_axis] + (num_heads, width // num_heads)
                            + value.shape[head_axis + 1:])
    flat[name], hf_names[name] = value, hf_name
  return flat


def load(init_params: dict, path: str, *, dont_load=("pooler/.*",)) -> dict:
  """Loads transformers BERT weights (`.safetensors`/`.bin`/`.pt`/`.pth`) into `init_params`.

  `init_params` is the 'params' collection (nested); the head count is read from its query
  kernel. Merging is strict (`common.merge_params`): missing, unexpected and mis-shaped names are
  one ValueError naming `path`. Model params matching a `dont_load` regex keep their init values
  and checkpoint entries matching one are dropped; the default drops the file's pooler.
  """
  path = os.fspath(path)
  if set(init_params) == {"params"}:
    raise ValueError("bert.load takes the 'params' collection: pass variables['params'], not the "
                     "whole variables dict.")
  extension = os.path.splitext(path)[1].lower()
  if extension != ".safetensors" and extension not in common.TORCH_EXTENSIONS:
    raise ValueError(f"Cannot load BERT weights from {path!r}: unknown extension {extension!r}; "
                     f"expected '.safetensors' or one of {common.TORCH_EXTENSIONS}.")
  init = common.flatten(init_params)
  if QUERY_KERNEL_NAME not in init or np.ndim(init[QUERY_KERNEL_NAME]) != 3:
    raise ValueError(f"Cannot infer the number of heads for {path!r}: init params have no "
                     f"{QUERY_KERNEL_NAME!r} of shape (D, H, D/H).")
  num_heads = np.shape(init[QUERY_KERNEL_NAME])[1]
  loaded = convert_hf_bert(common.load_torch_state_dict(path), num_heads, source=path)
  return common.merge_params(loaded, init_params, dont_load=dont_load, source=path)


# ---------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------

GLIP_MAX_LENGTH = 256  # GLIP pads every caption to 256 tokens


def _read_vocab(vocab_path: str) -> dict[str, int]:
  vocab_path = os.fspath(vocab_path)
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"BERT vocabulary {vocab_path!r} does not exist: expected a local "
                            "vocab.txt (one token per line, e.g. bert-base-uncased's).")
  with open(vocab_path, encoding="utf-8") as f:
    tokens = [line.rstrip("\r\n") for line in f]
  vocab = {}
  for index, token in enumerate(tokens):
    vocab.setdefault(token, index)
  missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
  if missing:
    raise ValueError(f"BERT vocabulary {vocab_path!r} lacks the special tokens {missing}.")
  return vocab


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab_path: str, do_lower_case: bool, unused_mtime_ns: int = 0):
  """Built once per (file, case, modification time)."""
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = _read_vocab(vocab_path)
  kwargs = dict(do_lower_case=do_lower_case)
  if "[MASK]" not in vocab:  # only used for masked-LM; any present token keeps it valid
    kwargs["mask_token"] = "[UNK]"
  cls = getattr(transformers, "BertTokenizerFast", None) or transformers.BertTokenizer
  if "vocab" in inspect.signature(cls.__init__).parameters:  # transformers >= 5
    return cls(vocab=vocab, **kwargs)
  return cls(vocab_file=vocab_path, **kwargs)


def tokenize(vocab_path: str, texts, max_length: int = GLIP_MAX_LENGTH, *,
             do_lower_case: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (token ids, attention mask), both (len(texts), max_length) int32 numpy.

  WordPiece with transformers' BERT tokenizer built from a local `vocab.txt` (never downloaded):
  '[CLS] text [SEP]', truncated to and padded ('max_length' padding, as GLIP) with [PAD] up to
  `max_length`. `do_lower_case=True` matches bert-base-uncased.
  """
  if isinstance(texts, str):
    texts = [texts]
  if int(max_length) < 2:
    raise ValueError(f"max_length={max_length!r}: expected an integer >= 2 ([CLS] and [SEP]).")
  vocab_path = os.path.abspath(os.fspath(vocab_path))
  mtime_ns = os.stat(vocab_path).st_mtime_ns if os.path.isfile(vocab_path) else 0
  tokenizer = _tokenizer(vocab_path, bool(do_lower_case), mtime_ns)
  out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(max_length),
                  return_tensors="np")
  return (np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32))
