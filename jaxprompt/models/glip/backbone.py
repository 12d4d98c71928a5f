"""GLIP's image backbone: Swin trunk, per-stage output LayerNorms, FPN with P6/P7 and DropBlock.

Follows microsoft/GLIP (GLIP, Li et al., CVPR 2022, arXiv 2112.03857, §3 "Swin-T/L + FPN"):
`maskrcnn_benchmark/modeling/backbone/swint.py` (`SwinTransformer`, the detection Swin of
Swin-Transformer-Object-Detection), `backbone/fpn.py` (`FPN`, `LastLevelP6P7`), the
`SWINT-FPN-RETINANET` builder in `backbone/__init__.py`, `layers/dropblock.py` (`DropBlock2D`,
Ghiasi et al., NeurIPS 2018, arXiv 1810.12890) and `make_layers.py::conv_with_kaiming_uniform`.

  images (B, H, W, 3) -> body: `swin.Model` pieces with `pad_to_fit=True` (any image size: the
  image, every block's map and every odd side before merging are zero-padded right/bottom) ->
  C2..C5 (strides 4..32), C3..C5 through LayerNorms `norm1..norm3` (the RETINANET builder gives
  stage 0 an Identity: C2 is not consumed) -> fpn: 1x1 laterals `fpn_inner2..4` on C3..C5, top-down
  sum with nearest upsampling to each lateral's exact size, 3x3 outputs `fpn_layer2..4`, P6 = 3x3
  stride-2 conv of P5 (`top_blocks.p6`; P5, not C5, since in == out channels), P7 = 3x3 stride-2
  conv of ReLU(P6) -> [P3, P4, P5, P6, P7] (strides 8..128), each (B, H_l, W_l, C).

In training, DropBlock (p 0.3, block 3, GLIP's `MODEL.FPN.DROP_BLOCK` default) drops blocks of
the P3 and P4 inner (lateral + top-down) maps right before their 3x3 output convs; the undropped
inner map is what flows further down. Its masks come from the 'dropout' RNG stream, like the
trunk's stochastic depth.

The parameter tree mirrors GLIP's names under `backbone.` (`convert_backbone`):
  body/patch_embed/{proj,norm}, body/layers_{i}/blocks_{j}/..., body/layers_{i}/downsample/...,
  body/norm{1,2,3}, fpn/fpn_inner{2,3,4}, fpn/fpn_layer{2,3,4}, fpn/top_blocks/{p6,p7}.

Hooks for SDPT's baselines (`prompts/glip_vpt.py`, `glip_maple.py`, `glip_upt.py`): `SwinBody`
takes VPT prompt tokens (`prompts`, `deep_prompts`, run by the stage class the method passes as
`prompted_stage`: VPT-Swin's `prompts/vpt_swin.PromptedStage`, every stage in eval mode) and
`patch_delta`, a vector added to the patch embedding at (0, 0).

Deliberate deviations:
  * When DropBlock happens to drop every position of a map (possible only on tiny maps), the
    original divides by a zero mask sum and returns NaN; here the map becomes zeros.
  * `frozen_stages` (GLIP's MODEL.BACKBONE.FREEZE_CONV_BODY_AT) only decides which trunk stages
    run in eval mode (no stochastic depth) during training, as the original's `train()` override
    does; which params the optimizer skips is `frozen_param_regex` for the trainer's partition
    (the original sets requires_grad=False).
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import common
from jaxprompt.models import swin

# GLIP's yaml settings per size: MODEL.SWINT.{EMBED_DIM, DEPTHS, NUM_HEADS} (as `swin.SIZES`),
# WINDOW_SIZE, DROP_PATH_RATE, MODEL.BACKBONE.FREEZE_CONV_BODY_AT and OUT_CHANNELS. 'T' is
# configs/pretrain/glip_Swin_T_O365_GoldG.yaml, 'L' glip_Swin_L.yaml (which leaves the freeze at
# the default 2); 'tiny' is a CPU-sized test configuration with every component kept.
VARIANTS = {
    "T": dict(swin_variant="T", window_size=7, drop_path_rate=0.2, frozen_stages=-1,
              fpn_channels=256),
    "L": dict(swin_variant="L", window_size=12, drop_path_rate=0.4, frozen_stages=2,
              fpn_channels=256),
    "tiny": dict(swin_variant="pico", window_size=4, drop_path_rate=0.1, frozen_stages=-1,
                 fpn_channels=32),
}
NUM_STAGES = 4
NORMED_STAGES = (1, 2, 3)  # `norm{i}` after stage i; stage 0's norm is an Identity (RETINANET)
DROP_BLOCK_PROB = 0.3  # MODEL.FPN.DROP_PROB
DROP_BLOCK_SIZE = 3  # MODEL.FPN.DROP_SIZE

# nn.init.kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in)); biases zero (`conv_with_kaiming_uniform`).
_conv_init = dict(kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                  bias_init=nn.initializers.zeros)


def decode_variant(variant: str) -> dict:
  """'T' -> the `SwinFPN` fields of GLIP-T (swin_variant, window_size, drop_path_rate, ...)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown GLIP backbone variant {variant!r}: expected one of "
                     f"{sorted(VARIANTS)}.")
  return dict(VARIANTS[variant])


