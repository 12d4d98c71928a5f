"""Times the original PyTorch SA2VP ViT-B/16 train step, the bar `benchmarks/train_step.py` is held to.

  python benchmarks/sa2vp_original.py --original_repo=/path/to/SA2VP [--variant=acc|reference]

Needs a checkout of tommy-xq/SA2VP (nothing of it ships with jaxprompt) and `pip install torch
einops`. It imports the original's `vpt_main/src/models/vit_backbones/vit_tinypara_acc.py` (the
variant the original README recommends for speed) or `vit_tinypara.py` (the reference), builds
`VisionTransformer('sup_vitb16_imagenet21k', 224, num_classes)` with random weights, freezes what
the original's SA2VP training freezes (everything but `ppt*`, `deep_*`, `cross_*` and `head`),
and times the step its `engine_for_train.py` runs: train mode (the backbone's dropout live), forward,
0.8 CE(image logits) + 0.2 CE(prompt logits), backward, AdamW. The original imports two modules it
never uses on this path, `turtle` (needs Tk) and timm's `timm.models.layers` (pulls torchvision):
when they are missing, stand-ins providing the three names it reads are installed first
(`DropPath`, `to_2tuple`, `trunc_normal_`; DropPath is unused by the ViT file). MFU divides XLA's
FLOP count of our step for the same model by the original's step time, so it compares speed
on one yardstick; the matmul peak is PyTorch's sgemm measured here.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import types

import numpy as np
import torch


def _install_stand_ins() -> None:
  try:
    importlib.import_module("turtle")
  except ImportError:
    stand_in = types.ModuleType("turtle")
    stand_in.forward = None
    sys.modules["turtle"] = stand_in
  try:
    importlib.import_module("timm.models.layers")
  except ImportError:
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = torch.nn.Identity
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = lambda tensor, std=1.0: torch.nn.init.trunc_normal_(
        tensor, std=std, a=-2.0, b=2.0)
    for name in ("timm", "timm.models"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.layers"] = layers


def sgemm_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = min(_seconds(lambda: a @ b) for _ in range(repeats))
  return 2 * n**3 / best


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--original_repo", required=True, help="a checkout of tommy-xq/SA2VP")
  parser.add_argument("--variant", choices=("acc", "reference"), default="acc")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  parser.add_argument("--gflop_per_step", type=float, default=0.0,
                      help="FLOPs of one step (from benchmarks/train_step.py) for the MFU column")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  _install_stand_ins()
  sys.path.insert(0, f"{args.original_repo}/vpt_main")
  module = importlib.import_module("src.models.vit_backbones."
                                   + ("vit_tinypara_acc" if args.variant == "acc" else "vit_tinypara"))
  model = module.VisionTransformer("sup_vitb16_imagenet21k", 224, num_classes=args.num_classes)
  trainable = ("ppt", "deep_", "cross_", "head")
  params = []
  for name, param in model.named_parameters():
    train = any(part in name for part in trainable)
    param.requires_grad_(train)
    if train:
      params.append(param)
  optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
  model.train()
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(args.batch_size, 3, 224, 224)).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, args.num_classes, args.batch_size))
  cross_entropy = torch.nn.CrossEntropyLoss()

  def step():
    logits, prompt_logits = model(images)
    if prompt_logits.shape[-1] != args.num_classes:  # (B, D) prompt CLS: the shared head applies
      prompt_logits = model.head(prompt_logits)
    loss = 0.8 * cross_entropy(logits, labels) + 0.2 * cross_entropy(prompt_logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  step()  # warm-up
  times = sorted(_seconds(step) for _ in range(args.steps))
  seconds = times[len(times) // 2]
  peak = sgemm_peak_flops()
  print(f"original SA2VP ({args.variant}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {args.batch_size} at 224 px, median of "
        f"{args.steps} steps: {seconds:.3f} s/step (min {times[0]:.3f}, max {times[-1]:.3f})")
  print(f"images/s: {args.batch_size / seconds:.3f}; torch sgemm peak {peak / 1e9:.1f} GFLOP/s")
  if args.gflop_per_step:
    achieved = args.gflop_per_step * 1e9 / seconds
    print(f"at {args.gflop_per_step:.1f} GFLOP/step: {achieved / 1e9:.1f} GFLOP/s, "
          f"MFU {100 * achieved / peak:.1f}%")


if __name__ == "__main__":
  main()
