"""MiniPLM's difference sampling: keep the text the teacher finds likelier than a small reference LM.

Gu et al. 2024, "MiniPLM: Knowledge Distillation for Pre-Training Language Models" (arXiv
2410.17215). KD through the data alone: the teacher runs once, offline, and the student never
sees its logits. Each document x of the corpus is scored by

    r(x) = (1 / |x|) Σ_t [log p_T(x_t | x_<t) − log p_ref(x_t | x_<t)]

with p_ref a small reference LM trained on part of the corpus (the paper's: 104M parameters on
5B tokens, against a 1.8B teacher), the top fraction α of documents is kept (α = 0.5 in the
paper), and the student is pre-trained on that refined corpus with plain cross-entropy. A high
score marks text the teacher has learned and the small model has not (hard but valuable); easy
text scores near 0 and noise the teacher also dislikes scores low. The paper writes the score as
log p(x) / p_ref(x) over its equal-length (1024-token) instances, where the sum and the mean
rank alike; the mean per token is used here (the repository's README writes a ratio of the two
log-likelihoods instead; not implemented).

Documents are consecutive `chunk_len`-id pieces of the corpus (its tail, shorter than a chunk,
is never kept). Per-token log-likelihoods come from the LM pipeline's evaluation windows
(`kdjax.data.lm_pipeline.eval_batches`: every id after the first is a target exactly once, with
the context of its window), so a chunk's first ids are predicted from the bytes before it:
documents are cut from one running text here, not independent.

The control is the same student on a random subset of the same size (`random_chunks`): a gain
over it is the teacher's, not that of seeing fewer distinct bytes more often.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from kdjax import losses
from kdjax.data import lm_pipeline

Forward = Callable[[Any, dict], dict]


def token_log_ratios(tokens: np.ndarray, *, seq_len: int, teacher_forward: Forward, teacher_params: Any,
                     reference_forward: Forward, reference_params: Any, batch_size: int,
                     place: Callable[[dict], dict] = lambda batch: batch) -> np.ndarray:
  """log p_T(x_t | ·) − log p_ref(x_t | ·) for every id x_t of `tokens` (0 for x_0, which has no context).

  Args:
    tokens: 1-D ids of the corpus.
    seq_len: window length L of the forward passes (at most the models' `max_len`).
    teacher_forward, reference_forward: `(params, batch) -> {'logits': [B, L, V]}`.
    teacher_params, reference_params: their parameters.
    batch_size: windows per forward pass (divisible by the data devices when `place` shards).
    place: puts a host batch on devices (e.g. `kdjax.train.sharding.shard_batch(batch, mesh)`).

  Returns:
    float32 `[len(tokens)]`.
  """
  tokens = np.asarray(tokens)

  @jax.jit
  def ratios(teacher_params, reference_params, batch):
    mask = batch["mask"] > 0
    teacher_ce = losses.cross_entropy(teacher_forward(teacher_params, batch)["logits"], batch["targets"], where=mask)
    reference_ce = losses.cross_entropy(reference_forward(reference_params, batch)["logits"], batch["targets"],
                                        where=mask)
    return reference_ce - teacher_ce

  # Window w of the evaluation batches predicts ids w·L + 1 … w·L + L: in batch order, the
  # flattened [B, L] rows are the targets 1, 2, … in corpus order, then padding.
  flat = [np.asarray(jax.device_get(ratios(teacher_params, reference_params, place(batch)))).reshape(-1)
          for batch in lm_pipeline.eval_batches(tokens, seq_len=seq_len, batch_size=batch_size)]
  out = np.zeros(len(tokens), np.float32)
  if flat:
    out[1:] = np.concatenate(flat)[:len(tokens) - 1]
  return out


def _check_chunks(num_tokens: int, chunk_len: int) -> int:
  if chunk_len < 2:
    raise ValueError(f"chunk_len must be at least 2 (a chunk needs a predicted id), got {chunk_len}")
  if chunk_len > num_tokens:
    raise ValueError(f"chunk_len {chunk_len} is larger than the corpus of {num_tokens} ids")
  return num_tokens // chunk_len


def score_chunks(tokens: np.ndarray, *, chunk_len: int, seq_len: int, teacher_forward: Forward,
                 teacher_params: Any, reference_forward: Forward, reference_params: Any, batch_size: int,
                 place: Callable[[dict], dict] = lambda batch: batch) -> np.ndarray:
  """MiniPLM's score of every chunk: the mean over its predicted ids of log p_T − log p_ref.

  Chunk c is `tokens[c·C : (c+1)·C]`; chunk 0 has C − 1 predicted ids (x_0 has no context),
  every other chunk C. Arguments as for `token_log_ratios`.

  Returns:
    float64 `[len(tokens) // chunk_len]`.

  Raises:
    ValueError: for chunk_len < 2 or larger than the corpus.
  """
  tokens = np.asarray(tokens)
  num_chunks = _check_chunks(len(tokens), chunk_len)
  per_token = token_log_ratios(tokens, seq_len=seq_len, teacher_forward=teacher_forward,
                               teacher_params=teacher_params, reference_forward=reference_forward,
                               reference_params=reference_params, batch_size=batch_size, place=place)
  sums = per_token[:num_chunks * chunk_len].astype(np.float64).reshape(num_chunks, chunk_len).sum(axis=1)
  counts = np.full(num_chunks, float(chunk_len))
  counts[0] -= 1
  return sums / counts


def _keep_count(num_chunks: int, fraction: float) -> int:
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
  return max(1, math.floor(fraction * num_chunks + 0.5))


def select_chunks(scores: np.ndarray, fraction: float) -> np.ndarray:
  """Indices (ascending, i.e. corpus order) of the ⌊fraction · n⌉ highest-scoring chunks.

  Ties go to the earlier chunk. At least one chunk is kept.

  Raises:
    ValueError: for a fraction outside (0, 1], scores that are not 1-D, or a NaN score.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or not scores.size:
    raise ValueError(f"scores must be a non-empty 1-D array; got shape {scores.shape}")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  keep = _keep_count(scores.size, fraction)
  return np.sort(np.argsort(-scores, kind="stable")[:keep])


def random_chunks(num_chunks: int, fraction: float, *, seed: int) -> np.ndarray:
  """The control: as many chunks as `select_chunks` keeps, drawn uniformly without replacement."""
  if num_chunks < 1:
    raise ValueError(f"num_chunks must be positive, got {num_chunks}")
  keep = _keep_count(num_chunks, fraction)
  return np.sort(np.random.default_rng(seed).choice(num_chunks, size=keep, replace=False))


def refined_tokens(tokens: np.ndarray, chunk_len: int, keep: np.ndarray) -> np.ndarray:
  """The refined corpus: the kept chunks concatenated in corpus order.

  Raises:
    ValueError: for a bad chunk_len, or indices that repeat or fall outside the chunks.
  """
  tokens = np.asarray(tokens)
  num_chunks = _check_chunks(len(tokens), chunk_len)
  keep = np.sort(np.asarray(keep, np.int64).reshape(-1))
  if not keep.size:
    raise ValueError("keep selects no chunk")
  if keep[0] < 0 or keep[-1] >= num_chunks:
    raise ValueError(f"chunk indices must lie in [0, {num_chunks}); got {keep[0]} … {keep[-1]}")
  if np.any(np.diff(keep) == 0):
    raise ValueError("chunk indices repeat")
  return tokens[:num_chunks * chunk_len].reshape(num_chunks, chunk_len)[keep].reshape(-1)
