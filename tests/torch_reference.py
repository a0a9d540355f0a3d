"""Independent PyTorch restatement of DistiLLM's logit losses, for the `torch_ref` parity tests.

DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language
Models", reference code `distillm/losses.py`) defines its losses on logits `[B, L, V]` and a
label tensor whose -100 entries mark ignored positions. Written out per position, with
p = softmax(z_t), q = softmax(z_s) and λ their `lam` argument:

  forward_kl         −Σ_v p·log q                                   (cross-entropy H(p, q))
  reverse_kl          Σ_v q·(log q − log p)                         (= KL(q ‖ p))
  skewed_forward_kl  −Σ_v p·log(λ·p + (1 − λ)·q)                    (cross-entropy H(p, m_λ))
  skewed_reverse_kl   Σ_v q·(log q − log((1 − λ)·p + λ·q))          (= KL(q ‖ m'_λ))
  js_distance         λ·KL(q ‖ m) + (1 − λ)·KL(p ‖ m),  m = (1 − λ)·p + λ·q
  tv_distance         ½ Σ_v |p − q|

Each is then averaged over the positions whose label is not -100 (Σ mask·value / Σ mask).
Vocabulary entries where either logit is ±inf are dropped from the inner sums (their
`inf_mask`). The mixtures are formed in probability space and then logged, as in their code.
So: DistiLLM's two "forward" losses are cross-entropies, KL + H(p); the reverse ones are
true KL divergences.

DistiLLM applies no temperature; `temperature` here divides both logit tensors first (T = 1
is their exact loss). `per_position=True` returns the `[B, L]` values before the masked mean.

This module imports torch at the top: import it only after `pytest.importorskip("torch")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _probs_and_logs(student_logits, teacher_logits, temperature):
  s = student_logits.float() / temperature
  t = teacher_logits.float() / temperature
  dropped = torch.isinf(s) | torch.isinf(t)
  return (F.softmax(t, dim=-1), F.log_softmax(t, dim=-1),
          F.softmax(s, dim=-1), F.log_softmax(s, dim=-1), dropped)


def _vocab_sum(terms, dropped):
  return torch.masked_fill(terms, dropped, 0.0).sum(dim=-1)


def _reduce(per_position, labels, per_position_only):
  if per_position_only:
    return per_position
  keep = (labels != IGNORE_INDEX).to(per_position.dtype)
  return (per_position * keep).sum() / keep.sum()


def forward_kl(student_logits, teacher_logits, labels, *, temperature=1.0, per_position=False):
  """DistiLLM `forward_kl`: −Σ p·log q, the cross-entropy (KL(p ‖ q) + H(p))."""
  p, _, _, log_q, dropped = _probs_and_logs(student_logits, teacher_logits, temperature)
  values = -_vocab_sum(p * log_q, dropped)
  return _reduce(values, labels, per_position)


def reverse_kl(student_logits, teacher_logits, labels, *, temperature=1.0, per_position=False):
  """DistiLLM `reverse_kl`: Σ q·(log q − log p) = KL(q ‖ p)."""
  _, log_p, q, log_q, dropped = _probs_and_logs(student_logits, teacher_logits, temperature)
  values = _vocab_sum(q * log_q, dropped) - _vocab_sum(q * log_p, dropped)
  return _reduce(values, labels, per_position)


def skewed_forward_kl(student_logits, teacher_logits, labels, *, lam=0.1, temperature=1.0,
                      per_position=False):
  """DistiLLM `skewed_forward_kl`: −Σ p·log(λ·p + (1 − λ)·q) = KL(p ‖ m_λ) + H(p)."""
  p, _, q, _, dropped = _probs_and_logs(student_logits, teacher_logits, temperature)
  log_mix = torch.log(lam * p + (1.0 - lam) * q)
  values = -_vocab_sum(p * log_mix, dropped)
  return _reduce(values, labels, per_position)


def skewed_reverse_kl(student_logits, teacher_logits, labels, *, lam=0.1, temperature=1.0,
                      per_position=False):
  """DistiLLM `skewed_reverse_kl`: Σ q·(log q − log((1 − λ)·p + λ·q)) = KL(q ‖ m'_λ)."""
  p, _, q, log_q, dropped = _probs_and_logs(student_logits, teacher_logits, temperature)
  log_mix = torch.log((1.0 - lam) * p + lam * q)
  values = _vocab_sum(q * log_q, dropped) - _vocab_sum(q * log_mix, dropped)
  return _reduce(values, labels, per_position)


def js_distance(student_logits, teacher_logits, labels, *, lam=0.9, temperature=1.0,
                per_position=False):
  """DistiLLM `js_distance`: λ·KL(q ‖ m) + (1 − λ)·KL(p ‖ m) with m = (1 − λ)·p + λ·q.

  This is GKD's generalized JSD with teacher weight β = 1 − λ.
  """
  p, log_p, q, log_q, dropped = _probs_and_logs(student_logits, teacher_logits, temperature)
  log_mix = torch.log((1.0 - lam) * p + lam * q)
  kl_q = _vocab_sum(q * log_q, dropped) - _vocab_sum(q * log_mix, dropped)
  kl_p = _vocab_sum(p * log_p, dropped) - _vocab_sum(p * log_mix, dropped)
  return _reduce(lam * kl_q + (1.0 - lam) * kl_p, labels, per_position)


def tv_distance(student_logits, teacher_logits, labels, *, temperature=1.0, per_position=False):
  """DistiLLM `tv_distance`: ½ Σ |p − q|."""
  p, _, q, _, dropped = _probs_and_logs(student_logits, teacher_logits, temperature)
  values = 0.5 * _vocab_sum(torch.abs(p - q), dropped)
  return _reduce(values, labels, per_position)


def teacher_entropy(teacher_logits, *, temperature=1.0):
  """H(p) = −Σ p·log p per position, the gap between DistiLLM's cross-entropy forms and KL."""
  t = teacher_logits.float() / temperature
  log_p = F.log_softmax(t, dim=-1)
  terms = torch.where(torch.isinf(t), torch.zeros_like(log_p), torch.exp(log_p) * log_p)
  return -terms.sum(dim=-1)
