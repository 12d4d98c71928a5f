"""LMPT's long-tailed multi-label data (COCO-LT, VOC-LT), losses and metrics.

Data: the seed's list formats written at the real sizes (VOC-LT 1,142 / 4,952 lines with the real
VOC-LT class counts, COCO-LT 1,909 / 5,000 with 48 label-less test lines), many lines sharing a
few tiny images. Losses: hand computations in numpy on small cases, limiting cases, and torch's
built-in losses where one exists. Metrics: sklearn's average_precision_score, ties included.
"""
import os
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import input_pipeline
from input_pipeline import multilabel_lt, pipeline
from jaxprompt.prompts import lmpt_losses as losses
from jaxprompt.evaluators import multilabel as multilabel_metrics

# VOC-LT's class_freq (DistributionBalancedLoss appendix/VOCdevkit/longtail2012/class_freq.pkl).
VOC_COUNTS = np.array([6, 34, 8, 14, 154, 17, 249, 29, 479, 4, 240, 48, 11, 20, 775, 100, 5, 82,
                       7, 64])
VOC_TRAIN, VOC_TEST, COCO_TRAIN, COCO_TEST = 1142, 4952, 1909, 5000


def _write_png(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(tf.io.encode_png(np.full((5, 4, 3), value, np.uint8)).numpy())


def _multi_hot(num_images, counts, seed):
  """(N, C) uint8 with exactly counts[c] positives in column c."""
  rng = np.random.default_rng(seed)
  labels = np.zeros((num_images, len(counts)), np.uint8)
  for c, n in enumerate(counts):
    labels[rng.choice(num_images, n, replace=False), c] = 1
  return labels


def _write_list(path, paths, labels, *, trailing_space=False, final_newline=True):
  lines = [" ".join([p, *map(str, np.flatnonzero(row))]) + (" " if trailing_space else "")
           for p, row in zip(paths, labels)]
  with open(path, "w") as f:
    f.write("\n".join(lines) + ("\n" if final_newline else ""))


def _write_dataset(root, *, prefix, train_dir, test_dir, num_train, num_test, train_counts,
                   num_classes, images=4, captions=True, class_freq=True, **list_kw):
  """A seed-style dataset folder; returns (train labels, test labels, train paths)."""
  for i in range(images):
    _write_png(os.path.join(root, train_dir, f"img_{i}.jpg"), 10 + i)
    _write_png(os.path.join(root, test_dir, f"img_{i}.jpg"), 50 + i)
  train_paths = [f"{train_dir}/img_{i % images}.jpg" for i in range(num_train)]
  test_paths = [f"{test_dir}/img_{i % images}.jpg" for i in range(num_test)]
  train = _multi_hot(num_train, train_counts, seed=0)
  test = _multi_hot(num_test, np.minimum(np.asarray(train_counts) * 4, num_test), seed=1)
  _write_list(os.path.join(root, f"{prefix}_lt_train.txt"), train_paths, train, **list_kw)
  _write_list(os.path.join(root, f"{prefix}_lt_test.txt"), test_paths, test)
  if captions:
    with open(os.path.join(root, f"{prefix}_lt_captions.txt"), "w") as f:
      for i, p in enumerate(train_paths):
        f.write(f"{p} a  photo of thing {i} " + "with many words " * (i % 9) + "\n")
  if class_freq:
    with open(os.path.join(root, "class_freq.pkl"), "wb") as f:
      pickle.dump({"gt_labels": list(train), "class_freq": train.sum(0).astype(np.int64),
                   "neg_class_freq": (num_train - train.sum(0)).astype(np.int64),
                   "condition_prob": np.zeros((num_classes, num_classes))}, f)
  return train, test, train_paths


def _voc(tmp_path, **kw):
  root = str(tmp_path / "voc")
  kw = {"num_train": VOC_TRAIN, "num_test": VOC_TEST, "train_counts": VOC_COUNTS, **kw}
  return root, _write_dataset(root, prefix="voc", train_dir="VOCdevkit/VOC2012/JPEGImages",
                              test_dir="VOCdevkit/VOC2007/JPEGImages", num_classes=20,
                              final_newline=False, **kw)


# ---------------------------------------------------------------- data


def test_voc_lt_reads_the_seed_lists_at_their_real_size(tmp_path):
  root, (train, test, train_paths) = _voc(tmp_path)
  source = multilabel_lt.MultilabelLtSource("voc_lt", data_dir=str(tmp_path))
  assert source.name == "multilabel/voc_lt" and source.root == root
  assert source.num_classes == 20 and source.class_names[10] == "diningtable"
  assert source.splits == ("train", "test")
  assert source.num_examples("train") == VOC_TRAIN and source.num_examples("test") == VOC_TEST
  np.testing.assert_array_equal(source.class_freq, VOC_COUNTS)
  assert source.num_train_images == VOC_TRAIN
  groups = source.class_groups
  assert [len(groups[g]) for g in ("head", "medium", "tail")] == [6, 6, 8]
  assert 15 in groups["head"] and 13 in groups["medium"]  # pottedplant 100, motorbike 20
  np.testing.assert_array_equal(source.labels("test"), test.astype(np.float32))

  raw = list(source.raw_dataset("train").as_numpy_iterator())
  labels = np.stack([ex["labels"] for ex in raw])
  assert labels.dtype == np.float32 and labels.shape == (VOC_TRAIN, 20)
  np.testing.assert_array_equal(labels, train)
  # Words after the path joined by single spaces, cut to 75 characters.
  assert raw[5]["caption"].decode() == " ".join(("a photo of thing 5 " + "with many words " * 5)
                                                .split())[:75]
  assert raw[0]["caption"].decode() == "a photo of thing 0"
  assert max(len(ex["caption"]) for ex in raw) == 75
  # Host blocks are contiguous and cover the split once.
  for count in (2, 3):
    blocks = [np.stack([ex["labels"] for ex in source.raw_dataset(
        "train", process_index=i, process_count=count).as_numpy_iterator()]) for i in range(count)]
    np.testing.assert_array_equal(np.concatenate(blocks), train)

  test_examples = source.dataset("test").take(5)
  for i, ex in enumerate(test_examples.as_numpy_iterator()):
    assert ex["image"].shape == (5, 4, 3) and ex["image"][0, 0, 0] == 50 + i % 4
    assert "caption" not in ex
    np.testing.assert_array_equal(ex["labels"], test[i])


def test_coco_lt_real_sizes_label_less_lines_and_groups(tmp_path):
  counts = np.concatenate([np.arange(22) * 7 + 100, np.arange(33) * 2 + 20, np.arange(25) % 19 + 1])
  root = str(tmp_path / "coco")
  train, test, _ = _write_dataset(root, prefix="coco", train_dir="train2017", test_dir="val2017",
                                  num_train=COCO_TRAIN, num_test=COCO_TEST, train_counts=counts,
                                  num_classes=80, class_freq=False, captions=False,
                                  trailing_space=True)
  # 48 test images without labels: path-only lines.
  test_list = os.path.join(root, "coco_lt_test.txt")
  lines = open(test_list).read().splitlines()
  for i in range(48):
    lines[i * 100] = lines[i * 100].split()[0]
  open(test_list, "w").write("\n".join(lines) + "\n\n")  # a blank line is skipped
  source = multilabel_lt.MultilabelLtSource("coco_lt", root=root)
  assert source.num_classes == 80 and source.class_names[9] == "traffic light"
  assert source.num_examples("train") == COCO_TRAIN and source.num_examples("test") == COCO_TEST
  assert int((source.labels("test").sum(1) == 0).sum()) >= 48
  np.testing.assert_array_equal(source.class_freq, counts)  # no class_freq.pkl: from the list
  assert [len(source.class_groups[g]) for g in ("head", "medium", "tail")] == [22, 33, 25]
  assert source.captions is None
  assert "caption" not in next(source.raw_dataset("train").as_numpy_iterator())


def test_batches_carry_multi_hot_labels_and_caption_tokens(tmp_path):
  counts = np.array([3, 1, 2] + [1] * 17)
  root, (train, test, _) = _voc(tmp_path, num_train=7, num_test=5, train_counts=counts)
  tokenizer = lambda texts: np.array([[len(t), i, 0] for i, t in enumerate(texts)])
  source = multilabel_lt.MultilabelLtSource("voc_lt", root=root, caption_tokenizer=tokenizer)

  def pp(example):
    example = dict(example)
    example.pop("_seed", None)
    example["image"] = tf.image.resize(example["image"], (4, 4))
    return example

  batch = next(pipeline.make_train_dataset(source, "train", pp, global_batch_size=4, seed=0)
               .as_numpy_iterator())
  assert set(batch) == {"image", "labels", "caption_tokens"}
  assert batch["labels"].shape == (4, 20) and batch["labels"].dtype == np.float32
  assert batch["caption_tokens"].shape == (4, 3) and batch["caption_tokens"].dtype == np.int32
  for labels, tokens in zip(batch["labels"], batch["caption_tokens"]):
    np.testing.assert_array_equal(labels, train[tokens[1]])  # shuffled together
  batches = list(pipeline.make_eval_dataset(source, "test", pp, global_batch_size=4)
                 .as_numpy_iterator())
  assert [b["_mask"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
  assert set(batches[0]) == {"image", "labels", "_mask"}
  np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[:5], test)
  assert not batches[1]["labels"][1:].any()


def test_data_errors(tmp_path):
  root, (train, _, train_paths) = _voc(tmp_path, num_train=9, num_test=4,
                                       train_counts=[2] * 20)
  source = multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  with pytest.raises(ValueError, match="Unknown split 'trainval'.*train, test"):
    source.dataset("trainval")
  with pytest.raises(input_pipeline.DataNotFoundError, match="voc_lt_val.txt does not exist"):
    source.raw_dataset("val")
  with pytest.raises(ValueError, match="Unknown long-tailed"):
    multilabel_lt.MultilabelLtSource("nus_wide", root=root)

  freq_file = os.path.join(root, "class_freq.pkl")
  with open(freq_file, "wb") as f:
    pickle.dump({"class_freq": np.ones(80, np.int64)}, f)
  with pytest.raises(ValueError, match=r"class_freq of shape \(80,\); expected \(20,\)"):
    multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  wrong = train.sum(0).astype(np.int64)
  wrong[3] += 1
  with open(freq_file, "wb") as f:
    pickle.dump({"class_freq": wrong}, f)
  with pytest.raises(ValueError, match="class 3 3 training images, but the train list has 2"):
    multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  os.remove(freq_file)

  captions = os.path.join(root, "voc_lt_captions.txt")
  lines = open(captions).read().splitlines()
  open(captions, "w").write("\n".join(lines[1:] + lines[:1]))
  with pytest.raises(ValueError, match="caption line 1 .* matched by line"):
    multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  os.remove(captions)

  train_list = os.path.join(root, "voc_lt_train.txt")
  lines = open(train_list).read().splitlines()
  open(train_list, "w").write("\n".join(lines + ["VOCdevkit/VOC2012/JPEGImages/gone.jpg 3"]))
  with pytest.raises(input_pipeline.DataNotFoundError, match="gone.jpg \\(listed in .*train"):
    multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  open(train_list, "w").write("\n".join(lines + [f"{train_paths[0]} 20"]))
  with pytest.raises(ValueError, match=r"voc_lt_train.txt:10 .* label 20; expected 0 <= label"):
    multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  open(train_list, "w").write("\n".join(lines + [f"{train_paths[0]} 3 dog"]))
  with pytest.raises(ValueError, match="non-integer label"):
    multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  with pytest.raises(input_pipeline.DataNotFoundError, match="does not exist"):
    multilabel_lt.MultilabelLtSource("coco_lt", data_dir=str(tmp_path))
  open(train_list, "w").write("\n".join(lines))
  open(os.path.join(root, "voc_lt_val.txt"), "w").write(lines[0])
  source = multilabel_lt.MultilabelLtSource("voc_lt", root=root)
  assert source.splits == ("train", "val", "test") and source.num_examples("val") == 1


def test_registered_names(tmp_path):
  assert {"multilabel/coco_lt", "multilabel/voc_lt"} <= set(input_pipeline.SOURCE_NAMES)
  _voc(tmp_path, num_train=3, num_test=2, train_counts=[1] * 20)
  source = input_pipeline.get_source("multilabel/voc_lt", data_dir=str(tmp_path))
  assert isinstance(source, multilabel_lt.MultilabelLtSource) and source.name == "multilabel/voc_lt"
  with pytest.raises(ValueError, match="Unknown data source"):
    input_pipeline.get_source("multilabel/nus_lt", data_dir=str(tmp_path))


# ---------------------------------------------------------------- losses

def _np_bce(z, y):
  return -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))


