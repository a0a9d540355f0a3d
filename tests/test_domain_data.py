"""Data-side KD: DDK's domain re-weighting (update rule, mixture, batch hook) and MiniPLM's
difference sampling (scores, selection, refined corpus), against NumPy references and limit cases."""

from __future__ import annotations

import json
import math
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from kdjax.data import difference_sampling as ds
from kdjax.data import shakespeare, text_sources
from kdjax.data.domain_mixture import (DDKBatches, DDKConfig, DomainMixture, ddk_update, discrepancy,
                                      domain_losses)
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib, state as state_lib, step as step_lib

V, L, B = 20, 12, 8


# ----------------------------------------------------------------------------- ddk_update

def _reference_update(r, ce_s, ce_t, s, tau, u):
  """Eq. 2 of the DDK paper written out term by term from perplexities, plus the interpolation."""
  n = len(r)
  psi = [r[i] * math.exp((math.exp(ce_s[i]) / math.exp(ce_t[i])) / tau) for i in range(n)]
  total = sum(psi)
  new = [(1 - u) * p / total + u / n for p in psi]
  return np.array([s * r[i] + (1 - s) * new[i] for i in range(n)])


@pytest.mark.parametrize("s,tau,u", [(0.0, 1.0, 0.5), (0.3, 2.0, 0.2), (0.0, 0.5, 0.0), (0.9, 1.0, 1.0)])
def test_ddk_update_matches_reference(s, tau, u):
  rng = np.random.default_rng(0)
  for _ in range(5):
    r = rng.dirichlet(np.ones(4))
    ce_t = rng.uniform(1.0, 2.0, 4)
    ce_s = ce_t + rng.uniform(0.0, 1.0, 4)
    got = ddk_update(r, ce_s, ce_t, smoothing=s, temperature=tau, uniform_mix=u)
    np.testing.assert_allclose(got, _reference_update(r, ce_s, ce_t, s, tau, u), rtol=1e-12)
    assert math.isclose(got.sum(), 1.0, rel_tol=1e-12)
    assert np.all(got >= (1 - s) * u / 4 - 1e-15)


def test_ddk_update_limits_and_direction():
  r = np.array([0.1, 0.2, 0.3, 0.4])
  ce_t = np.array([1.0, 1.0, 1.0, 1.0])
  ce_s = np.array([1.2, 1.9, 1.1, 1.3])
  # Smoothing 1 keeps the old weights whatever the gaps.
  np.testing.assert_array_equal(ddk_update(r, ce_s, ce_t, smoothing=1.0), r)
  # Uniform mix 1 forgets everything but the floor.
  np.testing.assert_allclose(ddk_update(r, ce_s, ce_t, uniform_mix=1.0), np.full(4, 0.25))
  # Equal gaps and no floor: ψ ∝ r, so r is a fixed point (the history carries over).
  np.testing.assert_allclose(ddk_update(r, ce_t + 0.7, ce_t, uniform_mix=0.0), r, rtol=1e-12)
  # From uniform weights the largest gap gains most, and the order follows the gaps.
  new = ddk_update(np.full(4, 0.25), ce_s, ce_t, uniform_mix=0.5)
  assert np.argmax(new) == 1 and list(np.argsort(new)) == list(np.argsort(ce_s - ce_t))
  # A huge temperature ignores the gaps: (1 − u)·r + u/N.
  np.testing.assert_allclose(ddk_update(r, ce_s, ce_t, temperature=1e12, uniform_mix=0.5), 0.5 * r + 0.125)
  np.testing.assert_allclose(discrepancy([2.0], [1.5]), [math.exp(2.0) / math.exp(1.5)])


