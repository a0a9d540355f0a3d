"""Distillation from a sparse (top-k) teacher, as stored by an offline teacher cache.

Storing a teacher's full distribution over a 128k vocabulary for every training token is
impossible; storing its top-k (value, index) pairs is cheap. Two ways to compare the student
with such a teacher:

* ``tail="renormalize"``: restrict both models to the teacher's support S (the k ids) and
  renormalise each there: p̂ = softmax(v/T) over S, q̂ = softmax(z_s[S]/T). The student's
  logits are gathered at S *before* the log-softmax (normalising over the full vocabulary
  first and then gathering gives a sub-distribution, which MaxText had to fix).
* ``tail="bucket"``: keep the full-vocabulary probabilities and add one tail bucket holding the
  remaining mass, 1 − Σ_S p and 1 − Σ_S q, then take the divergence over k + 1 outcomes. The
  teacher's values must then be its log-probabilities log softmax(z_t/T) at the temperature of
  the loss (the tail mass is not recoverable from top-k logits alone). The teacher's tail is
  taken as max(1 − Σ_S p, k·ε_f32): below k float32 ulps the sum cannot resolve it, and a tail
  of exactly 0 would make reverse KL infinite for any student with mass outside S.

Both equal the full-vocabulary divergence when k = V.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common

Array = jax.Array


def _support_log_probs(student_logits, teacher_values, teacher_indices, temperature, tail, where):
  """(log q, log p) over the comparison outcomes: the k support ids, plus a tail bucket."""
  if jnp.shape(teacher_values) != jnp.shape(teacher_indices):
    raise ValueError(f"teacher top-k values {jnp.shape(teacher_values)} and indices "
                     f"{jnp.shape(teacher_indices)} must have the same shape")
  if jnp.shape(teacher_values)[:-1] != jnp.shape(student_logits)[:-1]:
    raise ValueError(f"teacher top-k shape {jnp.shape(teacher_values)} does not match the student's "
                     f"positions {jnp.shape(student_logits)[:-1]}")
  k, vocab = jnp.shape(teacher_values)[-1], jnp.shape(student_logits)[-1]
  if k > vocab:
    raise ValueError(f"top-k size {k} exceeds the student vocab {vocab}")
  common.check_where(where, jnp.shape(student_logits)[:-1])
  zs = common.sanitize(student_logits, where) / temperature
  values = common.sanitize(teacher_values, where)
  indices = jnp.asarray(teacher_indices).astype(jnp.int32)
  if tail == "renormalize":
    log_q = jax.nn.log_softmax(jnp.take_along_axis(zs, indices, axis=-1), axis=-1)
    log_p = jax.nn.log_softmax(values / temperature, axis=-1)
    return log_q, log_p
  if tail == "bucket" and k == vocab:
    # The support is the whole vocabulary: no tail outcome exists, whatever rounding says.
    return jax.nn.log_softmax(jnp.take_along_axis(zs, indices, axis=-1), axis=-1), values
  if tail == "bucket":
    log_q_full = jax.nn.log_softmax(zs, axis=-1)
    log_q_top = jnp.take_along_axis(log_q_full, indices, axis=-1)
    # The student's tail is a logsumexp over the ids outside S: exact, unlike log(1 − Σ q_S).
    in_support = jnp.zeros(zs.shape, bool)
    in_support = jnp.put_along_axis(in_support, indices, True, axis=-1, inplace=False)
    log_q_tail = jax.nn.logsumexp(jnp.where(in_support, -jnp.inf, log_q_full), axis=-1)
    # The teacher's tail is all we know: 1 − Σ_S p. Float32 resolves it only down to the
    # rounding error of that sum, k·ε; a smaller tail is floored there rather than taken as 0,
    # which would make reverse KL (and its gradient) infinite whenever the student keeps any mass
    # outside a confident teacher's top-k.
    p_tail = 1.0 - jnp.sum(jnp.exp(values), axis=-1)
    log_p_tail = jnp.log(jnp.clip(p_tail, k * jnp.finfo(jnp.float32).eps, 1.0))
    log_q = jnp.concatenate([log_q_top, log_q_tail[..., None]], axis=-1)
    log_p = jnp.concatenate([values, log_p_tail[..., None]], axis=-1)
    return log_q, log_p
  raise ValueError(f"unknown tail policy {tail!r}: use 'renormalize' or 'bucket'")


def topk_divergence(student_logits: Array, teacher_values: Array, teacher_indices: Array, *,
                    divergence: str = "forward_kl", tail: str = "renormalize", temperature=1.0,
                    where: Optional[Array] = None) -> Array:
  """Divergence between a sparse top-k teacher and the full student, per position.

  Args:
    student_logits: `[..., V]`.
    teacher_values: `[..., k]` teacher logits or T = 1 log-probabilities (``renormalize``;
      divided by T here), or log-probabilities at
      temperature T (``bucket``) at `teacher_indices`.
    teacher_indices: `[..., k]` integer vocabulary ids of the teacher's top-k.
    divergence: ``"forward_kl"`` (KL(p ‖ q)) or ``"reverse_kl"`` (KL(q ‖ p)) over the outcomes.
    tail: ``"renormalize"`` or ``"bucket"`` (see the module docstring).
    temperature: T.
    where: optional boolean `[...]` mask.

  Returns:
    `[...]` float32 values; no T² factor.
  """
  log_q, log_p = _support_log_probs(student_logits, teacher_values, teacher_indices, temperature, tail, where)
  if divergence == "forward_kl":
    values = common.kl_from_log_probs(log_p, log_q)
  elif divergence == "reverse_kl":
    values = common.kl_from_log_probs(log_q, log_p)
  else:
    raise ValueError(f"unknown divergence {divergence!r} for a top-k teacher: use 'forward_kl' or 'reverse_kl'")
  return common.finish(values, where)


def teacher_topk(teacher_logits: Array, k: int, *, temperature=1.0, log_probs: bool = True) -> tuple[Array, Array]:
  """The teacher's top-k (values, indices) as an offline cache stores them.

  With ``log_probs=True`` the values are log softmax(z_t/T) (usable with both tail policies);
  otherwise raw logits (``renormalize`` only).
  """
  z = jnp.asarray(teacher_logits).astype(jnp.float32)
  values, indices = jax.lax.top_k(z, k)
  if log_probs:
    values = values / temperature - jax.nn.logsumexp(z / temperature, axis=-1, keepdims=True)
  return values, indices
