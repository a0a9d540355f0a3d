"""Cross-tokenizer distillation: ULD and ALM, and the alignments of two tokenisations they use.

When teacher and student tokenise text differently, their logits neither share a vocabulary
nor line up position by position. Two losses here work anyway:

  * `uld` (Boizard et al. 2024) compares the *sorted* next-token distributions of paired
    positions, which needs no vocabulary mapping;
  * `alm` (Minixhofer et al. 2025) compares the likelihoods that both models give to the same
    piece of text, which needs no vocabulary at all.

Both need to know which parts of the two tokenisations correspond. That is computed on the host,
in NumPy, from each token's byte span `[start, end)` in the UTF-8 text (`ByteTokenizer` and
`kdjax.data.bpe.BPETokenizer` return them from `encode_with_offsets`), and comes out as
fixed-shape, padded index arrays with masks, so the losses jit once per shape:

  * `align_positions` pairs the positions whose tokens end at the same byte: both models have
    then read exactly the same text, and their next-token distributions are comparable (ULD);
  * `align_chunks` cuts the text at every byte offset where *both* tokenisations have a token
    boundary. Each chunk is then covered exactly by whole tokens on both sides (ALM).

Typical use in a step (host side first, then inside `jit`):

    s_ids, s_off = student_tok.encode_with_offsets(text)
    t_ids, t_off = teacher_tok.encode_with_offsets(text)
    chunks = align_chunks(s_off, t_off, student_length=N_s, teacher_length=N_t,
                          student_scored=..., teacher_scored=...)   # per example, then
    chunks = stack_alignments([...])                                 # a batch
    ...
    values = alm(student_token_log_probs, teacher_token_log_probs, chunks)   # [B, C]
    loss = masked_mean(values, chunks.where)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import common

Array = jax.Array

# Tempered chunk log-likelihoods are moved this far below 0 before the Bernoulli cross-entropy,
# so that a chunk of likelihood 1 (its log-probability rounds to 0) keeps log(1 − exp(x)) and its
# gradient finite. The same shift on both sides keeps the minimum at student = teacher.
ALM_EPSILON = 1e-6

# ------------------------------------------------------------------------------------------------
# Host-side alignment (NumPy).


class PositionAlignment(NamedTuple):
  """Pairs of student and teacher positions whose tokens end at the same byte.

  Leading axes `[...]` appear once alignments are stacked into a batch.

  Attributes:
    student_index: `[..., P]` int32 student token positions.
    teacher_index: `[..., P]` int32 teacher token positions.
    where: `[..., P]` bool, False on padding pairs (whose indices are 0).
  """

  student_index: np.ndarray
  teacher_index: np.ndarray
  where: np.ndarray


class ChunkAlignment(NamedTuple):
  """A partition of the text into chunks covered by whole tokens in both tokenisations.

  Attributes:
    student_chunk_ids: `[..., N_s]` int32: the chunk of each student token; padding tokens
      beyond the real ones get C (no chunk).
    teacher_chunk_ids: `[..., N_t]` int32, likewise for the teacher.
    where: `[..., C]` bool: True for chunks to score. False for padding chunks and for chunks
      that contain a token not scored on either side.
    spans: `[..., C, 2]` int32 byte span `[start, end)` of each chunk; `(0, 0)` on padding.
  """

  student_chunk_ids: np.ndarray
  teacher_chunk_ids: np.ndarray
  where: np.ndarray
  spans: np.ndarray


_Alignment = TypeVar("_Alignment", PositionAlignment, ChunkAlignment)


def _checked_offsets(offsets, side: str) -> np.ndarray:
  """Returns `offsets` as an `[N, 2]` int64 array after checking it tiles one span of bytes."""
  offsets = np.asarray(offsets)
  if offsets.ndim != 2 or offsets.shape[1] != 2 or offsets.shape[0] == 0:
    raise ValueError(f"{side} offsets must have shape [N >= 1, 2] (start, end); got {offsets.shape}")
  if not np.issubdtype(offsets.dtype, np.integer):
    raise ValueError(f"{side} offsets must be integer byte offsets; got dtype {offsets.dtype}")
  offsets = offsets.astype(np.int64)
  starts, ends = offsets[:, 0], offsets[:, 1]
  if np.any(ends <= starts):
    bad = int(np.argmax(ends <= starts))
    raise ValueError(f"{side} token {bad} has an empty or reversed span {tuple(offsets[bad])}: drop "
                     "tokens without text (BOS/EOS) from the offsets and handle them apart")
  gaps = np.flatnonzero(starts[1:] != ends[:-1])
  if gaps.size:
    i = int(gaps[0])
    raise ValueError(f"{side} offsets are not contiguous: token {i} ends at {ends[i]} but token {i + 1} "
                     f"starts at {starts[i + 1]}")
  return offsets


def _common_ends(student_offsets, teacher_offsets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks both tokenisations tile the same bytes; returns (student, teacher, shared end offsets)."""
  s = _checked_offsets(student_offsets, "student")
  t = _checked_offsets(teacher_offsets, "teacher")
  if s[0, 0] != t[0, 0] or s[-1, 1] != t[-1, 1]:
    raise ValueError(f"the two tokenisations do not cover the same text: student bytes "
                     f"[{s[0, 0]}, {s[-1, 1]}), teacher bytes [{t[0, 0]}, {t[-1, 1]})")
  # Ends are strictly increasing on each side, so the intersection is sorted and unique.
  return s, t, np.intersect1d(s[:, 1], t[:, 1], assume_unique=True)


