"""SDPT ("SDPT: Synchronous Dual Prompt Tuning for Fusion-based Visual-Language Pre-trained
Models", ECCV 2024, arXiv 2407.11414, §3) on a frozen GLIP: one set of learnable prototype tokens
per fusion layer, living in the fusion attention's aligned space and mapped into the image and text
input spaces by training-free inverse projections.

Follows the official code wuyongjianCODE/SDPT (a modified microsoft/GLIP), `maskrcnn_benchmark/
utils/fuse_helper.py` (`BiMultiHeadAttention` with `vpt_only == -4`) and `modeling/rpn/
vldyhead.py` (`cpt_layers`), with the README's training command. In fusion layer l in
`cpt_layers` (default: every one), with U_l (K x E, E = 2048, K = `num_tokens` = 700, init
U(-1, 1)) and the layer's frozen query / key projections W_q (256 x E), W_k (768 x E), b_q, b_k:

  P_v = (U_l - b_q) pinv(W_q)   (K x 256)      P_l = (U_l - b_k) pinv(W_k)   (K x 768)

are appended after the layer's LayerNorms to the visual and the text sequence; the text mask is
extended with K zeros, so image tokens never attend to P_l; the last K rows of both outputs are
dropped before the residual (`models/glip/fusion.py`, `extra_tokens`). The pseudo-inverses are of
the frozen kernels (no gradient flows into them); the original recomputes them every forward, we
compute them once (the `INVERSES` collection, at init and by the loaders): on GLIP-T the twelve
SVDs cost ~1.1 s per step on a 2-core CPU.
Consequences the tests check: the image-side output of every fusion layer equals plain GLIP's; P_l
has no effect on any kept output, so U's gradient comes through P_v alone.
`unmask_text_prototypes=True` is the paper's reading instead (both modalities see the prompts).

What trains (both named sets below; `config.trainable_params` picks one):
  * `SDPT_RELEASE` (the default, `METHOD.trainable`): what the README command trains with
    `froze_fuse 1`, `FROZEE_SWINT`, `FROZEE_BERT`: the prototypes plus the whole DyHead outside the
    bi-attention blocks (in-head BERT layers, DyConvs, the heads; `cls_logits` frozen as in GLIP):
    8.60 M + 54.2 M on GLIP-T, 11.47 M + 72.2 M = 83.7 M on GLIP-L.
  * `SDPT_PAPER`: the prototypes alone, 6 x 700 x 2048 = 8.60 M on GLIP-T (3.7 %), 11.47 M on GLIP-L
    (2.7 %). The paper's "0.04 % of the parameters" matches neither (0.04 % of GLIP-L is ~172 K).
Frozen parts keep their stochastic layers live in training (Swin drop path, DropBlock, BERT
dropout), as in the release, where they are only excluded from the optimizer; set the model's
`drop_path_rate`, `drop_block_prob` and `dropout` to 0 to make them deterministic.

Deviations: prototypes broadcast over the batch (the original's concatenation works for batch 1
only); the release's evaluation quirks (a 79-phrase cut of the label map that never scores COCO's
"toothbrush", nucleus phrases prepended to the query) are not reproduced.
"""
from __future__ import annotations

import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt import method
from jaxprompt.models.glip import checkpoint, detector
from jaxprompt.prompts import glip_finetune

PROTOTYPES = r"prototypes_\d+"
SDPT_PAPER = PROTOTYPES
SDPT_RELEASE = PROTOTYPES + "|" + detector.HEAD_OUTSIDE_FUSION
TRAINABLE_SETS = {"sdpt_paper": SDPT_PAPER, "sdpt_release": SDPT_RELEASE}
# The non-param collection holding pinv(W_q), pinv(W_k) of each prototype layer: computed once
# (at init and by the loaders), as the kernels are frozen; frozen like every such collection.
INVERSES = "sdpt_inverses"
NUM_TOKENS = 700  # MODEL.PROMPT.NUM_TOKENS of the README command: prototypes per fusion layer


def _uniform_plus_minus_one(key, shape, dtype=jnp.float32):
  """U(-1, 1): the release's default prototype init (ECCV.init_way 'uniform')."""
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


def pseudo_inverse(dense: dict):
  """pinv(W) (E x D) of a frozen nn.Dense kernel W (D x E), in float32."""
  return jnp.linalg.pinv(jax.lax.stop_gradient(dense["kernel"]).astype(jnp.float32))


def to_input_space(prototypes, dense: dict, inverse=None):
  """(U - b) pinv(W) for a frozen nn.Dense {'kernel' (D, E), 'bias' (E,)}: the K x D inputs whose
  projection is U's orthogonal projection onto the kernel's row space (plus b). `inverse`:
  pinv(W) when already computed (`INVERSES`)."""
  inverse = pseudo_inverse(dense) if inverse is None else inverse
  bias = jax.lax.stop_gradient(dense["bias"]).astype(jnp.float32)
  return (prototypes.astype(jnp.float32) - bias) @ jax.lax.stop_gradient(inverse)


