"""Captioning throughput at the paper's size: ClipCap beam search with and without the key/value
cache, and the mapper's train step (images/s, XLA FLOPs, MFU, compile time, memory).

  python benchmarks/captioning.py                    # paper size: b1 and b8 beams, train b40
  python benchmarks/captioning.py --size=reduced     # run_all's row: b1 beams, 10 tokens, b8
  python benchmarks/captioning.py --measure=beam_search --beam_batch_sizes=1 --no_cache=false

Why: RLCF's captioners (Zhao et al., ICLR 2024, §4.3; mzhaoshuai/RLCF `caption/`) caption every
test image by 5-beam search and, under RLCF, decode K beams per adaptation step, so decoding speed
is their evaluation cost; the mapper's train step is ClipCap's training cost. The model is
`configs/clipcap_coco.py`'s COCO recipe with random weights (throughput does not depend on them):
CLIP ViT-B/16 at 224 px, the transformer mapper (prefix 40, clip length 40, 8 layers, width
768), OPT-125m with its 50,272-token vocabulary; float32.

What is timed (`common.time_step`: one compile, warm-up calls, the median of the timed calls):
  * beam_search: images (B, 224, 224, 3) -> the prompt (`clipcap.Model.prompt_embeds`: CLIP,
    mapper, '</s>') -> `decoding.beam_search`, the loop `opt.generate_beams` runs, with 5 beams
    and 50 new tokens (RLCF `caption/predictions.py`, `generate_opt.py`), all K beams returned,
    under one jit. Every beam runs the full 50 tokens: EOS is OPT's newline id and
    min_new_tokens = max_new_tokens bans it at every step (checked on the output). Two decoders
    behind the same loop:
      - "KV cache": `opt.start_decoding` (the prompt once into a cache, then one token a step);
      - "no cache": `start_without_cache` below, a reference written here only: each step runs the
        whole prefix + '</s>' + tokens-so-far through OPT again and takes the last position's
        logits (as transformers' `generate(use_cache=False)` does, which asks for the last
        logits only). Static shapes in one XLA loop: the tokens sit right-aligned in a
        max_new_tokens-wide window behind the prompt, the empty slots masked (OPT's positions
        come from the mask, so the logits are those of the unpadded sequence), so every step
        costs a full-window forward (41 + 50 positions) where a growing sequence would average
        41 + 25: about 1.4x the layer work of transformers' no-cache loop, so the cache's
        speed-up over it is an upper bound. Its single call is timed without a warm-up (it lasts
        minutes at b8).
    FLOPs: XLA counts the search's while-loop body once, so the decoder steps after the first
    are added as (max_new_tokens - 2) x one decoder step at B x beams rows, compiled alone; the
    beam bookkeeping (top-k, gathers) of those steps is not counted (< 1 %).
  * train_step: the trainer's step (`jaxprompt.train.build(config).train_step`, as
    `benchmarks/train_step.py` times it): CLIP image tower (frozen), mapper, OPT teacher-forced on
    40 caption ids ('</s>' + 39 random ids, none padded; `clipcap_coco.CAPTION_LENGTH`), the
    caption loss, backward to the mapper, AdamW (lr 2e-5 schedule) on the mapper alone; a
    synthetic batch at the recipe's batch 40. XLA's FLOPs of the compiled step (the frozen
    towers' weight gradients are not computed, so not counted).
  * rlcf_tta: RLCF's captioning test-time adaptation, `rlcf_captioning.Adapter.adapt` as the
    'tta_captioning' evaluator runs it, whole: the policy and reward image features, the
    zero-shot 5-beam caption, S = 4 steps of (K = 10 beams of a 10-beam search, decoded on the
    host, re-tokenised by OPT's and the reward CLIP's tokenizers, then the reward and the vmapped
    AdamW update of the mapper copies, lr 2e-6: ClipCap's script setting) and the final 5-beam
    caption; the captioner above plus a random reward CLIP ViT-L/14 (`rlcf_captioning.Model`).
    Timed one image at a time (b1, batched=False) and batched (batched=True, b4): the first call
    compiles (several jitted functions, and the update once per padded caption width), so its
    excess over the median of the later calls is given as the compile time. Device vs host: the
    Adapter's jitted functions are wrapped (`DeviceClock`) to wait for and time each call; the
    rest of the wall time is the host's (decoding, tokenisation, numpy). A random OPT almost
    never emits the newline EOS, so every sample and caption runs to max_new_tokens (RLCF's
    worst case; COCO-style captions are about a dozen tokens), and its ids cover the whole
    vocabulary, so the captions are decoded with `wide_vocabulary()`, a generated vocabulary of
    ~50,000 ids (the demo's 357 would decode nearly every sample to '' and shrink the update to
    a few positions); the re-tokenised widths (printed) are then max_new_tokens + 1 or a little
    more, as with real text. No FLOPs, MFU or XLA memory: the time spans several jitted calls
    (loops XLA counts once) and host work.
  MFU: XLA FLOPs over the median time against the float32 matmul peak measured in the same run,
  before and after the measurements (the larger; `common.matmul_peak_flops`, --matmul_size, a
  flag of benchmarks/train_step.py's, imported as tta.py does). Memory: XLA's arguments +
  temporaries + outputs of each compiled function, and the peak of the process
  (`common.peak_memory_bytes`: device peak or max RSS).

A measurement is a function (captioner, settings) -> rows, registered in MEASUREMENTS and chosen
with --measure; each row is `benchmarks/run_all.py`'s row dict, so run_all's 'clipcap' row prints
them (at --size=reduced).

Sizes (--size): 'paper' as above (beam search at b1 and b8, train at b40, RLCF at b1 and b4);
'reduced' (run_all: about 4 min on 2 CPU cores) keeps the model and 5 beams but decodes 10 new
tokens at b1, trains at b8, and adapts with K 2, one step, 4 new tokens, the reward ViT-B/16 and
b2 (mostly the RLCF functions' compile).

Measured (2026-12-01, 2 shared CPU cores): the README's Performance section.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import string
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402  (defines the shared flags)
from configs import clipcap_coco  # noqa: E402
from input_pipeline import embedded_captions, embedded_clip  # noqa: E402
from jaxprompt import decoding, host_memory, optim, sharding, train  # noqa: E402
from jaxprompt.models import clip, gpt2_tokenizer, opt  # noqa: E402
from jaxprompt.prompts import clipcap, coop, rlcf_captioning  # noqa: E402

NEWLINE_TOKEN_ID = 50118  # facebook/opt-125m's '\n', the captioners' EOS (banned here)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures (--size; the flags override single fields)."""
  beam_batch_sizes: tuple[int, ...]
  num_beams: int
  max_new_tokens: int
  no_cache: bool  # also time the no-cache reference decoder
  train_batch_size: int
  steps: int  # timed calls (median)
  warmup: int  # untimed calls after the compile
  tta_batch_size: int  # the batched RLCF adaptation's B (batch 1 is always measured too)
  tta_samples: int  # K, the beams sampled per RLCF step
  tta_steps: int  # S, the RLCF steps
  tta_max_new_tokens: int  # of the sampled and the final captions
  tta_reward: str  # the reward CLIP
  tta_timed_calls: int  # timed adaptations after the compiling one (median)


