"""Optimizers for prompt tuning: a trainable/frozen partition of the param tree, parameter groups,
schedules, SGD/AdamW.

The partition follows big_vision's `optax.py` and scenic's `get_optimizer` in spirit: a regex over
'/'-joined param names decides which leaves train (`param_labels`). The optimizer is built over the
trainable subtree only, so frozen leaves carry no optimizer state and no weight decay or momentum
can move them (a zero learning rate would not do that); the train step differentiates that subtree
and merges it back. Within it, `optim.param_groups` gives named groups their own lr multiplier and
weight decay, as PyTorch originals do with optimizer param groups (microsoft/GLIP
`maskrcnn_benchmark/solver/build.py` make_optimizer trains the language backbone at
SOLVER.LANG_LR, 1e-5 = 0.1x BASE_LR in `configs/pretrain/glip_Swin_T_O365.yaml`).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

TRAIN, FROZEN = "train", "frozen"
# optim.plateau: torch's ReduceLROnPlateau (its defaults; threshold_mode 'rel', no cooldown) on an
# evaluation metric ('' = off).
PLATEAU_DEFAULTS = dict(metric="", mode="max", factor=0.1, patience=10, min_lr=0.0,
                        threshold=1e-4)
# optim.param_groups entries: `regex` full-matches '/'-joined trainable param names; the group's lr
# is lr_mult times the schedule; weight_decay None = optim.weight_decay.
GROUP_DEFAULTS = dict(regex=None, lr_mult=1.0, weight_decay=None)
DEFAULT_GROUP = "default"  # the trainable params that no named group matches
SCHEDULE_UNITS = ("step", "epoch")


def param_labels(params, trainable_regex: str):
  """Tree of 'train'/'frozen' labels: a leaf trains when its '/'-joined name full-matches."""
  pattern = re.compile(trainable_regex)
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: TRAIN if pattern.fullmatch(k) else FROZEN for k in flat}
  if TRAIN not in labels.values():
    raise ValueError(f"trainable_params={trainable_regex!r} matches no parameter; names look like "
                     f"{sorted(flat)[:5]}.")
  return traverse_util.unflatten_dict(labels, sep="/")


def trainable_subset(params, labels):
  """The leaves of `params` labelled TRAIN, as a tree: what the optimizer and checkpoints hold."""
  flat, flat_labels = (traverse_util.flatten_dict(t, sep="/") for t in (params, labels))
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if flat_labels[k] == TRAIN}, sep="/")


def with_trainable(params, subset):
  """`params` with the leaves of `subset` put back (frozen leaves untouched, bit-identical)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update(traverse_util.flatten_dict(subset, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def make_schedule(*, lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
                  warmup_init: float = 0.0, warmup_type: str = "linear", decay: str = "cosine",
                  milestones=(), decay_factor: float = 0.1):
  """Warmup over `warmup_steps`, then a decay from `lr` (cosine to `min_lr` at `total_steps`).

  warmup_type 'linear' ramps from `warmup_init` to `lr` (VPT, SA2VP); 'constant' holds
  `warmup_init` (CoOp's ConstantWarmupScheduler: 1e-5 for the first epoch) and then starts the
  cosine at `lr`. This is the per-step form (optim.schedule_unit='step'); `make_epoch_schedule`
  is Dassl's per-epoch one exactly.

  decay='linear' decays linearly from `lr` to `min_lr` at `total_steps` after a linear warmup.

  decay='multistep' is maskrcnn_benchmark's WarmupMultiStepLR (microsoft/GLIP
  `maskrcnn_benchmark/solver/lr_scheduler.py`, as GLIP's yamls set it): lr times `decay_factor`
  for every milestone passed, `milestones` given as fractions of `total_steps` (GLIP: 0.67 and
  0.89; none: a constant lr after the warmup, as GLIP's ODinW runs whose steps come from the
  plateau rule); the linear warmup multiplies it (the two overlap when a milestone falls in the
  warmup, as in the original, and the warmup may be as long as the run or longer: SDPT's GLIP-L
  yaml warms up over all its 2000 iterations). `min_lr` does not apply to it.
  """
  if warmup_steps >= total_steps and decay != "multistep":  # GLIP's may outlast its run (SDPT)
    raise ValueError(f"warmup_steps={warmup_steps} must be below total_steps={total_steps}.")
  if warmup_type not in ("linear", "constant"):
    raise ValueError(f"optim.warmup_type={warmup_type!r}: expected 'linear' or 'constant'.")
  if decay == "multistep":
    fractions = tuple(milestones)
    if not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fractions) \
        or list(fractions) != sorted(fractions):
      raise ValueError(f"optim.milestones={milestones!r}: expected increasing fractions of the "
                       "training steps in (0, 1), e.g. (0.67, 0.89) as GLIP.")
    boundaries = jnp.asarray(milestone_steps(fractions, total_steps))

    def multistep(count):
      steps_passed = jnp.sum(count >= boundaries)
      decayed = lr * decay_factor ** steps_passed
      if not warmup_steps:
        return decayed
      if warmup_type == "constant":
        warm = warmup_init / lr if lr else 1.0
      else:
        alpha = count / warmup_steps
        warm = (warmup_init / lr if lr else 0.0) * (1 - alpha) + alpha
      return jnp.where(count < warmup_steps, decayed * warm, decayed)

    return multistep
  if decay == "linear":  # transformers' get_linear_schedule_with_warmup (ClipCap, RLCF captioning)
    return optax.join_schedules([
        optax.linear_schedule(warmup_init, lr, warmup_steps),
        optax.linear_schedule(lr, min_lr, total_steps - warmup_steps)], [warmup_steps])
  if decay != "cosine":
    raise ValueError(f"optim.decay={decay!r}: expected 'cosine', 'linear' or 'multistep'.")
  if warmup_type == "linear":
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_init, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=min_lr)
  cosine = optax.cosine_decay_schedule(lr, total_steps - warmup_steps,
                                       alpha=min_lr / lr if lr else 0.0)
  return optax.join_schedules([optax.constant_schedule(warmup_init), cosine], [warmup_steps])