def _padded_length(length: Optional[int], real: int, what: str) -> int:
  if length is None:
    return real
  if length < real:
    raise ValueError(f"{what}={length} is smaller than the {real} needed")
  return int(length)


def align_positions(student_offsets, teacher_offsets, *,
                    max_pairs: Optional[int] = None) -> PositionAlignment:
  """Pairs the student and teacher positions whose tokens end at the same byte offset.

  Position i of a causal LM has read tokens 0..i; when student token i and teacher token j end
  at the same byte, both models have read the same text, and their next-token distributions
  (the logits at i and j) predict the same continuation: these are the pairs ULD compares.

  Args:
    student_offsets: `[N_s, 2]` byte spans of the student tokens (contiguous, non-empty).
    teacher_offsets: `[N_t, 2]` byte spans of the teacher tokens, over the same bytes.
    max_pairs: Pad to this many pairs (default min(N_s, N_t), the most there can be).

  Returns:
    A `PositionAlignment` with P = `max_pairs`, pairs in text order.

  Raises:
    ValueError: if the offsets are malformed or do not cover the same text, or if there are
      more pairs than `max_pairs`.
  """
  s, t, shared = _common_ends(student_offsets, teacher_offsets)
  num_pairs = _padded_length(max_pairs, shared.size, "max_pairs")
  # searchsorted finds the token that ends at each shared offset (ends are sorted per side).
  student_index = np.zeros(num_pairs, np.int32)
  teacher_index = np.zeros(num_pairs, np.int32)
  student_index[:shared.size] = np.searchsorted(s[:, 1], shared)
  teacher_index[:shared.size] = np.searchsorted(t[:, 1], shared)
  return PositionAlignment(student_index, teacher_index, np.arange(num_pairs) < shared.size)


def _chunk_ids(offsets: np.ndarray, chunk_ends: np.ndarray, length: int, pad_id: int) -> np.ndarray:
  """Chunk k covers bytes (chunk_ends[k-1], chunk_ends[k]]: a token belongs to the first chunk
  that ends at or after the token's end (no chunk boundary can fall inside a token)."""
  ids = np.full(length, pad_id, np.int32)
  ids[:offsets.shape[0]] = np.searchsorted(chunk_ends, offsets[:, 1])
  return ids


def _scored_mask(scored, offsets: np.ndarray, side: str) -> np.ndarray:
  if scored is None:
    return np.ones(offsets.shape[0], bool)
  scored = np.asarray(scored, bool)
  if scored.shape != (offsets.shape[0],):
    raise ValueError(f"{side}_scored has shape {scored.shape}, expected one flag per {side} token "
                     f"({offsets.shape[0]},)")
  return scored