SIZES = {
    "paper": Settings(beam_batch_sizes=(1, 8), num_beams=5, max_new_tokens=50, no_cache=True,
                      train_batch_size=40, steps=2, warmup=1, tta_batch_size=4, tta_samples=10,
                      tta_steps=rlcf_captioning.STEPS,
                      tta_max_new_tokens=rlcf_captioning.MAX_NEW_TOKENS, tta_reward="ViT-L/14",
                      tta_timed_calls=1),
    "reduced": Settings(beam_batch_sizes=(1,), num_beams=5, max_new_tokens=10, no_cache=True,
                        train_batch_size=8, steps=2, warmup=1, tta_batch_size=2, tta_samples=2,
                        tta_steps=1, tta_max_new_tokens=4,
                        tta_reward="ViT-B/16", tta_timed_calls=1),
}


def train_config(batch_size: int) -> ml_collections.ConfigDict:
  """configs/clipcap_coco.py's COCO recipe, random weights, on the embedded captioned shapes.

  The OPT tokenizer is the demo's generated vocabulary (its ids fit OPT-125m's), so no OPT folder
  or COCO file is read; the model keeps the recipe's sizes and 50,272-token vocabulary."""
  config = clipcap_coco.get_config(f"dataset=coco,opt={clipcap_coco.demo_vocabulary()}")
  config.model_init.opt = ""  # random weights
  config.model.vocab_path = embedded_clip.byte_vocabulary()
  config.dataset = embedded_captions.NAME
  config.dataset_kwargs = ml_collections.ConfigDict(dict(train_pairs=True))
  config.batch_size = config.eval_batch_size = batch_size
  # The schedule's length (not what a step computes): the embedded pairs are too few for COCO's
  # 10 epochs to outlast the 5000-step warm-up.
  config.total_steps = 2 * config.optim.warmup_steps
  return config