def milestone_steps(fractions, total_steps: int) -> list[int]:
  """The steps at which 'multistep' lowers the lr: each fraction of `total_steps`, rounded as
  maskrcnn_benchmark's `make_lr_scheduler` rounds SOLVER.STEPS (microsoft/GLIP
  `maskrcnn_benchmark/solver/build.py`)."""
  return [round(f * total_steps) for f in fractions]


def weight_decay_schedule(optim, weight_decay: float, *, total_steps: int):
  """`weight_decay`, or with optim.weight_decay_schedule_ratio = r > 0 GLIP's
  SOLVER.WEIGHT_DECAY_SCHEDULE: the decay times optim.decay_factor for every lr milestone m
  (in updates) with count >= r * m, i.e. it drops ahead of the lr (GLIP's ratio 0.667; microsoft/
  GLIP `maskrcnn_benchmark/engine/trainer.py`, which multiplies every group's weight_decay by the
  scheduler's gamma after the step that reaches the threshold). `total_steps` counts updates."""
  ratio = optim.get("weight_decay_schedule_ratio", 0.0)
  if not ratio or not weight_decay:
    return weight_decay
  if optim.get("decay", "cosine") != "multistep":
    raise ValueError(f"optim.weight_decay_schedule_ratio={ratio} follows the milestones of "
                     f"optim.decay='multistep'; got optim.decay={optim.get('decay')!r}.")
  thresholds = jnp.asarray([ratio * m for m in milestone_steps(
      tuple(optim.get("milestones", ()) or ()), total_steps)] or [jnp.inf])
  factor = optim.get("decay_factor", 0.1)
  return lambda count: weight_decay * factor ** jnp.sum(count >= thresholds)


