"""Multi-label losses of LMPT: the `--loss_function` options and the class-specific embedding loss.

Pure jnp functions of (logits (B, C), multi-hot labels (B, C)) -> a scalar. Class counts
(`class_freq`, int [C], positive training images per class) and the number of training images
(`num_train`) are dataset constants: pass host arrays (numpy / lists), not traced values.
Follows LMPT (Xia et al.; Richard88888/LMPT) `lmpt/train.py`, `lmpt/dbl.py`, `lmpt/asl.py`,
`lmpt/csel.py`, `lmpt/bl.py` + `lmpt/loss_functions.py`, and the DB loss of Wu et al. (ECCV 2020,
wutong16/DistributionBalancedLoss `mllt/models/losses/resample_loss.py`).

`--loss_function` (`make_classification_loss(name, ...)`; ℓ = element-wise BCE with logits):

  bce             nn.BCEWithLogitsLoss: mean ℓ.
  mls             nn.MultiLabelSoftMarginLoss: batch mean of the class-mean ℓ, the same number.
  asl             asl.py AsymmetricLossOptimized(gamma_neg=4, gamma_pos=0, clip=0.05), focusing
                  weight without gradient, **mean** over elements (the ASL paper sums).
  dbl             dbl.py ResampleLoss as train.py builds it (the LMPT recipe): re-balanced weights
                  (α 0.1, β 10, μ 0.2 COCO-LT / 0.3 VOC-LT), NTR (κ 0.05, ν 2.0 COCO-LT / 5.0
                  VOC-LT, bias divided by ν), focal γ 2 with balance 2.0, LMPT's scalar focal
                  reduction (below). Hard-coded per dataset: `--neg_scale`, `--gamma` don't reach it.
  FL, CBloss, R-BCE-Focal, NTR-Focal, DBloss-noFocal, CBloss-ntr, DBloss
                  loss_functions.py with bl.py (BalancedLossNLP's ResampleLoss): element-wise focal
                  with α_t = 0.5 and no balance factor, NTR bias *not* divided by ν, map μ =
                  `--gamma`, ν = `--neg_scale`, CB weights (1-β)/(1-β^n_c) with β 0.9, loss
                  weights 10 for the CB options and 0.5 for DBloss-noFocal. Argparse offers these
                  names but train.py never builds them (loss_functions.py is a fragment).

The pieces (Wu et al. §3): with n_c = class_freq, N = num_train,
  re-balanced weight   r_kc = (1/n_c) / Σ_i y_ki/n_i,  w_kc = α + sigmoid(β (r_kc − μ))
                       (a sample with no labels has r = ∞, w = α + 1);
  NTR                  b_c = −κ log(N/n_c − 1) [/ν];  z' = z + b;  negatives: z'' = ν z', w' = w/ν;
  focal (element)      mean[ balance · α_t · (1 − e^{−ℓ})^γ · w'·ℓ ]   (wutong16, bl.py);
  focal (LMPT scalar)  balance · (1 − e^{−mean ℓ})^γ · mean(w'·ℓ): dbl.py's BCE helper ignores
                       reduction='none' and always averages, so pt is one number per batch.

Class-specific embedding loss (`class_specific_embedding_loss`, csel.py
SoftMarginHingeEmbeddingLoss as train.py calls it): caption token embeddings (B, 77, D) against
the class prompts' input token embeddings (C, 77, D), caption position t with prompt position
t + m (m = `m_ctx`), t < 77 − m:
  D_bc = Σ_t [1 − cos(e^cap_bt, e^prompt_c,t+m)],  s_bc = (2 y_bc − 1) D_bc,
  q = counts(class_freq),  margin_c = 0.2 / q_c^{1/4},  w_c = q_c^{−γ} / Σ_j q_j^{−γ} (γ = 2),
  L_cse = mean_bc w_c · max(0, margin_c − s_bc),        L = λ L_cls + (1 − λ) L_cse (λ 0.5).

Where the released code breaks, and what is done here:
  * csel.py normalises the weights with a sum over dim 2 of a 2-D tensor (IndexError, LMPT issue
    #2); the sum is over classes here (the repair of issue #7).
  * train.py passes softmax(class_freq) as the counts; over raw counts (4..1128) the softmax
    underflows to zeros, giving infinite margins and NaN weights (issues #5, #7).
    `count_transform='raw'` (default: the maintainer's own example in issue #4 passes raw counts)
    uses class_freq as is; 'softmax' is the released behaviour, NaN on the real counts.
  * As coded, a positive class is penalised only while its summed distance is below the margin
    and every negative class costs margin + D, pulling negative prompts toward the caption.
    `sign='as_coded'` (default) keeps that; `sign='hinge_embedding'` is torch's
    HingeEmbeddingLoss on D: D for positives, max(0, margin − D) for negatives.
  * loss_functions.py sets N = len(train_loader), the number of *batches*, so log(N/n − 1) is
    NaN for frequent classes; `num_train` here is the number of training images.
  * cosine as torch.cosine_similarity: each vector divided by max(‖v‖, 1e-8), in float32 (the
    seed casts its fp16 embeddings to float32 first).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# dbl.py as train.py builds it, per dataset (the values of wutong16's configs).
SEED_DBL_SETTINGS = {
    "coco_lt": dict(neg_scale=2.0, map_mu=0.2),
    "voc_lt": dict(neg_scale=5.0, map_mu=0.3),
}
CLASSIFICATION_LOSSES = ("bce", "mls", "asl", "dbl", "FL", "CBloss", "R-BCE-Focal", "NTR-Focal",
                         "DBloss-noFocal", "CBloss-ntr", "DBloss")
CSE_MARGIN = 0.2  # train.py: SoftMarginHingeEmbeddingLoss(margin=0.2, ...)
CSE_GAMMA = 2.0   # csel.py default; train.py does not pass --gamma


def _counts(class_freq, num_train: int | None = None) -> np.ndarray:
  """class_freq as float32 (C,), checked: a host array of positive counts below num_train."""
  counts = np.asarray(class_freq, np.float64)
  if counts.ndim != 1 or not counts.size:
    raise ValueError(f"class_freq must be a 1-D array of per-class counts; got shape "
                     f"{counts.shape}.")
  if np.any(counts <= 0):
    raise ValueError(f"class_freq must be positive (class {int(np.argmin(counts))} has "
                     f"{counts.min():g} training images): the weights divide by it.")
  if num_train is not None and np.any(counts >= num_train):
    raise ValueError(f"class_freq must be below num_train={num_train} (class "
                     f"{int(np.argmax(counts))} has {counts.max():g}): the NTR bias is "
                     "log(num_train / n - 1).")
  return counts.astype(np.float32)


def binary_cross_entropy(logits, labels):
  """Element-wise BCE with logits, −[y log σ(z) + (1 − y) log σ(−z)], computed stably."""
  logits = jnp.asarray(logits, jnp.float32)
  return -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))


def bce_loss(logits, labels):
  """`bce`: nn.BCEWithLogitsLoss(), the mean of ℓ over all elements."""
  return jnp.mean(binary_cross_entropy(logits, labels))


def multilabel_soft_margin_loss(logits, labels):
  """`mls`: nn.MultiLabelSoftMarginLoss(), mean over the batch of the class-mean ℓ (= bce_loss)."""
  return jnp.mean(jnp.mean(binary_cross_entropy(logits, labels), axis=-1))


def asymmetric_loss(logits, labels, *, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8):
  """`asl`: asl.py AsymmetricLossOptimized as train.py builds it; mean over elements.

  p = σ(z), p₋ = min(1 − p + clip, 1), loss = y log max(p, eps) + (1 − y) log max(p₋, eps),
  times (1 − p·y − p₋·(1 − y))^(γ₊ y + γ₋ (1 − y)) taken without gradient; result −mean.
  """
  p = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
  p_neg = jnp.minimum(1 - p + clip, 1.0) if clip else 1 - p
  loss = (labels * jnp.log(jnp.maximum(p, eps))
          + (1 - labels) * jnp.log(jnp.maximum(p_neg, eps)))
  if gamma_neg > 0 or gamma_pos > 0:
    base = 1 - p * labels - p_neg * (1 - labels)
    loss = loss * jax.lax.stop_gradient(base ** (gamma_pos * labels + gamma_neg * (1 - labels)))
  return -jnp.mean(loss)


def focal_loss(logits, labels, *, gamma: float = 2.0, alpha: float | None = None,
               balance: float = 1.0):
  """Element-wise sigmoid focal loss, mean: balance · α_t · (1 − e^{−ℓ})^γ · ℓ.

  α_t = alpha for positives, 1 − alpha for negatives (None: 1). bl.py's `FL` is alpha=0.5.
  """
  return resample_loss(logits, labels, reweight=None, focal_gamma=gamma, focal_alpha=alpha,
                       balance=balance)


def rebalanced_weights(labels, class_freq, *, alpha: float, beta: float, mu: float):
  """Wu et al.'s re-balanced weights (B, C): α + sigmoid(β (r − μ)), r_kc = (1/n_c)/Σ_i y_ki/n_i.

  Positives and negatives of an image get the weight of their class; (α, β, μ) is the seed's
  map_param (alpha, beta, gamma).
  """
  inv = 1.0 / _counts(class_freq)                                 # (C,)
  repeat_rate = jnp.sum(labels * inv, axis=-1, keepdims=True)     # (B, 1); 0 for no labels
  ratio = inv / repeat_rate                                       # inf where no labels
  return jax.nn.sigmoid(beta * (ratio - mu)) + alpha


def class_balanced_weights(class_freq, *, beta: float = 0.9):
  """Cui et al.'s class-balanced weights (C,), (1 − β)/(1 − β^n_c): bl.py CB_mode='by_class'."""
  counts = _counts(class_freq)
  return jnp.asarray((1 - beta) / (1 - np.power(beta, counts, dtype=np.float64)), jnp.float32)