def align_chunks(student_offsets, teacher_offsets, *, student_length: Optional[int] = None,
                 teacher_length: Optional[int] = None, max_chunks: Optional[int] = None,
                 student_scored=None, teacher_scored=None) -> ChunkAlignment:
  """Cuts the text into the chunks that ALM compares.

  A cut is placed at every byte offset where both tokenisations end a token, so each chunk is
  the smallest span covered exactly by whole tokens on both sides, and the chunks partition the
  text. E.g. "the cat" tokenised `the| |cat` and `t|he| cat` gives the chunks "the" and " cat".

  Args:
    student_offsets: `[n_s, 2]` byte spans of the student tokens (contiguous, non-empty).
    teacher_offsets: `[n_t, 2]` byte spans of the teacher tokens, over the same bytes.
    student_length: Pad the student chunk ids to this many tokens (the model's sequence length);
      default n_s.
    teacher_length: Likewise for the teacher; default n_t.
    max_chunks: Pad to this many chunks; default min(student_length, teacher_length), which
      always suffices.
    student_scored: Optional `[n_s]` bools: False for student tokens without a log-probability
      (the first token when there is no BOS, a prompt the loss should skip). Chunks containing
      such a token are masked out: their likelihoods would be incomplete.
    teacher_scored: Likewise for the teacher.

  Returns:
    A `ChunkAlignment` with C = `max_chunks`.

  Raises:
    ValueError: if the offsets are malformed or do not cover the same text, a length is too
      small, or a scored mask has the wrong shape.
  """
  s, t, chunk_ends = _common_ends(student_offsets, teacher_offsets)
  n_s = _padded_length(student_length, s.shape[0], "student_length")
  n_t = _padded_length(teacher_length, t.shape[0], "teacher_length")
  num_chunks = _padded_length(max_chunks if max_chunks is not None else min(n_s, n_t), chunk_ends.size,
                              "max_chunks")
  # Padding tokens point one past the last chunk: every consumer drops ids outside [0, C).
  student_ids = _chunk_ids(s, chunk_ends, n_s, pad_id=num_chunks)
  teacher_ids = _chunk_ids(t, chunk_ends, n_t, pad_id=num_chunks)

  where = np.arange(num_chunks) < chunk_ends.size
  for ids, offsets, scored, side in ((student_ids, s, student_scored, "student"),
                                     (teacher_ids, t, teacher_scored, "teacher")):
    where[ids[:offsets.shape[0]][~_scored_mask(scored, offsets, side)]] = False

  spans = np.zeros((num_chunks, 2), np.int32)
  spans[:chunk_ends.size, 0] = np.concatenate([s[:1, 0], chunk_ends[:-1]])
  spans[:chunk_ends.size, 1] = chunk_ends
  return ChunkAlignment(student_ids, teacher_ids, where, spans)


def stack_alignments(alignments: Sequence[_Alignment]) -> _Alignment:
  """Stacks per-example alignments of equal padded shapes into one batch (new leading axis).

  Raises:
    ValueError: if the list is empty or the shapes differ (pass the same lengths to every call).
  """
  if not alignments:
    raise ValueError("stack_alignments needs at least one alignment")
  kind = type(alignments[0])
  fields = []
  for name, column in zip(kind._fields, zip(*alignments)):
    shapes = {np.shape(x) for x in column}
    if len(shapes) > 1:
      raise ValueError(f"{kind.__name__}.{name} shapes differ across examples: {sorted(shapes)}; "
                       "pass the same student_length / teacher_length / max_chunks (max_pairs) to each")
    fields.append(np.stack(column))
  return kind(*fields)


# ------------------------------------------------------------------------------------------------
# ULD.


def gather_position_pairs(student_logits: Array, teacher_logits: Array,
                          alignment: PositionAlignment) -> tuple[Array, Array, Array]:
  """Picks the aligned positions out of both models' logits, ready for `uld`.

  Args:
    student_logits: `[..., N_s, V_s]`.
    teacher_logits: `[..., N_t, V_t]`.
    alignment: a `PositionAlignment` with leading axes `[...]` and P pairs.

  Returns:
    `(student [..., P, V_s], teacher [..., P, V_t], where [..., P])`: call
    `uld(student, teacher, where=where)`.
  """
  def take(logits, index):
    return jnp.take_along_axis(jnp.asarray(logits), jnp.asarray(index)[..., None], axis=-2)

  return (take(student_logits, alignment.student_index), take(teacher_logits, alignment.teacher_index),
          jnp.asarray(alignment.where))


def _sorted_descending(probs: Array, size: int) -> Array:
  """Probabilities sorted from largest to smallest, zero-padded at the end to `size` entries."""
  ordered = -jnp.sort(-probs, axis=-1)
  pad = [(0, 0)] * (ordered.ndim - 1) + [(0, size - ordered.shape[-1])]
  return jnp.pad(ordered, pad)


