"""MiniLLM's policy-gradient surrogate: unbiased for the sequence-level reverse KL (checked by
enumerating every sequence of a tabular student), its returns and normalisation against NumPy,
and the strategy built from a config."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import losses
from kdjax.distill import strategies
from kdjax.distill.minillm import MiniLLMDistillation

V, L = 3, 3  # 27 sequences


def _tabular_logits(table, sequence):
  """Logits at each position of `sequence` from a table indexed by the previous token (a Markov
  student/teacher: position 0 reads row V, the start state)."""
  previous = jnp.asarray((V,) + tuple(sequence[:-1]))
  return table[previous]


def _sequence_log_prob(table, sequence):
  log_probs = jax.nn.log_softmax(_tabular_logits(table, sequence), -1)
  return jnp.sum(log_probs[jnp.arange(L), jnp.asarray(sequence)])


def test_surrogate_is_an_unbiased_gradient_of_sequence_reverse_kl():
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(V + 1, V)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(V + 1, V)) * 2, jnp.float32)
  sequences = list(itertools.product(range(V), repeat=L))

  def sequence_kl(table):
    log_q = jnp.stack([_sequence_log_prob(table, s) for s in sequences])
    log_p = jnp.stack([_sequence_log_prob(teacher, s) for s in sequences])
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p))

  def expected_estimator(table):
    # E_{y~q}[∇ surrogate(y)]: the sequence weights are the sampling distribution, not trained.
    weights = jax.lax.stop_gradient(jnp.exp(jnp.stack([_sequence_log_prob(table, s) for s in sequences])))
    total = 0.0
    for weight, s in zip(weights, sequences):
      surrogate, _ = losses.reverse_kl_policy_gradient(_tabular_logits(table, s)[None],
                                                       _tabular_logits(teacher, s)[None], jnp.asarray(s)[None],
                                                       length_normalize=False)
      total = total + weight * jnp.sum(surrogate)
    return total

  want = jax.grad(sequence_kl)(student)
  got = jax.grad(expected_estimator)(student)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Without the long-term term (only the exact per-token KL) the estimator is biased: the test can fail.
  single_only = jax.grad(lambda t: jnp.sum(jnp.stack([
      jax.lax.stop_gradient(jnp.exp(_sequence_log_prob(t, s))) * jnp.sum(losses.reverse_kl_policy_gradient(
          _tabular_logits(t, s)[None], _tabular_logits(teacher, s)[None], jnp.asarray(s)[None],
          length_normalize=False)[1]["single_step"]) for s in sequences])))(student)
  assert not np.allclose(single_only, want, rtol=1e-2, atol=1e-3)


def test_returns_and_length_normalisation_against_numpy():
  rng = np.random.default_rng(1)
  zs, zt = (jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32) for _ in range(2))
  targets = jnp.asarray(rng.integers(0, 5, (2, 6)))
  mask = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], bool)
  for gamma, normalize in ((1.0, True), (0.9, False)):
    surrogate, parts = losses.reverse_kl_policy_gradient(zs, zt, targets, where=mask, gamma=gamma,
                                                         length_normalize=normalize)
    log_q, log_p = np.asarray(jax.nn.log_softmax(zs)), np.asarray(jax.nn.log_softmax(zt))
    pick = lambda a: np.take_along_axis(a, np.asarray(targets)[..., None], -1)[..., 0]  # noqa: E731
    reward = np.where(mask, pick(log_p) - pick(log_q), 0.0)
    future = np.zeros_like(reward)
    for b in range(2):
      for t in range(6):
        later = [u for u in range(t + 1, 6) if mask[b, u]]
        total = sum(gamma ** i * reward[b, u] for i, u in enumerate(later))
        future[b, t] = total / len(later) if normalize and later else (total if later else 0.0)
    future = np.where(mask, future, 0.0)
    np.testing.assert_allclose(parts["reward"], reward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(mask, parts["future_return"], 0.0), future, rtol=1e-5, atol=1e-6)
    single = np.where(mask, (np.exp(log_q) * (log_q - log_p)).sum(-1), 0.0)
    np.testing.assert_allclose(parts["single_step"], single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(surrogate, np.where(mask, single - future * pick(log_q), 0.0), rtol=1e-5, atol=1e-6)


def test_strategy_from_config():
  strategy = strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="minillm", gamma=0.95)))
  assert isinstance(strategy, MiniLLMDistillation) and strategy.uses_teacher
  rng = np.random.default_rng(2)
  zs, zt = (jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32) for _ in range(2))
  batch = {"targets": jnp.asarray(rng.integers(0, 5, (2, 4))), "mask": jnp.asarray([[0, 1, 1, 1], [0, 1, 1, 0.0]])}
  loss, metrics = strategy({"logits": zs}, {"logits": zt}, batch, 0)
  surrogate, _ = losses.reverse_kl_policy_gradient(zs, zt, batch["targets"], where=batch["mask"] > 0, gamma=0.95)
  np.testing.assert_allclose(loss, jnp.sum(surrogate) / 5.0, rtol=1e-5)
  assert float(metrics["kd"][1]) == 5.0
  with pytest.raises(ValueError, match="gamma"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="minillm", gamma=1.5)))