def make_epoch_schedule(*, lr: float, num_epochs: float, warmup_epochs: int,
                        steps_per_epoch: int, accum: int = 1, min_lr: float = 0.0,
                        warmup_init: float = 0.0, warmup_type: str = "linear"):
  """Dassl's per-epoch lr (CoOp's scheduler), as a function of the optimizer update count.

  KaiyangZhou/Dassl.pytorch `dassl/optim/lr_scheduler.py` (`build_lr_scheduler`): a torch
  `CosineAnnealingLR(optimizer, float(max_epoch))` wrapped by `ConstantWarmupScheduler` or
  `LinearWarmupScheduler`, stepped once at the end of every epoch, so the lr is constant within an
  epoch. For epoch e (0-based), W = warmup_epochs, E = num_epochs:

    e < W, 'constant':  warmup_init                       (WARMUP_CONS_LR)
    e < W, 'linear':    warmup_init at e = 0 (WARMUP_MIN_LR), else lr · e / W
    e >= W:             min_lr + (lr - min_lr) · (1 + cos(π (e - W) / E)) / 2

  The cosine restarts at the end of the warmup (Dassl's default WARMUP_RECOUNT=True) but keeps
  T_max = E, so it does not reach min_lr at the last epoch (CoOp, E=200, W=1: sin²(π/200) ≈
  2.5e-4 · lr). Dassl's eta_min is 0; min_lr defaults to that. The per-epoch lrs are computed in
  float64, as torch does. `steps_per_epoch` counts train-step calls; with `accum`
  (grad_accum_steps) micro-batches per update, update u takes the lr of the epoch of its last
  micro-batch, train step (u + 1) · accum - 1, when torch's optimizer.step() would run.
  """
  if warmup_type not in ("linear", "constant"):
    raise ValueError(f"optim.warmup_type={warmup_type!r}: expected 'linear' or 'constant'.")
  if warmup_epochs >= num_epochs:
    raise ValueError(f"warmup_epochs={warmup_epochs} must be below num_epochs={num_epochs}.")

  def epoch_lr(e: int) -> float:  # in float64: float32 cancels in 1 + cos near the end
    if e < warmup_epochs:
      return warmup_init if warmup_type == "constant" or e == 0 else lr * e / warmup_epochs
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (e - warmup_epochs) / num_epochs)) / 2

  table = jnp.asarray([epoch_lr(e) for e in range(max(1, math.ceil(num_epochs)))], jnp.float32)

  def schedule(count):
    epoch = ((jnp.asarray(count, jnp.int32) + 1) * accum - 1) // steps_per_epoch
    return table[jnp.clip(epoch, 0, table.shape[0] - 1)]  # past the end: the last epoch's lr

  return schedule


def make_lr_schedule(optim, *, total_steps: int, warmup_steps: int, steps_per_epoch: int = 0):
  """The base lr schedule of `optim` (the 'default' group's), over optimizer updates.

  `total_steps`, `warmup_steps` and `steps_per_epoch` count train-step calls; with
  `grad_accum_steps=k` the schedule advances once every k calls. optim.schedule_unit 'step'
  (`make_schedule`) changes the lr every update; 'epoch' (`make_epoch_schedule`) once per epoch, as
  CoOp's Dassl scheduler, and needs `steps_per_epoch` and a warmup of whole epochs.
  """
  accum = int(optim.get("grad_accum_steps", 1))
  unit = optim.get("schedule_unit", "step")
  kw = dict(lr=optim.lr, min_lr=optim.get("min_lr", 0.0),
            warmup_init=optim.get("warmup_init", 0.0),
            warmup_type=optim.get("warmup_type", "linear"))
  if unit == "step":
    return make_schedule(total_steps=total_steps // accum, warmup_steps=warmup_steps // accum,
                         decay=optim.get("decay", "cosine"),
                         milestones=tuple(optim.get("milestones", ()) or ()),
                         decay_factor=optim.get("decay_factor", 0.1), **kw)
  if unit != "epoch":
    raise ValueError(f"optim.schedule_unit={unit!r}: expected one of {SCHEDULE_UNITS}.")
  if steps_per_epoch <= 0:
    raise ValueError(f"optim.schedule_unit='epoch' needs steps_per_epoch > 0 (got "
                     f"{steps_per_epoch}): make_optimizer(..., steps_per_epoch=...).")
  if warmup_steps % steps_per_epoch:
    raise ValueError(f"optim.schedule_unit='epoch' warms up for whole epochs: warmup_steps="
                     f"{warmup_steps} is not a multiple of steps_per_epoch={steps_per_epoch} "
                     "(set optim.warmup_epochs instead of optim.warmup_steps).")
  return make_epoch_schedule(num_epochs=total_steps / steps_per_epoch,
                             warmup_epochs=warmup_steps // steps_per_epoch,
                             steps_per_epoch=steps_per_epoch, accum=accum, **kw)


