"""Tests of `kdjax.kernels`: the fused divergences against the naive losses of `kdjax.losses`.

The naive losses are the specification (they are themselves tested against float64 references in
`test_losses.py`); every fused implementation must give their values and their student gradients.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.kernels import pallas, terms, tiled

# --- Pallas kernel ---
#
# The kernel runs in the Pallas interpreter here, which is slow to compile: the shapes are small
# and every compiled function is shared across the cases of a test (temperature, mask and weights
# are traced arguments, so only the divergence, dtype, soft cap and blocks recompile).

# (name, coefficients) of every family member, the JSD at three βs.
FAMILY = (
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.9}),
    ("total_variation", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("hinton_kd", {}),
)
TEMPERATURES = (0.5, 1.0, 3.0)
# Ragged on both axes: 13 rows in blocks of 8, 75 columns in blocks of 32 (a 11-column tail).
ROWS, VOCAB, BLOCK_ROWS, BLOCK_VOCAB = 13, 75, 8, 32
# Vocabulary ids that are −inf in both models (padded ids of a shared vocabulary); 74 lies in the
# kernel's padded last block.
ABSENT_IDS = (3, 40, 74)
VALUE_TOLERANCE = dict(rtol=2e-5, atol=2e-6)
# Gradient tolerances, absolute, as fractions of the largest |entry|. The kernel and the twin
# evaluate the same formulas, but XLA:CPU's exp and log round differently by optimisation level and
# fusion: under the tests' -O0 the skew reverse KL (α = 0.1, T = 0.5) differed by 1.2e-5 of its scale
# (5e-7 on an entry of -0.0027, where the skew mixture cancels), at -O2 by under 2e-6. The naive losses' autodiff is another float32 formula, and g − q·G
# cancels where the student is confident (q ≈ 1, g ≈ q·G: at T = 0.5 one entry is 2.2757 − 2.2745):
# the difference keeps an absolute error of a few ulps of g, up to ~1e-4 of the gradient's scale.
GRAD_TOLERANCE = {"tiled": 3e-5, "naive": 2e-4}


@functools.lru_cache(maxsize=None)
def _compiled(impl: str, name: str, coefficients: tuple, softcap=None, blocks=(BLOCK_ROWS, BLOCK_VOCAB)):
  """jit(value_and_grad) of Σ weights · values for one implementation; returns ((Σ, values), grad).

  `impl` is 'pallas', 'tiled' or 'naive'; the naive loss sees soft-capped logits when `softcap` is
  set, so that the chain rule through the cap is autodiff's.
  """
  div = terms.divergence(name, **dict(coefficients))

  def values(student, teacher, temperature, where):
    if impl == "pallas":
      return pallas.pallas_divergence(div, student, teacher, temperature=temperature, where=where,
                                      block_rows=blocks[0], block_vocab=blocks[1], softcap=softcap, interpret=True)
    if impl == "tiled":
      return tiled.tiled_divergence(div, student, teacher, temperature=temperature, where=where, tile=blocks[1],
                                    softcap=softcap)
    if softcap is not None:
      # Dropped rows are cleared first: the cap's derivative at their garbage (NaN) would turn the
      # zero cotangent into NaN.
      cap = lambda z: softcap * jnp.tanh(jnp.where(where[:, None], z, 0).astype(jnp.float32) / softcap)  # noqa: E731
      student, teacher = cap(student), cap(teacher)
    return getattr(losses, name)(student, teacher, temperature=temperature, where=where, **dict(coefficients))

  def weighted(student, teacher, temperature, where, weights):
    v = values(student, teacher, temperature, where)
    return jnp.sum(weights * v), v

  return jax.jit(jax.value_and_grad(weighted, has_aux=True))


def _run(impl, name, coefficients, student, teacher, temperature, where, weights, **kw):
  """(values [N], student gradient [N, V]) of one implementation."""
  (_, values), grad = _compiled(impl, name, tuple(sorted(coefficients.items())), **kw)(
      student, teacher, jnp.float32(temperature), where, weights)
  return values, grad


def _inputs(seed, rows=ROWS, vocab=VOCAB, dtype=jnp.float32):
  """Student and teacher logits with −inf ids in both, a row mask, garbage in dropped rows, weights."""
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(rows, vocab)) * 3.0
  teacher = rng.normal(size=(rows, vocab)) * 3.0 + 0.5
  absent = [i for i in ABSENT_IDS if i < vocab]
  student[:, absent] = teacher[:, absent] = -np.inf
  where = rng.random(rows) > 0.3
  where[0], where[-1] = True, False
  # Dropped rows may hold anything (padding, NaN): they must give 0 and a zero gradient.
  student[~where, 1 % vocab] = np.nan
  teacher[~where, 2 % vocab] = np.inf
  weights = rng.normal(size=rows)
  return (jnp.asarray(student, dtype), jnp.asarray(teacher, dtype), jnp.asarray(where),
          jnp.asarray(weights, jnp.float32))


def _assert_close(got, want, rtol, atol, msg):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=msg)


def _assert_grad_close(got, want, fraction, msg):
  """Gradients equal up to `fraction` of the largest |entry| (see GRAD_TOLERANCE)."""
  scale = float(np.nanmax(np.abs(np.asarray(want, np.float32))))
  _assert_close(got, want, rtol=2e-5, atol=fraction * scale, msg=msg)


def _label(name, coefficients):
  return name + "".join(f"[{k}={v}]" for k, v in coefficients.items())


def test_pallas_matches_tiled_and_naive_losses():
  """Every family member, three temperatures, ragged rows and vocabulary, −inf ids, a row mask."""
  student, teacher, where, weights = _inputs(0)
  for name, coefficients in FAMILY:
    for temperature in TEMPERATURES:
      msg = f"{_label(name, coefficients)} T={temperature}"
      got_v, got_g = _run("pallas", name, coefficients, student, teacher, temperature, where, weights)
      chex.assert_shape(got_v, (ROWS,))
      chex.assert_shape(got_g, (ROWS, VOCAB))
      chex.assert_trees_all_equal_dtypes((got_v, got_g), (jnp.zeros((), jnp.float32), student))
      chex.assert_tree_all_finite((got_v, got_g))
      # Dropped rows: exactly 0 and a zero gradient, whatever their logits held.
      np.testing.assert_array_equal(np.asarray(got_v)[~np.asarray(where)], 0.0, err_msg=msg)
      np.testing.assert_array_equal(np.asarray(got_g)[~np.asarray(where)], 0.0, err_msg=msg)
      for impl in ("tiled", "naive"):
        want_v, want_g = _run(impl, name, coefficients, student, teacher, temperature, where, weights)
        _assert_close(got_v, want_v, msg=f"{msg} values vs {impl}", **VALUE_TOLERANCE)
        _assert_grad_close(got_g, want_g, GRAD_TOLERANCE[impl], msg=f"{msg} gradient vs {impl}")


def test_pallas_without_mask_matches_naive():
  """`where=None` keeps every row (outside jit, with the default blocks shrunk to the arrays)."""
  student, teacher, _, weights = _inputs(1)
  student, teacher = jnp.nan_to_num(student, nan=0.0, posinf=0.0), jnp.nan_to_num(teacher, nan=0.0, posinf=0.0)
  div = terms.divergence("reverse_kl")
  got = pallas.pallas_divergence(div, student, teacher, interpret=True)
  _assert_close(got, losses.reverse_kl(student, teacher), msg="values", **VALUE_TOLERANCE)
  assert np.all(np.asarray(got) > 0)


@pytest.mark.parametrize("name, coefficients", [("forward_kl", {}), ("skew_reverse_kl", {"alpha": 0.1})])
def test_pallas_bfloat16_inputs(name, coefficients):
  """bf16 logits are computed in float32; the gradient comes back in bf16."""
  student, teacher, where, weights = _inputs(2, dtype=jnp.bfloat16)
  for temperature in (0.5, 3.0):
    msg = f"{_label(name, coefficients)} T={temperature}"
    got_v, got_g = _run("pallas", name, coefficients, student, teacher, temperature, where, weights)
    want_v, want_g = _run("naive", name, coefficients, student, teacher, temperature, where, weights)
    assert got_v.dtype == jnp.float32 and got_g.dtype == jnp.bfloat16, msg
    # Same bf16 inputs, both in float32: the values agree to float32 rounding.
    _assert_close(got_v, want_v, msg=f"{msg} values", **VALUE_TOLERANCE)
    # The gradients differ by the final rounding to bf16 (8 bits of mantissa) of either side.
    scale = float(jnp.max(jnp.abs(want_g.astype(jnp.float32))))
    _assert_close(got_g, want_g, rtol=2**-7, atol=2**-8 * scale, msg=f"{msg} gradient")


@pytest.mark.parametrize("name, coefficients", [("generalized_jsd", {"beta": 0.9}), ("hinton_kd", {})])
def test_pallas_softcap_matches_naive_on_capped_logits(name, coefficients):
  """softcap: the naive loss of softcap·tanh(z / softcap), with its gradient through the cap.

  The −inf ids become −softcap in both models (as in every implementation), and their gradient is
  0 (the cap is flat at −inf).
  """
  student, teacher, where, weights = _inputs(3)
  for temperature in (0.5, 3.0):
    msg = f"{_label(name, coefficients)} T={temperature}"
    got_v, got_g = _run("pallas", name, coefficients, student, teacher, temperature, where, weights, softcap=2.5)
    want_v, want_g = _run("naive", name, coefficients, student, teacher, temperature, where, weights, softcap=2.5)
    chex.assert_tree_all_finite((got_v, got_g))
    _assert_close(got_v, want_v, msg=f"{msg} values", **VALUE_TOLERANCE)
    _assert_grad_close(got_g, want_g, GRAD_TOLERANCE["naive"], msg=f"{msg} gradient")
    np.testing.assert_array_equal(np.asarray(got_g)[:, list(ABSENT_IDS)], 0.0, err_msg=msg)


@pytest.mark.parametrize("rows, vocab, blocks", [
    (16, 64, (8, 32)),  # aligned: nothing padded, two row blocks, two vocabulary blocks
    (5, 75, (8, 2048)),  # blocks larger than the arrays shrink to 8 rows and 128 columns
    (3, 1, (8, 32)),  # a one-id vocabulary: every divergence is 0
])
def test_pallas_block_layouts(rows, vocab, blocks):
  student, teacher, where, weights = _inputs(4, rows=rows, vocab=vocab)
  student, teacher = jnp.nan_to_num(student, nan=0.0, posinf=0.0), jnp.nan_to_num(teacher, nan=0.0, posinf=0.0)
  coefficients = {"alpha": 0.1}
  got_v, got_g = _run("pallas", "skew_kl", coefficients, student, teacher, 2.0, where, weights, blocks=blocks)
  want_v, want_g = _run("naive", "skew_kl", coefficients, student, teacher, 2.0, where, weights)
  _assert_close(got_v, want_v, msg=f"{rows}x{vocab} values", **VALUE_TOLERANCE)
  _assert_grad_close(got_g, want_g, GRAD_TOLERANCE["naive"], msg=f"{rows}x{vocab} gradient")


def test_pallas_infinite_divergence():
  """Mass on an id the other model rules out: the true +inf value, and the twin's gradient.

  Forward KL's gradient stays finite there: q − p, −p on the ruled-out id (the naive loss's
  autodiff drops that id's term, and differs). Reverse KL's g = q (log q − log p + 1) is +inf, so
  its gradient row holds ±inf and NaN, the same in the kernel, the twin and the naive loss.
  """
  student, teacher, where, weights = _inputs(5)
  student = student.at[0, 10].set(-jnp.inf)  # forward KL(p ‖ q) = +inf on row 0
  teacher = teacher.at[0, 20].set(-jnp.inf)  # reverse KL(q ‖ p) = +inf on row 0
  for name in ("forward_kl", "reverse_kl"):
    got_v, got_g = _run("pallas", name, {}, student, teacher, 1.0, where, weights)
    want_v, _ = _run("naive", name, {}, student, teacher, 1.0, where, weights)
    twin_v, twin_g = _run("tiled", name, {}, student, teacher, 1.0, where, weights)
    assert np.isposinf(np.asarray(got_v)[0]), name
    _assert_close(got_v, want_v, msg=f"{name} values vs naive", **VALUE_TOLERANCE)
    _assert_close(got_v, twin_v, msg=f"{name} values vs tiled", **VALUE_TOLERANCE)
    # assert_allclose holds NaN and ±inf to the same positions.
    _assert_close(got_g, twin_g, rtol=2e-5, atol=2e-6, msg=f"{name} gradient vs tiled")
    if name == "forward_kl":
      chex.assert_tree_all_finite(got_g)


def test_pallas_traced_temperature_and_default_interpret():
  """T may be traced (one compilation serves every T); `interpret=None` interprets on CPU."""
  student, teacher, where, _ = _inputs(6)
  div = terms.divergence("generalized_jsd", beta=0.5)

  @jax.jit
  def by_temperature(temperatures):
    return jax.vmap(lambda t: pallas.pallas_divergence(div, student, teacher, temperature=t, where=where,
                                                       block_rows=BLOCK_ROWS, block_vocab=BLOCK_VOCAB))(temperatures)

  temperatures = jnp.asarray(TEMPERATURES, jnp.float32)
  got = by_temperature(temperatures)
  for temperature, row in zip(TEMPERATURES, got):
    want = losses.generalized_jsd(student, teacher, beta=0.5, temperature=temperature, where=where)
    _assert_close(row, want, msg=f"T={temperature}", **VALUE_TOLERANCE)


def test_pallas_rejects_mismatched_shapes():
  div = terms.divergence("forward_kl")
  with pytest.raises(ValueError, match="one shape"):
    pallas.pallas_divergence(div, jnp.zeros((4, 8)), jnp.zeros((4, 9)), interpret=True)
  with pytest.raises(ValueError, match="one shape"):
    pallas.pallas_divergence(div, jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8)), interpret=True)


def test_pallas_empty_batch():
  div = terms.divergence("forward_kl")
  student = jnp.zeros((0, 8))
  loss = lambda s: jnp.sum(pallas.pallas_divergence(div, s, student, interpret=True))  # noqa: E731
  value, grad = jax.value_and_grad(loss)(student)
  assert value == 0.0
  chex.assert_shape(grad, (0, 8))
