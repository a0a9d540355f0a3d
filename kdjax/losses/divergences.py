"""Divergences between the teacher's and the student's tempered token distributions.

Notation: p = softmax(z_t / T) is the teacher, q = softmax(z_s / T) the student; every
function takes `(student_logits, teacher_logits)` in that order, returns one value per
position (shape `logits.shape[:-1]`) and applies no T² factor (see `kdjax.losses.hinton_kd`
for the Hinton form). Masked positions (`where=False`) give 0 with zero gradient.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common

Array = jax.Array


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature=1.0,
               where: Optional[Array] = None) -> Array:
  """Forward KL(p_teacher ‖ q_student) = Σ_v p (log p − log q).

  Mass-covering: the student is pushed to put mass wherever the teacher does. This is the
  divergence of Hinton et al. (2015) without the T² factor, and what TRL, Liger and DistiLLM
  call forward KL (DistiLLM's "fkl" value is the cross-entropy −Σ p log q, which has the same
  student gradient and differs by the teacher's entropy).

  Args:
    student_logits: `[..., V]` student logits z_s.
    teacher_logits: `[..., V]` teacher logits z_t.
    temperature: T, dividing both logit vectors.
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 values, ≥ 0.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  return common.finish(common.kl_from_log_probs(log_p, log_q), where)


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature=1.0,
               where: Optional[Array] = None) -> Array:
  """Reverse KL(q_student ‖ p_teacher) = Σ_v q (log q − log p).

  Mode-seeking: the student concentrates on the teacher's high-probability tokens
  (MiniLLM, Gu et al. 2024; DistillSpec, Zhou et al. 2024, for greedy decoding).
  Same arguments and return as `forward_kl`.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  return common.finish(common.kl_from_log_probs(log_q, log_p), where)


def generalized_jsd(student_logits: Array, teacher_logits: Array, *, beta: float = 0.5,
                    temperature=1.0, where: Optional[Array] = None) -> Array:
  """Generalized Jensen–Shannon divergence of GKD (Agarwal et al. 2024, "On-policy distillation").

  JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m),  m = β·p + (1 − β)·q,

  with the mixture m formed from probabilities in log space (logsumexp), never by mixing
  log-probabilities. β = 0.5 is the symmetric JSD.

  Endpoints: the formula above is identically 0 at β = 0 and at β = 1. As β → 0,
  JSD(β)/β → KL(p ‖ q), and as β → 1, JSD(β)/(1 − β) → KL(q ‖ p); following the GKD paper's
  reading of β as the interpolation between the two directions, and TRL's
  `GKDTrainer.generalized_jsd_loss`, a Python β of exactly 0 returns forward KL(p ‖ q) and
  exactly 1 returns reverse KL(q ‖ p). A traced β always uses the interior formula.

  Args:
    student_logits: `[..., V]`.
    teacher_logits: `[..., V]`.
    beta: teacher weight of the mixture, in [0, 1].
    temperature: T, dividing both logit vectors (TRL computes GKD's loss at T = 1).
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 values in [0, H(β)] where H is the binary entropy (nats).
  """
  if isinstance(beta, (int, float)):
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f"generalized_jsd needs beta in [0, 1], got {beta}")
    if beta == 0.0:
      return forward_kl(student_logits, teacher_logits, temperature=temperature, where=where)
    if beta == 1.0:
      return reverse_kl(student_logits, teacher_logits, temperature=temperature, where=where)
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  log_m = common.log_mixture(log_p, log_q, beta)
  values = beta * common.kl_from_log_probs(log_p, log_m) + (1.0 - beta) * common.kl_from_log_probs(log_q, log_m)
  return common.finish(values, where)


def total_variation(student_logits: Array, teacher_logits: Array, *, temperature=1.0,
                    where: Optional[Array] = None) -> Array:
  """Total variation distance TVD(p, q) = ½ Σ_v |p − q| (symmetric, in [0, 1]).

  One minus it is the per-token acceptance probability of speculative sampling with draft q
  and target p (Leviathan et al. 2023; DistillSpec uses it as a distillation loss).
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  values = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
  return common.finish(values, where)


def skew_kl(student_logits: Array, teacher_logits: Array, *, alpha: float = 0.1,
            temperature=1.0, where: Optional[Array] = None) -> Array:
  """Skew forward KL of DistiLLM (Ko et al. 2024): KL(p ‖ α·p + (1 − α)·q).

  Mixing a little of the teacher into the student keeps the divergence bounded (by −log α)
  and its gradient stable where q ≈ 0. α = 0 is forward KL. DistiLLM reports the
  cross-entropy form −Σ p log(α·p + (1 − α)·q), which differs by the teacher entropy H(p)
  and has the same student gradient.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  log_mix = common.log_mixture(log_p, log_q, alpha)
  return common.finish(common.kl_from_log_probs(log_p, log_mix), where)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, *, alpha: float = 0.1,
                    temperature=1.0, where: Optional[Array] = None) -> Array:
  """Skew reverse KL of DistiLLM (Ko et al. 2024): KL(q ‖ (1 − α)·p + α·q).

  α = 0 is reverse KL. The student appears on both sides; the gradient flows through both
  (DistiLLM-2's contrastive loss detaches the mixture's student term: do that with
  `jax.lax.stop_gradient` in the strategy if you want it).
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  log_mix = common.log_mixture(log_q, log_p, alpha)
  return common.finish(common.kl_from_log_probs(log_q, log_mix), where)


def adaptive_kl(student_logits: Array, teacher_logits: Array, *, mu: float = 0.5,
                temperature=1.0, where: Optional[Array] = None) -> Array:
  """Adaptive KL of Wu et al. (2024), "Rethinking KL divergence in KD for LLMs".

  Sort the teacher's probabilities in descending order; the head is the tokens whose
  inclusive cumulative teacher mass is ≤ μ, plus always the top token; the tail is the rest.
  With the student's probabilities gathered in the *same* sorted order,
  g_head = Σ_head |p − q| and g_tail = Σ_tail |p − q| (no gradient), and

    AKL = (g_head·KL(p ‖ q) + g_tail·KL(q ‖ p)) / (g_head + g_tail).

  Forward KL fits the head first, reverse KL the tail, so the weights follow where the gap
  is. When p = q both gaps are 0 and so are both KLs; the weights then default to ½.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  p, q = jnp.exp(log_p), jax.lax.stop_gradient(jnp.exp(log_q))
  order = jnp.argsort(-p, axis=-1)
  p_sorted = jnp.take_along_axis(p, order, axis=-1)
  q_sorted = jnp.take_along_axis(q, order, axis=-1)
  gap = jax.lax.stop_gradient(jnp.abs(p_sorted - q_sorted))
  is_head = jnp.cumsum(p_sorted, axis=-1) <= mu
  is_head = is_head.at[..., 0].set(True)
  g_head = jnp.sum(jnp.where(is_head, gap, 0.0), axis=-1)
  g_tail = jnp.sum(jnp.where(is_head, 0.0, gap), axis=-1)
  total = g_head + g_tail
  w_head = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
  values = (w_head * common.kl_from_log_probs(log_p, log_q)
            + (1.0 - w_head) * common.kl_from_log_probs(log_q, log_p))
  return common.finish(values, where)


def ab_divergence(student_logits: Array, teacher_logits: Array, *, alpha: float = 1.0,
                  beta: float = 0.0, temperature=1.0, where: Optional[Array] = None) -> Array:
  """α-β divergence D_AB^(α,β)(p ‖ q) (Cichocki et al. 2011), as used by ABKD (Wang et al. 2025).

  For α, β, α + β ≠ 0:
    D = −1/(αβ) Σ_v ( p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β) ),
  with the continuous limits
    β = 0, α ≠ 0:   1/α² Σ ( p^α log(p^α / q^α) − p^α + q^α )
    α = 0, β ≠ 0:   1/β² Σ ( q^β log(q^β / p^β) − q^β + p^β )
    α = −β ≠ 0:     1/α² Σ ( log(q^α / p^α) + (q^α / p^α)^(−1) − 1 )
    α = β = 0:      ½ Σ (log p − log q)².
  (α, β) = (1, 0) is forward KL(p ‖ q) and (0, 1) reverse KL(q ‖ p); α trades off how
  hard the student is pulled to the teacher's modes ("hardness concentration"), β how much
  mass it spreads ("confidence concentration"). Vocabulary entries that are −inf in both
  models are skipped; exponents that would divide by a zero probability give +inf.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  present = jnp.isfinite(log_p) | jnp.isfinite(log_q)
  # Zero-probability entries present in one model only are handled by exp(±inf) arithmetic;
  # entries absent from both are replaced so that no 0·inf appears, then dropped.
  lp = jnp.where(present, log_p, 0.0)
  lq = jnp.where(present, log_q, 0.0)
  a, b = float(alpha), float(beta)
  if a != 0 and b != 0 and a + b != 0:
    terms = (jnp.exp(a * lp + b * lq) - a / (a + b) * jnp.exp((a + b) * lp)
             - b / (a + b) * jnp.exp((a + b) * lq)) * (-1.0 / (a * b))
  elif a != 0 and b == 0:
    pa, qa = jnp.exp(a * lp), jnp.exp(a * lq)
    terms = (jnp.where(pa > 0, pa * a * (common.finite_or_zero(lp) - lq), 0.0) - pa + qa) / a**2
  elif a == 0 and b != 0:
    pb, qb = jnp.exp(b * lp), jnp.exp(b * lq)
    terms = (jnp.where(qb > 0, qb * b * (common.finite_or_zero(lq) - lp), 0.0) - qb + pb) / b**2
  elif a != 0:  # α = −β
    # x + e^(−x) − 1 grows without bound at both ends, so a zero probability on one side only
    # (x = ±inf) is +inf; the formula itself would give −inf + inf there.
    x = a * (lq - lp)
    one_sided = jnp.isinf(x)
    x = jnp.where(one_sided, 0.0, x)
    terms = jnp.where(one_sided, jnp.inf, (x + jnp.expm1(-x)) / a**2)
  else:
    terms = 0.5 * (lp - lq) ** 2
  values = jnp.sum(jnp.where(present, terms, 0.0), axis=-1)
  return common.finish(values, where)


