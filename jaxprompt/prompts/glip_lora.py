"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv
2106.09685, §4.1) on a frozen GLIP: the low-rank baseline of SDPT, as the SDPT release builds it.

Follows wuyongjianCODE/SDPT (a modified microsoft/GLIP), which swaps nn.Linear layers for
microsoft/LoRA's `loralib.Linear(in, out, r=16)` (`loralib/layers.py`: lora_alpha 1, so the
scaling is alpha / r = 1/16; lora_dropout 0; merge_weights True, which only merges the weights in
eval mode) under three flags of `maskrcnn_benchmark/config/defaults.py`:

  use_lora_visual  `modeling/backbone/swint.py` (`WindowAttention`, built with adap_mlp =
                   SWINBLO - 10 * use_lora_visual < 0): every Swin block's fused q/k/v projection
                   (C -> 3C) becomes `lora_qkv`, one loralib.Linear over all of q, k and v (not a
                   MergedLinear with enable_lora); the attention output `proj`, the MLPs, patch
                   merging and the FPN get none.
  use_lora_cross   `utils/fuse_helper.py` (`BiMultiHeadAttention`): the six projections of every
                   fusion layer, v_proj, l_proj, values_v_proj, values_l_proj, out_v_proj,
                   out_l_proj (names unchanged, so GLIP's weights load into them).
  use_lora_text    adds no LoRA layer anywhere: `modeling/detector/generalized_vl_rcnn.py` only
                   calls `loralib.mark_only_lora_as_trainable` on the whole detector (under
                   FROZEE_BERT), i.e. it is the switch that leaves only `lora_` names trainable.

`lora_targets` names the layers: 'visual' and 'cross' are the release's two sets (the default is
both); 'text' is ours, not the release's: the language backbone's self-attention query, key and
value (all three, as the release does on Swin's fused q/k/v).

The operation, per targeted kernel W (in x out, x W convention; BERT's (in, heads, head_dim)
kernels as in x heads*head_dim): `lora_a` (in x r, loralib's lora_A transposed) drawn as loralib's
kaiming_uniform_(a=sqrt(5)) on fan_in = in, i.e. U(-1/sqrt(in), 1/sqrt(in)); `lora_b` (r x out,
lora_B transposed) zeros; GLIP then runs with W + (alpha / r) A B. That is loralib's eval-mode
(merged) form and, with lora_dropout 0 as in the release, its training forward
x W + (alpha / r) (x A) B up to float rounding; while B = 0 the model is plain GLIP bit for bit.
(loralib's lora_dropout > 0 would break that identity; it is not offered.)

Params: GLIP's tree under its own names plus `lora/<the kernel's module path>/{lora_a, lora_b}`, so
GLIP's checkpoint loads strictly around them (`checkpoint.load_glip_keeping('lora')`).

What trains (`TRAINABLE_SETS`; `config.trainable_params` picks one). The release has no LoRA
command (its README runs SDPT); with the flags on, its freezing works out as follows:
  * `LORA_PARAMS` (the default): the LoRA matrices alone: what the release trains with
    use_lora_text 1 under FROZEE_BERT (mark_only_lora_as_trainable), FROZEE_SWINT and froze_fuse 0
    (froze_fuse > 0 sets requires_grad False on the fusion block's lora_ params at construction,
    before the optimizer is built, so they would never train). Without use_lora_text nothing
    freezes the DyHead, which would then train whole beside the pairs: not a LoRA baseline.
  * `LORA_RELEASE`: also the Swin qkv biases, which the release trains under use_lora_visual: they
    are named `lora_qkv.bias`, so FROZEE_SWINT and mark_only_lora_as_trainable keep them, and
    loralib freezes only the weight. (The fusion projections' biases are stopped by the mark.)
  In GLIP's AdamW groups the pairs take the base lr and weight decay (no 'bias' or 'norm' in their
  names), the qkv biases lr x2 without decay.
  Counts at r = 16 (from shapes, `tests/test_glip_lora.py`): visual 0.283 M (GLIP-T) / 1.155 M
  (GLIP-L); cross 1.475 M / 1.966 M; text 0.885 M / 0.885 M; the default visual + cross 1.757 M
  (0.76 % of GLIP-T) / 3.121 M (0.73 % of GLIP-L); LORA_RELEASE adds the qkv biases, 0.013 M /
  0.054 M.

As in the release (and `prompts/sdpt.py`), the frozen GLIP keeps its stochastic layers live in
training (drop path, DropBlock, BERT dropout); set the model's `drop_path_rate`, `drop_block_prob`
and `dropout` to 0 to make them deterministic. At init GLIP's own modules create its params; in
apply GLIP runs functionally (`plain_glip().apply`) on the merged kernels, so the gradient of each
targeted kernel (as large as the kernel: ~0.4 GB at GLIP-L for visual + cross) is formed once per
step and reduced to A and B.

Deviation: the release's renaming of Swin's `qkv` to `lora_qkv` also keeps GLIP's checkpoint out
of it (maskrcnn_benchmark's suffix matcher, `utils/model_serialization.py`, finds no
`attn.lora_qkv.*` in the file), so under use_lora_visual the release runs Swin with randomly
initialised (nn.Linear's default init) qkv weights, frozen by loralib, and random trained biases.
Here Swin's qkv keeps GLIP's weights: LoRA on the pre-trained backbone, which the flag evidently
meant.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt.models import common
from jaxprompt.models.glip import detector
from jaxprompt.prompts import glip_finetune

# target name -> regex full-matching the module paths of its Dense layers in GLIP's params.
TARGETS = {
    "visual": r"backbone/body/layers_\d+/blocks_\d+/attn/qkv",
    "cross": (r"head/dyhead_tower_\d+/b_attn/attn/"
              r"(?:v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)"),
    "text": r"language_backbone/encoder/layer_\d+/attention/(?:query|key|value)",
}
RANK = 16  # the release's LORA_PARAM / r=16
ALPHA = 1.0  # loralib's default lora_alpha
LORA = "lora"  # the top-level params entry holding every pair
LORA_PARAMS = LORA + r"/.*"
SWIN_QKV_BIASES = r"backbone/body/layers_\d+/blocks_\d+/attn/qkv/bias"
LORA_RELEASE = LORA_PARAMS + "|" + SWIN_QKV_BIASES
TRAINABLE_PARAMS = LORA_PARAMS
TRAINABLE_SETS = {"lora": LORA_PARAMS, "lora_release": LORA_RELEASE}


def check_settings(targets, rank, alpha) -> tuple[str, ...]:
  """The validated target names (a sequence, or one comma-separated string)."""
  names = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) \
      else tuple(targets)
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(f"GLIP LoRA: config.model.lora_targets={targets!r}; expected distinct names "
                     f"among {sorted(TARGETS)} (the release's: 'visual', 'cross').")
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"GLIP LoRA: config.model.lora_rank={rank!r}; expected an integer >= 1 (the "
                     f"release uses {RANK}).")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"GLIP LoRA: config.model.lora_alpha={alpha!r}; expected a number > 0 "
                     f"(loralib's default, the release's, is {ALPHA:g}).")
  return names


def targeted_kernels(params, targets: Sequence[str]) -> dict[str, tuple[int, ...]]:
  """{module path: kernel shape} of the Dense layers `targets` name in GLIP's `params`; a target
  that matches none is an error (e.g. a renamed module)."""
  kernels = {name.removesuffix("/kernel"): tuple(value.shape)
             for name, value in common.flatten(params).items() if name.endswith("/kernel")}
  chosen = {}
  for target in targets:
    found = {path: shape for path, shape in kernels.items()
             if re.fullmatch(TARGETS[target], path)}
    if not found:
      raise ValueError(f"GLIP LoRA: target {target!r} ({TARGETS[target]}) matches no Dense kernel "
                       f"of this GLIP; kernels look like {sorted(kernels)[:3]}.")
    chosen.update(found)
  return chosen


def init_pair(rng, fan_in: int, fan_out: int, rank: int, dtype=jnp.float32) -> dict:
  """loralib's init: lora_A kaiming_uniform_(a=sqrt(5)) over fan_in (bound 1/sqrt(fan_in)),
  lora_B zeros; stored transposed, x W convention: lora_a (fan_in, r), lora_b (r, fan_out)."""
  bound = 1.0 / math.sqrt(fan_in)
  return {"lora_a": jax.random.uniform(rng, (fan_in, rank), dtype, -bound, bound),
          "lora_b": jnp.zeros((rank, fan_out), dtype)}


def init_lora(rng, params, targets: Sequence[str], rank: int) -> dict:
  """The nested `lora` tree for GLIP `params`: one pair per targeted kernel, each drawn from
  `rng` folded with its index in sorted path order."""
  kernels = targeted_kernels(params, targets)
  flat_params = common.flatten(params)
  pairs = {}
  for i, (path, shape) in enumerate(sorted(kernels.items())):
    pair = init_pair(jax.random.fold_in(rng, i), shape[0], math.prod(shape[1:]), rank,
                     flat_params[f"{path}/kernel"].dtype)
    pairs.update({f"{path}/{k}": v for k, v in pair.items()})
  return common.unflatten(pairs)


def lora_kernel(kernel, lora_a, lora_b, scaling: float):
  """W + scaling A B for a kernel (in, ...) whose trailing axes are the outputs."""
  delta = (lora_a @ lora_b) * scaling  # (in, out)
  return kernel + delta.reshape(kernel.shape).astype(kernel.dtype)


def merge_lora(params, lora, scaling: float) -> dict:
  """GLIP `params` with every kernel that has a pair in `lora` replaced by `lora_kernel`."""
  flat = common.flatten(params)
  pairs = common.flatten(lora)
  for name in pairs:
    if name.endswith("/lora_a"):
      path = name.removesuffix("/lora_a")
      flat[f"{path}/kernel"] = lora_kernel(flat[f"{path}/kernel"], pairs[name],
                                           pairs[f"{path}/lora_b"], scaling)
  return common.unflatten(flat)


def check_pairs(lora, params, targets: Sequence[str], rank: int) -> None:
  """An error naming the differences when the given `lora` tree is not the one `targets` and
  `rank` make for GLIP `params` (e.g. weights of a run with other targets)."""
  given = {k: tuple(v.shape) for k, v in common.flatten(lora).items()}
  expected = {k: tuple(v.shape) for k, v in common.flatten(jax.eval_shape(
      lambda: init_lora(jax.random.PRNGKey(0), params, targets, rank))).items()}
  if given != expected:
    differ = sorted(k for k in set(given) | set(expected) if given.get(k) != expected.get(k))
    raise ValueError(f"GLIP LoRA: the '{LORA}' params do not match lora_targets={targets}, "
                     f"lora_rank={rank}: {len(differ)} name(s) differ, e.g. " + ", ".join(
                         f"{k}: given {given.get(k)}, expected {expected.get(k)}"
                         for k in differ[:3]))


class Model(detector.Model):
  """GLIP with LoRA: `(image, text_ids, text_mask, *, train) -> (token_logits, aux)`.

  Params: GLIP's tree plus `lora/<path>/{lora_a, lora_b}` for each Dense layer of `lora_targets`
  (module docstring); GLIP runs on its kernels merged with their pairs.
  """
  lora_targets: Sequence[str] = ("visual", "cross")
  lora_rank: int = RANK
  lora_alpha: float = ALPHA

  def plain_glip(self) -> detector.Model:
    """An unbound GLIP with this model's settings, to apply to the merged params."""
    fields = [f.name for f in dataclasses.fields(detector.Model)
              if f.init and f.name not in ("parent", "name")]
    return detector.Model(**{name: getattr(self, name) for name in fields})

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False):
    targets = check_settings(self.lora_targets, self.lora_rank, self.lora_alpha)
    if self.is_initializing():  # GLIP's params under GLIP's own names, then the pairs (B = 0)
      out = detector.Model.__call__(self, image, text_ids, text_mask, train=train)
    glip_params = {k: v for k, v in self.variables["params"].items() if k != LORA}
    if not self.is_initializing():
      check_pairs(self.variables["params"].get(LORA, {}), glip_params, targets, self.lora_rank)
    lora = self.param(LORA, lambda rng: init_lora(rng, glip_params, targets, self.lora_rank))
    if self.is_initializing():
      return out
    merged = merge_lora(glip_params, lora, self.lora_alpha / self.lora_rank)
    rngs = {"dropout": self.make_rng("dropout")} if train else None
    return self.plain_glip().apply({"params": merged}, image, text_ids, text_mask, train=train,
                                   rngs=rngs)


METHOD = glip_finetune.glip_prompt_method(Model, TRAINABLE_PARAMS, LORA)