def frozen_param_regex(frozen_stages: int) -> Optional[str]:
  """Regex over '/'-joined backbone param names that FREEZE_CONV_BODY_AT=`frozen_stages` freezes,
  or None: >= 0 freezes the patch embedding, >= 2 also trunk stages 0 .. frozen_stages - 2."""
  if frozen_stages < 0:
    return None
  stages = "".join(f"|layers_{i}" for i in range(min(frozen_stages - 1, NUM_STAGES)))
  return f"body/(?:patch_embed{stages})/.*"


# ---------------------------------------------------------------------------------------------
# Pieces.
# ---------------------------------------------------------------------------------------------


def resize_nearest(x, size: tuple[int, int]):
  """PyTorch's `F.interpolate(mode='nearest', size=size)` on (B, H, W, C): output row i reads
  input row floor(i * H / size[0]) (the scale in float32, as PyTorch), clipped to H - 1."""
  def source_index(size_in, size_out):
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)

  x = jnp.take(x, source_index(x.shape[1], size[0]), axis=1)
  return jnp.take(x, source_index(x.shape[2], size[1]), axis=2)


def drop_block_keep_mask(seeds, block_size: int):
  """(B, H, W) 0/1 block centres -> (B, H, W) keep mask: 0 within a block_size x block_size square
  around every seed (a stride-1 max pool padded by block_size // 2; for even sizes the last row and
  column of the pooled map are cut off, as the original does), 1 elsewhere."""
  pad = block_size // 2
  pooled = jax.lax.reduce_window(seeds, jnp.array(0, seeds.dtype), jax.lax.max,
                                 (1, block_size, block_size), (1, 1, 1),
                                 ((0, 0), (pad, pad), (pad, pad)))
  height, width = seeds.shape[1:]
  return 1 - pooled[:, :height, :width]


def drop_block(x, rng, *, drop_prob: float, block_size: int):
  """DropBlock on (B, H, W, C) in training; returns `(dropped, keep)` with keep (B, H, W).

  Seeds ~ Bernoulli(drop_prob / block_size^2) per position, shared across channels; the keep mask
  zeroes a block around each seed; survivors are scaled by (number of mask entries) / (kept
  entries), counted over the whole batch as the original does.
  """
  gamma = drop_prob / block_size ** 2
  seeds = jax.random.bernoulli(rng, gamma, x.shape[:3]).astype(x.dtype)
  keep = drop_block_keep_mask(seeds, block_size)
  scale = keep.size / jnp.maximum(keep.sum(), 1)  # all dropped -> zeros (the original: NaN)
  return x * (keep * scale)[..., None], keep