def uld(student_logits: Array, teacher_logits: Array, *, temperature=1.0,
        where: Optional[Array] = None) -> Array:
  """Universal Logit Distillation loss of Boizard et al. (2024), "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs".

  With p = softmax(z_t / T) over the teacher's V_t tokens and q = softmax(z_s / T) over the
  student's V_s tokens, sort both in descending order, p_(1) ≥ p_(2) ≥ …, zero-pad the shorter
  to V = max(V_s, V_t), and take the L1 distance

    ULD = Σ_{i=1..V} | p_(i) − q_(i) |,   in [0, 2].

  The paper motivates it as a Wasserstein distance between the two distributions whose
  transport cost ignores which token is which. It needs no shared vocabulary, and it is
  invariant to any relabelling of either vocabulary: it matches the *shape* of the teacher's
  distribution, not which tokens carry the mass. ULD = 0 iff p and q are permutations of each
  other (up to zero entries). The paper pairs the i-th answer token of both models; with
  `align_positions` and `gather_position_pairs` one pairs positions that have read the same
  text. The paper adds it to the student's cross-entropy (λ·ULD + CE); that is the strategy's
  business. No T² factor.

  Args:
    student_logits: `[..., V_s]` student logits of paired positions.
    teacher_logits: `[..., V_t]` teacher logits of the same positions; V_t may differ from V_s.
    temperature: T, dividing both logit vectors.
    where: optional boolean `[...]` mask of the pairs to keep.

  Returns:
    `[...]` float32 values (0 where masked).
  """
  s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if len(s_shape) < 1 or len(t_shape) < 1 or s_shape[:-1] != t_shape[:-1]:
    raise ValueError(f"uld pairs positions one to one: student logits {s_shape} and teacher logits "
                     f"{t_shape} need the same leading axes (use gather_position_pairs)")
  common.check_where(where, s_shape[:-1])
  q = jnp.exp(common.tempered_log_probs(common.sanitize(student_logits, where), temperature))
  p = jnp.exp(common.tempered_log_probs(common.sanitize(teacher_logits, where), temperature))
  size = max(s_shape[-1], t_shape[-1])
  values = jnp.sum(jnp.abs(_sorted_descending(p, size) - _sorted_descending(q, size)), axis=-1)
  return common.finish(values, where)


# ------------------------------------------------------------------------------------------------
# ALM.


def chunk_log_likelihoods(token_log_probs: Array, chunk_ids: Array, num_chunks: int) -> Array:
  """log p(chunk) = Σ_{tokens in the chunk} log p(token | prefix), by segment sums.

  Args:
    token_log_probs: `[..., N]` log-probabilities of the tokens actually in the text, entry i
      for token i (see `alm`).
    chunk_ids: `[..., N]` integer chunk of each token; ids outside [0, num_chunks) (padding)
      are ignored, their log-probs may be garbage.
    num_chunks: C.

  Returns:
    `[..., C]` float32 chunk log-likelihoods (0 for chunks without tokens).
  """
  log_probs = jnp.asarray(token_log_probs)
  log_probs = log_probs.astype(common.compute_dtype(log_probs.dtype))
  ids = jnp.asarray(chunk_ids)
  if log_probs.shape != ids.shape or log_probs.ndim < 1:
    raise ValueError(f"token log-probs {log_probs.shape} and chunk ids {ids.shape} need the same shape "
                     "[..., N]")
  lead, n = log_probs.shape[:-1], log_probs.shape[-1]
  rows = math.prod(lead)
  ids = ids.reshape(rows, n).astype(jnp.int32)
  inside = (ids >= 0) & (ids < num_chunks)
  # One segment per (row, chunk) plus one bin per row for the ignored tokens, cut off below.
  row_base = (num_chunks + 1) * jnp.arange(rows, dtype=jnp.int32)[:, None]
  segments = jnp.where(inside, ids, num_chunks) + row_base
  values = jnp.where(inside, log_probs.reshape(rows, n), 0.0)
  sums = jax.ops.segment_sum(values.reshape(-1), segments.reshape(-1), num_segments=rows * (num_chunks + 1))
  return sums.reshape(rows, num_chunks + 1)[:, :num_chunks].reshape(*lead, num_chunks)


def _log1mexp(x: Array) -> Array:
  """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012): log(−expm1(x)) near 0,
  log1p(−eˣ) far from it."""
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _bernoulli_cross_entropy(log_y: Array, log_y_hat: Array) -> Array:
  """−[y·log ŷ + (1 − y)·log(1 − ŷ)] from log y and log ŷ (both < 0)."""
  return -(jnp.exp(log_y) * log_y_hat - jnp.expm1(log_y) * _log1mexp(log_y_hat))


