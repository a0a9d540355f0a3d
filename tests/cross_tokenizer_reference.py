"""Float64 NumPy restatements of kdjax's cross-tokenizer pieces, written from the papers.

Nothing here imports kdjax, and each algorithm is a different one from the library's: the chunk
partition walks both token lists with two pointers (the library intersects the sets of token
ends), position pairs come from a double loop, ULD sorts with Python's `sorted`, and ALM loops
over chunks with scalar math.

Sources:
  * ULD: Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
    Distillation Loss for LLMs": L1 distance of the descending-sorted probability vectors, the
    shorter zero-padded.
  * ALM: Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation via Approximate
    Likelihood Matching": chunk log-likelihoods (sums of token log-probs), tempered by τ, shifted
    by ε, compared by binary cross-entropy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special


def chunk_groups(student_offsets, teacher_offsets):
  """Walks both tokenisations and closes a chunk whenever both reach the same end offset.

  Returns:
    A list of `(student token indices, teacher token indices, (start, end))`, one per chunk.
  """
  s, t = np.asarray(student_offsets).tolist(), np.asarray(teacher_offsets).tolist()
  chunks, i, j = [], 0, 0
  s_group, t_group = [], []
  start = s[0][0]
  while i < len(s) or j < len(t):
    # Advance whichever side is behind; on a tie, both, and the chunk is complete.
    s_end = s[i][1] if i < len(s) else math.inf
    t_end = t[j][1] if j < len(t) else math.inf
    if s_end <= t_end:
      s_group.append(i)
      i += 1
    if t_end <= s_end:
      t_group.append(j)
      j += 1
    if s_end == t_end:
      chunks.append((s_group, t_group, (start, s_end)))
      s_group, t_group, start = [], [], s_end
  return chunks


def position_pairs(student_offsets, teacher_offsets):
  """All (i, j) with student token i and teacher token j ending at the same byte, in order."""
  s, t = np.asarray(student_offsets), np.asarray(teacher_offsets)
  return [(i, j) for i in range(len(s)) for j in range(len(t)) if s[i, 1] == t[j, 1]]


def uld_row(zs, zt, temperature=1.0):
  q = special.softmax(np.asarray(zs, np.float64) / temperature)
  p = special.softmax(np.asarray(zt, np.float64) / temperature)
  size = max(len(p), len(q))
  p_sorted = sorted(p.tolist(), reverse=True) + [0.0] * (size - len(p))
  q_sorted = sorted(q.tolist(), reverse=True) + [0.0] * (size - len(q))
  return sum(abs(a - b) for a, b in zip(p_sorted, q_sorted))


def uld(zs, zt, temperature=1.0, where=None):
  """ULD over leading axes: zs `[..., V_s]`, zt `[..., V_t]` -> `[...]`, 0 where masked."""
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  out = np.zeros(zs.shape[:-1])
  keep = np.ones(zs.shape[:-1], bool) if where is None else np.asarray(where, bool)
  for idx in np.ndindex(*zs.shape[:-1]):
    if keep[idx]:
      out[idx] = uld_row(zs[idx], zt[idx], temperature)
  return out


def binary_cross_entropy(y, y_hat):
  return -(y * math.log(y_hat) + (1.0 - y) * math.log1p(-y_hat))


def binary_entropy(y):
  return binary_cross_entropy(y, y)


def alm_chunk(student_chunk_log_prob, teacher_chunk_log_prob, temperature, epsilon):
  """BCE of ŷ = exp(log p_S(c)/τ − ε) against y = exp(log p_T(c)/τ − ε)."""
  y = math.exp(teacher_chunk_log_prob / temperature - epsilon)
  y_hat = math.exp(student_chunk_log_prob / temperature - epsilon)
  return binary_cross_entropy(y, y_hat)


def alm(student_log_probs, teacher_log_probs, groups, kept, temperature, epsilon):
  """Per-chunk ALM for one example.

  Args:
    student_log_probs, teacher_log_probs: 1-D token log-probs.
    groups: `chunk_groups` output.
    kept: one bool per chunk.

  Returns:
    A list of per-chunk values (0 where not kept).
  """
  values = []
  for (s_group, t_group, _), keep in zip(groups, kept):
    if not keep:
      values.append(0.0)
      continue
    log_s = float(np.sum(np.asarray(student_log_probs, np.float64)[s_group]))
    log_t = float(np.sum(np.asarray(teacher_log_probs, np.float64)[t_group]))
    values.append(alm_chunk(log_s, log_t, temperature, epsilon))
  return values
