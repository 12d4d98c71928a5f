"""Zero-shot CLIP classification with prompt templates, single or ensembled.

Follows KaiyangZhou/CoOp `trainers/zsclip.py` (and CLIP, Radford et al. 2021, §3.1.4 "prompt
engineering and ensembling"): the class text is a template filled with the class name
('_' -> ' '), tokenised, encoded by CLIP's text tower and L2-normalised; an ensemble averages the
normalised features of its templates and normalises again (`ZeroshotCLIP2`); logits =
exp(logit_scale) · cos(image feature, class feature). big_vision's counterpart is
`evaluators/proj/image_text/discriminative_classifier.py`; this one needs only the method's CLIP
functions ('tokenize', 'embed_text', 'embed_image', 'logit_scale'; `coop.clip_predict_fns`).

  config.evals.zs = dict(type='zeroshot', split='test', templates='ensemble')

Settings: `templates` 'default' ("a photo of a {}."), 'ensemble' (`IMAGENET_TEMPLATES_SELECT`),
templates joined by '|' (or a tuple of them); `metrics` 'classification' (accuracy, loss: softmax
cross-entropy with config.label_smoothing) or 'multilabel' (LMPT's metrics, `multilabel.py`,
with `threshold`). The class names are the data source's.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxprompt import optim
from jaxprompt.evaluators import classification, common, multilabel

DEFAULT_TEMPLATE = "a photo of a {}."
# CoOp's one hand-written template per dataset (`CUSTOM_TEMPLATES`), keyed by its dataset names.
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}
# The 7-template ImageNet ensemble CoOp's `ZeroshotCLIP2` uses (CLIP's selected subset).
IMAGENET_TEMPLATES_SELECT = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
METRICS = ("classification", "multilabel")


def parse_templates(spec) -> tuple[str, ...]:
  """'default' | 'ensemble' | 'template one {}.|template two {}.' (or a sequence) -> templates."""
  if spec == "default":
    return (DEFAULT_TEMPLATE,)
  if spec == "ensemble":
    return IMAGENET_TEMPLATES_SELECT
  if isinstance(spec, str):
    templates = tuple(t for t in spec.split("|") if t)
  elif isinstance(spec, Sequence) and all(isinstance(t, str) for t in spec):
    templates = tuple(spec)
  else:
    templates = ()
  bad = [t for t in templates if "{}" not in t]
  if not templates or bad:
    raise ValueError(f"templates={spec!r}: expected 'default', 'ensemble' or '|'-separated "
                     f"templates each with a '{{}}' for the class name; bad: {bad}.")
  return templates


def class_token_ids(tokenize, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """(T * C, L) token ids, template-major, cut after the last EOT (the causal text tower gives
  the same EOT features on fewer positions; EOT is the largest id of CLIP's vocabulary)."""
  if not templates:
    raise ValueError("Zero-shot classification needs at least one template.")
  names = [name.replace("_", " ") for name in class_names]
  token_ids = np.asarray(tokenize([t.format(n) for t in templates for n in names]), np.int32)
  return token_ids[:, :int(token_ids.argmax(-1).max()) + 1]


def normalize(x, axis: int = -1):
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def ensemble(text_features, num_templates: int):
  """(T * C, E) normalised features -> (C, E): per class the normalised template mean."""
  features = text_features.astype(jnp.float32).reshape(num_templates, -1,
                                                       text_features.shape[-1])
  return normalize(normalize(features).mean(axis=0))


def class_embeddings(predict_fns: Mapping, variables, class_names: Sequence[str],
                     templates: Sequence[str]):
  """(C, E) class classifier from the method's 'tokenize' and 'embed_text'."""
  token_ids = class_token_ids(predict_fns["tokenize"], class_names, templates)
  return ensemble(predict_fns["embed_text"](variables, jnp.asarray(token_ids)), len(templates))


def logits(predict_fns: Mapping, variables, images, classifier):
  """(B, C) = exp(logit_scale) · normalised image features @ classifier.T."""
  image_features = predict_fns["embed_image"](variables, images).astype(jnp.float32)
  return predict_fns["logit_scale"](variables) * image_features @ classifier.T


@common.register("zeroshot")
class ZeroShotEvaluator(common.Evaluator):
  """Zero-shot CLIP on `split` with the source's class names: 'accuracy', 'loss' (metrics=
  'classification') or LMPT's multi-label metrics (metrics='multilabel'), and 'examples'."""
  NEEDS = ("tokenize", "embed_text", "embed_image", "logit_scale")

  def __init__(self, ctx: common.EvalContext, *, split: str, templates="default",
               metrics: str = "classification", threshold: float | None = None):
    super().__init__(ctx, split=split)
    self.templates = parse_templates(templates)
    if metrics not in METRICS:
      raise ValueError(f"metrics={metrics!r}: expected one of {METRICS}.")
    self.metrics = metrics
    class_names = getattr(ctx.source, "class_names", None)
    if not class_names:
      raise ValueError(f"zero-shot classification needs the data source's class_names; "
                       f"{getattr(ctx.source, 'name', ctx.source)!r} has none.")
    self.threshold = multilabel.threshold_setting(ctx.config, threshold) \
        if metrics == "multilabel" else None
    smoothing = (ctx.config.get("label_smoothing", 0.0) if ctx.config is not None else 0.0) or 0.0
    self._token_ids = class_token_ids(ctx.predict_fns["tokenize"], class_names, self.templates)
    fns = ctx.predict_fns
    self._classifier = self.jit(lambda variables, token_ids: ensemble(
        fns["embed_text"](variables, token_ids), len(self.templates)), key="classifier")
    if metrics == "classification":
      def step(variables, classifier, batch):
        out = logits(fns, variables, batch["image"], classifier)
        return classification.masked_sums(
            out, optim.cross_entropy(out, batch["label"], out.shape[-1], smoothing), batch)
    else:
      def step(variables, classifier, batch):
        return (logits(fns, variables, batch["image"], classifier), batch["labels"],
                batch["_mask"])
    self._step = self.jit(step, key="step")

  def classifier(self, variables):
    """(C, E): the class features of the templates under `variables`."""
    return self._classifier(variables, jnp.asarray(self._token_ids))

  def metric_names(self) -> tuple[str, ...]:
    if self.metrics == "classification":
      return ("accuracy", "loss", "examples")
    return multilabel.metric_names(self.ctx.source, self.threshold)

  def run(self, variables) -> dict[str, float]:
    classifier = self.classifier(variables)
    batches = self.ctx.batches(self.split)
    if self.metrics == "classification":
      return classification.accuracy_and_loss(self, self._step, batches, variables, classifier)
    logits_labels = common.gather(self, self._step, batches, variables, classifier,
                                  keys=("image", "labels"))
    return multilabel.report(self, *logits_labels, self.threshold)
