"""MiniLLM's teacher-mixed sampling, importance weights and pre-training loss.

The sampler's draws against the exact token-level mixture α·p + (1 − α)·q (chi-square, on fixed
distributions and on the first two tokens of two tiny models, with power against the student alone
and against a per-row mixture); α = 0 against the student-only sampler; its log-probabilities
against the uncached models. The weighted surrogate against a float64 NumPy re-implementation
(values and gradients), and the exact weighting's expectation under p̃ against ∇ KL(q ‖ p) of
the sequences by enumerating every sequence of a tabular model. The strategy's CE term against
NumPy, each term blind to the other kind of row, the batch hook's rows, and configuration errors.
"""

from __future__ import annotations

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special, stats

from kdjax import losses
from kdjax.data import lm_pipeline
from kdjax.distill import minillm
from kdjax.distill.on_policy import OnPolicyConfig
from kdjax.models import DecoderConfig, init_decoder, sampling
from kdjax.train import sharding as sharding_lib

THRESHOLD = 1e-6  # p-value below which a statistical test rejects
ALPHA = 0.3

V = 8
STUDENT_CONFIG = DecoderConfig(vocab_size=V, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=16)
TEACHER_CONFIG = DecoderConfig(vocab_size=V, num_layers=1, num_heads=2, d_model=24, d_ff=48, max_len=16)


def _sharpened(config, seed):
  """A tiny model whose weight matrices are scaled up: peaked next-token distributions, so the
  student's and the teacher's differ clearly."""
  graphdef, params = nnx.split(init_decoder(config, seed=seed))
  return graphdef, jax.tree.map(lambda x: 2.5 * x if x.ndim >= 2 else x, params)


S_GD, S_PARAMS = _sharpened(STUDENT_CONFIG, 0)
T_GD, T_PARAMS = _sharpened(TEACHER_CONFIG, 1)


def chi2_pvalue(counts, probs):
  """Pearson's test of counts against probabilities, the cells expecting < 5 draws merged into
  one; a draw of a zero-probability cell gives 0."""
  counts, probs = np.ravel(counts).astype(np.float64), np.ravel(probs).astype(np.float64)
  if counts[probs == 0].any():
    return 0.0
  expected = probs * counts.sum()
  rare = expected < 5
  observed = np.concatenate([counts[~rare], [counts[rare].sum()]])
  expected = np.concatenate([expected[~rare], [expected[rare].sum()]])
  keep = expected > 0
  return stats.chisquare(observed[keep], expected[keep]).pvalue


def probs_of(logits, config):
  probs = np.exp(np.asarray(sampling.sampling_log_probs(jnp.asarray(logits), config), np.float64))
  return probs / probs.sum(-1, keepdims=True)


@jax.jit
def _full_logits(student_params, teacher_params, tokens):
  return nnx.merge(S_GD, student_params)(tokens), nnx.merge(T_GD, teacher_params)(tokens)


def full_logits(tokens):
  """Both uncached models on `tokens` padded to max_len (one compilation for every call)."""
  tokens = np.asarray(tokens, np.int32)
  padded = np.pad(tokens, ((0, 0), (0, STUDENT_CONFIG.max_len - tokens.shape[1])))
  return tuple(np.asarray(z, np.float64) for z in _full_logits(S_PARAMS, T_PARAMS, padded))


# ----------------------------------------------------------------------------------------------
# The sampler.


@pytest.mark.parametrize("config", [sampling.SamplingConfig(1, temperature=1.0),
                                    sampling.SamplingConfig(1, temperature=0.7, top_k=3)], ids=["plain", "filtered"])
def test_mixture_sample_draws_the_token_level_mixture(config):
  draws = 60_000
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=V) * 1.5, rng.normal(size=V) * 1.5
  q, p = probs_of(zs, config), probs_of(zt, config)
  ids, logprobs, from_teacher = jax.jit(sampling.mixture_sample, static_argnums=(3, 4))(
      jax.random.key(1), jnp.broadcast_to(jnp.asarray(zs, jnp.float32), (draws, V)),
      jnp.broadcast_to(jnp.asarray(zt, jnp.float32), (draws, V)), config, ALPHA)
  ids, logprobs, from_teacher = map(np.asarray, (ids, logprobs, from_teacher))
  mixture = ALPHA * p + (1 - ALPHA) * q
  counts = np.bincount(ids, minlength=V)
  assert chi2_pvalue(counts, mixture) > THRESHOLD
  assert chi2_pvalue(counts, q) < THRESHOLD  # the student alone is rejected: the test has power
  assert chi2_pvalue(counts, (ALPHA - 0.1) * p + (1 - ALPHA + 0.1) * q) < THRESHOLD  # and a wrong α
  assert stats.binomtest(int(from_teacher.sum()), draws, ALPHA).pvalue > THRESHOLD
  assert chi2_pvalue(np.bincount(ids[from_teacher], minlength=V), p) > THRESHOLD
  np.testing.assert_allclose(logprobs, np.log(mixture[ids]), rtol=1e-5)