Z = np.array([[1.5, -0.5, 0.3, -2.0], [0.2, 0.8, -1.2, 0.4], [-0.7, 2.1, 0.0, 1.1]])
Y = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)  # last image: no labels
FREQ, NUM_TRAIN = np.array([2, 5, 10, 40]), 50


def test_bce_mls_and_torch_parity():
  np.testing.assert_allclose(losses.bce_loss(Z, Y), _np_bce(Z, Y).mean(), rtol=1e-6)
  np.testing.assert_allclose(losses.multilabel_soft_margin_loss(Z, Y), _np_bce(Z, Y).mean(),
                             rtol=1e-6)
  big = np.array([[80.0, -90.0]])
  assert np.isfinite(losses.bce_loss(big, np.array([[0.0, 1.0]])))
  torch = pytest.importorskip("torch")
  z, y = torch.tensor(Z, dtype=torch.float32), torch.tensor(Y)
  np.testing.assert_allclose(losses.bce_loss(Z, Y), torch.nn.BCEWithLogitsLoss()(z, y).item(),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.multilabel_soft_margin_loss(Z, Y),
                             torch.nn.MultiLabelSoftMarginLoss()(z, y).item(), rtol=1e-6)
  # The embedding loss as train.py wires it (class_counts=None): caption[:, :T-m] against
  # prompt[:, m:], expanded to (B, C, T-m, D), torch.cosine_similarity, Σ_t y·(1 - cos).
  rng = np.random.default_rng(0)
  cap, prm = rng.normal(size=(4, 9, 6)), rng.normal(size=(3, 9, 6))
  y = (rng.random((4, 3)) < 0.5).astype(np.float32)
  m, (b, t, d), c = 2, cap.shape, prm.shape[0]
  a_t = torch.tensor(cap[:, :t - m], dtype=torch.float32)[:, None].expand(b, c, t - m, d)
  p_t = torch.tensor(prm[:, m:], dtype=torch.float32)[None].expand(b, c, t - m, d)
  x = 1 - torch.cosine_similarity(a_t, p_t, dim=-1)
  sign = (2 * torch.tensor(y) - 1)[:, :, None].expand(b, c, t - m)
  expected = torch.relu(0.2 - (x * sign).sum(2)).mean().item()
  np.testing.assert_allclose(losses.class_specific_embedding_loss(cap, prm, y, m_ctx=m), expected,
                             rtol=1e-5)


