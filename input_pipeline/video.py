"""Reading videos into uint8 frames, and the frame samplers of DGL / CLIP4Clip, as plain numpy.

Follows knightyxp/DGL `dataloaders/decode.py` (`RawVideoExtractorpyAV.get_video_data`: decode
every frame with PyAV, cut the [start, end] window, sample T of the frames) and
`dataloaders/sampling.py` (`multi_segments_sampling`, `uniform_sampling`); DGL reads videos
that `preprocess/compress_video.py` (from ArrowLuo/CLIP4Clip) transcoded to 3 fps with the
shorter side 224.

Reading (`read_video(path, fps=..., start=..., end=...)` -> uint8 (N, H, W, 3), time order):

  * A video file is decoded with PyAV (`av`), the frames converted to RGB. With `fps` set the
    frames are resampled to that rate by timestamps, standing in for the 3 fps transcode: for
    each time t_k = k / fps (k = 0, 1, ... up to half a source frame interval after the last
    frame's timestamp, beyond which a next frame would be the nearer; times counted from the
    first decoded frame) the frame whose timestamp is nearest t_k is kept (the earlier one on a
    tie), so a video already at `fps` comes back unchanged. `fps=None` keeps every decoded
    frame, as DGL does with its transcoded files. Frames are converted to RGB only when kept,
    and at most one decoded frame is held back while streaming, so long videos need memory for
    the kept frames only.
  * A pre-extracted frame folder holds one image per frame (.jpg, .jpeg, .png), in natural
    name order ('2.jpg' before '10.jpg'); its frames are at `folder_fps` (default: `fps`, i.e.
    extracted at the wanted rate; a folder is taken as it is when both are None) and resampled
    like a file's when the two differ.
  * The window [start, end] (seconds) keeps the sampled frames k with floor(start·fps) <= k <=
    floor(end·fps), DGL's `int(start_time * fps)`..`int(end_time * fps)` frame range (both
    ends included); `end=None` is the end of the video. Without `fps`, k is the decoded frame's
    index and the rate the stream's average frame rate, as in DGL.

Errors: a missing path is a FileNotFoundError naming it; a file PyAV cannot open or decode, or
without a video stream, a ValueError naming it; a window with no frame a ValueError naming the
file and the window.

Sampling T of the N frames (DGL `sampling.py`, data_length = 1):

  * `segment_frame_indices` (training, TSN-style): N // T frames per segment, segments laid
    from frame 0, a uniformly random frame in each; the last N mod T frames are never drawn
    (the original's rule, not an exact split of all N frames). Fewer frames than T: frames
    0..N-1 then the last frame repeated.
  * `centre_frame_indices` (test): with tick = N / T, frame floor(tick / 2 + tick · k) for
    k = 0..T-1; N <= T as above.

Deviations: DGL seeks nothing and decodes from the start; so do we, but stop decoding once the
window's last frame is kept. DGL's video mask (min(N, T) valid frames) is not produced: the
original never reads it.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def nearest_frame_indices(frame_times: np.ndarray, sample_times: np.ndarray) -> np.ndarray:
  """For each of `sample_times`, the index of the nearest of the sorted `frame_times` (the
  earlier frame on a tie); int64 like `sample_times`."""
  frame_times = np.asarray(frame_times, np.float64)
  sample_times = np.asarray(sample_times, np.float64)
  after = np.clip(np.searchsorted(frame_times, sample_times, side="left"), 0,
                  len(frame_times) - 1)
  before = np.maximum(after - 1, 0)
  earlier_is_nearer = (sample_times - frame_times[before]) <= (frame_times[after] - sample_times)
  return np.where(earlier_is_nearer, before, after).astype(np.int64)


def window_range(rate: float, start: float, end: Optional[float]) -> tuple[int, Optional[int]]:
  """[first, last] frame numbers k (at `rate` per second) inside [start, end] seconds; last None
  is open-ended (see the module docstring)."""
  if start < 0 or (end is not None and end < start):
    raise ValueError(f"Expected a window 0 <= start <= end; got start={start}, end={end}.")
  return math.floor(start * rate), None if end is None else math.floor(end * rate)


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
  """The frame images of `folder` in natural name order."""
  names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)]
  return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def read_frame_folder(folder: str, *, fps: Optional[float] = None, start: float = 0.0,
                      end: Optional[float] = None,
                      folder_fps: Optional[float] = None) -> np.ndarray:
  """The frames of a pre-extracted frame folder -> uint8 (N, H, W, 3) (module docstring)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  files = frame_files(folder)
  if not files:
    raise ValueError(f"Frame folder {folder} has no {'/'.join(FRAME_EXTENSIONS)} images.")
  folder_fps = folder_fps or fps
  if folder_fps is None:
    if start or end is not None:
      raise ValueError(f"Frame folder {folder}: a [start, end] window needs folder_fps (the rate "
                       "the frames were extracted at) or fps.")
    chosen = np.arange(len(files))
  else:
    rate = fps or folder_fps
    first, last = window_range(rate, start, end)
    last_in_video = math.floor((len(files) - 0.5) * rate / folder_fps)  # module docstring
    last = last_in_video if last is None else min(last, last_in_video)
    sample_times = np.arange(first, last + 1) / rate
    chosen = nearest_frame_indices(np.arange(len(files)) / folder_fps, sample_times)
  if not len(chosen):
    raise ValueError(f"Frame folder {folder} has no frame in the window [{start}, {end}] s "
                     f"({len(files)} frames at {folder_fps} fps).")
  frames = []
  for i in chosen:
    try:
      with Image.open(files[i]) as image:
        frames.append(np.asarray(image.convert("RGB")))
    except OSError as e:
      raise ValueError(f"Frame {files[i]} cannot be decoded ({e}).") from None
    if frames[-1].shape != frames[0].shape:
      raise ValueError(f"Frame {files[i]} is {frames[-1].shape[:2]}, the folder's first frame "
                       f"{files[chosen[0]]} is {frames[0].shape[:2]}; frames must share a size.")
  return np.stack(frames)


