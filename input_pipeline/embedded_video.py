"""'embedded/moving_shapes': generated video clips with captions, for text-video retrieval demos.

The project's own video-text dataset, so that the video methods (DGL, arXiv 2401.10588, and the
CLIP4Clip baselines) run with no download. A clip is F frames (default 16) of 32×32 RGB uint8:
one filled square of colour `embedded.PALETTE[c]` crossing a plain dark background in one of four
directions, 15 pixels over the clip (one per frame at F = 16), along one of three parallel tracks.
Its caption names the three attributes that vary:

    "{colour} square goes {left|right|up|down} at {position}"

where the position is the track's band across the motion: top, middle or bottom for left/right
motion, left, middle or right for up/down motion (bands of rows / columns 0-9, 11-20, 22-31).
The direction is only visible across frames, so frame order matters: the reversed clip shows the
opposite direction, which is another caption of the same split. Nuisances vary per clip: the
square's side (6-8 px), its start along the track and offset inside the band, its colour jitter
(±25 per channel) and the background's grey level. Captions are short enough for
`embedded_clip.byte_vocabulary()` (a token per character) at DGL's 32-token context (≤ 30 tokens
besides SOT and EOT).

5 colours × 4 directions × 3 positions = 60 scenes. Every split holds each scene the same number
of times (its size is a multiple of 60), in a seeded random order; val and test hold each exactly
once, so each test caption describes exactly one test video and R@1 is well defined. Splits:
train 600 (10 clips per scene), val 60, test 60; generating all three takes about 0.1 s.
Examples are {'video': uint8 (F, 32, 32, 3), 'caption': string}; the tokeniser (`clip_tokenize`)
turns the caption into 'caption_tokens', which batches carry with 'video' (`batch_keys`).
Generated with numpy from fixed seeds: the same bytes on every machine. `pp_spec` writes the
demos' pp spec (frames through CLIP's normalisation, captions through the byte vocabulary).

Multi-caption evaluation (VATEX's multi-sentence protocol): with `captions_per_video=K` (up to
len(TEMPLATES) = 4) each val/test clip's 'caption' is the vector of its K phrasings (TEMPLATES
in order; `clip_tokenize(..., max_captions=K)` makes them (K, L)), and train clip i is captioned
with phrasing i mod K, so training sees every phrasing. (DGL's VATEX loader,
knightyxp/DGL `dataloaders/dataloader_vatex_retrieval.py`, trains on every (video, caption)
pair instead; here each generated clip has one, and the split has 10 clips per scene.)
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from input_pipeline import base, embedded, embedded_clip

NAME = "embedded/moving_shapes"
IMAGE_SIZE = embedded.IMAGE_SIZE  # 32
NUM_FRAMES = 16
TRAVEL = 15  # pixels the square moves over a clip
DIRECTIONS = ("left", "right", "up", "down")
BAND_STARTS, BAND_HEIGHT = (0, 11, 22), 10  # the three tracks' bands across the motion, pixels
NUM_SCENES = len(embedded_clip.COLOUR_NAMES) * len(DIRECTIONS) * len(BAND_STARTS)  # 60
SPLIT_SIZES = {"train": 10 * NUM_SCENES, "val": NUM_SCENES, "test": NUM_SCENES}
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def position_names(direction: str) -> tuple[str, str, str]:
  """The names of the three tracks across `direction`'s motion, in pixel order."""
  return ("top", "middle", "bottom") if direction in ("left", "right") else (
      "left", "middle", "right")


def caption_attributes(index: int) -> tuple[int, int, int]:
  """Scene `index` in [0, NUM_SCENES) -> (colour, direction, position) indices."""
  if not 0 <= index < NUM_SCENES:
    raise ValueError(f"scene index {index} is outside [0, {NUM_SCENES}).")
  rest, colour = divmod(index, len(embedded_clip.COLOUR_NAMES))
  position, direction = divmod(rest, len(DIRECTIONS))
  return colour, direction, position


# Phrasings of a scene, each at most 30 byte-level tokens (characters other than spaces).
TEMPLATES = ("{colour} square goes {direction} at {position}",
             "{colour} box moves {direction} at {position}",
             "{colour} tile going {direction} at {position}",
             "at {position} a {colour} box goes {direction}")


def caption(index: int, template: int = 0) -> str:
  """Scene `index`'s caption in phrasing TEMPLATES[template]."""
  colour, direction, position = caption_attributes(index)
  name = DIRECTIONS[direction]
  return TEMPLATES[template].format(colour=embedded_clip.COLOUR_NAMES[colour], direction=name,
                                    position=position_names(name)[position])


CAPTIONS = tuple(caption(i) for i in range(NUM_SCENES))  # the first phrasing of each scene


