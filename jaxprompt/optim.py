"""Optimizers for prompt tuning: a trainable/frozen partition of the param tree, schedules, SGD/AdamW.

The partition follows big_vision's `optax.py` and scenic's `get_optimizer` in spirit: a regex over
'/'-joined param names decides which leaves train; `optax.multi_transform` gives the frozen
leaves `optax.set_to_zero()` so they carry no optimizer state (EmptyState) and no weight decay or
momentum can move them. A zero learning rate would not do that.
"""
from __future__ import annotations

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


def param_labels(params, trainable_regex: str):
  """Tree of 'train'/'frozen' labels: a leaf trains when its '/'-joined name full-matches."""
  pattern = re.compile(trainable_regex)
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: TRAIN if pattern.fullmatch(k) else FROZEN for k in flat}
  if TRAIN not in labels.values():
    raise ValueError(f"trainable_params={trainable_regex!r} matches no parameter; names look like "
                     f"{sorted(flat)[:5]}.")
  return traverse_util.unflatten_dict(labels, sep="/")


def make_schedule(*, lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
                  warmup_init: float = 0.0, warmup_type: str = "linear"):
  """Warmup over `warmup_steps`, then cosine decay from `lr` to `min_lr` at `total_steps`.

  warmup_type 'linear' ramps from `warmup_init` to `lr` (VPT, SA2VP); 'constant' holds
  `warmup_init` (CoOp's ConstantWarmupScheduler: 1e-5 for the first epoch) and then starts the
  cosine at `lr`.
  """
  if warmup_steps >= total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be below total_steps={total_steps}.")
  if warmup_type == "linear":
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_init, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=min_lr)
  if warmup_type == "constant":
    cosine = optax.cosine_decay_schedule(lr, total_steps - warmup_steps,
                                         alpha=min_lr / lr if lr else 0.0)
    return optax.join_schedules([optax.constant_schedule(warmup_init), cosine], [warmup_steps])
  raise ValueError(f"optim.warmup_type={warmup_type!r}: expected 'linear' or 'constant'.")


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
  `min_lr` (here lr = optim.lr · factor, so min_lr acts relative to optim.lr), and the count
  restarts. Returns the new opt_state (its leaves keep their shardings).
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


def make_optimizer(optim, params, labels, *, total_steps: int, warmup_steps: int):
  """Builds the optax transform for `optim` (a ConfigDict, see configs) and its lr schedule.

  `total_steps` counts train-step calls; with `grad_accum_steps=k` the optimizer (and its
  schedule) advances once every k calls, on the mean of the k gradients. With `optim.plateau`
  (see `plateau_step`) the lr is the schedule times a factor that the train loop lowers when an
  evaluation metric stops improving.
  """
  accum = int(optim.get("grad_accum_steps", 1))
  updates = total_steps // accum
  schedule = make_schedule(lr=optim.lr, total_steps=updates,
                           warmup_steps=warmup_steps // accum,
                           min_lr=optim.get("min_lr", 0.0),
                           warmup_init=optim.get("warmup_init", 0.0),
                           warmup_type=optim.get("warmup_type", "linear"))
  no_decay = re.compile(optim.get("no_weight_decay", "") or "(?!)")
  flat = traverse_util.flatten_dict(params, sep="/")
  decay_mask = traverse_util.unflatten_dict(
      {k: not no_decay.fullmatch(k) for k in flat}, sep="/")
  parts = []
  if optim.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  if optim.name == "sgd":
    # PyTorch SGD's coupled L2: wd * p is added to the gradient before momentum (as VPT trains).
    parts += [optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
              optax.sgd(schedule, momentum=optim.get("momentum", 0.9) or None)]
  elif optim.name == "adamw":
    parts.append(optax.adamw(schedule, b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999),
                             eps=optim.get("eps", 1e-8), weight_decay=optim.weight_decay,
                             mask=decay_mask))
  else:
    raise ValueError(f"optim.name={optim.name!r}: expected 'sgd' or 'adamw'.")
  plateau = plateau_settings(optim)
  if plateau:
    parts.append(scale_by_plateau(plateau["mode"]))
  train_tx = optax.chain(*parts)
  if accum > 1:
    train_tx = optax.MultiSteps(train_tx, every_k_schedule=accum)
  tx = optax.multi_transform({TRAIN: train_tx, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule


def apply_updates(params, updates, labels):
  """params + updates on trainable leaves; frozen leaves are passed through untouched (bit-exact)."""
  return jax.tree.map(lambda p, u, l: p if l == FROZEN else (p + u).astype(p.dtype),
                      params, updates, labels)


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
  pct = 100.0 * trainable / frozen if frozen else float("inf")
  lines.append(f"trainable: {trainable:,} params = {pct:.3f}% of the frozen backbone "
               f"({frozen:,} params)")
  return "\n".join(lines)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
