"""Text-video retrieval datasets read from their usual files: MSR-VTT, VATEX, LSMDC, ActivityNet.

Follows knightyxp/DGL `dataloaders/dataloader_{msrvtt,vatex,lsmdc,activitynet}_retrieval.py`
(which keep ArrowLuo/CLIP4Clip's file names and split rules). Every source serves the splits
'train' and 'test' as examples

  {'video': the video's path (raw) -> uint8 (N, H, W, 3) after `decode`,
   'caption': a string, or (VATEX test) a (C,) string vector}

with `batch_keys` {'video': float32, 'caption_tokens': int32}: the pp spec samples T frames
(`pp_ops_video.py`), crops and normalises them, and tokenises 'caption' into 'caption_tokens'
(`clip_tokenize`, 32 tokens; 64 for ActivityNet paragraphs). No labels (`num_classes` = 0).

  msrvtt       train: every caption in MSRVTT_data.json ('sentences') of each video listed in
               MSRVTT_train.9k.csv (column video_id), one pair each, in the json's order (DGL's
               --expand_msrvtt_sentences; 180k pairs); test: MSRVTT_JSFUSION_test.csv (1k-A,
               columns video_id, sentence), one pair per row.
  vatex        train_list.txt / test_list.txt (one video id a line) and ref_captions.json
               ({video id: [English captions]}); train: one pair per caption; test: one example
               per video whose 'caption' is all its captions, a (C_i,) string vector
               (multi-sentence retrieval); `clip_tokenize(..., max_captions=C)` makes them (C, L)
               with all-zero rows after the last, C >= `max_captions['test']` (the most any test
               video has; VATEX has about 10 English captions a video).
  lsmdc        LSMDC16_annos_training.csv (train), LSMDC16_challenge_1000_publictect.csv (test):
               tab-separated <clip id, start aligned, end aligned, start extracted, end
               extracted, sentence>, one pair per line. Each clip is its own video file, so the
               times (positions in the movie) are not used, as in DGL.
  activitynet  train_ids.json + train.json (train), val_ids.json + val_1.json (test, 'val_1'):
               ids 'v_<youtube id>'; one example per video, the paragraph = its sentences joined
               by single spaces, the clip [0, ceil(duration)] s; ids absent from the caption
               json are skipped, and DGL's known-broken video NHznDFD3V3k is left out.

Files: kwargs root=<the dataset folder holding those files>, or data_dir=<its parent> with the
folder named msrvtt / vatex / lsmdc / activitynet; video_dir=<folder of the videos> (default
root/videos), searched recursively for <id>.{mp4,avi,webm,mkv,mov,m4v} or a frame folder <id>/
of images (ActivityNet: <youtube id> without the 'v_' prefix, as DGL, or the 'v_' id). Videos
are read by `video.read_video` at `fps` (default 3, DGL's transcode rate; None = every frame).

Checked when the source is built, so that bad data fails before training: a listed video with
no file is a `base.DataNotFoundError` naming the first missing ids, the file listing them and
`video_dir`; with `check_videos` (default) every video is opened and its first frame decoded
(`video.video_problem`, on a thread pool; measured 20 ms a 224p clip on one core, about three
CPU-minutes for MSR-VTT's 10k videos; `check_videos=False` skips it) and bad ones are a
ValueError naming them. `skip_bad_videos=True` drops the examples of missing and bad videos
instead, logs a warning with their count and lists them in `skipped_videos` ({video id:
reason}). A video that turns bad later fails in `decode` with its path in the message.

Decoding runs PyAV inside `tf.numpy_function` in `decode` (not in a Python generator): the raw
stream stays a cheap tensor of paths that the training pipeline caches, shuffles and skips
before any pixel is decoded (the `base.DataSource` contract), and the parallel tf.data map runs
several decodes at once, since FFmpeg decodes with the GIL released.

Deviations from DGL: missing videos are an error (DGL drops them silently for VATEX, LSMDC and
ActivityNet); VATEX's test examples are one per video with a caption list, where DGL has one per
caption and reshapes the similarity matrix by `cut_off_points` (same metric).
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from input_pipeline import base, file_list, video

SPLITS = ("train", "test")
SHOWN_VIDEOS = 5  # ids named in errors and warnings
ACTIVITYNET_BROKEN_VIDEOS = ("NHznDFD3V3k",)  # DGL's `broken_videos`


class Pair(NamedTuple):
  """One example: a video id, its caption (or, multi-caption test, captions) and an optional
  [start, end] window in seconds."""
  video_id: str
  caption: Union[str, tuple[str, ...]]
  window: Optional[tuple[float, float]] = None


def find_videos(video_dir: str, names: dict[str, Sequence[str]]) -> dict[str, str]:
  """{video id: path} for the ids of `names` ({id: file stems to look for, in order}) found under
  `video_dir`: a video file <stem>.<ext> or else a frame folder <stem>/; two video files with
  one stem are an error naming both."""
  wanted = {stem for stems in names.values() for stem in stems}
  files, folders = {}, {}
  for folder, subfolders, file_names in os.walk(video_dir, followlinks=True):
    for sub in subfolders:
      if sub in wanted:
        folders.setdefault(sub, os.path.join(folder, sub))
    for file_name in file_names:
      stem, ext = os.path.splitext(file_name)
      if stem in wanted and ext.lower() in video.VIDEO_EXTENSIONS:
        path = os.path.join(folder, file_name)
        if stem in files:
          raise ValueError(f"Two video files are named {stem!r}: {files[stem]} and {path}; keep "
                           "one.")
        files[stem] = path
  found = {}
  for video_id, stems in names.items():
    path = next((files[s] for s in stems if s in files), None) or next(
        (folders[s] for s in stems if s in folders), None)
    if path is not None:
      found[video_id] = path
  return found


def _shown(items: Sequence[str]) -> str:
  more = f" (and {len(items) - SHOWN_VIDEOS} more)" if len(items) > SHOWN_VIDEOS else ""
  return "; ".join(items[:SHOWN_VIDEOS]) + more


class VideoTextSource(base.DataSource):
  """Video-caption pairs with videos on disk (module docstring); subclasses list the pairs."""

  num_classes = 0
  batch_keys = {"video": tf.float32, "caption_tokens": tf.int32}

  def __init__(self, name: str, root: str, pairs: dict[str, list[Pair]],
               listed_in: dict[str, str], *, video_dir: Optional[str] = None,
               fps: Optional[float] = 3.0, folder_fps: Optional[float] = None,
               skip_bad_videos: bool = False, check_videos: bool = True):
    self.name, self.root, self.splits = name, root, tuple(pairs)
    self.fps, self.folder_fps = fps, folder_fps
    if fps is not None and fps <= 0 or folder_fps is not None and folder_fps <= 0:
      raise ValueError(f"Data source {name!r}: fps and folder_fps must be positive or None; got "
                       f"fps={fps}, folder_fps={folder_fps}.")
    self.video_dir = video_dir or os.path.join(root, "videos")
    if not os.path.isdir(self.video_dir):
      raise base.DataNotFoundError(f"Data source {name!r}: video folder {self.video_dir} does not "
                                   "exist; pass video_dir=<the folder holding the videos>.")
    for split, split_pairs in pairs.items():
      if not split_pairs:
        raise base.DataNotFoundError(f"Data source {name!r}: {listed_in[split]} lists no "
                                     f"{split} examples.")
    self.skipped_videos: dict[str, str] = {}  # video id -> why skip_bad_videos dropped it
    ids = list(dict.fromkeys(p.video_id for split_pairs in pairs.values() for p in split_pairs))
    paths = find_videos(self.video_dir, {i: self.video_file_stems(i) for i in ids})
    missing = [i for i in ids if i not in paths]
    if missing:
      listing = {i: f for split, f in listed_in.items() for i in
                 {p.video_id for p in pairs[split]}}
      self._report(f"{len(missing)} of {len(ids)} listed videos are missing from {self.video_dir}",
                   [f"{i} (listed in {listing[i]})" for i in missing], skip_bad_videos,
                   exception=base.DataNotFoundError)
      self.skipped_videos.update((i, "has no video file or frame folder") for i in missing)
    if check_videos:
      checked = [i for i in ids if i in paths]
      with concurrent.futures.ThreadPoolExecutor(min(16, (os.cpu_count() or 1) + 4)) as pool:
        problems = dict(zip(checked, pool.map(video.video_problem, [paths[i] for i in checked])))
      bad = {i: problem for i, problem in problems.items() if problem}
      if bad:
        self._report(f"{len(bad)} of {len(checked)} videos cannot be read",
                     [f"{paths[i]} {problem}" for i, problem in bad.items()], skip_bad_videos,
                     exception=ValueError)
        self.skipped_videos.update(bad)
    self.max_captions: dict[str, int] = {}  # split -> most captions of a video (caption lists)
    self._examples = {split: self._arrays(split, split_pairs, paths, listed_in[split])
                      for split, split_pairs in pairs.items()}

  def video_file_stems(self, video_id: str) -> tuple[str, ...]:
    """The file or folder names (without extension) a video may have on disk."""
    return (video_id,)

  def _report(self, what: str, items: list[str], skip: bool, *, exception) -> None:
    if skip:
      logging.getLogger(__name__).warning("Data source %r: %s; skip_bad_videos=True dropped "
                                          "their examples: %s.", self.name, what, _shown(items))
      return
    raise exception(f"Data source {self.name!r}: {what}: {_shown(items)}. Fix or remove them, or "
                    "pass skip_bad_videos=True (in a config: "
                    "--config.dataset_kwargs.skip_bad_videos=True) to drop their examples.")

  def _arrays(self, split: str, pairs: list[Pair], paths: dict[str, str], listed_in: str) -> dict:
    pairs = [p for p in pairs if p.video_id not in self.skipped_videos]
    if not pairs:
      raise base.DataNotFoundError(f"Data source {self.name!r}: no {split} example of "
                                   f"{listed_in} has a readable video.")
    arrays = {"video": np.array([paths[p.video_id] for p in pairs], dtype=object)}
    if isinstance(pairs[0].caption, str):
      arrays["caption"] = np.array([p.caption for p in pairs], dtype=object)
    else:  # caption lists of any length
      arrays["caption"] = [list(p.caption) for p in pairs]
      self.max_captions[split] = max(len(p.caption) for p in pairs)
    if any(p.window is not None for p in pairs):
      arrays["video_window"] = np.array([p.window or (0.0, np.inf) for p in pairs], np.float32)
    return arrays

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return len(self._examples[split]["video"])

  def raw_dataset(self, split: str, *, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    start, end = base.host_range(self.num_examples(split), process_index, process_count)
    columns = {}
    for key, values in self._examples[split].items():
      values = values[start:end]
      if isinstance(values, list):  # caption lists: each example gets its own (C_i,) strings
        columns[key] = tf.ragged.constant(values, dtype=tf.string)
      else:
        columns[key] = tf.constant(values.astype(str) if values.dtype == object else values)
    return tf.data.Dataset.from_tensor_slices(columns)

  def read_frames(self, path, window: np.ndarray) -> np.ndarray:
    """The uint8 (N, H, W, 3) frames of the video at `path` (bytes) in `window` (start, end
    seconds)."""
    start, end = float(window[0]), float(window[1])
    path = np.asarray(path).item().decode("utf-8")
    return video.read_video(path, fps=self.fps, folder_fps=self.folder_fps,
                            start=start, end=None if math.isinf(end) else end)

  def decode(self, example: dict) -> dict:
    example = dict(example)
    window = example.pop("video_window", tf.constant([0.0, np.inf], tf.float32))
    frames = tf.numpy_function(self.read_frames, [example["video"], window], tf.uint8,
                               stateful=False)
    frames.set_shape([None, None, None, 3])
    return {**example, "video": frames}


def _file(root: str, file_name: str, name: str) -> str:
  path = os.path.join(root, file_name)
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f"Data source {name!r}: {path} does not exist.")
  return path


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid json ({e}).") from None


def _csv_column_rows(path: str, columns: Sequence[str]) -> list[dict]:
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  found = list(rows[0]) if rows else []
  if not rows or any(c not in found for c in columns):
    raise ValueError(f"{path} must be a csv with columns {list(columns)} and at least one row; "
                     f"found columns {found} and {len(rows)} rows.")
  return rows


def msrvtt(data_dir: Optional[str] = None, *, root: Optional[str] = None,
           train_csv: str = "MSRVTT_train.9k.csv", **video_kwargs) -> VideoTextSource:
  """MSR-VTT 9k train / 1k-A test (module docstring); train_csv='MSRVTT_train.7k.csv' for 7k."""
  name = "msrvtt"
  root = file_list.dataset_folder(
      name, root, data_dir, name,
      holds=f"{train_csv}, MSRVTT_data.json and MSRVTT_JSFUSION_test.csv")
  files = {"train": _file(root, train_csv, name),
           "test": _file(root, "MSRVTT_JSFUSION_test.csv", name)}
  json_path = _file(root, "MSRVTT_data.json", name)
  train_ids = {row["video_id"] for row in _csv_column_rows(files["train"], ["video_id"])}
  sentences = _read_json(json_path).get("sentences")
  if not isinstance(sentences, list):
    raise ValueError(f"{json_path} must hold a 'sentences' list of {{'video_id', 'caption'}}.")
  train = [Pair(s["video_id"], s["caption"]) for s in sentences if s["video_id"] in train_ids]
  test = [Pair(row["video_id"], row["sentence"])
          for row in _csv_column_rows(files["test"], ["video_id", "sentence"])]
  listed_in = {"train": f"{files['train']} + {json_path}", "test": files["test"]}
  return VideoTextSource(name, root, {"train": train, "test": test}, listed_in, **video_kwargs)


def vatex(data_dir: Optional[str] = None, *, root: Optional[str] = None,
          **video_kwargs) -> VideoTextSource:
  """VATEX, multi-caption test (module docstring)."""
  name = "vatex"
  root = file_list.dataset_folder(
      name, root, data_dir, name, holds="train_list.txt, test_list.txt and ref_captions.json")
  captions_path = _file(root, "ref_captions.json", name)
  captions = _read_json(captions_path)
  pairs, listed_in = {}, {}
  for split in SPLITS:
    list_path = _file(root, f"{split}_list.txt", name)
    with open(list_path, encoding="utf-8") as f:
      ids = [line.strip() for line in f if line.strip()]
    uncaptioned = [i for i in ids if not captions.get(i)]
    if uncaptioned:
      raise ValueError(f"Data source {name!r}: {len(uncaptioned)} videos of {list_path} have no "
                       f"captions in {captions_path}: {_shown(uncaptioned)}.")
    if split == "train":
      pairs[split] = [Pair(i, c) for i in ids for c in captions[i]]
    else:
      pairs[split] = [Pair(i, tuple(captions[i])) for i in ids]
    listed_in[split] = f"{list_path} + {captions_path}"
  return VideoTextSource(name, root, pairs, listed_in, **video_kwargs)


LSMDC_FILES = {"train": "LSMDC16_annos_training.csv",
               "test": "LSMDC16_challenge_1000_publictect.csv"}


def lsmdc(data_dir: Optional[str] = None, *, root: Optional[str] = None,
          **video_kwargs) -> VideoTextSource:
  """LSMDC (LSMDC16 training csv, challenge 1000 test; module docstring)."""
  name = "lsmdc"
  root = file_list.dataset_folder(name, root, data_dir, name,
                                  holds=" and ".join(LSMDC_FILES.values()))
  pairs, listed_in = {}, {}
  for split, file_name in LSMDC_FILES.items():
    path = listed_in[split] = _file(root, file_name, name)
    pairs[split] = []
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        fields = line.strip().split("\t")
        if len(fields) != 6:
          raise ValueError(f"{path} line {number} has {len(fields)} tab-separated fields; "
                           "expected 6: clip id, start aligned, end aligned, start extracted, "
                           "end extracted, sentence.")
        pairs[split].append(Pair(fields[0], fields[5]))
  return VideoTextSource(name, root, pairs, listed_in, **video_kwargs)


class ActivityNetSource(VideoTextSource):
  """ActivityNet Captions paragraphs; videos named by the YouTube id without DGL's 'v_'."""

  def video_file_stems(self, video_id: str) -> tuple[str, ...]:
    return (video_id[2:], video_id)  # DGL: `pseudo_video_id[2:]`


