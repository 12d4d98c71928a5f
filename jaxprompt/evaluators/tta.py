"""Test-time adaptation (TTA) classification: TPT, RLCF and their baselines adapt on each test
sample's views, then classify it.

The per-sample loop of azshue/TPT `tpt_classification.py` (`test_time_adapt_eval`) and
mzhaoshuai/RLCF `TPT/tpt_cls_rl.py` / `TPT/tune_cls_rl.py` (`test_time_adapt_eval`): reset the
tunable params and the optimizer state, tune on the sample's confident augmented views, predict
view 0, report top-1 and top-5 (TPT paper §4, RLCF paper §4.1). Here a batch of B test samples is
adapted at once (`tta.adapt`, vmapped over the samples, which are sharded over the mesh's batch
axis like any evaluation batch; `batched=False` runs them one after another, as the originals).

  config.evals.test = dict(type='tta', split='test', method='rlcf', mode='prompt')

The batches carry 'views' (B, V, S, S, 3) from the pp op `tta_views(V, S, augmix=...)` (then
`value_range|normalize`, per view) and 'label'; a spec with `tta_views` makes the trainer seed
the evaluation examples (`augment_seed=config.seed`), so each sample's views depend on the seed
and the example's index only, not on the batch size or the host split. The models
come from the method's predict function 'tta_clips' (`prompts.tpt.TtaClipsFn`: the policy CLIP
and, for `prompts.rlcf`, the reward CLIPs with their weights); the label space is the data
source's `class_names`, which must be the model's.

Settings:
  method: 'tpt' (marginal entropy, `tpt.make_episode`; reward CLIPs are ignored), 'rlcf'
    (REINFORCE with the CLIP reward), 'kd' (distillation from the one reward CLIP),
    'pseudo_label' (CE against the policy's own initial top-1; `rlcf.make_episode`). 'rlcf' and
    'kd' need a method with reward CLIPs (`prompts.rlcf`).
  mode: 'prompt' (the shared context) or 'image' (the visual tower).
  steps, lr, weight_decay: None = the method's defaults: TPT `tpt.MODE_DEFAULTS`; the RLCF
    family's scripts: 3 steps, lr 7e-3 (prompt) or 1e-5 (image), weight decay 5e-4.
  top_k (RLCF's K), selection (the fraction of confident views), ctx_init, n_ctx: as
    `tpt.make_episode` / `rlcf.make_episode`.
  coop_ctx: '' or the path of a CoOp checkpoint whose context initialises the prompt
    (`tpt.load_coop_context`: TPT+CoOp, RLCF+CoOp).
  image_prompt_quirk: image mode's "a_photo_of_a {class}." class prompts, as RLCF's scripts
    (`rlcf.reward_prompt_prefix`; TPT's image mode too, as RLCF runs it).
  momentum: None, or dict(momentum=0.9998, update_freq=64, update_w=1.0) for RLCF-S-M: after each
    batch the momentum buffer (`rlcf.momentum_update`) takes its real samples in order, and its
    reset target is the next batch's initial params. The original keeps the buffer in its image
    mode's model (`CLIPCLS_TTA`); here it applies to whatever the episode tunes.
  batched: vmap over the B samples of a batch (True) or run them one by one (False).

Metrics: 'accuracy' and 'top5' of view 0 after adaptation, 'zeroshot_accuracy' and
'zeroshot_top5' of view 0 with the initial params (computed in the same pass, at prepare), and
'examples'. Padding rows ('_mask' False) are adapted with the rest but never counted, nor fed to
the momentum buffer.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import tta
from jaxprompt.evaluators import common
from jaxprompt.prompts import rlcf, tpt

METHODS = ("tpt",) + rlcf.OBJECTIVES  # 'rlcf', 'kd', 'pseudo_label' run on rlcf.make_episode
NEED_REWARDS = ("rlcf", "kd")
MOMENTUM_DEFAULTS = dict(momentum=0.9998, update_freq=64, update_w=1.0)  # RLCF's scripts
TOP5 = 5


def with_zeroshot(episode: tta.Episode) -> tta.Episode:
  """`episode` whose predict returns (2, C): the adapted logits of view 0 and, computed once at
  prepare with the initial params, the zero-shot ones."""

  def prepare(tunable0, frozen, views, rng):
    context = episode.prepare(tunable0, frozen, views, rng)
    return {**context, "zeroshot": episode.predict(tunable0, frozen, context)}

  def predict(tunable, frozen, context):
    return jnp.stack([episode.predict(tunable, frozen, context), context["zeroshot"]])

  return dataclasses.replace(episode, prepare=prepare, predict=predict)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k (at most C) highest logits."""
  k = min(k, logits.shape[-1])
  top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