def test_ddk_update_rejects_bad_input():
  r, ce = np.full(3, 1 / 3), np.ones(3)
  with pytest.raises(ValueError, match="one shape"):
    ddk_update(r, np.ones(4), ce)
  with pytest.raises(ValueError, match="sum to 1"):
    ddk_update([0.5, 0.6, -0.1], ce, ce)
  with pytest.raises(ValueError, match="finite"):
    ddk_update(r, [1.0, np.nan, 1.0], ce)
  with pytest.raises(ValueError, match="smoothing must lie"):
    ddk_update(r, ce, ce, smoothing=1.5)
  with pytest.raises(ValueError, match="temperature must be positive"):
    ddk_update(r, ce, ce, temperature=0.0)
  with pytest.raises(ValueError, match=r"unknown ddk config keys \['alpha'\]"):
    DDKConfig.from_config(ml_collections.ConfigDict({"alpha": 0.5}))
  with pytest.raises(ValueError, match="update_every"):
    DDKConfig(update_every=0)
  assert DDKConfig.from_config(ml_collections.ConfigDict({"update_every": 7})).update_every == 7


# ----------------------------------------------------------------------------- DomainMixture

def test_mixture_from_works_splits_every_work():
  works = [("a1", np.arange(100, dtype=np.uint8)), ("b1", np.arange(40, dtype=np.uint8) + 100),
           ("a2", np.arange(21, dtype=np.uint8) + 200)]
  mix = DomainMixture.from_works(works, domain_of={"a1": "A", "a2": "A", "b1": "B"}, holdout_fraction=0.1)
  assert mix.names == ("A", "B")
  # ⌈0.1·100⌉ = 10, ⌈0.1·21⌉ = 3, ⌈0.1·40⌉ = 4 ids held out, from the end of each work.
  np.testing.assert_array_equal(mix.train[0], np.concatenate([np.arange(90), np.arange(18) + 200]))
  np.testing.assert_array_equal(mix.heldout[0], np.concatenate([np.arange(90, 100), np.arange(18, 21) + 200]))
  np.testing.assert_array_equal(mix.heldout[1], np.arange(36, 40) + 100)
  assert mix.sizes() == {"A": (108, 13), "B": (36, 4)}
  assert DomainMixture.from_works(works, domain_of={"a1": "A", "a2": "A", "b1": "B"}, domains=["B"]).names == ("B",)
  with pytest.raises(ValueError, match=r"unknown domains \['C'\]"):
    DomainMixture.from_works(works, domain_of={"a1": "A", "a2": "A", "b1": "B"}, domains=["A", "C"])
  with pytest.raises(ValueError, match=r"works without a domain: \['b1'\]"):
    DomainMixture.from_works(works, domain_of={"a1": "A", "a2": "A"})
  with pytest.raises(ValueError, match="holdout_fraction"):
    DomainMixture.from_works(works, domain_of={"a1": "A", "a2": "A", "b1": "B"}, holdout_fraction=1.0)


def test_mixture_of_shakespeare_genres(data_dir):
  mix = DomainMixture.load(text_sources.LOCAL_NAME, "train", data_dir=data_dir)
  assert mix.names == ("comedy", "history", "poetry", "tragedy")
  works = text_sources.load_split_works(text_sources.LOCAL_NAME, "train", data_dir=data_dir)
  for name, (train, held) in mix.sizes().items():
    lengths = [len(ids) for title, ids in works if shakespeare.GENRES[title] == name]
    assert train + held == sum(lengths) and held == sum(math.ceil(0.05 * n) for n in lengths)
  assert len(mix.train_tokens()) + sum(h for _, h in mix.sizes().values()) == sum(len(w) for _, w in works)
  with pytest.raises(ValueError, match="unknown genres"):
    DomainMixture.load(text_sources.LOCAL_NAME, "train", data_dir=data_dir, domains=["romance"])


# ----------------------------------------------------------------------------- DDKBatches

