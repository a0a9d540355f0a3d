"""OFA-KD's modulated target-enhanced loss (Hao et al., "One-for-All: Bridge the Gap Between
Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023).

Same conventions as `kdjax.losses.logits`: `(student_logits, teacher_logits, labels)` order, p =
softmax(z_t / T) the teacher, q = softmax(z_s / T) the student, one value per example, masked
examples give 0, fp32 inside.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common

Array = jax.Array


def ofa_loss(student_logits: Array, teacher_logits: Array, labels: Array, *, gamma: float = 1.0,
             temperature: float = 1.0, where: Optional[Array] = None) -> Array:
  """L = −Σ_c [(p_c + y_c)^γ − y_c] · log q_c, with y the one-hot label.

  The weight of the target class ĉ is (1 + p_ĉ)^γ − 1 and that of every other class p_c^γ. With
  γ > 1 the target weight grows faster than p_ĉ, and more so the more confident the teacher is
  (the paper's "adaptive target information enhancement"), while the non-target weights shrink
  below p_c. This is the reference implementation (Hao840/OFAKD `distillers/ofa.py`, `ofa_loss`,
  whose `--ofa-eps` is γ); the paper writes the objective together with the hard-label term:
  CE + L = −(1 + p_ĉ)^γ log q_ĉ − Σ_{c≠ĉ} p_c^γ log q_c. No T² factor (the reference has none; it
  uses T = 1).

  At γ = 1 the weights are p itself: L = −Σ p log q = KL(p ‖ q) + H(p), the soft cross-entropy,
  whose gradient is plain KD's (`hinton_kd / T²`).

  Args:
    student_logits: `[..., K]` (an exit's or the final logits).
    teacher_logits: `[..., K]`.
    labels: integer `[...]` class ids.
    gamma: the modulating exponent γ > 0 (1.5 in the reference's ImageNet command).
    temperature: T of both softmaxes.
    where: optional boolean `[...]` mask.

  Returns:
    `[...]` float32 values, 0 at masked positions.
  """
  if not gamma > 0:
    raise ValueError(f"the OFA exponent gamma must be > 0, got {gamma!r} (at 0 the target class gets no weight)")
  if jnp.shape(labels) != jnp.shape(student_logits)[:-1]:
    raise ValueError(f"labels shape {jnp.shape(labels)} must equal the logits shape without the class axis "
                     f"{jnp.shape(student_logits)[:-1]}")
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  onehot = jax.nn.one_hot(labels, log_q.shape[-1], dtype=log_q.dtype)
  weights = (jnp.exp(log_p) + onehot) ** gamma - onehot
  # A class the teacher rules out (−inf logit) has weight 0: its log q (maybe −inf) stays out of the
  # sum and of the gradient. A weighted class the student rules out is a true infinity, kept visible.
  support = weights > 0
  values = -jnp.sum(jnp.where(support, weights * common.finite_or_zero(log_q), 0.0), axis=-1)
  values = jnp.where(jnp.any(support & jnp.isneginf(log_q), axis=-1), jnp.inf, values)
  return common.finish(values, where)
