"""The optimizer pieces of the spine: schedules (per step and Dassl's per epoch), parameter
groups, accumulation, weight-decay mask, label smoothing, and bf16 compute with f32 params."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import common, vpt_vtab
from jaxprompt import optim, sharding, train

PARAMS = {"prompt": jnp.array([1.0, -2.0, 3.0]), "head": {"kernel": jnp.array([[0.5, 0.25]]),
                                                        "bias": jnp.array([0.1, -0.1])},
          "backbone": jnp.array([4.0, 5.0])}
LABELS = optim.param_labels(PARAMS, r"prompt|head/.*")


def trainable(params, labels=LABELS):
  """The trainable subtree, which make_optimizer is built over (as `optim.trainable_subset`)."""
  flat, flat_labels = (traverse_util.flatten_dict(t, sep="/") for t in (params, labels))
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if flat_labels[k] == optim.TRAIN}, sep="/")


TRAINABLE = trainable(PARAMS)


def optim_config(**kw):
  base = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, no_weight_decay="head/bias",
              min_lr=0.0, grad_clip_norm=0.0, grad_accum_steps=1)
  return ml_collections.ConfigDict({**base, **kw})


def loss_fn(params, x):
  """A loss whose gradient differs per micro-batch `x` (no 'backbone': the trainable subtree)."""
  loss = (jnp.sum((params["prompt"] * x) ** 2) + jnp.sum(params["head"]["kernel"] * x[0])
          + jnp.sum(params["head"]["bias"] * x[1]))
  return loss + jnp.sum(params["backbone"] * x[2]) if "backbone" in params else loss


def run(tx, params, batches):
  opt_state = tx.init(params)
  for x in batches:
    grads = jax.grad(loss_fn)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_warmup_cosine_schedule_values():
  schedule = optim.make_schedule(lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.01)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
  # Cosine over the 100 post-warmup steps: halfway is the mean of peak and floor.
  np.testing.assert_allclose(schedule(60), (1.0 + 0.01) / 2, atol=1e-6)
  np.testing.assert_allclose(schedule(110), 0.01, atol=1e-6)
  with pytest.raises(ValueError, match="warmup_steps=10 must be below total_steps=10"):
    optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=10)


def test_constant_warmup_holds_then_cosine_from_the_peak():
  """CoOp's ConstantWarmupScheduler: warmup_init during warmup, then cosine starting at lr."""
  schedule = optim.make_schedule(lr=2e-3, total_steps=110, warmup_steps=10, min_lr=0.0,
                                 warmup_init=1e-5, warmup_type="constant")
  np.testing.assert_allclose([schedule(0), schedule(9)], [1e-5, 1e-5], rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 2e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-9)
  with pytest.raises(ValueError, match="warmup_type='step'"):
    optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=1, warmup_type="step")


def test_multistep_is_glips_warmup_multistep_lr():
  """maskrcnn_benchmark's WarmupMultiStepLR (GLIP): linear warmup from warmup_init (factor
  0.001), then x0.1 at 67 % and 89 % of the steps, milestones counted from step 0."""
  schedule = optim.make_schedule(lr=1e-4, total_steps=1000, warmup_steps=100, warmup_init=1e-7,
                                 decay="multistep", milestones=(0.67, 0.89))
  steps = [0, 50, 100, 669, 670, 889, 890, 999]
  expected = [1e-7, 1e-7 + (1e-4 - 1e-7) * 0.5, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6]
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-5)
  for bad in [(0.9, 0.5), (1.5,), (0.0,)]:
    with pytest.raises(ValueError, match="optim.milestones"):
      optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=0, decay="multistep",
                          milestones=bad)
  with pytest.raises(ValueError, match="optim.decay='step'"):
    optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=0, decay="step")
  config = common.optimizer("adamw", lr=1e-4, weight_decay=0.0, decay="multistep",
                            milestones=(0.5,))
  _, from_config = optim.make_optimizer(config, TRAINABLE, total_steps=10, warmup_steps=0)
  np.testing.assert_allclose([float(from_config(4)), float(from_config(5))], [1e-4, 1e-5],
                             rtol=1e-6)
  constant = optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=0, decay="multistep")
  np.testing.assert_allclose([float(constant(s)) for s in (0, 9)], [1.0, 1.0])


