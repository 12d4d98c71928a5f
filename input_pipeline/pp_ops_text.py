"""pp ops beyond image geometry: decoding encoded image bytes, and CLIP's BPE tokenisation of a
text key (the counterparts of google-research/big_vision `big_vision/pp/ops_image.py` `decode`
and `pp/ops_text.py`).

  decode(channels=3)                  'image' as encoded bytes (JPEG, PNG, ...) -> uint8 (H, W, C)
  clip_tokenize(vocab_path, key='caption', out='caption_tokens', context_length=77,
                truncate=True, max_captions=None)
                                      example[key] (a string) -> int32 (context_length,) ids;
                                      (N,) strings -> (N, context_length); with max_captions=C
                                      -> (C, context_length), all-zero rows after the last caption
  drop(*keys)                         removes those keys from the example (the class label of a
                                      captioned source, which a captioner does not predict)
  opt_tokenize(tokenizer_path, length, key='captions', out='caption_ids', suffix='')
                                      one caption (a string or a (1,) vector: captioning's train
                                      pairs) -> int32 (length,) OPT ids, '</s>' first, cut to
                                      `length`, padded with -1

Multi-caption videos (VATEX): a test video's captions are all its queries. The original keeps
every caption and pads the caption axis: knightyxp/DGL `dataloaders/dataloader_vatex_retrieval.py`
lists every caption of a video, and `main.py` `eval_epoch` (ArrowLuo/CLIP4Clip
`main_task_retrieval.py` alike) reshapes the caption x video similarity to (video, most
captions of a video, video), padding each video's rows with -inf. So `max_captions=C` pads with
all-zero rows (id 0 is never a real row's first id, which is <|startoftext|>), giving batches a
static shape, and a video with more than C captions is an error rather than truncated
(truncating would silently drop test queries).

`clip_tokenize` is `jaxprompt.models.clip_tokenizer` (CLIP's own BPE, openai/CLIP
`simple_tokenizer.py` through transformers' CLIPTokenizer) run inside tf.data; the vocabulary is
loaded when the spec is built, so a missing vocabulary fails before any data flows. Sources that
tokenise on the host (LMPT's captions, `caption_tokenizer`) produce the same ids.

`opt_tokenize` is the captioners' decoder tokenisation (`jaxprompt.models.gpt2_tokenizer`, the
GPT-2 BPE of facebook/opt-125m's folder) as mzhaoshuai/RLCF `caption/image_llm/datasets/
coco_cap.py` (`COCOCLIPCapTrainDataset.pad_tokens`) prepares training captions: `tokenizer.encode
(caption)` ('</s>' + BPE), cut to the longest length kept, padded with -1 (the model reads the
mask as ids >= 0 and the loss ignores the padding, `jaxprompt/prompts/clipcap.py`). `suffix` is
appended to the caption first: '' as the original; the embedded demo ends its captions with the
newline, the decoding EOS, which its random tiny OPT has never seen end a sentence.
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
                  context_length: int = 77, truncate: bool = True,
                  max_captions: int | None = None):
  """CLIP BPE ids of the text (or texts) in `key`, written to `out` (see the module docstring)."""
  if max_captions is not None and (not isinstance(max_captions, int)
                                   or isinstance(max_captions, bool) or max_captions <= 0):
    raise ValueError(f"max_captions={max_captions!r}: expected a positive int (or None).")
  # The text tower's vocabulary; imported here so the image pipeline needs no tokenizer.
  from jaxprompt.models import clip_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = clip_tokenizer.Tokenizer(vocab_path, context_length=context_length)

  def tokenize(texts) -> np.ndarray:  # bytes, or an array of bytes (N,)
    texts = np.asarray(texts)
    ids = tokenizer([t.decode("utf-8") for t in texts.reshape(-1)], truncate=truncate)
    if max_captions is None:
      return ids.reshape(*texts.shape, context_length)
    if len(ids) > max_captions:
      raise ValueError(f"clip_tokenize(max_captions={max_captions}): {key!r} holds {len(ids)} "
                       f"captions; raise max_captions to at least {len(ids)} (captions are not "
                       f"dropped: each one is a retrieval query).")
    return np.pad(ids, [(0, max_captions - len(ids)), (0, 0)])

  rows = lambda texts: [max_captions] if max_captions else texts.shape.as_list()
  return _tokenize_op("clip_tokenize", key, out, tokenize,
                      lambda texts: [*rows(texts), context_length])


def _tokenize_op(name: str, key: str, out: str, tokenize, shape):
  """The op writing `tokenize(example[key])` (host numpy: a string or a vector of strings ->
  int32 ids of shape `shape(texts)`) to `out`."""

  def op(example: dict) -> dict:
    if key not in example:
      raise KeyError(f"{name} reads {key!r}; the example's keys are {sorted(example)}.")
    texts = tf.convert_to_tensor(example[key])
    if texts.dtype != tf.string or texts.shape.rank not in (0, 1):
      raise ValueError(f"{name} reads a string or a vector of strings from {key!r}; got "
                       f"{texts.dtype.name} of shape {texts.shape}.")
    ids = tf.numpy_function(tokenize, [texts], tf.int32, stateful=False)
    ids.set_shape(shape(texts))
    return {**example, out: ids}

  return op


@register("drop")
def drop(*keys: str):
  """The example without `keys` (each must be there)."""
  if not keys or not all(isinstance(k, str) for k in keys):
    raise ValueError(f"drop{keys!r}: expected one or more key names.")

  def op(example: dict) -> dict:
    missing = [k for k in keys if k not in example]
    if missing:
      raise KeyError(f"drop: the example has no {missing}; its keys are {sorted(example)}.")
    return {k: v for k, v in example.items() if k not in keys}

  return op


@register("opt_tokenize")
def opt_tokenize(tokenizer_path: str, length: int, key: str = "captions", out: str = "caption_ids",
                 suffix: str = ""):
  """OPT ids of the one caption in `key`, written to `out` (see the module docstring)."""
  if isinstance(length, bool) or not isinstance(length, int) or length < 2:
    raise ValueError(f"opt_tokenize length={length!r}: expected an int >= 2 ('</s>' and a token).")
  # Imported here so the image pipeline needs no tokenizer; a missing folder fails now.
  from jaxprompt.models import gpt2_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = gpt2_tokenizer.Tokenizer(tokenizer_path)

  def tokenize(texts) -> np.ndarray:  # bytes, or an array of one bytes string
    texts = np.asarray(texts).reshape(-1)
    if len(texts) != 1:
      raise ValueError(f"opt_tokenize reads one caption per example (captioning trains on "
                       f"(image, caption) pairs: train_pairs=True); {key!r} holds {len(texts)}.")
    ids = [tokenizer.bos_token_id, *tokenizer.encode(texts[0].decode("utf-8") + suffix)][:length]
    return np.pad(np.asarray(ids, np.int32), (0, length - len(ids)), constant_values=-1)

  return _tokenize_op("opt_tokenize", key, out, tokenize, lambda texts: [length])
