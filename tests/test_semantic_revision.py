"""MGSR (kdjax.losses.semantic_revision, kdjax.distill.semantic_revision) against float64 NumPy
restatements, limit cases and the models themselves: DAC-KL, the span loss, the strategy's
gradients and builder, and SCRG's revised rollouts."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import special

from kdjax.data import lm_pipeline
from kdjax.distill import semantic_revision as mgsr
from kdjax.losses import semantic_revision as sr
from kdjax.models import sampling
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib, state as state_lib

import numpy_reference as ref


def _logits(shape, seed, scale=2.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# DAC-KL.


def _band_kl(zs, zt, lower, upper, temperature=1.0):
  """KL of the two distributions clipped to the teacher's mass band [lower, upper], one row, float64:
  walk the classes from the teacher's likeliest, keep each one's share of the band, renormalise."""
  p, q = ref.softmax(zt, temperature), ref.softmax(zs, temperature)
  kept, start = np.zeros_like(p), 0.0
  for c in np.argsort(-p, kind="stable"):
    kept[c] = max(0.0, min(start + p[c], upper) - max(start, lower))
    start += p[c]
  p_band = kept / kept.sum()
  q_band = kept / p * q
  q_band /= q_band.sum()
  on = kept > 0
  return float(np.sum(p_band[on] * np.log(p_band[on] / q_band[on])))


def test_dac_kl_with_the_band_fully_open_is_forward_kl():
  zs, zt = _logits((3, 5, 13), 0), _logits((3, 5, 13), 1)
  where = np.random.default_rng(2).random((3, 5)) > 0.3
  got = sr.dac_kl(zs, zt, lower=0.0, upper=1.0, temperature=2.0, where=where)
  np.testing.assert_allclose(got, ref.forward_kl(zs, zt, temperature=2.0, where=where), atol=2e-6, rtol=1e-5)
  assert np.all(np.asarray(got)[~where] == 0)


def test_dac_kl_on_a_band_is_the_renormalised_kl():
  # Teacher mass 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 (shuffled over the vocabulary): the band
  # [0.4, 0.9] holds exactly the 2nd to 4th classes.
  p = np.array([0.1, 0.04, 0.25, 0.4, 0.06, 0.15])
  zt = np.log(p).astype(np.float32)
  zs = _logits((6,), 3)
  q = ref.softmax(zs)
  band = np.isin(p, [0.25, 0.15, 0.1])
  pb, qb = p[band] / p[band].sum(), q[band] / q[band].sum()
  np.testing.assert_allclose(sr.dac_kl(zs, zt, lower=0.4, upper=0.9), np.sum(pb * np.log(pb / qb)), rtol=1e-5)
  # Bands that cut classes in part, per position.
  zs, zt = _logits((4, 9), 4), _logits((4, 9), 5)
  lower, upper = np.array([0.0, 0.1, 0.3, 0.05]), np.array([0.7, 0.95, 0.8, 1.0])
  want = [_band_kl(zs[i], zt[i], lower[i], upper[i], 1.5) for i in range(4)]
  np.testing.assert_allclose(sr.dac_kl(zs, zt, lower=lower, upper=upper, temperature=1.5), want, rtol=1e-4,
                             atol=1e-6)


def test_dac_kl_gradient_in_the_bounds_is_the_band_derivative():
  zs, zt = _logits((9,), 6), _logits((9,), 7)
  for lower, upper in ((0.12, 0.77), (0.31, 0.9)):
    d_lower, d_upper = jax.grad(lambda a, b: sr.dac_kl(zs, zt, lower=a, upper=b), argnums=(0, 1))(lower, upper)
    eps = 1e-4
    fd_lower = (_band_kl(zs, zt, lower + eps, upper) - _band_kl(zs, zt, lower - eps, upper)) / (2 * eps)
    fd_upper = (_band_kl(zs, zt, lower, upper + eps) - _band_kl(zs, zt, lower, upper - eps)) / (2 * eps)
    np.testing.assert_allclose([d_lower, d_upper], [fd_lower, fd_upper], rtol=2e-3, atol=1e-4)
    assert abs(fd_upper) > 1e-3


def test_teacher_profile_and_clip_network():
  zt = _logits((2, 3, 10), 8)
  profile = sr.teacher_profile(zt, k=4, temperature=2.0)
  p = np.sort(special.softmax(zt.astype(np.float64) / 2.0, -1), -1)[..., ::-1]
  np.testing.assert_allclose(profile, np.concatenate([p[..., :4], 1 - p[..., :4].sum(-1, keepdims=True)], -1),
                             atol=1e-6)
  params = mgsr.init_clip_network(jax.random.PRNGKey(0), inputs=5, hidden=8, init_lower=0.1, init_upper=0.8)
  lower, upper = mgsr.clip_bounds(params, profile)
  np.testing.assert_allclose(lower, 0.1, atol=0.01)
  np.testing.assert_allclose(upper, 0.8, atol=0.01)
  noisy = jax.tree.map(lambda x: x + jax.random.normal(jax.random.PRNGKey(1), x.shape) * 3, params)
  lower, upper = mgsr.clip_bounds(noisy, profile)
  assert np.all((0 <= np.asarray(lower)) & (np.asarray(lower) <= np.asarray(upper)) & (np.asarray(upper) <= 1))


# ----------------------------------------------------------------------------------------------
# Span level.

TEXT = "Now is the winter of our naïve discontent, made 'glorious' summer by this sun of York."


def test_span_ids_from_a_known_byte_string():
  ids = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
  want = np.full(ids.shape, -1)
  for n, word in enumerate(re.finditer(rb"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+", TEXT.encode())):
    want[word.start():word.end()] = n
  np.testing.assert_array_equal(sr.span_ids(ids), want)
  spans = np.asarray(sr.span_ids(ids))
  words = [bytes(ids[spans == n].astype(np.uint8)).decode() for n in range(spans.max() + 1)]
  assert words == "Now is the winter of our naïve discontent made glorious summer by this sun of York".split()
  where = np.ones(ids.shape, bool)
  where[2] = False  # the masked 'w' leaves "No"; the later words keep their numbers
  got = np.asarray(sr.span_ids(np.stack([ids, ids]), where=np.stack([where, where])))
  np.testing.assert_array_equal(got[:, :3], [[0, 0, -1]] * 2)
  np.testing.assert_array_equal(got[0, 3:], want[3:])
  with pytest.raises(ValueError, match="integer ids"):
    sr.span_ids(ids.astype(np.float32))


def _span_reference(zs, zt, spans, measure, max_distance, temperature):
  """The span loss by a double loop over all position pairs of each row, float64."""
  relate = {"hadamard": lambda a, b: a * b, "inner": lambda a, b: np.array([a @ b]),
            "cosine": lambda a, b: np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b)])}[measure]
  sums, counts = np.zeros(spans.shape), np.zeros(spans.shape)
  for b in range(spans.shape[0]):
    for i in range(spans.shape[1]):
      for j in range(i + 1, spans.shape[1]):
        if spans[b, i] < 0 or spans[b, i] != spans[b, j] or j - i > max_distance:
          continue
        p_i, p_j = ref.softmax(zt[b, i], temperature), ref.softmax(zt[b, j], temperature)
        q_i, q_j = ref.softmax(zs[b, i], temperature), ref.softmax(zs[b, j], temperature)
        sums[b, i] += np.sum((relate(p_i, p_j) - relate(q_i, q_j)) ** 2)
        counts[b, i] += 1
  return sums, counts


@pytest.mark.parametrize("measure", ["hadamard", "inner", "cosine"])
def test_span_correlation_matches_a_double_loop_over_pairs(measure):
  ids = np.frombuffer(TEXT.encode()[:24], np.uint8).astype(np.int32)[None].repeat(2, 0)
  where = np.ones(ids.shape, bool)
  where[1, 5] = False
  spans = np.asarray(sr.span_ids(ids, where=where))
  zs, zt = _logits(ids.shape + (7,), 9, 1.0), _logits(ids.shape + (7,), 10, 1.0)
  for distance in (1, 3):
    sums, counts = sr.span_correlation(zs, zt, spans, measure=measure, max_distance=distance, temperature=1.5)
    want_sums, want_counts = _span_reference(zs, zt, spans, measure, distance, 1.5)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-4, atol=1e-8)
  assert np.sum(want_counts) > 10
  same, _ = sr.span_correlation(zt, zt, spans, measure=measure, max_distance=2)
  np.testing.assert_array_equal(same, 0.0)
  grad = jax.grad(lambda z: jnp.sum(sr.span_correlation(z, zt, spans, measure=measure)[0]))(zs)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  assert np.all(np.asarray(grad)[spans < 0] == 0)


# ----------------------------------------------------------------------------------------------
# The strategy and its builder.


def _strategy_inputs(vocab=256):
  ids = np.frombuffer(TEXT.encode()[:2 * 20 + 1], np.uint8).astype(np.int32)
  batch = {"inputs": np.stack([ids[:20], ids[20:40]]), "targets": np.stack([ids[1:21], ids[21:41]]),
           "mask": np.ones((2, 20), np.float32)}
  batch["mask"][1, 15:] = 0
  return _logits((2, 20, vocab), 11), _logits((2, 20, vocab), 12), batch


def test_mgsr_gradients_reach_the_student_and_the_clip_network():
  student, teacher, batch = _strategy_inputs()
  strategy = mgsr.mgsr_strategy({"kd_weight": 0.7, "span_weight": 2.0, "clip_hidden": 8}, vocab_size=256,
                                num_steps=10)
  params = strategy.init_params(jax.random.PRNGKey(0))

  def loss(logits, params):
    return strategy({"logits": logits}, {"logits": teacher}, batch, 3, params=params)

  (value, metrics), (g_logits, g_params) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      student, params)
  assert np.all(np.isfinite(g_logits)) and np.all(np.asarray(g_logits)[1, 15:] == 0)
  assert np.abs(g_logits).max() > 1e-4
  for path, leaf in jax.tree_util.tree_flatten_with_path(g_params)[0]:
    assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0, path
  mean = {name: float(total / count) for name, (total, count) in metrics.items()}
  np.testing.assert_allclose(value, mean["loss"], rtol=1e-6)
  np.testing.assert_allclose(
      value, 0.3 * mean["ce"] + 0.7 * (mean["kd"] + mean["discarded_mass"] + 2.0 * mean["span"]), rtol=1e-5)
  assert metrics["kd"][1] == 35 and metrics["span"][1] > 0
  assert 0.04 < mean["discarded_mass"] < 0.06  # starts at the init band [0, 0.95]
  # Without α the objective is plain cross-entropy, the clip network untouched.
  ce_only = mgsr.MGSRDistillation(kd_weight=0.0)
  value, g = jax.jit(jax.value_and_grad(lambda p: ce_only({"logits": student}, {"logits": teacher}, batch, 0,
                                                          params=p)[0]))(ce_only.init_params(jax.random.PRNGKey(0)))
  np.testing.assert_allclose(value, ref.cross_entropy(student, batch["targets"], where=batch["mask"] > 0).sum() / 35,
                             rtol=1e-5)
  assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(g))


def test_the_mass_penalty_keeps_the_band_from_collapsing():
  """With a large μ the gradient widens the band: it lowers the tail's and head's shares, raises the band's."""
  student, teacher, batch = _strategy_inputs()
  strategy = mgsr.MGSRDistillation(kd_weight=1.0, span_weight=0.0, mass_penalty=50.0, clip_init_lower=0.2,
                                   clip_init_upper=0.6)
  params = strategy.init_params(jax.random.PRNGKey(0))
  grad = jax.jit(jax.grad(lambda p: strategy({"logits": student}, {"logits": teacher}, batch, 0, params=p)[0]))(params)
  head, band, tail = np.asarray(grad["out"]["bias"])
  assert head > 0 and tail > 0 and band < 0


