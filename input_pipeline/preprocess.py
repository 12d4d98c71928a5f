"""Per-example preprocessing from a pp spec: `make_preprocess_fn("resize(224)|...")`.

A spec is ops joined by `|` (`pp_registry.py` parses it safely and composes it; the ops are in
`pp_ops.py`). The recipes of the seeds, as the configs write them (S = image size):

  * VTAB (VPT `tf_dataset.py`, SA2VP `build_transform_vtab`), train and eval:
      resize(S, antialias=False)|value_range(0, 1)|normalize('imagenet')   (SA2VP: 'inception')
  * FGVC (VPT `transforms.py`, SA2VP `build_transform_fgvc`; also the CoOp-recipe configs):
      train: resize_shorter_side(R)|random_crop(S)|flip_lr|value_range(0, 1)|normalize(...)
      eval:  resize_shorter_side(R)|center_crop(S)|value_range(0, 1)|normalize(...)
    with R = round(S · 256 / 224) (256 for 224).
  * LMPT (`imagelist.py`): train resize(S)|flip_lr|value_range(0, 1)|normalize('imagenet'),
    eval the same without flip_lr.
  * CoOp's own train transform (Dassl `dassl/data/transforms/transforms.py`, as RPL and TPT):
      random_resized_crop(S)|flip_lr|value_range(0, 1)|normalize('clip')
  * TPT's test-time views (`pp_ops_tta.py`; AugMix for the fine-grained datasets), evaluated
    with `pipeline.make_eval_dataset(..., augment_seed=...)`:
      tta_views(64, S, augmix=True)|value_range(0, 1)|normalize('clip')

Normalisation constants: VPT uses ImageNet mean/std; SA2VP uses the "Inception" 0.5/0.5; CLIP
and the methods on it (CoOp, RPL) use CLIP's own mean/std.

Randomness is stateless and comes from the example's '_seed' (a shape-(2,) int tensor that
`pipeline.make_train_dataset` derives from the run seed and the example's position), so the
augmented batches are the same on every run and after a resume.

Deviation: resizing defaults to antialias=True (torchvision resizes PIL images with an
antialiasing filter); VPT's VTAB resize (`tf.image.resize`) has none, so the VTAB specs pass
antialias=False. SA2VP's VTAB transform also resizes with PIL; write antialias=True (or drop
the argument) to follow it more closely.
"""
from __future__ import annotations

from typing import Callable

# pp_ops_boxes, pp_ops_text, pp_ops_tta and pp_ops_video are imported for their registrations.
from input_pipeline import (pp_ops, pp_ops_boxes, pp_ops_text, pp_ops_tta,  # noqa: F401
                            pp_ops_video, pp_registry)

IMAGENET_MEAN, IMAGENET_STD = pp_ops.IMAGENET_MEAN, pp_ops.IMAGENET_STD
INCEPTION_MEAN, INCEPTION_STD = pp_ops.INCEPTION_MEAN, pp_ops.INCEPTION_STD
CLIP_MEAN, CLIP_STD = pp_ops.CLIP_MEAN, pp_ops.CLIP_STD


def make_preprocess_fn(spec: str) -> Callable[[dict], dict]:
  """{'image': uint8 (H, W, 3), ...} -> the same dict transformed by the ops of `spec`; 'label'
  becomes int32, '_seed' is dropped, other keys ('labels', 'caption_tokens', ...) pass through
  unless an op changes them. Unknown ops and bad arguments are errors here, before any data."""
  return pp_registry.build(spec)