class Bigram(nnx.Module):
  """logits[t] = table[x_t]: a model whose per-domain CE is known in closed form."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def __call__(self, inputs):
    return self.table[...][inputs]


def _bigram(table, mesh):
  return state_lib.create_sharded_model(lambda: Bigram(table), mesh)


def _teacher_table():
  """Knows domain 'cycle' (x → x+1 mod 10) exactly; on ids ≥ 10 uniform over [10, 20)."""
  table = np.full((V, V), -30.0)
  table[np.arange(10), (np.arange(10) + 1) % 10] = 30.0
  table[10:, 10:] = 0.0
  return table


def _mixture():
  """Three domains whose training parts are random (so a window locates itself) and whose held-out
  tails ('cycle': the 0..9 cycle; 'noise': iid in [10, 20); 'mixed': iid in [0, 20)) fix the CEs."""
  rng = np.random.default_rng(0)
  cycle_tail = np.arange(120) % 10
  works = [("cycle", np.concatenate([rng.integers(0, 10, 360), cycle_tail])),
           ("noise", np.concatenate([rng.integers(10, 20, 300), rng.integers(10, 20, 100)])),
           ("mixed", np.concatenate([rng.integers(0, 20, 450), rng.integers(0, 20, 150)]))]
  mix = DomainMixture.from_works([(t, w.astype(np.uint8)) for t, w in works], domain_of={t: t for t, _ in works},
                                 holdout_fraction=0.25, domains=["cycle", "noise", "mixed"])
  np.testing.assert_array_equal(mix.heldout[0], cycle_tail)
  return mix


def _hook(config, mesh):
  s_graph, s_params = _bigram(np.zeros((V, V)), mesh)
  t_graph, t_params = _bigram(_teacher_table(), mesh)
  hook = DDKBatches(config, _mixture(), seq_len=L, batch_size=B, student_graphdef=s_graph, teacher_graphdef=t_graph,
                    mesh=mesh)
  return hook, types.SimpleNamespace(params=s_params), t_params


def test_rows_follow_the_weights_and_stay_in_training_parts():
  mesh = sharding_lib.make_mesh({"data": 8})
  hook, _, _ = _hook(DDKConfig(seed=3), mesh)
  hook.set_state({"weights": [0.2, 0.5, 0.3], "history": []})
  mix = hook.mixture
  windows = [np.lib.stride_tricks.sliding_window_view(t, L + 1).astype(np.int32) for t in mix.train]
  domains = []
  for step in range(400):
    batch = hook.draw(step)
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for d, row in zip(batch["domain"], rows):
      # The row is a window lying wholly inside its domain's training part (never the tail).
      assert np.any(np.all(windows[d] == row, axis=1))
    domains.append(batch["domain"])
  observed = np.bincount(np.concatenate(domains), minlength=3)
  assert scipy.stats.chisquare(observed, observed.sum() * np.array([0.2, 0.5, 0.3])).pvalue > 1e-3, observed


def test_draws_depend_only_on_seed_and_step():
  mesh = sharding_lib.make_mesh({"data": 8})
  a, _, _ = _hook(DDKConfig(seed=1), mesh)
  b, _, _ = _hook(DDKConfig(seed=1), mesh)
  c, _, _ = _hook(DDKConfig(seed=2), mesh)
  later = b.draw(9)
  for step in (3, 9):
    np.testing.assert_array_equal(a.draw(step)["inputs"], b.draw(step)["inputs"])
  np.testing.assert_array_equal(a.draw(9)["inputs"], later["inputs"])
  assert not np.array_equal(a.draw(3)["inputs"], c.draw(3)["inputs"])
  assert not np.array_equal(a.draw(3)["inputs"], a.draw(4)["inputs"])


def test_update_moves_weight_to_where_the_student_lags_and_resumes_exactly():
  mesh = sharding_lib.make_mesh({"data": 8})
  config = DDKConfig(update_every=3, temperature=10.0, uniform_mix=0.3, smoothing=0.1, seed=5)
  hook, state, t_params = _hook(config, mesh)
  first = hook(state, None, t_params, 0)
  assert first["inputs"].sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh), 2)
  [entry] = hook.history
  # Closed forms: the zero-table student is uniform over V ids; the teacher is exact on the cycle
  # (up to e^-60), uniform over 10 ids on 'noise', and confidently wrong on most of 'mixed'.
  np.testing.assert_allclose(entry["student_ce"], [math.log(V)] * 3, rtol=1e-5)
  np.testing.assert_allclose(entry["teacher_ce"][:2], [0.0, math.log(10)], atol=1e-4)
  assert entry["teacher_ce"][2] > 10
  t_graph, _ = _bigram(_teacher_table(), mesh)
  measured = domain_losses(t_graph, t_params, hook.mixture, seq_len=L, batch_size=B, mesh=mesh)
  assert list(measured) == ["cycle", "noise", "mixed"]
  np.testing.assert_allclose(list(measured.values()), entry["teacher_ce"], rtol=1e-6)
  expected = ddk_update(np.full(3, 1 / 3), entry["student_ce"], entry["teacher_ce"], smoothing=0.1,
                        temperature=10.0, uniform_mix=0.3)
  np.testing.assert_allclose(hook.weights, expected, rtol=1e-12)
  assert hook.weights[0] > hook.weights[1] > hook.weights[2]
  # Between updates the weights hold; at the next multiple of K they move again, the same way.
  after_first = hook.weights.copy()
  for step in (1, 2):
    hook(state, None, t_params, step)
  np.testing.assert_array_equal(hook.weights, after_first)
  saved = json.loads(json.dumps(hook.get_state()))
  hook(state, None, t_params, 3)
  assert len(hook.history) == 2 and hook.weights[0] > after_first[0]
  assert sum(hook.counts.values()) == 4 * B

  # A fresh hook restored from the state saved before step 3 continues identically.
  resumed, _, _ = _hook(config, mesh)
  resumed.set_state(saved)
  np.testing.assert_array_equal(resumed.weights, after_first)
  original_later = [np.asarray(hook(state, None, t_params, s)["inputs"]) for s in (4, 5, 6, 7)]
  resumed(state, None, t_params, 3)
  np.testing.assert_array_equal(resumed.weights, hook.history[1]["weights"])
  for s, want in zip((4, 5, 6, 7), original_later):
    np.testing.assert_array_equal(np.asarray(resumed(state, None, t_params, s)["inputs"]), want)
  assert resumed.history == hook.history
  with pytest.raises(ValueError, match="cannot resume"):
    resumed.set_state({"weights": [0.5, 0.5], "history": []})


def test_hook_rejects_domains_too_short():
  mesh = sharding_lib.make_mesh({"data": 8})
  graph, params = _bigram(np.zeros((V, V)), mesh)
  short = DomainMixture(["a"], [np.arange(L, dtype=np.uint8)], [np.arange(5, dtype=np.uint8)])
  with pytest.raises(ValueError, match="fewer than one window"):
    DDKBatches(DDKConfig(), short, seq_len=L, batch_size=B, student_graphdef=graph, teacher_graphdef=graph, mesh=mesh)


# ----------------------------------------------------------------------------- difference sampling

def _decoder(seed, mesh):
  config = DecoderConfig(vocab_size=V, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=L)
  return state_lib.create_sharded_model(lambda: DecoderLM(config, rngs=nnx.Rngs(seed)), mesh)


def _log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_scores_equal_numpy_per_chunk_log_likelihood_difference():
  mesh = sharding_lib.make_mesh({"data": 8})
  t_graph, t_params = _decoder(1, mesh)
  r_graph, r_params = _decoder(2, mesh)
  tokens = np.random.default_rng(0).integers(0, V, 12 * 8 * 3 + 5).astype(np.uint8)
  chunk = 10
  place = lambda batch: sharding_lib.shard_batch(batch, mesh)  # noqa: E731
  kwargs = dict(seq_len=L, batch_size=B, place=place, teacher_forward=step_lib.lm_forward(t_graph),
                teacher_params=t_params, reference_forward=step_lib.lm_forward(r_graph), reference_params=r_params)
  scores = ds.score_chunks(tokens, chunk_len=chunk, **kwargs)

  # Reference: each model run on one window at a time, log-softmax in float64, and the
  # difference of the targets' log-probabilities averaged chunk by chunk.
  teacher, reference = nnx.merge(t_graph, t_params), nnx.merge(r_graph, r_params)
  per_token = {}
  for start in range(0, len(tokens) - 1, L):
    window = tokens[start:start + L + 1].astype(np.int32)
    inputs = window[:-1][None]
    lp_t = _log_softmax64(teacher(jnp.asarray(inputs)))[0]
    lp_r = _log_softmax64(reference(jnp.asarray(inputs)))[0]
    for j, target in enumerate(window[1:]):
      per_token[start + j + 1] = lp_t[j, target] - lp_r[j, target]
  want = [np.mean([per_token[t] for t in range(c * chunk, (c + 1) * chunk) if t >= 1])
          for c in range(len(tokens) // chunk)]
  np.testing.assert_allclose(scores, want, atol=2e-5)
  # The same model as teacher and reference scores every chunk 0.
  same = dict(kwargs, reference_forward=kwargs["teacher_forward"], reference_params=t_params)
  np.testing.assert_array_equal(ds.score_chunks(tokens, chunk_len=chunk, **same), np.zeros(len(want)))
  with pytest.raises(ValueError, match="larger than the corpus"):
    ds.score_chunks(tokens, chunk_len=len(tokens) + 1, **kwargs)


def test_selection_keeps_exactly_the_top_fraction():
  scores = np.random.default_rng(1).normal(size=101)
  for fraction in (0.5, 0.3, 1.0, 0.001):
    keep = ds.select_chunks(scores, fraction)
    assert len(keep) == max(1, math.floor(fraction * 101 + 0.5)) and np.all(np.diff(keep) > 0)
    dropped = np.setdiff1d(np.arange(101), keep)
    assert not dropped.size or scores[keep].min() > scores[dropped].max()
  np.testing.assert_array_equal(ds.select_chunks([1.0, 3.0, 3.0, 2.0], 0.5), [1, 2])
  np.testing.assert_array_equal(ds.select_chunks([3.0, 1.0, 3.0, 3.0], 0.5), [0, 2])  # ties: earlier first
  control = ds.random_chunks(101, 0.5, seed=0)
  assert len(control) == 51 and len(set(control)) == 51 and np.all(np.diff(control) > 0)
  np.testing.assert_array_equal(control, ds.random_chunks(101, 0.5, seed=0))
  assert not np.array_equal(control, ds.random_chunks(101, 0.5, seed=1))
  for bad in (0.0, 1.5, -0.2, float("nan")):
    with pytest.raises(ValueError, match="fraction must lie"):
      ds.select_chunks(scores, bad)
  with pytest.raises(ValueError, match="NaN"):
    ds.select_chunks([0.0, float("nan")], 0.5)


def test_refined_corpus_is_the_kept_chunks_in_order():
  tokens = np.arange(23, dtype=np.int32)
  np.testing.assert_array_equal(ds.refined_tokens(tokens, 5, np.array([3, 0])),
                                np.concatenate([np.arange(0, 5), np.arange(15, 20)]))
  np.testing.assert_array_equal(ds.refined_tokens(tokens, 5, np.arange(4)), np.arange(20))  # the tail never kept
  with pytest.raises(ValueError, match="repeat"):
    ds.refined_tokens(tokens, 5, [1, 1])
  with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
    ds.refined_tokens(tokens, 5, [4])
  with pytest.raises(ValueError, match="larger than the corpus"):
    ds.refined_tokens(tokens, 24, [0])
  with pytest.raises(ValueError, match="at least 2"):
    ds.refined_tokens(tokens, 1, [0])
