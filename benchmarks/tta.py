"""Test-time adaptation throughput: test samples adapted per second by `jaxprompt.tta.adapt` (TPT
prompt mode and RLCF prompt mode) against the originals' per-sample loop in PyTorch on this CPU.

  python benchmarks/tta.py --vocab=bpe_simple_vocab_16e6.txt.gz     # ViT-B/16, 64 views, C = 20
  python benchmarks/tta.py --vocab=... --num_classes=200 --batch_sizes=1,4   # ImageNet-A's C
  python benchmarks/tta.py --vocab=... --reward_variant=ViT-L/14          # RLCF's reward CLIP
  python benchmarks/tta.py --variant=ViT-mu/8 --torch_samples=1          # a smoke run, seconds

Both sides run the same random-weight CLIPs (no downloads): a transformers `CLIPModel` with the
released variant's sizes (`clip.decode_variant`, ViT-B/16 by default; QuickGELU, pre-LN, the math
of OpenAI's CLIP), converted to our `clip.Model` with `clip.convert_state_dict`; the same views
(N(0, 1), (B, V, S, S, 3), S = the variant's input size); the same class prompts
"{ctx_init} {name}." (ImageNet-A's first 20 class names, cycled with a number for more:
"goldfish 1", ...: equal prompts would tie in RLCF's top-K); float32 by default.

What is timed, per method (--methods):
  * tpt: TPT prompt mode, 1 AdamW step (lr 5e-3, weight decay 0.01), 64 views, selection 0.1
    (6 views kept), n_ctx 4 from "a photo of a" (azshue/TPT `scripts/test_tpt.sh`);
  * rlcf: RLCF prompt mode, 3 steps (lr 7e-3, weight decay 5e-4), K = 3 sampled classes, one reward
    CLIP with weight 1 (mzhaoshuai/RLCF `TPT/scripts/rlcf-prompt.sh`), whose reward CLIP is
    ViT-L/14; here --reward_variant, ViT-B/16 by default to keep the run short;
  * jax: `tta.adapt(episode, tunable0, frozen, views, rng)` (batched) with the episode of
    `tpt.make_episode` / `rlcf.make_episode`, under `jax.jit` (the episode static), lowered and
    compiled once per B in --batch_sizes (the compile time reported), then the compiled function
    called --repeats times on the same B samples, the first call included (best time; the first
    call of a compiled function costs about 0.2 s more here, under 2 % of a ViT-B/16 call). FLOPs
    are XLA's cost analysis of the compiled call (dots at 2 x MACs); XLA counts a loop's body once,
    so for RLCF's 3 steps the cost of the 2 later steps (one vmapped loss gradient and AdamW
    update, compiled alone) is added. MFU = FLOPs / time over the matmul peak measured in the same
    run (`benchmarks/common.py`'s) in our compute dtype (--dtype; torch rows: float32). Memory:
    XLA's arguments + temporaries + outputs of the compiled call, and the process's max RSS so far;
  * torch: the originals' loop over a batch-size-1 loader, written here after azshue/TPT
    `tpt_classification.py` (`test_time_adapt_eval`, `test_time_tuning`, `select_confident_samples`,
    `avg_entropy`; `clip/custom_clip.py` `PromptLearner`, `TextEncoder`,
    `ClipTestTimeTuning.inference`) and mzhaoshuai/RLCF `TPT/tpt_cls_rl.py` (`test_time_tuning`)
    with `TPT/clip_reward.py` (`CLIPRewards`): per sample reset the context and load the initial
    AdamW state; step 1 forwards all V views through the image tower (no grad) and the C full-length
    (77-token) prompts through the text tower (with grad), selects the confident views, takes the
    loss, backward, AdamW step; TPT's later steps forward all V views again and index the selected
    ones, RLCF's forward the selected ones only (and the reward CLIP encodes the selected views
    once, at step 1); then the prediction of view 0 (image tower on one view, text tower on the C
    prompts). `torch.set_num_threads(--torch_threads or the core count)`, fp32, no autocast (the
    originals' CUDA autocast has no CPU counterpart here). The reward CLIP's class text features are
    computed once, before the loop, as the original's `set_class_features`. Sample 0 runs under
    `torch.utils.flop_counter.FlopCounterMode` (its FLOPs, untimed; --notorch_flop_count skips it);
    then samples 0..--torch_samples - 1 are timed, each on its own views, and samples/s is their
    count over their time.
  * sanity: sample 0's logits after adaptation from both sides on the same weights and views
    (their argmax and largest difference): a print, not a test (tests/test_tta_tpt.py and
    tests/test_rlcf.py hold the parity tests).
  * profile (--parts profile): one sample's parts, best of --repeats, both sides: the episode's
    `prepare` (the V-view image forward, the text forward and the selection; RLCF: + the reward
    CLIP on the selected views), one step's loss gradient (text tower forward + backward over the C
    prompts), `predict`; torch's image tower on V views, text tower forward + backward and forward
    at 77 tokens.

Measured here, 2026-11-30, 2 CPU cores (x86-64, AVX-512) shared with 4 other jobs (1-minute load
average 2 to 8 beside each number: the times move by up to 2x with it), float32, ViT-B/16 at
224 px, 64 views, selection 0.1, BPE prompts, RLCF's reward CLIP ViT-B/16; samples/s (speed-up over
the torch loop of the same run):

  C    method  torch loop         jax B=1          B=2      B=4      B=8      GFLOP/sample torch/jax
  20   TPT     0.016 (load 7.5)   0.029 (1.87x)    0.033    0.034    0.028    2,539 / 2,322
  20   TPT     0.038 (load 2.0)   0.034 (0.91x, load 4.0)                     (a second run)
  20   RLCF    0.026 (load 4.0)   0.055 (2.15x)    0.048    0.054    -        3,611 / 2,601
  200  TPT     0.010 (load 5.4)   0.044 (4.59x)    -        -        -        - / 2,987
  200  RLCF    0.009 (load 4.5)   0.023 (2.59x, load 6.9)                     - / 3,931

Where the time goes (one sample, load 2.5, C = 20): our episode is its `prepare` (15.8 s: the
64-view image tower, RLCF's reward tower on 6 views), then 0.17 s a step and 0.05 s to predict;
the torch loop spends 17.0 s on the 64-view image tower, 6.0 s a step on the text tower (forward +
backward over C prompts of 77 tokens), 2.6 s + 2.2 s to predict (text tower + one view) and, for
RLCF, 3.7 s on each 6-view image forward (reward; policy at steps 2 and 3). The image tower on
16 views, back to back: ours 2.6 s (219 GFLOP/s), torch's 3.4-3.7 s. Both sides compute the
64-view forward, so at C = 20 the speed-up is bounded near 2x; it grows with C (the text tower is
our cached, cut-to-length prompts against the original's 77 tokens at every step).

--dtype=bfloat16 runs our CLIPs' matmuls in bfloat16 (an option; the default and the parity are
float32).

Flags: --variant and --matmul_size are `benchmarks/train_step.py`'s (imported as a module, as
`benchmarks/dgl.py` does; its other flags are not used). --vocab: the CLIP BPE vocabulary
(OpenAI's `bpe_simple_vocab_16e6.txt.gz`); without it the byte-level vocabulary the project writes
itself, whose prompts are longer (one token a character: n_ctx is the character count of
"a photo of a" and names take more tokens), so pass the BPE file for the originals' prompts.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from absl import app, flags
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common as bench  # noqa: E402
from benchmarks import train_step  # noqa: E402  (defines the shared flags)
from input_pipeline import embedded_clip  # noqa: E402
from jaxprompt import host_memory, tta  # noqa: E402
from jaxprompt.models import clip, common  # noqa: E402
from jaxprompt.prompts import coop, rlcf, tpt  # noqa: E402

FLAGS = train_step.FLAGS  # train_step's flags (--batch_size, --steps, ...) and this file's
FLAGS.set_default("variant", "ViT-B/16")
flags.DEFINE_list("methods", ["tpt", "rlcf"], "Of: tpt, rlcf.")
flags.DEFINE_list("parts", ["torch", "jax"], "Of: torch, jax, profile (the sanity check needs "
                  "torch and jax).")
flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8"], "B of the batched JAX episodes.")
flags.DEFINE_integer("num_classes", 20, "C, the class prompts (ImageNet-A's names, numbered "
                     "when cycled).")
flags.DEFINE_integer("views", 64, "V, views per test sample (view 0 predicted).")
flags.DEFINE_float("selection", 0.1, "Fraction of the views kept by confidence.")
flags.DEFINE_string("reward_variant", "ViT-B/16", "RLCF's reward CLIP (the original's: ViT-L/14).")
flags.DEFINE_integer("top_k", 3, "RLCF's K sampled classes per view.")
flags.DEFINE_integer("repeats", 1, "Timed calls of each compiled JAX episode and profiled part "
                     "(best reported).")
flags.DEFINE_integer("torch_samples", 2, "Timed samples of the torch loop (at least 1).")
flags.DEFINE_bool("torch_flop_count", True, "Run sample 0 once more, untimed, under torch's FLOP "
                  "counter (before the timed samples; it warms them up too).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0: the core count.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our CLIPs' compute dtype (the "
                  "context and the torch side stay float32; parity is float32's).")
flags.DEFINE_string("vocab", "", "CLIP BPE vocabulary; '' = the byte-level one (longer prompts).")

CTX_INIT = "a photo of a"
# ImageNet-A's first 20 classes (TPT `data/imagenet_variants.py` `imagenet_a_mask` order).
CLASS_NAMES = ("goldfish", "great white shark", "hammerhead", "stingray", "hen", "ostrich",
               "goldfinch", "junco", "bald eagle", "vulture", "newt", "axolotl", "tree frog",
               "iguana", "African chameleon", "cobra", "scorpion", "tarantula", "centipede",
               "peacock")
METHOD_SETTINGS = {  # the scripts' steps / lr / weight decay (module docstring)
    "tpt": dict(steps=1, lr=5e-3, weight_decay=0.01),
    "rlcf": dict(steps=3, lr=7e-3, weight_decay=5e-4)}
GIB = 2**30


# ------------------------------------------------------------------------------------------------
# The shared random CLIPs.


def random_clips(variant: str, seed: int):
  """(transformers CLIPModel, our clip.Model in --dtype, its variables) with the same random
  float32 weights."""
  fields = clip.decode_variant(variant)
  if fields["vision_patch_size"] is None:
    raise ValueError(f"--variant/--reward_variant {variant!r}: this benchmark builds ViT CLIPs.")
  config = transformers.CLIPConfig(
      vision_config=dict(hidden_size=fields["vision_width"],
                         intermediate_size=4 * fields["vision_width"],
                         num_attention_heads=fields["vision_heads"],
                         num_hidden_layers=fields["vision_layers"],
                         patch_size=fields["vision_patch_size"], image_size=fields["image_size"]),
      text_config=dict(hidden_size=fields["text_width"], intermediate_size=4 * fields["text_width"],
                       num_attention_heads=fields["text_heads"],
                       num_hidden_layers=fields["text_layers"], vocab_size=fields["vocab_size"],
                       max_position_embeddings=fields["context_length"]),
      projection_dim=fields["embed_dim"])
  torch.manual_seed(seed)
  hf = transformers.CLIPModel(config).eval().requires_grad_(False)
  model = clip.Model(**coop.clip_config(variant, jnp.dtype(FLAGS.dtype)))
  converted = clip.convert_state_dict({k: v.numpy() for k, v in hf.state_dict().items()},
                                      vision_heads=model.vision_heads, text_heads=model.text_heads)
  return hf, model, common.merge_params(converted, clip.init_variables_like(model))


# ------------------------------------------------------------------------------------------------
# The originals' per-sample loop in torch (module docstring).


def torch_image_features(hf, images):
  """L2-normalised image features of NCHW images (CLIP's `encode_image`)."""
  x = hf.get_image_features(pixel_values=images)
  x = getattr(x, "pooler_output", x)
  return x / x.norm(dim=-1, keepdim=True)


def torch_text_features(hf, prompts, eot):
  """TPT's `TextEncoder` on prompt embeddings (C, 77, W): + positional embeddings, the causal
  transformer, ln_final, the EOT token's output @ text_projection; L2-normalised."""
  text = hf.text_model
  x = text.embeddings(inputs_embeds=prompts)
  length = x.shape[1]
  causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
  x = text.encoder(inputs_embeds=x, attention_mask=causal).last_hidden_state
  x = hf.text_projection(text.final_layer_norm(x)[torch.arange(x.shape[0]), eot])
  return x / x.norm(dim=-1, keepdim=True)


class TorchPromptCLIP(torch.nn.Module):
  """TPT's `ClipTestTimeTuning` with its `PromptLearner` (shared context, 'end' layout): the
  prompts [prefix][ctx][suffix] cut from the token embeddings of "{ctx_init} {name}."."""

  def __init__(self, hf, token_ids, n_ctx: int):
    super().__init__()
    self.hf, self.eot = hf, token_ids.argmax(-1)
    with torch.no_grad():
      embedding = hf.text_model.embeddings.token_embedding(token_ids)
    self.register_buffer("prefix", embedding[:, :1])
    self.register_buffer("suffix", embedding[:, 1 + n_ctx:])
    self.ctx_init_state = embedding[0, 1:1 + n_ctx].clone()
    self.ctx = torch.nn.Parameter(self.ctx_init_state.clone())

  def reset(self):
    self.ctx.copy_(self.ctx_init_state)

  def text_features(self):
    prompts = torch.cat([self.prefix, self.ctx.expand(len(self.prefix), -1, -1), self.suffix], 1)
    return torch_text_features(self.hf, prompts, self.eot)

  def forward(self, images):  # `ClipTestTimeTuning.inference`
    with torch.no_grad():
      image_features = torch_image_features(self.hf, images)
    return self.hf.logit_scale.exp() * image_features @ self.text_features().t()


def select_confident(logits, fraction: float):
  entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
  index = torch.argsort(entropy, descending=False)[:int(entropy.size()[0] * fraction)]
  return logits[index], index


def avg_entropy(outputs):
  logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
  avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
  avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
  return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


class TorchReward:
  """RLCF's `CLIPRewards` with one reward CLIP: class text features set once, image features of
  the selected views per sample (bicubic align_corners resize to its input size when it differs),
  CLIP-S = 2.5 max(cos, 0), the K-mean baseline."""

  def __init__(self, hf, token_ids, policy_size: int, top_k: int):
    self.hf, self.top_k = hf, top_k
    self.size = hf.config.vision_config.image_size
    self.resize = self.size != policy_size
    with torch.no_grad():
      self.class_features = torch_text_features(
          hf, hf.text_model.embeddings.token_embedding(token_ids), token_ids.argmax(-1))

  @torch.no_grad()
  def set_image_features(self, images):
    if self.resize:
      images = F.interpolate(images, size=self.size, mode="bicubic", align_corners=True)
    self.image_features = torch_image_features(self.hf, images)

  @torch.no_grad()
  def rewards(self, flat_index, rows: int):
    text = self.class_features[flat_index]
    image = torch.repeat_interleave(self.image_features, self.top_k, dim=0)
    score = torch.clamp(rlcf.CLIP_SCORE_WEIGHT * torch.sum(text * image, dim=-1), min=0)
    score = score.reshape(rows, -1)
    if score.shape[-1] > 1:
      score = score - score.mean(dim=-1, keepdim=True)
    return score.flatten()


def torch_sample(method: str, policy, optimizer, optimizer_state, views, reward=None):
  """One test sample of the original loop: reset, test-time tuning, predict view 0 -> logits."""
  steps, selected = METHOD_SETTINGS[method]["steps"], None
  with torch.no_grad():
    policy.reset()
  optimizer.load_state_dict(optimizer_state)
  for _ in range(steps):
    if method == "tpt":  # TPT forwards all views every step and indexes the selected ones
      output = policy(views)
      if selected is None:
        output, selected = select_confident(output, FLAGS.selection)
      else:
        output = output[selected]
      loss = avg_entropy(output)
    else:  # RLCF forwards the selected views only after the first step
      if selected is None:
        output, selected = select_confident(policy(views), FLAGS.selection)
        reward.set_image_features(views[selected])
      else:
        output = policy(views[selected])
      index = torch.topk(output, reward.top_k, dim=-1).indices.flatten()
      rewards = reward.rewards(index, output.shape[0])
      cross_entropy = F.cross_entropy(torch.repeat_interleave(output, reward.top_k, dim=0), index,
                                      reduction="none")
      loss = torch.mean(rewards * cross_entropy)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  with torch.no_grad():
    return policy(views[:1])[0]


def time_torch(method: str, policy, reward, views_nchw) -> dict:
  settings = METHOD_SETTINGS[method]
  optimizer = torch.optim.AdamW([policy.ctx], settings["lr"],
                                weight_decay=settings["weight_decay"])
  optimizer_state = optimizer.state_dict()
  args = (method, policy, optimizer, optimizer_state)
  flops = float("nan")
  if FLAGS.torch_flop_count:  # sample 0 once more, untimed, under the FLOP counter
    with FlopCounterMode(display=False) as counter:
      torch_sample(*args, views_nchw[0], reward)
    flops = float(counter.get_total_flops())
  times, logits = [], []
  for b in range(FLAGS.torch_samples):
    start = time.perf_counter()
    logits.append(torch_sample(*args, views_nchw[b], reward).numpy())
    times.append(time.perf_counter() - start)
  seconds = sum(times) / len(times)
  memory, _ = bench.peak_memory_bytes()
  result = dict(impl="torch per-sample loop", batch=1, samples_per_s=1 / seconds,
                flops=flops, seconds=seconds, compile_s=None,
                xla_bytes=None, rss=memory, load=bench.load_now(), logits0=logits[0])
  print(f"[{method}] torch: {', '.join(f'{t:.2f}' for t in times)} s/sample -> "
        f"{result['samples_per_s']:.3f} samples/s; {result['flops'] / 1e9:,.1f} GFLOP/sample "
        f"(FlopCounterMode); max RSS {memory / GIB:.2f} GiB; {result['load']}", flush=True)
  return result


# ------------------------------------------------------------------------------------------------
# JAX.


def later_steps_flops(episode, tunable0, frozen, samples, rng) -> float:
  """XLA's FLOPs of the optimizer steps after the first: (steps - 1) x one vmapped step (the loss
  gradient and the AdamW update), compiled alone; XLA counts the episode's loop body once."""
  if episode.steps == 1:
    return 0.0
  rngs = jax.random.split(rng, samples.shape[0])
  contexts = jax.eval_shape(jax.vmap(episode.prepare, in_axes=(None, None, 0, 0)), tunable0,
                            frozen, samples, rngs)
  batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (samples.shape[0],) + x.shape), tunable0)

  def step(tunable, frozen, context, rng):
    grads = jax.grad(episode.loss)(tunable, frozen, context, rng)
    updates, _ = episode.optimizer.update(grads, episode.optimizer.init(tunable), tunable)
    return updates

  step = jax.jit(jax.vmap(step, in_axes=(0, None, 0, 0)))
  compiled = step.lower(batched, frozen, contexts, rngs).compile()
  return (episode.steps - 1) * bench.xla_flops(compiled)


