"""pp ops beyond image geometry: decoding encoded image bytes, and CLIP's BPE tokenisation of a
text key (the counterparts of google-research/big_vision `big_vision/pp/ops_image.py` `decode`
and `pp/ops_text.py`).

  decode(channels=3)                  'image' as encoded bytes (JPEG, PNG, ...) -> uint8 (H, W, C)
  clip_tokenize(vocab_path, key='caption', out='caption_tokens', context_length=77,
                truncate=True)        example[key] (a string) -> int32 (context_length,) ids

`clip_tokenize` is `jaxprompt.models.clip_tokenizer` (CLIP's own BPE, openai/CLIP
`simple_tokenizer.py` through transformers' CLIPTokenizer) run inside tf.data; the vocabulary is
loaded when the spec is built, so a missing vocabulary fails before any data flows. Sources that
tokenise on the host (LMPT's captions, `caption_tokenizer`) produce the same ids.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from input_pipeline.pp_registry import register


@register("decode")
def decode(channels: int = 3):
  """Encoded image bytes in 'image' -> uint8 (H, W, channels); decoded images pass unchanged."""
  if channels not in (1, 3):
    raise ValueError(f"channels={channels!r}: expected 1 or 3.")

  def op(example: dict) -> dict:
    image = tf.convert_to_tensor(example["image"])
    if image.dtype != tf.string:
      return example
    decoded = tf.io.decode_image(image, channels=channels, expand_animations=False)
    return {**example, "image": decoded}

  return op


@register("clip_tokenize")
def clip_tokenize(vocab_path: str, key: str = "caption", out: str = "caption_tokens",
                  context_length: int = 77, truncate: bool = True):
  """CLIP BPE ids of the text in `key`, written to `out` (see the module docstring)."""
  # The text tower's vocabulary; imported here so the image pipeline needs no tokenizer.
  from jaxprompt.models import clip_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = clip_tokenizer.Tokenizer(vocab_path, context_length=context_length)

  def tokenize(text: bytes) -> np.ndarray:
    return tokenizer([text.decode("utf-8")], truncate=truncate)[0]

  def op(example: dict) -> dict:
    if key not in example:
      raise KeyError(f"clip_tokenize reads {key!r}; the example's keys are {sorted(example)}.")
    ids = tf.numpy_function(tokenize, [example[key]], tf.int32, stateful=False)
    ids.set_shape([context_length])
    return {**example, out: ids}

  return op