def test_asymmetric_loss_matches_the_seed_formula_and_stops_focal_gradient():
  p = 1 / (1 + np.exp(-Z))
  p_neg = np.minimum(1 - p + 0.05, 1)
  base = Y * np.log(np.maximum(p, 1e-8)) + (1 - Y) * np.log(np.maximum(p_neg, 1e-8))
  weight = (1 - p * Y - p_neg * (1 - Y)) ** (0 * Y + 4 * (1 - Y))
  np.testing.assert_allclose(losses.asymmetric_loss(Z, Y), -(base * weight).mean(), rtol=1e-6)
  fixed = jnp.asarray(weight, jnp.float32)

  def with_constant_weight(z):
    q = jax.nn.sigmoid(z)
    qn = jnp.minimum(1 - q + 0.05, 1)
    return -jnp.mean(fixed * (Y * jnp.log(q) + (1 - Y) * jnp.log(qn)))

  z = jnp.asarray(Z, jnp.float32)
  np.testing.assert_allclose(jax.grad(losses.asymmetric_loss)(z, Y),
                             jax.grad(with_constant_weight)(z), rtol=1e-5, atol=1e-7)


def test_rebalanced_cb_weights_and_ntr_bias_by_hand():
  w = np.asarray(losses.rebalanced_weights(Y, FREQ, alpha=0.1, beta=10.0, mu=0.2))
  r0 = (1 / FREQ) / (1 / 2 + 1 / 10)   # image 0: labels {0, 2}
  r1 = (1 / FREQ) / (1 / 5)            # image 1: label {1}
  sig = lambda x: 1 / (1 + np.exp(-x))
  np.testing.assert_allclose(w[0], 0.1 + sig(10 * (r0 - 0.2)), rtol=1e-6)
  np.testing.assert_allclose(w[1], 0.1 + sig(10 * (r1 - 0.2)), rtol=1e-6)
  np.testing.assert_allclose(w[2], 1.1)  # no labels: r = inf
  np.testing.assert_allclose(losses.class_balanced_weights(FREQ, beta=0.9),
                             0.1 / (1 - 0.9 ** FREQ), rtol=1e-6)
  np.testing.assert_allclose(
      losses.ntr_bias(FREQ, NUM_TRAIN, init_bias=0.05, neg_scale=5.0),
      -0.05 * np.log(NUM_TRAIN / FREQ - 1) / 5.0, rtol=1e-6)
  np.testing.assert_allclose(
      losses.ntr_bias(FREQ, NUM_TRAIN, init_bias=0.05, neg_scale=5.0, bias_over_neg_scale=False),
      -0.05 * np.log(NUM_TRAIN / FREQ - 1), rtol=1e-6)