def test_multistep_warmup_may_span_the_whole_run():
  """SDPT's README command on GLIP-L's yaml: 2000 warm-up iterations from x0.001 in a
  2000-iteration run, milestones at 1340 and 1780 inside it."""
  schedule = optim.make_schedule(lr=1e-5, total_steps=2000, warmup_steps=2000, warmup_init=1e-8,
                                 decay="multistep", milestones=(0.67, 0.89))
  expected = lambda t: 1e-5 * (0.001 + 0.999 * t / 2000) * 0.1 ** ((t >= 1340) + (t >= 1780))
  steps = [0, 1000, 1339, 1340, 1779, 1780, 1999]
  np.testing.assert_allclose([float(schedule(t)) for t in steps], [expected(t) for t in steps],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="warmup_steps=10 must be below total_steps=10"):
    optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=10)  # cosine cannot


def test_weight_decay_schedule_is_glips():
  """SOLVER.WEIGHT_DECAY_SCHEDULE: the weight decay x0.1 once the update count reaches 0.667 of
  each lr milestone (GLIP-L's yaml, 2000 iterations: milestones 1340 and 1780, so updates from
  894 and from 1188 on); AdamW applies it as torch does, p <- p (1 - lr wd) on a zero gradient."""
  config = common.optimizer("adamw", lr=1e-5, weight_decay=0.01, decay="multistep",
                            milestones=(0.67, 0.89), weight_decay_schedule_ratio=0.667)
  wd = optim.weight_decay_schedule(config, 0.01, total_steps=2000)
  np.testing.assert_allclose([float(wd(c)) for c in (0, 893, 894, 1187, 1188, 1999)],
                             [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
  assert optim.weight_decay_schedule(config, 0.0, total_steps=2000) == 0.0  # bias group
  config = common.optimizer("adamw", lr=0.5, weight_decay=0.2, decay="multistep",
                            milestones=(0.5,), weight_decay_schedule_ratio=0.6)
  params = {"w": jnp.ones(())}
  tx, _ = optim.make_optimizer(config, params, total_steps=10, warmup_steps=0)
  state, p, expected = tx.init(params), params, 1.0
  for count in range(10):  # lr 0.5 then 0.05 from update 5; wd 0.2 then 0.02 from update 3
    updates, state = tx.update({"w": jnp.zeros(())}, state, p)
    p = optax.apply_updates(p, updates)
    expected *= 1 - (0.5 if count < 5 else 0.05) * (0.2 if count < 3 else 0.02)
    np.testing.assert_allclose(float(p["w"]), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="weight_decay_schedule_ratio"):
    optim.weight_decay_schedule(common.optimizer("adamw", lr=1.0, weight_decay=0.1,
                                                 weight_decay_schedule_ratio=0.5), 0.1,
                                total_steps=10)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gradient_accumulation_equals_one_step_on_the_mean_gradient(name):
  """k micro-batches with grad_accum_steps=k == one step on the mean of their gradients."""
  batches = [jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.5, 2.0]), jnp.array([3.0, 1.0, 0.0])]
  accum_tx, _ = optim.make_optimizer(optim_config(name=name, grad_accum_steps=3), TRAINABLE,
                                     total_steps=30, warmup_steps=0)
  accumulated = run(accum_tx, TRAINABLE, batches)

  one_tx, _ = optim.make_optimizer(optim_config(name=name), TRAINABLE, total_steps=10,
                                   warmup_steps=0)
  opt_state = one_tx.init(TRAINABLE)
  mean_grad = jax.tree.map(lambda *g: sum(g) / len(g),
                           *[jax.grad(loss_fn)(TRAINABLE, x) for x in batches])
  updates, _ = one_tx.update(mean_grad, opt_state, TRAINABLE)
  expected = optax.apply_updates(TRAINABLE, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               accumulated, expected)
  assert not np.allclose(accumulated["prompt"], PARAMS["prompt"])  # it did move