def _zero_unscored(log_probs: Array, chunk_ids: Array, where: Array) -> Array:
  """Zeros the token log-probs outside kept chunks: a NaN or −inf there would poison the
  gradient of the segment sum even though the chunk's value is masked afterwards."""
  ids = jnp.asarray(chunk_ids)
  # mode="fill" covers ids ≥ C; negative ids would wrap around, so they are excluded by hand.
  kept = jnp.take_along_axis(where, ids, axis=-1, mode="fill", fill_value=False) & (ids >= 0)
  return jnp.where(kept, log_probs, 0.0)


def alm(student_log_probs: Array, teacher_log_probs: Array, alignment: ChunkAlignment, *,
        temperature=100.0) -> Array:
  """Approximate Likelihood Matching of Minixhofer et al. (2025), "Universal Cross-Tokenizer
  Distillation via Approximate Likelihood Matching", on the chunks of `align_chunks`.

  Each chunk c is a span of text covered by whole tokens in both tokenisations, so both models
  give it a likelihood, the product of the probabilities of the tokens actually in the text:

    log p_T(c) = Σ_{j ∈ c} log p_T(t_j | t_<j),   log p_S(c) = Σ_{i ∈ c} log p_S(s_i | s_<i).

  These are compared as Bernoulli parameters (the chunk occurs / does not), tempered by τ:

    y = exp(log p_T(c) / τ − ε),   ŷ = exp(log p_S(c) / τ − ε),
    ALM(c) = −[ y·log ŷ + (1 − y)·log(1 − ŷ) ],

  the binary cross-entropy of the student's ŷ against the teacher's y, with ε = `ALM_EPSILON`
  (1e-6) keeping log(1 − ŷ) finite when a chunk has likelihood 1. This is the binarised
  divergence of the paper in the form of its reference code (tokenkit's `binary_ce` distance,
  which tempers and shifts the log-likelihoods the same way). It equals the binary KL(y ‖ ŷ)
  plus the teacher's binary entropy H(y), a constant for the student: the same gradient, and
  over ŷ it is smallest at ŷ = y, where it equals H(y) rather than 0. τ = 100 (the default, as
  in METHODS.md) maps chunk likelihoods, which are tiny, to Bernoulli parameters near 1 whose
  cross-entropy stays well conditioned. Not included: the paper's debiasing of chunk outcomes
  and its optional hidden-state terms. The teacher's log-probs are not stopped from carrying
  gradient: pass constants (or `jax.lax.stop_gradient`) for a frozen teacher.

  Average over chunks with `masked_mean(values, alignment.where)`, as the paper normalises
  by the number of chunks.

  Args:
    student_log_probs: `[..., N_s]` log-probabilities log p_S(s_i | s_<i) of the student's
      tokens of the text, entry i for token i (finite where scored). From next-token logits
      that is `-cross_entropy(logits[..., :-1, :], ids[..., 1:])` shifted right by one: token 0
      has no prediction unless a BOS precedes it, so mark it unscored in `align_chunks`.
    teacher_log_probs: `[..., N_t]` likewise for the teacher's tokens.
    alignment: a `ChunkAlignment` with leading axes `[...]` (see `stack_alignments`).
    temperature: τ > 0.

  Returns:
    `[..., C]` float32 values, 0 at chunks where `alignment.where` is False (with zero
    gradient, whatever the log-probs of their tokens).
  """
  where = jnp.asarray(alignment.where, bool)
  lead = jnp.shape(where)[:-1]
  for side, log_probs, ids in (("student", student_log_probs, alignment.student_chunk_ids),
                               ("teacher", teacher_log_probs, alignment.teacher_chunk_ids)):
    if jnp.shape(log_probs) != jnp.shape(ids) or jnp.shape(ids)[:-1] != lead:
      raise ValueError(f"{side} log-probs {jnp.shape(log_probs)} must match the alignment's "
                       f"{side}_chunk_ids {jnp.shape(ids)}, whose leading axes must match "
                       f"where {jnp.shape(where)}")
  num_chunks = jnp.shape(where)[-1]

  def tempered(log_probs, ids):
    log_probs = jnp.asarray(log_probs)
    log_probs = _zero_unscored(log_probs.astype(common.compute_dtype(log_probs.dtype)), ids, where)
    return chunk_log_likelihoods(log_probs, ids, num_chunks) / temperature - ALM_EPSILON

  log_y = tempered(teacher_log_probs, alignment.teacher_chunk_ids)
  log_y_hat = tempered(student_log_probs, alignment.student_chunk_ids)
  return common.finish(_bernoulli_cross_entropy(log_y, log_y_hat), where)
