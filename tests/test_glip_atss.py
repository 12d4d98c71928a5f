"""GLIP anchors, box coding, ATSS assignment and losses (`jaxprompt.models.glip.{boxes,atss}`).

Hand-computed anchors / codes / IoUs, ATSS on hand-made boxes, and the losses and their gradients
against a PyTorch reference written here from microsoft/GLIP's formulas
(`modeling/rpn/loss.py::ATSSLossComputation`, `layers/sigmoid_focal_loss.py`, the VLDyHead
`BoxCoder`), one image at a time with variable-length GT lists as the original.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprompt.models.glip import atss, boxes

# A 128x128 image with the GLIP anchor geometry: P3..P7 = 16², 8², 4², 2², 1² (341 anchors); the
# last two levels have fewer than 9 anchors.
LEVEL_SHAPES = ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))
LEVEL_SIZES = boxes.level_sizes(LEVEL_SHAPES)
ANCHORS = boxes.anchors(LEVEL_SHAPES)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


# ------------------------------------------------------------------------------------ boxes.py
def test_anchors_legacy_geometry_and_order():
  assert ANCHORS.shape == (341, 4) and ANCHORS.dtype == np.float32
  assert LEVEL_SIZES == (256, 64, 16, 4, 1)
  np.testing.assert_array_equal(ANCHORS[0], [-28, -28, 35, 35])  # stride 8, size 64
  np.testing.assert_array_equal(ANCHORS[1], [-20, -28, 43, 35])  # x moves first (row-major)
  np.testing.assert_array_equal(ANCHORS[16], [-28, -20, 35, 43])  # next row
  np.testing.assert_array_equal(ANCHORS[256], [-56, -56, 71, 71])  # stride 16: 7.5 -/+ 63.5
  np.testing.assert_array_equal(ANCHORS[256 + 64 + 16 + 4], [-448, -448, 575, 575])  # P7
  widths = ANCHORS[:, 2] - ANCHORS[:, 0] + 1
  np.testing.assert_array_equal(np.unique(widths), [64, 128, 256, 512, 1024])
  with pytest.raises(ValueError, match="level shapes"):
    boxes.anchors(LEVEL_SHAPES[:4])


def test_encode_decode_hand_values_and_round_trip():
  anchor = jnp.array([[0.0, 0.0, 9.0, 9.0]])  # w = h = 10, centre 4.5
  gt = jnp.array([[2.0, 4.0, 13.0, 23.0]])  # w 12, h 20, centre (7.5, 13.5)
  codes = jax.jit(boxes.encode)(gt, anchor)
  np.testing.assert_allclose(codes[0], [10 * 3 / 10, 10 * 9 / 10, 5 * math.log(1.2),
                                        5 * math.log(2.0)], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(boxes.decode)(codes, anchor), gt, atol=1e-5)
  # Zero deltas give the anchor back (corners at centre -/+ (w - 1) / 2).
  np.testing.assert_allclose(boxes.decode(jnp.zeros((1, 4)), anchor), anchor, atol=1e-6)
  # dw, dh are clamped at log(1000/16): width 10 * 1000/16 = 625 around centre 4.5.
  huge = boxes.decode(jnp.array([[0.0, 0.0, 100.0, 100.0]]), anchor)
  np.testing.assert_allclose(huge[0], [4.5 - 312, 4.5 - 312, 4.5 + 312, 4.5 + 312], rtol=1e-5)
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, (50, 2))
  gts = np.concatenate([xy, xy + rng.uniform(1, 80, (50, 2))], 1).astype(np.float32)
  np.testing.assert_allclose(boxes.decode(boxes.encode(gts, ANCHORS[:50]), ANCHORS[:50]), gts,
                             atol=2e-4)


def test_pairwise_iou_plus_one_areas_and_clip():
  a = jnp.array([[0.0, 0.0, 9.0, 9.0]])
  b = jnp.array([[5.0, 5.0, 14.0, 14.0], [0.0, 0.0, 9.0, 9.0], [10.0, 0.0, 19.0, 9.0],
                 [9.0, 9.0, 9.0, 9.0]])
  # 5x5 overlap of two 10x10 boxes; identical; touching edge (no shared pixel); a 1-pixel box.
  np.testing.assert_allclose(jax.jit(boxes.pairwise_iou)(a, b)[0], [25 / 175, 1, 0, 1 / 100],
                             rtol=1e-6)
  clipped = boxes.clip_to_image(jnp.array([[-3.0, -2.0, 50.0, 70.0]]), jnp.array([60, 40]))
  np.testing.assert_array_equal(clipped[0], [0, 0, 39, 59])  # (h, w) = (60, 40): x <= 39


# ------------------------------------------------------------------ PyTorch reference (original)
def torch_iou(a, b):
  area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
  area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
  lt = torch.max(a[:, None, :2], b[:, :2])
  rb = torch.min(a[:, None, 2:], b[:, 2:])
  wh = (rb - lt + 1).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area_a[:, None] + area_b - inter)


def torch_encode(gt, anc):
  aw, ah = anc[:, 2] - anc[:, 0] + 1, anc[:, 3] - anc[:, 1] + 1
  gw, gh = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
  acx, acy = (anc[:, 2] + anc[:, 0]) / 2, (anc[:, 3] + anc[:, 1]) / 2
  gcx, gcy = (gt[:, 2] + gt[:, 0]) / 2, (gt[:, 3] + gt[:, 1]) / 2
  return torch.stack([10 * (gcx - acx) / aw, 10 * (gcy - acy) / ah, 5 * torch.log(gw / aw),
                      5 * torch.log(gh / ah)], 1)


def torch_decode(d, anc):
  aw, ah = anc[:, 2] - anc[:, 0] + 1, anc[:, 3] - anc[:, 1] + 1
  acx, acy = (anc[:, 2] + anc[:, 0]) / 2, (anc[:, 3] + anc[:, 1]) / 2
  dw = torch.clamp(d[:, 2] / 5, max=math.log(1000 / 16))
  dh = torch.clamp(d[:, 3] / 5, max=math.log(1000 / 16))
  cx, cy = d[:, 0] / 10 * aw + acx, d[:, 1] / 10 * ah + acy
  w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
  return torch.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1),
                      cy + 0.5 * (h - 1)], 1)


def torch_assign(anchors, level_sizes, gt, top_k=9):
  """`prepare_targets` of one image with only its real GTs: (matched index, positive)."""
  num_gt = len(gt)
  ious = torch_iou(anchors, gt)
  gt_points = torch.stack([(gt[:, 2] + gt[:, 0]) / 2, (gt[:, 3] + gt[:, 1]) / 2], 1)
  acx, acy = (anchors[:, 2] + anchors[:, 0]) / 2, (anchors[:, 3] + anchors[:, 1]) / 2
  points = torch.stack([acx, acy], 1)
  distances = (points[:, None, :] - gt_points[None]).pow(2).sum(-1).sqrt()
  candidates, start = [], 0
  for size in level_sizes:
    _, idx = distances[start:start + size].topk(min(top_k, size), dim=0, largest=False)
    candidates.append(idx + start)
    start += size
  candidates = torch.cat(candidates, 0)  # (K, M)
  cols = torch.arange(num_gt).expand_as(candidates)
  cand_ious = ious[candidates, cols]
  is_pos = cand_ious >= (cand_ious.mean(0) + cand_ious.std(0))[None]
  sides = torch.stack([acx[candidates] - gt[:, 0], acy[candidates] - gt[:, 1],
                       gt[:, 2] - acx[candidates], gt[:, 3] - acy[candidates]], 1)
  is_pos &= sides.min(dim=1)[0] > 0.01
  ious_inf = torch.full_like(ious, -1e8)
  ious_inf[candidates[is_pos], cols[is_pos]] = ious[candidates[is_pos], cols[is_pos]]
  values, matched = ious_inf.max(dim=1)
  return matched, values != -1e8


def torch_losses(anchors, level_sizes, batch, logits, deltas, ctr_logits):
  """ATSSLossComputation.__call__ on one process (normalisers max(P, 1), sum of centerness)."""
  anchors = torch.tensor(anchors)
  token_targets, box_targets, positives = [], [], []
  for i in range(batch["boxes"].shape[0]):
    valid = torch.tensor(batch["box_mask"][i])
    gt = torch.tensor(batch["boxes"][i])[valid]
    pmap = torch.tensor(batch["positive_map"][i])[valid] > 0
    matched, positive = torch_assign(anchors, level_sizes, gt)
    tokens = pmap[matched].float()
    no_object = torch.zeros(tokens.shape[1])
    no_object[-1] = 1
    tokens[~positive] = no_object
    token_targets.append(tokens)
    box_targets.append(torch_encode(gt[matched], anchors))
    positives.append(positive)
  token_targets = torch.stack(token_targets)
  positive = torch.cat(positives)
  num_pos = max(float(positive.sum()), 1.0)
  # token_sigmoid_binary_focal_loss (fvcore form), masked_select on the text mask.
  mask = (torch.tensor(batch["text_mask"]) > 0)[:, None, :].expand_as(logits)
  x, t = torch.masked_select(logits, mask), torch.masked_select(token_targets, mask)
  p = torch.sigmoid(x)
  ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
  p_t = p * t + (1 - p) * (1 - t)
  focal = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
  loss_token = focal.sum() / num_pos
  reg_t = torch.cat(box_targets)[positive]
  anc = anchors.repeat(len(positives), 1)[positive]
  pred_d = deltas.reshape(-1, 4)[positive]
  ctr = ctr_logits.reshape(-1)[positive]
  if positive.sum() == 0:
    return loss_token, pred_d.sum(), ctr.sum()
  gts = torch_decode(reg_t, anc)  # compute_centerness_targets
  cx, cy = (anc[:, 2] + anc[:, 0]) / 2, (anc[:, 3] + anc[:, 1]) / 2
  lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], 1)
  tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], 1)
  ctr_t = torch.sqrt(lr.min(1)[0] / lr.max(1)[0] * tb.min(1)[0] / tb.max(1)[0])
  pred = torch_decode(pred_d, anc)  # GIoULoss
  px1, py1 = pred[:, 0], pred[:, 1]
  px2, py2 = torch.max(px1, pred[:, 2]), torch.max(py1, pred[:, 3])
  tx1, ty1, tx2, ty2 = gts.unbind(1)
  ix1, iy1, ix2, iy2 = torch.max(px1, tx1), torch.max(py1, ty1), torch.min(px2, tx2), \
      torch.min(py2, ty2)
  inter = torch.zeros_like(px1)
  ok = (iy2 > iy1) & (ix2 > ix1)
  inter[ok] = (ix2[ok] - ix1[ok]) * (iy2[ok] - iy1[ok])
  enclosing = (torch.max(px2, tx2) - torch.min(px1, tx1)) * (torch.max(py2, ty2) -
                                                             torch.min(py1, ty1)) + 1e-7
  union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter + 1e-7
  giou = inter / union - (enclosing - union) / enclosing
  loss_reg = 2.0 * ((1 - giou) * ctr_t).sum() / ctr_t.sum()
  loss_ctr = torch.nn.functional.binary_cross_entropy_with_logits(ctr, ctr_t, reduction="sum")
  return loss_token, loss_reg, loss_ctr / num_pos


def random_boxes(rng, count, image=128.0):
  xy = rng.uniform(-5.0, image - 20.0, (count, 2))
  wh = rng.uniform(8.0, 90.0, (count, 2))
  return np.concatenate([xy, np.minimum(xy + wh, image - 1.0)], 1).astype(np.float32)


def make_batch(rng, num_real=(3, 2), max_boxes=4, num_tokens=8, text_len=(6, 8)):
  batch_size = len(num_real)
  batch = dict(boxes=np.zeros((batch_size, max_boxes, 4), np.float32),
               box_mask=np.zeros((batch_size, max_boxes), bool),
               positive_map=np.zeros((batch_size, max_boxes, num_tokens), np.float32),
               text_mask=np.zeros((batch_size, num_tokens), np.int32))
  for i, (n, length) in enumerate(zip(num_real, text_len)):
    batch["boxes"][i, :n] = random_boxes(rng, n)
    batch["boxes"][i, n:] = [-7.0, 3.0, -50.0, 1.0]  # garbage padding rows
    batch["box_mask"][i, :n] = True
    for j in range(n):
      first = rng.integers(1, length - 2)
      batch["positive_map"][i, j, first:first + rng.integers(1, 3)] = 1.0
    batch["text_mask"][i, :length] = 1
  return batch


# ---------------------------------------------------------------------------------- assignment
assign_jit = jax.jit(atss.assign, static_argnums=(1, 4))


def test_assign_hand_case_small_levels_and_ignored_padding():
  # Levels of 4 and 1 anchors (< top_k = 9). Level 0: 16-px anchors centred at 3.5 / 11.5,
  # level 1: one 32-px anchor [-8, -8, 23, 23]. The GT equals that anchor: candidate IoUs are
  # 256/1024 = 0.25 for the four level-0 anchors and 1 for the level-1 one, so the threshold is
  # mean 0.4 + unbiased std sqrt(0.45 / 4) = 0.735 and only the level-1 anchor is positive.
  anchors = boxes.anchors(((2, 2), (1, 1)), strides=(8, 16), sizes=(16, 32))
  np.testing.assert_array_equal(anchors[4], [-8, -8, 23, 23])
  gt = np.array([[-8, -8, 23, 23], [5, 5, -40, 2]], np.float32)  # second row: padding garbage
  matched, positive = assign_jit(anchors, (4, 1), gt, np.array([True, False]), 9)
  np.testing.assert_array_equal(positive, [False] * 4 + [True])
  np.testing.assert_array_equal(matched, [0] * 5)
  # The padding row may even be a copy of the real GT: still nobody's match.
  matched, positive = assign_jit(anchors, (4, 1), gt[[0, 0]], np.array([False, True]), 9)
  np.testing.assert_array_equal(positive, [False] * 4 + [True])
  np.testing.assert_array_equal(matched, [0, 0, 0, 0, 1])
  # GT [-8, -8, 14, 14] (23 x 23 = 529 px): IoUs 256/529 = 0.484, 176/609 = 0.289 (twice),
  # 121/664 = 0.182 and 529/1024 = 0.517; mean 0.352 + unbiased std 0.143 = 0.495 keeps only the
  # level-1 anchor (the biased std 0.127 would also keep anchor 0 at 0.484).
  gt = np.array([[-8, -8, 14, 14]], np.float32)
  np.testing.assert_allclose(boxes.pairwise_iou(anchors, gt)[:, 0],
                             [256 / 529, 176 / 609, 176 / 609, 121 / 664, 529 / 1024], rtol=1e-6)
  _, positive = assign_jit(anchors, (4, 1), gt, np.array([True]), 9)
  np.testing.assert_array_equal(positive, [False] * 4 + [True])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assign_matches_torch_reference_and_ignores_padding(seed):
  rng = np.random.default_rng(seed)
  gt = random_boxes(rng, 5)
  gt[0] = [0.3, 0.6, 21.7, 30.2]  # near the border
  ref_matched, ref_positive = torch_assign(torch.tensor(ANCHORS), LEVEL_SIZES, torch.tensor(gt))
  padded = np.concatenate([gt, np.array([[3, 3, -9, -9], [0, 0, 0, 0]], np.float32)])
  valid = np.array([True] * 5 + [False] * 2)
  matched, positive = assign_jit(ANCHORS, LEVEL_SIZES, padded, valid, 9)
  np.testing.assert_array_equal(positive, ref_positive.numpy())
  np.testing.assert_array_equal(np.where(positive, matched, -1),
                                np.where(ref_positive.numpy(), ref_matched.numpy(), -1))
  assert positive[:].sum() > 0 and np.all(matched < 5)
  # Positive anchors have their centre strictly inside their GT.
  centres = (ANCHORS[:, :2] + ANCHORS[:, 2:]) / 2
  own = gt[np.asarray(matched)]
  inside = np.minimum(centres - own[:, :2], own[:, 2:] - centres).min(1) > 0.01
  assert np.all(inside[np.asarray(positive)])
  # The border GT gets positives.
  assert np.any(np.asarray(positive) & (np.asarray(matched) == 0))


def test_assign_tie_break_takes_the_largest_iou():
  g1 = np.array([10.0, 10.0, 70.0, 70.0], np.float32)
  g2 = np.array([14.0, 12.0, 76.0, 79.0], np.float32)
  both = np.stack([g1, g2])
  ones = np.ones((1,), bool)
  _, pos1 = assign_jit(ANCHORS, LEVEL_SIZES, g1[None], ones, 9)
  _, pos2 = assign_jit(ANCHORS, LEVEL_SIZES, g2[None], ones, 9)
  matched, positive = assign_jit(ANCHORS, LEVEL_SIZES, both, np.ones((2,), bool), 9)
  pos1, pos2, matched, positive = map(np.asarray, (pos1, pos2, matched, positive))
  shared = pos1 & pos2
  assert shared.sum() > 0  # the case under test happens
  np.testing.assert_array_equal(positive, pos1 | pos2)
  ious = np.asarray(boxes.pairwise_iou(ANCHORS, both))
  np.testing.assert_array_equal(matched[shared], np.argmax(ious[shared], 1))
  assert np.all(matched[pos1 & ~pos2] == 0) and np.all(matched[pos2 & ~pos1] == 1)
  # Two identical GTs: the first one wins every tie.
  matched, positive = assign_jit(ANCHORS, LEVEL_SIZES, np.stack([g2, g2]), np.ones((2,), bool), 9)
  np.testing.assert_array_equal(positive, pos2)
  assert np.all(np.asarray(matched) == 0)


# -------------------------------------------------------------------------------------- losses
losses_jit = jax.jit(atss.glip_losses, static_argnums=(3,))


def random_outputs(rng, batch_size, num_tokens):
  n = ANCHORS.shape[0]
  return dict(token_logits=rng.normal(-2.0, 2.0, (batch_size, n, num_tokens)).astype(np.float32),
              box_regression=rng.normal(0.0, 0.5, (batch_size, n, 4)).astype(np.float32),
              centerness=rng.normal(0.0, 1.0, (batch_size, n)).astype(np.float32))


def test_losses_and_gradients_match_torch_reference():
  rng = np.random.default_rng(3)
  batch = make_batch(rng)
  outputs = random_outputs(rng, 2, 8)
  got = losses_jit(outputs, batch, ANCHORS, LEVEL_SIZES)
  torch_out = {k: torch.tensor(v, requires_grad=True) for k, v in outputs.items()}
  ref = torch_losses(ANCHORS, LEVEL_SIZES, batch, torch_out["token_logits"],
                     torch_out["box_regression"], torch_out["centerness"])
  for name, value in zip(("loss_token", "loss_reg", "loss_centerness"), ref):
    assert rel_err(got[name], value.detach().numpy()) <= 1e-5, name
    assert float(value.detach()) > 0, name
  total = sum(ref)
  assert rel_err(got["total"], total.detach().numpy()) <= 1e-5
  total.backward()
  grads = jax.jit(jax.grad(lambda o: atss.glip_losses(o, batch, ANCHORS, LEVEL_SIZES)["total"]))(
      outputs)
  for key in outputs:
    assert rel_err(grads[key], torch_out[key].grad.numpy()) <= 1e-4, key
  # Image 1's text mask covers all 8 tokens, so its negatives learn the no-object slot.
  targets = atss.build_targets(ANCHORS, LEVEL_SIZES, batch["boxes"], batch["box_mask"],
                               batch["positive_map"])
  negative = ~np.asarray(targets["positive"])
  np.testing.assert_array_equal(np.asarray(targets["token_targets"])[negative],
                                np.eye(8, dtype=np.float32)[[7] * negative.sum()])


def test_losses_without_positives_and_nan_guard():
  rng = np.random.default_rng(4)
  batch = make_batch(rng)
  batch["box_mask"][:] = False
  outputs = random_outputs(rng, 2, 8)
  got = losses_jit(outputs, batch, ANCHORS, LEVEL_SIZES)
  assert float(got["loss_reg"]) == 0.0 and float(got["loss_centerness"]) == 0.0
  # Every pair is a negative except the no-object slot of image 1; normaliser max(0, 1) = 1.
  x = outputs["token_logits"].astype(np.float64)
  t = np.zeros_like(x)
  t[..., 7] = 1.0
  p = 1 / (1 + np.exp(-x))
  ce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
  focal = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - (p * t + (1 - p) * (1 - t))) ** 2
  expected = (focal * (batch["text_mask"][:, None, :] > 0)).sum()
  assert rel_err(got["loss_token"], expected) <= 1e-5
  np.testing.assert_allclose(got["total"], got["loss_token"])
  outputs["token_logits"][0, 0, 0] = np.nan
  got = losses_jit(outputs, batch, ANCHORS, LEVEL_SIZES)
  assert np.isnan(got["loss_token"]) and float(got["total"]) == 0.0


def test_losses_reject_bad_inputs():
  rng = np.random.default_rng(5)
  batch = make_batch(rng)
  outputs = random_outputs(rng, 2, 8)
  with pytest.raises(ValueError, match="positive_map"):
    atss.glip_losses(outputs, {k: v for k, v in batch.items() if k != "positive_map"}, ANCHORS,
                     LEVEL_SIZES)
  with pytest.raises(ValueError, match="centerness"):
    atss.glip_losses(dict(outputs, centerness=outputs["centerness"][:, :5]), batch, ANCHORS,
                     LEVEL_SIZES)
  with pytest.raises(ValueError, match="level_sizes"):
    atss.glip_losses(outputs, batch, ANCHORS, (256, 64, 16, 4))