def check_prompted_map(height: int, width: int, num_stages: int = NUM_STAGES) -> None:
  """VPT's prompted patch merging does not pad: the patch map's sides must halve evenly at every
  merge (GLIP pads its batches to multiples of 32, which always satisfies this)."""
  multiple = 2 ** (num_stages - 1)
  if height % multiple or width % multiple:
    raise ValueError(f"Swin with VPT prompts: the {height}x{width} patch map does not halve "
                     f"evenly {num_stages - 1} times; pad images to sides that are multiples of "
                     f"{4 * multiple} (patch 4), as GLIP's size_divisibility 32 does.")


class SwinBody(swin.Model):
  """GLIP's `backbone.body`: the detection Swin trunk returning C2..C5 after the output norms.

  A `swin.Model` without its final norm and head (`num_classes` and `head_zeroinit` are unused),
  with `pad_to_fit=True` and LayerNorms `norm1..norm3` on stages 1..3. Stages that
  `frozen_stages` freezes (stage i for i <= frozen_stages - 2) run without stochastic depth even
  when `train`, as the original keeps them in eval mode.
  """
  num_classes: int = 0
  pad_to_fit: bool = True
  frozen_stages: int = -1

  @nn.compact
  def __call__(self, images, *, train: bool = False, prompts=None,
               deep_prompts: Optional[Sequence] = None, prompted_stage=None,
               patch_delta=None) -> list:
    """`prompts` (B, P, D): VPT prompt tokens put in front of the patch tokens, run through the
    stages by `prompted_stage` (a `swin.Stage` subclass taking and returning the prompts: the
    method's, `prompts/vpt_swin.PromptedStage`); `deep_prompts[i]`, if given, maps block j of stage i to
    the (B, P, D * 2^i) prompts that replace the carried ones before it. With prompts every stage
    runs in eval mode (VPT's `PromptedSwinTransformer.train`). `patch_delta` (D,) is added to the
    patch embedding (after its norm) at position (0, 0) of every image (MaPLe's, UPT's vector)."""
    num_stages = len(swin.decode_variant(self.variant)["depths"])
    if num_stages != NUM_STAGES:
      raise ValueError(f"GLIP's backbone needs a {NUM_STAGES}-stage Swin; variant "
                       f"{self.variant!r} has {num_stages}.")
    x = self.make_patch_embed()(images)  # (B, ceil(H/4), ceil(W/4), D)
    if patch_delta is not None:
      x = x.at[:, 0, 0].add(patch_delta.astype(x.dtype))
    if prompts is not None:
      if prompted_stage is None:
        raise ValueError("SwinBody: prompts need the prompted_stage class that runs them.")
      check_prompted_map(*x.shape[1:3], num_stages)
    outputs = []
    for i in range(num_stages):
      frozen = i <= self.frozen_stages - 2
      if prompts is None:
        x, features = self.make_stage(i)(x, deterministic=frozen or not train)
      else:
        (x, prompts), (features, _) = self.make_stage(i, prompted_stage)(
            x, prompts, deep_prompts=None if deep_prompts is None else deep_prompts[i],
            deterministic=True)
      if i in NORMED_STAGES:
        features = nn.LayerNorm(epsilon=swin.LAYER_NORM_EPS, dtype=self.dtype,
                                name=f"norm{i}")(features)
      outputs.append(features)
    return outputs  # [C2, C3, C4, C5]: (B, H/4, W/4, D) ... (B, H/32, W/32, 8D), sides rounded up