def _np_db_parts(neg_scale, mu, bias_over=True):
  w = np.asarray(losses.rebalanced_weights(Y, FREQ, alpha=0.1, beta=10.0, mu=mu))
  bias = -0.05 * np.log(NUM_TRAIN / FREQ - 1) / (neg_scale if bias_over else 1)
  z = Z + bias
  z = np.where(Y > 0, z, neg_scale * z)
  w = np.where(Y > 0, w, w / neg_scale)
  return _np_bce(z, Y), w


def test_db_loss_lmpt_scalar_and_original_elementwise_by_hand():
  ell, w = _np_db_parts(neg_scale=5.0, mu=0.3)
  lmpt = 2.0 * (1 - np.exp(-ell.mean())) ** 2 * (w * ell).mean()
  original = (2.0 * (1 - np.exp(-ell)) ** 2 * w * ell).mean()
  got = losses.lmpt_db_loss(Z, Y, FREQ, NUM_TRAIN, neg_scale=5.0, map_mu=0.3)
  np.testing.assert_allclose(got, lmpt, rtol=1e-5)
  got = losses.lmpt_db_loss(Z, Y, FREQ, NUM_TRAIN, neg_scale=5.0, map_mu=0.3,
                            focal_reduction="elementwise")
  np.testing.assert_allclose(got, original, rtol=1e-5)
  voc = losses.make_classification_loss("dbl", class_freq=FREQ, num_train=NUM_TRAIN,
                                        dataset="voc_lt")
  np.testing.assert_allclose(voc(Z, Y), lmpt, rtol=1e-5)
  coco = losses.make_classification_loss("dbl", class_freq=FREQ, num_train=NUM_TRAIN,
                                         dataset="coco_lt")
  ell, w = _np_db_parts(neg_scale=2.0, mu=0.2)
  np.testing.assert_allclose(coco(Z, Y), 2.0 * (1 - np.exp(-ell.mean())) ** 2 * (w * ell).mean(),
                             rtol=1e-5)
  grad = jax.grad(lambda z: voc(z, Y))(jnp.asarray(Z, jnp.float32))
  assert np.all(np.isfinite(grad)) and np.any(grad[2] != 0)  # the label-less image trains too