def param_group_settings(optim) -> list[tuple[str, dict]]:
  """optim.param_groups as [(name, {regex, lr_mult, weight_decay})], checked, in matching order.

  Give it as a tuple of (name, settings) pairs: the first group whose regex matches a param takes
  it. A mapping is accepted too, but ConfigDict sorts its keys, so there a param that two groups
  match is an error (see `group_labels`) rather than a silent choice by name.
  """
  given = optim.get("param_groups") or ()
  pairs = list(given.items()) if hasattr(given, "items") else list(given)
  groups, names = [], set()
  for entry in pairs:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and hasattr(entry[1], "items")):
      raise ValueError(f"optim.param_groups entry {entry!r}: expected a (name, "
                       f"{{'regex': ..., 'lr_mult': ..., 'weight_decay': ...}}) pair.")
    name, settings = entry[0], dict(entry[1])
    where = f"optim.param_groups[{name!r}]"
    if name == DEFAULT_GROUP or not name:
      raise ValueError(f"{where}: the name {name!r} is reserved (the params that no group "
                       "matches form the group 'default', at lr_mult 1 and optim.weight_decay).")
    if name in names:
      raise ValueError(f"{where}: the group name appears twice.")
    names.add(name)
    unknown = set(settings) - set(GROUP_DEFAULTS)
    if unknown:
      raise ValueError(f"{where}: unknown settings {sorted(unknown)}; valid: "
                       f"{sorted(GROUP_DEFAULTS)}.")
    settings = {**GROUP_DEFAULTS, **settings}
    if not isinstance(settings["regex"], str) or not settings["regex"]:
      raise ValueError(f"{where}.regex={settings['regex']!r}: expected a regex over "
                       "'/'-joined param names.")
    try:
      re.compile(settings["regex"])
    except re.error as e:
      raise ValueError(f"{where}.regex={settings['regex']!r} is not a regex: {e}.") from None
    for key, allow_none in (("lr_mult", False), ("weight_decay", True)):
      value = settings[key]
      if value is None and allow_none:
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{where}.{key}={value!r}: expected a number >= 0"
                         + (" or None (optim.weight_decay)." if allow_none else "."))
    groups.append((name, settings))
  return groups


def group_labels(optim, params):
  """Tree of group names over `params` (the trainable subtree): the first group of
  optim.param_groups whose regex full-matches the '/'-joined name, else 'default'."""
  groups = param_group_settings(optim)
  ordered = not hasattr(optim.get("param_groups") or (), "items")
  patterns = [(name, re.compile(settings["regex"])) for name, settings in groups]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for key in flat:
    matches = [name for name, pattern in patterns if pattern.fullmatch(key)]
    if len(matches) > 1 and not ordered:
      raise ValueError(f"Param {key!r} matches optim.param_groups {matches}; as a mapping they "
                       "have no order: give (name, settings) pairs, first match wins.")
    labels[key] = matches[0] if matches else DEFAULT_GROUP
  for name, pattern in patterns:
    if not any(pattern.fullmatch(k) for k in flat):
      raise ValueError(f"optim.param_groups[{name!r}].regex={pattern.pattern!r} matches no "
                       f"trainable parameter; names look like {sorted(flat)[:5]}.")
    if name not in labels.values():
      raise ValueError(f"optim.param_groups[{name!r}]: every param its regex matches is taken by "
                       "an earlier group.")
  return traverse_util.unflatten_dict(labels, sep="/")


class PlateauState(NamedTuple):
  """The plateau rule's state, inside the optimizer state so that checkpoints carry it."""
  lr_factor: jnp.ndarray          # f32 (): multiplies every update (the lr is schedule · factor)
  plateau_best: jnp.ndarray       # f32 (): the best metric so far (∓inf before the first)
  plateau_bad_evals: jnp.ndarray  # int32 (): evaluations since the last improvement


