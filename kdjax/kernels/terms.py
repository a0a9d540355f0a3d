"""The logit-divergence family as elementwise terms, shared by every fused implementation.

With s = z_s / T and t = z_t / T, log q = s − lse(s) (student) and log p = t − lse(t) (teacher),
each divergence of the family is a sum over the vocabulary of one elementwise term:

    D = Σ_v f(log p_v, log q_v).

Its gradient with respect to the student's tempered logits then needs only the elementwise
derivative g = ∂f/∂log q and one row scalar G = Σ_v g_v:

    ∂D/∂s_j = Σ_v g_v (δ_vj − q_j) = g_j − q_j · G,      ∂D/∂z_s = (g − q·G) / T.

So a fused implementation streams over vocabulary tiles three times at most: the online
log-sum-exp of both rows, then Σ f and Σ g with the normalisers known, and in the backward pass the
gradient tile by tile. No [tokens, vocab] probability array is ever stored. The teacher is a
constant of these functions (its gradient is not computed), as in every distillation step.

Conventions match `kdjax.losses`: 0·log 0 = 0, so ids with −inf logits in both models contribute
nothing; a term with mass on one side where the other has none is +inf (the true value).

| name | f(log p, log q) | g = ∂f/∂log q |
|---|---|---|
| forward_kl | p (log p − log q) | −p |
| reverse_kl | q (log q − log p) | q (log q − log p + 1) |
| generalized_jsd(β) | β p (log p − log m) + (1−β) q (log q − log m), m = βp + (1−β)q | (1−β) q (log q − log m) |
| total_variation | ½ \\|p − q\\| | ½ sign(q − p) q |
| skew_kl(α) | p (log p − log m), m = αp + (1−α)q | −(1−α) p q / m |
| skew_reverse_kl(α) | q (log q − log m), m = (1−α)p + αq | q (log q − log m + 1) − α q² / m |
| hinton_kd | T² · forward_kl | T² · (−p) |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# (log p, log q, coefficient) -> elementwise array
Term = Callable[[Array, Array, float], Array]


def _weighted_log_ratio(log_a: Array, log_b: Array) -> Array:
  """a · (log a − log b), with 0 where a = 0 (also when b = 0 there) and +inf where only b = 0."""
  return jnp.where(log_a > -jnp.inf, jnp.exp(log_a) * (log_a - log_b), 0.0)


def _log_mix(log_a: Array, log_b: Array, weight_a: float) -> Array:
  """log(w·a + (1 − w)·b) for a Python weight w in [0, 1]; −inf where both are 0."""
  if weight_a == 0.0:
    return log_b
  if weight_a == 1.0:
    return log_a
  return jnp.logaddexp(math.log(weight_a) + log_a, math.log1p(-weight_a) + log_b)


def _forward_kl(lp, lq, c):
  del c
  return _weighted_log_ratio(lp, lq)


def _forward_kl_grad(lp, lq, c):
  del lq, c
  return -jnp.exp(lp)


def _reverse_kl(lp, lq, c):
  del c
  return _weighted_log_ratio(lq, lp)


def _reverse_kl_grad(lp, lq, c):
  del c
  return jnp.where(lq > -jnp.inf, jnp.exp(lq) * (lq - lp + 1.0), 0.0)


def _jsd(lp, lq, beta):
  lm = _log_mix(lp, lq, beta)
  return beta * _weighted_log_ratio(lp, lm) + (1.0 - beta) * _weighted_log_ratio(lq, lm)


def _jsd_grad(lp, lq, beta):
  return (1.0 - beta) * _weighted_log_ratio(lq, _log_mix(lp, lq, beta))


def _tvd(lp, lq, c):
  del c
  return 0.5 * jnp.abs(jnp.exp(lp) - jnp.exp(lq))


def _tvd_grad(lp, lq, c):
  del c
  q = jnp.exp(lq)
  return 0.5 * jnp.sign(q - jnp.exp(lp)) * q


def _skew_kl(lp, lq, alpha):
  return _weighted_log_ratio(lp, _log_mix(lp, lq, alpha))


def _skew_kl_grad(lp, lq, alpha):
  lm = _log_mix(lp, lq, alpha)
  both = (lp > -jnp.inf) & (lq > -jnp.inf)
  return jnp.where(both, -(1.0 - alpha) * jnp.exp(lp + lq - jnp.where(both, lm, 0.0)), 0.0)


def _skew_reverse_kl(lp, lq, alpha):
  return _weighted_log_ratio(lq, _log_mix(lq, lp, alpha))


def _skew_reverse_kl_grad(lp, lq, alpha):
  lm = _log_mix(lq, lp, alpha)
  present = lq > -jnp.inf
  safe_lm = jnp.where(present, lm, 0.0)
  return jnp.where(present, jnp.exp(lq) * (lq - lm + 1.0) - alpha * jnp.exp(2.0 * lq - safe_lm), 0.0)


@dataclasses.dataclass(frozen=True)
class Divergence:
  """One member of the family: its term, the term's derivative in log q, and its coefficient.

  Attributes:
    name: the name `kdjax.losses` gives it.
    term: f(log p, log q, coefficient).
    grad: g(log p, log q, coefficient) = ∂f/∂log q.
    coefficient: β of the JSD or α of the skew divergences (0 where unused); a Python float,
      because it selects code paths (the endpoints) and enters as a compile-time constant.
    t_squared: multiply value and gradient by T² (Hinton's form).
  """

  name: str
  term: Term
  grad: Term
  coefficient: float = 0.0
  t_squared: bool = False

  def value_scale(self, temperature):
    """T² for Hinton's form, else 1: the factor on the value (and so on its gradient)."""
    return temperature**2 if self.t_squared else 1.0

  def row_factor(self, keep: Array, temperature) -> Array:
    """Per-row factor on Σ_v f: `value_scale`, and 0 on dropped rows."""
    return jnp.where(keep, self.value_scale(temperature), 0.0)

  def grad_row_scale(self, keep: Array, temperature, cotangent: Array) -> Array:
    """Per-row factor on (g − q·G) in the backward pass: cotangent · value_scale / T (∂s/∂z_s is
    1/T), and 0 on dropped rows."""
    return jnp.where(keep, cotangent * self.value_scale(temperature) / temperature, 0.0)

  def value_terms(self, log_p: Array, log_q: Array) -> Array:
    return self.term(log_p, log_q, self.coefficient)

  def grad_terms(self, log_p: Array, log_q: Array) -> Array:
    return self.grad(log_p, log_q, self.coefficient)


_FAMILY = {
    "forward_kl": (_forward_kl, _forward_kl_grad, None),
    "reverse_kl": (_reverse_kl, _reverse_kl_grad, None),
    "generalized_jsd": (_jsd, _jsd_grad, "beta"),
    "total_variation": (_tvd, _tvd_grad, None),
    "skew_kl": (_skew_kl, _skew_kl_grad, "alpha"),
    "skew_reverse_kl": (_skew_reverse_kl, _skew_reverse_kl_grad, "alpha"),
    "hinton_kd": (_forward_kl, _forward_kl_grad, None),
}
# kdjax.losses' defaults for the coefficients.
_DEFAULTS = {"beta": 0.5, "alpha": 0.1}
NAMES = tuple(_FAMILY)


def divergence(name: str, **coefficients) -> Divergence:
  """The family member `name` with its coefficient (beta for the JSD, alpha for the skew ones).

  The JSD's endpoints follow `kdjax.losses.generalized_jsd`: β = 0 is forward KL(p ‖ q) and
  β = 1 reverse KL(q ‖ p) (the interior formula is identically 0 there).

  Raises:
    ValueError: for an unknown name, an unknown or missing-valued coefficient, or a coefficient
      outside [0, 1].
  """
  if name not in _FAMILY:
    raise ValueError(f"unknown divergence {name!r} for the fused kernels; known: {sorted(_FAMILY)}")
  term, grad, key = _FAMILY[name]
  unknown = set(coefficients) - ({key} if key else set())
  if unknown:
    raise ValueError(f"{name} takes {'no coefficient' if key is None else repr(key)}, got {sorted(unknown)}")
  value = 0.0
  if key is not None:
    value = coefficients.get(key, _DEFAULTS[key])
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} needs a Python number {key} in [0, 1], got {value!r}")
    value = float(value)
  if name == "generalized_jsd" and value in (0.0, 1.0):
    return divergence("forward_kl" if value == 0.0 else "reverse_kl")
  return Divergence(name, term, grad, value, t_squared=name == "hinton_kd")
