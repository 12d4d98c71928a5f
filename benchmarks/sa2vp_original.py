"""Times the original PyTorch SA2VP train step (ViT-B/16 or Swin-B): the bar `train_step.py` meets.

  python benchmarks/sa2vp_original.py --original_repo=/path/to/SA2VP [--backbone=vit|swin]
      [--variant=acc|reference]

Needs a checkout of tommy-xq/SA2VP (nothing of it ships with jaxprompt) and `pip install torch
einops`. Either backbone comes from the original's own module with random weights, has the
trainable set below, and is timed on the step the original's `engine_for_train.py` runs:
train mode (dropout and stochastic depth live), forward, 0.8 CE(image logits) + 0.2 CE(prompt
logits), backward, AdamW on the trainables, in float32 (the engine's fp16 autocast and loss scaler
are CUDA-only, and its gradient-norm readout is left out as negligible next to the step).

  * `--backbone=vit` (the default): `vpt_main/src/models/vit_backbones/vit_tinypara_acc.py` (the
    variant the original README recommends for speed) or `vit_tinypara.py` (`--variant=reference`),
    built as `vit_train_sa2vp.py` builds it (`VisionTransformer('sup_vitb16_imagenet21k', 224,
    num_classes=-1)` and one `class_head` on both CLS features), training what it trains
    (`vit_trains`): 449,812 params at 100 classes, as ours.
  * `--backbone=swin`: the `SwinTransformer` of `vpt_main/src/models/vit_backbones/
    swin_transformer_tinypara.py`, built with the arguments `vpt_main/src/models/
    build_swin_backbone.py` (`_build_swin_model`) gives 'swinb_imagenet22k_224': 224 px, embed 128,
    depths 2-2-18-2, heads 4-8-16-32, window 7, stochastic depth 0.2, no head of its own (no
    checkpoint is loaded, so its copy of the blocks' weights into the cross-attention is skipped:
    those stay frozen either way). As `vit_train_swin.py` does, one Linear(1024, C) classifies both
    pooled features, and only `patch_embed.deep_ppt`, `patch_embed.proj_ppt`, the `ffn` and
    `ffn_norm` of the 18 cross blocks of stage 2 and that classifier train. `--variant` is ViT-only.

The original imports modules it never uses on these paths; where one is missing, a stand-in
providing the names it reads is installed first: `turtle` (needs Tk; the ViT files),
`timm.models.layers` (pulls torchvision; `DropPath`, `to_2tuple`, `trunc_normal_`) and, for the
Swin file's `src.utils.logging` (which opens log files through it), `iopath.common.file_io`. The
ViT files never call DropPath, but the Swin applies it in all blocks but the first, so the stand-in
drops whole samples' residual branches in training as timm's does: a no-op would make the original
look faster. (`termcolor` and `simplejson`, also read by that logging module, come with jaxprompt's
own dependencies.) MFU divides XLA's FLOP count of our step for the same model by the original's
step time, so it compares speed on one yardstick; the matmul peak is PyTorch's sgemm measured here.

  python benchmarks/sa2vp_original.py --original_repo=/path/to/SA2VP --against_ours

also builds our step for the same backbone (`benchmarks/run_all.py`'s SA2VP row of it) and runs
the two steps alternately, so that a machine whose speed drifts (a shared VM) slows both alike;
it prints both times and their ratio. It needs `OMP_WAIT_POLICY=PASSIVE` in the environment:
otherwise torch's OpenMP threads spin after each of its steps and take the cores from ours
(measured: our ViT step 19.2 s interleaved against 8.4 s alone).

  python benchmarks/sa2vp_original.py --original_repo=/path/to/SA2VP --check_parity

checks instead (ViT only) that prompts trained with the original load into ours and give its
logits (`config.model_init = 'checkpoint-best.pth'`, `prompts.sa2vp.load_original`), for both
variants: the ViT is built as the original's `vit_train_sa2vp.py` builds it (no head of
its own, one shared `class_head` beside it as `vit_base` / `class_head`), its backbone filled by the
original's own `load_from` from a random Google-format ViT-B/16 dict (which also copies block i's
LayerNorm_0 and attention into Cross_Block i, as training does), every trainable param moved off its
init, and the whole state dict written as the original's `utils.save_model` writes it (with
'optimizer', 'epoch', 'scaler', 'args'). Our model loads that file and both compute, in eval mode
(the dropout draws differ by design), the image and the prompt logits of the same random images;
the check passes at a max relative error (max |ours - original| / max |original|) <= 1e-4. The
size is ViT-B/16 at 224 px, since the original hard-codes 768 channels, 12 cross blocks, the 14x14
grid, d = 16 and two deep prompt maps.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import types

import numpy as np
import torch


class _DropPath(torch.nn.Module):
  """Stochastic depth as timm's `DropPath` computes it: in training, each sample's branch is zeroed
  with probability `drop_prob` and otherwise scaled by 1 / (1 - drop_prob)."""

  def __init__(self, drop_prob: float = 0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if not self.training or not self.drop_prob:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def _stand_in(name: str, **attrs) -> None:
  """Makes `import name` give a module holding `attrs` (its parents empty) when it would fail."""
  try:
    importlib.import_module(name)
  except ImportError:
    parts = name.split(".")
    for depth in range(1, len(parts)):
      sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _install_stand_ins() -> None:
  """Stand-ins for the modules the original imports but never uses here (see the module doc)."""
  _stand_in("turtle", forward=None)
  _stand_in("timm.models.layers", DropPath=_DropPath,
            to_2tuple=lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x),
            trunc_normal_=lambda tensor, std=1.0: torch.nn.init.trunc_normal_(
                tensor, std=std, a=-2.0, b=2.0))
  _stand_in("iopath.common.file_io", HTTPURLHandler=object,
            PathManager=type("PathManager", (), {"register_handler": lambda self, handler: None}))


# The original's backbone modules under vpt_main/src/models/vit_backbones/.
_MODULES = {"acc": "vit_tinypara_acc", "reference": "vit_tinypara",
            "swin": "swin_transformer_tinypara"}


def import_original(repo: str, which: str):
  """The original's `vit_tinypara_acc` ('acc'), `vit_tinypara` ('reference') or
  `swin_transformer_tinypara` ('swin') module, imported as part of its `src` package (the Swin
  file imports `...utils.logging` relative to it)."""
  _install_stand_ins()
  if f"{repo}/vpt_main" not in sys.path:
    sys.path.insert(0, f"{repo}/vpt_main")
  return importlib.import_module("src.models.vit_backbones." + _MODULES[which])


class DualModel(torch.nn.Module):
  """The module `vit_train_sa2vp.py` (and, with `width=1024`, `vit_train_swin.py`) trains and
  saves: the backbone without a head (it returns the image and the prompt features; the Swin's
  head is an Identity that passes that pair through) as `vit_base`, and one head on both as
  `class_head`."""

  def __init__(self, vit, num_classes: int, width: int = 768):
    super().__init__()
    self.vit_base = vit
    self.class_head = torch.nn.Linear(width, num_classes)

  def forward(self, images):
    image, prompt = self.vit_base(images)
    return self.class_head(image), self.class_head(prompt)


def random_google_vit(backbone: dict, rng) -> dict:
  """Random float32 arrays under Google's `.npz` names and shapes (`backbone`: name -> shape):
  LayerNorm scales 1 + N(0, 0.1^2), kernels N(0, 1/768) (unit-scale queries and keys, so that the
  attention weights are far from uniform), the rest N(0, 0.1^2)."""
  def draw(name, shape):
    if name.endswith("scale"):
      return 1.0 + 0.1 * rng.normal(size=shape)
    return (768**-0.5 if name.endswith("kernel") else 0.1) * rng.normal(size=shape)

  return {name: draw(name, shape).astype(np.float32) for name, shape in backbone.items()}


def check_parity(args) -> bool:
  """Saves a randomly weighted original SA2VP, loads it into ours and compares the eval logits of
  both variants; True when each is within 1e-4 relative."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxprompt.models import common  # pylint: disable=import-outside-toplevel
  from jaxprompt.prompts import sa2vp  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.parity_batch_size, 224, 224, 3)).astype(np.float32)
  passed = True
  for variant in ("acc", "reference"):
    torch.manual_seed(0)
    ours = sa2vp.Model(num_classes=args.num_classes, variant="B/16", inter_dim=16,
                       inter_weight=0.1, dropout=0.1, deep_prompt_layers=(4, 8),
                       cross_attention=variant)
    variables = jax.eval_shape(
        lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    trainable = re.compile(sa2vp.TRAINABLE_PARAMS)
    backbone = {name: param.shape for name, param in common.flatten(variables["params"]).items()
                if not trainable.fullmatch(name)}
    module = import_original(args.original_repo, variant)
    original = DualModel(module.VisionTransformer("sup_vitb16_imagenet21k", 224, num_classes=-1),
                         args.num_classes)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # load_from prints per block
      original.vit_base.load_from(random_google_vit(backbone, rng))
      for name, param in original.named_parameters():  # off the init (LN ones, 1e-6 biases)
        if re.search(r"ppt|deep_|cross_conv|cross_attn\.\d+\.ffn|class_head", name):
          param.add_((0.5 if "cross_conv" in name else 0.05) * torch.randn_like(param))
    original.eval()
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, "checkpoint-best.pth")
      torch.save({"model": original.state_dict(),
                  "optimizer": torch.optim.AdamW(original.parameters()).state_dict(),
                  "epoch": "best", "scaler": {"scale": 65536.0},
                  "args": argparse.Namespace(nb_classes=args.num_classes, lr=1e-3)}, path)
      loaded = sa2vp.METHOD.loaders["model"](variables, path)  # config.model_init=path
    with torch.no_grad():
      expected = [x.numpy() for x in original(torch.from_numpy(images.transpose(0, 3, 1, 2)))]
    logits, aux = jax.jit(lambda v, x: ours.apply(v, x, train=False))(loaded, images)
    for what, got, want in (("image logits", logits, expected[0]),
                            ("prompt logits", aux["prompt_logits"], expected[1])):
      error = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
      passed &= error <= 1e-4
      print(f"{module.__name__.rsplit('.', 1)[-1]} vs ours (cross_attention={variant!r}), "
            f"{what} {want.shape}: max relative error {error:.2e} (max |original| "
            f"{np.abs(want).max():.3g}){'' if error <= 1e-4 else '  > 1e-4: FAILED'}")
  return passed