def fusion_attention(params: dict, layer: int) -> dict:
  """The params of fusion layer `layer`'s attention (v_proj = W_q, l_proj = W_k, ...)."""
  return params["head"][f"dyhead_tower_{3 * layer}"]["b_attn"]["attn"]


def with_inverses(variables: dict) -> dict:
  """`variables` with the `INVERSES` collection recomputed from its (frozen) fusion kernels: what
  a loader of new GLIP weights must do."""
  inverses = {}
  for name in variables.get(INVERSES, {}):
    attn = fusion_attention(variables["params"], int(name.split("_")[1]))
    inverses[name] = {"v_proj": pseudo_inverse(attn["v_proj"]),
                      "l_proj": pseudo_inverse(attn["l_proj"])}
  return {**variables, INVERSES: inverses}


class Model(detector.Model):
  """GLIP with SDPT prototypes: `(image, text_ids, text_mask, *, train) -> (token_logits, aux)`.

  Params: GLIP's tree plus `prototypes_{l}` (K x E) for each l in `cpt_layers` (None: all).
  """
  num_tokens: int = NUM_TOKENS
  cpt_layers: Optional[tuple[int, ...]] = None
  unmask_text_prototypes: bool = False

  def check(self) -> tuple[int, ...]:
    layers = detector.decode_size(self.size)["layers"]
    if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) \
        or self.num_tokens < 1:
      raise ValueError(f"SDPT: config.model.num_tokens={self.num_tokens!r}; expected an integer "
                       ">= 1 (prototypes per fusion layer; the release uses 700).")
    chosen = tuple(range(layers)) if self.cpt_layers is None else tuple(self.cpt_layers)
    bad = [l for l in chosen if not isinstance(l, int) or not 0 <= l < layers]
    if bad or not chosen or len(set(chosen)) != len(chosen):
      raise ValueError(f"SDPT: config.model.cpt_layers={self.cpt_layers!r}; expected distinct "
                       f"fusion layers among 0..{layers - 1} (GLIP size {self.size!r} has "
                       f"{layers}).")
    return chosen

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False):
    s = detector.decode_size(self.size)
    chosen = self.check()
    prototypes = {layer: self.param(f"prototypes_{layer}", _uniform_plus_minus_one,
                                    (self.num_tokens, s["fusion_dim"])) for layer in chosen}
    tokens = [None] * s["layers"]
    if not self.is_initializing():  # at init the fusion kernels do not exist yet
      for layer in chosen:
        attn = fusion_attention(self.variables["params"], layer)
        inverse = self.get_variable(INVERSES, f"layer_{layer}")
        if inverse is None:
          raise ValueError(f"SDPT: the variables lack the '{INVERSES}' collection (the frozen "
                           "projections' pseudo-inverses); build them with model.init and load "
                           "weights with the method's loaders (sdpt.with_inverses).")
        tokens[layer] = (to_input_space(prototypes[layer], attn["v_proj"],
                                        inverse["v_proj"])[None],
                         to_input_space(prototypes[layer], attn["l_proj"],
                                        inverse["l_proj"])[None])
    out = detector.Model.__call__(self, image, text_ids, text_mask, train=train,
                                  fusion_tokens=tuple(tokens),
                                  fusion_text_visible=self.unmask_text_prototypes)
    if self.is_initializing():
      for layer in chosen:
        attn = fusion_attention(self.variables["params"], layer)
        self.variable(INVERSES, f"layer_{layer}", lambda a=attn: {
            "v_proj": pseudo_inverse(a["v_proj"]), "l_proj": pseudo_inverse(a["l_proj"])})
    return out


def refreshing_inverses(load):
  """A loader that then recomputes the pseudo-inverses from the loaded kernels."""
  return lambda variables, path: with_inverses(load(variables, path))


def make_loss(config, source):
  """GLIP's loss; refuses trainable sets that would move a prototype layer's W_q / W_k (their
  pseudo-inverses are computed once)."""
  regex = config.get("trainable_params") or METHOD.trainable
  layers = config.model.get("cpt_layers") or range(detector.decode_size(
      config.model.get("size", "T"))["layers"])
  moving = [name for layer in layers for proj in ("v_proj", "l_proj")
            for name in [f"head/dyhead_tower_{3 * layer}/b_attn/attn/{proj}/kernel"]
            if re.fullmatch(regex, name)]
  if moving:
    raise ValueError(f"SDPT: trainable_params={regex!r} trains {moving[:2]}...; the prototypes are "
                     "mapped by the pseudo-inverses of these frozen projections (computed once), "
                     "so they must stay frozen (the release freezes the fusion blocks).")
  return glip_finetune.make_loss(config, source)


METHOD = method.Method(
    model=Model, trainable=SDPT_RELEASE,
    loaders={"model": refreshing_inverses(checkpoint.load_glip_keeping(PROTOTYPES)),
             "image": checkpoint.load_swin, "text": checkpoint.load_bert},
    inputs=("image", "text_ids", "text_mask"), make_loss=make_loss,
    predict_fns=glip_finetune.predict_fns)