def test_sgd_coupled_weight_decay_skips_no_weight_decay_params():
  """SGD adds wd * p to the gradient (PyTorch's coupled L2), except on `no_weight_decay`."""
  tx, _ = optim.make_optimizer(optim_config(momentum=0.0, weight_decay=0.5), TRAINABLE,
                               total_steps=10, warmup_steps=0)
  zero_grads = jax.tree.map(jnp.zeros_like, TRAINABLE)
  updates, _ = tx.update(zero_grads, tx.init(TRAINABLE), TRAINABLE)
  new = optax.apply_updates(TRAINABLE, updates)
  np.testing.assert_allclose(new["prompt"], PARAMS["prompt"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(new["head"]["kernel"], PARAMS["head"]["kernel"] * 0.95, rtol=1e-6)
  np.testing.assert_array_equal(new["head"]["bias"], PARAMS["head"]["bias"])


def test_optimizer_state_covers_only_the_trainable_subtree():
  tx, _ = optim.make_optimizer(optim_config(name="adamw"), TRAINABLE, total_steps=10,
                               warmup_steps=0)
  sizes = [x.size for x in jax.tree.leaves(tx.init(TRAINABLE)) if hasattr(x, "size")]
  trainable = 3 + 2 + 2
  assert 2 * trainable <= sum(sizes) <= 2 * trainable + 2  # adam's mu and nu, plus counts


def test_unknown_optimizer_name_is_an_error():
  with pytest.raises(ValueError, match="optim.name='lamb'"):
    optim.make_optimizer(optim_config(name="lamb"), TRAINABLE, total_steps=10, warmup_steps=0)


def test_label_smoothing_cross_entropy_matches_hand_computation():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  log_p = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
  eps = 0.3
  target = np.array([1 - eps + eps / 3, eps / 3, eps / 3])
  np.testing.assert_allclose(optim.cross_entropy(logits, jnp.array([0]), 3, eps),
                             [-(target * log_p).sum()], rtol=1e-6)
  np.testing.assert_allclose(optim.cross_entropy(logits, jnp.array([2]), 3), [-log_p[2]],
                             rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = vpt_vtab.get_config("runlocal")
    config.compute_dtype = dtype
    config.model.prompt_dropout = 0.0
    exp = train.build(config)
    images, labels = exp.data.source.arrays("train")
    batch = {"image": exp.data.eval_pp({"image": images[:8], "label": labels[:8]})["image"].numpy(),
             "label": labels[:8]}
    state, metrics = exp.train_step(exp.state, sharding.global_batch(batch, exp.mesh))
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
    losses[dtype] = float(metrics["loss"])
  assert np.isfinite(losses["bfloat16"])
  assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * abs(losses["float32"]), losses


# --- the optimizer over the trainable subtree vs. the one over the full tree it replaced ---------

def full_tree_optimizer(optim_cfg, params, labels, *, total_steps, warmup_steps):
  """The oracle: make_optimizer as it was before param groups (jaxprompt/optim.py), over the FULL
  tree, frozen leaves given optax.set_to_zero() by a multi_transform over 'train'/'frozen'."""
  accum = int(optim_cfg.get("grad_accum_steps", 1))
  schedule = optim.make_schedule(lr=optim_cfg.lr, total_steps=total_steps // accum,
                                 warmup_steps=warmup_steps // accum,
                                 min_lr=optim_cfg.get("min_lr", 0.0),
                                 warmup_init=optim_cfg.get("warmup_init", 0.0),
                                 warmup_type=optim_cfg.get("warmup_type", "linear"))
  no_decay = re.compile(optim_cfg.get("no_weight_decay", "") or "(?!)")
  flat = traverse_util.flatten_dict(params, sep="/")
  decay_mask = traverse_util.unflatten_dict(
      {k: not no_decay.fullmatch(k) for k in flat}, sep="/")
  parts = []
  if optim_cfg.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  if optim_cfg.name == "sgd":
    parts += [optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
              optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9) or None)]
  else:
    parts.append(optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                             eps=optim_cfg.get("eps", 1e-8), weight_decay=optim_cfg.weight_decay,
                             mask=decay_mask))
  plateau = optim.plateau_settings(optim_cfg)
  if plateau:
    parts.append(optim.scale_by_plateau(plateau["mode"]))
  train_tx = optax.chain(*parts)
  if accum > 1:
    train_tx = optax.MultiSteps(train_tx, every_k_schedule=accum)
  tx = optax.multi_transform({optim.TRAIN: train_tx, optim.FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule


def full_tree_apply_updates(params, updates, labels):
  return jax.tree.map(lambda p, u, l: p if l == optim.FROZEN else (p + u).astype(p.dtype),
                      params, updates, labels)


BATCHES = [jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.5, 2.0]), jnp.array([3.0, 1.0, 0.0]),
           jnp.array([0.5, -2.0, 1.0]), jnp.array([2.0, 2.0, -1.0]), jnp.array([-0.5, 1.0, 0.3])]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("accum", [1, 2])