def sgemm_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = min(_seconds(lambda: a @ b) for _ in range(repeats))
  return 2 * n**3 / best


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# What `vit_train_swin.py` trains, as param names of `DualModel(SwinTransformer)`: the prompt map
# and its projection, the MLP and its LayerNorm in stage 2's cross blocks, and the shared head.
SWIN_TRAINABLE = (r"vit_base\.patch_embed\.(deep_ppt|proj_ppt\..+)"
                  r"|vit_base\.layers\.2\.cross_attn\.\d+\.(ffn|ffn_norm)\..+|class_head\..+")


def vit_trains(name: str) -> bool:
  """`vit_train_sa2vp.py`'s rule on `DualModel(VisionTransformer)` param names: the shared head,
  the prompts, their projections and the local convs (`vit_base.transformer.<part>`), the cross
  blocks but for their copies of the block's LayerNorm_0 and attention (`cross_attn.<i>.attn`,
  `.attention_norm`), and adapters' `layer.<i>.(down_proj|up_proj|before_norm)` where present."""
  if name.startswith("class_head."):
    return True
  parts = name.split(".")[1:]  # after 'vit_base'
  if parts[2] in ("ppt", "cross_conv", "deep_ppt", "encoder_norm_2", "deep_proj", "ppt_proj"):
    return True
  if parts[2] == "cross_attn":
    return parts[4] not in ("attn", "attention_norm")
  return parts[2] == "layer" and parts[4] in ("down_proj", "up_proj", "before_norm")