def scale_by_plateau(mode: str = "max") -> optax.GradientTransformation:
  """Multiplies the updates by `lr_factor`, which `plateau_step` lowers between steps.

  Last in the chain, this is exactly a change of the learning rate for SGD (momentum included:
  the momentum buffer does not depend on the lr) and for AdamW (decoupled decay is lr-scaled too).
  """
  if mode not in ("max", "min"):
    raise ValueError(f"optim.plateau.mode={mode!r}: expected 'max' or 'min'.")

  def init(params):
    del params
    return PlateauState(jnp.ones((), jnp.float32),
                        jnp.full((), -jnp.inf if mode == "max" else jnp.inf, jnp.float32),
                        jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.lr_factor.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


class ParamsEmaState(NamedTuple):
  """An exponential moving average of the trained params, inside the optimizer state."""
  params_ema: dict


def params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps `decay` * ema + (1 - decay) * params after each update (microsoft/GLIP
  `maskrcnn_benchmark/utils/ema.py` ModelEma, SOLVER.MODEL_EMA: initialised to the params,
  updated after every optimizer step). Last in the chain, so `params + updates` are the new
  params; it leaves the updates unchanged."""
  if not 0.0 < decay < 1.0:
    raise ValueError(f"optim.ema_decay={decay!r}: expected a number in (0, 1), e.g. 0.999.")

  def init(params):
    return ParamsEmaState(jax.tree.map(jnp.array, params))

  def update(updates, state, params=None):
    new = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
    ema = jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, state.params_ema, new)
    return updates, ParamsEmaState(ema)

  return optax.GradientTransformation(init, update)


def ema_of(opt_state):
  """The EMA of the trained params in `opt_state` (`params_ema`), or None without one."""
  return optax.tree_utils.tree_get(opt_state, "params_ema")


def plateau_settings(optim):
  """optim.plateau with defaults, or None when no plateau metric is set."""
  given = dict(optim.get("plateau") or {})
  unknown = set(given) - set(PLATEAU_DEFAULTS)
  if unknown:
    raise ValueError(f"Unknown optim.plateau settings {sorted(unknown)}; valid: "
                     f"{sorted(PLATEAU_DEFAULTS)}.")
  settings = {**PLATEAU_DEFAULTS, **given}
  return settings if settings["metric"] else None


def lr_factor(opt_state) -> float:
  """The plateau factor in `opt_state` (1.0 without a plateau rule)."""
  factor = optax.tree_utils.tree_get(opt_state, "lr_factor")
  return 1.0 if factor is None else float(factor)


def plateau_step(opt_state, metrics: dict, optim):
  """One `ReduceLROnPlateau.step(metrics[plateau.metric])` on the state inside `opt_state`.

  As torch (defaults too): the metric improves when it beats best · (1 ± threshold); after more
  than `patience` evaluations without improvement the lr is multiplied by `factor`, not below
  `min_lr` (here lr = optim.lr · factor, so min_lr acts relative to optim.lr; one factor scales
  every param group, so a group at lr_mult m floors at m · min_lr where torch floors each group at
  min_lr), and the count restarts. Returns the new opt_state (its leaves keep their shardings).
  """
  plateau = plateau_settings(optim)
  if plateau["metric"] not in metrics:
    raise ValueError(f"optim.plateau.metric={plateau['metric']!r} is not among the evaluation "
                     f"metrics {sorted(metrics)}.")
  value = float(metrics[plateau["metric"]])
  old = {k: optax.tree_utils.tree_get(opt_state, k) for k in PlateauState._fields}
  factor, best, bad = (float(old["lr_factor"]), float(old["plateau_best"]),
                       int(old["plateau_bad_evals"]))
  if plateau["mode"] == "max":  # torch's rule as written (also for a negative best)
    better = value > best * (1 + plateau["threshold"])
  else:
    better = value < best * (1 - plateau["threshold"])
  best, bad = (value, 0) if better else (best, bad + 1)
  if bad > plateau["patience"]:
    reduced = max(factor * plateau["factor"], plateau["min_lr"] / optim.lr)
    if (factor - reduced) * optim.lr > 1e-8:  # torch's eps
      factor = reduced
    bad = 0
  new = {"lr_factor": np.float32(factor), "plateau_best": np.float32(best),
         "plateau_bad_evals": np.int32(bad)}
  return optax.tree_utils.tree_set(
      opt_state, **{k: jax.device_put(v, old[k].sharding) for k, v in new.items()})


def _group_transform(optim, learning_rate, weight_decay, decay_mask):
  """One group's SGD or AdamW (as torch's, with that group's lr and weight decay)."""
  if optim.name == "sgd":
    # PyTorch SGD's coupled L2: wd * p is added to the gradient before momentum (as VPT trains).
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.sgd(learning_rate, momentum=optim.get("momentum", 0.9) or None))
  if optim.name == "adamw":
    return optax.adamw(learning_rate, b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999),
                       eps=optim.get("eps", 1e-8), weight_decay=weight_decay, mask=decay_mask)
  raise ValueError(f"optim.name={optim.name!r}: expected 'sgd' or 'adamw'.")