def test_subtree_optimizer_is_bit_identical_to_the_full_tree_one(name, accum):
  """No param_groups: the same updates, bit for bit, on every trainable leaf, with weight decay,
  no_weight_decay, clipping (that bites), warmup and accumulation."""
  cfg = optim_config(name=name, weight_decay=0.05, grad_clip_norm=0.5, grad_accum_steps=accum,
                     min_lr=1e-3)
  assert optax.tree.norm(jax.grad(loss_fn)(TRAINABLE, BATCHES[0])) > 0.5
  old_tx, old_schedule = full_tree_optimizer(cfg, PARAMS, LABELS, total_steps=12, warmup_steps=2)
  new_tx, new_schedule = optim.make_optimizer(cfg, TRAINABLE, total_steps=12, warmup_steps=2)
  old_params, old_state = PARAMS, old_tx.init(PARAMS)
  new_params, new_state = TRAINABLE, new_tx.init(TRAINABLE)
  for x in BATCHES * 2:
    updates, old_state = old_tx.update(jax.grad(loss_fn)(old_params, x), old_state, old_params)
    old_params = full_tree_apply_updates(old_params, updates, LABELS)
    updates, new_state = new_tx.update(jax.grad(loss_fn)(new_params, x), new_state, new_params)
    new_params = optax.apply_updates(new_params, updates)
    jax.tree.map(np.testing.assert_array_equal, trainable(old_params), new_params)
  assert not np.allclose(new_params["prompt"], PARAMS["prompt"])
  np.testing.assert_array_equal([old_schedule(i) for i in range(6)],
                                [new_schedule(i) for i in range(6)])


# --- parameter groups ---------------------------------------------------------------------------

