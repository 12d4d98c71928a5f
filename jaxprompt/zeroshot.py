"""Zero-shot CLIP classification with prompt templates, single or ensembled.

Follows KaiyangZhou/CoOp `trainers/zsclip.py`: the class text is a template filled with the class
name ('_' -> ' '), tokenised, encoded by CLIP's text tower and L2-normalised; an ensemble averages
the normalised features of its templates and normalises again (`ZeroshotCLIP2`); logits are
exp(logit_scale) · cos(image feature, class feature).

  python -m jaxprompt.zeroshot --config configs/coop.py [--templates=ensemble]

evaluates the CLIP of a CLIP prompt method's config (its `clip/` params: `config.model_init`, or
the random init of `config.seed`) on the config's eval splits, with no training. `--templates`:
'default' ("a photo of a {}."), 'ensemble' (`IMAGENET_TEMPLATES_SELECT`), or templates joined
by '|'.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxprompt import train
from jaxprompt.models import clip
from jaxprompt.prompts import coop

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


def class_embeddings(clip_model: clip.Model, clip_params, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str]) -> jnp.ndarray:
  """(num_classes, E): per class the normalised mean of its normalised template features."""
  if not templates:
    raise ValueError("Zero-shot classification needs at least one template.")
  names = [name.replace("_", " ") for name in class_names]
  token_ids = tokenizer([t.format(n) for t in templates for n in names])  # (T * C, L)
  token_ids = token_ids[:, :int(token_ids.argmax(-1).max()) + 1]  # causal: positions after EOT
  encode = jax.jit(lambda p, ids: clip_model.apply({"params": p}, ids,
                                                   method=clip.Model.encode_text))
  features = encode(clip_params, jnp.asarray(token_ids))
  features = clip.normalize(features).reshape(len(templates), len(names), -1)
  return clip.normalize(features.mean(axis=0))


def logits(clip_model: clip.Model, clip_params, images, classifier) -> jnp.ndarray:
  """(B, num_classes) = exp(logit_scale) · normalised image features @ classifier.T."""
  image_features = clip.normalize(clip_model.apply({"params": clip_params}, images,
                                                   method=clip.Model.encode_image))
  return jnp.exp(clip_params["logit_scale"]) * image_features @ classifier.T


def evaluate(exp, templates: Sequence[str], split: str) -> dict:
  """Zero-shot '{split}/accuracy' and '/loss' of the CLIP inside `exp` (a `train.Experiment` of a
  CLIP prompt method: its model has `variant`, `vocab_path`, `class_names` and `clip/` params),
  through the trainer's own evaluation loop; the method's own metrics when it has `make_metrics`
  (LMPT: mAP and the rest)."""
  model = exp.model
  clip_model = clip.Model(**coop.clip_config(model.variant, model.dtype))
  tokenizer = coop.get_tokenizer(model.vocab_path, clip_model.context_length)
  classifier = class_embeddings(clip_model, exp.state["params"]["clip"], tokenizer,
                                model.class_names, templates)
  # `train.make_eval_step` only calls `apply(variables, images, train=...) -> (logits, aux)`.
  zero_shot = types.SimpleNamespace(apply=lambda variables, images, train: (
      logits(clip_model, variables["params"]["clip"], images, classifier), {}))
  loss_fn = train.cross_entropy_loss(exp.config, exp.data.source)
  eval_step = jax.jit(train.make_eval_step(zero_shot, loss_fn=loss_fn,
                                           keep_logits=exp.metrics_fn is not None))
  return train.evaluate(dataclasses.replace(exp, eval_step=eval_step), exp.state["params"], split)


def parse_templates(spec: str) -> tuple[str, ...]:
  """'default' | 'ensemble' | 'template one {}.|template two {}.' -> templates."""
  if spec == "default":
    return (DEFAULT_TEMPLATE,)
  if spec == "ensemble":
    return IMAGENET_TEMPLATES_SELECT
  templates = tuple(t for t in spec.split("|") if t)
  bad = [t for t in templates if "{}" not in t]
  if not templates or bad:
    raise ValueError(f"--templates={spec!r}: expected 'default', 'ensemble' or '|'-separated "
                     f"templates each with a '{{}}' for the class name; bad: {bad}.")
  return templates


def main(argv):
  del argv
  from absl import flags
  config = flags.FLAGS["config"].value
  templates = parse_templates(flags.FLAGS["templates"].value)
  exp = train.build(config)
  if config.get("model_init"):
    train.log(f"CLIP weights from {config.model_init}")
  else:
    train.log(f"CLIP weights: random init (seed {config.seed}), no config.model_init")
  for split in config.eval_splits:
    metrics = evaluate(exp, templates, split)
    name = "mAP" if f"{split}/mAP" in metrics else "accuracy"
    train.log(f"zero-shot {split}/{name}: {metrics[f'{split}/{name}']:.4f} "
              f"({metrics[f'{split}/examples']} examples, {len(templates)} template(s))")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A CLIP prompt method's config file.",
                                  lock_config=True)
  flags.DEFINE_string("templates", "default", "'default', 'ensemble' or 't1 {}.|t2 {}.'")
  flags.mark_flag_as_required("config")
  app.run(main)