ACTIVITYNET_FILES = {"train": ("train_ids.json", "train.json"),
                     "test": ("val_ids.json", "val_1.json")}


def activitynet(data_dir: Optional[str] = None, *, root: Optional[str] = None,
                **video_kwargs) -> VideoTextSource:
  """ActivityNet Captions paragraph-to-video, train / val_1 (module docstring)."""
  name = "activitynet"
  root = file_list.dataset_folder(
      name, root, data_dir, name,
      holds="train_ids.json, train.json, val_ids.json and val_1.json")
  pairs, listed_in = {}, {}
  for split, (ids_name, captions_name) in ACTIVITYNET_FILES.items():
    ids_path, captions_path = _file(root, ids_name, name), _file(root, captions_name, name)
    annotations = _read_json(captions_path)
    pairs[split] = []
    for pseudo_id in dict.fromkeys(_read_json(ids_path)):
      if pseudo_id not in annotations or pseudo_id[2:] in ACTIVITYNET_BROKEN_VIDEOS:
        continue
      entry = annotations[pseudo_id]
      paragraph = " ".join(entry["sentences"])
      pairs[split].append(Pair(pseudo_id, paragraph, (0.0, float(math.ceil(entry["duration"])))))
    listed_in[split] = f"{ids_path} + {captions_path}"
  return ActivityNetSource(name, root, pairs, listed_in, **video_kwargs)


SOURCES = {"msrvtt": msrvtt, "vatex": vatex, "lsmdc": lsmdc, "activitynet": activitynet}