def test_db_limiting_cases():
  bce = _np_bce(Z, Y).mean()
  plain = losses.resample_loss(Z, Y, FREQ, NUM_TRAIN, reweight=None, focal=False)
  np.testing.assert_allclose(plain, bce, rtol=1e-6)
  # Uniform counts, one label per image: every weight is α + σ(β(1 − μ)) -> a scaled BCE.
  single = np.eye(4, dtype=np.float32)[[0, 2, 3]]
  uniform = losses.resample_loss(Z, single, [7, 7, 7, 7], reweight="rebalance", focal=False)
  np.testing.assert_allclose(uniform, (0.1 + 1 / (1 + np.exp(-8.0))) * _np_bce(Z, single).mean(),
                             rtol=1e-6)
  # NTR with κ = 0 and ν = 1 changes nothing; focal γ = 0 with balance 1 is no focal.
  kw = dict(reweight="rebalance", map_mu=0.2)
  base = losses.resample_loss(Z, Y, FREQ, NUM_TRAIN, focal=False, **kw)
  np.testing.assert_allclose(
      losses.resample_loss(Z, Y, FREQ, NUM_TRAIN, focal=False, init_bias=0.0, neg_scale=1.0, **kw),
      base, rtol=1e-6)
  np.testing.assert_allclose(
      losses.resample_loss(Z, Y, FREQ, NUM_TRAIN, focal=True, focal_gamma=0.0, **kw), base,
      rtol=1e-6)
  np.testing.assert_allclose(losses.focal_loss(Z, Y, gamma=0.0), bce, rtol=1e-6)
  ell = _np_bce(Z, Y)
  np.testing.assert_allclose(
      losses.focal_loss(Z, Y, gamma=2.0, alpha=0.25),
      (np.where(Y > 0, 0.25, 0.75) * (1 - np.exp(-ell)) ** 2 * ell).mean(), rtol=1e-5)