class LastLevelP6P7(nn.Module):
  """P6 = conv3x3/2(P5), P7 = conv3x3/2(ReLU(P6)), PyTorch's padding 1 on both sides."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, p5):
    conv = lambda name: nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                                dtype=self.dtype, name=name, **_conv_init)
    p6 = conv("p6")(p5)
    return [p6, conv("p7")(nn.relu(p6))]


class FPN(nn.Module):
  """[C3, C4, C5] -> [P3, P4, P5, P6, P7], `channels` each (GLIP's FPN with LastLevelP6P7).

  Laterals and outputs are numbered from 2 as in GLIP (its unused C2 slot is number 1). In
  training, DropBlock (`drop_block_prob` > 0) acts on the P3/P4 inner maps before their output
  conv; the keep masks are sown as intermediates 'drop_block_keep_p3'/'_p4'.
  """
  channels: int = 256
  drop_block_prob: float = DROP_BLOCK_PROB
  drop_block_size: int = DROP_BLOCK_SIZE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence, *, train: bool = False) -> list:
    if len(features) != 3:
      raise ValueError(f"FPN takes [C3, C4, C5], got {len(features)} maps.")
    conv = lambda size, name: nn.Conv(self.channels, (size, size), padding=[(size // 2,) * 2] * 2,
                                      dtype=self.dtype, name=name, **_conv_init)
    first = 2  # GLIP's index of the C3 lateral
    inner = conv(1, f"fpn_inner{first + 2}")(features[2])
    results = [conv(3, f"fpn_layer{first + 2}")(inner)]
    for level in (1, 0):  # C4, then C3
      lateral = conv(1, f"fpn_inner{first + level}")(features[level])
      inner = lateral + resize_nearest(inner, lateral.shape[1:3])
      out = inner
      if train and self.drop_block_prob > 0:
        out, keep = drop_block(inner, self.make_rng("dropout"), drop_prob=self.drop_block_prob,
                               block_size=self.drop_block_size)
        self.sow("intermediates", f"drop_block_keep_p{level + 3}", keep)
      results.insert(0, conv(3, f"fpn_layer{first + level}")(out))
    return results + LastLevelP6P7(self.channels, self.dtype, name="top_blocks")(results[-1])


class SwinFPN(nn.Module):
  """GLIP's `backbone`: images (B, H, W, 3), normalised -> [P3..P7] (B, H_l, W_l, fpn_channels).

  Build one with `SwinFPN(**decode_variant('T'))`. Any image size works (GLIP pads batches to
  multiples of 32); level l has side ceil(ceil(side / 4) / 2^(l-2)) for l = 3..5 and halves (up)
  from there. `train` turns on stochastic depth and DropBlock (RNG stream 'dropout').
  """
  swin_variant: str = "T"
  window_size: int = 7
  drop_path_rate: float = 0.2
  frozen_stages: int = -1
  fpn_channels: int = 256
  drop_block_prob: float = DROP_BLOCK_PROB
  drop_block_size: int = DROP_BLOCK_SIZE
  patch_size: int = 4
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, prompts=None,
               deep_prompts: Optional[Sequence] = None, prompted_stage=None,
               patch_delta=None) -> list:
    """`prompts`, `deep_prompts`, `prompted_stage`, `patch_delta`: see `SwinBody` (VPT, MaPLe,
    UPT)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"SwinFPN takes images (B, H, W, 3), got shape {images.shape}.")
    body = SwinBody(variant=self.swin_variant, window_size=self.window_size,
                    patch_size=self.patch_size, mlp_ratio=self.mlp_ratio,
                    drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                    frozen_stages=self.frozen_stages, name="body")
    stages = body(images, train=train, prompts=prompts, deep_prompts=deep_prompts,
                  prompted_stage=prompted_stage, patch_delta=patch_delta)
    fpn = FPN(self.fpn_channels, self.drop_block_prob, self.drop_block_size, self.dtype,
              name="fpn")
    return fpn(stages[1:], train=train)


# ---------------------------------------------------------------------------------------------
# Checkpoints. GLIP checkpoints name the backbone `module.backbone.body.*` and
# `module.backbone.fpn.*`; `convert_backbone` takes those names with 'module.backbone.' stripped.
# ---------------------------------------------------------------------------------------------

_BLOCK_PARAMS = tuple(f"{module}.{kind}" for module in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                        "mlp.fc1", "mlp.fc2")
                      for kind in ("weight", "bias")) + ("attn.relative_position_bias_table",)
_FPN_CONVS = ("fpn_inner2", "fpn_inner3", "fpn_inner4", "fpn_layer2", "fpn_layer3", "fpn_layer4",
              "top_blocks.p6", "top_blocks.p7")


