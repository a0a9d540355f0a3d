"""Tests of `kdjax.kernels.fused_linear`: values and student gradients against the naive composition.

The reference is `kdjax.losses.<name>(h_s @ W_s, h_t @ W_t, ...)` differentiated by jax.grad. N = 37
tokens in chunks of 8 (the last chunk clamped onto the previous one) and V = 301 in tiles of 64 (the
last tile clamped too). Two reductions reach the backward pass: a masked mean, whose cotangent is
uniform over the kept rows (the head gradient of the forward pass is reused), and a sum with random
per-token weights (the head gradient is recomputed chunk by chunk). The last section tests the
hard-label cross-entropy on the same machinery against `losses.cross_entropy(h @ W, y)`.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import kernels, losses
from kdjax.kernels import fused_linear
from kdjax.kernels.fused_linear import fused_linear_cross_entropy, fused_linear_divergence
from kdjax.kernels.terms import divergence
from kdjax.kernels.tiled import tiled_divergence

N, HS, HT, V = 37, 16, 24, 301
CHUNK, TILE = 8, 64
RTOL, ATOL = 1e-5, 1e-6


def _batch(seed, hidden_dtype=jnp.float32):
  """Hidden states ~ N(0, 1) and heads scaled to logits of standard deviation ~3; a mask that keeps
  about 80% of the tokens, the first and drops the last; per-token weights for a non-uniform
  cotangent."""
  rng = np.random.default_rng(seed)
  keep = rng.random(N) > 0.2
  keep[0], keep[-1] = True, False
  return dict(
      hs=jnp.asarray(rng.standard_normal((N, HS)), hidden_dtype),
      ws=jnp.asarray(rng.standard_normal((HS, V)) * 3 / np.sqrt(HS), jnp.float32),
      ht=jnp.asarray(rng.standard_normal((N, HT)), hidden_dtype),
      wt=jnp.asarray(rng.standard_normal((HT, V)) * 3 / np.sqrt(HT), jnp.float32),
      keep=jnp.asarray(keep),
      weights=jnp.asarray(rng.random(N), jnp.float32),
  )


def _outputs(values_fn, batch):
  """(values, masked-mean gradients, weighted-sum gradients) of values_fn(h_s, W_s) `[N]`; the
  gradients are with respect to (h_s, W_s)."""

  def run(hs, ws):
    mean = lambda a, b: losses.masked_mean(values_fn(a, b), batch["keep"])
    weighted = lambda a, b: jnp.sum(values_fn(a, b) * batch["weights"])
    grad = functools.partial(jax.grad, argnums=(0, 1))
    return values_fn(hs, ws), grad(mean)(hs, ws), grad(weighted)(hs, ws)

  return jax.jit(run)(batch["hs"], batch["ws"])


def _fused(div, batch, **kwargs):
  kwargs = dict(where=batch["keep"], token_chunk=CHUNK, vocab_tile=TILE) | kwargs
  return lambda hs, ws: fused_linear_divergence(div, hs, ws, batch["ht"], batch["wt"], **kwargs)


def _assert_grads_close(ours, reference, rtol=1e-4):
  """Hidden-state and head gradients sum over tokens and the vocabulary: an absolute floor of
  rtol × the largest reference entry."""
  for a, b in zip(ours, reference):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


CASES = [  # (divergence name, coefficients, temperature, naive loss)
    ("forward_kl", {}, 1.0, losses.forward_kl),
    ("reverse_kl", {}, 1.5, losses.reverse_kl),
    ("generalized_jsd", {"beta": 0.5}, 1.0, functools.partial(losses.generalized_jsd, beta=0.5)),
    ("total_variation", {}, 1.0, losses.total_variation),
    ("hinton_kd", {}, 2.0, losses.hinton_kd),
]


def _assert_matches_reference(fused, reference, batch):
  """Values and both cotangents' gradients equal the reference; dropped tokens give 0 and no gradient."""
  values, mean_grads, weighted_grads = _outputs(fused, batch)
  ref_values, ref_mean_grads, ref_weighted_grads = _outputs(reference, batch)
  np.testing.assert_allclose(values, ref_values, rtol=RTOL, atol=ATOL)
  _assert_grads_close(mean_grads, ref_mean_grads)
  _assert_grads_close(weighted_grads, ref_weighted_grads)
  dropped = ~np.asarray(batch["keep"])
  assert np.all(np.asarray(values)[dropped] == 0.0)
  assert np.all(np.asarray(mean_grads[0])[dropped] == 0.0)


