"""Logit distillation recipes: Hinton KD, hard labels, DKD, DIST, logit standardisation, DeiT.

Same conventions as `kdjax.losses.divergences`: `(student_logits, teacher_logits)` order,
p = softmax(z_t / T) teacher, q = softmax(z_s / T) student, per-position outputs, masked
positions give 0. The factor T² is applied only where a function's name or docstring says so.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common
from kdjax.losses.divergences import forward_kl

Array = jax.Array


def hinton_kd(student_logits: Array, teacher_logits: Array, *, temperature=1.0,
              where: Optional[Array] = None) -> Array:
  """Hinton et al. (2015) soft-target loss: T² · KL(p_T ‖ q_T).

  The gradient of KL at temperature T scales as 1/T²; multiplying by T² keeps the soft term's
  gradient comparable to the hard-label term's as T changes (Tunix and MaxText do this; TRL,
  Liger and DistiLLM do not, so compare with them through `forward_kl`).
  """
  return temperature**2 * forward_kl(student_logits, teacher_logits, temperature=temperature, where=where)


def cross_entropy(logits: Array, labels: Array, *, where: Optional[Array] = None,
                  label_smoothing: float = 0.0) -> Array:
  """Hard-label cross-entropy −log softmax(z)[y] per position, optionally label-smoothed.

  Args:
    logits: `[..., V]`.
    labels: integer `[...]` class / next-token ids in [0, V).
    where: optional boolean `[...]` mask.
    label_smoothing: ε; the target is (1 − ε)·onehot(y) + ε/V', with V' the number of ids whose
      logit is finite (V unless some ids are masked with −inf).
  """
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(f"labels shape {jnp.shape(labels)} must equal logits shape without the vocab axis "
                     f"{jnp.shape(logits)[:-1]}")
  common.check_where(where, jnp.shape(labels))
  log_probs = jax.nn.log_softmax(common.sanitize(logits, where), axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.asarray(labels)[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    # The uniform part covers the ids that exist: −inf logits (padded or banned ids) get none.
    present = jnp.isfinite(log_probs)
    uniform = -jnp.sum(jnp.where(present, log_probs, 0.0), axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  return common.finish(nll, where)


def dkd(student_logits: Array, teacher_logits: Array, labels: Array, *, alpha: float = 1.0,
        beta: float = 8.0, temperature=4.0, where: Optional[Array] = None) -> Array:
  """Decoupled KD (Zhao et al., CVPR 2022): α·TCKD + β·NCKD, both × T².

  TCKD is KL between the binary distributions [p_y, 1 − p_y] and [q_y, 1 − q_y] of the target
  class y; NCKD is KL(p̂ ‖ q̂) between the distributions over the non-target classes, obtained
  by removing the target logit before the softmax. Classic KD equals TCKD + (1 − p_y)·NCKD, so
  DKD frees NCKD from the (1 − p_y) suppression. CIFAR defaults: T = 4, α = 1, β = 8; the
  reference recipe also ramps the loss up linearly over the first 20 epochs (a schedule, not
  part of this function).
  """
  common.check_pair(student_logits, teacher_logits)
  common.check_where(where, jnp.shape(labels))
  zs = common.sanitize(student_logits, where) / temperature
  zt = common.sanitize(teacher_logits, where) / temperature
  is_target = jax.nn.one_hot(labels, zs.shape[-1], dtype=bool)

  def binary_log_probs(z):
    log_probs = jax.nn.log_softmax(z, axis=-1)
    log_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
    log_rest = jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, log_probs), axis=-1)
    return jnp.stack([log_target, log_rest], axis=-1)

  tckd = common.kl_from_log_probs(binary_log_probs(zt), binary_log_probs(zs))
  non_target = lambda z: jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, z), axis=-1)
  nckd = common.kl_from_log_probs(non_target(zt), non_target(zs))
  return common.finish(temperature**2 * (alpha * tckd + beta * nckd), where)


def _pearson(x: Array, y: Array, axis: int, weights: Optional[Array] = None) -> Array:
  """Pearson correlation along `axis`, with optional 0/1 weights selecting the entries."""
  if weights is None:
    weights = jnp.ones_like(x)
  n = jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1.0)
  xc = (x - jnp.sum(x * weights, axis=axis, keepdims=True) / n) * weights
  yc = (y - jnp.sum(y * weights, axis=axis, keepdims=True) / n) * weights
  cov = jnp.sum(xc * yc, axis=axis)
  # cov / (‖xc‖·‖yc‖ + 1e-8) as in the reference code. The norm of a constant vector (a class
  # absent from the batch, a batch of one) is 0, where sqrt's derivative is infinite and inf·0
  # would make the whole gradient NaN: there the norm is taken as a constant 0.
  def norm(v):
    squares = jnp.sum(v * v, axis=axis)
    return jnp.where(squares > 0, jnp.sqrt(jnp.where(squares > 0, squares, 1.0)), 0.0)
  return cov / (norm(xc) * norm(yc) + 1e-8)


def dist(student_logits: Array, teacher_logits: Array, *, beta: float = 1.0, gamma: float = 1.0,
         temperature=1.0, where: Optional[Array] = None) -> Array:
  """DIST (Huang et al., NeurIPS 2022): match correlations instead of exact probabilities.

  With p, q the tempered probabilities of a batch `[B, V]`:
    inter = mean_b (1 − ρ(p_b, q_b))          (each example's class ranking)
    intra = mean_v (1 − ρ(p_{:,v}, q_{:,v}))  (each class's profile across the batch)
    DIST = T² · (β·inter + γ·intra),
  where ρ is the Pearson correlation. The intra-class term couples examples, so unlike the
  per-position losses this returns a scalar for the batch; `where` `[B]` drops examples from
  both terms, and a batch with every example dropped gives 0. A constant vector (a class with
  probability 0 across the batch, or a batch of one example) has correlation 0 with a zero
  gradient.

  Args:
    student_logits: `[B, V]`.
    teacher_logits: `[B, V]`.
    beta: weight of the inter-class term.
    gamma: weight of the intra-class term.
    temperature: T (the paper uses 1 on ImageNet and 4 on CIFAR).
    where: optional boolean `[B]`.
  """
  common.check_pair(student_logits, teacher_logits)
  if jnp.ndim(student_logits) != 2:
    raise ValueError(f"dist expects [batch, classes] logits, got shape {jnp.shape(student_logits)}")
  common.check_where(where, jnp.shape(student_logits)[:1])
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  keep = jnp.ones(p.shape[:1], p.dtype) if where is None else jnp.asarray(where, p.dtype)
  inter = common.masked_mean(1.0 - _pearson(q, p, axis=-1), keep > 0)
  intra = jnp.mean(1.0 - _pearson(q, p, axis=0, weights=jnp.broadcast_to(keep[:, None], p.shape)))
  # With every example masked there is nothing to correlate: 0, like every other masked loss.
  intra = jnp.where(jnp.any(keep > 0), intra, 0.0)
  return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(logits: Array, *, eps: float = 1e-7) -> Array:
  """Z-scores each logit vector (Sun et al., CVPR 2024, "Logit standardization in KD").

  (z − mean(z)) / (std(z) + eps), with the unbiased (n − 1) standard deviation of the
  reference code. Standardising before the softmax is a per-sample adaptive temperature: the
  student need only match the teacher's logit *relations*, not its magnitude. −inf entries
  (absent ids) are left out of the statistics and stay −inf.
  """
  z = jnp.asarray(logits)
  z = z.astype(common.compute_dtype(z.dtype))
  present = jnp.isfinite(z)
  n = jnp.sum(present, axis=-1, keepdims=True)
  zf = jnp.where(present, z, 0.0)
  mean = jnp.sum(zf, axis=-1, keepdims=True) / jnp.maximum(n, 1)
  var = jnp.sum(jnp.where(present, (zf - mean) ** 2, 0.0), axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
  return jnp.where(present, (zf - mean) / (jnp.sqrt(var) + eps), -jnp.inf)


def deit_hard_distillation(student_logits: Array, teacher_logits: Array, *,
                           where: Optional[Array] = None) -> Array:
  """DeiT hard distillation (Touvron et al., ICML 2021): CE of the student's distillation head
  against the teacher's argmax label y_t = argmax z_t (no gradient to the teacher)."""
  common.check_pair(student_logits, teacher_logits)
  teacher_label = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  return cross_entropy(student_logits, teacher_label, where=where)


def deit_soft_distillation(student_logits: Array, teacher_logits: Array, *, temperature=1.0,
                           where: Optional[Array] = None) -> Array:
  """DeiT soft distillation: T²·KL(p_T ‖ q_T) / V.

  DeiT's reference reduction sums the KL over the batch and divides by batch × classes, so its
  per-example value is Hinton's divided by the number of classes V; keeping that factor keeps
  DeiT's published λ and learning rates meaningful.
  """
  num_classes = jnp.shape(student_logits)[-1]
  return hinton_kd(student_logits, teacher_logits, temperature=temperature, where=where) / num_classes
