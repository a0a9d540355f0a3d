"""Float64 NumPy restatements of the kdjax logit losses, written from the papers' formulas.

Nothing here imports kdjax: each function is the textbook form, evaluated one distribution (one
row) at a time in float64 with SciPy's softmax / log-softmax, so that a shared mistake between
the library and its reference is unlikely. Notation as in `kdjax.losses`: teacher
p = softmax(z_t / T), student q = softmax(z_s / T); every batched function takes
`(student_logits, teacher_logits)` of shape `[..., V]` and returns `[...]` float64 values,
0 at positions where the optional boolean `where` is False.

Sources:
  * KL, reverse KL, TVD: definitions.
  * Generalized JSD: Agarwal et al. 2024 (GKD), with TRL's endpoints β = 0 → KL(p‖q), β = 1 → KL(q‖p).
  * Skew KL / skew reverse KL: Ko et al. 2024 (DistiLLM).
  * Adaptive KL: Wu et al. 2024, "Rethinking KL divergence in KD for LLMs".
  * α-β divergence: Cichocki, Cruces & Amari 2011, "Generalized Alpha-Beta Divergences", eq. (4).
  * Hinton KD: Hinton et al. 2015 (T² · KL).
  * DKD: Zhao et al. 2022, "Decoupled Knowledge Distillation".
  * DIST: Huang et al. 2022, "Knowledge Distillation from a Stronger Teacher" (official code uses
    cos = <a, b> / (|a|·|b| + 1e-8) on the centred vectors).
  * Logit standardization: Sun et al. 2024 ((z − mean) / (std_{n−1} + 1e-7)).
  * DeiT: Touvron et al. 2021 (soft: T²·KL summed, divided by batch × classes).
"""

from __future__ import annotations

import numpy as np
from scipy import special

# ----------------------------------------------------------------------------------------------
# Single-distribution building blocks (1-D float64 vectors).


def softmax(z, temperature=1.0):
  return special.softmax(np.asarray(z, np.float64) / temperature)


def log_softmax(z, temperature=1.0):
  return special.log_softmax(np.asarray(z, np.float64) / temperature)


def softmax_rows(z, temperature=1.0):
  """softmax(z / T) along the last axis of a batch, float64."""
  return special.softmax(np.asarray(z, np.float64) / temperature, axis=-1)