def test_param_groups_first_match_wins_and_the_rest_is_default():
  cfg = optim_config(param_groups=(("heads", dict(regex=r"head/.*", lr_mult=0.5)),
                                   ("kernel_or_prompt", dict(regex=r"head/kernel|prompt"))))
  labels = traverse_util.flatten_dict(optim.group_labels(cfg, PARAMS), sep="/")
  assert labels == {"prompt": "kernel_or_prompt", "head/kernel": "heads", "head/bias": "heads",
                    "backbone": optim.DEFAULT_GROUP}
  assert optim.param_group_settings(cfg)[0] == (
      "heads", dict(regex=r"head/.*", lr_mult=0.5, weight_decay=None))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_group_trains_as_the_optimizer_at_its_own_lr_and_weight_decay(name):
  """Group 'head' at lr_mult 0.1 and weight decay 0.3 follows, over a cosine with warmup, the
  ungrouped optimizer at lr 0.1 · lr and that decay; the other params are unaffected by it."""
  groups = (("head", dict(regex=r"head/.*", lr_mult=0.1, weight_decay=0.3)),)
  cfg = optim_config(name=name, param_groups=groups)
  grouped = run(optim.make_optimizer(cfg, TRAINABLE, total_steps=6, warmup_steps=1)[0],
                TRAINABLE, BATCHES)
  alone = {}
  for key, lr, wd in (("head", 0.1 * cfg.lr, 0.3), ("prompt", cfg.lr, cfg.weight_decay)):
    sub = {key: TRAINABLE[key]}
    tx, _ = optim.make_optimizer(optim_config(name=name, lr=lr, weight_decay=wd), sub,
                                 total_steps=6, warmup_steps=1)
    state = tx.init(sub)
    for x in BATCHES:
      grads = {key: jax.grad(loss_fn)(TRAINABLE | sub, x)[key]}
      updates, state = tx.update(grads, state, sub)
      sub = optax.apply_updates(sub, updates)
    alone[key] = sub[key]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), grouped,
               alone)
  # and the multiplier matters: at lr_mult 1 the head moves further
  plain = run(optim.make_optimizer(optim_config(name=name), TRAINABLE, total_steps=6,
                                   warmup_steps=1)[0], TRAINABLE, BATCHES)
  moved = lambda p: float(jnp.abs(p["head"]["kernel"] - PARAMS["head"]["kernel"]).sum())
  assert moved(plain) > 3 * moved(grouped) > 0


def test_sgd_group_update_is_scaled_by_lr_mult_on_the_first_step():
  """By hand: momentum-free SGD, update = -lr · lr_mult · (g + wd · p), wd 0 on head/bias."""
  cfg = optim_config(momentum=0.0, weight_decay=0.5,
                     param_groups={"head": dict(regex=r"head/.*", lr_mult=0.1)})
  tx, _ = optim.make_optimizer(cfg, TRAINABLE, total_steps=10, warmup_steps=0)
  grads = jax.grad(loss_fn)(TRAINABLE, BATCHES[0])
  updates, _ = tx.update(grads, tx.init(TRAINABLE), TRAINABLE)
  np.testing.assert_allclose(updates["prompt"],
                             -0.1 * (grads["prompt"] + 0.5 * PARAMS["prompt"]), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.01 * (
      grads["head"]["kernel"] + 0.5 * PARAMS["head"]["kernel"]), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], -0.01 * grads["head"]["bias"], rtol=1e-6)