def make_optimizer(optim, params, *, total_steps: int, warmup_steps: int,
                   steps_per_epoch: int = 0):
  """Builds the optax transform for `optim` (a ConfigDict, see configs) over `params`, the
  trainable subtree (every leaf trains), and its base lr schedule.

  The chain is: global grad-norm clipping over all trainable params (GLIP's full-model clipping),
  then `optax.multi_transform` over the parameter groups (`group_labels`), each its own SGD/AdamW
  at lr_mult · schedule with its weight decay (the `no_weight_decay` params are never decayed),
  then the plateau factor, then with optim.ema_decay > 0 the params' moving average
  (`params_ema`; evaluators use it with optim.ema_for_eval). `total_steps`, `warmup_steps` and
  `steps_per_epoch` (needed by optim.schedule_unit='epoch') count train-step calls; with
  `grad_accum_steps=k` the whole chain (`optax.MultiSteps`) and its schedule advance once every k
  calls, on the mean of the k gradients. With `optim.plateau` (see `plateau_step`) the lr is the
  schedule times a factor that the train loop lowers when an evaluation metric stops improving.
  Without param_groups this is one 'default' group, and the updates are those of the optimizer
  built over the full tree before.
  """
  accum = int(optim.get("grad_accum_steps", 1))
  schedule = make_lr_schedule(optim, total_steps=total_steps, warmup_steps=warmup_steps,
                              steps_per_epoch=steps_per_epoch)
  no_decay = re.compile(optim.get("no_weight_decay", "") or "(?!)")
  flat = traverse_util.flatten_dict(params, sep="/")
  decay_mask = traverse_util.unflatten_dict(
      {k: not no_decay.fullmatch(k) for k in flat}, sep="/")
  labels = group_labels(optim, params)
  used = set(traverse_util.flatten_dict(labels, sep="/").values())
  settings = [(DEFAULT_GROUP, GROUP_DEFAULTS)] + param_group_settings(optim)
  group_txs = {}
  for name, group in settings:
    if name not in used:  # only 'default' can be empty (group_labels checks the named ones)
      continue
    mult = group["lr_mult"]
    learning_rate = schedule if mult == 1.0 else (lambda count, m=mult: m * schedule(count))
    weight_decay = optim.weight_decay if group["weight_decay"] is None else group["weight_decay"]
    weight_decay = weight_decay_schedule(optim, weight_decay, total_steps=total_steps // accum)
    group_txs[name] = _group_transform(optim, learning_rate, weight_decay, decay_mask)
  parts = []
  if optim.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.multi_transform(group_txs, labels))
  plateau = plateau_settings(optim)
  if plateau:
    parts.append(scale_by_plateau(plateau["mode"]))
  if optim.get("ema_decay", 0.0):
    parts.append(params_ema(optim.ema_decay))
  tx = optax.chain(*parts)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule


def parameter_table(params, labels) -> str:
  """Parameter counts, trainable and total, per top-level group (a group mixing trainable and
  frozen params is split by its second level, layer indices folded: `cross_block_*`)."""
  flat_labels = traverse_util.flatten_dict(labels, sep="/")
  top_mixed = {}
  for name, label in flat_labels.items():
    top_mixed.setdefault(name.split("/")[0], set()).add(label)
  rows = {}
  for name, leaf in traverse_util.flatten_dict(params, sep="/").items():
    parts = name.split("/")
    group = parts[0]
    if len(top_mixed[group]) > 1 and len(parts) > 1:
      group += "/" + re.sub(r"_\d+$", "_*", parts[1])
    count, trainable = rows.get(group, (0, 0))
    size = int(np.prod(leaf.shape))
    rows[group] = (count + size, trainable + (size if flat_labels[name] == TRAIN else 0))
  total = sum(c for c, _ in rows.values())
  trainable = sum(t for _, t in rows.values())
  frozen = total - trainable
  width = max(len(g) for g in rows) + 2
  lines = [f"{'group':<{width}}{'params':>14}{'trainable':>14}"]
  lines += [f"{g:<{width}}{c:>14,}{t:>14,}" for g, (c, t) in sorted(rows.items())]
  lines.append(f"{'total':<{width}}{total:>14,}{trainable:>14,}")
  if frozen:
    lines.append(f"trainable: {trainable:,} params = {100.0 * trainable / frozen:.3f}% of the "
                 f"frozen backbone ({frozen:,} params)")
  else:
    lines.append(f"trainable: all {trainable:,} params (nothing frozen)")
  return "\n".join(lines)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
