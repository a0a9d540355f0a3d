"""Tests of `kdjax.losses.transformer_relations` (MiniLM, MiniLMv2, TRG, MI-α).

Expected values come from float64 NumPy re-implementations written with explicit loops over examples,
heads, queries and nodes (not the vectorised forms of the library), or from invariants of the maths.
"""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import transformer_relations as tr

RTOL, ATOL = 1e-4, 1e-6

# The functions under jit, for the tests that are not about jit: one XLA program per signature is far
# cheaper on a loaded CPU than eager op-by-op dispatch (each primitive compiles on first use).
J = SimpleNamespace(
    attention_kl=jax.jit(tr.attention_kl),
    value_relation=jax.jit(tr.value_relation),
    relation_kl=jax.jit(tr.relation_kl, static_argnames="num_relation_heads"),
    minilmv2_loss=jax.jit(tr.minilmv2_loss, static_argnames="num_relation_heads"),
    token_relation_graph=jax.jit(tr.token_relation_graph, static_argnames=("num_neighbors", "sigma", "normalize")),
    token_contrast=jax.jit(tr.token_contrast),
    contextual_loss=jax.jit(tr.contextual_loss),
    mi_alpha=jax.jit(tr.mi_alpha),
)


def _normal(rng, shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


def _token_mask(length, kept):
  """Example b keeps its first kept[b] tokens (a right-padded batch)."""
  return np.arange(length)[None, :] < np.asarray(kept)[:, None]


def _probs(rng, shape):
  z = rng.normal(size=shape) * 2.0
  e = np.exp(z - z.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# float64 references, one loop per index of the paper's sums.


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def _kl(p, q):
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  support = p > 0
  return float(np.sum(p[support] * (np.log(p[support]) - np.log(q[support]))))


def ref_attention_kl(student, teacher, keep):
  out = []
  for b in range(student.shape[0]):
    idx = np.flatnonzero(keep[b])
    total = 0.0
    for h in range(student.shape[1]):
      for t in idx:
        q = student[b, h, t, idx].astype(np.float64)
        p = teacher[b, h, t, idx].astype(np.float64)
        total += _kl(p / p.sum(), q / q.sum())
    out.append(total / max(student.shape[1] * len(idx), 1))
  return np.array(out)


def _relation_rows(x):
  """softmax(x xᵀ/√d) row by row for one head's [n, d] vectors."""
  x = np.asarray(x, np.float64)
  return [_softmax([x[i] @ x[j] / np.sqrt(x.shape[1]) for j in range(len(x))]) for i in range(len(x))]


def ref_value_relation(student, teacher, keep):
  """Heads taken one by one from [B, L, H, d]."""
  out = []
  for b in range(student.shape[0]):
    idx = np.flatnonzero(keep[b])
    heads = student.shape[2]
    total = 0.0
    for h in range(heads):
      rows_s = _relation_rows(student[b, idx, h, :])
      rows_t = _relation_rows(teacher[b, idx, h, :])
      total += sum(_kl(p, q) for p, q in zip(rows_t, rows_s))
    out.append(total / max(heads * len(idx), 1))
  return np.array(out)


def ref_relation_kl(student, teacher, r, keep):
  """MiniLMv2: concatenate the heads, slice the concatenation into r relation heads."""
  out = []
  for b in range(student.shape[0]):
    idx = np.flatnonzero(keep[b])
    cat_s = student[b].reshape(student.shape[1], -1)[idx]
    cat_t = teacher[b].reshape(teacher.shape[1], -1)[idx]
    ds, dt = cat_s.shape[1] // r, cat_t.shape[1] // r
    total = 0.0
    for a in range(r):
      rows_s = _relation_rows(cat_s[:, a * ds:(a + 1) * ds])
      rows_t = _relation_rows(cat_t[:, a * dt:(a + 1) * dt])
      total += sum(_kl(p, q) for p, q in zip(rows_t, rows_s))
    out.append(total / max(r * len(idx), 1))
  return np.array(out)


def _nodes(h, keep, normalize):
  x = np.asarray(h, np.float64)[keep]
  if normalize:
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return x


def _ref_graph_rows(x, k, sigma):
  """Row i: softmax over j ≠ i of A_ij, A_ij = exp(−‖x_i − x_j‖²/(2σ)) when i is one of j's k nearest."""
  n = len(x)
  dist2 = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
  adjacency = np.zeros((n, n))
  for j in range(n):
    others = [i for i in range(n) if i != j]
    nearest = sorted(others, key=lambda i: dist2[i, j])[:k]
    for i in nearest:
      adjacency[i, j] = np.exp(-dist2[i, j] / (2 * sigma))
  return [_softmax([adjacency[i, j] for j in range(n) if j != i]) for i in range(n)]


def ref_token_relation_graph(student, teacher, keep, k, sigma, normalize=True):
  rows_s = _ref_graph_rows(_nodes(student, keep, normalize), k, sigma)
  rows_t = _ref_graph_rows(_nodes(teacher, keep, normalize), k, sigma)
  return np.mean([_kl(p, q) for p, q in zip(rows_t, rows_s)])


def ref_token_contrast(student, teacher, keep, temperature):
  s, t = _nodes(student, keep, True), _nodes(teacher, keep, True)
  return np.mean([-np.log(_softmax([s[i] @ t[j] / temperature for j in range(len(t))])[i]) for i in range(len(s))])


def ref_contextual(student, teacher, keep):
  out = []
  for b in range(student.shape[0]):
    idx = np.flatnonzero(keep[b])
    cs_s, cs_t = np.array(_relation_rows(student[b, idx])), np.array(_relation_rows(teacher[b, idx]))
    out.append(np.mean((cs_t - cs_s) ** 2) if len(idx) else 0.0)
  return np.array(out)


def ref_mi_alpha(scores, alpha, log_a, keep=None):
  """Poole's I_α in probability space: scores[i, j] = f(x_j, y_i); returns −I_α."""
  idx = list(range(len(scores))) if keep is None else list(np.flatnonzero(keep))
  s = np.asarray(scores, np.float64)
  a = np.broadcast_to(np.asarray(log_a, np.float64), (len(s),))
  assert len(idx) >= 2

  def m(i, j):  # α · mean_{k ≠ j} e^{f_ik} + (1 − α) · a(y_i)
    loo = np.mean([np.exp(s[i, k]) for k in idx if k != j])
    return alpha * loo + (1 - alpha) * np.exp(a[i])

  pairs = [(i, j) for i in idx for j in idx if i != j]
  joint = sum(s[i, i] - np.log(m(i, j)) for i, j in pairs) / len(pairs)
  marginal = sum(np.exp(s[i, j]) / m(i, i) for i, j in pairs) / len(pairs)
  return -(1.0 + joint - marginal)


def ref_loo_infonce(scores):
  """InfoNCE with K − 1 candidates (the positive and K − 2 negatives), averaged over the left-out one."""
  s = np.asarray(scores, np.float64)
  k = len(s)
  values = []
  for i in range(k):
    for j in range(k):
      if j != i:
        candidates = [c for c in range(k) if c != j]
        values.append(s[i, i] - np.log(np.mean(np.exp(s[i, candidates]))))
  return np.mean(values)


def ref_nwj(scores):
  """NWJ (f-GAN KL dual): E_joint[f] − e^{−1} E_marginal[e^f]."""
  s = np.asarray(scores, np.float64)
  k = len(s)
  off = [np.exp(s[i, j]) for i in range(k) for j in range(k) if i != j]
  return np.mean(np.diag(s)) - np.exp(-1.0) * np.mean(off)


# ------------------------------------------------------------------------------------------------
# MiniLM / MiniLMv2 against the references, with and without jit.


B, L, H = 3, 6, 4
KEPT = (6, 4, 1)


class ReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention_kl(self):
    rng = np.random.default_rng(0)
    q, p = _probs(rng, (B, H, L, L)), _probs(rng, (B, H, L, L))
    keep = _token_mask(L, KEPT)
    fn = self.variant(tr.attention_kl)
    got = fn(q, p, where=keep)
    chex.assert_shape(got, (B,))
    np.testing.assert_allclose(got, ref_attention_kl(q, p, keep), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(fn(q, p), ref_attention_kl(q, p, np.ones((B, L), bool)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(fn(p, p, where=keep), 0.0, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_relation(self):
    rng = np.random.default_rng(1)
    vs, vt = _normal(rng, (B, L, H, 8)), _normal(rng, (B, L, H, 16), 2.0)
    keep = _token_mask(L, KEPT)
    fn = self.variant(tr.value_relation)
    np.testing.assert_allclose(fn(vs, vt, where=keep), ref_value_relation(vs, vt, keep), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(fn(vt, vt, where=keep), 0.0, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_relation_kl(self):
    rng = np.random.default_rng(2)
    # Different head counts and widths: student 4 heads × 6, teacher 2 heads × 18; r = 3 relation heads.
    xs, xt = _normal(rng, (B, L, 4, 6)), _normal(rng, (B, L, 2, 18), 1.5)
    keep = _token_mask(L, KEPT)
    fn = self.variant(lambda s, t, w: tr.relation_kl(s, t, num_relation_heads=3, where=w))
    np.testing.assert_allclose(fn(xs, xt, keep), ref_relation_kl(xs, xt, 3, keep), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(fn(xs, xs, keep), 0.0, atol=1e-6)


def test_relation_kl_with_r_equal_heads_is_the_per_head_value_relation():
  rng = np.random.default_rng(3)
  vs, vt = _normal(rng, (B, L, H, 8)), _normal(rng, (B, L, H, 8))
  keep = _token_mask(L, KEPT)
  per_head = J.value_relation(vs, vt, where=keep)
  np.testing.assert_allclose(J.relation_kl(vs, vt, num_relation_heads=H, where=keep), per_head, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(per_head, ref_value_relation(vs, vt, keep), rtol=RTOL, atol=ATOL)


def test_relation_kl_depends_on_the_student_heads_only_through_their_concatenation():
  rng = np.random.default_rng(4)
  xs, xt = _normal(rng, (B, L, 4, 6)), _normal(rng, (B, L, 3, 8))
  keep = _token_mask(L, KEPT)
  want = J.relation_kl(xs, xt, num_relation_heads=2, where=keep)
  for heads in (1, 2, 8, 12):  # the same 24-wide vectors seen as other head splits
    got = J.relation_kl(xs.reshape(B, L, heads, -1), xt, num_relation_heads=2, where=keep)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(J.relation_kl(xs.reshape(B, L, -1), xt, num_relation_heads=2, where=keep), want,
                             rtol=1e-6, atol=1e-7)
  # The split is positional: shuffling the student's heads changes what relation head a compares.
  shuffled = J.relation_kl(xs[:, :, ::-1], xt, num_relation_heads=2, where=keep)
  assert not np.allclose(shuffled, want)


def test_minilmv2_loss_sums_the_three_relations():
  rng = np.random.default_rng(5)
  keep = _token_mask(L, KEPT)
  student = {name: _normal(rng, (B, L, 4, 4)) for name in tr.MINILMV2_RELATIONS}
  teacher = {name: _normal(rng, (B, L, 2, 16)) for name in tr.MINILMV2_RELATIONS}
  got = J.minilmv2_loss(student, teacher, num_relation_heads=4, where=keep)
  want = sum(ref_relation_kl(student[n], teacher[n], 4, keep) for n in tr.MINILMV2_RELATIONS)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(J.minilmv2_loss(teacher, teacher, num_relation_heads=4), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="keys"):
    J.minilmv2_loss({"queries": student["queries"], "values": student["values"]}, teacher, num_relation_heads=4)


# ------------------------------------------------------------------------------------------------
# Padding, gradients, errors of the per-token losses.


def _pad(x, axes, extra, rng):
  """Appends `extra` tokens on each of `axes`, filled with NaN and huge values."""
  widths = [(0, 0)] * x.ndim
  for axis in axes:
    widths[axis] = (0, extra)
  padded = np.pad(x, widths)
  garbage = rng.normal(size=padded.shape) * 1e6
  garbage[..., ::3] = np.nan
  region = np.ones(padded.shape, bool)
  region[tuple(slice(0, n) for n in x.shape)] = False
  return np.where(region, garbage, padded).astype(np.float32)


PER_TOKEN = {
    "attention_kl": (lambda s, t, w: tr.attention_kl(s, t, where=w), "probs"),
    "value_relation": (lambda s, t, w: tr.value_relation(s, t, where=w), "values"),
    "relation_kl": (lambda s, t, w: tr.relation_kl(s, t, num_relation_heads=2, where=w), "values"),
    "contextual_loss": (lambda s, t, w: tr.contextual_loss(s, t, where=w), "tokens"),
    "token_relation_graph": (lambda s, t, w: tr.token_relation_graph(s, t, num_neighbors=3, where=w), "tokens"),
    "token_contrast": (lambda s, t, w: tr.token_contrast(s, t, temperature=0.2, where=w), "tokens_same"),
}


def _pair(kind, rng):
  if kind == "probs":
    return _probs(rng, (B, H, L, L)), _probs(rng, (B, H, L, L)), (2, 3)
  if kind == "values":
    return _normal(rng, (B, L, H, 4)), _normal(rng, (B, L, H, 6)), (1,)
  width_t = 5 if kind == "tokens_same" else 7
  return _normal(rng, (B, L, 5)), _normal(rng, (B, L, width_t)), (1,)


@pytest.mark.parametrize("name", sorted(PER_TOKEN))
def test_padded_tokens_change_nothing_and_gradients_stay_finite(name):
  fn, kind = PER_TOKEN[name]
  rng = np.random.default_rng(6)
  s, t, axes = _pair(kind, rng)
  keep = _token_mask(L, KEPT)
  extra = 3
  s_pad, t_pad = _pad(s, axes, extra, rng), _pad(t, axes, extra, rng)
  keep_pad = np.pad(keep, [(0, 0), (0, extra)])
  value = jax.jit(fn)
  grad_fn = jax.jit(jax.grad(lambda x, t, w: jnp.sum(fn(x, t, w))))
  np.testing.assert_allclose(value(s_pad, t_pad, keep_pad), value(s, t, keep), rtol=1e-5, atol=1e-7)
  grad = grad_fn(s_pad, t_pad, keep_pad)
  assert np.all(np.isfinite(grad)), name
  # Dropped tokens receive no gradient; kept ones do.
  pad_region = np.zeros(s_pad.shape, bool)
  for axis in axes:
    index = [slice(None)] * s_pad.ndim
    index[axis] = slice(L, None)
    pad_region[tuple(index)] = True
  np.testing.assert_array_equal(np.asarray(grad)[pad_region], 0.0)
  # At identical inputs (the classic 0/0 of norms and log 0) the gradient is finite too.
  same = t if kind in ("probs", "tokens_same") else s
  grad_same = grad_fn(same, same, keep)
  assert np.all(np.isfinite(grad_same)), name


def test_example_without_kept_tokens_gives_zero():
  rng = np.random.default_rng(7)
  keep = _token_mask(L, (4, 0, 2))
  vs, vt = _normal(rng, (B, L, H, 4)), _normal(rng, (B, L, H, 4))
  for got in (J.value_relation(vs, vt, where=keep),
              J.relation_kl(vs, vt, num_relation_heads=2, where=keep),
              J.contextual_loss(vs[:, :, 0], vt[:, :, 0], where=keep),
              J.attention_kl(_probs(rng, (B, H, L, L)), _probs(rng, (B, H, L, L)), where=keep)):
    got = np.asarray(got)
    assert got[1] == 0.0 and np.all(np.isfinite(got)) and np.all(got[[0, 2]] > 0)
  none = np.zeros((B, L), bool)
  hs = vs[:, :, 0]
  assert float(J.token_relation_graph(hs, hs + 1.0, num_neighbors=2, where=none)) == 0.0
  assert float(J.token_contrast(hs, hs + 1.0, temperature=0.1, where=none)) == 0.0


def test_shape_errors_name_the_problem():
  rng = np.random.default_rng(8)
  p = _probs(rng, (B, H, L, L))
  with pytest.raises(ValueError, match="heads"):
    tr.attention_kl(p, p[:, :2])
  with pytest.raises(ValueError, match="where"):
    tr.attention_kl(p, p, where=np.ones((B, L + 1), bool))
  v = _normal(rng, (B, L, H, 4))
  with pytest.raises(ValueError, match="heads"):
    tr.value_relation(v, v[:, :, :2])
  with pytest.raises(ValueError, match="num_relation_heads=3"):
    tr.relation_kl(v, v, num_relation_heads=3)
  with pytest.raises(ValueError, match="batch or tokens"):
    tr.relation_kl(v, v[:, :-1], num_relation_heads=2)
  h = _normal(rng, (B, L, 4))
  with pytest.raises(ValueError, match="num_neighbors"):
    tr.token_relation_graph(h, h, num_neighbors=B * L)
  with pytest.raises(ValueError, match="width"):
    tr.token_contrast(h, _normal(rng, (B, L, 3)), temperature=0.1)
  with pytest.raises(ValueError, match="same batch and L"):
    tr.contextual_loss(h, h[:, :-1])
  with pytest.raises(ValueError, match="tile"):
    tr.tokens_from_feature_map(np.zeros((1, 6, 6, 2), np.float32), patch_size=4)
  with pytest.raises(ValueError, match="NHWC"):
    tr.tokens_from_feature_map(h)
  with pytest.raises(ValueError, match="num_tokens"):
    tr.sample_tokens(jax.random.key(0), h, num_tokens=L + 1)


# ------------------------------------------------------------------------------------------------
# layer_map.


def test_layer_map_cases():
  assert tr.layer_map(3, 12) == ((0, 3), (1, 7), (2, 11))          # g(m) = 4m, 1-based
  assert tr.layer_map(4, 6) == ((0, 0), (1, 2), (2, 3), (3, 5))    # floor(1.5 m)
  assert tr.layer_map(6, 6) == tuple((i, i) for i in range(6))
  assert tr.layer_map(2, 6, "last") == ((1, 5),)
  assert tr.layer_map(2, 24, "custom", {1: 20}) == ((1, 20),)
  assert tr.layer_map(3, 6, "custom", [(2, 5), (0, 1)]) == ((0, 1), (2, 5))
  for m, n in ((1, 1), (5, 7), (7, 7), (4, 24)):
    pairs = tr.layer_map(m, n)
    assert pairs[-1] == (m - 1, n - 1) and len(pairs) == m
    assert all(b[1] > a[1] for a, b in zip(pairs, pairs[1:]))     # strictly deeper teacher layers


@pytest.mark.parametrize("args, match", [
    ((4, 2), "at most as many"),
    ((2, 6, "custom", {2: 1}), "out of range"),
    ((2, 6, "custom", {0: 6}), "out of range"),
    ((2, 6, "custom", {-1: 0}), "out of range"),
    ((2, 6, "custom", [(0, 1), (0, 2)]), "twice"),
    ((2, 6, "custom", {}), "empty"),
    ((2, 6, "custom"), "exactly when"),
    ((2, 6, "uniform", {0: 1}), "exactly when"),
    ((2, 6, "middle"), "unknown layer_map mode"),
    ((0, 6), "positive int"),
])
def test_layer_map_errors(args, match):
  with pytest.raises(ValueError, match=match):
    tr.layer_map(*args)


# ------------------------------------------------------------------------------------------------
# TRG.


def test_token_relation_graph_matches_reference():
  rng = np.random.default_rng(9)
  hs, ht = _normal(rng, (B, L, 5)), _normal(rng, (B, L, 9), 3.0)
  keep = _token_mask(L, KEPT)
  for k, sigma in ((1, 0.5), (3, 1.0), (6, 0.2)):
    got = J.token_relation_graph(hs, ht, num_neighbors=k, sigma=sigma, where=keep)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, ref_token_relation_graph(hs, ht, keep, k, sigma), rtol=RTOL, atol=ATOL)
  got = J.token_relation_graph(hs, ht / 3.0, num_neighbors=3, sigma=4.0, normalize=False)
  want = ref_token_relation_graph(hs, ht / 3.0, np.ones((B, L), bool), 3, 4.0, normalize=False)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert float(J.token_relation_graph(ht, ht, num_neighbors=3, where=keep)) == pytest.approx(0.0, abs=1e-6)


def test_token_relation_graph_is_a_graph_over_the_batch():
  rng = np.random.default_rng(10)
  hs, ht = _normal(rng, (B, L, 5)), _normal(rng, (B, L, 7))
  keep = _token_mask(L, KEPT)
  want = J.token_relation_graph(hs, ht, num_neighbors=3, where=keep)
  # Nodes are unordered: permuting tokens within and across examples (consistently) changes nothing.
  perm = rng.permutation(B * L)
  shuffle = lambda x: x.reshape(B * L, -1)[perm].reshape(x.shape)
  got = J.token_relation_graph(shuffle(hs), shuffle(ht), num_neighbors=3,
                                where=keep.reshape(-1)[perm].reshape(B, L))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Scaling the features changes nothing when they are normalised.
  np.testing.assert_allclose(J.token_relation_graph(5.0 * hs, ht, num_neighbors=3, where=keep), want, rtol=1e-5)


def test_token_contrast_and_contextual_match_references():
  rng = np.random.default_rng(11)
  keep = _token_mask(L, KEPT)
  hs, ht = _normal(rng, (B, L, 6)), _normal(rng, (B, L, 6))
  for temperature in (0.07, 0.5):
    np.testing.assert_allclose(J.token_contrast(hs, ht, temperature=temperature, where=keep),
                               ref_token_contrast(hs, ht, keep, temperature), rtol=RTOL, atol=ATOL)
  ht_wide = _normal(rng, (B, L, 10), 2.0)
  got = J.contextual_loss(hs, ht_wide, where=keep)
  chex.assert_shape(got, (B,))
  np.testing.assert_allclose(got, ref_contextual(hs, ht_wide, keep), rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(J.contextual_loss(ht_wide, ht_wide, where=keep), 0.0, atol=1e-8)


def test_sample_tokens_draws_kept_positions_shared_by_all_arrays():
  rng = np.random.default_rng(12)
  hs, ht = _normal(rng, (B, L, 5)), _normal(rng, (B, L, 3))
  keep = _token_mask(L, KEPT)
  (s, t), kept = tr.sample_tokens(jax.random.key(0), hs, ht, num_tokens=3, where=keep)
  chex.assert_shape([s, t], [(B, 3, 5), (B, 3, 3)])
  np.testing.assert_array_equal(kept.sum(-1), np.minimum(np.asarray(KEPT), 3))
  for b in range(B):
    for j in range(3):
      position = int(np.flatnonzero(np.all(hs[b] == np.asarray(s[b, j]), axis=-1))[0])
      np.testing.assert_array_equal(t[b, j], ht[b, position])   # same position in both arrays
      assert bool(kept[b, j]) == bool(keep[b, position])
  tokens = tr.tokens_from_feature_map(jnp.arange(2 * 4 * 4 * 3.0).reshape(2, 4, 4, 3), patch_size=2)
  chex.assert_shape(tokens, (2, 4, 12))
  np.testing.assert_array_equal(tokens[0, 1, :3], np.arange(2 * 4 * 4 * 3.0).reshape(2, 4, 4, 3)[0, 0, 2])


# ------------------------------------------------------------------------------------------------
# MI-α.


class MIAlphaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference_and_endpoints(self):
    rng = np.random.default_rng(13)
    x, y = _normal(rng, (6, 4)), _normal(rng, (6, 4))
    fn = self.variant(lambda x, y, a, log_a: tr.mi_alpha(x, y, alpha=a, log_baseline=log_a))
    scores = y.astype(np.float64) @ x.T.astype(np.float64)
    log_a = _normal(rng, (6,))
    for alpha in (0.0, 0.3, 0.9, 1.0):
      for baseline in (1.0, log_a):
        np.testing.assert_allclose(fn(x, y, alpha, baseline), ref_mi_alpha(scores, alpha, baseline),
                                   rtol=RTOL, atol=1e-5)
    # α = 1 is InfoNCE (K − 1 candidates, leave-one-out) whatever the baseline; α = 0 with a = e is NWJ.
    for baseline in (1.0, log_a):
      np.testing.assert_allclose(-fn(x, y, 1.0, baseline), ref_loo_infonce(scores), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(-fn(x, y, 0.0, 1.0), ref_nwj(scores), rtol=RTOL, atol=1e-5)


def test_mi_alpha_where_drops_rows_and_bilinear_critic():
  rng = np.random.default_rng(14)
  x, y = _normal(rng, (7, 3)), _normal(rng, (7, 5))
  w = _normal(rng, (5, 3), 0.5)
  keep = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  got = J.mi_alpha(x, y, alpha=0.6, critic_weight=w, where=keep)
  scores = y.astype(np.float64) @ w @ x.T.astype(np.float64)
  np.testing.assert_allclose(got, ref_mi_alpha(scores, 0.6, 1.0, keep), rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(got, J.mi_alpha(x[keep], y[keep], alpha=0.6, critic_weight=w), rtol=1e-5)
  # Garbage in dropped rows reaches neither the value nor the gradient.
  x_bad = np.where(keep[:, None], x, np.nan).astype(np.float32)
  np.testing.assert_allclose(J.mi_alpha(x_bad, y, alpha=0.6, critic_weight=w, where=keep), got, rtol=1e-6)
  loss = lambda x, w: tr.mi_alpha(x, y, alpha=0.6, critic_weight=w, where=keep)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x_bad, w)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(np.asarray(grads[0])[~keep], 0.0)
  # The identity bilinear critic is the dot critic.
  z = _normal(rng, (7, 5))
  np.testing.assert_allclose(J.mi_alpha(z, y, alpha=0.4, critic_weight=np.eye(5, dtype=np.float32)),
                             J.mi_alpha(z, y, alpha=0.4), rtol=1e-6)
  # Fewer than two kept examples: 0 with a finite (zero) gradient.
  one = np.zeros(7, bool)
  one[3] = True
  assert float(J.mi_alpha(z, y, alpha=0.5, where=one)) == 0.0
  assert np.all(jax.jit(jax.grad(lambda z: tr.mi_alpha(z, y, alpha=0.5, where=one)))(z) == 0.0)


def test_mi_alpha_is_stable_and_its_bound_is_useful():
  rng = np.random.default_rng(15)
  y = _normal(rng, (8, 4))
  # Large scores: the leave-one-out logsumexp must stay exact where one entry dominates its row.
  big = 30.0 * y
  grad_fn = jax.jit(jax.grad(lambda x, a: tr.mi_alpha(x, y, alpha=a, log_baseline=40.0)))
  for alpha in (0.0, 0.5, 1.0):
    got = J.mi_alpha(big, y, alpha=alpha, log_baseline=40.0)
    want = ref_mi_alpha(y.astype(np.float64) @ big.T.astype(np.float64), alpha, 40.0)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    grad = grad_fn(big, alpha)
    assert np.all(np.isfinite(grad))
  # A student aligned with the teacher has a higher bound (lower loss) than an unrelated one, and the
  # InfoNCE end never exceeds log(K − 1).
  aligned = J.mi_alpha(3.0 * y, y, alpha=1.0)
  unrelated = J.mi_alpha(3.0 * _normal(rng, (8, 4)), y, alpha=1.0)
  assert float(aligned) < float(unrelated)
  assert -float(aligned) <= np.log(7) + 1e-5


def test_mi_alpha_errors():
  rng = np.random.default_rng(16)
  x, y = _normal(rng, (4, 3)), _normal(rng, (4, 5))
  with pytest.raises(ValueError, match="equal widths"):
    tr.mi_alpha(x, y, alpha=0.5)
  with pytest.raises(ValueError, match="critic_weight"):
    tr.mi_alpha(x, y, alpha=0.5, critic_weight=np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="alpha"):
    tr.mi_alpha(x, x, alpha=1.5)
  with pytest.raises(ValueError, match="log_baseline"):
    tr.mi_alpha(x, x, alpha=0.5, log_baseline=np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="at least 2"):
    tr.mi_alpha(x[:1], x[:1], alpha=0.5)
  with pytest.raises(ValueError, match="where"):
    tr.mi_alpha(x, x, alpha=0.5, where=np.ones(5, bool))
