"""Image captioning with RLCF test-time adaptation (`prompts/rlcf_captioning.py`): the COCO caption
metrics of the unadapted captioner and of the per-image adapted one, on the same images.

Follows mzhaoshuai/RLCF `caption/capdec_tta.py` (every test image adapted, then captioned with 5
beams and lower-cased; the results json scored by `caption/tools/coco_eval.py`, pycocoevalcap)
and `clipscore/clipscore.py` (CLIP-S and RefCLIP-S of the final captions, Hessel et al. 2021):

  config.evals.test = dict(type='tta_captioning', split='test', num_samples=10, lr=2e-6)

Metrics: as the `captioning` evaluator ('Bleu_1'..'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'
where installed; `metrics`, `tokenizer`), then 'CLIP-S' and 'RefCLIP-S' (`clip_scores=True`), each
for the adapted captions and, prefixed 'zeroshot_', for the unadapted captioner's 5-beam captions
of the same images (the paper's "before" row); 'examples' (images). The split's batches carry
'image' (B, S, S, 3) CLIP-normalised at the policy's size; the source exports `image_ids(split)`
and `references(split)`. A batch's B images adapt together (`batched`, vmapped) or one by one;
padding rows of the last batch are adapted and dropped.

Deviation: CLIP-S / RefCLIP-S are computed with the first reward CLIP ('reward_0', ViT-L/14 in the
RLCF scripts), not with clipscore.py's ViT-B/32, which is not part of the model.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import numpy as np

from jaxprompt.evaluators import caption_metrics, captioning, common
from jaxprompt.prompts import rlcf, rlcf_captioning, tpt


@common.register("tta_captioning")
class TtaCaptioningEvaluator(common.Evaluator):
  """Caption metrics before ('zeroshot_*') and after RLCF adaptation (module docstring)."""
  NEEDS = ("rlcf_captioner", "reward_tokenizers", "caption_tokenizer")

  def __init__(self, ctx: common.EvalContext, *, split: str, num_samples: int, lr: float,
               steps: int = rlcf_captioning.STEPS,
               weight_decay: float = rlcf_captioning.WEIGHT_DECAY,
               max_new_tokens: int = rlcf_captioning.MAX_NEW_TOKENS,
               final_beams: int = rlcf_captioning.FINAL_BEAMS, batched: bool = True,
               metrics: Optional[Sequence[str]] = None, tokenizer: str = "ptb",
               clip_scores: bool = True):
    super().__init__(ctx, split=split)
    settings = rlcf_captioning.Settings(
        num_samples=num_samples, steps=steps, lr=lr, weight_decay=weight_decay,
        max_new_tokens=max_new_tokens, final_beams=final_beams)
    for name, value in (("batched", batched), ("clip_scores", clip_scores)):
      if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected True or False.")
    self.metrics = captioning.check_captioned(self.TYPE, ctx.source, metrics, tokenizer)
    self.tokenizer, self.batched, self.clip_scores = tokenizer, batched, clip_scores
    self._adapter = rlcf_captioning.Adapter(
        ctx.predict_fns["rlcf_captioner"](), settings,
        ctx.predict_fns["caption_tokenizer"](), ctx.predict_fns["reward_tokenizers"]())

  def _scored_names(self) -> tuple[str, ...]:
    return captioning.scored_names(self.metrics) + (
        ("CLIP-S", "RefCLIP-S") if self.clip_scores else ())

  def metric_names(self) -> tuple[str, ...]:
    scored = self._scored_names()
    return (*scored, *(f"zeroshot_{n}" for n in scored), "examples")

  def adapt_split(self, variables) -> dict:
    """Captions of every example of the split: dict(zeroshot, adapted: lists of str in example
    order, reward_image_features (N, E_0))."""
    out = {"zeroshot": [], "adapted": [], "reward_image_features": []}
    for batch in self.ctx.batches(self.split):
      keep = np.asarray(jax.device_get(batch["_mask"])).astype(bool)
      result = self._adapter.adapt(variables, np.asarray(jax.device_get(batch["image"])),
                                   batched=self.batched)
      for key in out:
        out[key].extend(np.asarray(result[key], dtype=object if key != "reward_image_features"
                                   else np.float32)[keep])
    out["reward_image_features"] = np.stack(out["reward_image_features"])
    return out

  def run(self, variables) -> dict[str, float]:
    captions = self.adapt_split(variables)
    image_ids = self.ctx.source.image_ids(self.split)
    if len(image_ids) != len(captions["adapted"]):
      raise ValueError(f"Split {self.split!r}: {len(captions['adapted'])} captioned examples but "
                       f"{len(image_ids)} image ids.")
    references = self.ctx.source.references(self.split)
    first = {}  # image id -> its first example's position (one caption per image)
    for position, image_id in enumerate(image_ids):
      first.setdefault(image_id, position)
    metrics = {}
    for prefix, key in (("", "adapted"), ("zeroshot_", "zeroshot")):
      candidates = {i: captions[key][p] for i, p in first.items()}
      scores = caption_metrics.score_captions(candidates, references, metrics=self.metrics,
                                              tokenizer=self.tokenizer)
      if self.clip_scores:
        scores.update(self._clip_scores(variables, captions["reward_image_features"], first,
                                        candidates, references))
      metrics.update({prefix + name: value for name, value in scores.items()})
    return {**metrics, "examples": len(first)}

  def _clip_scores(self, variables, image_features, first, candidates, references):
    """CLIP-S and RefCLIP-S of one caption per image by the first reward CLIP."""
    reward = self._adapter.captioner.rewards[0]
    embed_text = functools.partial(_encode_texts, reward, tpt.clip_variables(variables,
                                                                             "reward_0"))
    ids = list(first)
    return caption_metrics.clip_caption_scores(
        image_features[[first[i] for i in ids]], [candidates[i] for i in ids],
        self._adapter.reward_tokenizers[0], embed_text,
        references=[references[i] for i in ids])


_encode_texts = jax.jit(rlcf.encode_texts, static_argnums=0)