def taid(student_logits: Array, teacher_logits: Array, *, interpolation, temperature=1.0,
         where: Optional[Array] = None) -> Array:
  """TAID's loss (Shing et al. 2025, "Temporally Adaptive Interpolated Distillation").

  The target is an interpolation between the student and the teacher in logit space,

      p_t = softmax(((1 − t)·stopgrad(z_s) + t·z_t) / T),    loss = −Σ_v p_t log q,

  which starts near the student (t small) and moves to the teacher as t → 1. The value is the
  cross-entropy H(p_t, q) = KL(p_t ‖ q) + H(p_t), not the KL: TAID's adaptive schedule of t
  (`kdjax.distill.strategies.TAIDDistillation`) is driven by the relative change of this value.
  The student gradient is (q − p_t)/T, that of forward KL to the moving target.

  Args:
    student_logits: `[..., V]`.
    teacher_logits: `[..., V]`.
    interpolation: t in [0, 1], a Python or traced scalar.
    temperature: T (the paper uses 1).
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 values.
  """
  common.check_pair(student_logits, teacher_logits)
  common.check_where(where, jnp.shape(student_logits)[:-1])
  student = common.sanitize(student_logits, where)
  teacher = common.sanitize(teacher_logits, where)
  t = jnp.asarray(interpolation, student.dtype)
  # The student leg of the target is a constant: only the q side is trained. An id absent (−inf)
  # from a model with a nonzero weight is absent from the target; 0·(−inf) must not make NaN.
  absent_s, absent_t = jnp.isneginf(student), jnp.isneginf(teacher)
  target = ((1.0 - t) * jnp.where(absent_s, 0.0, jax.lax.stop_gradient(student))
            + t * jnp.where(absent_t, 0.0, teacher))
  target = jnp.where((absent_s & (t < 1.0)) | (absent_t & (t > 0.0)), -jnp.inf, target)
  p = jnp.exp(common.tempered_log_probs(target, temperature))
  log_q = common.tempered_log_probs(student, temperature)
  return common.finish(-jnp.sum(jnp.where(p > 0, p * log_q, 0.0), axis=-1), where)