def kl(p, q):
  """KL(p ‖ q) = Σ_{p_i > 0} p_i log(p_i / q_i) for probability vectors (0·log 0 = 0)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  s = p > 0
  with np.errstate(divide="ignore"):
    return float(np.sum(p[s] * (np.log(p[s]) - np.log(q[s]))))


def kl_logits(za, zb, temperature=1.0):
  """KL(softmax(za/T) ‖ softmax(zb/T)), using log-softmax for the logs (more accurate tails)."""
  la, lb = log_softmax(za, temperature), log_softmax(zb, temperature)
  a = np.exp(la)
  s = a > 0
  return float(np.sum(a[s] * (la[s] - lb[s])))


# ----------------------------------------------------------------------------------------------
# Row-wise divergences. Each takes 1-D student logits zs and teacher logits zt.


def _forward_kl(zs, zt, temperature):
  return kl_logits(zt, zs, temperature)


def _reverse_kl(zs, zt, temperature):
  return kl_logits(zs, zt, temperature)


def _jsd(zs, zt, temperature, beta):
  if beta == 0.0:
    return kl_logits(zt, zs, temperature)
  if beta == 1.0:
    return kl_logits(zs, zt, temperature)
  p, q = softmax(zt, temperature), softmax(zs, temperature)
  m = beta * p + (1.0 - beta) * q
  return beta * kl(p, m) + (1.0 - beta) * kl(q, m)


def _tvd(zs, zt, temperature):
  return 0.5 * float(np.sum(np.abs(softmax(zt, temperature) - softmax(zs, temperature))))


def _skew_kl(zs, zt, temperature, alpha):
  p, q = softmax(zt, temperature), softmax(zs, temperature)
  return kl(p, alpha * p + (1.0 - alpha) * q)


def _skew_reverse_kl(zs, zt, temperature, alpha):
  p, q = softmax(zt, temperature), softmax(zs, temperature)
  return kl(q, (1.0 - alpha) * p + alpha * q)


def akl_weights(zs, zt, temperature, mu):
  """(w_head, w_tail) of adaptive KL: the head is the teacher-sorted prefix with cumulative
  mass ≤ μ, and always contains the top token."""
  p, q = softmax(zt, temperature), softmax(zs, temperature)
  order = np.argsort(-p, kind="stable")
  ps, qs = p[order], q[order]
  head = np.cumsum(ps) <= mu
  head[0] = True
  g_head = np.abs(ps - qs)[head].sum()
  g_tail = np.abs(ps - qs)[~head].sum()
  if g_head + g_tail == 0:
    return 0.5, 0.5
  return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def _adaptive_kl(zs, zt, temperature, mu, weights=None):
  w_head, w_tail = akl_weights(zs, zt, temperature, mu) if weights is None else weights
  return w_head * kl_logits(zt, zs, temperature) + w_tail * kl_logits(zs, zt, temperature)


def _ab_divergence(zs, zt, temperature, alpha, beta):
  """Cichocki et al. (2011) eq. (4), D_AB^(α,β)(P ‖ Q) with P the teacher, Q the student."""
  p, q = softmax(zt, temperature), softmax(zs, temperature)
  keep = (p > 0) | (q > 0)
  p, q = p[keep], q[keep]
  a, b = alpha, beta
  with np.errstate(divide="ignore", invalid="ignore"):
    if a != 0 and b != 0 and a + b != 0:
      d = -1.0 / (a * b) * np.sum(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b))
    elif a != 0 and b == 0:
      d = 1.0 / a**2 * np.sum(np.where(p > 0, p**a * np.log(p**a / q**a), 0.0) - p**a + q**a)
    elif a == 0 and b != 0:
      d = 1.0 / b**2 * np.sum(np.where(q > 0, q**b * np.log(q**b / p**b), 0.0) - q**b + p**b)
    elif a != 0:  # a = -b
      d = 1.0 / a**2 * np.sum(np.log(q**a / p**a) + (q**a / p**a) ** -1 - 1.0)
    else:
      d = 0.5 * np.sum((np.log(p) - np.log(q)) ** 2)
  return float(d)


def _dkd(zs, zt, label, temperature, alpha, beta):
  p, q = softmax(zt, temperature), softmax(zs, temperature)
  tckd = kl([p[label], 1.0 - p[label]], [q[label], 1.0 - q[label]])
  others = np.arange(len(zs)) != label
  nckd = kl_logits(np.asarray(zt)[others], np.asarray(zs)[others], temperature)
  return temperature**2 * (alpha * tckd + beta * nckd)


def _cross_entropy(z, label, label_smoothing):
  lq = log_softmax(z)
  present = np.isfinite(lq)  # ids with a −inf logit do not exist and get no smoothing mass
  target = np.where(present, label_smoothing / present.sum(), 0.0)
  target[label] += 1.0 - label_smoothing
  return float(-np.sum(target[present] * lq[present]))


# ----------------------------------------------------------------------------------------------
# Batched wrappers: apply a row function over the leading axes, zero masked positions.


def _rowwise(fn, zs, zt, where, *extra_rows):
  zs = np.asarray(zs, np.float64)
  zt = np.asarray(zt, np.float64)
  lead = zs.shape[:-1]
  out = np.zeros(lead, np.float64)
  keep = np.ones(lead, bool) if where is None else np.asarray(where, bool)
  for idx in np.ndindex(*lead):
    if keep[idx]:
      out[idx] = fn(zs[idx], zt[idx], *(np.asarray(e)[idx] for e in extra_rows))
  return out


def forward_kl(zs, zt, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _forward_kl(a, b, temperature), zs, zt, where)


def reverse_kl(zs, zt, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _reverse_kl(a, b, temperature), zs, zt, where)


def generalized_jsd(zs, zt, beta=0.5, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _jsd(a, b, temperature, beta), zs, zt, where)


def total_variation(zs, zt, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _tvd(a, b, temperature), zs, zt, where)


def skew_kl(zs, zt, alpha=0.1, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _skew_kl(a, b, temperature, alpha), zs, zt, where)


def skew_reverse_kl(zs, zt, alpha=0.1, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _skew_reverse_kl(a, b, temperature, alpha), zs, zt, where)


def adaptive_kl(zs, zt, mu=0.5, temperature=1.0, where=None, weights=None):
  """`weights`: optional `[..., 2]` fixed (w_head, w_tail), for finite differences with the
  weights held constant (the library stops their gradient)."""
  if weights is None:
    return _rowwise(lambda a, b: _adaptive_kl(a, b, temperature, mu), zs, zt, where)
  return _rowwise(lambda a, b, w: _adaptive_kl(a, b, temperature, mu, tuple(w)), zs, zt, where, weights)


def adaptive_kl_weights(zs, zt, mu=0.5, temperature=1.0):
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  out = np.zeros(zs.shape[:-1] + (2,))
  for idx in np.ndindex(*zs.shape[:-1]):
    out[idx] = akl_weights(zs[idx], zt[idx], temperature, mu)
  return out


def ab_divergence(zs, zt, alpha=1.0, beta=0.0, temperature=1.0, where=None):
  return _rowwise(lambda a, b: _ab_divergence(a, b, temperature, alpha, beta), zs, zt, where)


def hinton_kd(zs, zt, temperature=1.0, where=None):
  return temperature**2 * forward_kl(zs, zt, temperature, where)


def dkd(zs, zt, labels, alpha=1.0, beta=8.0, temperature=4.0, where=None):
  return _rowwise(lambda a, b, y: _dkd(a, b, int(y), temperature, alpha, beta), zs, zt, where, labels)


def cross_entropy(z, labels, label_smoothing=0.0, where=None):
  z = np.asarray(z, np.float64)
  return _rowwise(lambda a, _b, y: _cross_entropy(a, int(y), label_smoothing), z, z, where, labels)


def _pearson(x, y, eps=1e-8):
  x, y = x - x.mean(), y - y.mean()
  return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y) + eps))


def dist(zs, zt, beta=1.0, gamma=1.0, temperature=1.0, where=None):
  """DIST on `[B, V]` logits; rows with where = False are dropped before both terms."""
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  if where is not None:
    zs, zt = zs[np.asarray(where, bool)], zt[np.asarray(where, bool)]
  q = special.softmax(zs / temperature, axis=1)
  p = special.softmax(zt / temperature, axis=1)
  inter = np.mean([1.0 - _pearson(q[i], p[i]) for i in range(p.shape[0])])
  intra = np.mean([1.0 - _pearson(q[:, j], p[:, j]) for j in range(p.shape[1])])
  return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(z, eps=1e-7):
  z = np.asarray(z, np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + eps)


def deit_hard_distillation(zs, zt, where=None):
  labels = np.argmax(np.asarray(zt), axis=-1)
  return cross_entropy(zs, labels, 0.0, where)


def deit_soft_distillation(zs, zt, temperature=1.0, where=None):
  num_classes = np.shape(zs)[-1]
  return hinton_kd(zs, zt, temperature, where) / num_classes


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) teacher.


def topk_indices(zt, k):
  """Indices of the k largest teacher logits per row, largest first."""
  return np.argsort(-np.asarray(zt, np.float64), axis=-1, kind="stable")[..., :k]


def topk_renormalize(zs, zt, indices, divergence="forward_kl", temperature=1.0, where=None):
  """Both models restricted to the teacher's support S and renormalised there."""
  def row(a, b, idx):
    idx = np.asarray(idx, int)
    q_hat = softmax(a[idx], temperature)
    p_hat = softmax(b[idx], temperature)
    return kl(p_hat, q_hat) if divergence == "forward_kl" else kl(q_hat, p_hat)
  return _rowwise(row, zs, zt, where, indices)