def test_every_seed_loss_option():
  def bl_reference(reweight, ntr, focal, loss_weight, neg_scale=2.0, mu=0.2):
    w = {None: np.ones_like(Z),
         "rebalance": np.asarray(losses.rebalanced_weights(Y, FREQ, alpha=0.1, beta=10.0, mu=mu)),
         "cb": np.broadcast_to(0.1 / (1 - 0.9 ** FREQ), Z.shape)}[reweight]
    z = Z
    if ntr:
      z = np.where(Y > 0, Z - 0.05 * np.log(NUM_TRAIN / FREQ - 1),
                   neg_scale * (Z - 0.05 * np.log(NUM_TRAIN / FREQ - 1)))
      if reweight is not None:
        w = np.where(Y > 0, w, w / neg_scale)
    ell = _np_bce(z, Y)
    if not focal:
      return loss_weight * (w * ell).mean()
    return loss_weight * (0.5 * (1 - np.exp(-ell)) ** 2 * w * ell).mean()

  expected = {"FL": bl_reference(None, False, True, 1.0),
              "CBloss": bl_reference("cb", False, True, 10.0),
              "R-BCE-Focal": bl_reference("rebalance", False, True, 1.0),
              "NTR-Focal": bl_reference(None, True, True, 1.0),
              "DBloss-noFocal": bl_reference("rebalance", True, False, 0.5),
              "CBloss-ntr": bl_reference("cb", True, True, 10.0),
              "DBloss": bl_reference("rebalance", True, True, 1.0)}
  for name in losses.CLASSIFICATION_LOSSES:
    fn = losses.make_classification_loss(name, class_freq=FREQ, num_train=NUM_TRAIN,
                                         dataset="coco_lt", neg_scale=2.0, gamma=0.2)
    value = jax.jit(fn)(jnp.asarray(Z, jnp.float32), Y)
    assert np.isfinite(value), name
    if name in expected:
      np.testing.assert_allclose(value, expected[name], rtol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="dataset=None"):
    losses.make_classification_loss("dbl", class_freq=FREQ, num_train=NUM_TRAIN)
  with pytest.raises(ValueError, match="needs class_freq"):
    losses.make_classification_loss("DBloss")
  with pytest.raises(ValueError, match="Unknown loss_function 'hinge'"):
    losses.make_classification_loss("hinge")
  with pytest.raises(ValueError, match="class 1 has 0"):
    losses.make_classification_loss("DBloss", class_freq=[3, 0], num_train=10)
  with pytest.raises(ValueError, match="below num_train=10"):
    losses.make_classification_loss("DBloss", class_freq=[3, 10], num_train=10)


