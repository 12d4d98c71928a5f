"""CLIP's byte-level BPE tokenizer (Radford et al., 2021) through transformers' `CLIPTokenizer`.

Follows openai/CLIP `clip/simple_tokenizer.py` and `clip.tokenize` (`clip/clip.py`): text is
cleaned (ftfy when installed, HTML-unescaped twice, whitespace collapsed and stripped), lowercased,
split by CLIP's regex, byte-encoded and BPE-merged; each row is [SOT] + tokens + [EOT], right-padded
with 0 to the context length (77). The BPE itself runs in transformers' `CLIPTokenizer` (Rust
`tokenizers` backend), built from a local vocabulary, never downloaded:
  * a Hugging Face tokenizer folder (vocab.json + merges.txt, or tokenizer.json), or
  * OpenAI's `bpe_simple_vocab_16e6.txt.gz` (or a folder holding it). Its vocabulary is built the
    way OpenAI's tokenizer builds it: the 256 byte symbols of `bytes_to_unicode` in its order, the
    same with '</w>' appended, every merge joined, then '<|startoftext|>' and '<|endoftext|>'; the
    merges are lines 1 .. 48894 of the file (line 0 is a header). With the real file this gives
    49408 ids, SOT 49406 and EOT 49407, the largest id, so argmax(token ids) finds EOT.

Deliberate deviation: without the optional `ftfy` package, mojibake and curly quotes are not
repaired (transformers' normaliser still applies NFC); install ftfy for OpenAI's exact cleanup.
"""
from __future__ import annotations

import gzip
import html
import json
import os
import re
from typing import Sequence, Union

import numpy as np

CONTEXT_LENGTH = 77
OPENAI_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_OPENAI_MERGES = 49152 - 256 - 2  # 48894
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character map, in OpenAI's order.

  Bytes that are printable and not whitespace ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves
  and come first; the other 68 bytes, in increasing order, map to chr(256), chr(257), ...
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in set(printable)]
  mapping = {b: chr(b) for b in printable}
  mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
  return mapping


def read_openai_bpe(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenAI's `bpe_simple_vocab_16e6.txt.gz` -> (vocab {token: id}, merges [(a, b), ...])."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines[1:NUM_OPENAI_MERGES + 1] if line.strip()]
  bad = [" ".join(m) for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f"{path!r} is not a BPE merges file: lines with other than two symbols, "
                     f"e.g. {bad[:3]}.")
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += [SOT_TOKEN, EOT_TOKEN]
  return {token: i for i, token in enumerate(tokens)}, merges


def convert_openai_bpe(bpe_path: str, folder: str) -> str:
  """Writes OpenAI's BPE file as a Hugging Face tokenizer folder (vocab.json, merges.txt)."""
  vocab, merges = read_openai_bpe(bpe_path)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return folder


def clean_text(text: str) -> str:
  """OpenAI's cleanup: ftfy (if installed), HTML-unescape twice, collapse whitespace, lowercase."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip().lower()


def _load_hf_tokenizer(path: str):
  from transformers import CLIPTokenizer
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "vocab.json")) or os.path.isfile(
        os.path.join(path, "tokenizer.json")):
      return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(path, OPENAI_BPE_FILENAME)):
      path = os.path.join(path, OPENAI_BPE_FILENAME)
    else:
      raise FileNotFoundError(
          f"CLIP tokenizer folder {path!r} has neither vocab.json + merges.txt, tokenizer.json "
          f"nor {OPENAI_BPE_FILENAME}.")
  if not path.endswith(".gz"):
    raise ValueError(f"Cannot read a CLIP vocabulary from {path!r}: expected a Hugging Face "
                     f"tokenizer folder or OpenAI's {OPENAI_BPE_FILENAME}.")
  vocab, merges = read_openai_bpe(path)
  return CLIPTokenizer(vocab=vocab, merges=merges)


class Tokenizer:
  """CLIP tokenization: `Tokenizer(path)(texts, truncate=False)` -> int32 (N, context_length).

  >>> tokenize = Tokenizer('/path/to/bpe_simple_vocab_16e6.txt.gz')
  >>> tokenize(['a photo of a cat.'])[0, :8]
  array([49406,   320,  1125,   539,   320,  2368,   269, 49407], dtype=int32)
  """

  def __init__(self, path: Union[str, os.PathLike, None], *,
               context_length: int = CONTEXT_LENGTH):
    if not path:
      raise ValueError(
          "The CLIP tokenizer needs a local vocabulary: pass a Hugging Face tokenizer folder "
          f"(vocab.json + merges.txt) or OpenAI's {OPENAI_BPE_FILENAME} (or a folder holding it).")
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"CLIP vocabulary {path!r} does not exist.")
    if context_length < 2:
      raise ValueError(f"context_length must leave room for SOT and EOT; got {context_length}.")
    self.path = path
    self.context_length = context_length
    self.hf_tokenizer = _load_hf_tokenizer(path)
    vocab = self.hf_tokenizer.get_vocab()
    missing = [t for t in (SOT_TOKEN, EOT_TOKEN) if t not in vocab]
    if missing:
      raise ValueError(f"CLIP vocabulary {path!r} lacks the special tokens {missing}.")
    self.sot_token_id = vocab[SOT_TOKEN]
    self.eot_token_id = vocab[EOT_TOKEN]
    self.vocab_size = len(vocab)

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text`, without SOT/EOT."""
    return self.hf_tokenizer.encode(clean_text(text), add_special_tokens=False)

  def __call__(self, texts: Union[str, Sequence[str]], *, truncate: bool = False) -> np.ndarray:
    """[SOT] + encode(text) + [EOT], zero-padded to the context length, one row per text.

    Longer sequences raise a ValueError unless `truncate`, which keeps the first
    context_length - 1 ids and puts EOT last (as `clip.tokenize(truncate=True)`).
    """
    if isinstance(texts, str):
      texts = [texts]
    rows = np.zeros((len(texts), self.context_length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
      if len(ids) > self.context_length:
        if not truncate:
          raise ValueError(
              f"Text {i} is {len(ids)} tokens with SOT and EOT, more than the context length "
              f"{self.context_length}: {text[:80]!r}... Pass truncate=True to cut it.")
        ids = ids[:self.context_length - 1] + [self.eot_token_id]
      rows[i, :len(ids)] = ids
    return rows