def test_builder_rejects_bad_keys_and_values():
  strategy = mgsr.mgsr_strategy({"temperature": 2.0, "span_measure": "cosine", "span_max_distance": 2,
                                 "clip_inputs": 8, "mass_penalty": 0.5}, vocab_size=256, num_steps=None)
  assert (strategy.span_measure, strategy.span_max_distance, strategy.clip_inputs) == ("cosine", 2, 8)
  assert strategy.temperature(0) == 2.0 and hash(strategy)
  with pytest.raises(ValueError, match=r"unknown distill config keys \['clip_size'\] for method 'mgsr'"):
    mgsr.mgsr_strategy({"clip_size": 4}, vocab_size=256, num_steps=None)
  with pytest.raises(ValueError, match="clip_inputs must lie in"):
    mgsr.mgsr_strategy({"clip_inputs": 300}, vocab_size=256, num_steps=None)
  with pytest.raises(ValueError, match="unknown span_measure"):
    mgsr.mgsr_strategy({"span_measure": "pearson"}, vocab_size=256, num_steps=None)
  with pytest.raises(ValueError, match="init_lower < init_upper"):
    mgsr.mgsr_strategy({"clip_init_lower": 0.5, "clip_init_upper": 0.5}, vocab_size=256, num_steps=None)
  with pytest.raises(ValueError, match="span_max_distance"):
    mgsr.MGSRDistillation(span_max_distance=0)
  with pytest.raises(ValueError, match="mass_penalty"):
    mgsr.MGSRDistillation(mass_penalty=-1.0)
  zs, zt = _logits((2, 5, 6), 0), _logits((2, 5, 6), 1)
  with pytest.raises(ValueError, match="does not broadcast"):
    sr.dac_kl(zs, zt, lower=np.zeros(3), upper=1.0)
  with pytest.raises(ValueError, match="1 <= k <= vocab"):
    sr.teacher_profile(zt, k=7)
  with pytest.raises(ValueError, match="spans have shape"):
    sr.span_correlation(zs, zt, np.zeros((2, 4), np.int32))
  with pytest.raises(ValueError, match="unknown span correlation measure"):
    sr.span_correlation(zs, zt, np.zeros((2, 5), np.int32), measure="dot")


