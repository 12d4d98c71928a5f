"""Optimizers for prompt tuning: a trainable/frozen partition of the param tree, schedules, SGD/AdamW.

The partition follows big_vision's `optax.py` and scenic's `get_optimizer` in spirit: a regex over
'/'-joined param names decides which leaves train; `optax.multi_transform` gives the frozen
leaves `optax.set_to_zero()` so they carry no optimizer state (EmptyState) and no weight decay or
momentum can move them. A zero learning rate would not do that.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

TRAIN, FROZEN = "train", "frozen"


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
                  warmup_init: float = 0.0):
  """Linear warmup from `warmup_init` to `lr`, then cosine decay to `min_lr` at `total_steps`."""
  if warmup_steps >= total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be below total_steps={total_steps}.")
  return optax.warmup_cosine_decay_schedule(
      init_value=warmup_init, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def make_optimizer(optim, params, labels, *, total_steps: int, warmup_steps: int):
  """Builds the optax transform for `optim` (a ConfigDict, see configs) and its lr schedule.

  `total_steps` counts train-step calls; with `grad_accum_steps=k` the optimizer (and its
  schedule) advances once every k calls, on the mean of the k gradients.
  """
  accum = int(optim.get("grad_accum_steps", 1))
  updates = total_steps // accum
  schedule = make_schedule(lr=optim.lr, total_steps=updates,
                           warmup_steps=warmup_steps // accum,
                           min_lr=optim.get("min_lr", 0.0),
                           warmup_init=optim.get("warmup_init", 0.0))
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
