"""Shared plumbing of the logit losses: input checks, tempered log-probabilities, masks.

Every loss in `kdjax.losses` follows the optax convention: it takes logits of shape
`[..., V]`, returns one value per position (shape `[...]`) and leaves the reduction to the
caller, who uses `masked_sum_count` / `masked_mean` so that averages stay unbiased across
uneven masks, devices and gradient-accumulation micro-batches.

Numerics shared by all losses:
  * Computation is in float32 (or wider) whatever the input dtype: bf16 log-probabilities
    make small KL values negative and JSD noisy.
  * Masked positions (`where=False`) produce exactly 0 and zero gradients, even when their
    logits are garbage (NaN or all −inf): the logits of masked rows are replaced *before*
    any arithmetic, because a NaN in an unused branch of `jnp.where` still poisons the
    gradient.
  * −inf logits mark vocabulary entries that do not exist (padding ids, a restricted
    vocabulary). They have probability 0, and `0 · log 0` terms are taken as 0, so values
    and gradients stay finite. Mass the teacher puts where the student has −inf is a true
    infinity of forward KL; that is not masked away.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or the input dtype when it is wider (float64 under x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def check_pair(student_logits: Array, teacher_logits: Array) -> None:
  """Raises a ValueError that names the problem when the two logit arrays do not pair up."""
  s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if len(s) < 1 or len(t) < 1:
    raise ValueError(f"logits need a vocabulary axis; got student {s}, teacher {t}")
  if s[-1] != t[-1]:
    raise ValueError(
        f"vocab mismatch: student vocab {s[-1]} != teacher vocab {t[-1]}. Pass both through "
        "kdjax.losses.align_vocab(student, teacher, vocab_size=<real tokenizer size>) to drop "
        "padded ids (never zero-pad logits: padded ids would get probability mass)."
    )
  if s[:-1] != t[:-1]:
    raise ValueError(f"student logits {s} and teacher logits {t} differ in their leading (position) axes")


def check_where(where: Optional[Array], positions: tuple[int, ...]) -> None:
  if where is not None and tuple(jnp.shape(where)) != tuple(positions):
    raise ValueError(f"`where` mask has shape {jnp.shape(where)}, expected the position shape {positions}")


def sanitize(logits: Array, where: Optional[Array]) -> Array:
  """Casts to the compute dtype and replaces the logits of masked rows by zeros."""
  logits = jnp.asarray(logits)
  logits = logits.astype(compute_dtype(logits.dtype))
  if where is None:
    return logits
  return jnp.where(jnp.asarray(where)[..., None], logits, 0.0)


def tempered_log_probs(logits: Array, temperature) -> Array:
  """log softmax(z / T) in the compute dtype; −inf entries stay −inf."""
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def paired_log_probs(student_logits, teacher_logits, temperature, where):
  """Checks, casts, masks and tempers a (student, teacher) pair; returns (log q, log p)."""
  check_pair(student_logits, teacher_logits)
  check_where(where, jnp.shape(student_logits)[:-1])
  log_q = tempered_log_probs(sanitize(student_logits, where), temperature)
  log_p = tempered_log_probs(sanitize(teacher_logits, where), temperature)
  return log_q, log_p


def finite_or_zero(x: Array) -> Array:
  """Replaces −inf (log 0) by 0 so that `p · log p` with p = 0 has a finite gradient."""
  return jnp.where(jnp.isfinite(x), x, 0.0)


def kl_from_log_probs(log_a: Array, log_b: Array, axis: int = -1) -> Array:
  """KL(a ‖ b) = Σ a (log a − log b) from log-probabilities, with 0 · log 0 = 0.

  Entries where a = 0 contribute nothing (also when b = 0 there); entries with a > 0 and
  b = 0 contribute +inf, the true value.
  """
  a = jnp.exp(log_a)
  support = a > 0
  diff = jnp.where(support, log_a - finite_or_zero(log_b), 0.0)
  # Where a > 0 but b = 0 the KL is infinite; keep that visible instead of hiding it.
  diff = jnp.where(support & jnp.isneginf(log_b), jnp.inf, diff)
  return jnp.sum(jnp.where(support, a * diff, 0.0), axis=axis)


def log_mixture(log_a: Array, log_b: Array, weight_a) -> Array:
  """log(w·a + (1−w)·b) computed in log space (never by mixing log-probabilities)."""
  weight_a = jnp.asarray(weight_a, log_a.dtype)
  # logaddexp(−inf, −inf) has a NaN gradient: entries absent from both (−inf logits in both
  # models) are computed on a placeholder and put back to −inf.
  absent = jnp.isneginf(log_a) & jnp.isneginf(log_b)
  log_a, log_b = jnp.where(absent, 0.0, log_a), jnp.where(absent, 0.0, log_b)
  mixed = jnp.logaddexp(jnp.log(weight_a) + log_a, jnp.log1p(-weight_a) + log_b)
  return jnp.where(absent, -jnp.inf, mixed)


def finish(values: Array, where: Optional[Array]) -> Array:
  """Zeros the values of masked positions."""
  if where is None:
    return values
  return jnp.where(jnp.asarray(where), values, 0.0)


def masked_sum_count(values: Array, where: Optional[Array] = None) -> tuple[Array, Array]:
  """Returns (Σ values over kept positions, number of kept positions), both float32 scalars.

  Sums and counts add across micro-batches, devices and hosts, so a mean computed as
  total_sum / total_count is exact however unevenly the mask falls: dividing each shard by
  its own count and averaging the means is biased.
  """
  values = jnp.asarray(values)
  dtype = compute_dtype(values.dtype)
  if where is None:
    return jnp.sum(values, dtype=dtype), jnp.asarray(values.size, dtype)
  chex.assert_equal_shape([values, where])
  where = jnp.asarray(where)
  total = jnp.sum(jnp.where(where, values, 0.0), dtype=dtype)
  return total, jnp.sum(where, dtype=dtype)


def safe_mean(total: Array, count: Array) -> Array:
  """total / count, and 0 (with zero gradient) when nothing was counted."""
  return total / jnp.maximum(count, 1.0)


def masked_mean(values: Array, where: Optional[Array] = None) -> Array:
  """Mean of `values` over kept positions; an all-masked input gives 0, not NaN."""
  return safe_mean(*masked_sum_count(values, where))


def align_vocab(student_logits: Array, teacher_logits: Array, *, vocab_size: int) -> tuple[Array, Array]:
  """Drops padded vocabulary ids so teacher and student logits cover the same real tokens.

  Checkpoints pad the embedding to a multiple of 64 or 128 (e.g. 152064 for the teacher and
  151936 for the student of one tokenizer). Ids ≥ `vocab_size` are not tokens; slicing them
  off equals giving them −inf logits in both models (zero probability), and the student's
  gradient for them is 0. Zero-padding the shorter logits instead would give those ids real
  probability mass.

  Args:
    student_logits: `[..., V_s]`.
    teacher_logits: `[..., V_t]`.
    vocab_size: the tokenizer's real vocabulary size, at most min(V_s, V_t).

  Returns:
    Both logit arrays cut to `[..., vocab_size]`.
  """
  vs, vt = jnp.shape(student_logits)[-1], jnp.shape(teacher_logits)[-1]
  if not 0 < vocab_size <= min(vs, vt):
    raise ValueError(
        f"vocab_size={vocab_size} must be in (0, min(student vocab {vs}, teacher vocab {vt})]: "
        "a model whose logits do not cover the tokenizer cannot be distilled token by token "
        "(use a cross-tokenizer loss instead)"
    )
  return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def mask_vocab(logits: Array, vocab_size: int) -> Array:
  """Gives ids ≥ `vocab_size` a −inf logit, keeping the array's shape (block-aligned kernels)."""
  ids = jnp.arange(jnp.shape(logits)[-1])
  return jnp.where(ids < vocab_size, logits, -jnp.inf)