def test_generate_mixture_first_two_tokens_follow_the_mixture_token_by_token():
  draws, prompt = 20_000, np.array([3, 1, 4, 1], np.int32)
  config = sampling.SamplingConfig(2, temperature=1.0)
  gen = sampling.make_generate_mixture(S_GD, T_GD, config, teacher_mix=ALPHA)(
      S_PARAMS, T_PARAMS, np.tile(prompt, (draws, 1)), None, jax.random.key(7))
  counts = np.bincount(np.asarray(gen.tokens[:, 0]) * V + np.asarray(gen.tokens[:, 1]), minlength=V * V)

  # Exact joint law of the first two tokens under each model, from the uncached models.
  sequences = np.concatenate([np.tile(prompt, (V, 1)), np.arange(V)[:, None]], axis=1)
  joint = {}
  for name, logits in zip(("q", "p"), full_logits(sequences)):
    first, second = special.softmax(logits[0, len(prompt) - 1]), special.softmax(logits[:, len(prompt)], axis=-1)
    joint[name] = (first, second)
  mix_first = ALPHA * joint["p"][0] + (1 - ALPHA) * joint["q"][0]
  mix_second = ALPHA * joint["p"][1] + (1 - ALPHA) * joint["q"][1]
  token_level = mix_first[:, None] * mix_second
  assert chi2_pvalue(counts, token_level) > THRESHOLD
  # Power: the student alone, and one model per row (a sequence-level mixture), are rejected.
  student = joint["q"][0][:, None] * joint["q"][1]
  row_level = ALPHA * joint["p"][0][:, None] * joint["p"][1] + (1 - ALPHA) * student
  assert chi2_pvalue(counts, student) < THRESHOLD
  assert chi2_pvalue(counts, row_level) < THRESHOLD


B, P, N = 8, 6, 8
LENGTHS = np.array([6, 3, 1, 4, 5, 2, 6, 1], np.int32)
PROMPTS = np.asarray(jax.random.randint(jax.random.key(0), (B, P), 0, V), np.int32)
# Filters and EOS on: the mixture must apply the student's sampler to both models and stop rows.
CONFIG = sampling.SamplingConfig(N, temperature=0.8, top_k=5, eos_id=2)


@functools.lru_cache(maxsize=None)
def mixture_sampler(teacher_mix):
  return sampling.make_generate_mixture(S_GD, T_GD, CONFIG, teacher_mix=teacher_mix)


def test_alpha_zero_draws_exactly_the_student_sampler_tokens():
  key = jax.random.key(11)
  want = sampling.make_generate(S_GD, CONFIG)(S_PARAMS, PROMPTS, LENGTHS, key)
  got = mixture_sampler(0.0)(S_PARAMS, T_PARAMS, PROMPTS, LENGTHS, key)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  assert not np.asarray(want.mask).all()  # some rows stopped at EOS
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-6, atol=1e-6)
  assert not np.asarray(got.from_teacher).any()
  mixed = mixture_sampler(ALPHA)(S_PARAMS, T_PARAMS, PROMPTS, LENGTHS, key)
  assert (np.asarray(mixed.tokens) != np.asarray(want.tokens)).any()


def test_mixture_log_probs_are_the_full_models_mixture_at_the_targets():
  gen = mixture_sampler(ALPHA)(S_PARAMS, T_PARAMS, PROMPTS, LENGTHS, jax.random.key(5))
  batch = sampling.completion_batch(PROMPTS, LENGTHS, gen)
  laid_out = np.asarray(sampling.completion_log_probs(PROMPTS, LENGTHS, gen))
  width = batch["inputs"].shape[1]
  zs, zt = (z[:, :width] for z in full_logits(batch["inputs"]))
  mixture = ALPHA * probs_of(zt, CONFIG) + (1 - ALPHA) * probs_of(zs, CONFIG)
  mask = np.asarray(batch["mask"]) > 0
  want = np.log(np.take_along_axis(mixture, np.asarray(batch["targets"])[..., None], -1)[..., 0][mask])
  assert mask.sum() == np.asarray(gen.mask).sum()
  np.testing.assert_allclose(laid_out[mask], want, rtol=1e-4, atol=1e-5)
  assert (laid_out[~mask] == 0).all()
  assert 0 < np.asarray(gen.from_teacher).sum() < np.asarray(gen.mask).sum()