@dataclasses.dataclass
class Captioner:
  """The built experiment and its current state (a train step donates the previous one)."""
  exp: train.Experiment
  state: dict

  def variables(self) -> dict:
    return self.exp.evaluated(self.state)


def build_captioner(settings: Settings) -> Captioner:
  exp = train.build(train_config(settings.train_batch_size))
  return Captioner(exp, exp.state)


# ------------------------------------------------------------------------------------------------
# Beam search with and without the cache.


def start_without_cache(decoder: opt.Model, params, input_embeds, attention_mask,
                        max_new_tokens: int):
  """`opt.start_decoding`'s contract without a key/value cache (module docstring): (logits after
  the prompt (B, V), history, step_fn); the history {'prompt' (B, T, D), 'prompt_mask' (B, T),
  'tokens' (B, max_new_tokens) right-aligned, 'count' (B,)} is batch-leading, as beam search
  needs."""
  variables = {"params": params}
  rows, prompt_length, _ = input_embeds.shape
  prompt_mask = (jnp.ones((rows, prompt_length), jnp.int32) if attention_mask is None
                 else jnp.asarray(attention_mask, jnp.int32))
  is_final_norm = lambda module, _: (isinstance(module.parent, opt.Model)
                                     and module.name == "final_layer_norm")

  def last_logits(embeds, mask):
    # The final LayerNorm's output, captured: the discarded full-sequence head is removed by XLA.
    _, state = decoder.apply(variables, embeds, mask, capture_intermediates=is_final_norm)
    hidden = state["intermediates"]["final_layer_norm"]["__call__"][0][:, -1]
    return decoder.apply(variables, hidden, method=lambda m, h: m.embed_tokens.attend(h)
                         ).astype(jnp.float32)

  history = dict(prompt=input_embeds, prompt_mask=prompt_mask, count=jnp.zeros((rows,), jnp.int32),
                 tokens=jnp.full((rows, max_new_tokens), opt.PAD_TOKEN_ID, jnp.int32))

  def step_fn(token_ids, history):
    tokens = jnp.concatenate([history["tokens"][:, 1:], token_ids[:, None]], axis=1)
    count = history["count"] + 1
    token_mask = jnp.arange(max_new_tokens)[None, :] >= max_new_tokens - count[:, None]
    mask = jnp.concatenate([history["prompt_mask"], token_mask.astype(jnp.int32)], axis=1)
    token_embeds = decoder.apply(variables, tokens, method=opt.Model.embed)
    embeds = jnp.concatenate([history["prompt"], token_embeds.astype(history["prompt"].dtype)],
                             axis=1)
    return last_logits(embeds, mask), dict(history, tokens=tokens, count=count)

  return last_logits(input_embeds, prompt_mask), history, step_fn


DECODERS = {"KV cache": opt.start_decoding, "no cache": start_without_cache}


def decoder_of(model: clipcap.Model) -> opt.Model:
  return opt.Model(model.opt_variant, model.opt_vocab_size, model.dtype)


def beam_captions(start, model: clipcap.Model, num_beams: int, max_new_tokens: int, variables,
                  images) -> dict:
  """K beams of max_new_tokens tokens per image (EOS banned throughout), decoded by `start`."""
  prompt = model.apply(variables, images, method=clipcap.Model.prompt_embeds)
  first_logits, cache, step_fn = start(decoder_of(model), variables["params"]["opt"], prompt,
                                       None, max_new_tokens)
  return decoding.beam_search(step_fn, first_logits, cache, num_beams=num_beams,
                              max_new_tokens=max_new_tokens, eos_token_id=NEWLINE_TOKEN_ID,
                              pad_token_id=opt.PAD_TOKEN_ID, min_new_tokens=max_new_tokens)


