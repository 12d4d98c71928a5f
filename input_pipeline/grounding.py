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
    each with its own caption and label -> token map, labels keeping their global ids;
  * per-image captions (`CaptionSampler`), GLIP's training path for class lists whose caption
    does not fit (LVIS' 1203 names): `modulated_coco.py` `CocoGrounding.__getitem__` with
    `DATASETS.SPECIAL_SAFEGUARD_FOR_COCO_GROUNDING` ("Intended for LVIS"; the same steps as
    `coco_dt.py` `CocoDetectionTSV`, O365 pre-training) calling `od_to_grounding.py`
    `check_for_positive_overflow` then `convert_object_detection_to_grounding_optimized_for_od`
    with `control_probabilities=(0, 0, 1, 0)`, `max_num_labels=-1`, `max_seq_length =
    MAX_QUERY_LEN - 2`. Per image: (1) the image's distinct box labels, shuffled, are kept in
    that order while the running word-piece count of `clean_name(name) + ". "` stays <= 254; the
    first that would pass it and every later one are cut, with their boxes; (2)
    `RANDOM_SAMPLE_NEG` labels (85 in GLIP's and SDPT's yamls; the default -1 gives none) are
    drawn from all classes without replacement and those among the positives dropped (a cut
    positive could be drawn, but a cut leaves no room for negatives); with CONTROL_PROB's third
    entry p_full < 1 (O365's (0, 0, 0.5, 0)) the count is instead uniform in 1..85 with
    probability 1 - p_full; (3) the negatives are kept in order while 254 minus the positives'
    count (the cut one's tokens included) minus their own running count stays > 0; (4) negatives
    and positives are shuffled together and joined by the separator; each box's positive-map
    row marks its class's tokens (`create_positive_map`).

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
  * The dataset-wide caption has a fixed class order (GLIP's `DISABLE_SHUFFLE`, set in its
    COCO/ODinW fine-tuning recipes and in SDPT); per-image captions (`CaptionSampler`) shuffle.
  * `CaptionSampler` draws from a numpy Generator seeded per (seed, image) instead of Python's
    and numpy's global RNGs, so a caption is a pure function of the seed and the image (GLIP
    draws new negatives at every visit of an image; here they change with `seed` only). A caption
    that still exceeds `max_length` after tokenising (a separator that merges with the names,
    so that the per-name counts are off) is an error, where GLIP truncates.
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
DEFAULT_MAX_NEGATIVES = 85  # GLIP's DATASETS.RANDOM_SAMPLE_NEG in its and SDPT's yamls
COUNTED_SEPARATOR = ". "  # check_for_positive_overflow counts each name as clean_name + ". "
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


@dataclasses.dataclass(frozen=True)
class ImageCaption:
  """One image's sampled caption (`CaptionSampler.sample`).

  text_ids, text_mask: int32 (T,) as in `Grounding`. positive_map: float32 (n, T) binary, row i
  the tokens of box i's class in this caption (zero for a box whose class was cut).
  keep_box: bool (n,), False for the boxes of classes cut because the positives overflow (GLIP
  drops them). labels: the captioned labels in caption order; positive_labels / negative_labels:
  the kept positives and the negatives (sorted).
  """
  text_ids: np.ndarray
  text_mask: np.ndarray
  positive_map: np.ndarray
  keep_box: np.ndarray
  caption: str
  labels: tuple[int, ...]
  positive_labels: tuple[int, ...]
  negative_labels: tuple[int, ...]


def caption_rng(seed: int, image_id: int) -> np.random.Generator:
  """The Generator of image `image_id`'s caption under `seed`: the same pair, the same caption."""
  return np.random.default_rng([0x6C766973, int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFF])


class CaptionSampler:
  """GLIP's per-image training captions for a class list (module docstring, `CaptionSampler`).

  names: the C class names, label i + 1 = names[i]. max_negatives: GLIP's RANDOM_SAMPLE_NEG (0:
  positives only). full_negatives_probability: CONTROL_PROB's third entry (1.0 in GLIP's LVIS
  path, 0.5 in its O365 pre-training yamls). The word-piece count of every name is computed once.
  """

  def __init__(self, names: Sequence[str], vocab_path: str,
               max_length: int = DEFAULT_MAX_LENGTH, separator: str = DEFAULT_SEPARATOR, *,
               max_negatives: int = DEFAULT_MAX_NEGATIVES,
               full_negatives_probability: float = 1.0, do_lower_case: bool = True):
    self.names = list(names)
    if not self.names or not all(isinstance(n, str) for n in self.names):
      raise ValueError(f"names: expected a non-empty list of class-name strings; got "
                       f"{self.names[:5]!r}.")
    self.max_length = _check_max_length(max_length)
    if (not isinstance(max_negatives, (int, np.integer)) or isinstance(max_negatives, bool)
        or max_negatives < 0):
      raise ValueError(f"max_negatives={max_negatives!r}: expected an int >= 0 (negative class "
                       "names sampled per caption, GLIP's DATASETS.RANDOM_SAMPLE_NEG = 85; 0 for "
                       "none).")
    if (isinstance(full_negatives_probability, bool)
        or not isinstance(full_negatives_probability, (int, float))
        or not 0.0 <= full_negatives_probability <= 1.0):
      raise ValueError(f"full_negatives_probability={full_negatives_probability!r}: expected a "
                       "probability in [0, 1] (GLIP's CONTROL_PROB[2]).")
    if not isinstance(separator, str):
      raise ValueError(f"separator={separator!r}: expected a string such as '. '.")
    self.separator = separator
    self.max_negatives = int(max_negatives)
    self.full_negatives_probability = float(full_negatives_probability)
    self.tokenizer = bert_tokenizer(vocab_path, do_lower_case)
    # GLIP's budget counts: the word pieces of clean_name(name) + ". ", without [CLS]/[SEP].
    self.counted_lengths = np.array(
        [len(self.tokenizer.tokenize(clean_name(n) + COUNTED_SEPARATOR)) for n in self.names],
        np.int64)
    self.budget = self.max_length - 2
    tokenless = [n for n in self.names if not self.tokenizer.tokenize(clean_name(n))]
    if tokenless:
      warnings.warn(f"Classes {tokenless[:5]} have names with no token; as in GLIP they can "
                    "never be grounded (check the names and the vocabulary).")

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def _check_labels(self, box_labels) -> np.ndarray:
    labels = np.asarray(box_labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
      raise ValueError(f"box_labels: expected a 1-D integer array of labels; got dtype "
                       f"{labels.dtype}, shape {labels.shape}.")
    labels = labels.astype(np.int64)
    bad = labels[(labels < 1) | (labels > self.num_classes)]
    if bad.size:
      raise ValueError(f"box_labels {sorted(set(bad.tolist()))[:10]} are outside the contiguous "
                       f"labels 1..{self.num_classes}.")
    return labels

  def _num_negatives(self, rng: np.random.Generator) -> int:
    """GLIP's `generate_control_options_given_probabilities` with CONTROL_PROB (0, 0, p, 0)."""
    full = min(self.max_negatives, self.num_classes)
    if full == 0:  # RANDOM_SAMPLE_NEG <= 0: GLIP samples none
      return 0
    if rng.random() < self.full_negatives_probability:
      return full
    return int(rng.integers(1, full + 1))

  def sample(self, box_labels, rng: np.random.Generator) -> ImageCaption:
    """The caption of an image whose boxes have `box_labels` (contiguous, 1..C), drawn with `rng`
    (`caption_rng(seed, image_id)` for a deterministic one)."""
    labels = self._check_labels(box_labels)
    present = np.unique(labels)
    positives, length = [], 0
    for label in rng.permutation(present).tolist():
      length += int(self.counted_lengths[label - 1])
      if length > self.budget:  # GLIP's break: this label and all later ones are cut
        break
      positives.append(label)
    drawn = rng.choice(self.num_classes, size=self._num_negatives(rng), replace=False) + 1
    negatives, room = [], self.budget - length
    for label in drawn[~np.isin(drawn, present)].tolist():
      room -= int(self.counted_lengths[label - 1])
      if room <= 0:
        break
      negatives.append(label)
    order = [int(x) for x in rng.permutation(np.array(negatives + positives, np.int64))]
    caption, spans = (build_caption([self.names[l - 1] for l in order], self.separator)
                      if order else ("", []))
    encoding = self.tokenizer(caption)
    ids = list(encoding["input_ids"])
    if len(ids) > self.max_length:
      raise CaptionTooLongError(
          f"A sampled caption is {len(ids)} tokens, more than max_length={self.max_length}, "
          f"though its names' counts fit: the separator {self.separator!r} does not tokenise "
          f"apart from the names. Caption starts {caption[:80]!r}.")
    text_ids = np.full([self.max_length], self.tokenizer.pad_token_id, np.int32)
    text_ids[:len(ids)] = ids
    text_mask = np.zeros([self.max_length], np.int32)
    text_mask[:len(ids)] = 1
    token_rows = {}
    for label, (start, end) in zip(order, spans):
      tokens = span_to_tokens(encoding, start, end)
      row = np.zeros([self.max_length], np.float32)
      if tokens is not None and tokens[1] >= tokens[0]:  # else GLIP skips it too
        row[tokens[0]:tokens[1] + 1] = 1.0
      token_rows[label] = row
    kept = set(positives)
    keep_box = np.array([l in kept for l in labels.tolist()], bool)
    positive_map = np.zeros([len(labels), self.max_length], np.float32)
    for i, label in enumerate(labels.tolist()):
      if label in kept:
        positive_map[i] = token_rows[label]
    return ImageCaption(text_ids, text_mask, positive_map, keep_box, caption, tuple(order),
                        tuple(sorted(positives)), tuple(sorted(negatives)))
