"""pp ops that pick T of a video's frames: DGL's training and test frame samplers.

  sample_frames_segments(num_frames)  random ('_seed'): 'video' (N, H, W, 3) -> (T, H, W, 3),
                                      one random frame in each of T segments (training)
  sample_frames_centre(num_frames)    'video' (N, H, W, 3) -> (T, H, W, 3), the centre frame of
                                      each of T segments (test)

The indices are `video.segment_frame_indices` / `video.centre_frame_indices` (knightyxp/DGL
`dataloaders/sampling.py` `multi_segments_sampling` / `uniform_sampling`; short videos repeat
their last frame), computed in numpy inside the tf.data graph (`tf.numpy_function` on the frame
count and, for the random op, the example's '_seed', so the draw is a pure function of the seed
as every random op's is); the frames are gathered in TensorFlow and T is static. Two ops, not one
op with a mode, because the registry gives '_seed' to random ops only and a random op cannot run
on evaluation examples, which have none.

DGL samples with `sample_frames_segments` in training and `sample_frames_centre` at test for
MSR-VTT, LSMDC and ActivityNet; its VATEX loader uses the centre sampler for training too.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from input_pipeline import video
from input_pipeline.pp_registry import register


def _gather_frames(example: dict, indices: tf.Tensor, num_frames: int) -> dict:
  indices.set_shape([num_frames])
  return {**example, "video": tf.gather(example["video"], indices)}


def _check(name: str, example: dict, num_frames: int) -> tf.Tensor:
  if "video" not in example:
    raise KeyError(f"{name} reads 'video' (N, H, W, 3); the example's keys are {sorted(example)}.")
  if example["video"].shape.rank not in (None, 4):
    raise ValueError(f"{name}({num_frames}) expects 'video' (N, H, W, 3); got shape "
                     f"{example['video'].shape}.")
  return tf.shape(example["video"], out_type=tf.int64)[0]


def _check_num_frames(num_frames) -> None:
  if not isinstance(num_frames, int) or num_frames < 1:
    raise ValueError(f"num_frames must be a positive int; got {num_frames!r}.")


@register("sample_frames_segments", random=True)
def sample_frames_segments(num_frames: int):
  """One uniformly random frame in each of `num_frames` segments (module docstring)."""
  _check_num_frames(num_frames)

  def indices(count, seed):
    rng = np.random.default_rng(np.asarray(seed).astype(np.uint64))
    return video.segment_frame_indices(int(count), num_frames, rng).astype(np.int64)

  def op(example: dict) -> dict:
    count = _check("sample_frames_segments", example, num_frames)
    ids = tf.numpy_function(indices, [count, example["_seed"]], tf.int64, stateful=False)
    return _gather_frames(example, ids, num_frames)

  return op


@register("sample_frames_centre")
def sample_frames_centre(num_frames: int):
  """The centre frame of each of `num_frames` equal segments (module docstring)."""
  _check_num_frames(num_frames)

  def indices(count):
    return video.centre_frame_indices(int(count), num_frames).astype(np.int64)

  def op(example: dict) -> dict:
    count = _check("sample_frames_centre", example, num_frames)
    ids = tf.numpy_function(indices, [count], tf.int64, stateful=False)
    return _gather_frames(example, ids, num_frames)

  return op