def _np_cse(cap, prm, y, m, margins, weights, sign="as_coded"):
  length = cap.shape[1] - m
  d = np.zeros(y.shape)
  for b in range(cap.shape[0]):
    for c in range(prm.shape[0]):
      for t in range(length):
        u, v = cap[b, t], prm[c, t + m]
        d[b, c] += 1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
  if sign == "as_coded":
    hinge = np.maximum(0, margins - (2 * y - 1) * d)
  else:
    hinge = np.where(y > 0, d, np.maximum(0, margins - d))
  return (hinge * weights).mean()


def test_class_specific_embedding_loss_by_hand():
  rng = np.random.default_rng(0)
  cap, prm = rng.normal(size=(2, 5, 3)), rng.normal(size=(3, 5, 3))
  y = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
  counts = np.array([3.0, 1.0, 2.0])
  margins = 0.2 / counts ** 0.25
  weights = counts ** -2 / np.sum(counts ** -2)
  got = losses.class_specific_embedding_loss(cap, prm, y, counts, m_ctx=2)
  np.testing.assert_allclose(got, _np_cse(cap, prm, y, 2, margins, weights), rtol=1e-5)
  np.testing.assert_allclose(losses.class_specific_embedding_loss(cap, prm, y, m_ctx=1),
                             _np_cse(cap, prm, y, 1, 0.2, 1.0), rtol=1e-5)
  got = losses.class_specific_embedding_loss(cap, prm, y, counts, m_ctx=2, gamma=0.5,
                                             sign="hinge_embedding")
  weights_half = counts ** -0.5 / np.sum(counts ** -0.5)
  np.testing.assert_allclose(
      got, _np_cse(cap, prm, y, 2, margins, weights_half, "hinge_embedding"), rtol=1e-5)
  # The released softmax over counts: finite on tiny counts, NaN on real ones (issues #5, #7).
  q = np.exp(counts - 3) / np.exp(counts - 3).sum()
  got = losses.class_specific_embedding_loss(cap, prm, y, counts, m_ctx=2,
                                             count_transform="softmax")
  np.testing.assert_allclose(
      got, _np_cse(cap, prm, y, 2, 0.2 / q ** 0.25, q ** -2 / np.sum(q ** -2)), rtol=1e-5)
  margins, weights = losses.cse_margins_and_weights(VOC_COUNTS, count_transform="softmax")
  assert np.isinf(margins).sum() == 19 and np.isnan(weights).sum() == 19
  _, weights = losses.cse_margins_and_weights(VOC_COUNTS)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
  assert np.argmax(weights) == np.argmin(VOC_COUNTS)
  # Gradient reaches only prompt positions >= m_ctx.
  grad = jax.grad(lambda p: losses.class_specific_embedding_loss(cap, p, y, counts, m_ctx=2,
                                                                 sign="hinge_embedding"))(
      jnp.asarray(prm, jnp.float32))
  assert not np.any(grad[:, :2]) and np.any(grad[:, 2:])
  np.testing.assert_allclose(losses.lmpt_loss(2.0, 4.0, lam=0.25), 3.5)
  with pytest.raises(ValueError, match="m_ctx=5"):
    losses.class_specific_embedding_loss(cap, prm, y, counts, m_ctx=5)