def test_sampler_input_errors():
  config = sampling.SamplingConfig(2)
  with pytest.raises(ValueError, match="teacher_mix"):
    sampling.make_generate_mixture(S_GD, T_GD, config, teacher_mix=1.5)
  other_gd, other = nnx.split(init_decoder(DecoderConfig(vocab_size=V + 1, num_layers=1, num_heads=2, d_model=16,
                                                         d_ff=32, max_len=16), seed=2))
  with pytest.raises(ValueError, match="vocab"):
    sampling.generate_mixture(S_GD, S_PARAMS, other_gd, other, PROMPTS, jax.random.key(0), config=config,
                              teacher_mix=0.2)


# ----------------------------------------------------------------------------------------------
# The batch hook.


def test_batches_hold_the_mixture_samples_then_the_data_windows():
  # The hook's sampler is CONFIG (N = seq − P + 1 new tokens), so the unsharded reference reuses its compilation.
  seq = P + N - 1
  mesh = sharding_lib.make_mesh({"data": 8})
  tokens = np.random.default_rng(3).integers(0, V, B * seq + 1).astype(np.int32)
  host = lm_pipeline.windows_batch(np.arange(B), tokens=tokens, seq_len=seq)
  config = OnPolicyConfig(prompt_len=P, temperature=CONFIG.temperature, top_k=CONFIG.top_k, seed=4)
  hook = minillm.MiniLLMBatches(config, teacher_mix=ALPHA, seq_len=seq, student_graphdef=S_GD,
                                teacher_graphdef=T_GD, mesh=mesh, eos_id=CONFIG.eos_id)
  state = types.SimpleNamespace(params=S_PARAMS)
  batch = hook(state, host, T_PARAMS, 9)
  assert batch["inputs"].sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh), 2)
  out = jax.device_get(batch)
  assert {k: v.shape for k, v in out.items()} == {"inputs": (2 * B, seq), "targets": (2 * B, seq),
                                                  "mask": (2 * B, seq), "sample_logprobs": (2 * B, seq),
                                                  "row_kind": (2 * B,)}
  np.testing.assert_array_equal(out["row_kind"], [minillm.SAMPLE] * B + [minillm.DATA] * B)
  for k in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(out[k][B:], host[k])
  assert (out["sample_logprobs"][B:] == 0).all()

  # The sample rows are an unsharded call of the sampler with the key of (seed, step).
  prompts = host["inputs"][:, :P]
  gen = mixture_sampler(ALPHA)(S_PARAMS, T_PARAMS, prompts, None, jax.random.fold_in(jax.random.PRNGKey(4), 9))
  want = jax.device_get(sampling.completion_batch(prompts, None, gen))
  for k in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(out[k][:B], want[k])
  np.testing.assert_allclose(out["sample_logprobs"][:B], sampling.completion_log_probs(prompts, None, gen), rtol=1e-5)
  np.testing.assert_array_equal(out["inputs"][:B, :P], prompts)
  assert (out["mask"][:B, :P - 1] == 0).all()
  assert hook.counts["sampled_tokens"] == np.asarray(gen.mask).sum() == out["mask"][:B].sum()
  assert hook.counts["teacher_tokens"] == np.asarray(gen.from_teacher).sum() > 0

  # Choices depend on (seed, step) only.
  again = jax.device_get(hook(state, host, T_PARAMS, 9))
  jax.tree.map(np.testing.assert_array_equal, again, out)
  assert (jax.device_get(hook(state, host, T_PARAMS, 10))["targets"][:B] != out["targets"][:B]).any()
  hook.data_rows = False
  samples_only = jax.device_get(hook(state, host, T_PARAMS, 9))
  np.testing.assert_array_equal(samples_only["targets"], out["targets"][:B])
  assert (samples_only["row_kind"] == minillm.SAMPLE).all()
  with pytest.raises(ValueError, match="prompt_len"):
    minillm.MiniLLMBatches(OnPolicyConfig(prompt_len=seq), teacher_mix=ALPHA, seq_len=seq, student_graphdef=S_GD,
                           teacher_graphdef=T_GD, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# The importance-weighted surrogate.

TV, TL = 3, 3  # a tabular model over 3 tokens; 27 sequences of 3


def _tabular_prev(sequences):
  """Row of the Markov table each position reads: the previous token (TV: the start state)."""
  sequences = np.asarray(sequences)
  return np.concatenate([np.full((len(sequences), 1), TV), sequences[:, :-1]], axis=1)


def test_sequence_weights_make_the_estimator_unbiased_under_the_mixture():
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(TV + 1, TV)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(TV + 1, TV)) * 2, jnp.float32)
  sequences = np.array(list(itertools.product(range(TV), repeat=TL)))
  prev, targets = _tabular_prev(sequences), jnp.asarray(sequences)

  pick = lambda table: np.take_along_axis(  # noqa: E731
      special.softmax(np.asarray(table, np.float64), -1)[prev], sequences[..., None], -1)[..., 0]
  q_tok, p_tok = pick(student), pick(teacher)
  mix_tok = ALPHA * p_tok + (1 - ALPHA) * q_tok
  sampled_with = mix_tok.prod(-1)  # p̃ of each whole sequence, drawn token by token
  assert np.isclose(sampled_with.sum(), 1.0)

  def sequence_kl(table):
    log_q = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(table[prev], -1), targets[..., None], -1), (1, 2))
    log_p = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(teacher[prev], -1), targets[..., None], -1), (1, 2))
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p))

  def expected(table, **kwargs):
    surrogate, _ = losses.reverse_kl_policy_gradient(table[prev], teacher[prev], targets, length_normalize=False,
                                                     **kwargs)
    return jnp.sum(jnp.asarray(sampled_with, jnp.float32) * jnp.sum(surrogate, -1))

  grad = jax.jit(jax.grad(expected), static_argnames=("importance", "teacher_mix"))
  want = jax.jit(jax.grad(sequence_kl))(student)
  for kwargs in (dict(teacher_mix=ALPHA), dict(sample_log_probs=jnp.asarray(np.log(mix_tok), jnp.float32))):
    got = grad(student, importance="sequence", **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The paper's per-token ratio, and no correction at all, are biased under p̃: the test can fail.
  token = grad(student, importance="token", teacher_mix=ALPHA)
  uncorrected = grad(student, importance="token", teacher_mix=0.0)
  for biased in (token, uncorrected):
    assert not np.allclose(biased, want, rtol=1e-2, atol=1e-3)


def np_surrogate(zs, zt, targets, mask, *, alpha, gamma, normalize, clip, importance):
  """Float64 surrogate and its gradient w.r.t. the student logits, one row and position at a time."""
  lq, lp = special.log_softmax(np.asarray(zs, np.float64), -1), special.log_softmax(np.asarray(zt, np.float64), -1)
  q = np.exp(lq)
  rows, length, _ = lq.shape
  clip = np.inf if clip is None else clip
  values, grads = np.zeros((rows, length)), np.zeros(lq.shape)
  for b in range(rows):
    kept = [t for t in range(length) if mask[b, t]]
    y = {t: targets[b, t] for t in kept}
    rho = {t: np.exp(lq[b, t, y[t]]) / (alpha * np.exp(lp[b, t, y[t]]) + (1 - alpha) * np.exp(lq[b, t, y[t]]))
           for t in kept}
    prefix = {t: np.prod([rho[s] for s in kept if s <= t]) for t in kept}
    before = {t: np.prod([rho[s] for s in kept if s < t]) for t in kept}
    for t in kept:
      later = [u for u in kept if u > t]
      reward = lambda u: lp[b, u, y[u]] - lq[b, u, y[u]]  # noqa: E731
      if importance == "token":
        single_w, action_w = 1.0, min(rho[t], clip)
        future = sum(gamma ** i * reward(u) for i, u in enumerate(later))
      else:
        single_w, action_w = min(before[t], clip), 1.0
        future = sum(gamma ** i * min(prefix[u], clip) * reward(u) for i, u in enumerate(later))
      if normalize and later:
        future /= len(later)
      kl = np.sum(q[b, t] * (lq[b, t] - lp[b, t]))
      values[b, t] = single_w * kl - future * action_w * lq[b, t, y[t]]
      # ∇_z KL(q ‖ p) = q ⊙ (log q − log p − KL); ∇_z log q_y = e_y − q.
      grads[b, t] = single_w * q[b, t] * (lq[b, t] - lp[b, t] - kl) - future * action_w * (np.eye(lq.shape[-1])[y[t]]
                                                                                           - q[b, t])
  return values, grads


@pytest.mark.parametrize("importance", minillm.policy.IMPORTANCE)
@pytest.mark.parametrize("gamma,normalize,clip", [(1.0, True, None), (0.9, False, 1.1)])
def test_weighted_surrogate_and_gradient_against_numpy(importance, gamma, normalize, clip):
  rng = np.random.default_rng(1)
  zs, zt = (jnp.asarray(rng.normal(size=(2, 6, 5)) * 2, jnp.float32) for _ in range(2))
  targets = jnp.asarray(rng.integers(0, 5, (2, 6)))
  mask = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], bool)
  kwargs = dict(where=mask, gamma=gamma, length_normalize=normalize, teacher_mix=0.4, importance=importance,
                ratio_clip=clip)
  surrogate, parts = losses.reverse_kl_policy_gradient(zs, zt, targets, **kwargs)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(losses.reverse_kl_policy_gradient(z, zt, targets, **kwargs)[0])))(zs)
  want, want_grad = np_surrogate(zs, zt, np.asarray(targets), mask, alpha=0.4, gamma=gamma, normalize=normalize,
                                 clip=clip, importance=importance)
  np.testing.assert_allclose(surrogate, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)
  assert (np.asarray(parts["weight"])[~mask] == 1).all()
  if clip is not None:
    assert np.asarray(parts["weight"]).max() <= clip + 1e-6 and (np.asarray(parts["weight"]) < 1).any()