def time_jax(method: str, episode, tunable0, frozen, views) -> list[dict]:
  adapt = jax.jit(tta.adapt, static_argnums=0)  # batched=True: vmapped over the B samples
  rng, results = jax.random.PRNGKey(0), []
  for batch in (int(b) for b in FLAGS.batch_sizes):
    samples = jnp.asarray(views[:batch])
    start = time.perf_counter()
    compiled = adapt.lower(episode, tunable0, frozen, samples, rng).compile()
    compile_s = time.perf_counter() - start
    flops = bench.xla_flops(compiled) + later_steps_flops(episode, tunable0, frozen, samples, rng)
    start = time.perf_counter()  # the first call is timed too: nothing is left to warm up
    logits, _ = jax.block_until_ready(compiled(tunable0, frozen, samples, rng))
    seconds = min(time.perf_counter() - start, bench.best_seconds(
        lambda: compiled(tunable0, frozen, samples, rng), FLAGS.repeats - 1))
    memory, _ = bench.peak_memory_bytes()
    result = dict(impl="jax tta.adapt", batch=batch, samples_per_s=batch / seconds,
                  flops=flops / batch, seconds=seconds, compile_s=compile_s,
                  xla_bytes=bench.compiled_bytes(compiled), rss=memory, load=bench.load_now(),
                  logits0=np.asarray(logits[0]))
    print(f"[{method}] jax B={batch}: compile {compile_s:.1f} s, {seconds:.2f} s/call -> "
          f"{result['samples_per_s']:.3f} samples/s; {flops / batch / 1e9:,.1f} GFLOP/sample "
          f"(XLA); XLA memory {result['xla_bytes'] / GIB:.2f} GiB, max RSS {memory / GIB:.2f} "
          f"GiB; {result['load']}", flush=True)
    results.append(result)
  return results