def _expected_backbone_names(names) -> set[str]:
  """Every parameter name of a GLIP backbone with the blocks per stage seen in `names`."""
  depths = [1] * NUM_STAGES
  for name in names:
    match = re.match(r"body\.layers\.([0-3])\.blocks\.(\d+)\.", name)
    if match:
      depths[int(match[1])] = max(depths[int(match[1])], int(match[2]) + 1)
  pair = lambda module: {f"{module}.weight", f"{module}.bias"}
  expected = pair("body.patch_embed.proj") | pair("body.patch_embed.norm")
  for stage, depth in enumerate(depths):
    expected |= {f"body.layers.{stage}.blocks.{block}.{param}"
                 for block in range(depth) for param in _BLOCK_PARAMS}
    if stage < NUM_STAGES - 1:
      expected |= pair(f"body.layers.{stage}.downsample.norm")
      expected.add(f"body.layers.{stage}.downsample.reduction.weight")
  for stage in NORMED_STAGES:
    expected |= pair(f"body.norm{stage}")
  for conv in _FPN_CONVS:
    expected |= pair(f"fpn.{conv}")
  return expected


def convert_backbone(state_dict: dict[str, np.ndarray], *,
                     source: str = "<state dict>") -> dict:
  """GLIP backbone state dict (names after 'backbone.', e.g. 'body.layers.0.blocks.0.attn.qkv.
  weight', 'fpn.fpn_inner2.weight') -> nested params {'body': ..., 'fpn': ...}.

  The trunk goes through `swin.convert_microsoft_swin` (its buffers `relative_position_index` and
  `attn_mask` are dropped); `body.norm{i}` become LayerNorm scale/bias and the FPN's OIHW conv
  weights HWIO kernels. Strict: names that are not GLIP backbone parameters (a classifier's
  `norm`/`head`, stage 0's Identity norm, a 'backbone.' prefix left on) and parameters missing
  for the blocks per stage present raise one ValueError listing them all. Shapes are checked when
  merging into a model's params (`common.merge_params`).
  """
  names = set(state_dict)
  buffers = {name for name in names if name.startswith("body.")
             and swin._MICROSOFT_BUFFER.fullmatch(name.removeprefix("body."))}
  expected = _expected_backbone_names(names)
  unknown, missing = sorted(names - expected - buffers), sorted(expected - names)
  if unknown or missing:
    lines = [f"{source}: not a GLIP backbone state dict (names after 'backbone.'):"]
    if unknown:
      lines.append(f"  unknown ({len(unknown)}): " + ", ".join(unknown))
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    raise ValueError("\n".join(lines))

  trunk, flat = {}, {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    module, leaf = name.rsplit(".", 1)
    if re.fullmatch(r"body\.norm\d", module):
      flat[f"{module.replace('.', '/')}/{'scale' if leaf == 'weight' else 'bias'}"] = value
    elif module.startswith("fpn."):
      if leaf == "weight":
        leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      flat[f"{module.replace('.', '/')}/{leaf}"] = value
    else:
      trunk[name.removeprefix("body.")] = value
  trunk = swin.convert_microsoft_swin(trunk, source=source)
  flat.update({f"body/{name}": value for name, value in common.flatten(trunk).items()})
  return common.unflatten(flat)


def load_swin_trunk(init_params: dict, path: str) -> dict:
  """Loads a Microsoft Swin classification checkpoint (e.g. swin_tiny_patch4_window7_224.pth,
  GLIP's MODEL.WEIGHT for pre-training) into the 'body' of backbone params `init_params`.

  The file's final `norm` and `head` are dropped; the output norms `norm1..3` and the FPN keep
  their init values. Bias tables are resized when the windows differ (`swin.load`; GLIP's
  suffix-matching loader would keep such a table at its init instead, but its released configs
  always pair a model with a checkpoint of the same window). Strict otherwise
  (`common.merge_params`).
  """
  path = os.fspath(path)
  if "body" not in init_params:
    raise ValueError("load_swin_trunk takes the backbone's params (with 'body' and 'fpn'); got "
                     f"keys {sorted(init_params)}.")
  body = swin.load(init_params["body"], path,
                   dont_load=("head/.*", "norm/.*", r"norm\d/.*"))
  return {**init_params, "body": body}