def build_original(args):
  """The original model `args.backbone` names, its label, and a test of whether a param trains."""
  if args.backbone == "vit":
    module = import_original(args.original_repo, args.variant)
    vit = module.VisionTransformer("sup_vitb16_imagenet21k", 224, num_classes=-1)
    return DualModel(vit, args.num_classes), f"ViT-B/16 ({args.variant})", vit_trains
  module = import_original(args.original_repo, "swin")
  swin = module.SwinTransformer(img_size=224, embed_dim=128, depths=[2, 2, 18, 2],
                                num_heads=[4, 8, 16, 32], window_size=7, drop_path_rate=0.2,
                                num_classes=-1)
  model = DualModel(swin, args.num_classes, width=swin.num_features)
  return model, "Swin-B", re.compile(SWIN_TRAINABLE).fullmatch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--original_repo", required=True, help="a checkout of tommy-xq/SA2VP")
  parser.add_argument("--backbone", choices=("vit", "swin"), default="vit",
                      help="the ViT-B/16 or the Swin-B SA2VP (--check_parity: ViT only)")
  parser.add_argument("--variant", choices=("acc", "reference"), default="acc",
                      help="the ViT's cross-attention file")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  parser.add_argument("--gflop_per_step", type=float, default=0.0,
                      help="FLOPs of one step (from benchmarks/train_step.py) for the MFU column")
  parser.add_argument("--against_ours", action="store_true",
                      help="also time our step for the same backbone, its steps interleaved")
  parser.add_argument("--check_parity", action="store_true",
                      help="instead of timing: load a saved original into ours, compare logits")
  parser.add_argument("--parity_batch_size", type=int, default=2)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.against_ours and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
    parser.error("--against_ours needs OMP_WAIT_POLICY=PASSIVE in the environment (see the "
                 "module docstring)")
  if args.check_parity:
    if args.backbone != "vit":
      parser.error("--check_parity compares the ViT only")
    sys.exit(0 if check_parity(args) else 1)
  model, label, trains = build_original(args)
  params = []
  for name, param in model.named_parameters():
    param.requires_grad_(bool(trains(name)))
    if param.requires_grad:
      params.append(param)
  optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
  model.train()
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(args.batch_size, 3, 224, 224)).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, args.num_classes, args.batch_size))
  cross_entropy = torch.nn.CrossEntropyLoss()

  def step():
    logits, prompt_logits = model(images)
    loss = 0.8 * cross_entropy(logits, labels) + 0.2 * cross_entropy(prompt_logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  if args.against_ours:
    ours = our_step(args.backbone)
    ours()  # compile and warm up
  step()  # warm-up
  times, our_times = [], []
  for _ in range(args.steps):  # interleaved, so that both see the same machine
    times.append(_seconds(step))
    if args.against_ours:
      our_times.append(_seconds(ours))
  times.sort()
  seconds = times[len(times) // 2]
  peak = sgemm_peak_flops()
  print(f"original SA2VP {label}, {sum(p.numel() for p in params):,} trainable params, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} at 224 "
        f"px, median of {args.steps} steps: {seconds:.3f} s/step (min {times[0]:.3f}, "
        f"max {times[-1]:.3f})")
  print(f"images/s: {args.batch_size / seconds:.3f}; torch sgemm peak {peak / 1e9:.1f} GFLOP/s")
  if args.gflop_per_step:
    achieved = args.gflop_per_step * 1e9 / seconds
    print(f"at {args.gflop_per_step:.1f} GFLOP/step: {achieved / 1e9:.1f} GFLOP/s, "
          f"MFU {100 * achieved / peak:.1f}%")
  if args.against_ours:
    ours_seconds = float(np.median(our_times))
    print(f"ours (benchmarks/run_all.py's {args.backbone} row, steps interleaved with the "
          f"original's): {ours_seconds:.3f} s/step (min {min(our_times):.3f}, max "
          f"{max(our_times):.3f}), {args.batch_size / ours_seconds:.3f} images/s = "
          f"{seconds / ours_seconds:.2f}x the original; {ours.gflop:.0f} GFLOP/step (XLA), MFU "
          f"{100 * ours.gflop * 1e9 / ours_seconds / peak:.1f}% against the sgemm peak")


def our_step(backbone: str):
  """Our train step for `run_all.py`'s SA2VP row of `backbone`, as a call that runs one step;
  `.gflop` is XLA's count for it. Host-memory reuse (`jaxprompt/host_memory.py`) is switched on
  first, as the trainer does; it then holds for the original's steps too."""
  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from jaxprompt import host_memory
  host_memory.reuse_freed_memory()
  import jax
  from benchmarks import common, run_all
  from jaxprompt import sharding, train
  config, _ = run_all.config_of("sa2vp" if backbone == "vit" else "sa2vp_swin", None)
  exp = train.build(config)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.normal(size=(config.batch_size, 224, 224, 3)).astype(np.float32),
      "label": rng.integers(0, exp.data.source.num_classes, config.batch_size).astype(np.int32),
  }, exp.mesh)
  compiled = exp.train_step.lower(exp.state, batch).compile()
  state = [exp.state]

  def run():
    state[0] = jax.block_until_ready(compiled(state[0], batch))[0]

  run.gflop = common.xla_flops(compiled) / 1e9
  return run


if __name__ == "__main__":
  main()