def decode_video_file(path: str, *, fps: Optional[float] = None, start: float = 0.0,
                      end: Optional[float] = None) -> np.ndarray:
  """The frames of a video file decoded with PyAV -> uint8 (N, H, W, 3) (module docstring)."""
  import av  # pylint: disable=import-outside-toplevel

  try:
    container = av.open(path)
  except av.FFmpegError as e:
    raise ValueError(f"Video file {path} cannot be opened by PyAV/FFmpeg ({e}).") from None
  with container:
    if not container.streams.video:
      raise ValueError(f"Video file {path} has no video stream.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's frame/slice threads; the GIL is released meanwhile
    rate = fps or float(stream.average_rate or stream.guessed_rate or 0)
    if not rate:
      raise ValueError(f"Video file {path} states no frame rate; pass fps=... to resample it.")
    first, last = window_range(rate, start, end)
    kept, previous, previous_time, t0, k, index = [], None, 0.0, None, first, -1
    try:
      for frame in container.decode(stream):
        index += 1
        if fps is None:  # every frame, k = the frame's index
          if index >= first:
            kept.append(frame.to_ndarray(format="rgb24"))
          if last is not None and index >= last:
            break
          continue
        time = float(frame.time if frame.time is not None else index / rate)
        t0 = time if t0 is None else t0
        time -= t0
        while (last is None or k <= last) and k / rate <= time:
          # sample time k / rate lies in [previous_time, time]: keep the nearer frame
          nearer = frame if previous is None or nearest_frame_indices(
              [previous_time, time], [k / rate])[0] == 1 else previous
          kept.append(nearer.to_ndarray(format="rgb24"))
          k += 1
        if last is not None and k > last:
          break
        previous, previous_time = frame, time
    except av.FFmpegError as e:
      raise ValueError(f"Video file {path} cannot be decoded by PyAV/FFmpeg after {index + 1} "
                       f"frames ({e}).") from None
    if fps is not None and previous is not None:  # up to half a frame after the last frame
      end_time = previous_time + 0.5 / float(stream.average_rate or rate)
      while (last is None or k <= last) and k / rate <= end_time:
        kept.append(previous.to_ndarray(format="rgb24"))
        k += 1
  if not kept:
    raise ValueError(f"Video file {path} has no frame in the window [{start}, {end}] s "
                     f"({index + 1} frames decoded).")
  return np.stack(kept)


def read_video(path: str, *, fps: Optional[float] = None, start: float = 0.0,
               end: Optional[float] = None, folder_fps: Optional[float] = None) -> np.ndarray:
  """A video file or a frame folder -> uint8 (N, H, W, 3) (module docstring)."""
  if os.path.isdir(path):
    return read_frame_folder(path, fps=fps, start=start, end=end, folder_fps=folder_fps)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Video {path} does not exist (neither a file nor a frame folder).")
  return decode_video_file(path, fps=fps, start=start, end=end)


def video_problem(path: str) -> Optional[str]:
  """Why `path` cannot be read as a video, or None: missing, a frame folder without frames, or a
  file PyAV cannot open or decode a first frame of. Cheap: at most one frame is decoded."""
  import av  # pylint: disable=import-outside-toplevel

  if os.path.isdir(path):
    return None if frame_files(path) else f"is a folder without {'/'.join(FRAME_EXTENSIONS)} frames"
  if not os.path.isfile(path):
    return "does not exist"
  try:
    with av.open(path) as container:
      if not container.streams.video:
        return "has no video stream"
      next(container.decode(video=0))
  except StopIteration:
    return "has no decodable frame"
  except (av.FFmpegError, OSError) as e:
    return f"cannot be decoded by PyAV/FFmpeg ({e})"
  return None


def segment_frame_indices(num_frames: int, num_segments: int,
                          rng: np.random.Generator) -> np.ndarray:
  """Training sampler: one uniformly random frame in each of `num_segments` segments of
  num_frames // num_segments frames; short videos repeat their last frame. int64 (T,)."""
  _check_counts(num_frames, num_segments)
  per_segment = num_frames // num_segments
  if per_segment == 0:
    return np.minimum(np.arange(num_segments), num_frames - 1)
  return np.arange(num_segments) * per_segment + rng.integers(per_segment, size=num_segments)


def centre_frame_indices(num_frames: int, num_segments: int) -> np.ndarray:
  """Test sampler: the centre frame of each of `num_segments` equal segments; short videos
  repeat their last frame. int64 (T,)."""
  _check_counts(num_frames, num_segments)
  if num_frames <= num_segments:
    return np.minimum(np.arange(num_segments), num_frames - 1)
  tick = num_frames / num_segments
  return (tick / 2.0 + tick * np.arange(num_segments)).astype(np.int64)


def _check_counts(num_frames: int, num_segments: int) -> None:
  if num_segments < 1:
    raise ValueError(f"Expected at least one frame to sample; got num_segments={num_segments}.")
  if num_frames < 1:
    raise ValueError("The video has no frames to sample from.")
