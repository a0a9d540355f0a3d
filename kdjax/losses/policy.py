"""Sequence-level reverse KL by policy gradient: MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge
Distillation of Large Language Models").

The objective is the reverse KL between whole continuations y ~ q of the student and the teacher,

    KL(q ‖ p) = E_{y~q} [ Σ_t log q(y_t | y_<t) − log p(y_t | y_<t) ],

whose gradient, by the policy-gradient theorem and MiniLLM's single-step decomposition, is the
expectation over the student's samples of

    ∇ Σ_t [ KL(q(· | y_<t) ‖ p(· | y_<t))  −  sg(G_t) · log q(y_t | y_<t) ],
    G_t = Σ_{t' > t} γ^{t'−t−1} r_t',     r_t = log p(y_t | y_<t) − log q(y_t | y_<t)   (no gradient).

The first term is the exact per-token reverse KL of the next-token distributions (it replaces the
noisy single-step reward); the second carries the long-term reward of the tokens after t. With
γ = 1 and no normalisation its expectation under q is exactly ∇ KL(q ‖ p) of the sequences (the
tests check this by enumerating every sequence). MiniLLM's length normalisation divides G_t by
the number of future tokens it sums, which keeps long continuations from dominating (biased, as
in the paper).

Teacher-mixed sampling. MiniLLM draws the continuations token by token from
p̃ = α·p + (1 − α)·q (α = 0.2; `kdjax.models.sampling.generate_mixture`), which keeps early,
poor students from sampling degenerate text that the teacher rewards wrongly, and corrects with
the per-token ratios ρ_t = q(y_t | y_<t) / p̃(y_t | y_<t) (no gradient). Two weightings:

  * 'sequence' (exact): the expectation under q of a term that depends on y_≤s is the
    expectation under p̃ of that term times W_s = Π_{t ≤ s} ρ_t. The single-step KL at t depends
    on y_<t and takes W_{t−1}; each reward r_t' in G_t (and the log q(y_t) it multiplies) takes
    W_t'. With γ = 1, no normalisation and no clipping the estimator is unbiased for
    ∇ KL(q ‖ p) of the sequences (tested by enumeration), but W_t's variance grows with t.
  * 'token' (the paper's Eq. 7 with w_t ≈ ρ_t, and its reference code): the long-term term is
    weighted by ρ_t alone and G_t is left unweighted. The single-step term is left unweighted:
    the paper's ρ_t factor on it has conditional mean E_{y_t~p̃}[ρ_t] = 1 and only adds noise, and
    the reference code applies none. Biased whenever the prefix or the future is drawn from p̃,
    but with ρ_t ≤ 1/(1 − α) it has low variance.

`ratio_clip` c truncates the weight (ρ_t, or W_t) at c, as truncated importance sampling does:
variance is bounded and the bias falls only on tokens the student likes more than p̃ does. (The
reference code instead clips ρ_t·(new/old policy ratio) into [1 − ε, 1 + ε] in PPO's pessimistic
min; with one update per sample that ratio is 1 and the clip only drops the gradient of tokens
outside the band.) With α = 0 and no `sample_log_probs` every weight is 1 and the surrogate is
the on-policy one above.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common

Array = jax.Array


def _future_returns(rewards: Array, mask: Array, gamma: float) -> tuple[Array, Array]:
  """(G_t, the count of future tokens) over the last axis: sums of later masked rewards only."""
  def step(carry, inputs):
    total, count = carry
    reward, keep = inputs
    # G_t sees tokens after t: emit before adding this token.
    out = (total, count)
    total = jnp.where(keep, reward + gamma * total, total)
    count = jnp.where(keep, 1.0 + count, count)
    return (total, count), out

  zeros = jnp.zeros(rewards.shape[:-1], rewards.dtype)
  reversed_inputs = (jnp.moveaxis(rewards, -1, 0)[::-1], jnp.moveaxis(mask, -1, 0)[::-1])
  _, (totals, counts) = jax.lax.scan(step, (zeros, zeros), reversed_inputs)
  return jnp.moveaxis(totals[::-1], 0, -1), jnp.moveaxis(counts[::-1], 0, -1)


IMPORTANCE = ("token", "sequence")


def reverse_kl_policy_gradient(student_logits: Array, teacher_logits: Array, targets: Array, *,
                               where: Optional[Array] = None, gamma: float = 1.0, length_normalize: bool = True,
                               temperature=1.0, teacher_mix: float = 0.0, sample_log_probs: Optional[Array] = None,
                               importance: str = "token",
                               ratio_clip: Optional[float] = None) -> tuple[Array, dict[str, Array]]:
  """MiniLLM's surrogate loss per position (module docstring) for sampled continuations.

  Args:
    student_logits: `[..., L, V]` logits of the student on the sampled sequence.
    teacher_logits: `[..., L, V]` the teacher's on the same sequence (a constant).
    targets: integer `[..., L]`, the sampled tokens y_t the logits at t predict.
    where: optional boolean `[..., L]`: the continuation's tokens (prompt and padding dropped).
    gamma: discount of future rewards.
    length_normalize: divide G_t by the number of future tokens summed.
    temperature: T of both distributions.
    teacher_mix: α of the sampling mixture p̃ = α·p + (1 − α)·q, recomputed from the logits at T
      (exact when the sampler drew at that temperature without top-k / top-p); 0: the student's
      own samples.
    sample_log_probs: optional `[..., L]` log-probability of each target under the distribution
      it was actually drawn from (`kdjax.models.sampling.completion_log_probs`); when given it
      replaces the recomputed log p̃ and `teacher_mix` is unused.
    importance: 'token' (the paper's per-token ratio) or 'sequence' (exact prefix products).
    ratio_clip: truncate the importance weights at this value (>= 1); None leaves them.

  Returns:
    (surrogate `[..., L]` whose gradient is the estimator, {'single_step': the exact per-token
    reverse KL `[..., L]`, 'reward': r_t `[..., L]`, 'future_return': the (weighted) G_t `[..., L]`,
    'weight': ρ_t ('token') or W_t ('sequence') after clipping `[..., L]`}), all 0 (weights 1) on
    dropped positions.

  Raises:
    ValueError: on an unknown `importance`, α outside [0, 1] or a clip below 1.
  """
  check_importance(teacher_mix, importance, ratio_clip)
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  log_p = jax.lax.stop_gradient(log_p)
  keep = jnp.ones(log_q.shape[:-1], bool) if where is None else jnp.asarray(where, bool)
  single_step = common.finish(common.kl_from_log_probs(log_q, log_p), keep)
  index = jnp.asarray(targets, jnp.int32)[..., None]
  log_q_y = jnp.take_along_axis(log_q, index, axis=-1)[..., 0]
  log_p_y = jnp.take_along_axis(log_p, index, axis=-1)[..., 0]
  reward = jnp.where(keep, jax.lax.stop_gradient(log_p_y - log_q_y), 0.0)
  log_rho = _log_ratios(log_q_y, log_p_y, keep, teacher_mix, sample_log_probs)
  log_clip = jnp.inf if ratio_clip is None else jnp.log(ratio_clip)
  # Three places take an expectation under q: the single-step KL (a function of y_<t), each reward
  # r_t' summed into G_t (of y_≤t'), and the log q(y_t) that G_t multiplies; each gets its weight.
  if importance == "token":
    weight = jnp.exp(jnp.minimum(log_rho, log_clip))
    single_weight, reward_weight, action_weight = 1.0, 1.0, weight
  else:
    cumulative = jnp.cumsum(log_rho, axis=-1)
    weight = jnp.exp(jnp.minimum(cumulative, log_clip))
    single_weight, reward_weight, action_weight = jnp.exp(jnp.minimum(cumulative - log_rho, log_clip)), weight, 1.0
  future, count = _future_returns(reward * reward_weight, keep, gamma)
  if length_normalize:
    future = jnp.where(count > 0, future / jnp.maximum(count, 1.0), 0.0)
  surrogate = single_weight * single_step - jnp.where(keep, jax.lax.stop_gradient(future) * action_weight * log_q_y,
                                                      0.0)
  return surrogate, {"single_step": single_step, "reward": reward, "future_return": future,
                     "weight": jnp.where(keep, weight, 1.0)}


def check_importance(teacher_mix, importance: str, ratio_clip) -> None:
  """Raises a ValueError naming the bad importance-sampling setting."""
  if importance not in IMPORTANCE:
    raise ValueError(f"unknown importance weighting {importance!r}; known: {IMPORTANCE}")
  if isinstance(teacher_mix, bool) or not isinstance(teacher_mix, numbers.Real) or not 0.0 <= teacher_mix <= 1.0:
    raise ValueError(f"teacher_mix α must be a number in [0, 1], got {teacher_mix!r}")
  if ratio_clip is not None and not ratio_clip >= 1.0:
    raise ValueError(f"ratio_clip must be None or at least 1 (a clip below 1 would down-weight on-policy tokens), "
                     f"got {ratio_clip!r}")


def _log_ratios(log_q_y: Array, log_p_y: Array, keep: Array, teacher_mix: float,
                sample_log_probs: Optional[Array]) -> Array:
  """log ρ_t = log q(y_t) − log p̃(y_t) on kept positions (0 elsewhere), without gradient."""
  if sample_log_probs is None and teacher_mix == 0:
    return jnp.zeros(keep.shape, log_q_y.dtype)  # on-policy: exactly 1, even where q(y_t) = 0
  if sample_log_probs is None:
    log_sample = common.log_mixture(log_p_y, log_q_y, teacher_mix)
  else:
    if jnp.shape(sample_log_probs) != keep.shape:
      raise ValueError(f"sample_log_probs has shape {jnp.shape(sample_log_probs)}, expected the targets' {keep.shape}")
    log_sample = jnp.asarray(sample_log_probs, log_q_y.dtype)
  return jnp.where(keep, jax.lax.stop_gradient(log_q_y - log_sample), 0.0)
