"""Speculative sampling: the accept / reject step against its analytic output distribution, the
output distribution of whole generations against the target's exact one, greedy decoding against
target-only greedy decoding (with the acceptance statistics replayed without caches), the
acceptance metrics against NumPy, EOS and length handling, and input errors.

Every reference comes from the uncached model on the whole sequence or from NumPy. The filters
themselves (temperature, top-k, top-p) are checked against NumPy in test_sampling.py; here they
are applied through `sampling.sampling_log_probs` to the uncached logits. Each statistical test
uses a one-in-a-million threshold and also rejects a wrong distribution, so it can fail.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from kdjax import losses
from kdjax.models import DecoderConfig, init_decoder
from kdjax.models import sampling
from kdjax.models import speculative as spec

V = 8
TARGET_CONFIG = DecoderConfig(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                              d_ff=64, max_len=16)
SMALL_CONFIG = DecoderConfig(vocab_size=V, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                             max_len=16)
TARGET_GD, TARGET = nnx.split(init_decoder(TARGET_CONFIG, seed=0))
SMALL_GD, SMALL = nnx.split(init_decoder(SMALL_CONFIG, seed=1))


def _perturbed(params, scale, seed):
  leaves, tree = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  # One flat draw: XLA:CPU compiles a sampler per shape, which costs seconds for every leaf.
  noise = np.split(np.asarray(jax.random.normal(jax.random.key(seed), (sum(sizes),))),
                   np.cumsum(sizes)[:-1])
  return tree.unflatten([x + scale * n.reshape(x.shape) for x, n in zip(leaves, noise)])


# A close copy of the target: it agrees often but not always, so rows accept different numbers
# of proposals per call. It shares the target's graphdef, hence its compilations.
NOISY = _perturbed(TARGET, 0.02, seed=5)
DRAFTS = {"small": (SMALL_GD, SMALL), "noisy": (TARGET_GD, NOISY), "self": (TARGET_GD, TARGET)}

B, P, N, GAMMA = 8, 6, 8, 3  # P + N = 14 cache positions fit max_len 16.
LENGTHS = np.array([6, 3, 1, 4, 5, 2, 6, 1], np.int32)
PROMPTS = np.asarray(jax.random.randint(jax.random.key(0), (B, P), 0, V), np.int32)
GREEDY = sampling.SamplingConfig(N, greedy=True)
SAMPLED = sampling.SamplingConfig(N, temperature=0.8, top_k=5, top_p=0.9)
RNG = jax.random.key(42)
THRESHOLD = 1e-6  # p-value below which a statistical test rejects


@functools.lru_cache(maxsize=None)
def speculative(draft_gd, config, gamma=GAMMA):
  return spec.make_speculative_generate(TARGET_GD, draft_gd, gamma=gamma, config=config)


@functools.lru_cache(maxsize=None)
def target_only(config):
  return sampling.make_generate(TARGET_GD, config)


def run(draft, config, prompts=PROMPTS, lengths=LENGTHS, rng=RNG, gamma=GAMMA):
  graphdef, params = DRAFTS[draft]
  gen, stats_ = speculative(graphdef, config, gamma)(TARGET, params, prompts, lengths, rng)
  return jax.tree.map(np.asarray, gen), jax.tree.map(np.asarray, stats_)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def full_logits(graphdef, params, tokens):
  """The uncached model on `tokens` right-padded to max_len, so that one compilation serves all."""
  tokens = np.asarray(tokens, np.int32).reshape(-1, np.shape(tokens)[-1])
  width = TARGET_CONFIG.max_len
  padded = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
  return np.asarray(forward(graphdef, params, padded))


def probs_of(logits, config):
  """The sampling distribution of `config` over the last axis, float64 and renormalised."""
  probs = np.exp(np.asarray(sampling.sampling_log_probs(jnp.asarray(logits), config), np.float64))
  return probs / probs.sum(-1, keepdims=True)


def chi2_pvalue(counts, probs):
  """Pearson's test of `counts` against `probs`; cells expecting fewer than 5 draws are pooled.

  A draw where `probs` is 0 is impossible, so the p-value is then 0.
  """
  counts, probs = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel()
  if counts[probs == 0].any():
    return 0.0
  expected = counts.sum() * probs
  small = (expected < 5) & (probs > 0)
  big = expected >= 5
  observed = np.append(counts[big], counts[small].sum())
  expected = np.append(expected[big], expected[small].sum())
  if not small.any():
    observed, expected = observed[:-1], expected[:-1]
  statistic = np.sum((observed - expected) ** 2 / expected)
  return stats.chi2.sf(statistic, df=observed.size - 1)


# ----------------------------------------------------------------------------------------------
# The accept / reject step on fixed distributions.

# Token 3 is one the draft never proposes (only the residual reaches it); tokens 4 and 5 are ones
# the target never emits (their proposals are always rejected).
P_TARGET = np.array([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
Q_DRAFT = np.array([0.1, 0.2, 0.3, 0.0, 0.25, 0.15])
P_BONUS = np.array([0.05, 0.1, 0.15, 0.2, 0.22, 0.28])


def log(x):
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(x, np.float32))


@functools.partial(jax.jit, static_argnames="draws")
def verify_fixed(key, target_lp, draft_lp, *, draws):
  """`accept_draft` on `draws` rows that all share the per-position distributions given."""
  draft_key, accept_key = jax.random.split(key)
  target_lp = jnp.broadcast_to(target_lp, (draws, *target_lp.shape))
  draft_lp = jnp.broadcast_to(draft_lp, (draws, *draft_lp.shape))
  tokens = jax.random.categorical(draft_key, draft_lp, axis=-1).astype(jnp.int32)
  run, next_token = spec.accept_draft(accept_key, target_lp, draft_lp, tokens)
  return tokens, run, next_token


def test_accept_draft_emits_exactly_the_target_distribution():
  draws = 100_000
  tokens, run, next_token = map(np.asarray, verify_fixed(
      jax.random.key(0), log(np.stack([P_TARGET, P_BONUS])), log(Q_DRAFT[None]), draws=draws))
  tokens, accepted = tokens[:, 0], run == 1
  emitted = np.where(accepted, tokens, next_token)

  # The analytic distribution of the emitted token, term by term as in Leviathan et al.
  alpha = np.minimum(P_TARGET, Q_DRAFT).sum()
  with np.errstate(divide="ignore", invalid="ignore"):
    accept_prob = np.where(Q_DRAFT > 0, np.minimum(1.0, P_TARGET / Q_DRAFT), 0.0)
  residual = np.maximum(P_TARGET - Q_DRAFT, 0) / np.maximum(P_TARGET - Q_DRAFT, 0).sum()
  emit = Q_DRAFT * accept_prob + (1 - alpha) * residual
  np.testing.assert_allclose(emit, P_TARGET, atol=1e-12)  # the closed-form identity

  counts = np.bincount(emitted, minlength=V)[:P_TARGET.size]
  assert chi2_pvalue(counts, P_TARGET) > THRESHOLD
  assert chi2_pvalue(counts, Q_DRAFT) < THRESHOLD  # the draft's own distribution is rejected
  # Each piece alone: the acceptance rate is α, rejections draw the residual, a full acceptance
  # draws the bonus token from the next target distribution.
  assert stats.binomtest(accepted.sum(), draws, alpha).pvalue > THRESHOLD
  assert chi2_pvalue(np.bincount(next_token[~accepted], minlength=6), residual) > THRESHOLD
  assert chi2_pvalue(np.bincount(next_token[accepted], minlength=6), P_BONUS) > THRESHOLD
  assert chi2_pvalue(np.bincount(next_token[accepted], minlength=6), P_TARGET) < THRESHOLD


def test_accept_draft_stops_at_the_first_rejection():
  certain, impossible = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
  key = jax.random.key(1)
  # Proposal 1 is always token 0. The target never emits it, so the run is 0 even though
  # proposal 2 would be accepted; the next token is the residual, token 1.
  target = log(np.stack([impossible, certain, certain]))
  _, run, next_token = verify_fixed(key, target, log(np.stack([certain, certain])), draws=64)
  np.testing.assert_array_equal(run, 0)
  np.testing.assert_array_equal(next_token, 1)
  # Proposal 1 agrees, proposal 2 is always rejected: the run is exactly 1.
  target = log(np.stack([certain, impossible, certain]))
  _, run, next_token = verify_fixed(key, target, log(np.stack([certain, certain])), draws=64)
  np.testing.assert_array_equal(run, 1)
  np.testing.assert_array_equal(next_token, 1)
  # Point masses that agree everywhere (greedy decoding with draft = target): all accepted, and
  # the bonus token is the last target's argmax.
  target = log(np.stack([certain, certain, impossible]))
  _, run, next_token = verify_fixed(key, target, log(np.stack([certain, certain])), draws=64)
  np.testing.assert_array_equal(run, 2)
  np.testing.assert_array_equal(next_token, 1)


def test_mean_tokens_per_round_is_expected_tokens_per_call():
  # The same p and q at every position make the acceptances i.i.d. with rate α, the assumption
  # of the closed form.
  draws, gamma = 100_000, 3
  target = log(np.tile(P_TARGET, (gamma + 1, 1)))
  draft = log(np.tile(Q_DRAFT, (gamma, 1)))
  _, run, _ = verify_fixed(jax.random.key(2), target, draft, draws=draws)
  per_round = np.asarray(run) + 1.0
  alpha = np.minimum(P_TARGET, Q_DRAFT).sum()
  expected = float(spec.expected_tokens_per_call(alpha, gamma))
  np.testing.assert_allclose(expected, (1 - alpha ** (gamma + 1)) / (1 - alpha), rtol=1e-6)
  standard_error = per_round.std() / np.sqrt(draws)
  assert abs(per_round.mean() - expected) < 5 * standard_error
  # The same test tells a 10% smaller acceptance rate apart.
  assert abs(per_round.mean() - float(spec.expected_tokens_per_call(0.9 * alpha, gamma))) > \
      5 * standard_error


# ----------------------------------------------------------------------------------------------
# Acceptance metrics.


@pytest.mark.parametrize("config", [SAMPLED, sampling.SamplingConfig(1, temperature=1.3),
                                    GREEDY, sampling.SamplingConfig(1, temperature=0.0)])
def test_sampling_log_probs_is_the_distribution_sample_draws_from(config):
  # The speculative references below use this helper, so it is pinned to the filters that
  # test_sampling.py checks against NumPy, and greedy to the argmax.
  z = jax.random.normal(jax.random.key(4), (5, V)) * 2
  log_p = np.asarray(sampling.sampling_log_probs(z, config))
  if config.is_greedy:
    argmax = np.eye(V, dtype=bool)[np.asarray(z).argmax(-1)]
    np.testing.assert_array_equal(log_p, np.where(argmax, 0.0, -np.inf))
  else:
    filtered = sampling.filter_logits(z, temperature=config.temperature, top_k=config.top_k,
                                      top_p=config.top_p)
    np.testing.assert_allclose(log_p, jax.nn.log_softmax(filtered), rtol=1e-6)
    ids, logprobs = sampling.sample(jax.random.key(5), z, config)
    np.testing.assert_allclose(logprobs, log_p[np.arange(5), ids], rtol=1e-6)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (0.8, 4, 0.7), (0.0, 0, 1.0)])
def test_acceptance_rate_matches_numpy(temperature, top_k, top_p):
  target = np.asarray(jax.random.normal(jax.random.key(0), (4, 5, V)) * 2)
  draft = target + np.asarray(jax.random.normal(jax.random.key(1), (4, 5, V)))
  alpha = np.asarray(spec.acceptance_rate(target, draft, temperature=temperature, top_k=top_k,
                                          top_p=top_p))
  if temperature == 0:  # greedy: accepted iff the argmaxes agree
    expected = (target.argmax(-1) == draft.argmax(-1)).astype(np.float64)
    assert 0 < expected.mean() < 1
  else:
    config = sampling.SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p)
    p, q = probs_of(target, config), probs_of(draft, config)
    expected = np.minimum(p, q).sum(-1)
    np.testing.assert_allclose(expected, 1 - 0.5 * np.abs(p - q).sum(-1), atol=1e-12)
  np.testing.assert_allclose(alpha, expected, rtol=1e-5, atol=1e-6)
  if (top_k, top_p) == (0, 1.0) and temperature > 0:  # unfiltered: one minus the TVD loss
    tvd = losses.total_variation(draft, target, temperature=temperature)
    np.testing.assert_allclose(alpha, 1 - np.asarray(tvd), rtol=1e-5, atol=1e-6)


def test_acceptance_rate_bounds_and_masks():
  z = np.asarray(jax.random.normal(jax.random.key(3), (6, V)))
  np.testing.assert_allclose(spec.acceptance_rate(z, z, temperature=0.7), 1.0, rtol=1e-6)
  # Disjoint supports: nothing is ever accepted.
  disjoint = np.where(np.arange(V) < V // 2, 0.0, -np.inf)
  np.testing.assert_array_equal(spec.acceptance_rate(disjoint, disjoint[::-1]), 0.0)
  where = np.array([True, False, True, True, False, True])
  garbage = np.where(where[:, None], z[::-1], np.nan)
  alpha = np.asarray(spec.acceptance_rate(z, garbage, where=where))
  np.testing.assert_array_equal(alpha[~where], 0.0)
  np.testing.assert_allclose(alpha[where], np.asarray(spec.acceptance_rate(z, z[::-1]))[where])
  with pytest.raises(ValueError, match="must have the same shape"):
    spec.acceptance_rate(z, z[:, :-1])
  with pytest.raises(ValueError, match="`where` has shape"):
    spec.acceptance_rate(z, z, where=where[:3])


def test_expected_tokens_per_call_formula_and_limit():
  gamma = 4
  alpha = np.array([0.0, 0.2, 0.5, 0.9, 0.99])
  np.testing.assert_allclose(spec.expected_tokens_per_call(alpha, gamma),
                             (1 - alpha ** (gamma + 1)) / (1 - alpha), rtol=1e-6)
  np.testing.assert_allclose(spec.expected_tokens_per_call(1.0, gamma), gamma + 1)
  # Continuous at α = 1, where the closed form is 0/0.
  np.testing.assert_allclose(spec.expected_tokens_per_call(1 - 1e-4, gamma), gamma + 1, rtol=1e-3)
  np.testing.assert_allclose(spec.expected_tokens_per_call(0.0, 1), 1.0)
  with pytest.raises(ValueError, match="gamma .* must be an int >= 1"):
    spec.expected_tokens_per_call(0.5, 0)


# ----------------------------------------------------------------------------------------------
# The output distribution of whole generations.


EXACT_DRAWS, EXACT_LENGTH, EXACT_GAMMA = 20_000, 4, 2
EXACT_PROMPT = np.array([3, 1, 4, 1, 5], np.int32)  # width 5, length 4: one padding id


def first_two_tokens(graphdef, params, config):
  """Exact joint distribution [V, V] of the first two sampled tokens after EXACT_PROMPT."""
  prompt = EXACT_PROMPT[:EXACT_LENGTH]
  sequences = np.concatenate([np.tile(prompt, (V, 1)), np.arange(V)[:, None]], axis=1)
  logits = full_logits(graphdef, params, sequences)
  first = probs_of(logits[0, EXACT_LENGTH - 1], config)  # the prompt alone
  second = probs_of(logits[:, EXACT_LENGTH], config)  # row t: after first token t
  return first[:, None] * second


@pytest.mark.parametrize("config", [
    sampling.SamplingConfig(2, temperature=1.0),
    sampling.SamplingConfig(2, temperature=0.7, top_k=6, top_p=0.9)],
    ids=["plain", "filtered"])
def test_speculative_sampling_has_the_target_output_distribution(config):
  prompts = np.tile(EXACT_PROMPT, (EXACT_DRAWS, 1))
  lengths = np.full(EXACT_DRAWS, EXACT_LENGTH, np.int32)
  gen, stats_ = run("small", config, prompts, lengths, jax.random.key(7), gamma=EXACT_GAMMA)
  assert gen.mask.all()
  # Both paths happen: two tokens from the first call, or a rejection and a second call.
  assert set(np.unique(stats_.calls)) == {1, 2}
  counts = np.bincount(gen.tokens[:, 0] * V + gen.tokens[:, 1], minlength=V * V)

  target = first_two_tokens(TARGET_GD, TARGET, config)
  draft = first_two_tokens(SMALL_GD, SMALL, config)
  p_target = chi2_pvalue(counts, target)
  assert p_target > THRESHOLD, (p_target, 0.5 * np.abs(counts / EXACT_DRAWS - target.ravel()).sum())
  # The test has power: it rejects the draft's own distribution (what accepting every proposal
  # would give), and even a 5% admixture of it.
  assert chi2_pvalue(counts, draft) < THRESHOLD
  assert chi2_pvalue(counts, 0.95 * target + 0.05 * draft) < THRESHOLD


# ----------------------------------------------------------------------------------------------
# Greedy decoding and the acceptance statistics.


def greedy_replay(graphdef, params, target_tokens):
  """(calls, accepted) of greedy speculative decoding, replayed per row without caches.

  From each kept prefix the draft proposes GAMMA greedy tokens of its own; the target keeps the
  run that agrees with its greedy tokens and one more of its own.
  """
  calls, accepted = np.zeros(B, np.int64), np.zeros((B, N), np.int64)
  for b in range(B):
    kept = 0
    while kept < N:
      sequence = list(PROMPTS[b, :LENGTHS[b]]) + list(target_tokens[b, :kept])
      proposals = []
      for _ in range(GAMMA):
        logits = full_logits(graphdef, params, [sequence + proposals])[0]
        proposals.append(logits[len(sequence) + len(proposals) - 1].argmax())
      remaining = N - kept
      agree = [proposals[j] == target_tokens[b, kept + j] for j in range(min(GAMMA, remaining))]
      run_length = int(np.cumprod(agree).sum())
      accepted[b, calls[b]] = run_length
      kept += min(run_length + 1, remaining)
      calls[b] += 1
  return calls, accepted


@pytest.fixture(scope="module")
def greedy_target():
  return jax.tree.map(np.asarray, target_only(GREEDY)(TARGET, PROMPTS, LENGTHS, RNG))


@pytest.mark.parametrize("draft", ["small", "noisy", "self"])
def test_greedy_speculative_decoding_equals_target_only_greedy(draft, greedy_target):
  gen, stats_ = run(draft, GREEDY)
  np.testing.assert_array_equal(gen.tokens, greedy_target.tokens)
  np.testing.assert_array_equal(gen.mask, greedy_target.mask)
  np.testing.assert_array_equal(gen.logprobs, 0.0)
  calls, accepted = greedy_replay(*DRAFTS[draft], greedy_target.tokens)
  np.testing.assert_array_equal(stats_.calls, calls)
  np.testing.assert_array_equal(stats_.accepted, accepted)
  np.testing.assert_array_equal(stats_.kept, N)
  if draft == "self":  # every proposal accepted: γ + 1 tokens per call
    assert float(stats_.tokens_per_call) == GAMMA + 1
  if draft == "noisy":  # rows really do accept different numbers per call
    assert len(np.unique(accepted[:, 0])) > 2
  if draft == "small":
    assert float(stats_.tokens_per_call) < 2


@pytest.mark.parametrize("draft", ["noisy", "self"])
def test_sampled_tokens_carry_the_target_logprobs(draft):
  # The target's log-probability of each kept token, recomputed without the cache, checks that
  # the target cache follows every row's own accepted prefix.
  gen, stats_ = run(draft, SAMPLED)
  assert gen.mask.all()
  batch = jax.tree.map(np.asarray, sampling.completion_batch(PROMPTS, LENGTHS, gen))
  logits = full_logits(TARGET_GD, TARGET, batch["inputs"])
  columns = LENGTHS[:, None] - 1 + np.arange(N)
  p = probs_of(logits[np.arange(B)[:, None], columns], SAMPLED)
  expected = np.take_along_axis(p, gen.tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(gen.logprobs, np.log(expected), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(stats_.kept, N)
  if draft == "self":  # the same filters on the same logits: nothing is ever rejected
    np.testing.assert_array_equal(stats_.calls, N // (GAMMA + 1))
    np.testing.assert_array_equal(stats_.accepted[:, :N // (GAMMA + 1)], GAMMA)
    assert float(stats_.tokens_per_call) == GAMMA + 1
  else:
    assert 1 < float(stats_.tokens_per_call) < GAMMA + 1


# ----------------------------------------------------------------------------------------------
# EOS and lengths.


def test_greedy_eos_stops_rows_like_target_only_greedy(greedy_target):
  eos = int(greedy_target.tokens[2, 4])
  config = dataclasses.replace(GREEDY, eos_id=eos, pad_id=(eos + 1) % V)
  expected = jax.tree.map(np.asarray, target_only(config)(TARGET, PROMPTS, LENGTHS, RNG))
  kept = expected.mask.sum(1)
  assert (kept < N).any() and (kept > 1).any()
  gen, stats_ = run("noisy", config)
  np.testing.assert_array_equal(gen.tokens, expected.tokens)
  np.testing.assert_array_equal(gen.mask, expected.mask)
  np.testing.assert_array_equal(stats_.kept, kept)
  # A call keeps its accepted proposals and one more token, except that a row's last call may
  # end on an accepted proposal (EOS or max_new_tokens): proposals past the end are not counted.
  extra = kept - stats_.accepted.sum(1)
  assert ((extra == stats_.calls) | (extra == stats_.calls - 1)).all()


def test_sampled_eos_truncates_and_pads():
  gen, _ = run("noisy", SAMPLED)
  eos = int(gen.tokens[0, 2])
  config = dataclasses.replace(SAMPLED, eos_id=eos, pad_id=(eos + 1) % V)
  gen, stats_ = run("noisy", config)
  kept = gen.mask.sum(1)
  assert (kept < N).any()
  np.testing.assert_array_equal(gen.mask, np.arange(N) < kept[:, None])  # a prefix per row
  np.testing.assert_array_equal(stats_.kept, kept)
  for b in range(B):
    row = gen.tokens[b]
    assert eos not in row[:kept[b] - 1]
    if kept[b] < N:
      assert row[kept[b] - 1] == eos
    np.testing.assert_array_equal(row[kept[b]:], config.pad_id)
    np.testing.assert_array_equal(gen.logprobs[b, kept[b]:], 0.0)
    np.testing.assert_array_equal(stats_.accepted[b, stats_.calls[b]:], 0)


# ----------------------------------------------------------------------------------------------
# Timing helper and input errors.


def test_benchmark_speedup_reports_both_timings():
  timing = spec.benchmark_speedup(TARGET_GD, TARGET, TARGET_GD, TARGET, PROMPTS[:2], LENGTHS[:2],
                                  RNG, gamma=1, config=sampling.SamplingConfig(4, greedy=True),
                                  repeats=2)
  assert all(t > 0 for t in timing.speculative_s + timing.target_s)
  assert timing.speedup > 0
  assert timing.tokens_per_call == 2


def shapes_of(draft_gd, draft_params, prompts=PROMPTS, gamma=GAMMA, config=SAMPLED):
  fn = functools.partial(spec.speculative_generate, TARGET_GD, gamma=gamma, config=config)
  return jax.eval_shape(lambda t, d, x: fn(t, draft_gd, d, x, None, RNG), TARGET, draft_params,
                        prompts)


def test_input_errors():
  for gamma in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="gamma .* must be an int >= 1"):
      spec.make_speculative_generate(TARGET_GD, SMALL_GD, gamma=gamma, config=SAMPLED)
    with pytest.raises(ValueError, match="gamma .* must be an int >= 1"):
      shapes_of(SMALL_GD, SMALL, gamma=gamma)
  other_gd, other = nnx.split(nnx.eval_shape(
      lambda: init_decoder(dataclasses.replace(SMALL_CONFIG, vocab_size=V + 1))))
  with pytest.raises(ValueError, match="vocab mismatch: the draft has 9 ids, the target 8"):
    shapes_of(other_gd, other)
  gen, stats_ = shapes_of(SMALL_GD, SMALL, prompts=np.zeros((B, 8), np.int32))  # P + N = 16 fits
  assert gen.tokens.shape == stats_.accepted.shape == (B, N)
  with pytest.raises(ValueError, match="needs 17 cache positions .* max_len 16"):
    shapes_of(SMALL_GD, SMALL, prompts=np.zeros((B, 9), np.int32))
  short_draft_gd, short_draft = nnx.split(nnx.eval_shape(
      lambda: init_decoder(dataclasses.replace(SMALL_CONFIG, max_len=13))))
  # generate would fit (P + N - 1 = 13); the draft's scratch slot does not.
  with pytest.raises(ValueError, match="needs 14 cache positions .* max_len 13"):
    shapes_of(short_draft_gd, short_draft)
  with pytest.raises(ValueError, match=r"integer \[batch, length\]"):
    shapes_of(SMALL_GD, SMALL, prompts=np.zeros((B, P), np.float32))
  with pytest.raises(ValueError, match="eos_id 8 is outside the vocabulary"):
    shapes_of(SMALL_GD, SMALL, config=dataclasses.replace(SAMPLED, eos_id=V))
  with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 6\]"):
    speculative(SMALL_GD, SAMPLED)(TARGET, SMALL, PROMPTS, LENGTHS + 1, RNG)
  logits = jnp.zeros((2, 2, 3, V))
  with pytest.raises(ValueError, match="for 2 draft tokens per row expected"):
    spec.accept_draft(RNG, logits, logits, jnp.zeros((2, 2), jnp.int32))