def make_clips(num_examples: int, seed: int, num_frames: int = NUM_FRAMES
               ) -> tuple[np.ndarray, np.ndarray]:
  """(videos uint8 (n, num_frames, 32, 32, 3), scene indices int32 (n,)); n must be a multiple of
  NUM_SCENES and every scene occurs n / NUM_SCENES times."""
  if num_examples % NUM_SCENES:
    raise ValueError(f"num_examples={num_examples}: expected a multiple of {NUM_SCENES} so "
                     "that every scene occurs equally often.")
  rng = np.random.default_rng([20_261_130, seed])
  indices = rng.permutation(np.arange(num_examples) % NUM_SCENES).astype(np.int32)
  colour, direction, position = np.array([caption_attributes(i) for i in indices]).T

  side = rng.integers(6, 9, num_examples)
  forward = (direction == 1) | (direction == 3)               # right / down: coordinate grows
  start = rng.integers(0, IMAGE_SIZE - side - TRAVEL + 1)       # along the track, forward motion
  start = np.where(forward, start, start + TRAVEL)             # backward: ends where that starts
  steps = np.round(np.arange(num_frames) * TRAVEL / (num_frames - 1)).astype(np.int64)
  along = start[:, None] + np.where(forward, 1, -1)[:, None] * steps  # (n, F)
  across = np.asarray(BAND_STARTS)[position] + rng.integers(0, BAND_HEIGHT - side + 1)
  across = np.broadcast_to(across[:, None], along.shape)
  horizontal = (direction < 2)[:, None]
  x0, y0 = np.where(horizontal, along, across), np.where(horizontal, across, along)  # corners

  grid = np.arange(IMAGE_SIZE)
  inside = lambda first: (grid >= first[..., None]) & (grid < (first + side[:, None])[..., None])
  mask = inside(y0)[..., :, None] & inside(x0)[..., None, :]  # (n, F, 32, 32)
  square = embedded.PALETTE[colour] + rng.integers(-25, 26, size=(num_examples, 3))
  square = np.clip(square, 0, 255).astype(np.uint8)
  background = rng.integers(0, 60, size=num_examples).astype(np.uint8)
  videos = np.where(mask[..., None], square[:, None, None, None, :],
                    background[:, None, None, None, None])
  return videos.astype(np.uint8), indices


class MovingShapesSource(base.DataSource):
  """The generated clips served from memory; hosts slice each split like every other source."""

  num_classes = 0  # retrieval: no classes
  batch_keys = {"video": tf.float32, "caption_tokens": tf.int32}

  def __init__(self, name: str = NAME, *, num_frames: int = NUM_FRAMES,
               captions_per_video: int = 1):
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 2:
      raise ValueError(f"num_frames={num_frames!r}: expected an int >= 2 (motion needs frames).")
    if captions_per_video not in range(1, len(TEMPLATES) + 1):
      raise ValueError(f"captions_per_video={captions_per_video!r}: expected an int in [1, "
                       f"{len(TEMPLATES)}] (the number of phrasings).")
    self.name, self.splits, self.num_frames = name, tuple(SPLIT_SIZES), num_frames
    self.captions_per_video = captions_per_video
    self._arrays = {split: make_clips(n, _SPLIT_SEEDS[split], num_frames)
                    for split, n in SPLIT_SIZES.items()}

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return SPLIT_SIZES[split]

  def arrays(self, split: str) -> tuple[np.ndarray, list]:
    """The whole split as numpy videos (n, F, 32, 32, 3) and their n captions: strings, or, in
    val/test with captions_per_video = K > 1, K-tuples of strings."""
    self.check_split(split)
    videos, indices = self._arrays[split]
    k = self.captions_per_video
    if k == 1:
      return videos, [CAPTIONS[i] for i in indices]
    if split == "train":
      return videos, [caption(i, n % k) for n, i in enumerate(indices)]
    return videos, [tuple(caption(i, t) for t in range(k)) for i in indices]

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    videos, captions = self.arrays(split)
    start, end = base.host_range(len(captions), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({"video": videos[start:end],
                                               "caption": captions[start:end]})


def pp_spec(context_length: int = 32, frames: str = "", max_captions: int | None = None) -> str:
  """The demos' pp spec on these clips: `frames` (a frame-sampling op, or '' for all frames),
  then CLIP's [0, 1] scaling and mean/std per frame and the captions' byte-level tokens (with
  `max_captions` = K for multi-caption val/test)."""
  vocab = embedded_clip.byte_vocabulary()
  captions = f", max_captions={max_captions}" if max_captions else ""
  ops = [frames, "value_range(0, 1)", "normalize('clip')",
         f"clip_tokenize({vocab!r}, context_length={context_length}{captions})"]
  return "|".join(op for op in ops if op)