@common.register("tta")
class TtaEvaluator(common.Evaluator):
  """Per-sample TTA of the method's CLIPs on `split` (module docstring)."""
  NEEDS = ("tta_clips",)

  def __init__(self, ctx: common.EvalContext, *, split: str, method: str = "tpt",
               mode: str = "prompt", steps: int | None = None, lr: float | None = None,
               weight_decay: float | None = None, top_k: int = 3, selection: float = 0.1,
               ctx_init: str = "a photo of a", n_ctx: int = 4, coop_ctx: str = "",
               image_prompt_quirk: bool = True, momentum=None, batched: bool = True):
    super().__init__(ctx, split=split)
    if method not in METHODS:
      raise ValueError(f"method={method!r}: expected one of {METHODS}.")
    if mode not in tpt.MODES:
      raise ValueError(f"mode={mode!r}: expected one of {tpt.MODES}.")
    if not isinstance(batched, bool):
      raise ValueError(f"batched={batched!r}: expected True or False.")
    clips_fn = ctx.predict_fns["tta_clips"]
    if not isinstance(clips_fn, tpt.TtaClipsFn):
      raise ValueError(f"The 'tta' evaluator needs the predict function 'tta_clips' of "
                       f"prompts.tpt or prompts.rlcf (a tpt.TtaClipsFn); got {clips_fn!r}.")
    source = ctx.source
    source_names = getattr(source, "class_names", None)
    if not source_names:
      raise ValueError(f"TTA classification needs the data source's class_names; "
                       f"{getattr(source, 'name', source)!r} has none.")
    num_classes = getattr(source, "num_classes", len(source_names))
    if len(source_names) != num_classes or len(clips_fn.class_names) != num_classes:
      raise ValueError(
          f"Label-space mismatch: the data source {getattr(source, 'name', source)!r} has "
          f"{num_classes} classes and {len(source_names)} class names, the model "
          f"{len(clips_fn.class_names)} class names (e.g. ImageNet-A/-R's 200-class subset "
          f"against ImageNet's 1000 names): use the source's class_names.")
    if method in NEED_REWARDS and not clips_fn.rewards:
      raise ValueError(f"method={method!r} needs a reward CLIP; this method has none: use "
                       f"config.model_name='prompts.rlcf' (config.model.reward_variants).")
    if method == "kd" and len(clips_fn.rewards) != 1:
      raise ValueError(f"method='kd' distils one teacher; the model has "
                       f"{len(clips_fn.rewards)} reward CLIPs.")
    if momentum is not None:
      momentum = dict(momentum.to_dict() if hasattr(momentum, "to_dict") else momentum)
      unknown = sorted(set(momentum) - set(MOMENTUM_DEFAULTS))
      if unknown:
        raise ValueError(f"momentum: unknown key(s) {unknown}; valid: "
                         f"{sorted(MOMENTUM_DEFAULTS)}.")
      momentum = {**MOMENTUM_DEFAULTS, **momentum}
    self.method, self.batched, self.momentum = method, batched, momentum
    self.clips_fn, self.class_names = clips_fn, tuple(source_names)
    coop_context = tpt.load_coop_context(coop_ctx) if coop_ctx else None
    overrides = {k: v for k, v in dict(steps=steps, lr=lr, weight_decay=weight_decay).items()
                 if v is not None}
    self._settings = dict(mode=mode, n_ctx=n_ctx, selection=selection, **overrides)
    if method == "tpt":
      self._settings.update(ctx_init=rlcf.reward_prompt_prefix(ctx_init, mode, image_prompt_quirk),
                            ctx=coop_context, keep_underscores=mode == "image"
                            and image_prompt_quirk)
    else:
      self._settings.update(objective=method, ctx_init=ctx_init, init_ctx=coop_context,
                            top_k=top_k, image_prompt_quirk=image_prompt_quirk)
    seed = ctx.config.get("seed", 0) if ctx.config is not None else 0
    self._rng = jax.random.PRNGKey(seed)
    self._built = None  # (variables, episode of them)
    self._replicated = self.jit(lambda *arrays: arrays, key="replicate")

  def episode(self, variables) -> tuple[tta.Episode, dict, dict]:
    """(episode with zero-shot logits (`with_zeroshot`), tunable0, frozen) of `variables`; kept
    for the same variables object, so that its compiled adaptation is reused."""
    if self._built is None or self._built[0] is not variables:
      self._built = (variables, self._make_episode(variables))
    return self._built[1]

  def _make_episode(self, variables):
    clips = self.clips_fn(variables)
    if self.method == "tpt":
      model, clip_variables = clips.policy
      built = tpt.make_episode(model, clip_variables, self.class_names,
                               self.clips_fn.vocab_path, **self._settings)
    else:
      rewards = () if self.method == "pseudo_label" else clips.rewards
      built = rlcf.make_episode(clips.policy, rewards, self.class_names,
                                self.clips_fn.vocab_path, **self._settings)
    episode, tunable0, frozen = built
    return with_zeroshot(episode), tunable0, frozen

  def predictions(self, variables) -> dict[str, np.ndarray]:
    """{'logits', 'zeroshot_logits': (N, C), 'label': (N,)} of every real example of the split,
    in order; the episode is built once for the pass (`episode`)."""
    episode, tunable0, frozen = self.episode(variables)
    momentum = rlcf.momentum_init(tunable0) if self.momentum else None
    batch_index = 0

    def step(batch):
      nonlocal momentum, batch_index
      rng = jax.random.fold_in(self._rng, batch_index)
      batch_index += 1
      start = tunable0 if momentum is None else momentum.target
      logits, adapted = tta.adapt(episode, start, frozen, batch["views"], rng,
                                  batched=self.batched)
      out = self._replicated(logits[:, 0], logits[:, 1], batch["label"], batch["_mask"])
      if momentum is not None:  # the real samples of the batch, in order
        real = np.flatnonzero(np.asarray(out[-1]))
        momentum = rlcf.momentum_update(momentum, tunable0,
                                        jax.tree.map(lambda x: x[real], adapted), **self.momentum)
      return out

    logits, zeroshot, labels = common.gather(self, step, self.ctx.batches(self.split),
                                             keys=("views", "label"))
    return {"logits": logits, "zeroshot_logits": zeroshot, "label": labels}

  def metric_names(self) -> tuple[str, ...]:
    return ("accuracy", "top5", "zeroshot_accuracy", "zeroshot_top5", "examples")

  def run(self, variables) -> dict[str, float]:
    out = self.predictions(variables)
    labels = out["label"]
    return {"accuracy": top_k_accuracy(out["logits"], labels, 1),
            "top5": top_k_accuracy(out["logits"], labels, TOP5),
            "zeroshot_accuracy": top_k_accuracy(out["zeroshot_logits"], labels, 1),
            "zeroshot_top5": top_k_accuracy(out["zeroshot_logits"], labels, TOP5),
            "examples": int(len(labels))}
