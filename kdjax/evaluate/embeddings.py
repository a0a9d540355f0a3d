"""How closely a student's sentence embeddings follow a teacher's, on one set of held-out sentences.

Three measurements of `[N, D_s]` student and `[N, D_t]` teacher embeddings of the same N sentences
(row i of both is sentence i), in float64 on the host:

  * `mean_cosine`: (1/N) Σ_i cos(s_i, t_i), which needs D_s = D_t (a student of another width is
    compared through its learned projection, `kdjax.distill.sentence`);
  * `neighbour_recall` at k: with T_k(i) the teacher's k nearest neighbours of sentence i among the
    other N − 1 (by cosine) and S_k(i) the student's, (1/N) Σ_i |S_k(i) ∩ T_k(i)| / k. At k = 1 it is
    the fraction of sentences whose nearest neighbour the student gets right: the retrieval behaviour
    a sentence embedding is used for, and invariant to any rotation of the student's space;
  * `similarity_spearman`: Spearman's rank correlation between the student's and the teacher's
    cosine similarities over all N(N − 1)/2 pairs i < j (ties get average ranks), the proxy that STS
    benchmarks report; it asks only that the student order the pairs as the teacher does.

The last two compare each model with itself first, so they apply to any pair of widths.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check_rows(student: np.ndarray, teacher: np.ndarray, *, same_width: bool = False) -> tuple[np.ndarray, np.ndarray]:
  s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  if s.ndim != 2 or t.ndim != 2 or s.shape[0] != t.shape[0]:
    raise ValueError(f"embeddings must be [N, D] with the same N sentences; got student {s.shape}, teacher {t.shape}")
  if same_width and s.shape[1] != t.shape[1]:
    raise ValueError(f"student {s.shape} and teacher {t.shape} embeddings differ in width: compare the student "
                     "through its projection")
  if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
    raise ValueError("embeddings contain NaN or infinite values")
  return s, t


def _unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_similarities(x: np.ndarray) -> np.ndarray:
  """`[N, N]` cosines between the rows of `x` (a zero row has cosine 0 with everything)."""
  u = _unit_rows(np.asarray(x, np.float64))
  return u @ u.T


def mean_cosine(student: np.ndarray, teacher: np.ndarray) -> float:
  """(1/N) Σ_i cos(s_i, t_i) for `[N, D]` embeddings of one width."""
  s, t = _check_rows(student, teacher, same_width=True)
  return float(np.mean(np.sum(_unit_rows(s) * _unit_rows(t), axis=1)))


def nearest_neighbours(x: np.ndarray, k: int) -> np.ndarray:
  """`[N, k]` indices of each row's k most cosine-similar other rows, most similar first; equal
  similarities are broken by the lower index (a stable sort), so the result is deterministic."""
  sims = cosine_similarities(x)
  np.fill_diagonal(sims, -np.inf)
  return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _check_k(k: int, n: int) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
    raise ValueError(f"k must be an int in [1, N - 1] = [1, {n - 1}] (neighbours among the other sentences), got {k!r}")


def neighbour_recall(student: np.ndarray, teacher: np.ndarray, k: int) -> float:
  """(1/N) Σ_i |S_k(i) ∩ T_k(i)| / k: the share of the teacher's k nearest neighbours that the
  student also ranks among its k nearest (self excluded)."""
  s, t = _check_rows(student, teacher)
  n = s.shape[0]
  _check_k(k, n)
  in_teacher = np.zeros((n, n), bool)
  np.put_along_axis(in_teacher, nearest_neighbours(t, k), True, axis=1)
  return float(np.mean(np.take_along_axis(in_teacher, nearest_neighbours(s, k), axis=1).sum(axis=1) / k))


def average_ranks(x: np.ndarray) -> np.ndarray:
  """0-based ranks of a 1-D array, tied values sharing the mean of the ranks they span."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  ordered = x[order]
  starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
  counts = np.diff(np.r_[starts, len(x)])
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(starts + (counts - 1) / 2.0, counts)
  return ranks


def similarity_spearman(student: np.ndarray, teacher: np.ndarray) -> float:
  """Spearman's ρ between the two models' cosine similarities of every pair i < j.

  ρ is the Pearson correlation of the average ranks; it is 0 (not NaN) when either model gives all
  pairs the same similarity.
  """
  s, t = _check_rows(student, teacher)
  n = s.shape[0]
  if n < 3:
    raise ValueError(f"a rank correlation over pairs needs at least 3 sentences, got {n}")
  upper = np.triu_indices(n, k=1)
  rs, rt = (average_ranks(cosine_similarities(x)[upper]) for x in (s, t))
  rs, rt = rs - rs.mean(), rt - rt.mean()
  denominator = np.sqrt(np.sum(rs * rs) * np.sum(rt * rt))
  return float(np.sum(rs * rt) / denominator) if denominator > 0 else 0.0


def embedding_agreement(student: np.ndarray, teacher: np.ndarray, *, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """`{'cosine' (when widths match), 'recall@k' for each k, 'spearman'}` of `[N, D]` embeddings."""
  s, t = _check_rows(student, teacher)
  out = {"cosine": mean_cosine(s, t)} if s.shape[1] == t.shape[1] else {}
  for k in ks:
    out[f"recall@{k}"] = neighbour_recall(s, t, k)
  out["spearman"] = similarity_spearman(s, t)
  return out
