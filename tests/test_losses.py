"""Tests of `kdjax.losses`: float64 NumPy references, gradients, invariants and edge cases.

Every expected value here comes from `numpy_reference` (float64, written from the papers'
formulas) or from an invariant of the mathematics; nothing is a number copied from a run.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import numpy_reference as ref  # tests/ is on sys.path under pytest's rootdir conftest
from kdjax import losses

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
TOPK = 5
RTOL, ATOL = 1e-5, 1e-6


def _logits(rng, shape, scale=3.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


def _mask(rng, shape):
  """A random position mask with at least one kept and one dropped position."""
  m = rng.random(shape) > 0.35
  m.flat[0], m.flat[-1] = True, False
  return m


def _labels(rng, shape, vocab):
  return rng.integers(0, vocab, size=shape).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# The loss table. Each entry is (library fn, reference fn), both called as f(s, t, T, where, labels)
# with s, t logits [..., V], T the temperature, labels [...] ints (used by DKD and CE only).


def _div(lib_fn, ref_fn, **kw):
  return (lambda s, t, T, w, y: lib_fn(s, t, temperature=T, where=w, **kw),
          lambda s, t, T, w, y: ref_fn(s, t, temperature=T, where=w, **kw))


def _topk(divergence, tail, k=TOPK):
  def lib(s, t, T, w, y):
    if tail == "bucket":  # bucket needs the teacher's log-probabilities at T
      values, indices = losses.teacher_topk(t, k, temperature=T)
    else:  # renormalize accepts raw logits (divided by T inside)
      values, indices = losses.teacher_topk(t, k, log_probs=False)
    return losses.topk_divergence(s, values, indices, divergence=divergence, tail=tail,
                                  temperature=T, where=w)

  def reference(s, t, T, w, y):
    fn = ref.topk_bucket if tail == "bucket" else ref.topk_renormalize
    return fn(s, t, ref.topk_indices(t, k), divergence, T, w)

  return lib, reference


CASES = {
    "forward_kl": _div(losses.forward_kl, ref.forward_kl),
    "reverse_kl": _div(losses.reverse_kl, ref.reverse_kl),
    "jsd_0.5": _div(losses.generalized_jsd, ref.generalized_jsd, beta=0.5),
    "jsd_0.1": _div(losses.generalized_jsd, ref.generalized_jsd, beta=0.1),
    "jsd_0.9": _div(losses.generalized_jsd, ref.generalized_jsd, beta=0.9),
    "jsd_0": _div(losses.generalized_jsd, ref.generalized_jsd, beta=0.0),
    "jsd_1": _div(losses.generalized_jsd, ref.generalized_jsd, beta=1.0),
    "total_variation": _div(losses.total_variation, ref.total_variation),
    "skew_kl_0.1": _div(losses.skew_kl, ref.skew_kl, alpha=0.1),
    "skew_kl_0.4": _div(losses.skew_kl, ref.skew_kl, alpha=0.4),
    "skew_reverse_kl_0.1": _div(losses.skew_reverse_kl, ref.skew_reverse_kl, alpha=0.1),
    "skew_reverse_kl_0.4": _div(losses.skew_reverse_kl, ref.skew_reverse_kl, alpha=0.4),
    "adaptive_kl_0.5": _div(losses.adaptive_kl, ref.adaptive_kl, mu=0.5),
    "adaptive_kl_0.8": _div(losses.adaptive_kl, ref.adaptive_kl, mu=0.8),
    "ab_1_0": _div(losses.ab_divergence, ref.ab_divergence, alpha=1.0, beta=0.0),
    "ab_0_1": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.0, beta=1.0),
    "ab_0.5_0.5": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.5, beta=0.5),
    "ab_0.2_0.7": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.2, beta=0.7),
    "ab_1.5_-0.5": _div(losses.ab_divergence, ref.ab_divergence, alpha=1.5, beta=-0.5),
    "ab_0.3_0": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.3, beta=0.0),
    "ab_0_0.3": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.0, beta=0.3),
    "ab_0.3_-0.3": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.3, beta=-0.3),
    "ab_0_0": _div(losses.ab_divergence, ref.ab_divergence, alpha=0.0, beta=0.0),
    "hinton_kd": _div(losses.hinton_kd, ref.hinton_kd),
    "deit_soft": _div(losses.deit_soft_distillation, ref.deit_soft_distillation),
    "deit_hard": (lambda s, t, T, w, y: losses.deit_hard_distillation(s, t, where=w),
                  lambda s, t, T, w, y: ref.deit_hard_distillation(s, t, w)),
    "cross_entropy": (lambda s, t, T, w, y: losses.cross_entropy(s, y, where=w),
                      lambda s, t, T, w, y: ref.cross_entropy(s, y, 0.0, w)),
    "cross_entropy_smoothed": (lambda s, t, T, w, y: losses.cross_entropy(s, y, where=w, label_smoothing=0.1),
                               lambda s, t, T, w, y: ref.cross_entropy(s, y, 0.1, w)),
    "dkd": (lambda s, t, T, w, y: losses.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=T, where=w),
            lambda s, t, T, w, y: ref.dkd(s, t, y, 1.0, 8.0, T, w)),
    "dkd_2_0.5": (lambda s, t, T, w, y: losses.dkd(s, t, y, alpha=2.0, beta=0.5, temperature=T, where=w),
                  lambda s, t, T, w, y: ref.dkd(s, t, y, 2.0, 0.5, T, w)),
    "topk_renorm_fkl": _topk("forward_kl", "renormalize"),
    "topk_renorm_rkl": _topk("reverse_kl", "renormalize"),
    "topk_bucket_fkl": _topk("forward_kl", "bucket"),
    "topk_bucket_rkl": _topk("reverse_kl", "bucket"),
}
ALL = tuple(CASES)
# Divergences in the strict sense (≥ 0, = 0 iff p = q), with the teacher logits as second argument.
DIVERGENCES = tuple(n for n in CASES if not n.startswith(("cross_entropy", "deit_hard", "dkd", "topk")))
# Those whose exponents cannot overflow on huge logit gaps. Negative exponents and the squared
# log-ratio of (0, 0) are truly astronomically large there, so +inf is the float32 answer.
BOUNDED_ON_HUGE = tuple(n for n in CASES if n not in ("ab_1.5_-0.5", "ab_0.3_-0.3", "ab_0_0"))


def _tolerance(name):
  if name == "topk_bucket_rkl":
    # The teacher's tail is only known as 1 − Σ_k p from float32 log-probs: absolute error
    # ~1e-6, so log p_tail (which reverse KL weighs by q_tail ≤ 1) is off by ~1e-6 / p_tail.
    # Compared only where p_tail ≥ 1e-3 (see `_comparable`).
    return dict(rtol=1e-3, atol=1e-3)
  if name == "topk_bucket_fkl":
    return dict(rtol=1e-4, atol=1e-5)
  return dict(rtol=RTOL, atol=ATOL)


def _comparable(name, t, temperature, positions_shape):
  """Positions where the float32 library can be held to the float64 reference."""
  if name != "topk_bucket_rkl":
    return np.ones(positions_shape, bool)
  p = ref.softmax_rows(t, temperature)
  top = np.take_along_axis(p, ref.topk_indices(t, TOPK), -1)
  return 1.0 - top.sum(-1) >= 1e-3


def _assert_matches_reference(name, got, s, t, temperature, where, labels, err_msg=""):
  want = CASES[name][1](s, t, temperature, where, labels)
  ok = _comparable(name, t, temperature, want.shape)
  np.testing.assert_allclose(np.asarray(got)[ok], want[ok], **_tolerance(name), err_msg=err_msg)


def _inputs(seed, shape, scale=3.0):
  rng = np.random.default_rng(seed)
  s, t = _logits(rng, shape, scale), _logits(rng, shape, scale)
  return s, t, _mask(rng, shape[:-1]), _labels(rng, shape[:-1], shape[-1])


def _all_values(s, t, temperature, where, labels):
  return {name: lib(s, t, temperature, where, labels) for name, (lib, _) in CASES.items()}


# Gradients are checked for one case per distinct code path (the others only rename a
# hyper-parameter or call one of these), which keeps the compile below affordable.
GRAD_CASES = tuple(n for n in CASES if n not in (
    "jsd_0", "jsd_1", "jsd_0.1", "skew_kl_0.4", "skew_reverse_kl_0.4", "adaptive_kl_0.8", "ab_0.2_0.7",
    "hinton_kd", "cross_entropy", "dkd_2_0.5"))


@jax.jit
def _values_and_grads(s, t, temperature, where, labels):
  """Every loss's per-position values and the student gradient of its sum, in one compile per
  input signature (tests reuse a few signatures to keep compile time down)."""
  grads = {name: jax.grad(lambda x, lib=CASES[name][0]: jnp.sum(lib(x, t, temperature, where, labels)))(s)
           for name in GRAD_CASES}
  return _all_values(s, t, temperature, where, labels), grads


_values = jax.jit(_all_values)


def _scale(name, temperature):
  """The factor a loss multiplies a KL-sized quantity by (for rounding tolerances)."""
  return {"hinton_kd": temperature**2, "deit_soft": temperature**2, "dkd": 9 * temperature**2}.get(name, 1.0)


def _rounding_floor(name, temperature):
  """How far below 0 float32 rounding may take a divergence: a few ulps of the O(1) terms the
  sum cancels, times the loss's scale; the α-β forms also divide such sums by αβ, α² or β²
  (up to 11× here)."""
  return -(3e-5 if name.startswith("ab_") else 2e-6 * _scale(name, temperature))


def _check_each(names, check):
  """Runs check(name) for every name and fails once, listing every name that failed."""
  failures = []
  for name in names:
    try:
      check(name)
    except AssertionError as e:  # noqa: PERF203
      failures.append(f"{name}: {str(e).strip()[:600]}")
  assert not failures, "\n\n".join(failures)


# Edge-case inputs share one shape and mask signature so that `_values_and_grads` compiles once.
EDGE_SHAPE = (7, 13)
_ALL_KEPT = np.ones(EDGE_SHAPE[:-1], bool)


# ------------------------------------------------------------------------------------------------
# Values and gradients against the float64 references.


class ReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_loss_matches_numpy_reference(self):
    run = self.variant(_all_values)
    s, t, w, y = _inputs(1, (2, 3, 11))
    for where in (None, w):
      for temperature in TEMPERATURES:
        got = run(s, t, jnp.float32(temperature), where, y)

        def check(name):
          chex.assert_shape(got[name], s.shape[:-1])
          assert got[name].dtype == jnp.float32, got[name].dtype
          _assert_matches_reference(name, got[name], s, t, temperature, where, y, f"T={temperature}")
          if where is not None:
            np.testing.assert_array_equal(np.asarray(got[name])[~w], 0.0)

        _check_each(ALL, check)

  @chex.variants(with_jit=True, without_jit=True)
  def test_kl_grads_match_analytic_forms(self):
    s, t, w, _ = _inputs(3, (2, 3, 11))
    grads = self.variant(lambda x, T: (
        jax.grad(lambda x: jnp.sum(losses.forward_kl(x, t, temperature=T, where=w)))(x),
        jax.grad(lambda x: jnp.sum(losses.reverse_kl(x, t, temperature=T, where=w)))(x)))
    for temperature in TEMPERATURES:
      got_f, got_r = grads(s, jnp.float32(temperature))
      for got, want in ((got_f, ref.forward_kl_grad(s, t, temperature)),
                        (got_r, ref.reverse_kl_grad(s, t, temperature))):
        want = np.where(w[..., None], want, 0.0)
        # float32 log-probabilities carry ~1e-7·|log q| absolute error: scale atol by the gradient.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-4 * np.abs(want).max())

  @chex.variants(with_jit=True, without_jit=True)
  def test_dist_matches_reference(self):
    s, t, w, _ = _inputs(4, EDGE_SHAPE)
    fn = self.variant(lambda s, t, w, T: losses.dist(s, t, beta=2.0, gamma=0.5, temperature=T, where=w))
    for temperature in TEMPERATURES:
      for where in (None, w):
        got = fn(s, t, where, jnp.float32(temperature))
        chex.assert_shape(got, ())
        self.assertEqual(got.dtype, jnp.float32)
        np.testing.assert_allclose(got, ref.dist(s, t, 2.0, 0.5, temperature, where), rtol=RTOL, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_standardize_logits_matches_reference(self):
    z = _logits(np.random.default_rng(6), (2, 3, 11)) + 5.0
    fn = self.variant(losses.standardize_logits)
    got = fn(z)
    np.testing.assert_allclose(got, ref.standardize_logits(z), rtol=RTOL, atol=ATOL)
    # A per-sample temperature: invariant to the logits' scale and shift.
    np.testing.assert_allclose(fn(3.0 * z - 7.0), got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where_kind", ["mask", "all_kept"])
def test_every_loss_matches_numpy_reference_on_second_shape(where_kind):
  s, t, w, y = _inputs(2, EDGE_SHAPE)
  where = w if where_kind == "mask" else _ALL_KEPT
  for temperature in TEMPERATURES:
    got, _ = _values_and_grads(s, t, jnp.float32(temperature), where, y)
    _check_each(ALL, lambda n: _assert_matches_reference(n, got[n], s, t, temperature, where, y, f"T={temperature}"))


def test_every_grad_matches_finite_differences():
  s, t, w, y = _inputs(5, EDGE_SHAPE, scale=2.0)
  rows = 3  # finite differences on a few rows (positions are independent) keep this fast
  for temperature in (0.5, 2.0):
    _, grads = _values_and_grads(s, t, jnp.float32(temperature), w, y)

    def check(name):
      sr, tr, wr, yr = s[:rows], t[:rows], w[:rows], y[:rows]
      if name.startswith("adaptive_kl"):
        # The library stops the gradient of the head / tail weights: hold them fixed.
        mu = float(name.split("_")[-1])
        weights = ref.adaptive_kl_weights(sr, tr, mu, temperature)
        f = lambda x: ref.adaptive_kl(x, tr, mu, temperature, wr, weights=weights)
      else:
        f = lambda x: CASES[name][1](x, tr, temperature, wr, yr)
      want = ref.numerical_grad(f, sr)
      ok = _comparable(name, tr, temperature, wr.shape)
      np.testing.assert_allclose(np.asarray(grads[name])[:rows][ok], want[ok], rtol=1e-4,
                                 atol=max(1e-4, _tolerance(name)["rtol"]) * np.abs(want).max() + 1e-6,
                                 err_msg=f"T={temperature}")
      np.testing.assert_array_equal(np.asarray(grads[name])[~w], 0.0)

    _check_each(GRAD_CASES, check)


def test_dist_grad_matches_finite_differences():
  s, t, w, _ = _inputs(5, (5, 6), scale=2.0)
  for where in (None, w):
    grad = jax.grad(lambda x: losses.dist(x, t, temperature=2.0, where=where))(s)
    want = ref.numerical_grad(lambda x: ref.dist(x, t, 1.0, 1.0, 2.0, where), s)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# Invariants of the mathematics.


def test_divergence_of_a_distribution_with_itself_is_zero():
  rng = np.random.default_rng(7)
  t, y = _logits(rng, EDGE_SHAPE, scale=5.0), _labels(rng, EDGE_SHAPE[:-1], EDGE_SHAPE[-1])
  for temperature in TEMPERATURES:
    values, _ = _values_and_grads(t, t, jnp.float32(temperature), _ALL_KEPT, y)

    def check(name):
      # Within one large compiled graph XLA may fuse the student's and the teacher's identical
      # log-softmax differently, so the two sides can differ by an ulp. The generic α-β
      # formula cancels terms of size p^(α+β) / (αβ): a few float32 ulps remain there too.
      # The bucket teacher comes through teacher_topk's own log-softmax and a 1 − Σ p tail.
      atol = 5e-6 if name.startswith(("ab_", "topk_bucket")) else 2e-7 * _scale(name, temperature)
      np.testing.assert_allclose(values[name], 0.0, atol=atol, err_msg=f"T={temperature}")

    _check_each(DIVERGENCES + ("dkd", "topk_renorm_fkl", "topk_renorm_rkl", "topk_bucket_fkl"), check)


@pytest.mark.parametrize("fn", [losses.forward_kl, losses.reverse_kl, losses.hinton_kd, losses.total_variation])
def test_kl_of_a_distribution_with_itself_is_exactly_zero(fn):
  t = _logits(np.random.default_rng(7), (2, 3, 11), scale=5.0)
  for temperature in TEMPERATURES:
    np.testing.assert_array_equal(fn(t, t, temperature=temperature), 0.0)


_finite_logits = hnp.arrays(
    np.float32, EDGE_SHAPE,
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=_finite_logits, t=_finite_logits, same=st.booleans(), temperature=st.sampled_from([0.5, 1.0, 4.0]))
def test_divergences_nonnegative_and_tvd_bounded(s, t, same, temperature):
  if same:
    s = t
  labels = np.zeros(EDGE_SHAPE[:-1], np.int32)
  values, grads = _values_and_grads(s, t, jnp.float32(temperature), _ALL_KEPT, labels)
  for name in DIVERGENCES:
    v = np.asarray(values[name])
    assert not np.isnan(v).any(), name
    # float32 rounding of a sum of p·(log p − log q) terms can dip a few ulps below 0; no more.
    assert (v >= _rounding_floor(name, temperature)).all(), (name, v.min())
  for name in BOUNDED_ON_HUGE:
    assert np.isfinite(np.asarray(values[name])).all(), name
    if name in GRAD_CASES:
      assert np.isfinite(np.asarray(grads[name])).all(), name
  tvd = np.asarray(values["total_variation"])
  assert ((tvd >= 0.0) & (tvd <= 1.0 + 1e-6)).all()


def test_hinton_kd_is_t_squared_forward_kl_and_keeps_gradient_scale():
  s, t, w, _ = _inputs(8, (7, 13))
  for temperature in TEMPERATURES:
    np.testing.assert_allclose(
        losses.hinton_kd(s, t, temperature=temperature, where=w),
        temperature**2 * losses.forward_kl(s, t, temperature=temperature, where=w), rtol=1e-6)
  # Hinton's reason for T²: at high T the KL gradient shrinks as 1/T², the T²·KL one does not.
  norm = lambda f, T: float(jnp.linalg.norm(jax.grad(lambda x: jnp.sum(f(x, t, temperature=T)))(s)))
  assert norm(losses.hinton_kd, 40.0) / norm(losses.hinton_kd, 80.0) == pytest.approx(1.0, rel=0.02)
  assert norm(losses.forward_kl, 40.0) / norm(losses.forward_kl, 80.0) == pytest.approx(4.0, rel=0.02)


def test_generalized_jsd_symmetric_at_half():
  s, t, w, _ = _inputs(9, (7, 13))
  for temperature in TEMPERATURES:
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=0.5, temperature=temperature, where=w),
                               losses.generalized_jsd(t, s, beta=0.5, temperature=temperature, where=w),
                               rtol=1e-5, atol=1e-7)
    # β and 1 − β swap roles too.
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=0.2, temperature=temperature),
                               losses.generalized_jsd(t, s, beta=0.8, temperature=temperature),
                               rtol=1e-5, atol=1e-7)


def test_generalized_jsd_endpoints_and_continuity():
  s, t, _, _ = _inputs(10, (7, 13))
  for temperature in (1.0, 2.0):
    fkl = losses.forward_kl(s, t, temperature=temperature)
    rkl = losses.reverse_kl(s, t, temperature=temperature)
    # Documented endpoints (TRL's): β = 0 is forward KL, β = 1 reverse KL.
    np.testing.assert_array_equal(losses.generalized_jsd(s, t, beta=0.0, temperature=temperature), fkl)
    np.testing.assert_array_equal(losses.generalized_jsd(s, t, beta=1.0, temperature=temperature), rkl)
    # The interior formula tends to them after dividing by β (resp. 1 − β): slowly (the O(β)
    # term carries χ²-like sums) and, in float32, only down to β ≈ 1e-3 before rounding of
    # terms of size β swamps it. So: the library follows the float64 formula for β ≥ 1e-3,
    # and the float64 formula converges.
    fkl64, rkl64 = ref.forward_kl(s, t, temperature), ref.reverse_kl(s, t, temperature)
    errors_0, errors_1 = [], []
    for eps in (1e-1, 1e-2, 1e-3, 1e-5, 1e-7):
      near_0 = ref.generalized_jsd(s, t, eps, temperature) / eps
      near_1 = ref.generalized_jsd(s, t, 1.0 - eps, temperature) / eps
      errors_0.append(np.max(np.abs(near_0 - fkl64) / fkl64))
      errors_1.append(np.max(np.abs(near_1 - rkl64) / rkl64))
      if eps >= 1e-3:
        rtol = 3e-7 / eps  # float32 rounding of terms of size ~1, divided by ε
        np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=eps, temperature=temperature) / eps,
                                   near_0, rtol=rtol)
        np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=1.0 - eps, temperature=temperature) / eps,
                                   near_1, rtol=rtol)
    for errors in (errors_0, errors_1):
      assert all(a > b for a, b in zip(errors, errors[1:])), errors
      assert errors[-1] < 2e-3, errors
  # A traced β uses the interior formula (≈ 0 at the endpoints, not the KLs).
  jsd_traced = jax.jit(lambda b: losses.generalized_jsd(s, t, beta=b))
  np.testing.assert_allclose(jsd_traced(0.0), 0.0, atol=1e-6)
  np.testing.assert_allclose(jsd_traced(0.5), losses.generalized_jsd(s, t, beta=0.5), rtol=1e-6)


def test_special_cases_reduce_to_kl():
  s, t, w, _ = _inputs(11, (2, 3, 11))
  for temperature in TEMPERATURES:
    kw = dict(temperature=temperature, where=w)
    fkl, rkl = losses.forward_kl(s, t, **kw), losses.reverse_kl(s, t, **kw)
    np.testing.assert_allclose(losses.skew_kl(s, t, alpha=0.0, **kw), fkl, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses.skew_reverse_kl(s, t, alpha=0.0, **kw), rkl, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses.ab_divergence(s, t, alpha=1.0, beta=0.0, **kw), fkl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.ab_divergence(s, t, alpha=0.0, beta=1.0, **kw), rkl, rtol=1e-5, atol=1e-6)
    # Adaptive KL lies between its two components.
    akl = losses.adaptive_kl(s, t, **kw)
    assert (akl >= jnp.minimum(fkl, rkl) - 1e-6).all() and (akl <= jnp.maximum(fkl, rkl) + 1e-6).all()


def test_ab_divergence_generic_formula_is_continuous_at_its_limits():
  s, t, _, _ = _inputs(12, (7, 13), scale=1.5)
  for (a, b), (a_lim, b_lim), rtol in [((1.0, 1e-7), (1.0, 0.0), 1e-5), ((1e-7, 1.0), (0.0, 1.0), 1e-5),
                                       ((0.4, 1e-7), (0.4, 0.0), 1e-5), ((0.5, -0.5 + 1e-7), (0.5, -0.5), 1e-5),
                                       ((1e-5, 1e-5), (0.0, 0.0), 2e-4)]:  # O(ε) convergence at (0, 0)
    # The float64 reference checks the paper's generic formula against its own limits...
    np.testing.assert_allclose(ref.ab_divergence(s, t, a, b), ref.ab_divergence(s, t, a_lim, b_lim), rtol=rtol)
    # ... and the library's limit branch agrees with it.
    np.testing.assert_allclose(losses.ab_divergence(s, t, alpha=a_lim, beta=b_lim),
                               ref.ab_divergence(s, t, a_lim, b_lim), rtol=1e-5, atol=1e-6)


def test_dkd_decomposes_classic_kd():
  """Zhao et al. eq. (1): KL(p‖q) = TCKD + (1 − p_y)·NCKD, so hinton = DKD(1, 0) + (1 − p_y)·DKD(0, 1)."""
  s, t, w, y = _inputs(13, (7, 13))
  for temperature in TEMPERATURES:
    tckd = losses.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=temperature, where=w)
    nckd = losses.dkd(s, t, y, alpha=0.0, beta=1.0, temperature=temperature, where=w)
    p_y = np.take_along_axis(ref.softmax_rows(t, temperature), y[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.hinton_kd(s, t, temperature=temperature, where=w),
                               tckd + (1.0 - p_y) * nckd, rtol=1e-5, atol=1e-6)


def test_topk_at_full_vocab_equals_full_divergence():
  s, t, w, _ = _inputs(14, (2, 3, 11))
  vocab = s.shape[-1]
  for temperature in TEMPERATURES:
    kw = dict(temperature=temperature, where=w)
    full = {"forward_kl": losses.forward_kl(s, t, **kw), "reverse_kl": losses.reverse_kl(s, t, **kw)}
    for divergence, want in full.items():
      teachers = {
          "renormalize": [losses.teacher_topk(t, vocab, log_probs=False),
                          losses.teacher_topk(t, vocab, temperature=1.0)],  # logits or T=1 log-probs
          "bucket": [losses.teacher_topk(t, vocab, temperature=temperature)],
      }
      for tail, teacher_list in teachers.items():
        for values, indices in teacher_list:
          got = losses.topk_divergence(s, values, indices, divergence=divergence, tail=tail, **kw)
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{divergence} {tail} T={temperature}")


def test_topk_below_full_vocab_matches_reference_for_several_k():
  s, t, w, _ = _inputs(15, (7, 13))
  for k in (1, 3, 12):
    idx = ref.topk_indices(t, k)
    for temperature in (1.0, 2.0):
      for divergence in ("forward_kl", "reverse_kl"):
        # renormalize also accepts T = 1 log-probabilities (a constant shift of the logits).
        renorm = losses.topk_divergence(s, *losses.teacher_topk(t, k, temperature=1.0), divergence=divergence,
                                        tail="renormalize", temperature=temperature, where=w)
        np.testing.assert_allclose(renorm, ref.topk_renormalize(s, t, idx, divergence, temperature, w),
                                   rtol=RTOL, atol=ATOL)
      bucket = losses.topk_divergence(s, *losses.teacher_topk(t, k, temperature=temperature),
                                      tail="bucket", temperature=temperature, where=w)
      np.testing.assert_allclose(bucket, ref.topk_bucket(s, t, idx, "forward_kl", temperature, w),
                                 rtol=1e-4, atol=1e-6)
  # k = 1 renormalised is a single outcome: nothing to match.
  np.testing.assert_array_equal(losses.topk_divergence(s, *losses.teacher_topk(t, 1)), 0.0)


def test_topk_bucket_reverse_kl_finite_for_a_confident_teacher():
  vocab, k = 32, 16
  t = np.zeros((2, vocab), np.float32)
  t[:, :k] = 20.0  # teacher tail mass (V − k)·e^−20 / k ≈ 2e-9: tiny but not zero
  s = np.zeros((2, vocab), np.float32)  # uniform student: half its mass in the tail
  values, indices = losses.teacher_topk(t, k)
  value, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(losses.topk_divergence(
      x, values, indices, divergence="reverse_kl", tail="bucket"))))(s)
  want = ref.topk_bucket(s, t, ref.topk_indices(t, k), "reverse_kl").sum()
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all(), (value, want)


# ------------------------------------------------------------------------------------------------
# Dtypes and extreme values.


def test_bf16_inputs_compute_in_float32():
  s, t, w, y = _inputs(16, EDGE_SHAPE)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = _values(s16, t16, jnp.float32(2.0), w, y)
  want, _ = _values_and_grads(s16.astype(jnp.float32), t16.astype(jnp.float32), jnp.float32(2.0), w, y)

  def check(name):
    assert got[name].dtype == jnp.float32, got[name].dtype
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)

  _check_each(ALL, check)
  got_dist = losses.dist(s16, t16, temperature=2.0, where=w)
  assert got_dist.dtype == jnp.float32
  np.testing.assert_allclose(got_dist, losses.dist(s16.astype(jnp.float32), t16.astype(jnp.float32),
                                                   temperature=2.0, where=w), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_of_nearly_equal_bf16_logits_is_not_negative(beta):
  rng = np.random.default_rng(17)
  t16 = jnp.asarray(_logits(rng, (256, 64), scale=4.0), jnp.bfloat16)
  # Neighbouring bf16 values: the regime where bf16 arithmetic gives visibly negative JSD.
  bump = jnp.asarray(rng.integers(-1, 2, size=t16.shape), jnp.int16)
  s16 = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(t16, jnp.int16) + bump, jnp.bfloat16)
  for temperature in (0.5, 1.0, 4.0):
    got = losses.generalized_jsd(s16, t16, beta=beta, temperature=temperature)
    want = ref.generalized_jsd(np.asarray(s16, np.float64), np.asarray(t16, np.float64), beta, temperature)
    assert got.dtype == jnp.float32
    assert float(got.min()) >= -1e-7, float(got.min())  # at most float32 rounding, never bf16-sized
    np.testing.assert_allclose(got, want, atol=2e-7)


def test_huge_logits_stay_finite():
  rng = np.random.default_rng(18)
  huge = np.where(rng.random(EDGE_SHAPE) < 0.5, 1e30, -1e30).astype(np.float32)
  huge_s = np.where(rng.random(EDGE_SHAPE) < 0.3, huge, _logits(rng, EDGE_SHAPE))
  huge_t = np.where(rng.random(EDGE_SHAPE) < 0.3, -huge, _logits(rng, EDGE_SHAPE))
  wide_s, wide_t = _logits(rng, EDGE_SHAPE, 1e4), _logits(rng, EDGE_SHAPE, 1e4)
  y = _labels(rng, EDGE_SHAPE[:-1], EDGE_SHAPE[-1])
  for s, t in ((huge_s, huge_t), (wide_s, wide_t), (huge_s, wide_t), (wide_s, huge_t)):
    for temperature in (0.5, 4.0):
      values, grads = _values_and_grads(s, t, jnp.float32(temperature), _ALL_KEPT, y)

      def check(name):
        assert np.isfinite(np.asarray(values[name])).all(), f"value T={temperature}"
        assert np.isfinite(np.asarray(grads[name])).all(), f"grad T={temperature}"

      _check_each([n for n in BOUNDED_ON_HUGE if n in GRAD_CASES], check)
      _check_each(DIVERGENCES, lambda n: np.testing.assert_array_less(_rounding_floor(n, temperature),
                                                                      np.asarray(values[n])))
  assert np.isfinite(np.asarray(losses.standardize_logits(huge_s))).all()


def test_dist_on_huge_logits_is_finite():
  rng = np.random.default_rng(19)
  s, t = _logits(rng, EDGE_SHAPE, 1e4), _logits(rng, EDGE_SHAPE, 1e4)
  value, grad = jax.value_and_grad(lambda x: losses.dist(x, t, temperature=2.0))(s)
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("alpha", [0.3, -0.3])
def test_ab_divergence_one_sided_zero_is_inf_not_nan(alpha):
  s = np.array([[0.0, -np.inf, 1.0]], np.float32)  # the student gives id 1 probability 0
  t = np.array([[0.0, 0.0, 1.0]], np.float32)
  for a, b in ((alpha, -alpha), (1.5, -0.5), (0.0, 0.0), (0.3, 0.0)):
    for student, teacher in ((s, t), (t, s)):
      value = float(losses.ab_divergence(student, teacher, alpha=a, beta=b)[0])
      assert not np.isnan(value), (a, b)


def _drop_columns(x, cols):
  return np.delete(x, cols, axis=-1)


NEG_INF_COLS = [3, 9]


@functools.lru_cache(maxsize=None)
def _neg_inf_results():
  """Values and gradients with two vocab ids at −inf in both models, and with the ids removed."""
  s, t, w, y = _inputs(20, EDGE_SHAPE, scale=2.0)
  y = np.where(np.isin(y, NEG_INF_COLS), 0, y)  # a label is a real token
  s_inf, t_inf = s.copy(), t.copy()
  s_inf[..., NEG_INF_COLS], t_inf[..., NEG_INF_COLS] = -np.inf, -np.inf
  y_cut = y - sum((y > c).astype(np.int32) for c in NEG_INF_COLS)
  s_cut, t_cut = _drop_columns(s, NEG_INF_COLS), _drop_columns(t, NEG_INF_COLS)
  out = []
  for temperature in (0.5, 2.0):
    out.append((temperature, _values_and_grads(s_inf, t_inf, jnp.float32(temperature), w, y),
                _values_and_grads(s_cut, t_cut, jnp.float32(temperature), w, y_cut)))
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_neg_inf_vocab_entries_equal_dropping_them(name):
  for temperature, (values, grads), (values_cut, grads_cut) in _neg_inf_results():
    v, v_cut = np.asarray(values[name]), np.asarray(values_cut[name])
    if name == "deit_soft":  # DeiT divides by the array's class count, which the cut changes
      v, v_cut = v * 13, v_cut * 11
    assert np.isfinite(v).all(), temperature
    np.testing.assert_allclose(v, v_cut, rtol=1e-6, atol=1e-7, err_msg=f"T={temperature}")
    if name in GRAD_CASES:
      g, g_cut = np.asarray(grads[name]), np.asarray(grads_cut[name])
      if name == "deit_soft":
        g, g_cut = g * 13, g_cut * 11
      assert np.isfinite(g).all(), temperature
      np.testing.assert_array_equal(g[..., NEG_INF_COLS], 0.0)
      np.testing.assert_allclose(_drop_columns(g, NEG_INF_COLS), g_cut, rtol=1e-5, atol=1e-7,
                                 err_msg=f"T={temperature}")


def test_standardize_logits_ignores_neg_inf_entries():
  z = _logits(np.random.default_rng(21), (4, 10))
  z_inf = z.copy()
  z_inf[:, [0, 7]] = -np.inf
  got = np.asarray(losses.standardize_logits(z_inf))
  assert np.isneginf(got[:, [0, 7]]).all()
  np.testing.assert_allclose(_drop_columns(got, [0, 7]), ref.standardize_logits(_drop_columns(z, [0, 7])),
                             rtol=1e-5, atol=1e-6)


def test_dist_gradient_finite_with_neg_inf_class():
  s, t, _, _ = _inputs(20, EDGE_SHAPE)
  s[..., NEG_INF_COLS], t[..., NEG_INF_COLS] = -np.inf, -np.inf
  value, grad = jax.value_and_grad(lambda x: losses.dist(x, t, temperature=2.0))(s)
  assert np.isfinite(value)
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("one_kept_by", ["batch_of_one", "mask"])
def test_dist_gradient_finite_with_a_single_example(one_kept_by):
  s, t, _, _ = _inputs(22, (7, 13))
  if one_kept_by == "batch_of_one":
    s, t, where = s[:1], t[:1], None
  else:
    where = np.zeros(7, bool)
    where[2] = True
  grad = jax.jit(jax.grad(lambda x: losses.dist(x, t, temperature=2.0, where=where)))(s)
  assert np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------------------------------------------
# Masks and reductions.


def test_masked_positions_are_exactly_zero_even_with_nan_logits():
  s, t, w, y = _inputs(23, EDGE_SHAPE, scale=2.0)
  s_nan, t_nan = s.copy(), t.copy()
  s_nan[~w], t_nan[~w] = np.nan, np.nan
  nothing = np.zeros_like(w)
  for temperature in (0.5, 2.0):
    T = jnp.float32(temperature)
    clean, _ = _values_and_grads(s, t, T, w, y)
    values, grads = _values_and_grads(s_nan, t_nan, T, w, y)
    values_none, grads_none = _values_and_grads(s_nan, t_nan, T, nothing, y)

    def check(name):
      v = np.asarray(values[name])
      np.testing.assert_array_equal(v[~w], 0.0)
      np.testing.assert_allclose(v, clean[name], rtol=1e-6, atol=1e-7)
      # All masked: the mean is 0 and the gradient is 0, not NaN.
      assert float(losses.masked_mean(values_none[name], nothing)) == 0.0
      np.testing.assert_array_equal(np.asarray(values_none[name]), 0.0)
      if name in GRAD_CASES:
        g = np.asarray(grads[name])
        np.testing.assert_array_equal(g[~w], 0.0)
        assert np.isfinite(g).all(), "non-finite gradient at kept positions"
        np.testing.assert_array_equal(np.asarray(grads_none[name]), 0.0)

    _check_each(ALL, check)


def test_dist_masked_rows_are_dropped_even_with_nan_logits():
  s, t, w, _ = _inputs(24, (7, 13))
  s_nan, t_nan = s.copy(), t.copy()
  s_nan[~w], t_nan[~w] = np.nan, np.nan
  value, grad = jax.value_and_grad(lambda x: losses.dist(x, t_nan, temperature=4.0, where=w))(s_nan)
  np.testing.assert_allclose(value, losses.dist(s[w], t[w], temperature=4.0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(grad)[~w], 0.0)
  assert np.isfinite(np.asarray(grad)).all()


def test_dist_all_masked_is_zero():
  s, t, _, _ = _inputs(24, (7, 13))
  nothing = np.zeros(7, bool)
  value, grad = jax.value_and_grad(lambda x: losses.dist(x, t, temperature=4.0, where=nothing))(s)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  assert float(value) == 0.0


def test_masked_sum_count_is_unbiased_across_uneven_shards():
  rng = np.random.default_rng(25)
  s, t = _logits(rng, (16, 13)), _logits(rng, (16, 13))
  where = np.zeros(16, bool)
  where[:7] = True   # shard 0 keeps 7 of 8 positions...
  where[12] = True   # ... shard 1 keeps 1 of 8
  values = losses.forward_kl(s, t, where=where)
  global_mean = losses.masked_mean(values, where)
  np.testing.assert_allclose(global_mean, ref.forward_kl(s, t)[where].mean(), rtol=1e-6)
  halves = [losses.masked_sum_count(values[i:i + 8], where[i:i + 8]) for i in (0, 8)]
  total, count = jax.tree.map(lambda *x: sum(x), *halves)
  assert float(count) == 8.0
  np.testing.assert_allclose(losses.safe_mean(total, count), global_mean, rtol=1e-6)
  mean_of_means = np.mean([losses.safe_mean(*h) for h in halves])
  assert abs(mean_of_means - float(global_mean)) > 1e-2 * float(global_mean)  # the biased reduction
  # Unmasked: plain sum and size.
  total, count = losses.masked_sum_count(values)
  assert float(count) == 16.0 and np.isclose(float(total), float(jnp.sum(values)))
  # All masked: 0 with a zero (not NaN) gradient.
  nothing = np.zeros(16, bool)
  mean, grad = jax.value_and_grad(lambda v: losses.masked_mean(v, nothing))(jnp.full(16, jnp.nan))
  assert float(mean) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


# ------------------------------------------------------------------------------------------------
# Errors, vocab alignment, tracing.


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("topk", "cross_entropy"))])
def test_vocab_mismatch_raises_naming_both_sizes(name):
  lib, _ = CASES[name]
  rng = np.random.default_rng(26)
  s, t, y = _logits(rng, (3, 160)), _logits(rng, (3, 192)), _labels(rng, (3,), 150)
  with pytest.raises(ValueError, match=r"(?s)160.*192.*align_vocab"):
    lib(s, t, 1.0, None, y)


def test_dist_vocab_mismatch_raises():
  rng = np.random.default_rng(26)
  with pytest.raises(ValueError, match=r"(?s)160.*192.*align_vocab"):
    losses.dist(_logits(rng, (3, 160)), _logits(rng, (3, 192)))


def test_align_vocab_equals_slicing_and_masking_padded_ids():
  rng = np.random.default_rng(27)
  s, t = _logits(rng, (4, 160)), _logits(rng, (4, 192))
  s_al, t_al = losses.align_vocab(s, t, vocab_size=150)
  assert s_al.shape == t_al.shape == (4, 150)
  want = ref.forward_kl(s[:, :150], t[:, :150], 2.0)
  np.testing.assert_allclose(losses.forward_kl(s_al, t_al, temperature=2.0), want, rtol=RTOL, atol=ATOL)
  # Padding the student to the teacher's width is fine once both get −inf on the padded ids...
  s_pad = np.pad(s, ((0, 0), (0, 32)))
  masked = lambda x: losses.forward_kl(losses.mask_vocab(x, 150), losses.mask_vocab(t, 150), temperature=2.0)
  np.testing.assert_allclose(masked(s_pad), want, rtol=RTOL, atol=ATOL)
  grad = np.asarray(jax.grad(lambda x: jnp.sum(masked(x)))(s_pad))
  np.testing.assert_allclose(grad[:, :150], ref.forward_kl_grad(s[:, :150], t[:, :150], 2.0), rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(grad[:, 150:], 0.0)
  # ... but zero-padded logits without the mask give padded ids probability mass (the pitfall).
  assert not np.allclose(losses.forward_kl(s_pad, t, temperature=2.0), want, rtol=1e-3)
  for bad in (0, 161, 193):
    with pytest.raises(ValueError, match="vocab_size"):
      losses.align_vocab(s, t, vocab_size=bad)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_where_shape_raises(name):
  lib, _ = CASES[name]
  s, t, _, y = _inputs(28, (7, 13))
  for where in (np.ones((6,), bool), np.ones((7, 13), bool), np.ones((1, 7), bool)):
    with pytest.raises(ValueError, match="where"):
      lib(s, t, 1.0, where, y)


def test_dist_bad_where_shape_raises():
  s, t, _, _ = _inputs(28, (7, 13))
  with pytest.raises(ValueError, match="where"):
    losses.dist(s, t, where=np.ones((6,), bool))


def test_topk_shape_errors():
  s, t, _, _ = _inputs(29, (7, 13))
  values, indices = losses.teacher_topk(t, 4)
  with pytest.raises(ValueError, match="same shape"):
    losses.topk_divergence(s, values[..., :3], indices)
  with pytest.raises(ValueError, match="positions"):
    losses.topk_divergence(s[:5], values, indices)
  too_many = jnp.zeros((7, 14))
  with pytest.raises(ValueError, match="exceeds"):
    losses.topk_divergence(s, too_many, too_many.astype(jnp.int32))
  with pytest.raises(ValueError, match="tail"):
    losses.topk_divergence(s, values, indices, tail="drop")
  with pytest.raises(ValueError, match="divergence"):
    losses.topk_divergence(s, values, indices, divergence="jsd")


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_generalized_jsd_rejects_beta_outside_unit_interval(beta):
  s, t, _, _ = _inputs(30, (3, 5))
  with pytest.raises(ValueError, match="beta"):
    losses.generalized_jsd(s, t, beta=beta)


def test_cross_entropy_label_shape_mismatch_raises():
  s, _, _, y = _inputs(31, (7, 13))
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(s, y[:5])


def test_jitted_loss_does_not_retrace():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, t, where):
    values = losses.generalized_jsd(s, t, beta=0.5, temperature=2.0, where=where)
    return losses.masked_mean(values, where)

  for seed in range(3):
    s, t, w, _ = _inputs(seed, (7, 13))
    step(s, t, w)
  with pytest.raises(AssertionError, match="traced"):
    s, t, w, _ = _inputs(0, (2, 3, 11))
    step(s, t, w)