@pytest.mark.parametrize("groups, message", [
    ((("lang", dict(regex="language/.*")),), r"param_groups\['lang'\].regex='language/\.\*' "
     "matches no trainable parameter"),
    ((("a", dict(regex="head/.*")), ("b", dict(regex="head/bias"))),
     r"param_groups\['b'\]: every param its regex matches is taken by an earlier group"),
    ({"a": dict(regex="head/.*"), "b": dict(regex="head/bias")},
     r"Param 'head/bias' matches optim.param_groups \['a', 'b'\]"),
    ((("default", dict(regex="prompt")),), r"param_groups\['default'\]: the name 'default' is "
     "reserved"),
    ((("a", dict(regex="prompt", lr=0.1)),), r"param_groups\['a'\]: unknown settings \['lr'\]"),
    ((("a", dict(regex="prompt", lr_mult=-1.0)),), r"param_groups\['a'\].lr_mult=-1.0: expected "
     "a number >= 0"),
    ((("a", dict(regex="prompt(")),), r"param_groups\['a'\].regex='prompt\(' is not a regex"),
    ((("a", dict(lr_mult=0.1)),), r"param_groups\['a'\].regex=None: expected a regex"),
    ((("a", dict(regex="prompt")), ("a", dict(regex="head/.*"))), "appears twice"),
    (("prompt",), r"entry 'prompt': expected a \(name,"),
])
def test_bad_param_groups_are_errors_naming_the_group(groups, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(optim_config(param_groups=groups), TRAINABLE, total_steps=10,
                         warmup_steps=0)


def test_plateau_state_is_found_with_groups_and_accumulation():
  """lr_factor/plateau_step find the plateau state inside MultiSteps and the chain; lowering it
  scales every group's update."""
  cfg = optim_config(momentum=0.0, weight_decay=0.0, grad_accum_steps=2,
                     param_groups=(("head", dict(regex=r"head/.*", lr_mult=0.1)),),
                     plateau=dict(metric="val/accuracy", patience=0, factor=0.5))
  tx, _ = optim.make_optimizer(cfg, TRAINABLE, total_steps=10, warmup_steps=0)
  state = tx.init(TRAINABLE)
  assert optim.lr_factor(state) == 1.0
  for value in (0.5, 0.4):  # an improvement, then one bad evaluation > patience 0
    state = optim.plateau_step(state, {"val/accuracy": value}, cfg)
  assert optim.lr_factor(state) == 0.5
  grads = jax.grad(loss_fn)(TRAINABLE, BATCHES[0])
  full, lowered = tx.init(TRAINABLE), state
  for _ in range(2):  # the second micro-step applies the update
    full_updates, full = tx.update(grads, full, TRAINABLE)
    low_updates, lowered = tx.update(grads, lowered, TRAINABLE)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-6), low_updates,
               full_updates)
  assert float(jnp.abs(full_updates["head"]["kernel"]).sum()) > 0


# --- Dassl's per-epoch schedule (CoOp) ----------------------------------------------------------

def dassl_lr(epoch, *, lr, max_epoch, warmup_epoch, warmup_type, warmup_lr):
  """By hand, Dassl.pytorch dassl/optim/lr_scheduler.py with CosineAnnealingLR(T_max=max_epoch,
  eta_min=0) and WARMUP_RECOUNT=True: the cosine counts from 0 again after the warmup."""
  if epoch < warmup_epoch:
    if warmup_type == "constant" or epoch == 0:
      return warmup_lr
    return lr * epoch / warmup_epoch
  return lr * (1 + math.cos(math.pi * (epoch - warmup_epoch) / max_epoch)) / 2


@pytest.mark.parametrize("warmup_type", ["constant", "linear"])
@pytest.mark.parametrize("warmup_epochs, accum", [(1, 1), (3, 1), (2, 2)])
def test_epoch_schedule_is_dassl_lr_held_through_each_epoch(warmup_type, warmup_epochs, accum):
  epochs, steps_per_epoch = 7, 6
  cfg = optim_config(lr=2e-3, schedule_unit="epoch", warmup_type=warmup_type, warmup_init=1e-5,
                     grad_accum_steps=accum)
  _, schedule = optim.make_optimizer(cfg, TRAINABLE, total_steps=epochs * steps_per_epoch,
                                     warmup_steps=warmup_epochs * steps_per_epoch,
                                     steps_per_epoch=steps_per_epoch)
  updates_per_epoch = steps_per_epoch // accum
  ours = np.array([schedule(u) for u in range(epochs * updates_per_epoch)]).reshape(
      epochs, updates_per_epoch)
  hand = [dassl_lr(e, lr=2e-3, max_epoch=epochs, warmup_epoch=warmup_epochs,
                   warmup_type=warmup_type, warmup_lr=1e-5) for e in range(epochs)]
  np.testing.assert_allclose(ours, np.repeat(np.array(hand)[:, None], updates_per_epoch, 1),
                             rtol=1e-6)
  assert ours[warmup_epochs, 0] == np.float32(2e-3)  # the cosine restarts at lr after warmup
  assert ours[-1, 0] > 1e-4  # ...with T_max = all epochs, so it ends above min_lr