# ----------------------------------------------------------------------------------------------
# Sequence level: SCRG.

VOCAB, SEQ, BATCH, PROMPT = 20, 12, 8, 4


def test_error_positions():
  difference = np.array([[0.1, 3.0, 0.5, 2.0], [1.0, 1.0, 4.0, 0.2], [5.0, 0.0, 0.0, 0.0]], np.float32)
  candidates = np.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mgsr.error_positions(difference, candidates), [3, 0, -1])
  np.testing.assert_array_equal(mgsr.error_positions(difference, candidates, detect="threshold", threshold=0.3),
                                [2, 0, -1])
  np.testing.assert_array_equal(mgsr.error_positions(difference, candidates, detect="threshold", threshold=2.5),
                                [-1, -1, -1])
  with pytest.raises(ValueError, match="unknown detect"):
    mgsr.error_positions(difference, candidates, detect="first")


def test_revision_config_choices_and_bad_input():
  config = mgsr.RevisionConfig(revision_fraction=0.3, seed=5)
  choices = [config.source(step) for step in range(3000)]
  assert choices == [config.source(step) for step in range(3000)]
  assert abs(choices.count("revised") / 3000 - 0.3) < 0.03
  assert mgsr.RevisionConfig.from_config(ml_collections.ConfigDict({"detect": "threshold"})).detect == "threshold"
  with pytest.raises(ValueError, match=r"unknown revision config keys \['lambda_'\]"):
    mgsr.RevisionConfig.from_config(ml_collections.ConfigDict({"lambda_": 0.5}))
  with pytest.raises(ValueError, match="revision_fraction must lie"):
    mgsr.RevisionConfig(revision_fraction=1.5)
  with pytest.raises(ValueError, match="unknown difference"):
    mgsr.RevisionConfig(difference="js")
  with pytest.raises(ValueError, match="top_p"):
    mgsr.RevisionConfig(top_p=0.0)


