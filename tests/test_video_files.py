"""Video files and the text-video retrieval sources: PyAV decoding at a frame rate, frame folders,
DGL's frame samplers and their pp ops, the MSR-VTT / VATEX / LSMDC / ActivityNet file layouts,
and bad input (missing and unreadable videos, long captions, videos shorter than T)
(`input_pipeline/video.py`, `pp_ops_video.py`, `video_retrieval.py`).

Videos are written here with PyAV's mpeg4 encoder, one solid colour per frame, so a decoded frame
is recognised by its mean colour (lossy YUV 4:2:0 coding moves it by a few levels)."""
import csv
import json

import av
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import base, embedded_clip, pipeline, preprocess, video
from jaxprompt.models import clip_tokenizer

SIZE = (16, 24)  # (H, W) of the written frames
COLOUR_TOLERANCE = 12  # uint8 levels


def colours(n, seed=0):
  """n well-separated RGB colours (uint8 (n, 3)), away from the range ends."""
  return np.random.default_rng(seed).integers(24, 232, (n, 3)).astype(np.uint8)


def write_video(path, frame_colours, rate=30):
  """A video of solid-colour frames at `rate` fps (container from the file extension; VP8 in
  .webm, MPEG-4 part 2 otherwise)."""
  with av.open(str(path), "w") as container:
    webm = str(path).endswith(".webm")
    stream = container.add_stream("libvpx" if webm else "mpeg4", rate=rate)
    stream.height, stream.width = SIZE
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "4", "b:v": "1M"} if webm else {"qscale": "1"}
    for colour in frame_colours:
      frame = np.broadcast_to(colour, (*SIZE, 3)).copy()
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)


def write_frame_folder(folder, frame_colours):
  """Frames 1.png, 2.png, ... (natural order: 2 before 10)."""
  folder.mkdir(parents=True)
  for i, colour in enumerate(frame_colours, 1):
    Image.fromarray(np.broadcast_to(colour, (*SIZE, 3)).copy()).save(folder / f"{i}.png")
  return str(folder)


def mean_colours(frames):
  return frames.reshape(len(frames), -1, 3).mean(1)


def assert_frames(frames, expected_colours):
  assert frames.dtype == np.uint8 and frames.shape == (len(expected_colours), *SIZE, 3)
  np.testing.assert_allclose(mean_colours(frames), expected_colours, atol=COLOUR_TOLERANCE)


def nearest(frame_times, sample_times):
  """Reference: the first frame with the smallest |time difference| (ties go to the earlier)."""
  return [int(np.argmin(np.abs(np.asarray(frame_times) - t))) for t in sample_times]


def test_nearest_frame_takes_the_earlier_frame_on_a_tie():
  frame_times = [0.0, 0.5, 1.0, 2.0]
  sample_times = [0.25, 0.3, 0.75, 1.5, 1.6, 3.0, -1.0]  # ties at 0.25, 0.75 and 1.5
  np.testing.assert_array_equal(video.nearest_frame_indices(frame_times, sample_times),
                                nearest(frame_times, sample_times))
  with pytest.raises(ValueError, match="0 <= start <= end"):
    video.window_range(3.0, 2.0, 1.0)


def test_written_video_decodes_to_its_frames_at_any_rate(tmp_path):
  c = colours(30)
  path = write_video(tmp_path / "clip.mp4", c, rate=30)  # 1 s
  assert_frames(video.read_video(path), c)  # fps=None: every frame
  assert_frames(video.read_video(path, fps=3), c[[0, 10, 20]])
  times = np.arange(30) / 30
  assert_frames(video.read_video(path, fps=7), c[nearest(times, np.arange(7) / 7)])
  # DGL's window: frames int(start*fps) .. int(end*fps), both ends included
  assert_frames(video.read_video(path, fps=3, start=0.4, end=0.7), c[[10, 20]])
  assert_frames(video.read_video(path, start=0.4, end=0.7), c[12:22])
  # a video already at the target rate comes back unchanged
  slow = write_video(tmp_path / "slow.mkv", c[:9], rate=3)
  assert_frames(video.read_video(slow, fps=3), c[:9])


