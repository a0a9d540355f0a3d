"""MGSR's token- and span-level losses (Liu et al. 2024, arXiv 2407.10068).

"Multi-Granularity Semantic Revision for Large Language Model Distillation" revises what the
student learns from at three granularities; the sequence level (SCRG, correcting the student's
rollouts) is a batch source (`kdjax.distill.semantic_revision`), the other two are here:

  * token level, DAC-KL (distribution-adaptive clipping KL): a learned sub-network reads the
    teacher's distribution and predicts the bounds of its "semantically dense" region; both
    distributions are clipped to that region, renormalised, and compared by KL(p̃ ‖ q̃).
    `dac_kl` is the divergence at given bounds, `teacher_profile` the sub-network's input.
  * span level: words (spans from priors) should relate their positions' predictions alike in
    teacher and student: `span_ids` splits byte ids into words, `span_correlation` compares the
    within-span correlations of probability vectors.

The paper gives the components but not every detail (the sub-network's architecture, what its
bounds measure, the span loss's distance); the readings chosen are stated in each docstring.
Notation as in `kdjax.losses`: p = softmax(z_t / T) teacher, q = softmax(z_s / T) student, no T²
factor, fp32 inside, masked positions give exactly 0 with zero gradient.
"""

from __future__ import annotations

import string
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import common

Array = jax.Array


def _tiny(dtype) -> Array:
  return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


def _bound(value, where: Optional[Array], positions: tuple[int, ...], fill: float, name: str, dtype) -> Array:
  """A bound broadcast to the position shape, with `fill` at masked positions (keeps garbage out)."""
  value = jnp.asarray(value, dtype)
  try:
    value = jnp.broadcast_to(value, positions)
  except ValueError:
    raise ValueError(f"{name} of shape {jnp.shape(value)} does not broadcast to the position shape "
                     f"{positions}") from None
  return value if where is None else jnp.where(where, value, fill)