def test_alpha_zero_keeps_the_on_policy_surrogate_exactly():
  rng = np.random.default_rng(2)
  zs, zt = (jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32) for _ in range(2))
  targets = jnp.asarray(rng.integers(0, 4, (2, 5)))
  mask = jnp.asarray(rng.random((2, 5)) < 0.8)
  plain, plain_parts = losses.reverse_kl_policy_gradient(zs, zt, targets, where=mask, gamma=0.9)
  for importance in minillm.policy.IMPORTANCE:
    got, parts = losses.reverse_kl_policy_gradient(zs, zt, targets, where=mask, gamma=0.9, teacher_mix=0.0,
                                                   importance=importance, ratio_clip=1.0)
    np.testing.assert_array_equal(got, plain)
    np.testing.assert_array_equal(parts["future_return"], plain_parts["future_return"])
    assert (np.asarray(parts["weight"]) == 1).all()


# ----------------------------------------------------------------------------------------------
# The strategy.


def _mixed_batch(rng, rows=2, length=5, vocab=6):
  """Sample rows then data rows, each with its own ragged mask, and the samples' log p̃."""
  zs, zt = rng.normal(size=(2 * rows, length, vocab)), rng.normal(size=(2 * rows, length, vocab))
  mask = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
  targets = rng.integers(0, vocab, (2 * rows, length))
  log_mix = np.log(np.take_along_axis(0.2 * special.softmax(zt, -1) + 0.8 * special.softmax(zs, -1),
                                      targets[..., None], -1)[..., 0])
  batch = {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask),
           "sample_logprobs": jnp.asarray(np.where(mask > 0, log_mix, 0.0) * (np.arange(2 * rows) < rows)[:, None],
                                          jnp.float32),
           "row_kind": jnp.asarray([minillm.SAMPLE] * rows + [minillm.DATA] * rows, jnp.int32)}
  return jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), batch