def later_steps_flops(start, model: clipcap.Model, variables, images, num_beams: int,
                      max_new_tokens: int) -> float:
  """XLA's FLOPs of the decoder steps XLA's count of the loop leaves out: (max_new_tokens - 2) x
  one `start` step at B x num_beams rows, compiled alone (the prompt it is built from is unused
  there and removed)."""
  decoder, params = decoder_of(model), variables["params"]["opt"]
  prompt = jax.eval_shape(lambda v, x: jnp.repeat(model.apply(
      v, x, method=clipcap.Model.prompt_embeds), num_beams, axis=0), variables, images)
  cache = jax.eval_shape(lambda p, e: start(decoder, p, e, None, max_new_tokens)[1], params,
                         prompt)
  one_step = jax.jit(lambda p, e, t, c: start(decoder, p, e, None, max_new_tokens)[2](t, c))
  compiled = one_step.lower(params, prompt, jax.ShapeDtypeStruct(prompt.shape[:1], jnp.int32),
                            cache).compile()
  return max(max_new_tokens - 2, 0) * common.xla_flops(compiled)


def measure_beam_search(captioner: Captioner, settings: Settings) -> list[dict]:
  """Captions/s of 5-beam search with the KV cache and (settings.no_cache) without, per B."""
  model, variables = captioner.exp.model, captioner.variables()
  size = captioner.exp.config.pp.image_size
  decoders = list(DECODERS) if settings.no_cache else ["KV cache"]
  rows = []
  for batch in settings.beam_batch_sizes:
    images = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, size, size, 3)),
                         jnp.float32)
    tokens = {}
    for name in decoders:
      start = DECODERS[name]
      search = jax.jit(functools.partial(beam_captions, start, model, settings.num_beams,
                                         settings.max_new_tokens))
      steps, warmup = (1, 0) if name == "no cache" else (settings.steps, settings.warmup)
      timing, out = common.time_step(search, (variables, images), steps=steps, warmup=warmup)
      timing.flops += later_steps_flops(start, model, variables, images, settings.num_beams,
                                        settings.max_new_tokens)
      if not np.all(np.asarray(out["lengths"]) == settings.max_new_tokens):
        raise RuntimeError(f"{name} b{batch}: a beam stopped before {settings.max_new_tokens} "
                           f"tokens ({np.asarray(out['lengths']).tolist()}); EOS should be banned.")
      tokens[name] = np.asarray(out["tokens"])
      rows.append(dict(step=f"beam search, {name}", unit="images", examples=batch,
                       seconds=timing.seconds, flops=timing.flops, compile_s=timing.compile_s,
                       xla_bytes=timing.xla_bytes,
                       size=f"b{batch}, {settings.num_beams} beams x {settings.max_new_tokens} "
                            "new tokens"))
      print(f"[beam search b{batch}, {name}] {timing.seconds:.2f} s/call -> "
            f"{batch / timing.seconds:.3f} images/s; compile {timing.compile_s:.1f} s; "
            f"{common.load_now()}", flush=True)
    if len(tokens) == 2:  # the same search on the same weights: float rounding may flip ties
      same = np.mean(np.all(tokens["KV cache"] == tokens["no cache"], axis=-1))
      print(f"[beam search b{batch}] beams equal with and without the cache: {100 * same:.0f}%",
            flush=True)
  return rows


# ------------------------------------------------------------------------------------------------
# The mapper's train step.


def synthetic_batch(config, vocab_size: int) -> dict:
  """Images N(0, 1) at the config's size and '</s>' + random caption ids, none padded."""
  rng = np.random.default_rng(0)
  batch, size = config.batch_size, config.pp.image_size
  ids = rng.integers(opt.BOS_TOKEN_ID + 2, vocab_size, (batch, clipcap_coco.CAPTION_LENGTH))
  ids[:, 0] = opt.BOS_TOKEN_ID
  return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "caption_ids": ids.astype(np.int32)}