def test_frame_folder_reads_in_natural_order_and_resamples(tmp_path):
  c = colours(12, seed=1)
  folder = write_frame_folder(tmp_path / "frames", c)
  np.testing.assert_array_equal(mean_colours(video.read_video(folder)), c)  # PNG: exact
  np.testing.assert_array_equal(mean_colours(video.read_video(folder, fps=3, folder_fps=6)),
                                c[::2])
  np.testing.assert_array_equal(
      mean_colours(video.read_video(folder, fps=6, start=0.5, end=1.0)), c[3:7])
  with pytest.raises(ValueError, match="folder_fps"):
    video.read_video(folder, start=1.0)


def test_missing_undecodable_and_empty_videos_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
    video.read_video(str(tmp_path / "nowhere.mp4"))
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(b"this is a text file, not a video\n" * 20)
  with pytest.raises(ValueError, match="junk.mp4"):
    video.read_video(str(junk))
  assert video.video_problem(str(junk)) and video.video_problem(str(tmp_path / "no.mp4"))
  path = write_video(tmp_path / "short.mp4", colours(3))
  assert video.video_problem(path) is None
  with pytest.raises(ValueError, match=r"short.mp4 has no frame in the window \[5.0, 6.0\]"):
    video.read_video(path, fps=3, start=5.0, end=6.0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty has no"):
    video.read_video(str(tmp_path / "empty"))
  folder = write_frame_folder(tmp_path / "frames", colours(2))
  (tmp_path / "frames" / "3.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"Frame .*frames/3.png cannot be decoded"):
    video.read_video(folder)


def test_segment_sampling_draws_one_frame_per_segment_and_repeats_short_videos():
  rng = np.random.default_rng(0)
  draws = np.stack([video.segment_frame_indices(25, 12, rng) for _ in range(200)])
  # 25 // 12 = 2 frames a segment from frame 0: segment k is {2k, 2k+1}; frame 24 never drawn
  segment = np.arange(12)[None]
  assert ((draws >= 2 * segment) & (draws <= 2 * segment + 1)).all()
  assert {0, 1} <= set((draws - 2 * segment).ravel())
  np.testing.assert_array_equal(video.segment_frame_indices(5, 8, rng), [0, 1, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(video.segment_frame_indices(8, 8, rng), np.arange(8))
  with pytest.raises(ValueError, match="no frames"):
    video.segment_frame_indices(0, 8, rng)


def test_centre_sampling_takes_segment_centres():
  # tick = 30 / 12 = 2.5: floor(1.25 + 2.5 k)
  np.testing.assert_array_equal(video.centre_frame_indices(30, 12),
                                [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28])
  np.testing.assert_array_equal(video.centre_frame_indices(12, 12), np.arange(12))
  np.testing.assert_array_equal(video.centre_frame_indices(3, 6), [0, 1, 2, 2, 2, 2])


def _counting_videos():
  """Examples whose 'video' frame i is filled with i (n = 5..19 frames), with '_seed'."""
  def make(n):
    frames = tf.broadcast_to(tf.cast(tf.range(n), tf.uint8)[:, None, None, None], [n, 2, 2, 3])
    return {"video": frames, "_seed": tf.stack([n, 7])}
  return tf.data.Dataset.range(5, 20).map(make)


def test_sample_frames_ops_in_a_tf_data_pipeline():
  train = preprocess.make_preprocess_fn("sample_frames_segments(8)")
  ds = _counting_videos().map(train)
  assert ds.element_spec["video"].shape.as_list() == [8, 2, 2, 3]
  for n, example in zip(range(5, 20), ds.as_numpy_iterator()):
    picked = example["video"][:, 0, 0, 0].astype(int)
    if n < 8:
      np.testing.assert_array_equal(picked, np.minimum(np.arange(8), n - 1))
    else:
      per = n // 8
      assert ((picked >= np.arange(8) * per) & (picked < np.arange(8) * per + per)).all()
  again = [e["video"] for e in _counting_videos().map(train).as_numpy_iterator()]
  np.testing.assert_array_equal(again, [e["video"] for e in ds.as_numpy_iterator()])
  eval_fn = preprocess.make_preprocess_fn("sample_frames_centre(4)")
  example = next(_counting_videos().skip(7).map(
      lambda e: eval_fn({"video": e["video"]})).as_numpy_iterator())  # 12 frames
  np.testing.assert_array_equal(example["video"][:, 0, 0, 0], [1, 4, 7, 10])
  with pytest.raises(ValueError, match="is random"):
    _counting_videos().map(lambda e: train({"video": e["video"]}))
  with pytest.raises(ValueError, match="positive int"):
    preprocess.make_preprocess_fn("sample_frames_centre(0)")


# --- dataset layouts -------------------------------------------------------------------------


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _msrvtt(root, extra_test_rows=()):
  """5 train pairs (video0: 2 captions, video1: 3; video3's caption is not train), 2 + extra test
  rows; videos as .mp4, .avi in a sub-folder, a frame folder and .mkv."""
  root.mkdir()
  (root / "videos" / "sub").mkdir(parents=True)
  write_video(root / "videos" / "video0.mp4", colours(6, 10))
  write_video(root / "videos" / "sub" / "video1.avi", colours(7, 11))
  write_frame_folder(root / "videos" / "video2", colours(4, 12))
  write_video(root / "videos" / "video3.mkv", colours(5, 13))
  _write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"]])
  sentences = [("video0", "a red car"), ("video1", "a dog runs"), ("video3", "not train"),
               ("video1", "a dog"), ("video0", "a car"), ("video1", "running dog")]
  (root / "MSRVTT_data.json").write_text(json.dumps(
      {"videos": [], "sentences": [{"video_id": v, "caption": c, "sen_id": i}
                                   for i, (v, c) in enumerate(sentences)]}))
  _write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
             [["ret0", "msr2", "video2", "a cat sleeps"], ["ret1", "msr3", "video3", "a bird"],
              *extra_test_rows])
  return str(root)


def _strings(values):
  return [v.decode() for v in values]


def test_msrvtt_pairs_videos_and_batches(tmp_path):
  _msrvtt(tmp_path / "msrvtt")
  source = input_pipeline.get_source("msrvtt", data_dir=str(tmp_path))
  assert (source.num_examples("train"), source.num_examples("test")) == (5, 2)
  assert source.num_classes == 0 and set(source.batch_keys) == {"video", "caption_tokens"}
  train = list(source.raw_dataset("train").as_numpy_iterator())
  assert _strings(e["caption"] for e in train) == ["a red car", "a dog runs", "a dog", "a car",
                                                   "running dog"]
  assert [e["video"].decode().rsplit("/", 1)[1] for e in train] == [
      "video0.mp4", "video1.avi", "video1.avi", "video0.mp4", "video1.avi"]
  decoded = [source.decode(e) for e in source.raw_dataset("test").take(2)]
  assert_frames(decoded[0]["video"].numpy(), colours(4, 12))  # frame folder, taken as it is
  assert decoded[1]["video"].shape[0] == 1  # 5 frames at 30 fps, resampled to 3 fps
  assert _strings(e["caption"].numpy() for e in decoded) == ["a cat sleeps", "a bird"]
  vocab = embedded_clip.byte_vocabulary()
  spec = f"sample_frames_centre(3)|center_crop(8)|value_range(0, 1)|clip_tokenize({vocab!r}, " \
         "context_length=32)"
  batch = next(pipeline.make_eval_dataset(source, "test", preprocess.make_preprocess_fn(spec),
                                          global_batch_size=4).as_numpy_iterator())
  assert batch["video"].shape == (4, 3, 8, 8, 3) and batch["video"].dtype == np.float32
  assert batch["caption_tokens"].shape == (4, 32) and batch["_mask"].tolist() == [1, 1, 0, 0]
  np.testing.assert_allclose(batch["video"][0].mean((1, 2)) * 255,  # tick 4/3: frames 0, 2, 3
                             colours(4, 12)[[0, 2, 3]], atol=1e-3)
  np.testing.assert_allclose(batch["video"][1].mean((1, 2)) * 255,  # 1 frame, repeated
                             np.repeat(colours(5, 13)[:1], 3, 0), atol=COLOUR_TOLERANCE)
  train_pp = preprocess.make_preprocess_fn(spec.replace("sample_frames_centre(3)",
                                                        "sample_frames_segments(3)"))
  batch = next(pipeline.make_train_dataset(source, "train", train_pp, global_batch_size=2,
                                           seed=0).as_numpy_iterator())
  assert batch["video"].shape == (2, 3, 8, 8, 3) and batch["caption_tokens"].shape == (2, 32)


def test_vatex_train_pairs_and_multi_caption_test(tmp_path):
  root = tmp_path / "vatex"
  (root / "videos").mkdir(parents=True)
  for i, name in enumerate("abcd"):
    write_video(root / "videos" / f"{name}.webm", colours(4, 20 + i))
  (root / "train_list.txt").write_text("a\nb\n")
  (root / "test_list.txt").write_text("c\nd\n")
  captions = {"a": ["a1", "a2"], "b": ["b1", "b2", "b3"], "c": ["c1", "c2", "c3"], "d": ["d1"]}
  (root / "ref_captions.json").write_text(json.dumps(captions))
  source = input_pipeline.get_source("vatex", root=str(root))
  assert (source.num_examples("train"), source.num_examples("test")) == (5, 2)
  assert source.max_captions == {"test": 3}
  train = list(source.raw_dataset("train").as_numpy_iterator())
  assert _strings(e["caption"] for e in train) == ["a1", "a2", "b1", "b2", "b3"]
  test = list(source.raw_dataset("test").as_numpy_iterator())
  assert [_strings(e["caption"]) for e in test] == [["c1", "c2", "c3"], ["d1"]]
  vocab = embedded_clip.byte_vocabulary()
  pp = preprocess.make_preprocess_fn(
      f"sample_frames_centre(2)|clip_tokenize({vocab!r}, context_length=32, max_captions=4)")
  tokens = [e["caption_tokens"] for e in source.dataset("test").map(pp).as_numpy_iterator()]
  assert [t.shape for t in tokens] == [(4, 32), (4, 32)]
  assert [int((t != 0).any(1).sum()) for t in tokens] == [3, 1]  # all-zero padding rows
  (root / "test_list.txt").write_text("c\nmystery\n")
  with pytest.raises(ValueError, match="mystery"):
    input_pipeline.get_source("vatex", root=str(root))


def test_lsmdc_reads_tab_separated_clips_in_movie_folders(tmp_path):
  root = tmp_path / "lsmdc"
  for movie, clip in (("0001_Movie", "0001_Movie_00.00.01.000-00.00.03.000"),
                      ("0001_Movie", "0001_Movie_00.01.00.000-00.01.02.500"),
                      ("3086_UGLY_TRUTH", "3086_UGLY_TRUTH_00.23.23.000-00.23.28.886")):
    (root / "videos" / movie).mkdir(parents=True, exist_ok=True)
    write_video(root / "videos" / movie / f"{clip}.avi", colours(6))
  def line(clip, sentence):
    times = clip.rsplit("_", 1)[1].split("-")
    return "\t".join([clip, *times, *times, sentence]) + "\n"
  (root / "LSMDC16_annos_training.csv").write_text(
      line("0001_Movie_00.00.01.000-00.00.03.000", "SOMEONE walks in.")
      + line("0001_Movie_00.01.00.000-00.01.02.500", "He sits.")
      + line("0001_Movie_00.00.01.000-00.00.03.000", "SOMEONE smiles, then leaves."))
  (root / "LSMDC16_challenge_1000_publictect.csv").write_text(
      line("3086_UGLY_TRUTH_00.23.23.000-00.23.28.886", "SOMEONE stands below, hands on hips."))
  source = input_pipeline.get_source("lsmdc", root=str(root))
  assert (source.num_examples("train"), source.num_examples("test")) == (3, 1)
  train = list(source.raw_dataset("train").as_numpy_iterator())
  assert _strings(e["caption"] for e in train)[2] == "SOMEONE smiles, then leaves."
  assert "video_window" not in train[0]  # clip files are already cut
  (root / "LSMDC16_challenge_1000_publictect.csv").write_text("only\ttwo fields\n")
  with pytest.raises(ValueError, match="line 1 has 2 tab-separated fields"):
    input_pipeline.get_source("lsmdc", root=str(root))


def test_activitynet_paragraphs_whole_video_windows_and_v_prefix(tmp_path):
  root = tmp_path / "activitynet"
  (root / "videos").mkdir(parents=True)
  write_video(root / "videos" / "abc.mp4", colours(9, 30), rate=3)  # 3 s, named without 'v_'
  write_video(root / "videos" / "v_xyz.mp4", colours(4, 31), rate=3)
  (root / "train_ids.json").write_text(json.dumps(["v_abc", "v_nocaptions", "v_abc"]))
  (root / "val_ids.json").write_text(json.dumps(["v_xyz", "v_NHznDFD3V3k"]))
  (root / "train.json").write_text(json.dumps({"v_abc": {
      "duration": 1.2, "timestamps": [[0, 1], [0.5, 1.2]],
      "sentences": ["A man walks.", " He sits down."]}}))
  (root / "val_1.json").write_text(json.dumps({
      "v_xyz": {"duration": 1.3, "timestamps": [[0, 1.3]], "sentences": ["A dog."]},
      "v_NHznDFD3V3k": {"duration": 5, "timestamps": [[0, 5]], "sentences": ["Broken."]}}))
  source = input_pipeline.get_source("activitynet", data_dir=str(tmp_path))
  assert (source.num_examples("train"), source.num_examples("test")) == (1, 1)
  [example] = list(source.raw_dataset("train"))
  assert example["caption"].numpy().decode() == "A man walks.  He sits down."
  np.testing.assert_array_equal(example["video_window"], [0.0, 2.0])  # [0, ceil(1.2)]
  frames = source.decode(example)["video"].numpy()
  assert_frames(frames, colours(9, 30)[:7])  # frames 0..floor(2 * 3), the window's end included
  assert "video_window" not in source.decode(example)


# --- bad input -------------------------------------------------------------------------------


def test_csv_naming_a_missing_video_fails_or_is_skipped(tmp_path):
  _msrvtt(tmp_path / "msrvtt", extra_test_rows=[["ret2", "msr9", "video9", "nowhere"]])
  with pytest.raises(base.DataNotFoundError, match=r"1 of 5 listed videos .*video9 \(listed in "
                     r".*MSRVTT_JSFUSION_test.csv\)"):
    input_pipeline.get_source("msrvtt", data_dir=str(tmp_path))
  source = input_pipeline.get_source("msrvtt", data_dir=str(tmp_path), skip_bad_videos=True)
  assert source.num_examples("test") == 2 and list(source.skipped_videos) == ["video9"]
  write_video(tmp_path / "msrvtt" / "videos" / "sub" / "video0.mkv", colours(2))
  with pytest.raises(ValueError, match="Two video files are named 'video0'"):
    input_pipeline.get_source("msrvtt", data_dir=str(tmp_path))


def test_unreadable_video_is_named_or_skipped_and_counted(tmp_path, caplog):
  root = _msrvtt(tmp_path / "msrvtt")
  broken = tmp_path / "msrvtt" / "videos" / "video3.mkv"
  broken.write_bytes(broken.read_bytes()[:200])  # a truncated download
  with pytest.raises(ValueError, match=r"1 of 4 videos cannot be read: .*video3.mkv"):
    input_pipeline.get_source("msrvtt", root=root)
  source = input_pipeline.get_source("msrvtt", root=root, skip_bad_videos=True)
  assert source.num_examples("test") == 1 and list(source.skipped_videos) == ["video3"]
  assert "dropped" in caplog.text and "video3.mkv" in caplog.text
  unchecked = input_pipeline.get_source("msrvtt", root=root, check_videos=False)
  with pytest.raises(tf.errors.OpError, match="video3.mkv"):
    list(unchecked.dataset("test"))


def test_caption_longer_than_the_context_is_truncated(tmp_path):
  vocab = embedded_clip.byte_vocabulary()
  caption = "a man " * 40  # 240 characters: one byte-level token each
  pp = preprocess.make_preprocess_fn(f"clip_tokenize({vocab!r}, context_length=32)")
  tokens = pp({"caption": tf.constant(caption), "video": tf.zeros([1, 2, 2, 3])})
  tokens = tokens["caption_tokens"].numpy()
  tokenizer = clip_tokenizer.Tokenizer(vocab, context_length=32)
  assert tokens.shape == (32,)
  assert tokens[0] == tokenizer.sot_token_id and tokens[-1] == tokenizer.eot_token_id
  np.testing.assert_array_equal(tokens[1:31], tokenizer.encode(caption)[:30])


def test_video_shorter_than_t_repeats_its_last_frame(tmp_path):
  c = colours(3, seed=5)
  path = write_video(tmp_path / "short.mp4", c, rate=3)
  for spec in ("sample_frames_centre(8)", "sample_frames_segments(8)"):
    pp = preprocess.make_preprocess_fn(spec)
    example = {"video": tf.constant(video.read_video(path, fps=3)), "_seed": tf.constant([1, 2])}
    if "centre" in spec:
      example.pop("_seed")
    frames = pp(example)["video"].numpy()
    assert_frames(frames, c[[0, 1, 2, 2, 2, 2, 2, 2]])