def profile(method: str, episode, tunable0, frozen, views, policy, reward, views_nchw) -> None:
  """One sample's parts on both sides (module docstring), best of --repeats."""
  rng = jax.random.PRNGKey(0)
  prepare = jax.jit(episode.prepare)
  context = jax.block_until_ready(prepare(tunable0, frozen, jnp.asarray(views[0]), rng))
  step = jax.jit(jax.grad(episode.loss))
  predict = jax.jit(episode.predict)
  jax.block_until_ready((step(tunable0, frozen, context, rng),
                         predict(tunable0, frozen, context)))
  parts = {
      "jax prepare (V-view image tower, text, selection)":
          lambda: prepare(tunable0, frozen, jnp.asarray(views[0]), rng),
      "jax one step's loss gradient": lambda: step(tunable0, frozen, context, rng),
      "jax predict": lambda: predict(tunable0, frozen, context)}
  for name, fn in parts.items():
    print(f"[{method}] profile {name}: {bench.best_seconds(fn, FLAGS.repeats):.3f} s; "
          f"{bench.load_now()}", flush=True)

  def torch_seconds(fn):
    best = float("inf")
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    return best

  def text_backward():
    policy.text_features().sum().backward()

  with torch.no_grad():
    image_views = lambda: torch_image_features(policy.hf, views_nchw[0])
    image_one = lambda: torch_image_features(policy.hf, views_nchw[0][:1])
    text_forward = policy.text_features
    parts = {f"torch image tower, {FLAGS.views} views": image_views,
             "torch image tower, 1 view": image_one,
             "torch text tower forward, 77 tokens": text_forward}
    if reward is not None:
      selected = views_nchw[0][:int(FLAGS.views * FLAGS.selection)]
      parts["torch reward image tower, selected views"] = (
          lambda: reward.set_image_features(selected))
      parts["torch policy image tower, selected views"] = (
          lambda: torch_image_features(policy.hf, selected))
    for name, fn in parts.items():
      print(f"[{method}] profile {name}: {torch_seconds(fn):.3f} s; {bench.load_now()}", flush=True)
  print(f"[{method}] profile torch text tower forward + backward, 77 tokens: "
        f"{torch_seconds(text_backward):.3f} s; {bench.load_now()}", flush=True)