def measure_train_step(captioner: Captioner, settings: Settings) -> list[dict]:
  """The trainer's step (mapper only trained) on a synthetic batch of settings.train_batch_size."""
  exp = captioner.exp
  model = exp.model
  vocab_size = opt.decode_variant(model.opt_variant, model.opt_vocab_size)["vocab_size"]
  batch = sharding.global_batch(synthetic_batch(exp.config, vocab_size), exp.mesh)
  timing, (state, _) = common.time_step(exp.train_step, (captioner.state, batch),
                                        steps=settings.steps, warmup=settings.warmup,
                                        carry=lambda args, outputs: (outputs[0], args[1]))
  captioner.state = state
  trained = sum(x.size for x in jax.tree.leaves(optim.trainable_subset(state["params"],
                                                                       exp.labels)))
  print(f"[train step b{exp.config.batch_size}] {timing.seconds:.2f} s/step -> "
        f"{exp.config.batch_size / timing.seconds:.3f} images/s; compile "
        f"{timing.compile_s:.1f} s; {trained:,} trained params; {common.load_now()}", flush=True)
  return [dict(step="train", unit="images", examples=exp.config.batch_size,
               seconds=timing.seconds, flops=timing.flops, compile_s=timing.compile_s,
               xla_bytes=timing.xla_bytes,
               size=f"b{exp.config.batch_size}, {clipcap_coco.CAPTION_LENGTH} caption ids, "
                    "mapper trained")]


# ------------------------------------------------------------------------------------------------
# RLCF captioning test-time adaptation.