def _models(mesh):
  student = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ)
  teacher = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=24, d_ff=48, max_len=SEQ)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(student, rngs=nnx.Rngs(0)), mesh)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(teacher, rngs=nnx.Rngs(1)), mesh)
  return s_graph, s_params, t_graph, t_params


@pytest.fixture(scope="module")
def setting():
  mesh = sharding_lib.make_mesh({"data": 8})
  s_graph, s_params, t_graph, t_params = _models(mesh)
  state = state_lib.create_train_state(s_params, optax.sgd(0.1), seed=0, mesh=mesh)
  tokens = np.random.default_rng(0).integers(0, VOCAB, BATCH * SEQ + 1).astype(np.int32)
  host = lm_pipeline.windows_batch(np.arange(BATCH), tokens=tokens, seq_len=SEQ)
  return mesh, s_graph, t_graph, t_params, state, host


def _hook(setting, **config):
  mesh, s_graph, t_graph, _, _, _ = setting
  return mgsr.RevisedRolloutBatches(mgsr.RevisionConfig(prompt_len=PROMPT, **config), seq_len=SEQ,
                                    student_graphdef=s_graph, teacher_graphdef=t_graph, mesh=mesh)


def test_greedy_revision_corrects_the_most_divergent_token(setting):
  """Greedy rollouts and corrections, checked with full forward passes of both models (no cache)."""
  _, s_graph, t_graph, t_params, state, host = setting
  hook = _hook(setting, revision_fraction=1.0, temperature=0.0, seed=3)
  batch = jax.device_get(hook(state, host, t_params, 7))
  rollout = np.asarray(hook.last_revision["rollout_targets"])
  position = np.asarray(hook.last_revision["position"])
  student, teacher = nnx.merge(s_graph, state.params), nnx.merge(t_graph, t_params)
  rollout_inputs = np.concatenate([host["inputs"][:, :1], rollout[:, :-1]], axis=1)
  np.testing.assert_array_equal(rollout_inputs[:, :PROMPT], host["inputs"][:, :PROMPT])
  # Greedy decoding is the argmax of the teacher-forced forward pass over its own output.
  s_logits = np.asarray(student(rollout_inputs), np.float64)
  np.testing.assert_array_equal(s_logits.argmax(-1)[:, PROMPT - 1:], rollout[:, PROMPT - 1:])
  t_logits = np.asarray(teacher(rollout_inputs), np.float64)
  p, log_p = special.softmax(t_logits, -1), special.log_softmax(t_logits, -1)
  kl = np.sum(p * (log_p - special.log_softmax(s_logits, -1)), -1)
  teacher_choice = t_logits.argmax(-1)
  candidates = (np.arange(SEQ) >= PROMPT - 1) & (rollout != teacher_choice)
  want = np.where(candidates.any(-1), np.where(candidates, kl, -np.inf).argmax(-1), -1)
  np.testing.assert_array_equal(position, want)
  assert np.all(position >= 0) and hook.counts == {"data": 0, "revised": 1, "corrected_rows": BATCH}
  rows = np.arange(BATCH)
  for b, j in zip(rows, position):
    np.testing.assert_array_equal(batch["targets"][b, :j], rollout[b, :j])
  np.testing.assert_array_equal(batch["targets"][rows, position], teacher_choice[rows, position])
  # After the correction, the student's greedy continuation of the revised prefix.
  regen = np.asarray(student(batch["inputs"])).argmax(-1)
  after = np.arange(SEQ)[None] > position[:, None]
  np.testing.assert_array_equal(batch["targets"][after], regen[after])
  np.testing.assert_array_equal(batch["mask"], np.broadcast_to(np.arange(SEQ) >= PROMPT - 1, (BATCH, SEQ)))