def dac_kl(student_logits: Array, teacher_logits: Array, *, lower, upper, temperature=1.0,
           where: Optional[Array] = None) -> Array:
  """DAC-KL at given bounds: KL(p̃ ‖ q̃) over the band [lower, upper] of the teacher's sorted mass.

  Reading chosen (the paper's sub-network predicts an upper and a lower "quantile"): sort the
  vocabulary by the teacher, p_(1) ≥ p_(2) ≥ …, so that class r covers the interval
  [C_{r−1}, C_r] of the teacher's cumulative mass (C_0 = 0). Clipping to the quantile band
  [a, b] keeps of each class the mass m_r = |[C_{r−1}, C_r] ∩ [a, b]|: the mass before the lower
  quantile (the dominating peak) and after the upper one (the long tail of redundant classes) is
  cut, the two straddling classes in part. The kept fraction g_r = m_r / p_r gates both
  models alike, and with Z_p = Σ m_r (= b − a) and Z_q = Σ g_r q_r

      p̃_r = m_r / Z_p,   q̃_r = g_r q_r / Z_q,
      DAC-KL = Σ_r p̃_r log(p̃_r / q̃_r) = Σ_r p̃_r (log p_r − log q_r) + log Z_q − log Z_p

  (the gates cancel inside the log). The divergence is forward (teacher ‖ student), like
  `kdjax.losses.forward_kl`, and differentiable in a and b through the straddling classes
  (∂m_r/∂b = 1 for the class containing b, ∂m_r/∂a = −1 for the one containing a), which is what
  trains the sub-network. a = 0, b = 1 is exactly forward KL. Neither bound is checked (they are
  traced); a band of zero width gives 0.

  Args:
    student_logits: `[..., V]`.
    teacher_logits: `[..., V]`.
    lower: a, the lower quantile in [0, 1], broadcastable to `[...]`.
    upper: b, the upper quantile in [lower, 1], broadcastable to `[...]`.
    temperature: T, dividing both logit vectors.
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 values, ≥ 0.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  positions, dtype = log_p.shape[:-1], log_p.dtype
  lower = _bound(lower, where, positions, 0.0, "lower", dtype)[..., None]
  upper = _bound(upper, where, positions, 1.0, "upper", dtype)[..., None]
  order = jnp.argsort(-log_p, axis=-1)
  log_p = jnp.take_along_axis(log_p, order, axis=-1)
  log_q = jnp.take_along_axis(log_q, order, axis=-1)
  p = jnp.exp(log_p)
  # The mass before a class from the head and after it from the tail, each an exclusive running
  # sum: a class's kept part is p minus its overflow past either bound, which is exactly p (gate
  # 1) for an open bound, where C_r − C_{r−1} would carry the cumulative sum's rounding.
  before = jnp.cumsum(p, axis=-1) - p
  after = jnp.flip(jnp.cumsum(jnp.flip(p, -1), axis=-1), -1) - p
  over_head = jnp.clip(lower - before, 0.0, p)
  over_tail = jnp.clip((1.0 - upper) - after, 0.0, p)
  kept = jnp.maximum(p - over_head - over_tail, 0.0)
  gate = jnp.where(p > 0, kept / jnp.where(p > 0, p, 1.0), 0.0)
  z_p = jnp.maximum(jnp.sum(kept, axis=-1), _tiny(dtype))
  z_q = jnp.maximum(jnp.sum(gate * jnp.exp(log_q), axis=-1), _tiny(dtype))
  cross = jnp.sum(jnp.where(kept > 0, kept * (log_p - common.finite_or_zero(log_q)), 0.0), axis=-1) / z_p
  return common.finish(cross + jnp.log(z_q) - jnp.log(z_p), where)


def teacher_profile(teacher_logits: Array, *, k: int, temperature=1.0, where: Optional[Array] = None) -> Array:
  """The DAC-KL sub-network's input: the teacher's k largest probabilities, sorted, and the rest.

  `[p_(1), …, p_(k), 1 − Σ_{r≤k} p_(r)]` at temperature T: the shape of the distribution (how
  peaked, how heavy its tail) with a size independent of the vocabulary. Reading chosen: the
  paper feeds the teacher's output probabilities to an MLP; the top-k keeps that MLP small.

  Returns:
    `[..., k + 1]` float32.
  """
  vocab = jnp.shape(teacher_logits)[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"teacher_profile needs 1 <= k <= vocab size {vocab}, got k={k}")
  common.check_where(where, jnp.shape(teacher_logits)[:-1])
  probs = jnp.exp(common.tempered_log_probs(common.sanitize(teacher_logits, where), temperature))
  top = jax.lax.top_k(probs, k)[0]
  return jnp.concatenate([top, jnp.maximum(1.0 - jnp.sum(top, -1, keepdims=True), 0.0)], axis=-1)


# The byte-level span prior: a span is a maximal run of word bytes, the ASCII letters and digits
# and every byte ≥ 128 (parts of multi-byte UTF-8 characters, letters mostly, which stay inside
# their word). Whitespace, punctuation and control bytes separate; so does the apostrophe ("o'er"
# is two spans).
WORD_BYTES = np.array([b >= 128 or chr(b) in string.ascii_letters + string.digits for b in range(256)])


def span_ids(ids: Array, *, where: Optional[Array] = None) -> Array:
  """Word spans of byte ids: the index of each position's word along the last axis, −1 outside words.

  Reading chosen: the paper chunks text into spans with an external tool; for byte-level text
  the prior here is the word (`WORD_BYTES`). Positions with `where` False, and ids outside
  [0, 256), count as separators, so no span crosses them.

  Args:
    ids: integer `[..., L]` byte ids (e.g. `batch['targets']`, whose position i the logits at
      position i predict).
    where: optional boolean `[..., L]` of positions that may belong to a span.

  Returns:
    int32 `[..., L]`: 0, 1, … numbering the words of each row in order, −1 at separators.
  """
  ids = jnp.asarray(ids)
  if ids.ndim < 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"span_ids needs integer ids [..., L], got {ids.dtype} {ids.shape}")
  common.check_where(where, ids.shape)
  inside = (ids >= 0) & (ids < 256)
  word = inside & jnp.asarray(WORD_BYTES)[jnp.clip(ids, 0, 255)]
  if where is not None:
    word = word & jnp.asarray(where, bool)
  previous = jnp.pad(word[..., :-1], [(0, 0)] * (ids.ndim - 1) + [(1, 0)])
  starts = word & ~previous
  return jnp.where(word, jnp.cumsum(starts, axis=-1, dtype=jnp.int32) - 1, -1)


def _hadamard(a: Array, b: Array) -> Array:
  return a * b


def _inner(a: Array, b: Array) -> Array:
  return jnp.sum(a * b, axis=-1, keepdims=True)


def _cosine(a: Array, b: Array) -> Array:
  norms = jnp.linalg.norm(a, axis=-1, keepdims=True) * jnp.linalg.norm(b, axis=-1, keepdims=True)
  return _inner(a, b) / jnp.maximum(norms, _tiny(a.dtype))


# How two positions' probability vectors are related; the span loss is the squared distance
# between the teacher's relation and the student's.
CORRELATIONS = {"hadamard": _hadamard, "inner": _inner, "cosine": _cosine}


def span_correlation(student_logits: Array, teacher_logits: Array, spans: Array, *, measure: str = "hadamard",
                     max_distance: int = 1, temperature=1.0) -> tuple[Array, Array]:
  """MGSR's span-level correlation consistency, per position: (Σ of its pair losses, its pair count).

  For positions i < j of the same span with j − i ≤ max_distance, the relation of their
  predictions is r(p_i, p_j) for the teacher and r(q_i, q_j) for the student, and the pair's
  loss is ‖r(p_i, p_j) − r(q_i, q_j)‖². Relations (`measure`):
    hadamard: p_i ⊙ p_j, a vector over the vocabulary (the paper's Eq. 10 reading, with
      max_distance = 1: consecutive positions);
    inner: ⟨p_i, p_j⟩;  cosine: ⟨p_i, p_j⟩ / (‖p_i‖ ‖p_j‖).
  Reading chosen: the paper's distance between the two relations is not given; the squared
  Euclidean one is used. Position i collects the pairs (i, j > i); the loss averaged over in-span
  pairs is Σ sums / Σ counts (`kdjax.losses.safe_mean`). The teacher is a constant.

  Args:
    student_logits: `[..., L, V]`.
    teacher_logits: `[..., L, V]`.
    spans: int `[..., L]` span index per position, −1 outside spans (`span_ids`); positions
      outside spans are the mask.
    measure: 'hadamard', 'inner' or 'cosine'.
    max_distance: the largest j − i paired (a Python int ≥ 1; one shifted product per distance).
    temperature: T of both distributions.

  Returns:
    `(sums, counts)`, both float32 `[..., L]`.
  """
  if measure not in CORRELATIONS:
    raise ValueError(f"unknown span correlation measure {measure!r}; known: {sorted(CORRELATIONS)}")
  if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or max_distance < 1:
    raise ValueError(f"max_distance must be an int >= 1, got {max_distance!r}")
  common.check_pair(student_logits, teacher_logits)
  positions = jnp.shape(student_logits)[:-1]
  if len(positions) < 1:
    raise ValueError(f"span_correlation needs logits [..., L, V], got {jnp.shape(student_logits)}")
  spans = jnp.asarray(spans)
  if tuple(spans.shape) != tuple(positions):
    raise ValueError(f"spans have shape {spans.shape}, expected the position shape {positions}")
  inside = spans >= 0
  relate = CORRELATIONS[measure]
  q = jnp.exp(common.tempered_log_probs(common.sanitize(student_logits, inside), temperature))
  p = jax.lax.stop_gradient(jnp.exp(common.tempered_log_probs(common.sanitize(teacher_logits, inside), temperature)))
  length = positions[-1]
  sums = jnp.zeros(positions, q.dtype)
  counts = jnp.zeros(positions, q.dtype)
  for d in range(1, min(max_distance, length - 1) + 1):
    paired = inside[..., :-d] & (spans[..., :-d] == spans[..., d:])
    gap = relate(p[..., :-d, :], p[..., d:, :]) - relate(q[..., :-d, :], q[..., d:, :])
    loss = jnp.where(paired, jnp.sum(jnp.square(gap), axis=-1), 0.0)
    pad = [(0, 0)] * (len(positions) - 1) + [(0, d)]
    sums = sums + jnp.pad(loss, pad)
    counts = counts + jnp.pad(paired.astype(q.dtype), pad)
  return sums, counts
