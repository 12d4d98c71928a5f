"""CoOp (Zhou et al., IJCV 2022, "Learning to Prompt for Vision-Language Models", arXiv 2109.01134):
learned context vectors in front of (or around) each class name, on a frozen CLIP.

Follows KaiyangZhou/CoOp `trainers/coop.py` (`PromptLearner`, `TextEncoder`, `CustomCLIP`)
(paper §3.2):

  * the context `prompt_learner/ctx` is the only trained tensor: (n_ctx, W) shared by all classes,
    or (num_classes, n_ctx, W) class-specific (`csc=True`); drawn from N(0, 0.02²), or, with
    `ctx_init` (e.g. "a photo of a"), the token embeddings of those words, n_ctx then being their
    token count (shared context only, as in CoOp);
  * the prompt of class c is a sequence of token embeddings
      end:    [SOS][ctx_1..ctx_M][name_c][.][EOT][pad]
      middle: [SOS][ctx_1..ctx_M/2][name_c][ctx_M/2+1..ctx_M][.][EOT][pad]
      front:  [SOS][name_c][ctx_1..ctx_M][.][EOT][pad]
    whose fixed tokens come from the CLIP token embedding (class names with '_' -> ' '); CLIP's
    text tower runs on these embeddings and pools at the EOT position;
  * logits = exp(logit_scale) · cos(image feature, text feature), cross-entropy loss; CLIP
    (including the logit scale) is frozen.

Prompts are built from *segments* (`build_layout`): text pieces, tokenised and frozen, and row
ranges of named context blocks. CoOp's three layouts are one-block instances; RPL's
[SOS][ctx1][name][ctx2][description][.][EOT] is the same machinery with two blocks
(`PromptLearner` holds any number of blocks), and both share `PromptCLIP`, which differs per method
only in `build_prompts` (`prompts/rpl.py`).

Tokenisation as the originals: CoOp (`PromptLearner.__init__`), LMPT (`lmpt/coop_model.py`, the
same code) and RPL `clip.tokenize` the whole prompt string, e.g. 'X X X X {name}.', once, so a
name ending in punctuation merges with the final '.' wherever CLIP's BPE has that merge
(')' + '.' -> ').', id 1818 in OpenAI's vocabulary). Hence the text between two contexts is one
string, encoded once (adjacent text segments are joined before encoding); a context, the 'X'
words of the originals, is whitespace-separated from its neighbours, and CLIP's pre-tokeniser
never merges across whitespace, so the fixed ids equal those of the whole string. CoOp's
'middle' and 'front' cut the whole string's tokens of '{name}.' after `len(encode(name))` ids
(its `name_lens`), which `coop_segments` reproduces with `Tokens` segments.

Deliberate deviations:
  * fp32 throughout (CoOp's default runs CLIP and the context in fp16); `compute_dtype` may be
    bfloat16, the context stays fp32.
  * With `ctx_init`, n_ctx is the init text's token count (CoOp: its word count, which equals the
    token count whenever each word is one BPE token, the only case CoOp's slicing handles).
  * The text tower runs on the first max(EOT)+1 positions instead of all 77: the causal mask makes
    the EOT features identical, it is only cheaper.
ResNet image towers (RN50 ...) run on their frozen BatchNorm running statistics: CoOp registers
only the prompt learner with Dassl, so the CLIP that `clip.load` put in `eval()` stays in eval
mode while the context trains (LMPT differs, see `lmpt.py`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxprompt import method
from jaxprompt.models import clip, clip_tokenizer, common

# Parameters that train; everything else (CLIP, logit scale included) is frozen.
TRAINABLE_PARAMS = r"prompt_learner/.*"
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
CONTEXT_INIT_STD = 0.02


@functools.lru_cache(maxsize=8)
def get_tokenizer(vocab_path: str, context_length: int = 77) -> clip_tokenizer.Tokenizer:
  """A cached `clip_tokenizer.Tokenizer` (loading one takes about a second)."""
  if not vocab_path:
    raise ValueError("CLIP prompt methods need a tokenizer vocabulary: set config.model.vocab_path "
                     "to OpenAI's bpe_simple_vocab_16e6.txt.gz or a Hugging Face tokenizer folder.")
  return clip_tokenizer.Tokenizer(vocab_path, context_length=context_length)


# ------------------------------------------------------------------------------------------------
# Prompt layout: which position of which class holds a fixed token and which a learned vector.


@dataclasses.dataclass(frozen=True)
class ContextBlock:
  """A learned context tensor `prompt_learner/<name>`: (length, W), or (num_classes, length, W)
  when class-specific; initialised from the embeddings of `init_ids` when given, else
  N(0, 0.02²)."""
  name: str
  length: int
  class_specific: bool = False
  init_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Context:
  """A prompt segment: rows [start, stop) of context block `block` (of the prompt's own class
  when the block is class-specific)."""
  block: str
  start: int
  stop: int


@dataclasses.dataclass(frozen=True)
class Tokens:
  """A prompt segment of fixed, already tokenised ids (a cut of a string tokenised as a whole)."""
  ids: tuple[int, ...]


# A str is text, tokenised without SOT/EOT and frozen; adjacent strs are joined and tokenised as
# one string, as the originals tokenise the whole prompt (see the module docstring).
Segment = Union[str, Context, Tokens]


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """Per-class prompt sequences of length L = the context length (77 for CLIP).

  token_ids: (N, L) int32, SOT, the fixed tokens, EOT and 0-padding; 0 at context positions.
  context_index: (N, L) int32, the row of the flattened context table (blocks in order, each
    flattened row-major) at context positions, -1 elsewhere.
  eot_index: (N,) int32, the EOT position of each prompt.
  """
  token_ids: np.ndarray
  context_index: np.ndarray
  eot_index: np.ndarray

  @property
  def length(self) -> int:
    """Positions the text tower needs: everything up to the last EOT (causal attention)."""
    return int(self.eot_index.max()) + 1


def build_layout(tokenizer, prompts: Sequence[Sequence[Segment]],
                 blocks: Sequence[ContextBlock]) -> PromptLayout:
  """Lays out one prompt per class, [SOT] + segments + [EOT], zero-padded to the context length.

  `prompts[c]` is the segment list of class c; a `Context` segment names a block of `blocks`.
  Each run of adjacent str segments is joined ('' separator) and encoded once, so the ids equal
  those of the whole prompt string (module docstring); `Tokens` segments are used as they are.
  Raises a ValueError naming the prompt when it does not fit the tokenizer's context length.
  """
  by_name = {block.name: block for block in blocks}
  offsets = np.cumsum([0] + [b.length * (len(prompts) if b.class_specific else 1)
                             for b in blocks])
  offset = dict(zip(by_name, offsets[:-1].tolist()))
  length = tokenizer.context_length
  token_ids = np.zeros((len(prompts), length), np.int32)
  context_index = np.full((len(prompts), length), -1, np.int32)
  eot_index = np.zeros((len(prompts),), np.int32)
  for c, segments in enumerate(prompts):
    ids, rows = [tokenizer.sot_token_id], [-1]
    for segment in _join_text(segments):
      if isinstance(segment, (str, Tokens)):
        text_ids = tokenizer.encode(segment) if isinstance(segment, str) else list(segment.ids)
        ids += text_ids
        rows += [-1] * len(text_ids)
        continue
      block = by_name.get(segment.block)
      if block is None:
        raise ValueError(f"Prompt {c} uses context block {segment.block!r}; blocks: "
                         f"{list(by_name)}.")
      if not 0 <= segment.start <= segment.stop <= block.length:
        raise ValueError(f"Prompt {c}: rows [{segment.start}, {segment.stop}) are outside block "
                         f"{block.name!r} of length {block.length}.")
      first = offset[block.name] + (c * block.length if block.class_specific else 0)
      ids += [0] * (segment.stop - segment.start)
      rows += list(range(first + segment.start, first + segment.stop))
    ids.append(tokenizer.eot_token_id)
    rows.append(-1)
    if len(ids) > length:
      text = " ".join(s if isinstance(s, str) else f"<{s.block}[{s.start}:{s.stop}]>"
                      if isinstance(s, Context) else f"<ids {list(s.ids)}>" for s in segments)
      raise ValueError(f"Prompt {c} ({text!r}) is {len(ids)} tokens with SOT, context and EOT, "
                       f"more than the context length {length}; shorten the class name or the "
                       f"context.")
    token_ids[c, :len(ids)] = ids
    context_index[c, :len(rows)] = rows
    eot_index[c] = len(ids) - 1
  return PromptLayout(token_ids, context_index, eot_index)


def _join_text(segments: Sequence[Segment]) -> list[Segment]:
  """`segments` with every run of adjacent str segments joined into one str."""
  joined = []
  for segment in segments:
    if isinstance(segment, str) and joined and isinstance(joined[-1], str):
      joined[-1] += segment
    else:
      joined.append(segment)
  return joined


class PromptLearner(nn.Module):
  """Owns the context blocks and writes them into the fixed token embeddings of a layout."""
  blocks: Sequence[ContextBlock]
  num_classes: int

  @nn.compact
  def __call__(self, token_embeddings, context_index, word_embeddings=None):
    """token_embeddings: (N, L, W) embeddings of the layout's token ids; context_index: (N, L);
    word_embeddings: {block name: (length, W)}, the init of blocks with `init_ids`.
    Returns the prompt embeddings (N, L, W)."""
    width = token_embeddings.shape[-1]
    tables = []
    for block in self.blocks:
      shape = ((self.num_classes, block.length, width) if block.class_specific
               else (block.length, width))
      if block.init_ids:
        init = lambda _, shape, name=block.name: jnp.broadcast_to(
            word_embeddings[name], shape).astype(jnp.float32)
      else:
        init = nn.initializers.normal(CONTEXT_INIT_STD)
      tables.append(self.param(block.name, init, shape).reshape(-1, width))
    table = jnp.concatenate(tables).astype(token_embeddings.dtype)  # (rows, W)
    index = jnp.asarray(context_index)
    learned = table[jnp.maximum(index, 0)]  # (N, L, W)
    return jnp.where(index[..., None] >= 0, learned, token_embeddings)


# ------------------------------------------------------------------------------------------------
# CoOp.


def coop_segments(class_name: str, n_ctx: int, position: str, tokenizer) -> list[Segment]:
  """CoOp's prompt of one class around context block 'ctx' (see the module docstring).

  As `PromptLearner.__init__` of CoOp: the fixed ids are those of '{name}.' tokenised as part of
  'X X X X {name}.' (one string, so ')' and '.' may merge), and 'middle'/'front' put the context
  after the first `len(encode(name))` of them (CoOp's `name_lens`: the name encoded alone).
  """
  if position not in CLASS_TOKEN_POSITIONS:
    raise ValueError(f"class_token_position={position!r}: expected one of "
                     f"{CLASS_TOKEN_POSITIONS}.")
  if position == "end":
    return [Context("ctx", 0, n_ctx), class_name, "."]
  ids = tuple(tokenizer.encode(f"{class_name}."))
  name_len = len(tokenizer.encode(class_name))
  name, suffix = Tokens(ids[:name_len]), Tokens(ids[name_len:])
  if position == "middle":
    half = n_ctx // 2
    return [Context("ctx", 0, half), name, Context("ctx", half, n_ctx), suffix]
  return [name, Context("ctx", 0, n_ctx), suffix]


@functools.lru_cache(maxsize=16)
def coop_prompts(vocab_path: str, context_length: int, class_names: tuple[str, ...], n_ctx: int,
                 ctx_init: str, csc: bool,
                 position: str) -> tuple[PromptLayout, tuple[ContextBlock, ...]]:
  """(layout, blocks) of CoOp's prompts for `class_names`."""
  tokenizer = get_tokenizer(vocab_path, context_length)
  init_ids = ()
  if ctx_init:
    if csc:
      raise ValueError("ctx_init initialises a shared context; CoOp has no word init for "
                       "class-specific contexts (csc=True). Unset one of them.")
    init_ids = tuple(tokenizer.encode(ctx_init.replace("_", " ")))
    if not init_ids:
      raise ValueError(f"ctx_init={ctx_init!r} has no tokens.")
    n_ctx = len(init_ids)
  if n_ctx < 1:
    raise ValueError(f"n_ctx must be >= 1; got {n_ctx}.")
  blocks = (ContextBlock("ctx", n_ctx, class_specific=csc, init_ids=init_ids),)
  names = [name.replace("_", " ") for name in class_names]
  layout = build_layout(tokenizer, [coop_segments(n, n_ctx, position, tokenizer) for n in names],
                        blocks)
  return layout, blocks


def clip_config(variant: str, dtype) -> dict:
  """`clip.Model` fields of a released (or tiny) CLIP variant, ViT or ResNet."""
  return dict(clip.decode_variant(variant), dtype=dtype)


class PromptCLIP(nn.Module):
  """CLIP with learned prompts, the part CoOp and RPL share. Returns `(logits (B, num_classes),
  aux)`; aux holds the normalised 'image_features' (B, E) and 'text_features' (num_classes, E).

  A subclass adds its settings and `build_prompts()` -> (layout, blocks), the class prompts and
  their context blocks. Param tree: `clip/...` (`clip.Model`, frozen) and `prompt_learner/<block>`.
  """
  num_classes: int
  class_names: Sequence[str] = ()
  variant: str = "ViT-B/16"
  vocab_path: str = ""
  dtype: Any = jnp.float32
  METHOD = "PromptCLIP"  # the method's name in error messages (a class constant, not a field)

  def build_prompts(self) -> tuple[PromptLayout, tuple[ContextBlock, ...]]:
    raise NotImplementedError

  def setup(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(
          f"{self.METHOD} needs one class name per class: got {len(self.class_names)} names for "
          f"{self.num_classes} classes (the data source provides `class_names`, or set "
          f"config.model.class_names).")
    self.clip = clip.Model(**clip_config(self.variant, self.dtype))
    self.layout, blocks = self.build_prompts()
    self.prompt_learner = PromptLearner(blocks, self.num_classes)

  def prompt_embeddings(self):
    """(num_classes, L, W) prompt token embeddings, L = `layout.length` (up to the last EOT)."""
    layout, length = self.layout, self.layout.length
    fixed = self.clip.embed_tokens(jnp.asarray(layout.token_ids[:, :length]))
    words = {b.name: self.clip.embed_tokens(jnp.asarray(b.init_ids))
             for b in self.prompt_learner.blocks if b.init_ids}
    return self.prompt_learner(fixed, layout.context_index[:, :length], words)

  def encode_prompts(self):
    """The normalised text features of every class prompt, (num_classes, E)."""
    return clip.normalize(self.clip.encode_text_embeddings(self.prompt_embeddings(),
                                                           self.layout.eot_index))

  def encode_images(self, images, *, train: bool = False):
    """The normalised image features (B, E); `train` only moves a ResNet tower's BatchNorm."""
    return clip.normalize(self.clip.encode_image(images, train=train))

  def class_logits(self, image_features, text_features):
    """exp(logit_scale) · cos: normalised (B, E) image and (C, E) class features -> (B, C).
    With `encode_images` and `encode_prompts` the whole evaluation forward, so a server can
    compute each task's class features once (`jaxprompt/serve.py`)."""
    return jnp.exp(self.clip.logit_scale) * image_features @ text_features.T

  def __call__(self, images, *, train: bool = False):
    del train  # the CLIP stays in eval mode (ResNet BatchNorm on running statistics)
    image_features = self.encode_images(images)
    text_features = self.encode_prompts()
    logits = self.class_logits(image_features, text_features)
    return logits, {"image_features": image_features, "text_features": text_features}


class Model(PromptCLIP):
  """CoOp on CLIP (`PromptCLIP` with one context block `prompt_learner/ctx`)."""
  METHOD = "CoOp"
  n_ctx: int = 16
  ctx_init: str = ""
  csc: bool = False
  class_token_position: str = "end"

  def __post_init__(self):
    common.require(self, n_ctx=(self.n_ctx >= 1, "an integer >= 1"),
                   class_token_position=(self.class_token_position in ("end", "middle", "front"),
                                         "'end', 'middle' or 'front'"))
    super().__post_init__()

  def build_prompts(self):
    return coop_prompts(self.vocab_path, self.clip.context_length, tuple(self.class_names),
                        self.n_ctx, self.ctx_init, self.csc, self.class_token_position)


def clip_predict_fns(model: PromptCLIP, unused_config=None) -> dict:
  """The frozen CLIP inside a `PromptCLIP` model (CoOp, RPL, LMPT) as the evaluators' predict
  functions (`jaxprompt/evaluators/common.py`): 'embed_image' (variables, images) -> (B, E) and
  'embed_text' (variables, token ids (N, L)) -> (N, E), both L2-normalised float32;
  'logit_scale' (variables) -> exp(clip/logit_scale); 'tokenize' (list of str) -> int32 (N, 77),
  host-side, with the model's vocabulary. `variables` = {'params': {'clip': ..., ...}, and for a
  ResNet tower 'batch_stats': {'clip': ...}} (used in eval mode)."""
  tower = clip.Model(**clip_config(model.variant, model.dtype))

  def apply(variables, inputs, method):
    clip_variables = {c: tree["clip"] for c, tree in variables.items() if "clip" in tree}
    features = tower.apply(clip_variables, inputs, method=method)
    return clip.normalize(features.astype(jnp.float32))

  def tokenize(texts):  # the tokenizer loads on first use
    tokenizer = get_tokenizer(model.vocab_path, tower.context_length)
    return np.asarray(tokenizer(list(texts)), np.int32)

  return {"embed_image": lambda variables, images: apply(variables, images,
                                                         clip.Model.encode_image),
          "embed_text": lambda variables, ids: apply(variables, ids, clip.Model.encode_text),
          "logit_scale": lambda variables: jnp.exp(variables["params"]["clip"]["logit_scale"]),
          "tokenize": tokenize}


def load_clip(variables, path: str):
  """CLIP weights (see `clip.load`) into the `clip` subtree of every collection of `variables`
  (params, and BatchNorm statistics for ResNet towers); the rest is returned unchanged."""
  loaded = clip.load({c: tree["clip"] for c, tree in variables.items() if "clip" in tree}, path)
  return {c: {**tree, "clip": loaded[c]} if c in loaded else tree for c, tree in variables.items()}


def load(variables, path: str):
  """Loads CLIP weights (`load_clip`); the context keeps its init, except that context rows
  initialised from words (`ctx_init`) are re-read from the loaded token embedding: a row equal to
  row i of the initial table becomes row i of the loaded one."""
  loaded_variables = load_clip(variables, path)
  init_params = variables["params"]
  loaded = loaded_variables["params"]["clip"]
  init_table = np.asarray(init_params["clip"]["token_embedding"]["embedding"])
  new_table = np.asarray(loaded["token_embedding"]["embedding"])

  def reread_words(ctx):
    rows = np.array(ctx).reshape(-1, ctx.shape[-1])
    for r, row in enumerate(rows):
      candidates = np.flatnonzero(init_table[:, 0] == row[0])
      match = [i for i in candidates if np.array_equal(init_table[i], row)]
      if match:
        rows[r] = new_table[match[0]]
    return rows.reshape(ctx.shape)

  contexts = {name: reread_words(ctx) for name, ctx in init_params["prompt_learner"].items()}
  return {**loaded_variables, "params": {**loaded_variables["params"],
                                         "prompt_learner": contexts}}


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, loaders={"model": load},
                       predict_fns=clip_predict_fns)