def test_sampled_revision_is_a_function_of_seed_and_step(setting):
  _, s_graph, _, t_params, state, host = setting
  hook = _hook(setting, revision_fraction=0.5, temperature=0.8, difference="teacher_nll", correction="sample", seed=4)
  step = next(s for s in range(100) if hook.config.source(s) == "revised")
  other = next(s for s in range(step + 1, 100) if hook.config.source(s) == "revised")
  batch = jax.device_get(hook(state, host, t_params, step))
  rollout, position = (np.asarray(hook.last_revision[k]) for k in ("rollout_targets", "position"))
  assert batch["inputs"].shape == (BATCH, SEQ)
  # The rollout is the student's sample with the first of the step key's three parts.
  key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(4), step), 3)[0]
  want = sampling.generate(s_graph, state.params, host["inputs"][:, :PROMPT], key,
                           config=sampling.SamplingConfig(max_new_tokens=SEQ - PROMPT + 1, temperature=0.8))
  np.testing.assert_array_equal(rollout[:, PROMPT - 1:], want.tokens)
  assert np.all(position >= PROMPT - 1)
  for b, j in enumerate(position):
    np.testing.assert_array_equal(batch["targets"][b, :j], rollout[b, :j])
    assert batch["targets"][b, j] != rollout[b, j]
  again = jax.device_get(hook(state, host, t_params, step))
  jax.tree.map(np.testing.assert_array_equal, again, batch)
  assert not np.array_equal(jax.device_get(hook(state, host, t_params, other))["targets"], batch["targets"])
  data = hook(state, host, t_params, next(s for s in range(100) if hook.config.source(s) == "data"))
  np.testing.assert_array_equal(data["inputs"], host["inputs"])
  np.testing.assert_array_equal(data["mask"], np.broadcast_to(np.arange(SEQ) >= PROMPT - 1, (BATCH, SEQ)))
  assert hook.counts["revised"] == 3 and hook.counts["data"] == 1
  with pytest.raises(ValueError, match="shorter than"):
    mgsr.RevisedRolloutBatches(mgsr.RevisionConfig(prompt_len=SEQ), seq_len=SEQ, student_graphdef=s_graph,
                               teacher_graphdef=s_graph, mesh=setting[0])
  with pytest.raises(ValueError, match="teacher's graphdef"):
    mgsr.RevisedRolloutBatches(mgsr.RevisionConfig(prompt_len=PROMPT), seq_len=SEQ, student_graphdef=s_graph,
                               teacher_graphdef=None, mesh=setting[0])
