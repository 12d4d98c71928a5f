"""GLIP's detection-as-grounding prompts: class names -> caption -> token ids and positive maps.

GLIP (Li et al., "Grounded Language-Image Pre-training", CVPR 2022, §3.1) detects by grounding:
the C class names are joined into one caption, and a box of class c is positive for the tokens of
c's name. Follows microsoft/GLIP:

  * `maskrcnn_benchmark/data/datasets/od_to_grounding.py`: `clean_name` (drop "(...)", "_" -> " ",
    "  " -> " ") and `convert_od_to_grounding_simple` (the caption: classes in ascending label
    order joined by the separator, no trailing separator; with an ODinW caption prompt each class
    contributes prefix + name + suffix and only the name's characters are its span);
  * `maskrcnn_benchmark/data/datasets/modulated_coco.py` `create_positive_map`: a character span
    [beg, end) -> tokens char_to_token(beg) .. char_to_token(end - 1), inclusive; when a character
    falls on no token (a space) it tries beg + 1, then beg + 2, and end - 2, then end - 3;
  * `maskrcnn_benchmark/engine/inference.py` `create_queries_and_maps` / `chunks` (chunked
    evaluation, `TEST.CHUNKED_EVALUATION`): the sorted classes cut into consecutive chunks of n,
    each with its own caption and label -> token map, labels keeping their global ids.

Tokenisation is transformers' `BertTokenizerFast` built from a local WordPiece `vocab.txt` (never
downloaded; bert-base-uncased's for GLIP): '[CLS] caption [SEP]', padded with [PAD] to
`max_length` (GLIP's `MAX_QUERY_LEN` = 256). The ids equal `jaxprompt.models.bert.tokenize`'s for
the same vocabulary (this package does not import `jaxprompt`, so the tokenizer is built here).

Deliberate deviations:
  * A caption longer than `max_length` tokens is an error naming the count and suggesting
    `chunk_groundings` (GLIP truncates silently, which drops the last classes' tokens; GLIP
    issues #37, #50, #61, #140, #142).
  * A class whose span maps to no token even after the fallbacks (an empty name, say) is an error
    naming the class; GLIP skips it silently and the class can then never be detected.
  * Caption-prompt names go through `clean_name` as in GLIP's training path
    (`convert_od_to_grounding_simple`); its test path (`create_queries_and_maps`) uses them raw.
    ODinW's prompt names are already clean, so both give the same caption.
  * The class order is fixed (GLIP's `DISABLE_SHUFFLE`, set in its COCO/ODinW fine-tuning recipes
    and in SDPT); per-sample shuffling and sampled negatives of GLIP's pre-training are not here.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
import re
from typing import Sequence

import numpy as np

DEFAULT_SEPARATOR = ". "  # GLIP's DATASETS.SEPARATION_TOKENS in both GLIP yamls
DEFAULT_MAX_LENGTH = 256  # GLIP's MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PROMPT_KEYS = ("prefix", "name", "suffix")


def clean_name(name: str) -> str:
  """GLIP's `clean_name`: removes "(...)" (greedy, first "(" to last ")"), turns "_" into " " and
  each non-overlapping "  " into " ". Trailing spaces stay ("potted_plant (x)" -> "potted plant ");
  the char -> token fallbacks absorb them."""
  name = re.sub(r"\(.*\)", "", name)
  name = name.replace("_", " ")
  return name.replace("  ", " ")


def _check_prompts(caption_prompts, num_names: int) -> list[dict] | None:
  if caption_prompts is None:
    return None
  if not isinstance(caption_prompts, (list, tuple)) or len(caption_prompts) != num_names:
    raise ValueError(f"caption_prompts: expected a list of {num_names} dicts (one per class, in "
                     f"label order) with keys {PROMPT_KEYS}; got {caption_prompts!r}.")
  for index, prompt in enumerate(caption_prompts):
    if (not isinstance(prompt, dict) or set(prompt) != set(PROMPT_KEYS)
        or not all(isinstance(prompt[k], str) for k in PROMPT_KEYS)):
      raise ValueError(f"caption_prompts[{index}] = {prompt!r}: expected a dict of strings with "
                       f"exactly the keys {PROMPT_KEYS}.")
  return list(caption_prompts)


def build_caption(names: Sequence[str], separator: str = DEFAULT_SEPARATOR,
                  caption_prompts: Sequence[dict] | None = None
                  ) -> tuple[str, list[tuple[int, int]]]:
  """(caption, [(start, end) character span of each class's name]), classes in the given order.

  Without prompts the caption is clean_name(names[0]) + separator + clean_name(names[1]) + ...;
  with ODinW caption prompts (one {'prefix', 'name', 'suffix'} dict per class) each class is
  prefix + clean_name(prompt name) + suffix and its span covers the name only.
  """
  names = list(names)
  if not names or not all(isinstance(n, str) for n in names):
    raise ValueError(f"names: expected a non-empty list of class-name strings; got {names!r}.")
  prompts = _check_prompts(caption_prompts, len(names))
  caption, spans = "", []
  for index, name in enumerate(names):
    if prompts is not None:
      caption += prompts[index]["prefix"]
      name = prompts[index]["name"]
    start = len(caption)
    caption += clean_name(name)
    spans.append((start, len(caption)))
    if prompts is not None:
      caption += prompts[index]["suffix"]
    if index != len(names) - 1:
      caption += separator
  return caption, spans


@dataclasses.dataclass(frozen=True)
class Grounding:
  """A caption of class names, tokenised, and which tokens belong to which class.

  text_ids: int32 (T,) '[CLS] caption [SEP]' then [PAD]s; text_mask: int32 (T,) 1 on real tokens.
  class_token_map: float32 (C, T) binary; row c - 1 marks the tokens of contiguous label c (all
    zero for a label that is not in this caption, e.g. outside a chunk).
  caption: the text; char_spans: (start, end) of each captioned class's name in it, in label order.
  """
  text_ids: np.ndarray
  text_mask: np.ndarray
  class_token_map: np.ndarray
  caption: str
  char_spans: tuple[tuple[int, int], ...]

  @property
  def num_tokens(self) -> int:
    """Tokens of the caption, [CLS] and [SEP] included (the rest is padding)."""
    return int(self.text_mask.sum())

  def token_spans(self) -> dict[int, tuple[int, int]]:
    """label -> (first, last) token index (inclusive) for the labels in this caption."""
    spans = {}
    for row, tokens in enumerate(self.class_token_map):
      positions = np.flatnonzero(tokens)
      if positions.size:
        spans[row + 1] = (int(positions[0]), int(positions[-1]))
    return spans


class CaptionTooLongError(ValueError):
  """A caption has more tokens than the text encoder takes (GLIP would silently cut it)."""


def _read_vocab(vocab_path: str) -> dict[str, int]:
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"BERT vocabulary {vocab_path!r} does not exist: expected a local "
                            "WordPiece vocab.txt (one token per line, e.g. bert-base-uncased's).")
  with open(vocab_path, encoding="utf-8") as f:
    tokens = [line.rstrip("\r\n") for line in f]
  vocab = {}
  for index, token in enumerate(tokens):
    vocab.setdefault(token, index)
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f"BERT vocabulary {vocab_path!r} lacks the special tokens {missing}.")
  return vocab


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(vocab_path: str, do_lower_case: bool, unused_mtime_ns: int):
  import transformers  # pylint: disable=import-outside-toplevel
  vocab = _read_vocab(vocab_path)
  kwargs = dict(do_lower_case=do_lower_case)
  if "[MASK]" not in vocab:  # only used for masked-LM; any present token keeps it valid
    kwargs["mask_token"] = "[UNK]"
  cls = transformers.BertTokenizerFast
  if "vocab" in inspect.signature(cls.__init__).parameters:  # transformers >= 5
    return cls(vocab=vocab, **kwargs)
  return cls(vocab_file=vocab_path, **kwargs)


def bert_tokenizer(vocab_path: str, do_lower_case: bool = True):
  """transformers' BertTokenizerFast from a local vocab.txt; built once per file version."""
  vocab_path = os.path.abspath(os.fspath(vocab_path))
  mtime_ns = os.stat(vocab_path).st_mtime_ns if os.path.isfile(vocab_path) else 0
  return _cached_tokenizer(vocab_path, bool(do_lower_case), mtime_ns)


def _char_to_token(encoding, char_index: int):
  """The token holding character `char_index`, or None (a space, or outside the text)."""
  if char_index < 0:
    return None
  try:
    return encoding.char_to_token(char_index)
  except (IndexError, ValueError, TypeError):  # GLIP's bare except around the fallbacks
    return None


def span_to_tokens(encoding, start: int, end: int) -> tuple[int, int] | None:
  """(first, last) token index of the characters [start, end) with GLIP's fallbacks (first:
  start, start + 1, start + 2; last: end - 1, end - 2, end - 3), or None when either end maps
  to no token."""
  first = _char_to_token(encoding, start)
  if first is None:
    first = _char_to_token(encoding, start + 1)
    if first is None:
      first = _char_to_token(encoding, start + 2)
  last = _char_to_token(encoding, end - 1)
  if last is None:
    last = _char_to_token(encoding, end - 2)
    if last is None:
      last = _char_to_token(encoding, end - 3)
  if first is None or last is None:
    return None
  return first, last


def _check_max_length(max_length) -> int:
  if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
    raise ValueError(f"max_length={max_length!r}: expected an int >= 2 ([CLS] and [SEP]).")
  return max_length


def make_grounding(names: Sequence[str], vocab_path: str, max_length: int = DEFAULT_MAX_LENGTH,
                   separator: str = DEFAULT_SEPARATOR,
                   caption_prompts: Sequence[dict] | None = None, *,
                   labels: Sequence[int] | None = None, num_classes: int | None = None,
                   do_lower_case: bool = True) -> Grounding:
  """The caption of `names` tokenised, with a (num_classes, max_length) class -> token map.

  names[i] is contiguous label labels[i] (default i + 1); the map has num_classes rows (default
  len(names)), zero for labels not in `names`. A caption over `max_length` tokens is an error.
  """
  max_length = _check_max_length(max_length)
  caption, spans = build_caption(names, separator, caption_prompts)
  labels = list(range(1, len(spans) + 1)) if labels is None else [int(x) for x in labels]
  num_classes = len(spans) if num_classes is None else int(num_classes)
  if len(labels) != len(spans) or not all(1 <= x <= num_classes for x in labels):
    raise ValueError(f"labels={labels!r}: expected {len(spans)} labels in 1..{num_classes}, one "
                     "per name.")
  tokenizer = bert_tokenizer(vocab_path, do_lower_case)
  encoding = tokenizer(caption)  # no truncation: the full length decides the error below
  ids = list(encoding["input_ids"])
  if len(ids) > max_length:
    raise CaptionTooLongError(
        f"The caption of {len(spans)} classes is {len(ids)} tokens ([CLS] and [SEP] included), "
        f"more than max_length={max_length}: GLIP would silently cut the last classes. Split the "
        "classes into chunks (grounding.chunk_groundings(names, chunk_size, ...), GLIP's "
        "TEST.CHUNKED_EVALUATION) or raise max_length (at most the text encoder's positions). "
        f"Caption starts {caption[:80]!r}.")
  text_ids = np.full([max_length], tokenizer.pad_token_id, np.int32)
  text_ids[:len(ids)] = ids
  text_mask = np.zeros([max_length], np.int32)
  text_mask[:len(ids)] = 1
  class_token_map = np.zeros([num_classes, max_length], np.float32)
  for name, label, (start, end) in zip(names, labels, spans):
    tokens = span_to_tokens(encoding, start, end)
    if tokens is None or tokens[1] < tokens[0]:
      # GLIP skips such a span (ODinW-35 ChessPieces has a class named '  '): the class keeps a
      # zero row, so it is never detected and never a training target. Said, not silent.
      warnings.warn(f"Class {name!r} (label {label}): its caption characters [{start}, {end}) = "
                    f"{caption[start:end]!r} map to no token; as in GLIP it gets no tokens and "
                    "cannot be detected (check the name and the vocabulary).")
      continue
    class_token_map[label - 1, tokens[0]:tokens[1] + 1] = 1.0
  return Grounding(text_ids, text_mask, class_token_map, caption, tuple(spans))


def chunk_groundings(names: Sequence[str], chunk_size: int, vocab_path: str,
                     max_length: int = DEFAULT_MAX_LENGTH, separator: str = DEFAULT_SEPARATOR,
                     caption_prompts: Sequence[dict] | None = None, *,
                     do_lower_case: bool = True) -> list[tuple[np.ndarray, Grounding]]:
  """GLIP's chunked evaluation: [(labels int32 (k,), Grounding)] for consecutive chunks of
  `chunk_size` classes (labels 1-based, global). Each chunk's caption holds its classes only;
  its class_token_map keeps all len(names) rows, zero outside the chunk. The model runs once
  per chunk and the detections of all chunks are concatenated (no cross-chunk NMS)."""
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int (classes per chunk).")
  names = list(names)
  prompts = _check_prompts(caption_prompts, len(names))
  chunks = []
  for begin in range(0, len(names), chunk_size):
    labels = np.arange(begin + 1, min(begin + chunk_size, len(names)) + 1, dtype=np.int32)
    chunk_prompts = None if prompts is None else prompts[begin:begin + len(labels)]
    grounding = make_grounding(names[begin:begin + len(labels)], vocab_path, max_length,
                               separator, chunk_prompts, labels=labels, num_classes=len(names),
                               do_lower_case=do_lower_case)
    chunks.append((labels, grounding))
  return chunks
