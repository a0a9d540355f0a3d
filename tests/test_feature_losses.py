"""Tests of `kdjax.losses.features` against float64 loop references and invariants of the maths."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import feature_reference as ref
from kdjax.losses import features as F

B = 6
RTOL, ATOL = 2e-5, 1e-6


def _normal(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _mask():
  m = np.ones(B, bool)
  m[[1, 4]] = False
  return m


def _with_garbage(x, keep):
  """Masked rows filled with NaN: the library must zero them before any arithmetic."""
  x = np.array(x, np.float32)
  x[~keep] = np.nan
  return x


# name -> (library fn(s, t, where), reference fn(s_kept, t_kept), student shape, teacher shape, per_example)
MAPS_S, MAPS_T = (B, 4, 4, 3), (B, 8, 4, 5)
VEC_S, VEC_T = (B, 5), (B, 7)
PER_EXAMPLE = {
    "fitnet_hint": (F.fitnet_hint, ref.fitnet_hint, (B, 3, 2, 4), (B, 3, 2, 4)),
    "attention_transfer": (F.attention_transfer, ref.attention_transfer, MAPS_S, MAPS_T),
    "attention_transfer_p1": (functools.partial(F.attention_transfer, p=1.0),
                              functools.partial(ref.attention_transfer, p=1.0), MAPS_S, MAPS_T),
    "nst": (F.nst, ref.nst, MAPS_S, MAPS_T),
    "hidden_cosine": (functools.partial(F.hidden_state_loss, kind="cosine"),
                      functools.partial(ref.hidden_state_loss, kind="cosine"), (B, 9), (B, 9)),
    "hidden_mse": (functools.partial(F.hidden_state_loss, kind="mse"),
                   functools.partial(ref.hidden_state_loss, kind="mse"), (B, 9), (B, 9)),
}
RELATIONS = {
    "rkd_distance": (F.rkd_distance, ref.rkd_distance, MAPS_S, MAPS_T),
    "rkd_angle": (F.rkd_angle, ref.rkd_angle, VEC_S, VEC_T),
    "pkt": (F.pkt, ref.pkt, VEC_S, VEC_T),
    "similarity_preserving": (F.similarity_preserving, ref.similarity_preserving, MAPS_S, MAPS_T),
    "cc_taylor": (F.correlation_congruence,
                  functools.partial(ref.correlation_congruence_taylor, gamma=0.4, order=2), VEC_S, VEC_T),
    "cc_taylor_order5": (functools.partial(F.correlation_congruence, gamma=1.3, order=5),
                         functools.partial(ref.correlation_congruence_taylor, gamma=1.3, order=5), VEC_S, VEC_T),
    "cc_repdistiller": (functools.partial(F.correlation_congruence, form="repdistiller"),
                        ref.correlation_congruence_repdistiller, VEC_S, VEC_S),
}
ALL = {**PER_EXAMPLE, **RELATIONS}


def _pair(name, seed=0):
  _, _, s_shape, t_shape = ALL[name]
  return _normal(seed, s_shape), _normal(seed + 100, t_shape, scale=2.0)


# ------------------------------------------------------------------------------------------------
# Values against the references; masked rows = dropped rows.


class ReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_match_reference(self):
    keep = _mask()
    for name, (fn, reference, _, _) in ALL.items():
      s, t = _pair(name)
      run = self.variant(fn)
      got = run(s, t, where=None)
      self.assertEqual(got.dtype, jnp.float32, name)
      np.testing.assert_allclose(got, reference(s, t), rtol=RTOL, atol=ATOL, err_msg=name)
      got_masked = run(_with_garbage(s, keep), _with_garbage(t, keep), where=keep)
      want = reference(s[keep], t[keep])
      if name in PER_EXAMPLE:
        chex.assert_shape(got_masked, (B,))
        np.testing.assert_array_equal(np.asarray(got_masked)[~keep], 0.0, err_msg=name)
        np.testing.assert_allclose(np.asarray(got_masked)[keep], want, rtol=RTOL, atol=ATOL, err_msg=name)
      else:
        chex.assert_shape(got_masked, ())
        np.testing.assert_allclose(got_masked, want, rtol=RTOL, atol=ATOL, err_msg=name)

  @chex.variants(with_jit=True, without_jit=True)
  def test_norm_direction_and_class_means_match_reference(self):
    s, t = _normal(1, (B, 4)), _normal(2, (B, 4), scale=3.0)
    labels = np.array([0, 2, 2, 1, 0, 2], np.int32)
    means = self.variant(functools.partial(F.class_means, num_classes=4))(t, labels)
    np.testing.assert_allclose(means, ref.class_means(t, labels, 4), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(means[3], 0.0)  # a class without examples
    got = self.variant(F.norm_direction)(s, means, labels, teacher=t)
    np.testing.assert_allclose(got, ref.norm_direction(s, means, labels, t), rtol=RTOL, atol=ATOL)
    keep = _mask()
    got = self.variant(F.norm_direction)(_with_garbage(s, keep), means, labels, teacher=t, where=keep)
    np.testing.assert_array_equal(np.asarray(got)[~keep], 0.0)
    np.testing.assert_allclose(np.asarray(got)[keep], ref.norm_direction(s, means, labels, t)[keep], rtol=RTOL)
    masked_means = F.class_means(_with_garbage(t, keep), labels, 4, where=keep)
    np.testing.assert_allclose(masked_means, ref.class_means(t[keep], labels[keep], 4), rtol=RTOL, atol=ATOL)

  def test_norm_direction_rewards_direction_and_norm(self):
    means = np.eye(3, dtype=np.float32) * 5.0
    t = np.full((1, 3), 2.0 / np.sqrt(3), np.float32)  # teacher norm 2
    loss = lambda s: float(F.norm_direction(np.asarray([s], np.float32), means, np.array([1]), teacher=t)[0])
    # Along the centre: the loss falls with the norm up to the teacher's, then stays at 1 − cos = 0.
    assert loss([0, 1, 0]) == pytest.approx(0.5)
    assert loss([0, 2, 0]) == pytest.approx(0.0, abs=1e-6)
    assert loss([0, 4, 0]) == pytest.approx(0.0, abs=1e-6)
    assert loss([4, 0, 0]) == pytest.approx(1.0)  # orthogonal to its class centre


def test_cc_taylor_tends_to_the_gaussian_kernel():
  s, t = _normal(3, VEC_S), _normal(4, VEC_T)
  np.testing.assert_allclose(F.correlation_congruence(s, t, gamma=0.4, order=20), ref.rbf_congruence(s, t, 0.4),
                             rtol=1e-4, atol=1e-8)


def test_all_masked_and_single_row_give_zero():
  for name, (fn, _, _, _) in ALL.items():
    s, t = _pair(name)
    got = np.asarray(fn(s, t, where=np.zeros(B, bool)))
    np.testing.assert_array_equal(got, 0.0, err_msg=name)
  one = np.zeros(B, bool)
  one[2] = True
  for name in ("rkd_distance", "cc_repdistiller"):
    s, t = _pair(name)
    assert float(ALL[name][0](s, t, where=one)) == 0.0, name


# ------------------------------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize("name", ["fitnet_hint", "attention_transfer", "nst", "hidden_cosine", "hidden_mse",
                                  "rkd_distance", "rkd_angle", "pkt", "similarity_preserving", "cc_taylor",
                                  "cc_repdistiller"])
def test_zero_when_student_equals_teacher(name):
  fn, _, s_shape, _ = ALL[name]
  f = _normal(5, s_shape)
  np.testing.assert_allclose(fn(f, f, where=None), 0.0, atol=2e-6)


def test_rkd_scale_invariances():
  s, t = _normal(6, VEC_S), _normal(7, VEC_T)
  d, a = F.rkd_distance(s, t), F.rkd_angle(s, t)
  assert float(d) > 1e-3 and float(a) > 1e-3
  np.testing.assert_allclose(F.rkd_distance(s, 3.7 * t), d, rtol=1e-5)
  np.testing.assert_allclose(F.rkd_distance(0.2 * s, t), d, rtol=1e-5)
  np.testing.assert_allclose(F.rkd_angle(4.0 * s, t), a, rtol=1e-5)
  np.testing.assert_allclose(F.rkd_angle(s, 0.3 * t), a, rtol=1e-5)
  # So a student that is a scaled copy of its teacher has nothing left to learn from either term.
  assert float(F.rkd_distance(s, 3.7 * s)) == pytest.approx(0.0, abs=1e-6)
  assert float(F.rkd_angle(s, 3.7 * s)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "pkt", "similarity_preserving", "cc_taylor"])
def test_batch_permutation_invariance(name):
  fn = ALL[name][0]
  s, t = _pair(name, seed=8)
  perm = np.random.default_rng(9).permutation(B)
  np.testing.assert_allclose(fn(s[perm], t[perm], where=None), fn(s, t, where=None), rtol=1e-5, atol=1e-7)
  # A permutation of one side only breaks the pairing and changes the value.
  assert abs(float(fn(s[perm], t, where=None)) - float(fn(s, t, where=None))) > 1e-6


def test_similarity_and_pkt_scale_invariance():
  s, t = _normal(10, VEC_S), _normal(11, VEC_T)
  np.testing.assert_allclose(F.similarity_preserving(5.0 * s, 0.1 * t), F.similarity_preserving(s, t), rtol=1e-5)
  np.testing.assert_allclose(F.pkt(5.0 * s, 0.1 * t), F.pkt(s, t), rtol=1e-4)


def test_attention_transfer_pools_the_larger_map():
  # A teacher map that is the 2× nearest-neighbour upsampling of the student's gives the same map.
  s = _normal(12, (2, 4, 4, 3))
  t = np.repeat(np.repeat(s, 2, axis=1), 2, axis=2)
  # Pooling t averages equal values, but |·|² is taken after pooling: equal inputs after pooling.
  np.testing.assert_allclose(F.attention_transfer(s, t), 0.0, atol=1e-7)
  np.testing.assert_allclose(F.attention_transfer(t, s), 0.0, atol=1e-7)
  np.testing.assert_allclose(F.nst(s, t), 0.0, atol=1e-6)


def test_nst_is_a_squared_mmd():
  s, t = _normal(13, MAPS_S), _normal(14, MAPS_T)
  values = np.asarray(F.nst(s, t))
  assert np.all(values > 0)
  # A permutation of the channels is the same distribution of neurons: MMD unchanged.
  np.testing.assert_allclose(F.nst(s[..., ::-1], t), values, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Gradients.


def _grad_cases():
  cases = {name: (lambda fn: lambda s, t: jnp.sum(fn(s, t, where=None)))(fn) for name, (fn, *_) in ALL.items()}
  labels = np.array([0, 1, 2, 0, 1, 2])
  means = np.eye(3, 4, dtype=np.float32)
  cases["norm_direction"] = lambda s, t: jnp.sum(F.norm_direction(s, means, labels, teacher=t))
  return cases


def _shape_for(name):
  return (B, 4) if name == "norm_direction" else ALL[name][2]


@pytest.mark.parametrize("name", sorted(_grad_cases()))
def test_gradients_finite_at_identical_inputs_zero_and_duplicate_rows(name):
  grad_fn = jax.jit(jax.grad(_grad_cases()[name]))
  f = _normal(15, _shape_for(name))
  f[3] = 0.0  # a dead row: zero norm
  f[5] = f[0]  # a duplicate: zero distance
  grad = grad_fn(f, f)
  assert np.all(np.isfinite(grad)), name
  grad = grad_fn(f, _normal(16, _shape_for(name)))
  assert np.all(np.isfinite(grad)), name


@pytest.mark.parametrize("name", ["attention_transfer", "nst", "rkd_distance", "rkd_angle", "pkt",
                                  "similarity_preserving", "cc_taylor", "hidden_cosine"])
def test_gradient_matches_finite_differences(name):
  fn, reference, s_shape, t_shape = ALL[name]
  s, t = _normal(17, s_shape), _normal(18, t_shape)
  got = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(fn(x, t, where=None))))(s))
  s64 = s.astype(np.float64)
  want = np.zeros_like(s64)
  h = 1e-5
  for i in list(np.ndindex(*s.shape))[::max(1, s.size // 30)]:
    up, down = s64.copy(), s64.copy()
    up[i] += h
    down[i] -= h
    want[i] = (np.sum(reference(up, t)) - np.sum(reference(down, t))) / (2 * h)
    np.testing.assert_allclose(got[i], want[i], rtol=2e-3, atol=2e-3 * np.abs(got).max(), err_msg=f"{name} {i}")


def test_masked_rows_get_zero_gradient():
  keep = _mask()
  for name, (fn, *_) in ALL.items():
    s, t = _pair(name)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, t, where=keep))))(_with_garbage(s, keep))
    assert np.all(np.isfinite(grad)), name
    np.testing.assert_array_equal(np.asarray(grad)[~keep], 0.0, err_msg=name)


# ------------------------------------------------------------------------------------------------
# CRD.

N_DATA, D, K = 40, 8, 5


@functools.lru_cache(maxsize=None)
def _crd_inputs(seed=20):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  mem_s, mem_t = F.crd_init_memory(keys[0], N_DATA, D), F.crd_init_memory(keys[1], N_DATA, D)
  indices = rng.choice(N_DATA, size=B, replace=False).astype(np.int32)
  dataset_labels = np.arange(N_DATA) % 4
  table = F.crd_negative_table(dataset_labels, 4)
  negatives = np.asarray(F.crd_sample_negatives(keys[2], dataset_labels[indices], K, table))
  return (unit(rng.normal(size=(B, D))), unit(rng.normal(size=(B, D))), np.asarray(mem_s), np.asarray(mem_t),
          indices, negatives, dataset_labels, table)


def test_crd_negatives_are_deterministic_and_of_other_classes():
  *_, indices, negatives, dataset_labels, table = _crd_inputs()
  key = jax.random.PRNGKey(3)
  labels = dataset_labels[indices]
  a = np.asarray(F.crd_sample_negatives(key, labels, 600, table))
  b = np.asarray(jax.jit(F.crd_sample_negatives, static_argnums=2)(key, labels, 600, table))
  np.testing.assert_array_equal(a, b)
  chex.assert_shape(a, (B, 600))
  assert np.all(dataset_labels[a] != labels[:, None])
  # Uniform over the other classes: with 600 draws from 30 candidates, every candidate appears.
  for row, y in zip(a, labels):
    assert set(row) == set(np.flatnonzero(dataset_labels != y))
  assert not np.array_equal(a, np.asarray(F.crd_sample_negatives(jax.random.PRNGKey(4), labels, 600, table)))


class CRDTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_nce_and_softmax_match_reference(self):
    v_s, v_t, mem_s, mem_t, indices, negatives, *_ = _crd_inputs()
    idx = np.concatenate([indices[:, None], negatives], axis=1)
    s_scores = ref.crd_scores(v_s, mem_t, idx, 0.07)  # student anchor against the teacher's memory
    t_scores = ref.crd_scores(v_t, mem_s, idx, 0.07)
    log_z = self.variant(F.crd_log_z)(v_s, v_t, mem_s, mem_t, indices, negatives)
    np.testing.assert_allclose(np.exp(log_z), [ref.crd_z(s_scores, N_DATA), ref.crd_z(t_scores, N_DATA)], rtol=1e-4)
    z = np.exp(np.asarray(log_z, np.float64))
    loss_fn = self.variant(functools.partial(F.crd_loss, objective="nce"))
    loss, terms = loss_fn(v_s, v_t, mem_s, mem_t, indices, negatives, log_z=log_z)
    want_s, want_t = ref.crd_nce_side(s_scores, z[0], N_DATA), ref.crd_nce_side(t_scores, z[1], N_DATA)
    np.testing.assert_allclose(terms["student_anchor"], want_s, rtol=1e-4)
    np.testing.assert_allclose(terms["teacher_anchor"], want_t, rtol=1e-4)
    np.testing.assert_allclose(loss, want_s + want_t, rtol=1e-4)
    softmax, _ = self.variant(functools.partial(F.crd_loss, objective="softmax"))(
        v_s, v_t, mem_s, mem_t, indices, negatives)
    np.testing.assert_allclose(softmax, ref.crd_softmax_side(s_scores) + ref.crd_softmax_side(t_scores), rtol=1e-4)

  def test_crd_masked_rows_are_dropped(self):
    v_s, v_t, mem_s, mem_t, indices, negatives, *_ = _crd_inputs()
    keep = _mask()
    log_z = F.crd_log_z(v_s, v_t, mem_s, mem_t, indices, negatives, where=keep)
    np.testing.assert_allclose(log_z, F.crd_log_z(v_s[keep], v_t[keep], mem_s, mem_t, indices[keep], negatives[keep]),
                               rtol=1e-5)
    for objective in ("nce", "softmax"):
      def masked_loss(x):
        return F.crd_loss(x, _with_garbage(v_t, keep), mem_s, mem_t, indices, negatives, objective=objective,
                          log_z=log_z, where=keep)[0]

      dropped, _ = F.crd_loss(v_s[keep], v_t[keep], mem_s, mem_t, indices[keep], negatives[keep],
                              objective=objective, log_z=log_z)
      np.testing.assert_allclose(masked_loss(_with_garbage(v_s, keep)), dropped, rtol=1e-5)
      grad = jax.jit(jax.grad(masked_loss))(_with_garbage(v_s, keep))
      assert np.all(np.isfinite(grad))
      np.testing.assert_array_equal(np.asarray(grad)[~keep], 0.0)

  def test_memory_update_matches_reference_and_skips_masked_rows(self):
    v_s, _, mem_s, _, indices, *_ = _crd_inputs()
    got = F.crd_update_memory(mem_s, v_s, indices, momentum=0.8)
    np.testing.assert_allclose(got, ref.crd_update_memory(mem_s, v_s, indices, 0.8), rtol=1e-5, atol=1e-6)
    keep = _mask()
    colliding = indices.copy()
    colliding[~keep] = indices[0]  # padding rows that reuse a real row's index must not win the write
    got = F.crd_update_memory(mem_s, _with_garbage(v_s, keep), colliding, momentum=0.5, where=keep)
    np.testing.assert_allclose(got, ref.crd_update_memory(mem_s, v_s[keep], indices[keep], 0.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got)[indices[keep]], axis=-1), 1.0, rtol=1e-5)

  def test_crd_gradient_reaches_embeddings_not_memory(self):
    v_s, v_t, mem_s, mem_t, indices, negatives, *_ = _crd_inputs()
    log_z = F.crd_log_z(v_s, v_t, mem_s, mem_t, indices, negatives)
    grads = jax.jit(jax.grad(lambda *a: F.crd_loss(*a, indices, negatives, log_z=log_z)[0], argnums=(0, 1, 2, 3)))(
        v_s, v_t, mem_s, mem_t)
    assert np.abs(grads[0]).max() > 0 and np.abs(grads[1]).max() > 0
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)

  def test_crd_rejects_bad_input(self):
    v_s, v_t, mem_s, mem_t, indices, negatives, *_ = _crd_inputs()
    with pytest.raises(ValueError, match="log_z"):
      F.crd_loss(v_s, v_t, mem_s, mem_t, indices, negatives)
    with pytest.raises(ValueError, match="width"):
      F.crd_loss(v_s[:, :4], v_t, mem_s, mem_t, indices, negatives, objective="softmax")
    with pytest.raises(ValueError, match="negative_indices"):
      F.crd_loss(v_s, v_t, mem_s, mem_t, indices, negatives[:3], objective="softmax")
    with pytest.raises(ValueError, match="objective"):
      F.crd_loss(v_s, v_t, mem_s, mem_t, indices, negatives, objective="infonce")
    with pytest.raises(ValueError, match="momentum"):
      F.crd_update_memory(mem_s, v_s, indices, momentum=1.5)


# ------------------------------------------------------------------------------------------------
# Sinkhorn.

V = 5


def _probs(z, temperature=1.0):
  z = np.asarray(z, np.float64) / temperature
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class SinkhornTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_scaling_form_reference(self):
    zs, zt = _normal(30, (3, V), 2.0), _normal(31, (3, V), 2.0)
    cost = np.abs(np.subtract.outer(np.arange(V), np.arange(V))).astype(np.float32) / V
    run = self.variant(functools.partial(F.sinkhorn_distance, epsilon=0.2, iterations=30, temperature=2.0))
    got = run(zs, zt, cost)
    for b in range(3):
      want, _ = ref.sinkhorn(_probs(zs[b], 2.0), _probs(zt[b], 2.0), cost, 0.2, 30)
      np.testing.assert_allclose(got[b], want, rtol=1e-4)
    keep = np.array([True, False, True])
    masked = run(_with_garbage(zs, keep), zt, cost, where=keep)
    np.testing.assert_allclose(np.asarray(masked)[keep], np.asarray(got)[keep], rtol=1e-5)
    assert float(masked[1]) == 0.0

  def test_zero_one_cost_tends_to_total_variation_and_plan_marginals(self):
    zs, zt = _normal(32, (4, V), 1.5), _normal(33, (4, V), 1.5)
    cost = 1.0 - np.eye(V, dtype=np.float32)
    q, p = _probs(zs), _probs(zt)
    tvd = 0.5 * np.abs(p - q).sum(-1)
    got = F.sinkhorn_distance(zs, zt, cost, epsilon=0.005, iterations=3000)
    np.testing.assert_allclose(got, tvd, atol=5e-3)
    plan = np.asarray(F.sinkhorn_plan(zs, zt, cost, epsilon=0.05, iterations=500), np.float64)
    np.testing.assert_allclose(plan.sum(-2), p, atol=1e-5)  # columns: the teacher (exact after g's update)
    np.testing.assert_allclose(plan.sum(-1), q, atol=1e-4)  # rows: the student (converged)

  def test_gradient_is_finite_and_matches_finite_differences(self):
    zs, zt = _normal(34, (2, V)), _normal(35, (2, V))
    cost = np.abs(np.subtract.outer(np.arange(V), np.arange(V))).astype(np.float32)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(F.sinkhorn_distance(z, zt, cost, epsilon=0.5, iterations=40))))
    got = np.asarray(grad(zs))
    assert np.all(np.isfinite(grad(zt)))  # identical inputs
    h = 1e-5
    for b in range(2):
      for i in range(V):
        up, down = zs.astype(np.float64), zs.astype(np.float64)
        up[b, i] += h
        down[b, i] -= h
        want = (ref.sinkhorn(_probs(up[b]), _probs(zt[b]), cost, 0.5, 40)[0]
                - ref.sinkhorn(_probs(down[b]), _probs(zt[b]), cost, 0.5, 40)[0]) / (2 * h)
        np.testing.assert_allclose(got[b, i], want, rtol=2e-3, atol=1e-4)

  def test_rejects_bad_cost(self):
    zs = _normal(36, (2, V))
    with pytest.raises(ValueError, match="cost"):
      F.sinkhorn_distance(zs, zs, np.zeros((V, V + 1)))
    with pytest.raises(ValueError, match="epsilon"):
      F.sinkhorn_distance(zs, zs, np.zeros((V, V)), epsilon=0.0)


# ------------------------------------------------------------------------------------------------
# Errors.


def test_shape_mismatches_raise_clear_errors():
  maps, vecs = _normal(40, MAPS_S), _normal(41, VEC_S)
  with pytest.raises(ValueError, match=r"\(6, 4, 4, 3\).*\(6, 4, 4, 2\)"):
    F.fitnet_hint(maps, maps[..., :2])
  with pytest.raises(ValueError, match="NHWC"):
    F.attention_transfer(vecs, vecs)
  with pytest.raises(ValueError, match="non-integer"):
    F.attention_transfer(maps, _normal(42, (B, 6, 4, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    F.nst(maps, _normal(43, (B + 1, 4, 4, 3)))
  with pytest.raises(ValueError, match="same leading batch"):
    F.rkd_distance(vecs, vecs[:4])
  with pytest.raises(ValueError, match="where"):
    F.pkt(vecs, vecs, where=np.ones(B + 1, bool))
  with pytest.raises(ValueError, match="where"):
    F.attention_transfer(maps, maps, where=np.ones((B, 2), bool))
  with pytest.raises(ValueError, match="equal widths"):
    F.correlation_congruence(vecs, _normal(44, VEC_T), form="repdistiller")
  with pytest.raises(ValueError, match="form"):
    F.correlation_congruence(vecs, vecs, form="rbf")
  with pytest.raises(ValueError, match="kind"):
    F.hidden_state_loss(vecs, vecs, kind="l1")
  with pytest.raises(ValueError, match="p > 0"):
    F.attention_transfer(maps, maps, p=0.0)
  with pytest.raises(ValueError, match="width"):
    F.norm_direction(vecs, np.eye(3, 4, dtype=np.float32), np.zeros(B, np.int32), teacher=vecs)
  with pytest.raises(ValueError, match="labels"):
    F.norm_direction(vecs, np.eye(3, 5, dtype=np.float32), np.zeros(B - 1, np.int32), teacher=vecs)
  with pytest.raises(ValueError, match="labels"):
    F.class_means(vecs, np.zeros(B + 1, np.int32), 3)

