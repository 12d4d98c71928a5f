"""Episodic test-time adaptation (TTA): every test sample adapts its own copy of the tunable params
from the same start, with a fresh optimizer state, then predicts; batched across samples.

The per-sample procedure of TPT (Shu et al., NeurIPS 2022, azshue/TPT `tpt_classification.py`:
`test_time_adapt_eval`, `test_time_tuning`) and RLCF (Zhao et al., ICLR 2024, mzhaoshuai/RLCF
`TPT/tpt_cls_rl.py`, `TPT/tune_cls_rl.py`) is

  reset the tunable params and the optimizer state -> S optimizer steps on a loss of this sample's
  augmented views -> predict on view 0 (the un-augmented one) -> next sample.

A method describes it as an `Episode` of pure functions; `adapt` runs it on B samples at once:

  * `prepare(tunable0, frozen, views, rng) -> context` runs once per sample with the initial
    params: what the originals compute on their first step and keep (TPT's and RLCF's confident
    view selection, RLCF's reward features of the selected views);
  * `loss(tunable, frozen, context, rng) -> scalar` is differentiated w.r.t. `tunable` at every
    step (the originals recompute the first step's forward with the same initial params, which
    gives the same loss and gradient);
  * `predict(tunable, frozen, context) -> logits (C,)` with the adapted params.

The S steps are a `jax.lax.fori_loop` in one compiled function; the optimizer state is
`optimizer.init(tunable0)` inside it, so nothing carries over from one sample to the next (the
originals reload the initial params and `optimizer.state_dict()` before every sample). Samples are
independent: `batched=True` vmaps the episode over B (tunable0 and frozen are broadcast; each
sample gets its own params from its first update on), `batched=False` runs the same compiled
one-sample episode B times in a Python loop, as the originals' loop over a batch-size-1 loader.

Compilation: one jitted function per (episode, batched), cached on the `Episode` (a frozen,
hashable dataclass) by `functools.lru_cache`; jax.jit then compiles once per input shape. Keep an
episode object for the whole test set to compile once (a new `make_episode` call is a new episode).

Confidence selection and the marginal entropy (TPT `select_confident_samples`, `avg_entropy`) live
here, shared by TPT and RLCF:
  * `entropy_selection` keeps the int(V * fraction) views of lowest softmax entropy (Python's int()
    of the float product, as the original: 64 views at 0.1 keep 6). Ties are broken by the lower
    view index (a stable sort); the original's `torch.argsort` leaves their order unspecified.
  * `marginal_entropy` is the entropy of the mean softmax of the selected views, averaged in log
    space and clamped at the dtype's smallest finite value as the original.

Deliberate deviations: fp32 (the originals run under CUDA autocast with a GradScaler, whose skipped
steps on inf/nan gradients have no counterpart here); the per-sample rng is `split(rng, B)[b]`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Episode:
  """One method's per-sample adaptation, as pure functions of (tunable, frozen, ...).

  prepare: (tunable0, frozen, views (V, H, W, 3), rng) -> context (a pytree), computed once per
    sample with the initial (reset) params, e.g. the selected confident views.
  loss: (tunable, frozen, context, rng) -> the scalar loss of one sample.
  predict: (tunable, frozen, context) -> logits (C,) of view 0 with the adapted params.
  optimizer: the per-sample optimizer, initialised from tunable0 for every sample.
  steps: optimizer steps per sample (>= 1).
  """
  prepare: Callable
  loss: Callable
  predict: Callable
  optimizer: optax.GradientTransformation
  steps: int

  def __post_init__(self):
    if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
      raise ValueError(f"Episode.steps must be an integer >= 1 (optimizer steps per test "
                       f"sample); got {self.steps!r}.")
    for name in ("prepare", "loss", "predict"):
      if not callable(getattr(self, name)):
        raise TypeError(f"Episode.{name} must be callable; got {getattr(self, name)!r}.")


def run_episode(episode: Episode, tunable0, frozen, views, rng) -> tuple[jax.Array, Any]:
  """One sample, not compiled: (logits (C,), adapted tunable). views: (V, H, W, 3)."""
  prepare_rng, loss_rng = jax.random.split(rng)
  context = episode.prepare(tunable0, frozen, views, prepare_rng)
  grad_fn = jax.grad(episode.loss)

  def step(i, carry):
    tunable, opt_state = carry
    grads = grad_fn(tunable, frozen, context, jax.random.fold_in(loss_rng, i))
    updates, opt_state = episode.optimizer.update(grads, opt_state, tunable)
    return optax.apply_updates(tunable, updates), opt_state

  tunable, _ = jax.lax.fori_loop(0, episode.steps, step,
                                 (tunable0, episode.optimizer.init(tunable0)))
  return episode.predict(tunable, frozen, context), tunable


@functools.lru_cache(maxsize=32)
def _compiled(episode: Episode, batched: bool) -> Callable:
  """The jitted episode: over (B,) samples with vmap, or over one sample."""
  one = functools.partial(run_episode, episode)
  return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)) if batched else one)


def adapt(episode: Episode, tunable0, frozen, views, rng, *, batched: bool = True):
  """Adapts B independent test samples, each from `tunable0` with a fresh optimizer state.

  Args:
    episode: the method's `Episode`.
    tunable0: the initial tunable params (a pytree), shared by every sample.
    frozen: the frozen params (and precomputed constants) the episode's functions read.
    views: (B, V, H, W, 3), V views of each of B test samples; view 0 is the un-augmented one.
    rng: a PRNG key; sample b uses `jax.random.split(rng, B)[b]`.
    batched: vmap over the B samples (True) or run them one after another (False); the results
      agree.

  Returns:
    (logits (B, C) of view 0 with each sample's adapted params, the adapted tunable params with a
    leading B axis).
  """
  if getattr(views, "ndim", None) != 5:
    raise ValueError(f"adapt takes views of shape (B, V, H, W, 3) (B test samples of V views "
                     f"each); got shape {getattr(views, 'shape', type(views).__name__)}.")
  if views.shape[0] < 1 or views.shape[1] < 1:
    raise ValueError(f"adapt needs at least one sample and one view; got views {views.shape}.")
  return adapt_queries(episode, tunable0, frozen, views, rng, batched=batched)


def adapt_queries(episode: Episode, tunable0, frozen, queries, rng, *, batched: bool = True):
  """`adapt` for episodes whose per-sample input is not a stack of views: `queries` is any pytree
  of arrays with a common leading axis B, and `episode.prepare` receives one sample's slice of it
  in place of `views` (e.g. a caption's token ids (L,) for text-to-image retrieval). Same results
  and rng rule as `adapt`."""
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(queries)}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise ValueError(f"adapt_queries takes a pytree of arrays sharing a leading batch axis B >= "
                     f"1; got leaf shapes {[np.shape(x) for x in jax.tree.leaves(queries)]}.")
  num_samples = sizes.pop()
  rngs = jax.random.split(rng, num_samples)
  if batched:
    return _compiled(episode, True)(tunable0, frozen, queries, rngs)
  one = _compiled(episode, False)
  results = [one(tunable0, frozen, jax.tree.map(lambda x, b=b: x[b], queries), rngs[b])
             for b in range(num_samples)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *results)


def num_selected(num_views: int, fraction: float) -> int:
  """int(V * fraction), the originals' count of confident views; an error when it is 0."""
  if not 0 < fraction <= 1:
    raise ValueError(f"The selection fraction must be in (0, 1]; got {fraction}.")
  count = int(num_views * fraction)
  if count < 1:
    raise ValueError(f"Selecting int({num_views} views * {fraction}) = 0 views: use more views "
                     f"or a larger fraction (at least {math.ceil(1 / fraction)} views at "
                     f"{fraction}).")
  return count


def entropy_selection(logits, fraction: float):
  """Indices (int(V * fraction),) of the lowest-entropy views of `logits` (V, C), most confident
  first; ties keep the lower view index first (TPT `select_confident_samples`)."""
  entropy = -jnp.sum(jax.nn.softmax(logits, axis=-1) * jax.nn.log_softmax(logits, axis=-1),
                     axis=-1)
  return jnp.argsort(entropy, stable=True)[:num_selected(logits.shape[0], fraction)]


def marginal_entropy(logits):
  """Entropy of the mean softmax of `logits` (K, C) over the K views (TPT `avg_entropy`): the mean
  is taken in log space, logsumexp_k log p_k - log K, clamped at the dtype's smallest finite value
  so that a class with zero probability contributes 0 rather than nan."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  log_mean = jax.nn.logsumexp(log_probs, axis=0) - math.log(logits.shape[0])
  log_mean = jnp.maximum(log_mean, jnp.finfo(log_mean.dtype).min)
  return -jnp.sum(log_mean * jnp.exp(log_mean))
