"""Beam search and greedy decoding for any decoder with a key/value cache, as one XLA loop.

RLCF's captioners decode with transformers' `generate` (mzhaoshuai/RLCF
`caption/image_llm/models/generate_opt.py`, from salesforce/LAVIS `blip2_opt.py`): beam search
with `num_beams` beams returning `num_captions` of them, `max_new_tokens` 50, EOS = the newline
token ('\\n', `models.gpt2_tokenizer.Tokenizer.newline_token_id`), no repetition penalty, length
penalty 1, early_stopping False. This module is that beam search written with static shapes for
`jax.lax.while_loop`, step for step as transformers' vectorised `GenerationMixin._beam_search`
(`generation/utils.py` of transformers 5, the version the tests compare with):
  * each step keeps the top 2 * num_beams continuations of all beams by summed log-probability;
    those ending in EOS (or reaching max_new_tokens) among the first num_beams are offered to the
    finished set with score sum_logprobs / new_length ** length_penalty (new_length counts the
    generated tokens, EOS included), the best num_beams unfinished continue;
  * a batch row stops accepting finished beams once its best running beam, scored at the current
    length, cannot beat its worst finished one (transformers' early_stopping=False heuristic), and
    the loop ends when no row can improve or every continuation hit a stopping criterion;
  * the first step starts from beam 0 only (the others at -1e9), EOS is banned while fewer than
    `min_new_tokens` tokens were generated.
Greedy decoding takes the argmax (ties: the lowest id) and pads rows that finished, as
transformers' `_sample` without sampling.

The decoder is given as `step_fn(token_ids (N,), cache) -> (logits (N, V), cache)` plus the
logits after the prompt and the cache the prompt left (`jaxprompt.models.opt.start_decoding`).
Every cache leaf must be batch-leading: beams are laid out as row b * num_beams + k and reordered
with one gather per step. The caller jits the whole decode (`opt.generate_beams`).

Deliberate deviations:
  * RLCF pinned transformers 4.25-4.26, whose `BeamSearchScorer` differs in edge cases: a beam
    that reaches max_new_tokens without EOS was scored with the prompt counted in its length (51
    instead of 50 for the captioners' one-token prompt) and every running beam was offered then;
    and the early-stopping test used the best of all 2 * num_beams candidates (EOS endings too)
    rather than the best running beam, so a row could keep accepting finished beams a little
    longer. Captions that end at EOS while the search is still open score the same in both.
  * RLCF passes min_length=1, which transformers counts over the prompt ('</s>', 1 token), so it
    bans nothing; here the bound is on new tokens (`min_new_tokens`, default 0, the same effect).
  * The prompt is run once per image and its cache copied to the beams (transformers runs the
    prompt num_beams times); the results are the same up to float rounding.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# (token ids (N,), cache) -> (logits (N, V), cache); cache leaves are batch-leading (N, ...).
StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

_MASKED = -1.0e9  # transformers' score for excluded candidates (not -inf: sums stay ordered)


def _check_common(first_logits, max_new_tokens: int, eos_token_id: int, min_new_tokens: int):
  if first_logits.ndim != 2:
    raise ValueError(f"first_logits must be (batch, vocab); got shape {first_logits.shape}.")
  vocab_size = first_logits.shape[1]
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1.")
  if not 0 <= int(eos_token_id) < vocab_size:
    raise ValueError(f"eos_token_id={eos_token_id!r} is not an id of the {vocab_size}-token "
                     "vocabulary.")
  if not 0 <= int(min_new_tokens) <= int(max_new_tokens):
    raise ValueError(f"min_new_tokens={min_new_tokens!r}: expected 0 .. max_new_tokens "
                     f"({max_new_tokens}).")
  return vocab_size


def _ban_early_eos(log_probs, step, eos_token_id: int, min_new_tokens: int):
  """EOS gets -inf while fewer than `min_new_tokens` tokens exist (`MinNewTokensLength...`)."""
  banned = (jnp.arange(log_probs.shape[-1]) == eos_token_id) & (step < min_new_tokens)
  return jnp.where(banned, -jnp.inf, log_probs)


def _take(tensor, indices):
  """tensor (B, M, ...) gathered along axis 1 by indices (B, K) -> (B, K, ...)."""
  indices = indices.reshape(indices.shape + (1,) * (tensor.ndim - 2))
  return jnp.take_along_axis(tensor, indices, axis=1)


def beam_search(step_fn: StepFn, first_logits, cache, *, num_beams: int,
                num_return_sequences: int | None = None, max_new_tokens: int = 50,
                eos_token_id: int, pad_token_id: int, length_penalty: float = 1.0,
                min_new_tokens: int = 0) -> dict:
  """Beam search from the logits after each row's prompt; traceable (jit the caller).

  Args:
    step_fn: one decoder step (module docstring).
    first_logits: (B, V) logits of the next token after each row's prompt.
    cache: the decoder cache after the prompts, batch B; copied to B * num_beams rows.
    num_beams: beams per row, 1 .. V.
    num_return_sequences: how many of the best finished beams to return (default num_beams).
    max_new_tokens, eos_token_id, pad_token_id, length_penalty, min_new_tokens: as transformers.

  Returns:
    dict(tokens (B, K, max_new_tokens) int32, best first, EOS included, pad_token_id after the
    end; lengths (B, K) int32, tokens up to and including EOS; scores (B, K) float32, summed
    log-probabilities / lengths ** length_penalty: transformers' sequences_scores).
  """
  batch, vocab_size = first_logits.shape
  _check_common(first_logits, max_new_tokens, eos_token_id, min_new_tokens)
  if not 1 <= int(num_beams) <= vocab_size:
    raise ValueError(f"num_beams={num_beams!r}: expected 1 .. {vocab_size} (the vocabulary size); "
                     "beam search cannot keep more beams than there are tokens.")
  num_return_sequences = num_beams if num_return_sequences is None else num_return_sequences
  if not 1 <= int(num_return_sequences) <= num_beams:
    raise ValueError(f"num_return_sequences={num_return_sequences!r}: expected 1 .. num_beams "
                     f"({num_beams}).")
  beams, length = int(num_beams), int(max_new_tokens)
  keep = 2 * beams  # transformers: max(2, 1 + number of EOS ids) * num_beams
  is_top_beam = jnp.arange(keep) < beams
  row_offset = jnp.arange(batch)[:, None] * beams

  def select(state, logits):
    """One step: the next tokens of every beam from `logits` (B * beams, V)."""
    step = state["step"]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_probs = _ban_early_eos(log_probs, step, eos_token_id, min_new_tokens)
    totals = log_probs.reshape(batch, beams, vocab_size) + state["running_scores"][..., None]
    top_scores, top_indices = jax.lax.top_k(totals.reshape(batch, beams * vocab_size), keep)
    parents, tokens = top_indices // vocab_size, top_indices % vocab_size  # (B, keep)
    candidates = _take(state["running_tokens"], parents).at[:, :, step].set(tokens)
    hits_stop = (tokens == eos_token_id) | (step + 1 >= length)

    # The best `beams` candidates that did not stop keep running.
    running_scores = top_scores + hits_stop * _MASKED
    order = jax.lax.top_k(running_scores, beams)[1]
    running_tokens = _take(candidates, order)
    running_scores = _take(running_scores, order)
    running_parents = _take(parents, order)

    # Stopped candidates among the top `beams` join the finished set if they beat its worst.
    just_finished = hits_stop & is_top_beam[None]
    finished_scores = top_scores / (step + 1.0) ** length_penalty
    finished_scores += (~state["can_improve"])[:, None] * _MASKED
    finished_scores += (~just_finished) * _MASKED
    merged_scores = jnp.concatenate([state["scores"], finished_scores], axis=1)
    order = jax.lax.top_k(merged_scores, beams)[1]
    done_tokens = _take(jnp.concatenate([state["tokens"], candidates], axis=1), order)
    done_scores = _take(merged_scores, order)
    is_finished = _take(jnp.concatenate([state["is_finished"], just_finished], axis=1), order)

    # transformers' early_stopping=False heuristic, at the new length.
    best_running = running_scores[:, :1] / (step + 1.0) ** length_penalty
    worst_finished = jnp.where(is_finished, done_scores.min(axis=1, keepdims=True), _MASKED)
    can_improve = state["can_improve"] & jnp.any(best_running > worst_finished, axis=1)
    return dict(step=step + 1, running_tokens=running_tokens, running_scores=running_scores,
                tokens=done_tokens, scores=done_scores, is_finished=is_finished,
                can_improve=can_improve, cache=state["cache"],
                parents=(row_offset + running_parents).reshape(-1),
                go_on=jnp.any(can_improve) & ~jnp.all(hits_stop))

  pad_tokens = jnp.full((batch, beams, length), pad_token_id, jnp.int32)
  state = dict(
      step=jnp.zeros((), jnp.int32), running_tokens=pad_tokens,
      running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(_MASKED),
      tokens=pad_tokens, scores=jnp.full((batch, beams), _MASKED, jnp.float32),
      is_finished=jnp.zeros((batch, beams), bool), can_improve=jnp.ones((batch,), bool),
      cache=jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), cache))
  state = select(state, jnp.repeat(first_logits, beams, axis=0))

  def body(state):
    cache = jax.tree.map(lambda x: x[state["parents"]], state["cache"])
    last_tokens = jax.lax.dynamic_index_in_dim(state["running_tokens"], state["step"] - 1, axis=2,
                                               keepdims=False)
    logits, cache = step_fn(last_tokens.reshape(-1), cache)
    return select(dict(state, cache=cache), logits)

  state = jax.lax.while_loop(lambda s: s["go_on"] & (s["step"] < length), body, state)
  tokens = state["tokens"][:, :num_return_sequences]
  is_eos = tokens == eos_token_id
  lengths = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, length)
  return dict(tokens=tokens, lengths=lengths.astype(jnp.int32),
              scores=state["scores"][:, :num_return_sequences])


def greedy_search(step_fn: StepFn, first_logits, cache, *, max_new_tokens: int = 50,
                  eos_token_id: int, pad_token_id: int, min_new_tokens: int = 0) -> dict:
  """Greedy decoding from the logits after each row's prompt; traceable (jit the caller).

  Returns dict(tokens (B, max_new_tokens) int32, EOS included, pad_token_id after it; lengths (B,)
  int32, tokens up to and including EOS). The loop ends when every row has emitted EOS.
  """
  batch, _ = first_logits.shape
  _check_common(first_logits, max_new_tokens, eos_token_id, min_new_tokens)
  length = int(max_new_tokens)

  def select(state, logits):
    step = state["step"]
    logits = _ban_early_eos(logits.astype(jnp.float32), step, eos_token_id, min_new_tokens)
    tokens = jnp.where(state["done"], pad_token_id, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    done = state["done"] | (tokens == eos_token_id)
    lengths = state["lengths"] + (~state["done"]).astype(jnp.int32)
    return dict(step=step + 1, tokens=state["tokens"].at[:, step].set(tokens), done=done,
                lengths=lengths, cache=state["cache"])

  state = dict(step=jnp.zeros((), jnp.int32),
               tokens=jnp.full((batch, length), pad_token_id, jnp.int32),
               done=jnp.zeros((batch,), bool), lengths=jnp.zeros((batch,), jnp.int32),
               cache=cache)
  state = select(state, first_logits)

  def body(state):
    last_tokens = jax.lax.dynamic_index_in_dim(state["tokens"], state["step"] - 1, axis=1,
                                               keepdims=False)
    logits, cache = step_fn(last_tokens, state["cache"])
    return select(dict(state, cache=cache), logits)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]) & (s["step"] < length), body, state)
  return dict(tokens=state["tokens"], lengths=state["lengths"])