def wide_vocabulary(vocab_size: int) -> str:
  """An OPT tokenizer folder (written on first use) whose ids cover nearly all of `vocab_size`
  (OPT-125m's 50,272): the 256 byte symbols (the newline one token, the EOS), every three-letter
  lower-case word and as many four-letter ones as fit, each with and without its leading space
  (and the two-letter pieces their merges make). A random OPT's samples then decode to text and
  re-tokenise to about as many ids as were sampled, as a trained captioner's do (the demo's
  vocabulary knows 357 ids: nearly every sample would decode to '')."""
  folder = os.path.join(tempfile.gettempdir(), f"jaxprompt-{os.getuid()}",
                        f"opt_wide_vocab_{vocab_size}")
  if not os.path.isfile(os.path.join(folder, gpt2_tokenizer.MERGES_FILE)):
    words = ["".join(w) for w in itertools.product(string.ascii_lowercase, repeat=3)]
    # Ids so far: the specials, the bytes, the two-letter pieces, each word with and without 'Ġ'.
    used = len(gpt2_tokenizer.SPECIAL_TOKENS) + 256 + 26**2 + 2 * len(words)
    fours = itertools.product(string.ascii_lowercase, repeat=4)
    words += ["".join(w) for w in itertools.islice(fours, (vocab_size - used) // 2)]
    gpt2_tokenizer.write_tiny_vocabulary(folder, words)
  return folder


def rlcf_model(model: clipcap.Model, reward: str) -> rlcf_captioning.Model:
  """The captioner's model as `rlcf_captioning.Model` with the reward CLIP `reward` and the OPT
  tokenizer `wide_vocabulary`."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(clipcap.Model)
            if f.init and f.name not in ("parent", "name")}
  vocab_size = opt.decode_variant(model.opt_variant, model.opt_vocab_size)["vocab_size"]
  return rlcf_captioning.Model(**{**fields, "tokenizer_path": wide_vocabulary(vocab_size)},
                               reward_variants=(reward,))


def rlcf_variables(captioner: Captioner, model: rlcf_captioning.Model) -> dict:
  """The captioner's variables plus a random-init reward CLIP 'reward_0'."""
  reward = clip.Model(**coop.clip_config(model.reward_variants[0], model.dtype))
  init = jax.jit(lambda key: reward.init(
      key, jnp.zeros((1, reward.image_size, reward.image_size, 3)),
      jnp.zeros((1, reward.context_length), jnp.int32),
      method=lambda m, x, t: (m.encode_image(x), m.encode_text(t))))
  variables = captioner.variables()
  return {**variables, "params": {**variables["params"],
                                  "reward_0": init(jax.random.PRNGKey(1))["params"]}}


class DeviceClock:
  """Wraps an `Adapter`'s jitted functions (embed, start, sample, update, caption) so that each
  call is waited for and its wall time added to `seconds[name]`: the adaptation's device time
  (with dispatch); the rest of its wall time is the host's (decoding, both re-tokenisations,
  numpy)."""
  NAMES = ("embed", "start", "sample", "update", "caption")

  def __init__(self, adapter: rlcf_captioning.Adapter):
    self.seconds = dict.fromkeys(self.NAMES, 0.0)
    for name in self.NAMES:
      setattr(adapter, f"_{name}", self._timed(name, getattr(adapter, f"_{name}")))

  def _timed(self, name: str, fn):
    def call(*args):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      self.seconds[name] += time.perf_counter() - start
      return out
    return call


def tta_reductions(settings: Settings) -> str:
  """How settings' adaptation differs from the paper's ('' where it does not)."""
  paper = SIZES["paper"]
  notes = [f"{label} {getattr(settings, f)} (RLCF: {getattr(paper, f)})" for f, label in (
      ("tta_samples", "K"), ("tta_steps", "steps"), ("tta_max_new_tokens", "new tokens"),
      ("tta_reward", "reward")) if getattr(settings, f) != getattr(paper, f)]
  return ", ".join(notes)


def measure_rlcf_tta(captioner: Captioner, settings: Settings) -> list[dict]:
  """Images/s of `rlcf_captioning.Adapter.adapt` one image at a time (b1) and batched
  (settings.tta_batch_size): the first call compiles, then the median of the timed calls."""
  model = rlcf_model(captioner.exp.model, settings.tta_reward)
  variables = rlcf_variables(captioner, model)
  fns = rlcf_captioning.predict_fns(model)
  tta_settings = rlcf_captioning.Settings(
      num_samples=settings.tta_samples, steps=settings.tta_steps,
      lr=rlcf_captioning.SCRIPT_SETTINGS["clipcap", "flickr"][1],
      max_new_tokens=settings.tta_max_new_tokens)
  size = captioner.exp.config.pp.image_size
  rng = np.random.default_rng(0)
  rows = []
  for batch, batched in ((1, False), (settings.tta_batch_size, True)):
    adapter = rlcf_captioning.Adapter(fns["rlcf_captioner"](), tta_settings,
                                      fns["caption_tokenizer"](), fns["reward_tokenizers"]())
    clock = DeviceClock(adapter)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    times, parts = [], []
    for _ in range(1 + settings.tta_timed_calls):
      clock.seconds = dict.fromkeys(clock.NAMES, 0.0)
      start = time.perf_counter()
      out = adapter.adapt(variables, images, batched=batched)
      times.append(time.perf_counter() - start)
      parts.append(clock.seconds)
    seconds = float(np.median(times[1:]))
    device = {n: float(np.median([p[n] for p in parts[1:]])) for n in clock.NAMES}
    host = seconds - sum(device.values())
    widths = sorted({int(w) for step in out["steps"] for w in np.ravel(step["lengths"])})
    rows.append(dict(
        step=f"RLCF TTA adapt, {'batched' if batched else 'one at a time'}", unit="images",
        examples=batch, seconds=seconds, flops=None, compile_s=times[0] - seconds,
        xla_bytes=None,
        size=f"b{batch}, K {settings.tta_samples}, steps {settings.tta_steps}, "
             f"{settings.tta_max_new_tokens} new tokens, reward {settings.tta_reward}"))
    shares = ", ".join(f"{n} {100 * t / seconds:.0f}%" for n, t in [*device.items(),
                                                                    ("host", host)])
    print(f"[RLCF TTA b{batch}, batched={batched}] {seconds:.2f} s/call -> "
          f"{batch / seconds:.3f} images/s; first call {times[0]:.1f} s (compile ~"
          f"{times[0] - seconds:.1f} s); of the steady call: {shares}; re-tokenised caption "
          f"widths {widths}; {common.load_now()}", flush=True)
  return rows


MEASUREMENTS = {"beam_search": measure_beam_search, "train_step": measure_train_step,
                "rlcf_tta": measure_rlcf_tta}


# ------------------------------------------------------------------------------------------------
# The script.

FLAGS = train_step.FLAGS  # train_step's flags (--matmul_size, ...) and this file's
flags.DEFINE_enum("size", "paper", list(SIZES), "Settings (module docstring).")
flags.DEFINE_list("measure", list(MEASUREMENTS), f"Of: {', '.join(MEASUREMENTS)}.")
flags.DEFINE_list("beam_batch_sizes", None, "Images per beam search call; default the size's.")
flags.DEFINE_integer("train_batch_size", None, "The train step's batch; default the size's.")
flags.DEFINE_bool("no_cache", None, "Also time the no-cache decoder; default the size's.")
flags.DEFINE_integer("timed_calls", None, "Timed calls per measurement (median); default the "
                     "size's.")
flags.DEFINE_integer("tta_batch_size", None, "The batched RLCF adaptation's images; default the "
                     "size's.")
flags.DEFINE_integer("tta_max_new_tokens", None, "RLCF's caption length; default the size's.")
flags.DEFINE_string("tta_reward", None, "RLCF's reward CLIP; default the size's.")


def settings_from_flags() -> Settings:
  unknown = sorted(set(FLAGS.measure) - set(MEASUREMENTS))
  if unknown:
    raise ValueError(f"--measure: unknown {unknown}; expected some of {list(MEASUREMENTS)}.")
  batch_sizes = FLAGS.beam_batch_sizes and tuple(int(b) for b in FLAGS.beam_batch_sizes)
  overrides = dict(beam_batch_sizes=batch_sizes, train_batch_size=FLAGS.train_batch_size,
                   no_cache=FLAGS.no_cache, steps=FLAGS.timed_calls,
                   tta_batch_size=FLAGS.tta_batch_size, tta_max_new_tokens=FLAGS.tta_max_new_tokens,
                   tta_reward=FLAGS.tta_reward)
  return dataclasses.replace(SIZES[FLAGS.size],
                             **{k: v for k, v in overrides.items() if v is not None})


def main(_):
  if FLAGS.reuse_host_memory:  # as the trainer runs (jaxprompt/host_memory.py)
    host_memory.reuse_freed_memory()
  settings = settings_from_flags()
  start = time.perf_counter()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs; "
        f"--size={FLAGS.size} {settings}; {common.load_now()}", flush=True)
  peaks = [common.matmul_peak_flops(FLAGS.matmul_size, jnp.float32)]
  captioner = build_captioner(settings)
  rows = []
  for name in FLAGS.measure:
    rows += MEASUREMENTS[name](captioner, settings)
  peaks.append(common.matmul_peak_flops(FLAGS.matmul_size, jnp.float32))
  peak = max(peaks)
  memory, memory_kind = common.peak_memory_bytes()
  table = []
  for row in rows:
    rate = [f"{row['examples'] / row['seconds']:.3g}", f"{row['seconds']:.2f}"]
    if row["flops"] is None:  # the RLCF rows: host work between several jitted calls
      counts = ["-"] * 3
    else:
      achieved = row["flops"] / row["seconds"]
      counts = [f"{row['flops'] / 1e9:,.0f}", f"{achieved / 1e9:.0f}",
                f"{100 * achieved / peak:.0f}%"]
    xla = "-" if row["xla_bytes"] is None else f"{row['xla_bytes'] / common.GIB:.2f}"
    table.append([row["step"], row["size"], *rate, *counts, f"{row['compile_s']:.1f}", xla])
  print(f"\nmatmul peak ({FLAGS.matmul_size}^2 float32) before / after: {peaks[0] / 1e9:.0f} / "
        f"{peaks[1] / 1e9:.0f} GFLOP/s (MFU against the larger); peak memory "
        f"({memory_kind}) {memory / common.GIB:.2f} GiB; {common.load_now()}; total "
        f"{time.perf_counter() - start:.0f} s\n")
  print(common.markdown_table(["measurement", "size", "images/s", "s/call", "GFLOP/call",
                               "GFLOP/s", "MFU", "compile s", "XLA GiB"], table))
  by_name = {(r["step"], r["examples"]): r["seconds"] for r in rows}
  for batch in settings.beam_batch_sizes:
    cached, uncached = (by_name.get((f"beam search, {n}", batch)) for n in DECODERS)
    if cached and uncached:
      print(f"b{batch}: the KV cache decodes {uncached / cached:.1f}x faster than no cache")


if __name__ == "__main__":
  app.run(main)