def test_epoch_schedule_with_accumulation_takes_the_epoch_of_the_last_micro_batch():
  """3 train steps an epoch, 2 per update: update 1 covers steps 2 and 3, and runs in epoch 1."""
  cfg = optim_config(lr=1.0, schedule_unit="epoch", grad_accum_steps=2)
  _, schedule = optim.make_optimizer(cfg, TRAINABLE, total_steps=12, warmup_steps=0,
                                     steps_per_epoch=3)
  # update u ends at train step 2u + 1: steps 1, 3, 5, 7, 9, 11 are in epochs 0, 1, 1, 2, 3, 3
  hand = [dassl_lr(e, lr=1.0, max_epoch=4, warmup_epoch=0, warmup_type="linear", warmup_lr=0.0)
          for e in (0, 1, 1, 2, 3, 3)]
  np.testing.assert_allclose([schedule(u) for u in range(6)], hand, rtol=1e-6)


def test_epoch_schedule_errors_name_the_setting():
  with pytest.raises(ValueError, match=r"schedule_unit='epoch' needs steps_per_epoch > 0 \(got 0"):
    optim.make_optimizer(optim_config(schedule_unit="epoch"), TRAINABLE, total_steps=10,
                         warmup_steps=0)
  with pytest.raises(ValueError, match="warmup_steps=3 is not a multiple of steps_per_epoch=5"):
    optim.make_optimizer(optim_config(schedule_unit="epoch"), TRAINABLE, total_steps=20,
                         warmup_steps=3, steps_per_epoch=5)
  with pytest.raises(ValueError, match="schedule_unit='epochs': expected one of"):
    optim.make_optimizer(optim_config(schedule_unit="epochs"), TRAINABLE, total_steps=10,
                         warmup_steps=0, steps_per_epoch=5)


def test_step_unit_stays_the_per_step_cosine():
  cfg = optim_config(lr=1.0, schedule_unit="step")
  _, schedule = optim.make_optimizer(cfg, TRAINABLE, total_steps=10, warmup_steps=0,
                                     steps_per_epoch=5)
  assert float(schedule(1)) < float(schedule(0))  # it moves within the first epoch


def test_common_optimizer_has_the_new_keys_with_defaults():
  config = common.optimizer("sgd", lr=0.1, weight_decay=0.0)
  assert config.param_groups == () and config.schedule_unit == "step"
  config = common.optimizer("sgd", lr=0.1, weight_decay=0.0, schedule_unit="epoch",
                            param_groups=(("head", dict(regex="head/.*", lr_mult=0.1)),))
  tx, _ = optim.make_optimizer(config, TRAINABLE, total_steps=10, warmup_steps=0,
                               steps_per_epoch=5)
  assert [n for n, _ in optim.param_group_settings(config)] == ["head"]
  tx.init(TRAINABLE)


def test_params_ema_is_glips_model_ema_after_each_update():
  """GLIP's ModelEma: ema <- decay * ema + (1 - decay) * params after every optimizer step,
  starting from the params; the updates themselves are unchanged."""
  cfg = optim_config(ema_decay=0.9)
  tx, _ = optim.make_optimizer(cfg, TRAINABLE, total_steps=10, warmup_steps=0)
  plain, _ = optim.make_optimizer(optim_config(), TRAINABLE, total_steps=10, warmup_steps=0)
  state, plain_state, params, ema = tx.init(TRAINABLE), plain.init(TRAINABLE), TRAINABLE, TRAINABLE
  assert optim.ema_of(plain_state) is None
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    plain_updates, plain_state = plain.update(grads, plain_state, params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain_updates)):
      np.testing.assert_array_equal(a, b)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params)
  for a, b in zip(jax.tree.leaves(optim.ema_of(state)), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match="optim.ema_decay=1.0"):
    optim.params_ema(1.0)
