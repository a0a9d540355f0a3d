"""The fused divergence against a sparse top-k teacher (`kdjax.kernels.fused_topk_divergence`).

References, all independent of `kdjax.kernels`: `kdjax.losses.topk_divergence` for forward and
reverse KL (itself checked against NumPy in test_losses.py); for the whole family, the dense
`kdjax.losses` divergences applied to the outcome log-probabilities built with whole-row
log-sum-exps (values and autodiff gradients), and a float64 NumPy formula for the values. The
streamed implementations run with V = 301 in tiles of 64 (a clamped last tile) and N = 11 (a
padded row block in the kernel); the kernel runs interpreted on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from kdjax import kernels, losses

N, V, K, TILE = 11, 301, 7, 64
STREAMED = ["tiled", "pallas"]
FAMILY = [
    ("forward_kl", {}, losses.forward_kl, ref.forward_kl),
    ("reverse_kl", {}, losses.reverse_kl, ref.reverse_kl),
    ("generalized_jsd", {"beta": 0.3}, lambda s, t, **k: losses.generalized_jsd(s, t, beta=0.3, **k),
     lambda s, t, **k: ref.generalized_jsd(s, t, beta=0.3, **k)),
    ("total_variation", {}, losses.total_variation, ref.total_variation),
    ("skew_kl", {"alpha": 0.2}, lambda s, t, **k: losses.skew_kl(s, t, alpha=0.2, **k),
     lambda s, t, **k: ref.skew_kl(s, t, alpha=0.2, **k)),
    ("skew_reverse_kl", {"alpha": 0.2}, lambda s, t, **k: losses.skew_reverse_kl(s, t, alpha=0.2, **k),
     lambda s, t, **k: ref.skew_reverse_kl(s, t, alpha=0.2, **k)),
    ("hinton_kd", {}, losses.hinton_kd, ref.hinton_kd),
]


def _problem(seed, *, scale=3.0):
  rng = np.random.default_rng(seed)
  student = jnp.asarray(rng.normal(size=(N, V)) * scale, jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(N, V)) * scale, jnp.float32)
  keep = np.ones(N, bool)
  keep[[2, 7]] = False
  weights = jnp.asarray(rng.random(N) + 0.5, jnp.float32)
  return student, teacher, jnp.asarray(keep), weights


def _value_and_grad(fn, student, weights):
  """(per-row values, the gradient of their weighted sum)."""
  return fn(student), jax.grad(lambda z: jnp.sum(fn(z) * weights))(student)


def _close(got, want, err_msg="", rtol=1e-5, atol=3e-6):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol, err_msg=err_msg)


def _outcome_log_probs(student, values, indices, temperature, tail):
  """(log q, log p) over the outcomes, with whole-row log-sum-exps (autodiff-able in the student)."""
  s = student / temperature
  s_support = jnp.take_along_axis(s, indices, axis=1)
  if tail == "renormalize":
    return jax.nn.log_softmax(s_support), jax.nn.log_softmax(values / temperature)
  lse = jax.nn.logsumexp(s, axis=1, keepdims=True)
  outside = jnp.ones(s.shape, bool).at[jnp.arange(N)[:, None], indices].set(False)
  lse_tail = jax.nn.logsumexp(jnp.where(outside, s, -jnp.inf), axis=1, keepdims=True)
  log_p_tail = jnp.log(1.0 - jnp.sum(jnp.exp(values), axis=1, keepdims=True))
  return (jnp.concatenate([s_support - lse, lse_tail - lse], axis=1),
          jnp.concatenate([values, log_p_tail], axis=1))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("implementation", ["naive"] + STREAMED)
def test_kl_equals_the_sparse_losses(tail, implementation):
  """Forward and reverse KL: values and weighted-sum gradients equal `losses.topk_divergence`, with
  NaN logits and out-of-range ids on dropped rows."""
  student, teacher, keep, weights = _problem(0)
  garbage = student.at[2].set(jnp.nan)
  for temperature in (1.0, 2.5):
    values, indices = losses.teacher_topk(teacher, K, temperature=temperature, log_probs=tail == "bucket")
    bad_indices = indices.at[7].set(V + 5)
    for divergence in ("forward_kl", "reverse_kl"):
      want, want_grad = _value_and_grad(lambda z: losses.topk_divergence(
          z, values, indices, divergence=divergence, tail=tail, temperature=temperature, where=keep), student, weights)
      got, got_grad = _value_and_grad(lambda z: kernels.fused_topk_divergence(
          z, values, bad_indices, divergence=divergence, tail=tail, temperature=temperature, where=keep,
          implementation=implementation, tile=TILE), garbage, weights)
      _close(got, want, f"{divergence} T={temperature}")
      _close(got_grad, want_grad, f"{divergence} T={temperature}")
      assert np.all(np.asarray(got)[~np.asarray(keep)] == 0.0)
      assert np.all(np.asarray(got_grad)[~np.asarray(keep)] == 0.0)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_family_equals_dense_losses_over_the_outcomes(tail):
  """Every divergence of the family: over the outcomes (the support, plus the tail bucket) it is the
  dense divergence of the outcome distributions, in value (also against float64 NumPy) and gradient."""
  student, teacher, keep, weights = _problem(1)
  temperature = 1.7
  values, indices = losses.teacher_topk(teacher, K, temperature=temperature, log_probs=tail == "bucket")
  log_q, log_p = _outcome_log_probs(student, values, indices, temperature, tail)
  for name, coefficients, dense, numpy_fn in FAMILY:
    # The outcome log-probabilities are normalised, so the dense losses' log-softmax at T = 1
    # leaves them as they are; Hinton's T² is that of the loss's temperature.
    scale = temperature**2 if name == "hinton_kd" else 1.0
    fn = lambda lq, lp: dense(lq, lp, where=keep) * scale  # noqa: E731
    want, want_grad = _value_and_grad(lambda z: fn(_outcome_log_probs(z, values, indices, temperature, tail)[0],
                                                   log_p), student, weights)
    numpy_want = numpy_fn(np.asarray(log_q), np.asarray(log_p), where=np.asarray(keep)) * scale
    for implementation in STREAMED:
      got, got_grad = _value_and_grad(lambda z: kernels.fused_topk_divergence(
          z, values, indices, divergence=name, tail=tail, temperature=temperature, where=keep,
          implementation=implementation, tile=TILE, **coefficients), student, weights)
      _close(got, want, f"{name} {implementation}")
      _close(got, numpy_want, f"{name} {implementation} vs NumPy", rtol=2e-5)
      _close(got_grad, want_grad, f"{name} {implementation}")


@pytest.mark.parametrize("implementation", STREAMED)
def test_confident_student_tail_is_summed_not_subtracted(implementation):
  """A student with ~1e-20 of its mass outside the support: the tail log-mass comes from its own
  ids (a difference of sums would give log 0 = −inf and an infinite forward KL)."""
  student, teacher, keep, weights = _problem(2)
  values, indices = losses.teacher_topk(teacher, K, log_probs=True)
  confident = student.at[jnp.arange(N)[:, None], indices].add(60.0)
  for divergence in ("forward_kl", "reverse_kl"):
    want, want_grad = _value_and_grad(lambda z: losses.topk_divergence(
        z, values, indices, divergence=divergence, tail="bucket", where=keep), confident, weights)
    got, got_grad = _value_and_grad(lambda z: kernels.fused_topk_divergence(
        z, values, indices, divergence=divergence, tail="bucket", where=keep, implementation=implementation,
        tile=TILE), confident, weights)
    assert np.all(np.isfinite(np.asarray(got))) and np.all(np.isfinite(np.asarray(got_grad)))
    _close(got, want, divergence, rtol=1e-4)
    _close(got_grad, want_grad, divergence, rtol=1e-4)


@pytest.mark.parametrize("implementation", STREAMED)
def test_bfloat16_softcap_absent_ids_and_full_support(implementation):
  """bf16 logits (float32 values, bf16 gradient), a soft cap on the student, −inf ids outside the
  support, and k = V, where both tails are the dense divergence."""
  student, teacher, keep, weights = _problem(3, scale=8.0)
  values, indices = losses.teacher_topk(teacher, K, log_probs=True)
  absent = student.at[:, 5].set(-jnp.inf).at[jnp.arange(N)[:, None], indices].set(student[jnp.arange(N)[:, None],
                                                                                          indices])
  cap = 6.0
  capped = lambda z: cap * jnp.tanh(z / cap)  # noqa: E731
  for tail in ("renormalize", "bucket"):
    tail_values = values if tail == "bucket" else jnp.take_along_axis(teacher, indices, axis=1)
    want, want_grad = _value_and_grad(lambda z: losses.topk_divergence(
        capped(z), tail_values, indices, tail=tail, where=keep), absent, weights)
    got, got_grad = _value_and_grad(lambda z: kernels.fused_topk_divergence(
        z, tail_values, indices, tail=tail, where=keep, softcap=cap, implementation=implementation, tile=TILE),
        absent, weights)
    _close(got, want, tail)
    _close(got_grad, want_grad, tail)
    assert np.all(np.isfinite(np.asarray(got_grad)))

    half = absent.astype(jnp.bfloat16)
    got16, grad16 = _value_and_grad(lambda z: kernels.fused_topk_divergence(
        z, tail_values, indices, tail=tail, where=keep, softcap=cap, implementation=implementation, tile=TILE),
        half, weights)
    want16, want_grad16 = _value_and_grad(lambda z: losses.topk_divergence(
        capped(z.astype(jnp.float32)), tail_values, indices, tail=tail, where=keep), half, weights)
    assert got16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16
    _close(got16, want16, tail, rtol=1e-5)
    _close(grad16.astype(jnp.float32), want_grad16.astype(jnp.float32), tail, rtol=2e-2, atol=1e-3)

  small = student[:, :16]
  full_values, full_indices = losses.teacher_topk(teacher[:, :16], 16, temperature=2.0, log_probs=True)
  dense = losses.forward_kl(small, teacher[:, :16], temperature=2.0, where=keep)
  full_logits = jnp.take_along_axis(teacher[:, :16], full_indices, axis=1)
  for tail, tail_values in (("renormalize", full_logits), ("bucket", full_values)):
    got = kernels.fused_topk_divergence(small, tail_values, full_indices, tail=tail, temperature=2.0, where=keep,
                                        implementation=implementation, tile=TILE)
    _close(got, dense, tail)


def test_leading_axes_jit_and_bad_input():
  student, teacher, keep, _ = _problem(4)
  values, indices = losses.teacher_topk(teacher, K, log_probs=True)
  traces = []

  def divergence(z, v, i, t):
    # Runs only when jit traces: counted here, since the C++ cache size reads 0 in some dispatch modes.
    traces.append(z.shape)
    return kernels.fused_topk_divergence(z, v, i, tail="bucket", temperature=t, implementation="tiled", tile=TILE)

  fn = jax.jit(divergence)
  flat = fn(student, values, indices, 1.5)
  _close(fn(student.reshape(1, N, V)[:, :10], values[None, :10], indices[None, :10], 1.5)[0], flat[:10])
  fn(student, values, indices, 2.5)
  assert len(traces) == 2, traces  # a traced T does not retrace; the second shape does

  with pytest.raises(ValueError, match="tail policy"):
    kernels.fused_topk_divergence(student, values, indices, tail="drop")
  with pytest.raises(ValueError, match="positions"):
    kernels.fused_topk_divergence(student, values[:-1], indices[:-1])
  with pytest.raises(ValueError, match="exceeds the student vocab"):
    kernels.fused_topk_divergence(student[:, :5], values, indices)
  with pytest.raises(ValueError, match="integer"):
    kernels.fused_topk_divergence(student, values, indices.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"teacher top-k indices of kept tokens must lie in \[0, 301\)"):
    kernels.fused_topk_divergence(student, values, indices.at[3, 0].set(V), where=keep)
  with pytest.raises(ValueError, match="unknown divergence"):
    kernels.fused_topk_divergence(student, values, indices, divergence="adaptive_kl")