@pytest.mark.parametrize("name,coefficients,temperature,naive", CASES, ids=[c[0] for c in CASES])
def test_matches_naive_composition(name, coefficients, temperature, naive):
  """Values, and the (h_s, W_s) gradients of a masked mean and of a weighted sum, equal the naive
  loss on materialised logits; dropped tokens give 0 and no hidden-state gradient."""
  batch = _batch(0)
  fused = _fused(divergence(name, **coefficients), batch, temperature=temperature)
  reference = lambda hs, ws: naive(hs @ ws, batch["ht"] @ batch["wt"], temperature=temperature,
                                   where=batch["keep"])
  _assert_matches_reference(fused, reference, batch)


def test_cotangent_picks_the_gradient_path(monkeypatch):
  """A masked mean reuses the forward pass's head gradient; per-token weights recompute it. With
  the recomputation poisoned (NaN), the first stays exact and the second turns NaN."""
  batch = _batch(1)
  div = divergence("generalized_jsd", beta=0.5)
  expected = _outputs(_fused(div, batch), batch)
  recompute = fused_linear._add_head_grad
  monkeypatch.setattr(fused_linear, "_add_head_grad",
                      lambda *args, run, **kwargs: recompute(*args, run=run, **kwargs) + jnp.where(run, jnp.nan, 0.0))
  values, mean_grads, weighted_grads = _outputs(_fused(div, batch), batch)
  np.testing.assert_array_equal(values, expected[0])
  _assert_grads_close(mean_grads, expected[1], rtol=1e-6)
  # The hidden-state gradient never needs the recomputation.
  _assert_grads_close(weighted_grads[:1], expected[2][:1], rtol=1e-6)
  assert np.all(np.isnan(weighted_grads[1]))


@pytest.mark.parametrize("token_chunk,vocab_tile", [(64, 512), (5, 300), (37, 301)],
                         ids=["one_chunk_one_tile", "ragged", "exact"])
def test_chunk_and_tile_sizes(token_chunk, vocab_tile):
  """Any chunking gives the tiled twin's values and gradients on materialised logits, softcap on."""
  batch = _batch(2)
  div = divergence("reverse_kl")
  kwargs = dict(temperature=1.3, softcap=4.0)
  fused = _fused(div, batch, token_chunk=token_chunk, vocab_tile=vocab_tile, **kwargs)
  tiled = lambda hs, ws: tiled_divergence(div, hs @ ws, batch["ht"] @ batch["wt"], where=batch["keep"], tile=TILE,
                                          **kwargs)
  ours, reference = _outputs(fused, batch), _outputs(tiled, batch)
  np.testing.assert_allclose(ours[0], reference[0], rtol=RTOL, atol=ATOL)
  _assert_grads_close(ours[1], reference[1])
  _assert_grads_close(ours[2], reference[2])


def test_bfloat16_hidden_states():
  """bf16 hidden states with float32 heads: the logits are float32 products (as `h @ W` promotes),
  the hidden-state gradient comes back in bf16."""
  batch = _batch(3, hidden_dtype=jnp.bfloat16)
  div = divergence("forward_kl")
  reference = lambda hs, ws: losses.forward_kl(hs @ ws, batch["ht"] @ batch["wt"], where=batch["keep"])
  values, mean_grads, weighted_grads = _outputs(_fused(div, batch), batch)
  ref_values, ref_mean_grads, ref_weighted_grads = _outputs(reference, batch)
  assert mean_grads[0].dtype == jnp.bfloat16 and mean_grads[1].dtype == jnp.float32
  np.testing.assert_allclose(values, ref_values, rtol=RTOL, atol=ATOL)
  # Both round the same float32 hidden-state gradient to bf16 (2⁻⁸ relative).
  _assert_grads_close(mean_grads, ref_mean_grads, rtol=1e-2)
  _assert_grads_close(weighted_grads, ref_weighted_grads, rtol=1e-2)


