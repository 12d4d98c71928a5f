"""The optimizer pieces of the spine: schedules, accumulation, weight-decay mask, label smoothing,
and bf16 compute with f32 params."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import vpt_vtab
from jaxprompt import optim, sharding, train

PARAMS = {"prompt": jnp.array([1.0, -2.0, 3.0]), "head": {"kernel": jnp.array([[0.5, 0.25]]),
                                                        "bias": jnp.array([0.1, -0.1])},
          "backbone": jnp.array([4.0, 5.0])}
LABELS = optim.param_labels(PARAMS, r"prompt|head/.*")


def optim_config(**kw):
  base = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, no_weight_decay="head/bias",
              min_lr=0.0, grad_clip_norm=0.0, grad_accum_steps=1)
  return ml_collections.ConfigDict({**base, **kw})


def loss_fn(params, x):
  """A loss whose gradient differs per micro-batch `x`."""
  return (jnp.sum((params["prompt"] * x) ** 2) + jnp.sum(params["head"]["kernel"] * x[0])
          + jnp.sum(params["head"]["bias"] * x[1]) + jnp.sum(params["backbone"] * x[2]))


def run(tx, params, batches):
  opt_state = tx.init(params)
  for x in batches:
    grads = jax.grad(loss_fn)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates, LABELS)
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


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gradient_accumulation_equals_one_step_on_the_mean_gradient(name):
  """k micro-batches with grad_accum_steps=k == one step on the mean of their gradients."""
  batches = [jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.5, 2.0]), jnp.array([3.0, 1.0, 0.0])]
  accum_tx, _ = optim.make_optimizer(optim_config(name=name, grad_accum_steps=3), PARAMS, LABELS,
                                     total_steps=30, warmup_steps=0)
  accumulated = run(accum_tx, PARAMS, batches)

  one_tx, _ = optim.make_optimizer(optim_config(name=name), PARAMS, LABELS, total_steps=10,
                                   warmup_steps=0)
  opt_state = one_tx.init(PARAMS)
  mean_grad = jax.tree.map(lambda *g: sum(g) / len(g),
                           *[jax.grad(loss_fn)(PARAMS, x) for x in batches])
  updates, _ = one_tx.update(mean_grad, opt_state, PARAMS)
  expected = optim.apply_updates(PARAMS, updates, LABELS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               accumulated, expected)
  assert not np.allclose(accumulated["prompt"], PARAMS["prompt"])  # it did move
  np.testing.assert_array_equal(accumulated["backbone"], PARAMS["backbone"])


def test_sgd_coupled_weight_decay_skips_no_weight_decay_params():
  """SGD adds wd * p to the gradient (PyTorch's coupled L2), except on `no_weight_decay`."""
  tx, _ = optim.make_optimizer(optim_config(momentum=0.0, weight_decay=0.5), PARAMS, LABELS,
                               total_steps=10, warmup_steps=0)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
  new = optim.apply_updates(PARAMS, updates, LABELS)
  np.testing.assert_allclose(new["prompt"], PARAMS["prompt"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(new["head"]["kernel"], PARAMS["head"]["kernel"] * 0.95, rtol=1e-6)
  np.testing.assert_array_equal(new["head"]["bias"], PARAMS["head"]["bias"])
  np.testing.assert_array_equal(new["backbone"], PARAMS["backbone"])


def test_frozen_params_have_no_optimizer_state():
  tx, _ = optim.make_optimizer(optim_config(name="adamw"), PARAMS, LABELS, total_steps=10,
                               warmup_steps=0)
  sizes = [x.size for x in jax.tree.leaves(tx.init(PARAMS)) if hasattr(x, "size")]
  trainable = 3 + 2 + 2
  assert sum(sizes) <= 2 * trainable + 2  # adam's mu and nu for trainable leaves, plus counts


def test_unknown_optimizer_name_is_an_error():
  with pytest.raises(ValueError, match="optim.name='lamb'"):
    optim.make_optimizer(optim_config(name="lamb"), PARAMS, LABELS, total_steps=10,
                         warmup_steps=0)


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