def test_strategy_policy_gradient_on_samples_and_pretraining_ce_on_data():
  strategy = minillm.minillm_strategy({"teacher_mix": 0.2, "pt_weight": 0.7, "gamma": 0.95}, vocab_size=6,
                                      num_steps=None)
  zs, zt, batch = _mixed_batch(np.random.default_rng(3))
  run = jax.jit(lambda z, b: strategy({"logits": z}, {"logits": zt}, b, 0))
  loss, metrics = run(zs, batch)

  # CE term: NumPy over the data rows' kept tokens only.
  data, mask = slice(2, 4), np.asarray(batch["mask"]) > 0
  log_q = special.log_softmax(np.asarray(zs, np.float64), -1)
  nll = -np.take_along_axis(log_q, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(metrics["ce"][0], nll[data][mask[data]].sum(), rtol=1e-5)
  assert float(metrics["ce"][1]) == mask[data].sum()

  # Policy-gradient term: the surrogate on the sample rows alone, without the data rows present.
  @jax.jit
  def pg_alone(z):
    surrogate, _ = losses.reverse_kl_policy_gradient(z[:2], zt[:2], batch["targets"][:2], where=mask[:2], gamma=0.95,
                                                     sample_log_probs=batch["sample_logprobs"][:2])
    return jnp.sum(surrogate) / mask[:2].sum()

  np.testing.assert_allclose(loss, pg_alone(zs) + 0.7 * nll[data][mask[data]].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"][0], loss)
  assert float(metrics["kd"][1]) == float(metrics["pg"][1]) == mask[:2].sum()

  # Gradient: on data rows 0.7·(softmax − onehot)/n_data per kept token; on sample rows the PG term's.
  grad = np.asarray(jax.jit(jax.grad(lambda z: run(z, batch)[0]))(zs))
  onehot = np.eye(6)[np.asarray(batch["targets"])]
  want_data = 0.7 * (np.exp(log_q) - onehot) * mask[..., None] / mask[data].sum()
  np.testing.assert_allclose(grad[data], want_data[data], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad[:2], np.asarray(jax.jit(jax.grad(pg_alone))(zs))[:2], rtol=1e-4, atol=1e-6)

  # Rows of the other kind change nothing in a term.
  noise = jnp.asarray(np.random.default_rng(4).normal(size=zs.shape) * 3, jnp.float32)
  is_data = (np.asarray(batch["row_kind"]) == minillm.DATA)[:, None, None]
  _, other_data = run(jnp.where(is_data, zs + noise, zs), batch)
  _, other_samples = run(jnp.where(is_data, zs, zs + noise), batch)
  for name in ("pg", "kd", "reward", "importance_weight"):
    np.testing.assert_allclose(other_data[name][0], metrics[name][0], rtol=1e-6)
  np.testing.assert_allclose(other_samples["ce"][0], metrics["ce"][0], rtol=1e-6)
  assert not np.isclose(other_data["ce"][0], metrics["ce"][0])
  assert not np.isclose(other_samples["pg"][0], metrics["pg"][0])


def test_defaults_are_the_on_policy_strategy_and_bad_configs_raise():
  rng = np.random.default_rng(5)
  zs, zt = (jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32) for _ in range(2))
  batch = {"targets": jnp.asarray(rng.integers(0, 5, (2, 4))), "mask": jnp.asarray([[0, 1, 1, 1], [0, 1, 1, 0.0]])}
  strategy = minillm.minillm_strategy({"gamma": 0.95}, vocab_size=5, num_steps=10)
  assert strategy == minillm.MiniLLMDistillation(gamma=0.95) and strategy.uses_teacher and hash(strategy)
  loss, metrics = strategy({"logits": zs}, {"logits": zt}, batch, 0)
  surrogate, _ = losses.reverse_kl_policy_gradient(zs, zt, batch["targets"], where=batch["mask"] > 0, gamma=0.95)
  np.testing.assert_allclose(loss, jnp.sum(surrogate) / 5.0, rtol=1e-6)
  assert float(metrics["ce"][1]) == 5.0  # no data rows: CE reported on the samples, outside the loss

  for cfg, match in (({"gamma": 1.5}, "gamma"), ({"teacher_mix": 1.5}, "teacher_mix"),
                     ({"pt_weight": -1.0}, "pt_weight"), ({"ratio_clip": 0.5}, "ratio_clip"),
                     ({"importance": "trajectory"}, "importance"), ({"temperature": 0.0}, "temperature"),
                     ({"alpha": 0.2}, r"unknown distill config keys \['alpha'\]")):
    with pytest.raises(ValueError, match=match):
      minillm.minillm_strategy(cfg, vocab_size=5, num_steps=10)
  # A batch that cannot carry what the configuration asks for fails instead of being misread.
  with pytest.raises(ValueError, match="sample_logprobs"):
    minillm.MiniLLMDistillation(teacher_mix=0.2)({"logits": zs}, {"logits": zt}, batch, 0)
  with pytest.raises(ValueError, match="row_kind"):
    minillm.MiniLLMDistillation(pt_weight=1.0)({"logits": zs}, {"logits": zt}, batch, 0)
  with pytest.raises(ValueError, match="sample_log_probs has shape"):
    losses.reverse_kl_policy_gradient(zs, zt, batch["targets"], sample_log_probs=jnp.zeros((2, 3)))