def test_teacher_mask_and_garbage_rows():
  """The teacher gets no gradient; NaN hidden states of dropped tokens reach nothing; an all-dropped
  batch gives zeros."""
  batch = _batch(4)
  div = divergence("total_variation")
  dropped = ~np.asarray(batch["keep"])
  hs = batch["hs"].at[dropped].set(jnp.nan)
  ht = batch["ht"].at[dropped].set(jnp.nan)

  def loss(hs, ws, ht, wt, keep):
    return losses.masked_mean(fused_linear_divergence(div, hs, ws, ht, wt, where=keep, token_chunk=CHUNK,
                                                      vocab_tile=TILE), keep)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  _, grads = step(hs, batch["ws"], ht, batch["wt"], batch["keep"])
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[dropped] == 0.0)
  assert not np.any(grads[2]) and not np.any(grads[3])
  _, clean = step(batch["hs"], batch["ws"], batch["ht"], batch["wt"], batch["keep"])
  _assert_grads_close(grads[:2], clean[:2], rtol=1e-6)

  value, grads = step(batch["hs"], batch["ws"], batch["ht"], batch["wt"], jnp.zeros(N, bool))
  assert value == 0.0 and not any(np.any(g) for g in grads)


def _shapes_in(jaxpr) -> set:
  """Shapes of every value an equation of `jaxpr` (or of a jaxpr nested in one) produces."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes |= _shapes_in(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes |= _shapes_in(sub)
  return shapes


def test_values_alone_do_no_gradient_work():
  """Without differentiation no `[Hs, V]` head gradient and no `[N, Hs]` hidden-state gradient
  is formed; under jax.grad both are."""
  batch = _batch(5)
  fused = _fused(divergence("forward_kl"), batch)
  forward_only = _shapes_in(jax.make_jaxpr(fused)(batch["hs"], batch["ws"]).jaxpr)
  assert (HS, V) not in forward_only and (N, HS) not in forward_only
  with_grad = _shapes_in(jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(fused(a, b)), argnums=(0, 1)))(
      batch["hs"], batch["ws"]).jaxpr)
  assert (HS, V) in with_grad and (N, HS) in with_grad


def test_rejects_mismatched_shapes():
  batch = _batch(6)
  div = divergence("forward_kl")
  with pytest.raises(ValueError, match="vocab mismatch"):
    fused_linear_divergence(div, batch["hs"], batch["ws"], batch["ht"], batch["wt"][:, :-1])
  with pytest.raises(ValueError, match="matching the hidden sizes"):
    fused_linear_divergence(div, batch["hs"], batch["ws"][:-1], batch["ht"], batch["wt"])
  with pytest.raises(ValueError, match="one N"):
    fused_linear_divergence(div, batch["hs"], batch["ws"], batch["ht"][:-1], batch["wt"])
  with pytest.raises(ValueError, match="`where`"):
    fused_linear_divergence(div, batch["hs"], batch["ws"], batch["ht"], batch["wt"], where=batch["keep"][:-1])


# fused_linear_cross_entropy: the hard-label term, against kdjax.losses.cross_entropy on h @ W.


def _labels(seed, keep):
  """Ids in [0, V) on kept tokens and the ignore index −100 on dropped ones (never looked at)."""
  labels = np.random.default_rng(seed).integers(0, V, N)
  return jnp.asarray(np.where(np.asarray(keep), labels, -100), jnp.int32)


def _naive_ce(labels, keep, softcap=None):
  def loss(hs, ws):
    logits = hs @ ws
    logits = logits if softcap is None else softcap * jnp.tanh(logits / softcap)
    return losses.cross_entropy(logits, labels, where=keep)
  return loss


CE_CASES = [(CHUNK, TILE, None), (5, 300, 4.0), (64, 512, None), (37, 301, 2.0)]


@pytest.mark.parametrize("token_chunk,vocab_tile,softcap", CE_CASES, ids=["ragged", "ragged_softcap", "one_chunk",
                                                                            "exact_softcap"])
def test_cross_entropy_matches_naive_composition(token_chunk, vocab_tile, softcap):
  """Values and the (h, W) gradients of a masked mean (uniform cotangent) and of a weighted sum
  (recomputed head gradient) equal the naive loss on materialised logits; dropped tokens give 0."""
  batch = _batch(10)
  labels = _labels(10, batch["keep"])
  fused = lambda hs, ws: fused_linear_cross_entropy(hs, ws, labels, where=batch["keep"], token_chunk=token_chunk,
                                                    vocab_tile=vocab_tile, softcap=softcap)
  _assert_matches_reference(fused, _naive_ce(labels, batch["keep"], softcap), batch)


def test_cross_entropy_garbage_rows_and_gradient_paths(monkeypatch):
  """NaN hidden states of dropped tokens reach nothing; a masked mean reuses the forward pass's head
  gradient (exact with the recomputation poisoned) while per-token weights recompute it."""
  batch = _batch(11)
  labels = _labels(11, batch["keep"])
  fused = lambda hs, ws: fused_linear_cross_entropy(hs, ws, labels, where=batch["keep"], token_chunk=CHUNK,
                                                    vocab_tile=TILE)
  clean = _outputs(fused, batch)
  dropped = ~np.asarray(batch["keep"])
  garbage = _outputs(fused, dict(batch, hs=batch["hs"].at[dropped].set(jnp.nan)))
  np.testing.assert_array_equal(garbage[0], clean[0])
  for ours, reference in zip(garbage[1:], clean[1:]):
    assert all(np.all(np.isfinite(g)) for g in ours)
    _assert_grads_close(ours, reference, rtol=1e-6)

  recompute = fused_linear._add_head_grad
  monkeypatch.setattr(fused_linear, "_add_head_grad",
                      lambda *args, run, **kwargs: recompute(*args, run=run, **kwargs) + jnp.where(run, jnp.nan, 0.0))
  values, mean_grads, weighted_grads = _outputs(fused, batch)
  _assert_grads_close(mean_grads, clean[1], rtol=1e-6)
  _assert_grads_close(weighted_grads[:1], clean[2][:1], rtol=1e-6)
  assert np.all(np.isnan(weighted_grads[1]))


def test_cross_entropy_bfloat16_hidden_states():
  """bf16 hidden states: float32 logits, the hidden-state gradient back in bf16."""
  batch = _batch(12, hidden_dtype=jnp.bfloat16)
  labels = _labels(12, batch["keep"])
  fused = lambda hs, ws: fused_linear_cross_entropy(hs, ws, labels, where=batch["keep"], token_chunk=CHUNK,
                                                    vocab_tile=TILE)
  values, mean_grads, weighted_grads = _outputs(fused, batch)
  ref_values, ref_mean_grads, ref_weighted_grads = _outputs(_naive_ce(labels, batch["keep"]), batch)
  assert values.dtype == jnp.float32 and mean_grads[0].dtype == jnp.bfloat16 and mean_grads[1].dtype == jnp.float32
  np.testing.assert_allclose(values, ref_values, rtol=RTOL, atol=ATOL)
  _assert_grads_close(mean_grads, ref_mean_grads, rtol=1e-2)
  _assert_grads_close(weighted_grads, ref_weighted_grads, rtol=1e-2)


def test_cross_entropy_labels_and_dispatch():
  """Concrete out-of-range labels of kept tokens raise (dropped ones may hold anything); a traced one
  gives NaN on its row only; the public wrapper's 'naive' and streamed versions agree."""
  batch = _batch(13)
  keep = batch["keep"]
  labels = _labels(13, keep)
  hs, ws = batch["hs"], batch["ws"]
  with pytest.raises(ValueError, match=r"labels of kept tokens must lie in \[0, 301\)"):
    fused_linear_cross_entropy(hs, ws, labels.at[0].set(V))
  with pytest.raises(ValueError, match="must lie in"):
    fused_linear_cross_entropy(hs, ws, labels.at[0].set(-1), where=keep)
  with pytest.raises(ValueError, match="must lie in"):
    fused_linear_cross_entropy(hs, ws, labels)  # the −100 of dropped rows count when nothing is dropped
  with pytest.raises(ValueError, match="integer"):
    fused_linear_cross_entropy(hs, ws, labels.astype(jnp.float32), where=keep)
  with pytest.raises(ValueError, match="labels"):
    fused_linear_cross_entropy(hs, ws, labels[:-1], where=keep)

  traced = jax.jit(lambda y: fused_linear_cross_entropy(hs, ws, y, where=keep, token_chunk=CHUNK, vocab_tile=TILE))
  values = np.asarray(traced(labels.at[0].set(V)))
  assert np.isnan(values[0]) and np.all(np.isfinite(values[1:]))

  results = {}
  for implementation in ("naive", "tiled"):
    fn = lambda h, w: kernels.fused_linear_cross_entropy(  # noqa: E731
        h, w, labels, where=keep, implementation=implementation, softcap=3.0, token_chunk=CHUNK, tile=TILE)
    results[implementation] = (fn(hs, ws), jax.grad(lambda h, w: jnp.sum(fn(h, w) * batch["weights"]), (0, 1))(hs, ws))
  np.testing.assert_allclose(results["tiled"][0], results["naive"][0], rtol=RTOL, atol=ATOL)
  _assert_grads_close(results["tiled"][1], results["naive"][1])
