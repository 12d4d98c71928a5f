"""Image captioning: beam-search captions of every image of a split, scored by the COCO caption
metrics against the data source's references.

Follows mzhaoshuai/RLCF `caption/predictions.py` (one caption per image: 5-beam search after the
mapped prefix and '</s>', at most 50 new tokens, EOS the newline token, decoded without special
tokens and stripped, `caption/image_llm/models/generate_opt.py`) and `caption/tools/coco_eval.py`
(pycocoevalcap's COCOEvalCap over {image id: caption} and the references), through
`caption_metrics.score_captions`:

  config.evals.test = dict(type='captioning', split='test')

Metrics: 'Bleu_1'..'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr' (and 'SPICE' where its models are
installed; `metrics` picks groups, `tokenizer` 'ptb' (Java, the standard) or 'simple'), and
'examples' (images captioned). The method exports 'caption_beams' and 'caption_tokenizer'
(`jaxprompt/prompts/clipcap.py`); the source exports `image_ids(split)` and `references(split)`
(`input_pipeline/karpathy.py`, `nocaps.py`, `embedded_captions.py`). Examples of one image (a
split of (image, caption) pairs) are captioned once each and the first caption kept.
"""
from __future__ import annotations

from typing import Optional, Sequence

from jaxprompt.evaluators import caption_metrics, common

NUM_BEAMS, MAX_NEW_TOKENS = 5, 50  # RLCF predictions.py / generate_opt.py


def check_captioned(type_name: str, source, metrics: Optional[Sequence[str]],
                    tokenizer: str) -> list[str]:
  """What every captioning evaluator checks at build time: the PTB or simple `tokenizer`, a
  source with image ids and references; returns the metric groups (`resolve_metrics`)."""
  if tokenizer not in ("ptb", "simple"):
    raise ValueError(f"tokenizer={tokenizer!r}: expected 'ptb' or 'simple'.")
  missing = [f for f in ("image_ids", "references") if not hasattr(source, f)]
  if missing:
    raise ValueError(f"Data source {source.name!r} has no {missing}: the {type_name!r} evaluator "
                     "needs a captioned source (image ids and reference captions).")
  return caption_metrics.resolve_metrics(None if metrics is None else tuple(metrics))


def scored_names(groups: Sequence[str]) -> tuple[str, ...]:
  """The metric names `caption_metrics.score_captions` reports for metric `groups`."""
  names = {"bleu": tuple(f"Bleu_{n}" for n in range(1, 5)), "meteor": ("METEOR",),
           "rouge": ("ROUGE_L",), "cider": ("CIDEr",), "spice": ("SPICE",)}
  return tuple(n for group in groups for n in names[group])


@common.register("captioning")
class CaptioningEvaluator(common.Evaluator):
  """COCO caption metrics of 5-beam captions on `split` (module docstring)."""
  NEEDS = ("caption_beams", "caption_tokenizer")

  def __init__(self, ctx: common.EvalContext, *, split: str, num_beams: int = NUM_BEAMS,
               max_new_tokens: int = MAX_NEW_TOKENS, metrics: Optional[Sequence[str]] = None,
               tokenizer: str = "ptb"):
    super().__init__(ctx, split=split)
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1.")
    self.metrics = check_captioned(self.TYPE, ctx.source, metrics, tokenizer)
    self.tokenizer = tokenizer
    self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
    self._caption_tokenizer = ctx.predict_fns["caption_tokenizer"]()
    beams_fn = ctx.predict_fns["caption_beams"]
    eos = self._caption_tokenizer.newline_token_id

    def step(variables, batch):
      out = beams_fn(variables, batch["image"], num_beams=num_beams,
                     max_new_tokens=max_new_tokens, eos_token_id=eos)
      return out["tokens"][:, 0], out["lengths"][:, 0], batch["_mask"]

    self._step = self.jit(step, key="step")

  def metric_names(self) -> tuple[str, ...]:
    return scored_names(self.metrics) + ("examples",)

  def captions(self, variables) -> list[str]:
    """The best beam's caption of every example of the split, in order."""
    tokens, lengths = common.gather(self, self._step, self.ctx.batches(self.split), variables,
                                    keys=("image",))
    decode = self._caption_tokenizer.decode
    return [decode(row[:length]) for row, length in zip(tokens, lengths)]

  def run(self, variables) -> dict[str, float]:
    captions = self.captions(variables)
    image_ids = self.ctx.source.image_ids(self.split)
    if len(image_ids) != len(captions):
      raise ValueError(f"Split {self.split!r}: {len(captions)} captioned examples but "
                       f"{len(image_ids)} image ids.")
    candidates = {}
    for image_id, caption in zip(image_ids, captions):
      candidates.setdefault(image_id, caption)
    scores = caption_metrics.score_captions(candidates, self.ctx.source.references(self.split),
                                            metrics=self.metrics, tokenizer=self.tokenizer)
    return {**scores, "examples": len(candidates)}