# ------------------------------------------------------------------------------------------------


def main(_):
  if FLAGS.reuse_host_memory:  # as the trainer runs (jaxprompt/host_memory.py)
    host_memory.reuse_freed_memory()
  unknown = set(FLAGS.methods) - set(METHOD_SETTINGS) or set(FLAGS.parts) - {"torch", "jax",
                                                                              "profile"}
  if unknown:
    raise ValueError(f"Unknown --methods/--parts {sorted(unknown)}.")
  threads = FLAGS.torch_threads or os.cpu_count()
  torch.set_num_threads(threads)
  vocab = FLAGS.vocab or embedded_clip.byte_vocabulary()
  if not os.path.isfile(vocab):
    raise FileNotFoundError(f"--vocab {vocab!r} does not exist.")
  names = tuple(CLASS_NAMES[c % len(CLASS_NAMES)] + (f" {c // len(CLASS_NAMES)}" if c >= len(
      CLASS_NAMES) else "") for c in range(FLAGS.num_classes))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, "
        f"torch threads {threads}; {bench.load_now()}", flush=True)
  print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)

  hf, model, variables = random_clips(FLAGS.variant, seed=0)
  size = model.image_size
  max_batch = max(int(b) for b in FLAGS.batch_sizes)
  if FLAGS.torch_samples < 1:
    raise ValueError(f"--torch_samples must be >= 1; got {FLAGS.torch_samples}.")
  count = max(max_batch, FLAGS.torch_samples)
  views = np.random.default_rng(0).normal(size=(count, FLAGS.views, size, size, 3)
                                          ).astype(np.float32)
  views_nchw = torch.from_numpy(views).permute(0, 1, 4, 2, 3).contiguous()
  tokenizer = coop.get_tokenizer(vocab, model.context_length)
  token_ids = torch.as_tensor(np.asarray(tokenizer([f"{CTX_INIT} {n}." for n in names]),
                                         np.int64))
  peaks = {dtype: bench.matmul_peak_flops(FLAGS.matmul_size, jnp.dtype(dtype))
           for dtype in sorted({"float32", FLAGS.dtype})}
  peak_text = ", ".join(f"{d} {p / 1e9:.1f}" for d, p in peaks.items())
  print(f"matmul peak ({FLAGS.matmul_size}^2): {peak_text} GFLOP/s; {bench.load_now()}", flush=True)
  reward_clips = None
  if "rlcf" in FLAGS.methods:
    reward_clips = random_clips(FLAGS.reward_variant, seed=1)

  rows = []
  for method in FLAGS.methods:
    settings = METHOD_SETTINGS[method]
    if method == "tpt":
      episode, tunable0, frozen = tpt.make_episode(
          model, variables, names, vocab, ctx_init=CTX_INIT, selection=FLAGS.selection, **settings)
    else:
      episode, tunable0, frozen = rlcf.make_episode(
          (model, variables), [(reward_clips[1], reward_clips[2], 1.0)], names, vocab,
          ctx_init=CTX_INIT, top_k=FLAGS.top_k, selection=FLAGS.selection, **settings)
    n_ctx = tunable0["ctx"].shape[0]
    policy = TorchPromptCLIP(hf, token_ids, n_ctx)
    reward = None
    if method == "rlcf":
      reward_ids = token_ids[:, :reward_clips[1].context_length]
      reward = TorchReward(reward_clips[0], reward_ids, size, FLAGS.top_k)
    print(f"[{method}] C = {len(names)}, V = {FLAGS.views}, n_ctx = {n_ctx}, "
          f"{FLAGS.variant} at {size} px" + (f", reward {FLAGS.reward_variant}" if reward else "")
          + f", {settings}", flush=True)
    method_rows = []
    if "torch" in FLAGS.parts:
      method_rows.append(time_torch(method, policy, reward, views_nchw))
    if "jax" in FLAGS.parts:
      method_rows += time_jax(method, episode, tunable0, frozen, views)
    if "torch" in FLAGS.parts and "jax" in FLAGS.parts:
      theirs, ours = method_rows[0]["logits0"], method_rows[1]["logits0"]
      print(f"[{method}] sanity, sample 0 after adaptation: argmax torch {int(theirs.argmax())} / "
            f"jax {int(ours.argmax())}; max |jax - torch| {np.abs(ours - theirs).max():.2e} of "
            f"max |torch| {np.abs(theirs).max():.2f}", flush=True)
    if "profile" in FLAGS.parts:
      profile(method, episode, tunable0, frozen, views, policy, reward, views_nchw)
    rows += [(method, r) for r in method_rows]

  torch_rate = {m: r["samples_per_s"] for m, r in rows if r["impl"].startswith("torch")}
  print(f"\nsummary: {FLAGS.variant} {size} px, V = {FLAGS.views}, selection {FLAGS.selection}, "
        f"C = {FLAGS.num_classes}, RLCF reward {FLAGS.reward_variant}, jax {FLAGS.dtype}, torch "
        f"float32; matmul peak {peak_text} GFLOP/s")
  header = (f"{'method':<6} {'implementation':<22} {'B':>2} {'samples/s':>9} {'vs torch':>8} "
            f"{'GFLOP/sample':>12} {'MFU':>6} {'compile s':>9} {'XLA GiB':>7} {'RSS GiB':>7}  load")
  print(header)
  for method, r in rows:
    speedup = (f"{r['samples_per_s'] / torch_rate[method]:.2f}x" if method in torch_rate
               else "-")
    mfu = r["flops"] * r["samples_per_s"] / peaks[
        "float32" if r["impl"].startswith("torch") else FLAGS.dtype]
    counted = not np.isnan(r["flops"])  # torch without --torch_flop_count: not counted
    print(f"{method:<6} {r['impl']:<22} {r['batch']:>2} {r['samples_per_s']:>9.3f} {speedup:>8} "
          f"{format(r['flops'] / 1e9, ',.1f') if counted else '-':>12} "
          f"{format(100 * mfu, '.1f') + '%' if counted else '-':>6} "
          f"{'-' if r['compile_s'] is None else format(r['compile_s'], '.1f'):>9} "
          f"{'-' if r['xla_bytes'] is None else format(r['xla_bytes'] / GIB, '.2f'):>7} "
          f"{r['rss'] / GIB:>7.2f}  {r['load']}")
  print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
  app.run(main)
