"""GPT-2 byte-level BPE tokenisation as OPT uses it, and a tiny generated vocabulary for demos.

OPT (Zhang et al. 2022, §2.1) reuses GPT-2's byte-level BPE (Radford et al. 2019) with its four
special tokens first: '<s>' 0, '<pad>' 1, '</s>' 2, '<unk>' 3. RLCF (mzhaoshuai/RLCF
`caption/capdec_tta.py`, `caption/image_llm/models/generate_opt.py`) tokenizes with
`AutoTokenizer.from_pretrained('facebook/opt-125m', use_fast=False)`, i.e. transformers'
`GPT2Tokenizer` configured by opt-125m's tokenizer_config.json (add_bos_token, bos = eos = unk =
'</s>', pad = '<pad>', right padding): every text starts with '</s>' (id 2), `padding=True` pads
right with id 1 to the longest text, and captions end at the newline token ('\\n', 'Ċ'), which
`generate` uses as EOS; decoded captions drop special tokens and are stripped.

`Tokenizer` builds that `GPT2Tokenizer` from a local folder with vocab.json + merges.txt (never
downloaded; nothing here requires the folder to exist until a Tokenizer is made) and adds the BOS
and padding itself, so the behaviour does not depend on a tokenizer_config.json.
`write_tiny_vocabulary` writes such a folder for demos and tests: OPT's four special tokens, the
256 byte symbols (so any text, non-ASCII included, tokenizes), and merges that make each given word
(with and without its leading space 'Ġ') one token.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence, Union

import numpy as np

from jaxprompt.models.clip_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0 .. 3, as facebook/opt-125m's vocab
BOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"


def _read_folder(folder: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  paths = [os.path.join(folder, name) for name in (VOCAB_FILE, MERGES_FILE)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"GPT-2/OPT tokenizer folder {folder!r} lacks {missing}: expected "
                            f"{VOCAB_FILE} and {MERGES_FILE} (e.g. facebook/opt-125m's).")
  with open(paths[0], encoding="utf-8") as f:
    vocab = json.load(f)
  if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
    raise ValueError(f"{paths[0]!r} is not a {{token: id}} JSON object.")
  with open(paths[1], encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
  bad = [" ".join(m) for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f"{paths[1]!r} is not a BPE merges file: lines with other than two "
                     f"symbols, e.g. {bad[:3]}.")
  return vocab, merges


class Tokenizer:
  """OPT's GPT-2 tokenisation from a vocab.json + merges.txt folder.

  `Tokenizer(folder)(texts) -> (ids, mask)`, both int32 (N, L): '</s>' + BPE(text), right-padded
  with '<pad>' to the longest row (or to `length`). `decode(ids)` -> the text without special
  tokens, stripped. `newline_token_id` is the captioners' EOS.
  """

  def __init__(self, folder: Union[str, os.PathLike]):
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"GPT-2/OPT tokenizer folder {folder!r} does not exist.")
    vocab, merges = _read_folder(folder)
    missing = [t for t in (BOS_TOKEN, PAD_TOKEN) if t not in vocab]
    if missing:
      raise ValueError(f"{os.path.join(folder, VOCAB_FILE)!r} lacks OPT's special tokens "
                       f"{missing}.")
    from transformers import GPT2Tokenizer  # pylint: disable=g-import-not-at-top
    self.hf_tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=BOS_TOKEN,
                                      bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
                                      pad_token=PAD_TOKEN)
    self.folder = folder
    self.vocab_size = max(vocab.values()) + 1
    self.bos_token_id = vocab[BOS_TOKEN]
    self.pad_token_id = vocab[PAD_TOKEN]
    newline = self.encode("\n")
    if len(newline) != 1:
      raise ValueError(f"Vocabulary {folder!r} does not encode '\\n' as one token (got "
                       f"{newline}); the captioners use it as EOS.")
    self.newline_token_id = newline[0]

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text`, without special tokens."""
    return self.hf_tokenizer.encode(text, add_special_tokens=False)

  def __call__(self, texts: Union[str, Sequence[str]], *, length: int | None = None):
    """(ids, mask) int32 (N, L): [BOS] + encode(text), right-padded with the pad id; L is the
    longest row or `length` (a longer row is a ValueError naming it)."""
    if isinstance(texts, str):
      texts = [texts]
    rows = [[self.bos_token_id, *self.encode(text)] for text in texts]
    width = max((len(r) for r in rows), default=1) if length is None else int(length)
    ids = np.full((len(rows), width), self.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      if len(row) > width:
        raise ValueError(f"Text {i} is {len(row)} tokens with BOS, more than length={width}: "
                         f"{texts[i][:80]!r}.")
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask

  def decode(self, token_ids: Iterable[int]) -> str:
    """Text of `token_ids` without special tokens, stripped (RLCF's captions)."""
    ids = [int(t) for t in token_ids]
    return self.hf_tokenizer.decode(ids, skip_special_tokens=True).strip()


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """BPE: merge the adjacent pair of lowest rank until none is a merge."""
  while len(symbols) > 1:
    rank, i = min((ranks.get(pair, len(ranks)), i)
                  for i, pair in enumerate(zip(symbols, symbols[1:])))
    if rank == len(ranks):
      break
    symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
  return symbols


def write_tiny_vocabulary(folder: Union[str, os.PathLike], words: Iterable[str]) -> str:
  """Writes a byte-level BPE vocab.json + merges.txt to `folder` in which every word of `words`
  ('circle', 'red', ...) and 'Ġ' + word (the word after a space) is one token. Ids: OPT's special
  tokens 0 .. 3, the 256 byte symbols, then one token per merge. Returns `folder`.

  Each word joins the pieces the merges so far leave of it, left to right, with new merges; a new
  merge ranks after all others, so it never splits a word that was already one token.
  """
  byte_symbols = bytes_to_unicode()
  tokens = list(SPECIAL_TOKENS) + [byte_symbols[b] for b in range(256)]
  known, ranks = set(tokens), {}
  for word in dict.fromkeys(words):
    if not word or any(c.isspace() for c in word):
      raise ValueError(f"Vocabulary word {word!r}: expected a non-empty word without spaces.")
    for text in (word, " " + word):
      pieces = _apply_merges([byte_symbols[b] for b in text.encode("utf-8")], ranks)
      merged = pieces[0]
      for piece in pieces[1:]:
        ranks[(merged, piece)] = len(ranks)
        merged += piece
        if merged not in known:
          tokens.append(merged)
          known.add(merged)
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, VOCAB_FILE), "w", encoding="utf-8") as f:
    json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(folder, MERGES_FILE), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
  return folder
