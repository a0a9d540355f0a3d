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
in the paper). Teacher-mixed sampling and the pre-training loss of the paper are not here: the
samples come from `kdjax.distill.on_policy.OnPolicyBatches`.
"""

from __future__ import annotations

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


def reverse_kl_policy_gradient(student_logits: Array, teacher_logits: Array, targets: Array, *,
                               where: Optional[Array] = None, gamma: float = 1.0, length_normalize: bool = True,
                               temperature=1.0) -> tuple[Array, dict[str, Array]]:
  """MiniLLM's surrogate loss per position (module docstring) for sampled continuations.

  Args:
    student_logits: `[..., L, V]` logits of the student on its own sampled sequence.
    teacher_logits: `[..., L, V]` the teacher's on the same sequence (a constant).
    targets: integer `[..., L]`, the sampled tokens y_t the logits at t predict.
    where: optional boolean `[..., L]`: the continuation's tokens (prompt and padding dropped).
    gamma: discount of future rewards.
    length_normalize: divide G_t by the number of future tokens summed.
    temperature: T of both distributions.

  Returns:
    (surrogate `[..., L]` whose gradient is the estimator, {'single_step': the exact per-token
    reverse KL `[..., L]`, 'reward': r_t `[..., L]`, 'future_return': G_t `[..., L]`}), all 0 on
    dropped positions.
  """
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  log_p = jax.lax.stop_gradient(log_p)
  keep = jnp.ones(log_q.shape[:-1], bool) if where is None else jnp.asarray(where, bool)
  single_step = common.finish(common.kl_from_log_probs(log_q, log_p), keep)
  index = jnp.asarray(targets, jnp.int32)[..., None]
  log_q_y = jnp.take_along_axis(log_q, index, axis=-1)[..., 0]
  log_p_y = jnp.take_along_axis(log_p, index, axis=-1)[..., 0]
  reward = jnp.where(keep, jax.lax.stop_gradient(log_p_y - log_q_y), 0.0)
  future, count = _future_returns(reward, keep, gamma)
  if length_normalize:
    future = jnp.where(count > 0, future / jnp.maximum(count, 1.0), 0.0)
  surrogate = single_step - jnp.where(keep, jax.lax.stop_gradient(future) * log_q_y, 0.0)
  return surrogate, {"single_step": single_step, "reward": reward, "future_return": future}