def ntr_bias(class_freq, num_train: int, *, init_bias: float, neg_scale: float,
             bias_over_neg_scale: bool = True):
  """The negative-tolerant prior bias (C,): −κ log(N/n_c − 1), divided by ν in dbl.py/wutong16."""
  counts = _counts(class_freq, num_train).astype(np.float64)
  bias = -np.log(num_train / counts - 1) * init_bias
  return jnp.asarray(bias / neg_scale if bias_over_neg_scale else bias, jnp.float32)


def resample_loss(logits, labels, class_freq=None, num_train: int | None = None, *,
                  reweight: str | None = "rebalance", map_alpha: float = 0.1,
                  map_beta: float = 10.0, map_mu: float = 0.2, cb_beta: float = 0.9,
                  init_bias: float | None = None, neg_scale: float | None = None,
                  bias_over_neg_scale: bool = True, focal: bool = True, focal_gamma: float = 2.0,
                  focal_alpha: float | None = None, balance: float = 1.0,
                  focal_reduction: str = "elementwise", loss_weight: float = 1.0):
  """ResampleLoss (sigmoid) of dbl.py / bl.py / wutong16 as one function (see module docstring).

  reweight: 'rebalance' (Wu et al.), 'cb' (class-balanced, by class) or None.
  init_bias / neg_scale: negative-tolerant regularisation (κ, ν); None leaves it out (κ alone
    adds the bias, ν alone scales the negatives).
  focal_reduction: 'elementwise' (wutong16, bl.py) or 'scalar' (LMPT dbl.py).
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  if reweight == "rebalance":
    weights = rebalanced_weights(labels, class_freq, alpha=map_alpha, beta=map_beta, mu=map_mu)
  elif reweight == "cb":
    weights = class_balanced_weights(class_freq, beta=cb_beta)
  elif reweight is None:
    weights = jnp.float32(1.0)
  else:
    raise ValueError(f"reweight={reweight!r}: expected 'rebalance', 'cb' or None.")
  if init_bias is not None:
    if num_train is None:
      raise ValueError("init_bias needs num_train, the number of training images.")
    logits = logits + ntr_bias(class_freq, num_train, init_bias=init_bias,
                               neg_scale=neg_scale or 1.0,
                               bias_over_neg_scale=bias_over_neg_scale)
  if neg_scale is not None:
    logits = jnp.where(labels > 0, logits, neg_scale * logits)
    if reweight is not None:  # bl.py leaves absent weights absent (dbl.py would crash)
      weights = jnp.where(labels > 0, weights, weights / neg_scale)
  elementwise = binary_cross_entropy(logits, labels)              # (B, C)
  if not focal:
    loss = jnp.mean(weights * elementwise)
  elif focal_reduction == "elementwise":
    alpha_t = 1.0 if focal_alpha is None else jnp.where(labels > 0, focal_alpha, 1 - focal_alpha)
    modulation = (1 - jnp.exp(-elementwise)) ** focal_gamma
    loss = jnp.mean(balance * alpha_t * modulation * weights * elementwise)
  elif focal_reduction == "scalar":
    if focal_alpha is not None:
      raise ValueError("focal_alpha is not part of LMPT's scalar focal reduction.")
    modulation = (1 - jnp.exp(-jnp.mean(elementwise))) ** focal_gamma
    loss = balance * modulation * jnp.mean(weights * elementwise)
  else:
    raise ValueError(f"focal_reduction={focal_reduction!r}: expected 'elementwise' or 'scalar'.")
  return loss_weight * loss


def lmpt_db_loss(logits, labels, class_freq, num_train: int, *, neg_scale: float,
                 map_mu: float, focal_reduction: str = "scalar"):
  """`dbl`: the DB loss as LMPT trains with it (dbl.py; settings in SEED_DBL_SETTINGS).

  focal_reduction='elementwise' gives the original DB loss of wutong16 with the same settings.
  """
  return resample_loss(logits, labels, class_freq, num_train, reweight="rebalance",
                       map_alpha=0.1, map_beta=10.0, map_mu=map_mu, init_bias=0.05,
                       neg_scale=neg_scale, bias_over_neg_scale=True, focal=True, focal_gamma=2.0,
                       balance=2.0, focal_reduction=focal_reduction)


def make_classification_loss(name: str, *, class_freq=None, num_train: int | None = None,
                             dataset: str | None = None, neg_scale: float = 2.0,
                             gamma: float = 0.2) -> Callable:
  """(logits, labels) -> scalar for the seed's `--loss_function name` (see module docstring).

  dataset ('coco_lt' / 'voc_lt') picks dbl's hard-coded settings; neg_scale and gamma are the
  seed's `--neg_scale` / `--gamma` (README run: 2.0 / 0.2), used only by the bl.py options.
  """
  if name in ("bce", "mls", "asl"):
    return {"bce": bce_loss, "mls": multilabel_soft_margin_loss, "asl": asymmetric_loss}[name]
  if name not in CLASSIFICATION_LOSSES:
    raise ValueError(f"Unknown loss_function {name!r}; valid: {', '.join(CLASSIFICATION_LOSSES)}.")
  if class_freq is None or num_train is None:
    raise ValueError(f"loss_function {name!r} needs class_freq and num_train (the dataset's "
                     "training counts).")
  class_freq = _counts(class_freq, num_train)  # checked once, here
  if name == "dbl":
    if dataset not in SEED_DBL_SETTINGS:
      raise ValueError(f"loss_function 'dbl' has settings per dataset; dataset={dataset!r}, "
                       f"expected one of {', '.join(SEED_DBL_SETTINGS)}.")
    settings = SEED_DBL_SETTINGS[dataset]
    return lambda logits, labels: lmpt_db_loss(logits, labels, class_freq, num_train, **settings)
  # bl.py options: (reweight, NTR, focal, loss_weight).
  reweight, ntr, focal, loss_weight = {
      "FL": (None, False, True, 1.0),
      "CBloss": ("cb", False, True, 10.0),
      "R-BCE-Focal": ("rebalance", False, True, 1.0),
      "NTR-Focal": (None, True, True, 1.0),
      "DBloss-noFocal": ("rebalance", True, False, 0.5),
      "CBloss-ntr": ("cb", True, True, 10.0),
      "DBloss": ("rebalance", True, True, 1.0),
  }[name]
  options = dict(reweight=reweight, map_alpha=0.1, map_beta=10.0, map_mu=gamma, cb_beta=0.9,
                 init_bias=0.05 if ntr else None, neg_scale=neg_scale if ntr else None,
                 bias_over_neg_scale=False, focal=focal, focal_gamma=2.0, focal_alpha=0.5,
                 loss_weight=loss_weight)
  return lambda logits, labels: resample_loss(logits, labels, class_freq, num_train, **options)


def cse_margins_and_weights(class_freq, *, margin: float = CSE_MARGIN, gamma: float = CSE_GAMMA,
                            count_transform: str = "raw") -> tuple[np.ndarray, np.ndarray]:
  """(margin_c, w_c), float32 (C,): margin / q^{1/4} and q^{−γ}/Σ q^{−γ}, q = counts(class_freq).

  count_transform 'raw': q = class_freq; 'softmax': q = softmax(class_freq) in float32, as
  train.py does (zeros for all but the largest counts on real data: inf margins, NaN weights).
  """
  if count_transform == "raw":
    q = _counts(class_freq)
  elif count_transform == "softmax":
    counts = np.asarray(class_freq, np.float32)
    q = np.exp(counts - counts.max()) / np.sum(np.exp(counts - counts.max()))
  else:
    raise ValueError(f"count_transform={count_transform!r}: expected 'raw' or 'softmax'.")
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    margins = margin / np.sqrt(np.sqrt(q))
    inverse = (1 / q) ** gamma
    weights = inverse / np.sum(inverse)
  return margins.astype(np.float32), weights.astype(np.float32)


def class_specific_embedding_loss(caption_embeddings, prompt_embeddings, labels, class_freq=None,
                                  *, m_ctx: int, margin: float = CSE_MARGIN,
                                  gamma: float = CSE_GAMMA, count_transform: str = "raw",
                                  sign: str = "as_coded", eps: float = 1e-8):
  """LMPT's class-specific embedding loss (see module docstring), a scalar.

  caption_embeddings: (B, T, D) token embeddings of the captions (T = 77).
  prompt_embeddings: (C, T, D) the class prompts' input token embeddings (context inserted).
  labels: (B, C) multi-hot. class_freq: host counts (C,), or None for csel.py without class
  counts (a constant margin, no re-weighting).
  """
  if caption_embeddings.shape[1] != prompt_embeddings.shape[1]:
    raise ValueError(f"caption and prompt embeddings need the same length; got "
                     f"{caption_embeddings.shape} and {prompt_embeddings.shape}.")
  if not 0 <= m_ctx < caption_embeddings.shape[1]:
    raise ValueError(f"m_ctx={m_ctx} must be in [0, {caption_embeddings.shape[1]}).")
  length = caption_embeddings.shape[1] - m_ctx

  def unit(x):  # torch.cosine_similarity: x / max(‖x‖, eps)
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)

  caption = unit(caption_embeddings[:, :length])                  # (B, L, D)
  prompt = unit(prompt_embeddings[:, m_ctx:])                     # (C, L, D)
  cosine = jnp.einsum("bld,cld->bcl", caption, prompt)            # (B, C, L)
  distance = jnp.sum(1 - cosine, axis=-1)                         # (B, C)
  labels = jnp.asarray(labels, jnp.float32)
  if class_freq is None:
    margins, weights = jnp.float32(margin), jnp.float32(1.0)
  else:
    margins, weights = cse_margins_and_weights(class_freq, margin=margin, gamma=gamma,
                                               count_transform=count_transform)
  if sign == "as_coded":
    hinge = jax.nn.relu(margins - (2 * labels - 1) * distance)
  elif sign == "hinge_embedding":
    hinge = jnp.where(labels > 0, distance, jax.nn.relu(margins - distance))
  else:
    raise ValueError(f"sign={sign!r}: expected 'as_coded' or 'hinge_embedding'.")
  return jnp.mean(hinge * weights)


def lmpt_loss(classification_loss, embedding_loss, *, lam: float = 0.5):
  """train.py: λ L_cls + (1 − λ) L_cse (`--lam`, 0.5)."""
  if not 0 <= lam <= 1:
    raise ValueError(f"lam must be in [0, 1]; got {lam}.")
  return lam * classification_loss + (1 - lam) * embedding_loss
