"""The public fused losses: dispatch, equality with `kdjax.losses`, vocab-parallel sharding, and
their use inside the distillation step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import kernels, losses
from kdjax.distill import strategies
from kdjax.kernels import terms
from kdjax.train import sharding as sharding_lib

# (name, coefficients, the kdjax.losses function with those coefficients bound)
FAMILY = [
    ("forward_kl", {}, losses.forward_kl),
    ("reverse_kl", {}, losses.reverse_kl),
    ("generalized_jsd", {"beta": 0.3}, lambda s, t, **k: losses.generalized_jsd(s, t, beta=0.3, **k)),
    ("generalized_jsd", {"beta": 1.0}, lambda s, t, **k: losses.generalized_jsd(s, t, beta=1.0, **k)),
    ("total_variation", {}, losses.total_variation),
    ("skew_kl", {"alpha": 0.2}, lambda s, t, **k: losses.skew_kl(s, t, alpha=0.2, **k)),
    ("skew_reverse_kl", {"alpha": 0.2}, lambda s, t, **k: losses.skew_reverse_kl(s, t, alpha=0.2, **k)),
    ("hinton_kd", {}, losses.hinton_kd),
]


def _logits(seed, shape, scale=3.0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape) * scale, jnp.float32),
          jnp.asarray(rng.normal(size=shape) * scale, jnp.float32))


def _value_and_grad(fn, s, weights):
  return jax.value_and_grad(lambda x: jnp.sum(fn(x) * weights))(s)


@pytest.mark.parametrize("implementation", ["tiled", "naive"])
def test_fused_divergence_equals_the_losses_on_leading_axes(implementation):
  s, t = _logits(0, (2, 5, 37))
  s, t = s.at[..., 4].set(-jnp.inf), t.at[..., 4].set(-jnp.inf)  # an absent id in both models
  where = np.ones((2, 5), bool)
  where[1, 3:] = False
  weights = jnp.asarray(np.random.default_rng(1).random((2, 5)), jnp.float32)
  for name, coefficients, reference in FAMILY:
    # Jitted once per member, the temperature traced (as a schedule's would be).
    fused = jax.jit(lambda x, temperature, name=name, coefficients=coefficients: _value_and_grad(
        lambda y: kernels.fused_divergence(y, t, divergence=name, temperature=temperature, where=where,
                                           implementation=implementation, tile=8, **coefficients), x, weights))
    for temperature in (0.7, 2.0):
      got, got_grad = fused(s, temperature)
      want, want_grad = _value_and_grad(lambda x: reference(x, t, temperature=temperature, where=where), s, weights)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=f"{name} T={temperature}")
      np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=2e-6, err_msg=f"{name} T={temperature}")
      assert np.isfinite(np.asarray(got_grad)).all()


def test_softcap_equals_capping_the_logits_first():
  s, t = _logits(2, (6, 40), scale=20.0)
  cap = lambda z: 15.0 * jnp.tanh(z / 15.0)  # noqa: E731
  for implementation in ("tiled", "naive"):
    got, got_grad = _value_and_grad(lambda x: kernels.fused_divergence(
        x, t, divergence="generalized_jsd", beta=0.5, temperature=2.0, softcap=15.0, implementation=implementation,
        tile=16), s, jnp.ones(6))
    want, want_grad = _value_and_grad(lambda x: losses.generalized_jsd(cap(x), cap(t), beta=0.5, temperature=2.0), s,
                                      jnp.ones(6))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_garbage_in_dropped_rows_never_reaches_values_or_gradients():
  s, t = _logits(8, (5, 30))
  where = np.array([1, 0, 1, 1, 0], bool)
  s_bad, t_bad = s.at[~where].set(jnp.nan), t.at[~where].set(jnp.inf)
  for implementation in ("tiled", "naive"):
    fn = lambda x, y: kernels.fused_divergence(  # noqa: E731
        x, y, divergence="skew_kl", alpha=0.1, where=where, softcap=10.0, implementation=implementation, tile=8)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t_bad)))(s_bad)
    clean_value, clean_grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t)))(s)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6, err_msg=implementation)
    np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6, atol=1e-7, err_msg=implementation)


def test_teacher_is_a_constant():
  s, t = _logits(3, (4, 20))
  grad = jax.grad(lambda y: jnp.sum(kernels.fused_divergence(s, y, implementation="tiled", tile=8)))(t)
  np.testing.assert_array_equal(grad, 0.0)


def test_dispatch_rules_and_errors():
  assert kernels.resolve_implementation("tiled", 10) == "tiled"
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    assert kernels.resolve_implementation("auto", 1000) == "naive"
    assert kernels.resolve_implementation("auto", 1 << 24) == "tiled"
  with pytest.raises(ValueError, match="unknown implementation 'fast'"):
    kernels.resolve_implementation("fast", 10)
  s, t = _logits(4, (3, 10))
  with pytest.raises(ValueError, match="unknown divergence 'kl'"):
    kernels.fused_divergence(s, t, divergence="kl")
  with pytest.raises(ValueError, match="takes 'beta'"):
    kernels.fused_divergence(s, t, divergence="generalized_jsd", alpha=0.1)
  with pytest.raises(ValueError, match=r"beta in \[0, 1\]"):
    kernels.fused_divergence(s, t, divergence="generalized_jsd", beta=1.5)
  with pytest.raises(ValueError, match="vocab mismatch"):
    kernels.fused_divergence(s, t[:, :8])
  with pytest.raises(ValueError, match="where"):
    kernels.fused_divergence(s, t, where=np.ones(4, bool))


@pytest.mark.parametrize("axes,row_axes", [({"model": 8}, ()), ({"data": 2, "model": 4}, ("data",))])
def test_vocab_parallel_equals_unsharded(axes, row_axes):
  mesh = sharding_lib.make_mesh(axes)
  s, t = _logits(5, (8, 96))
  where = jnp.asarray([1, 1, 0, 1, 1, 1, 1, 0], bool)
  weights = jnp.arange(1.0, 9.0)
  layout = NamedSharding(mesh, P(row_axes if row_axes else None, "model"))
  s_sharded, t_sharded = jax.device_put(s, layout), jax.device_put(t, layout)
  for name, coefficients, reference in FAMILY:
    div = terms.divergence(name, **coefficients)

    def weighted(x, y):
      rows = kernels.vocab_parallel_divergence(div, x, y, mesh=mesh, vocab_axis="model", row_axes=row_axes,
                                               temperature=1.5, where=where, tile=10)
      return jnp.sum(rows * weights), rows

    # Jitted whole, as in a step: JAX 0.10's eager transpose of a jitted call recovers its shardings
    # with the first mesh the process used, and fails for a second mesh.
    (got_sum, got), got_grad = jax.jit(jax.value_and_grad(weighted, has_aux=True))(s_sharded, t_sharded)
    dense = lambda x: reference(x, t, temperature=1.5, where=where)  # noqa: E731 (the whole vocabulary at once)
    want_sum, want_grad = _value_and_grad(dense, s, weights)
    np.testing.assert_allclose(got, dense(s), rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=name)
    assert got_grad.sharding.spec == layout.spec, name  # each device keeps its own gradient columns


def test_vocab_parallel_rejects_an_indivisible_vocab():
  mesh = sharding_lib.make_mesh({"model": 8})
  s, t = _logits(6, (4, 90))
  with pytest.raises(ValueError, match="not divisible"):
    kernels.vocab_parallel_divergence(terms.divergence("forward_kl"), s, t, mesh=mesh, vocab_axis="model")


def test_strategy_uses_the_fused_implementation_from_the_config():
  config = ml_collections.ConfigDict(dict(divergence="generalized_jsd", divergence_kwargs={"beta": 0.3},
                                          kd_weight=1.0, temperature=2.0, implementation="tiled"))
  fused = strategies.strategy_from_config(config)
  naive = strategies.strategy_from_config(ml_collections.ConfigDict(dict(config.to_dict(), implementation="naive")))
  s, t = _logits(7, (2, 6, 50))
  batch = {"targets": jnp.zeros((2, 6), jnp.int32), "mask": jnp.ones((2, 6)).at[1, 4:].set(0.0)}
  run = lambda strategy: jax.value_and_grad(  # noqa: E731
      lambda x: strategy({"logits": x}, {"logits": t}, batch, 0)[0])(s)
  (got, got_grad), (want, want_grad) = run(fused), run(naive)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="no fused implementation"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(divergence="adaptive_kl", implementation="tiled")))
  with pytest.raises(ValueError, match="unknown implementation"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(divergence="forward_kl", implementation="fast")))


def test_fused_linear_divergence_streams_and_equals_the_naive_composition():
  rng = np.random.default_rng(9)
  h_s, h_t = (jnp.asarray(rng.normal(size=(19, d)), jnp.float32) for d in (6, 10))
  w_s, w_t = (jnp.asarray(rng.normal(size=(d, 70)) * 0.5, jnp.float32) for d in (6, 10))
  where = jnp.asarray(rng.random(19) > 0.3)
  weights = jnp.asarray(rng.random(19), jnp.float32)  # a non-uniform cotangent
  results = {}
  for implementation in ("tiled", "naive"):
    fn = lambda hs, ws: kernels.fused_linear_divergence(  # noqa: E731
        hs, ws, h_t, w_t, divergence="generalized_jsd", beta=0.5, temperature=1.5, where=where,
        implementation=implementation, token_chunk=8, tile=32)
    results[implementation] = (fn(h_s, w_s), jax.grad(lambda hs, ws: jnp.sum(fn(hs, ws) * weights), (0, 1))(h_s, w_s))
  want = losses.generalized_jsd(h_s @ w_s, h_t @ w_t, beta=0.5, temperature=1.5, where=where)
  np.testing.assert_allclose(results["tiled"][0], want, rtol=1e-5, atol=1e-6)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
  jax.tree.map(chex_close, results["tiled"], results["naive"])