def topk_bucket(zs, zt, indices, divergence="forward_kl", temperature=1.0, where=None):
  """Full-vocabulary probabilities on S plus one tail bucket with the rest of the mass."""
  def row(a, b, idx):
    idx = np.asarray(idx, int)
    p, q = softmax(b, temperature), softmax(a, temperature)
    rest = np.ones(len(p), bool)
    rest[idx] = False
    p_out = np.concatenate([p[idx], [p[rest].sum()]])
    q_out = np.concatenate([q[idx], [q[rest].sum()]])
    return kl(p_out, q_out) if divergence == "forward_kl" else kl(q_out, p_out)
  return _rowwise(row, zs, zt, where, indices)


# ----------------------------------------------------------------------------------------------
# Gradients.


def forward_kl_grad(zs, zt, temperature=1.0):
  """d KL(p ‖ q) / d z_s = (q − p) / T."""
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  return (special.softmax(zs / temperature, -1) - special.softmax(zt / temperature, -1)) / temperature


def reverse_kl_grad(zs, zt, temperature=1.0):
  """d KL(q ‖ p) / d z_s = q ⊙ (log q − log p − KL(q ‖ p)) / T."""
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  lq = special.log_softmax(zs / temperature, -1)
  lp = special.log_softmax(zt / temperature, -1)
  q = np.exp(lq)
  r = np.sum(q * (lq - lp), -1, keepdims=True)
  return q * (lq - lp - r) / temperature


def numerical_grad(fn, x, eps=1e-5):
  """Central finite differences of sum(fn(x)) in float64 (4th-order stencil)."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    def at(h):
      y = x.copy()
      y[idx] += h
      return float(np.sum(fn(y)))
    g[idx] = (8 * (at(eps) - at(-eps)) - (at(2 * eps) - at(-2 * eps))) / (12 * eps)
  return g