# ---------------------------------------------------------------- metrics


def test_average_precision_matches_sklearn_with_ties_and_empty_classes():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  labels = (rng.random((300, 12)) < 0.2).astype(np.float32)
  labels[:, 11] = 0                                   # a class with no positive
  labels[:, 10] = 0
  labels[7, 10] = 1                                   # a single positive
  for scores in (rng.random((300, 12)),               # continuous
                 np.round(rng.random((300, 12)), 1),  # many ties
                 np.full((300, 12), 0.5)):            # all tied
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      expected = sklearn_metrics.average_precision_score(labels, scores, average=None)
    mean_ap, aps = multilabel_metrics.mean_average_precision(labels, scores)
    np.testing.assert_allclose(aps, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean_ap, expected.mean(), rtol=1e-12)
  # A tie between a positive and a negative counts as one step: AP = 1/2 · 1/2 + 1/2 · 2/3.
  ap = multilabel_metrics.average_precision([[1], [0], [1], [0]], [[0.9], [0.5], [0.5], [0.1]])
  np.testing.assert_allclose(ap, [0.5 * 1 + 0.5 * 2 / 3])
  with pytest.raises(ValueError, match="NaN"):
    multilabel_metrics.average_precision([[1]], [[np.nan]])


def test_threshold_metrics_and_groups_by_hand():
  labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
  scores = np.array([[0.5, 0.4, 0.1], [0.2, 0.6, 0.2], [0.35, 0.3, 0.35], [0.3, 0.1, 0.6]])
  # > 0.3 (strict): predictions [[1,1,0],[0,1,0],[1,0,1],[0,0,1]].
  # class 0: tp 1 fp 1 fn 1; class 1: tp 1 fp 1 fn 1; class 2: tp 1 fp 1 fn 0.
  got = multilabel_metrics.threshold_metrics(labels, scores, 0.3)
  p, r = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 1.0])
  f = 2 * p * r / (p + r)
  expected = {"CP": p.mean(), "CR": r.mean(), "CF1": f.mean(), "OP": 3 / 6, "OR": 3 / 5,
              "OF1": 2 * 0.5 * 0.6 / 1.1}
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
  none = multilabel_metrics.threshold_metrics(labels, scores, 0.9)  # nothing predicted
  assert none == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}

  groups = multilabel_lt.class_groups(VOC_COUNTS)
  aps = np.arange(20) / 20
  got = multilabel_metrics.group_mean_ap(aps, groups)
  for group, ids in (("head", [4, 6, 8, 10, 14, 15]), ("medium", [1, 7, 11, 13, 17, 19]),
                     ("tail", [0, 2, 3, 5, 9, 12, 16, 18])):
    np.testing.assert_array_equal(groups[group], ids)
    np.testing.assert_allclose(got[group], aps[ids].mean())
  assert np.isnan(multilabel_metrics.group_mean_ap(aps, {"empty": np.array([], int)})["empty"])

  logits = np.log(scores) + 3.0  # softmax(log s + const) = s / Σ s = s (rows sum to 1)
  report = multilabel_metrics.evaluate(labels, logits, {"all": np.arange(3)}, threshold=0.3)
  np.testing.assert_allclose(report["CF1"], expected["CF1"], rtol=1e-9)
  np.testing.assert_allclose(report["mAP"], report["all_mAP"])
  np.testing.assert_allclose(
      report["mAP"], multilabel_metrics.mean_average_precision(labels, scores)[0], rtol=1e-12)
