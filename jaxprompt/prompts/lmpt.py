"""LMPT (Xia et al., "LMPT: Prompt Tuning with Class-Specific Embedding Loss for Long-tailed
Multi-Label Visual Recognition", arXiv 2305.04536): CoOp prompts on a frozen CLIP, trained with a
long-tailed multi-label loss plus a class-specific embedding loss that ties each class's prompt
to the captions of the images that show it.

Follows Richard88888/LMPT `lmpt/coop_model.py` (`PromptLearner`, `CustomCLIP`), `lmpt/train.py`
and `lmpt/csel.py` (the method section of the paper):

  * the model is CoOp (`coop.Model`) with class-specific contexts (`csc=True`, which the seed
    cannot switch off), 16 random contexts, class token at the end, the prompt 'X×16 {name}.'
    tokenised as one string as in the seed (`coop.py`); logits = exp(logit_scale) ·
    cos(image, text) (B, C), used as multi-label logits. Only `prompt_learner/ctx` trains.
  * the loss (`make_loss`) is λ·L_cls + (1 − λ)·L_cse with λ = `lam` = 0.5: L_cls is the seed's
    `--loss_function` (`losses.make_classification_loss`; default 'dbl', the distribution-balanced
    loss with the seed's per-dataset settings), L_cse the class-specific embedding loss
    (`losses.class_specific_embedding_loss`) between the caption's token embeddings at positions
    [0, 77 − m) and each class prompt's *input* token embeddings (context inserted, before the
    text transformer) at [m, 77), m = `m_ctx` = 2. `m_ctx` is only this offset, no second context.
    Without the embedding loss (`cse=False`) the loss is L_cls alone (the seed's non-LMPT
    `training_method`s, i.e. CoOp with the multi-label loss).
  * evaluation (the 'multilabel' evaluator, `evaluators/multilabel.py`): softmax-over-classes
    scores, mAP, head/medium/tail mAP and CP/CR/CF1/OP/OR/OF1 at `config.lmpt.threshold` 0.3.
  * the fine-tuned CLIP baseline of the seed (`finetune_clip/fc.py`) is `classifier='linear'`: a
    linear head (`head/...`, the only trained params) on the unnormalised CLIP image features,
    trained with the same loss options and no embedding loss. The zero-shot baseline is
    `python -m jaxprompt.zeroshot` on an LMPT config (it reports the multi-label metrics).

The settings of the loss and the metrics live in `config.lmpt` (see `LOSS_DEFAULTS`); the model's
in `config.model`. Batches: 'image', 'labels' (B, C) multi-hot, and in training 'caption_tokens'
(B, 77), which the data source tokenises with the model's vocabulary (`source_kwargs`).

Deliberate deviations (see also lmpt_losses.py for the switches of the embedding loss):
  * `count_transform='raw'` by default: the seed softmaxes the raw class counts, which underflows
    to zeros on real counts (infinite margins, NaN weights; its issues #5, #7); 'softmax' keeps it.
  * fp32 (the seed converts CLIP and the context to fp16).

Followed although it looks accidental: the seed calls `model.train()` on the whole CustomCLIP every
epoch, so a ResNet tower's frozen BatchNorm normalises with batch statistics in training and its
running statistics drift (ViT towers have no BatchNorm). `METHOD.mutable = ('batch_stats',)` does
the same here, and the drifted statistics are checkpointed with the context.
  * fine-tune baseline: flax's default Dense init (torch: Linear's uniform init), and the head
    width follows the CLIP variant (the seed hard-codes 1024, RN50's width).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxprompt import method
from jaxprompt.models import clip
from jaxprompt.prompts import coop
from jaxprompt.prompts import lmpt_losses as losses

# The context (LMPT) or the linear head (fine-tune baseline) trains; CLIP is frozen.
TRAINABLE_PARAMS = r"(prompt_learner|head)/.*"
CLASSIFIERS = ("prompt", "linear")
# config.lmpt: the seed's train.py flags (README run) and test.py's threshold.
LOSS_DEFAULTS = dict(
    loss_function="dbl",      # --loss_function (losses.CLASSIFICATION_LOSSES)
    dbl_dataset="voc_lt",     # which of dbl's hard-coded settings (coco_lt / voc_lt)
    neg_scale=2.0, gamma=0.2,  # --neg_scale / --gamma: used only by the bl.py loss options
    cse=True,                 # --training_method lmpt: add the class-specific embedding loss
    m_ctx=2,                  # --m_ctx
    lam=0.5,                  # --lam
    cse_margin=losses.CSE_MARGIN, cse_gamma=losses.CSE_GAMMA,
    count_transform="raw",    # 'softmax' = as released (NaN on real counts)
    sign="as_coded",          # or 'hinge_embedding'
    threshold=0.3)  # test.py --thre; read by the 'multilabel' evaluator


class Model(coop.Model):
  """CoOp with LMPT's defaults (class-specific contexts) and the inputs of its embedding loss.

  `__call__(images, train=..., caption_tokens=None)` -> (logits (B, C), aux) with aux
  'image_features', 'text_features', 'prompt_embeddings' (C, 77, W: the prompts' input token
  embeddings, padding included) and, given caption tokens (B, 77), 'caption_embeddings'
  (B, 77, W), CLIP's token embeddings of the captions. `classifier='linear'`: the fine-tune
  baseline, logits = head(image features), aux empty.
  """
  csc: bool = True
  classifier: str = "prompt"

  def setup(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"classifier={self.classifier!r}: expected one of {CLASSIFIERS}.")
    if self.classifier == "prompt":
      super().setup()
    else:
      self.clip = clip.Model(**coop.clip_config(self.variant, self.dtype))
      self.head = nn.Dense(self.num_classes, dtype=jnp.float32)

  def full_prompt_embeddings(self, prompts):
    """(C, 77, W): `prompts` (C, L, W) followed by the frozen embeddings of the layout's padding
    tokens at positions L..76, which the embedding loss compares too."""
    padding = jnp.asarray(self.layout.token_ids[:, prompts.shape[1]:])
    return jnp.concatenate([prompts, self.clip.embed_tokens(padding).astype(prompts.dtype)], 1)

  def __call__(self, images, *, train: bool = False, caption_tokens=None):
    features = self.clip.encode_image(images, train=train)
    if self.classifier == "linear":
      return self.head(features.astype(jnp.float32)), {}
    image_features = clip.normalize(features)
    prompts = self.prompt_embeddings()  # (C, L, W)
    text_features = clip.normalize(self.clip.encode_text_embeddings(prompts,
                                                                    self.layout.eot_index))
    logits = self.class_logits(image_features, text_features)
    aux = {"image_features": image_features, "text_features": text_features,
           "prompt_embeddings": self.full_prompt_embeddings(prompts)}
    if caption_tokens is not None:
      aux["caption_embeddings"] = self.clip.embed_tokens(caption_tokens)
    return logits, aux


def settings(config) -> ml_collections.ConfigDict:
  """config.lmpt over `LOSS_DEFAULTS` (unknown keys are an error)."""
  given = dict(config.get("lmpt") or {})
  unknown = set(given) - set(LOSS_DEFAULTS)
  if unknown:
    raise ValueError(f"Unknown config.lmpt settings {sorted(unknown)}; valid: "
                     f"{sorted(LOSS_DEFAULTS)}.")
  return ml_collections.ConfigDict({**LOSS_DEFAULTS, **given})


def uses_captions(config) -> bool:
  return settings(config).cse and config.model.get("classifier", "prompt") == "prompt"


def source_kwargs(config) -> dict:
  """The caption tokenizer (the model's vocabulary, 77 tokens) when the embedding loss is on."""
  if not uses_captions(config):
    return {}
  tokenizer = coop.get_tokenizer(config.model.vocab_path)
  return {"caption_tokenizer": lambda texts: tokenizer(texts, truncate=True)}


def _check_source(source):
  missing = [a for a in ("class_freq", "num_train_images", "class_groups")
             if not hasattr(source, a)]
  if missing:
    raise ValueError(f"LMPT needs a long-tailed multi-label data source (multilabel/voc_lt, "
                     f"multilabel/coco_lt, embedded/multilabel_lt); {source.name!r} lacks "
                     f"{missing}.")


def make_loss(config, source):
  """loss(logits, aux, batch) -> scalar: λ·L_cls + (1 − λ)·L_cse, or L_cls without `cse`."""
  _check_source(source)
  s = settings(config)
  classify = losses.make_classification_loss(
      s.loss_function, class_freq=source.class_freq, num_train=source.num_train_images,
      dataset=s.dbl_dataset, neg_scale=s.neg_scale, gamma=s.gamma)
  if not s.cse:
    return lambda logits, aux, batch: classify(logits, batch["labels"])
  if config.model.get("classifier", "prompt") != "prompt":
    raise ValueError("The class-specific embedding loss compares captions with prompts: "
                     "classifier='linear' needs config.lmpt.cse=False.")
  if getattr(source, "captions", None) is None:
    raise ValueError(f"LMPT's embedding loss needs training captions, and {source.name!r} has "
                     "none (the seed's <ds>_lt_captions.txt); set config.lmpt.cse=False to "
                     "train without it.")
  # Checked here, once: the margins and weights of the embedding loss are host constants.
  losses.cse_margins_and_weights(source.class_freq, margin=s.cse_margin, gamma=s.cse_gamma,
                                 count_transform=s.count_transform)

  def loss(logits, aux, batch):
    if "caption_embeddings" not in aux:
      raise ValueError("LMPT's embedding loss needs the batch's 'caption_tokens'.")
    embedding = losses.class_specific_embedding_loss(
        aux["caption_embeddings"], aux["prompt_embeddings"], batch["labels"], source.class_freq,
        m_ctx=s.m_ctx, margin=s.cse_margin, gamma=s.cse_gamma,
        count_transform=s.count_transform, sign=s.sign)
    return losses.lmpt_loss(classify(logits, batch["labels"]), embedding, lam=s.lam)

  return loss


def load(variables, path: str):
  """CLIP weights into `clip/...` (`coop.load`); the context or the head keeps its init."""
  if "prompt_learner" in variables["params"]:
    return coop.load(variables, path)
  return coop.load_clip(variables, path)


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, loaders={"model": load},
                       optional_inputs=("caption_tokens",), make_loss=make_loss,
                       predict_fns=coop.clip_predict_fns, source_kwargs=source_kwargs,
                       mutable=("batch_stats",))
