"""TPT (Shu et al., NeurIPS 2022, "Test-Time Prompt Tuning for Zero-Shot Generalization in
Vision-Language Models", arXiv 2209.07511): per test sample, tune CLIP's prompt context to minimise
the marginal entropy of its most confident augmented views, then classify the sample.

Follows azshue/TPT `tpt_classification.py` (`test_time_tuning`, `select_confident_samples`,
`avg_entropy`, the AdamW optimizer) and `clip/custom_clip.py` (`PromptLearner`,
`ClipTestTimeTuning.inference`) (paper §3.2), as an `jaxprompt.tta.Episode`:

  * mode 'prompt' (TPT): n_ctx = 4 context vectors shared by all classes, the prompt of class c
    being [SOT][ctx_1..ctx_4][tokens of "{name}."][EOT] (CoOp's 'end' layout: `coop.coop_prompts`
    and `coop.PromptLearner`), initialised from the token embeddings of `ctx_init`
    ("a photo of a"), or N(0, 0.02²) without it, or a given context: the `ctx` of a CoOp
    checkpoint (`load_coop_context`; TPT's `--load`). The text features of the class prompts are
    recomputed at every step; the image features of the views carry no gradient (TPT computes
    them under `torch.no_grad`), so `prepare` computes them once.
  * mode 'image' (RLCF's "TPT" image-encoder baseline, mzhaoshuai/RLCF `TPT/tune_cls_tpt.py` with
    `CLIPCLS_TTA`, `TPT/scripts/tpt-tune.sh`): every parameter of the visual tower trains; the
    text features of the hard prompts "{ctx_init} {name}." are computed once by the frozen text
    tower. With `keep_underscores=True` the prefix is tokenised as given, underscores included, as
    RLCF's script passes `a_photo_of_a` and `CLIPCLS_TTA` never replaces them (a quirk, off by
    default: "a_photo_of_a" becomes "a photo of a").
  * per sample (`prepare`): logits = exp(logit_scale) · cos(image, text) of all V views with the
    initial params, and the int(V · selection) lowest-entropy views are kept
    (`tta.entropy_selection`; selection 0.1: 6 of 64 views);
  * loss: the marginal entropy of the kept views' logits (`tta.marginal_entropy`); AdamW with
    PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and decoupled weight decay (optax.adamw
    computes p - lr · (adam step + wd · p), which is torch's p · (1 - lr · wd) - lr · adam step);
    steps, lr and weight decay per mode (`MODE_DEFAULTS`): TPT's 1 step at lr 5e-3 with torch's
    default weight decay 0.01; the image baseline's 3 steps at lr 1e-5, weight decay 5e-4;
  * predict: the logits of view 0 (the un-augmented view) with the adapted params.
Params and the optimizer state are reset for every sample (`tta.adapt`).

As a method (`METHOD`, `config.model_name='prompts.tpt'`): `Model` holds the policy CLIP as
submodule 'clip' and its `__call__` is zero-shot CLIP on the hard prompts "{ctx_init} {name}."
(what the embedded demos pre-fit; real runs load CLIP weights with `config.mode='eval'`). The
evaluator 'tta' (`jaxprompt/evaluators/tta.py`) adapts each test sample through the predict
function 'tta_clips' (`TtaClipsFn`), which hands it the CLIP models and their variables.

Deliberate deviations:
  * fp32 (the originals run under autocast); CLIP's dtype may be bfloat16, the context stays fp32.
  * With `ctx_init`, n_ctx is its token count (TPT: its word count; equal for "a photo of a").
  * TPT's later steps forward all V views and index the kept ones; only the kept ones are
    forwarded here (the same logits: views do not interact).
  * Image mode runs a ResNet tower's BatchNorm on its running statistics; RLCF calls
    `model.train()` while tuning, so an RN tower there normalises with the views' batch statistics
    (the RLCF numbers are ViT-B/16, which has no BatchNorm).
  * TPT's `--load` asserts the checkpoint's context length against `--n_ctx` and indexes
    `model.prompt_learner[0]`, which fails (azshue/TPT issue 7); here a context of the wrong shape
    is an error naming both shapes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt import checkpointing, method, tta
from jaxprompt.models import clip, common
from jaxprompt.prompts import coop

MODES = ("prompt", "image")
# steps / lr / AdamW weight decay of each mode: TPT's scripts/test_tpt.sh (torch's AdamW default
# weight decay) and RLCF's TPT/scripts/tpt-tune.sh.
MODE_DEFAULTS = {"prompt": dict(steps=1, lr=5e-3, weight_decay=0.01),
                 "image": dict(steps=3, lr=1e-5, weight_decay=5e-4)}
SELECTION = 0.1  # fraction of the views kept by confidence (64 views -> 6)
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults


def make_optimizer(lr: float, weight_decay: float,
                   eps: float = ADAM_EPS) -> optax.GradientTransformation:
  """torch.optim.AdamW(params, lr, eps=eps, weight_decay=weight_decay) with its default betas."""
  return optax.adamw(lr, b1=ADAM_B1, b2=ADAM_B2, eps=eps, weight_decay=weight_decay)


def hard_prompt_ids(vocab_path: str, class_names: Sequence[str], prefix: str,
                    context_length: int = 77) -> np.ndarray:
  """(C, context_length) int32 ids of "{prefix} {name}." per class ('_' in names -> ' '), each
  prompt tokenised whole (as `clip.tokenize`; `prefix` as given)."""
  tokenizer = coop.get_tokenizer(vocab_path, context_length)
  texts = [f"{prefix} {name.replace('_', ' ')}." for name in class_names]
  return np.asarray(tokenizer(texts), np.int32)


def image_logits(clip_model: clip.Model, clip_variables, images, text_features):
  """exp(logit_scale) · cos(image features of `images` (N, H, W, 3), text_features (C, E))."""
  features = clip.normalize(clip_model.apply(clip_variables, images,
                                             method=clip.Model.encode_image))
  return jnp.exp(clip_variables["params"]["logit_scale"]) * features @ text_features.T


def make_episode(clip_model: clip.Model, clip_variables, class_names: Sequence[str],
                 vocab_path: str, *, mode: str = "prompt", n_ctx: int = 4,
                 ctx_init: str = "a photo of a", ctx=None, keep_underscores: bool = False,
                 selection: float = SELECTION, steps: Optional[int] = None,
                 lr: Optional[float] = None, weight_decay: Optional[float] = None,
                 seed: int = 0) -> tuple[tta.Episode, dict, dict]:
  """TPT on `clip_model` as (episode, tunable0, frozen) for `tta.adapt`.

  Args:
    clip_model, clip_variables: a CLIP and its variables ({'params': ...}, plus 'batch_stats' for
      a ResNet tower), e.g. from `clip.load_pretrained`.
    class_names: the label space, one name per class ('_' -> ' ').
    vocab_path: the CLIP BPE vocabulary (`coop.get_tokenizer`).
    mode: 'prompt' (tune the shared context) or 'image' (tune the visual tower).
    n_ctx: context length without `ctx_init` (prompt mode).
    ctx_init: prompt mode: the words whose token embeddings initialise the context ('' = random
      N(0, 0.02²) from `seed`); image mode: the prefix of the hard class prompts.
    ctx: prompt mode: an initial context (n_ctx, text_width), e.g. `load_coop_context(path)`; its
      length must be that of the layout (ctx_init's token count, else n_ctx).
    keep_underscores: image mode: tokenise `ctx_init` with its underscores (RLCF's quirk).
    selection: the fraction of views kept by confidence.
    steps, lr, weight_decay: None = `MODE_DEFAULTS[mode]`.
    seed: the random context init (prompt mode without ctx_init or ctx).

  Returns:
    `tta.Episode`; tunable0: {'ctx': (n_ctx, text_width)} (prompt mode) or the visual tower's
    params (image mode); frozen: {'clip': clip_variables (image mode: without params/visual)},
    plus 'text_features' (C, E) of the hard prompts in image mode.
  """
  if mode not in MODES:
    raise ValueError(f"TPT mode={mode!r}: expected one of {MODES}.")
  if not class_names:
    raise ValueError("TPT needs the class names of the label space; got none.")
  if not 0 < selection <= 1:
    raise ValueError(f"selection is the fraction of views kept, in (0, 1]; got {selection}.")
  settings = {**MODE_DEFAULTS[mode],
              **{k: v for k, v in dict(steps=steps, lr=lr, weight_decay=weight_decay).items()
                 if v is not None}}
  build = _prompt_mode if mode == "prompt" else _image_mode
  prepare, loss, predict, tunable0, frozen = build(
      clip_model, clip_variables, tuple(class_names), vocab_path, n_ctx=n_ctx, ctx_init=ctx_init,
      ctx=ctx, keep_underscores=keep_underscores, selection=selection, seed=seed)
  episode = tta.Episode(prepare=prepare, loss=loss, predict=predict,
                        optimizer=make_optimizer(settings["lr"], settings["weight_decay"]),
                        steps=settings["steps"])
  return episode, tunable0, frozen


class PromptPolicy(NamedTuple):
  """TPT's prompt-mode policy (RLCF's too): `logits(tunable, frozen, image_features (N, E))` ->
  (N, C) with the context `tunable['ctx']` and the frozen CLIP `frozen['clip']`; `init(rng,
  clip_variables)` -> tunable0 ({'ctx'} from ctx_init's word embeddings, or N(0, 0.02²));
  `context_shape` (n_ctx, text_width)."""
  logits: Callable
  init: Callable
  context_shape: tuple


def prompt_policy(clip_model: clip.Model, class_names: Sequence[str], vocab_path: str, *,
                  n_ctx: int, ctx_init: str) -> PromptPolicy:
  """The class prompts [SOT][ctx][name.][EOT] (`coop.coop_prompts`, 'end', shared context) and
  the CLIP logits of image features against their text features, recomputed from the context."""
  layout, blocks = coop.coop_prompts(vocab_path, clip_model.context_length, tuple(class_names),
                                     n_ctx, ctx_init, False, "end")
  learner = coop.PromptLearner(blocks, len(class_names))
  length = layout.length
  token_ids = jnp.asarray(layout.token_ids[:, :length])
  context_index = layout.context_index[:, :length]

  def word_embeddings(variables):  # the init of word-initialised blocks, as PromptCLIP passes it
    return {b.name: clip_model.apply(variables, jnp.asarray(b.init_ids),
                                     method=clip.Model.embed_tokens)
            for b in blocks if b.init_ids}

  def text_features(context, variables):  # (C, E), normalised
    fixed = clip_model.apply(variables, token_ids, method=clip.Model.embed_tokens)
    prompts = learner.apply({"params": {"ctx": context}}, fixed, context_index,
                            word_embeddings(variables))
    return clip.normalize(clip_model.apply(variables, prompts, layout.eot_index,
                                           method=clip.Model.encode_text_embeddings))

  def logits(tunable, frozen, image_features):  # (N, C)
    scale = jnp.exp(frozen["clip"]["params"]["logit_scale"])
    return scale * image_features @ text_features(tunable["ctx"], frozen["clip"]).T

  def init(rng, clip_variables):
    fixed = jnp.zeros((len(class_names), length, clip_model.text_width), jnp.float32)
    return learner.init(rng, fixed, context_index, word_embeddings(clip_variables))["params"]

  return PromptPolicy(logits, init, (blocks[0].length, clip_model.text_width))


def _prompt_mode(clip_model, clip_variables, class_names, vocab_path, *, n_ctx, ctx_init, ctx,
                 keep_underscores, selection, seed):
  """TPT's prompt tuning: (prepare, loss, predict, tunable0, frozen)."""
  if keep_underscores:
    raise ValueError("keep_underscores is image mode's hard-prompt quirk; prompt mode replaces "
                     "'_' in ctx_init by ' ' as TPT does.")
  policy = prompt_policy(clip_model, class_names, vocab_path, n_ctx=n_ctx, ctx_init=ctx_init)
  logits = policy.logits

  def prepare(tunable0, frozen, views, rng):
    del rng
    image_features = jax.lax.stop_gradient(clip.normalize(clip_model.apply(
        frozen["clip"], views, method=clip.Model.encode_image)))  # (V, E)
    selected = tta.entropy_selection(logits(tunable0, frozen, image_features), selection)
    return {"selected": selected, "image_features": image_features[selected],
            "view0": image_features[:1]}

  def loss(tunable, frozen, context, rng):
    del rng
    return tta.marginal_entropy(logits(tunable, frozen, context["image_features"]))

  def predict(tunable, frozen, context):
    return logits(tunable, frozen, context["view0"])[0]

  shape = policy.context_shape
  if ctx is not None:
    if tuple(np.shape(ctx)) != shape:
      raise ValueError(
          f"The given TPT context has shape {tuple(np.shape(ctx))}; the prompts need {shape} "
          f"(n_ctx={shape[0]}: " + (f"the token count of ctx_init={ctx_init!r}" if ctx_init
                                    else "n_ctx") + f"; text width {shape[1]}). Set n_ctx (and "
          "ctx_init='' when the context comes from a checkpoint) to match it.")
    tunable0 = {"ctx": jnp.asarray(ctx, jnp.float32)}
  else:
    tunable0 = policy.init(jax.random.PRNGKey(seed), clip_variables)
  return prepare, loss, predict, tunable0, {"clip": clip_variables}


def _image_mode(clip_model, clip_variables, class_names, vocab_path, *, n_ctx, ctx_init, ctx,
                keep_underscores, selection, seed):
  """RLCF's TPT image-encoder baseline: (prepare, loss, predict, tunable0, frozen)."""
  del n_ctx, seed
  if ctx is not None:
    raise ValueError("ctx is prompt mode's initial context; image mode tunes the visual tower "
                     "and prompts the classes with the words of ctx_init.")
  if not ctx_init:
    raise ValueError("Image mode prompts the classes with '{ctx_init} {name}.'; ctx_init is "
                     "empty.")
  prefix = ctx_init if keep_underscores else ctx_init.replace("_", " ")
  ids = hard_prompt_ids(vocab_path, class_names, prefix, clip_model.context_length)
  text_features = clip.normalize(jax.jit(clip_model.apply, static_argnames="method")(
      clip_variables, ids, method=clip.Model.encode_text))
  params = dict(clip_variables["params"])
  tunable0 = params.pop("visual")
  frozen = {"clip": {**clip_variables, "params": params}, "text_features": text_features}

  def logits(visual, frozen, images):  # (N, C)
    variables = {**frozen["clip"], "params": {**frozen["clip"]["params"], "visual": visual}}
    return image_logits(clip_model, variables, images, frozen["text_features"])

  def prepare(tunable0, frozen, views, rng):
    del rng
    selected = tta.entropy_selection(logits(tunable0, frozen, views), selection)
    return {"selected": selected, "views": views[selected], "view0": views[:1]}

  def loss(tunable, frozen, context, rng):
    del rng
    return tta.marginal_entropy(logits(tunable, frozen, context["views"]))

  def predict(tunable, frozen, context):
    return logits(tunable, frozen, context["view0"])[0]

  return prepare, loss, predict, tunable0, frozen


def load_coop_context(path: str) -> np.ndarray:
  """The shared context (n_ctx, W) float32 of a CoOp checkpoint, as TPT's `--load` reads it
  (`torch.load(path)['state_dict']['ctx']`): KaiyangZhou/CoOp's `prompt_learner/model.pth.tar-N`
  (any name; read with `torch.load(weights_only=True)`), a plain state dict with 'ctx', an
  `.npz` with 'ctx' or 'prompt_learner/ctx', or the workdir of a CoOp run of this library
  (`configs/coop.py:n_ctx=4`; its latest checkpoint, `checkpointing.read_run`). Raises a
  ValueError naming the file when the context is missing or not 2-D (CoOp's class-specific
  contexts are 3-D; TPT tunes a shared one)."""
  path = os.fspath(path)
  if os.path.isdir(path):  # a CoOp run of this library: its latest checkpoint's trained params
    step, state = checkpointing.read_run(path)
    arrays = traverse_util.flatten_dict(state["params"], sep="/")
    names = ("prompt_learner/ctx",)
    path = f"{path} (step {step})"
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"CoOp checkpoint {path!r} does not exist.")
  elif path.lower().endswith(".npz"):
    arrays = common.load_npz(path)
    names = ("ctx", "prompt_learner/ctx")
  else:
    state = common.torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
      state = state["state_dict"]  # Dassl's checkpoint: {'state_dict', 'epoch', 'optimizer', ...}
    arrays = state if isinstance(state, dict) else {}
    names = ("ctx",)
  found = [name for name in names if name in arrays]
  if not found:
    raise ValueError(f"{path!r} has no CoOp context {' or '.join(map(repr, names))}; its entries: "
                     f"{sorted(map(str, arrays))[:10]}.")
  value = arrays[found[0]]
  ctx = np.asarray(value.float().numpy() if hasattr(value, "float") else value, np.float32)
  if ctx.ndim != 2:
    raise ValueError(f"{path!r}: the context {found[0]!r} has shape {ctx.shape}; TPT tunes one "
                     f"context shared by all classes, (n_ctx, width) (a 3-D context is CoOp's "
                     f"class-specific csc=True).")
  return ctx


# ------------------------------------------------------------------------------------------------
# The method: zero-shot CLIP as the model, the CLIPs handed to the 'tta' evaluator.

TRAINABLE_PARAMS = r"clip/.*"  # only the embedded demos train (they pre-fit the tiny CLIP)


def zeroshot_logits(clip_model: clip.Model, images, token_ids):
  """exp(logit_scale) · cos(images (B, H, W, 3), texts of `token_ids` (C, L)) -> (B, C), inside a
  bound `clip_model` (CLIP in eval mode: ResNet BatchNorm on running statistics)."""
  image_features = clip.normalize(clip_model.encode_image(images, train=False))
  text_features = clip.normalize(clip_model.encode_text(jnp.asarray(token_ids)))
  return jnp.exp(clip_model.logit_scale) * image_features @ text_features.T


def class_prompt_ids(vocab_path: str, class_names: Sequence[str], ctx_init: str,
                     context_length: int) -> np.ndarray:
  """`hard_prompt_ids` of "{ctx_init} {name}." ('_' -> ' ' in ctx_init too), cut after the last
  EOT (the causal text tower gives the same EOT features on fewer positions)."""
  ids = hard_prompt_ids(vocab_path, class_names, ctx_init.replace("_", " "), context_length)
  return ids[:, :int(ids.argmax(-1).max()) + 1]


class Model(nn.Module):
  """CLIP with the hard class prompts "{ctx_init} {name}.": `(images, train)` -> (zero-shot logits
  (B, num_classes), aux {}). Params: `clip/...` (`clip.Model` of `variant`)."""
  num_classes: int
  class_names: Sequence[str] = ()
  variant: str = "ViT-B/16"
  vocab_path: str = ""
  dtype: Any = jnp.float32
  ctx_init: str = "a photo of a"

  def setup(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(
          f"TPT needs one class name per class: got {len(self.class_names)} names for "
          f"{self.num_classes} classes (the data source provides `class_names`, or set "
          f"config.model.class_names).")
    if not self.ctx_init:
      raise ValueError("The TPT/RLCF model prompts the classes with '{ctx_init} {name}.'; "
                       "config.model.ctx_init is empty.")
    self.clip = clip.Model(**coop.clip_config(self.variant, self.dtype))
    self.token_ids = self.class_prompts(self.clip.context_length)

  def class_prompts(self, context_length: int) -> np.ndarray:
    """`class_prompt_ids` of the classes. A source without classes (image-text retrieval) gets
    the bare prompt, so that the text tower still runs and its params exist."""
    return class_prompt_ids(self.vocab_path, tuple(self.class_names) or ("",), self.ctx_init,
                            context_length)

  def class_logits(self, tower: clip.Model, images, token_ids):
    """`zeroshot_logits` (B, num_classes) of a bound CLIP (no classes: (B, 0))."""
    return zeroshot_logits(tower, images, token_ids)[:, :self.num_classes]

  def __call__(self, images, *, train: bool = False):
    del train  # CLIP in eval mode, as the originals' TTA
    return self.class_logits(self.clip, images, self.token_ids), {}


class TtaClips(NamedTuple):
  """What the 'tta' evaluator adapts with: policy (clip.Model, clip variables); rewards
  ((clip.Model, clip variables, weight), ...) (TPT: none)."""
  policy: tuple
  rewards: tuple = ()


def clip_variables(variables, subtree: str) -> dict:
  """The variables of the CLIP submodule `subtree` ('clip', 'reward_0', ...) of a model's
  variables: that subtree of every collection that has it."""
  return {c: tree[subtree] for c, tree in variables.items() if subtree in tree}


@dataclasses.dataclass(frozen=True)
class TtaClipsFn:
  """The predict function 'tta_clips': host-side `(variables) -> TtaClips` of a TPT/RLCF model.
  It also tells the evaluator, before any variables exist, the model's label space
  (`class_names`), its vocabulary and how many reward CLIPs it has.

  policy: (subtree, CLIP variant) of the policy; rewards: ((subtree, variant, weight), ...)."""
  class_names: tuple
  vocab_path: str
  dtype: Any
  policy: tuple
  rewards: tuple = ()

  def __call__(self, variables) -> TtaClips:
    def tower(subtree, variant):
      return clip.Model(**coop.clip_config(variant, self.dtype)), clip_variables(variables,
                                                                                 subtree)
    return TtaClips(tower(*self.policy),
                    tuple((*tower(subtree, variant), weight)
                          for subtree, variant, weight in self.rewards))


def predict_fns(model: Model, config=None, rewards: tuple = ()) -> dict:
  """`coop.clip_predict_fns` (the policy CLIP 'clip') plus 'tta_clips' (`TtaClipsFn`); `rewards`:
  the reward CLIPs as `TtaClipsFn.rewards` (RLCF's model)."""
  return {**coop.clip_predict_fns(model, config),
          "tta_clips": TtaClipsFn(tuple(model.class_names), model.vocab_path, model.dtype,
                                  ("clip", model.variant), tuple(rewards))}


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, loaders={"model": coop.load_clip},
                       predict_fns=predict_fns)
