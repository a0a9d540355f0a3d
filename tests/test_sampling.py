"""KV-cached sampling: cached equals uncached, greedy equals a naive loop, filters and sampled
frequencies against NumPy, EOS and length handling, sampler log-probabilities, the distillation
batch, sharded equals unsharded, one trace per shape, and input errors.

Every reference is recomputed here without the cache (the full model on the whole sequence) or in
NumPy, never taken from a run. Compilation dominates on CPU, so the model, the prompts and the
sampled generations are shared module-wide and every jitted function is compiled once.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special, stats

from kdjax import losses
from kdjax.distill.strategies import LogitDistillation
from kdjax.models import DecoderConfig, init_decoder
from kdjax.models import sampling
from kdjax.train import sharding as sharding_lib

V = 48
# GQA, q/k/v biases, q/k norms and a soft-cap all sit on the cached path, so all are switched on.
CONFIG = DecoderConfig(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64,
                       max_len=16, qkv_bias=True, qk_norm=True, logit_softcap=20.0)
B, P, N = 8, 6, 8  # P + N = max_len: the full sequences still fit the uncached model.
LENGTHS = np.array([6, 3, 1, 4, 5, 2, 6, 1], np.int32)
GRAPHDEF, PARAMS = nnx.split(init_decoder(CONFIG, seed=0))
# Biases start at zero; random ones make sure the cached path adds them too.
PARAMS = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), PARAMS)
SAMPLE = sampling.SamplingConfig(max_new_tokens=N, temperature=0.8, top_k=12, top_p=0.9)
GREEDY = sampling.SamplingConfig(max_new_tokens=N, greedy=True)
RNG = jax.random.key(42)


def make_prompts(seed=0):
  """Random prompts whose padding (after each row's length) is random too: it must not matter."""
  return np.asarray(jax.random.randint(jax.random.key(seed), (B, P), 0, V), np.int32)


PROMPTS = make_prompts()
ROWS = np.arange(B)[:, None]


@jax.jit
def forward(params, tokens):
  return nnx.merge(GRAPHDEF, params)(tokens)


def full_logits(tokens):
  """The uncached model on `tokens` right-padded to P + N, so that one compilation serves all."""
  return np.asarray(forward(PARAMS, np.pad(tokens, ((0, 0), (0, P + N - tokens.shape[1])))))


@functools.partial(jax.jit, static_argnames="config")
@chex.assert_max_traces(n=1)  # Only ever called with SAMPLE and one set of shapes.
def generate_sample(params, prompts, lengths, rng, *, config):
  return sampling.generate(GRAPHDEF, params, prompts, rng, config=config, prompt_lengths=lengths)


@functools.lru_cache(maxsize=None)
def generator(config):
  return sampling.make_generate(GRAPHDEF, config)


@pytest.fixture(scope="module")
def sampled():
  return generate_sample(PARAMS, PROMPTS, LENGTHS, RNG, config=SAMPLE)


# ----------------------------------------------------------------------------------------------
# NumPy references, one row at a time in float64.


def np_top_k(z, k):
  z = np.asarray(z, np.float64)
  out = np.full_like(z, -np.inf)
  for row in np.ndindex(z.shape[:-1]):
    keep = np.argsort(-z[row], kind="stable")[:k] if k else slice(None)
    out[row][keep] = z[row][keep]
  return out


def np_top_p(z, p):
  z = np.asarray(z, np.float64)
  out = np.full_like(z, -np.inf)
  for row in np.ndindex(z.shape[:-1]):
    probs = special.softmax(z[row])
    mass = 0.0
    for i in np.argsort(-z[row], kind="stable"):
      out[row][i] = z[row][i]
      mass += probs[i]
      if mass >= p:
        break
  return out


def np_filter(z, config):
  return np_top_p(np_top_k(np.asarray(z, np.float64) / config.temperature, config.top_k), config.top_p)


def kept_until_eos(tokens, eos):
  """Per row, the number of tokens up to and including the first `eos` (all of them if none)."""
  hits = tokens == eos
  return np.where(hits.any(1), hits.argmax(1) + 1, tokens.shape[1])


# ----------------------------------------------------------------------------------------------
# The cache.


@jax.jit
def teacher_forced(params, prompts, lengths, continuation):
  """Logits of a prefill and then of `continuation`, fed one token per step and as one block."""
  model = nnx.merge(GRAPHDEF, params)
  n = continuation.shape[1]
  cache = model.init_cache(B, P + n)
  prefill, cache = model.decode_step(prompts, cache, jnp.broadcast_to(jnp.arange(P), prompts.shape))

  def one(cache, t):
    logits, cache = model.decode_step(continuation[:, t, None], cache, (lengths + t)[:, None])
    return cache, logits[:, 0]

  _, stepped = jax.lax.scan(one, cache, jnp.arange(n))
  block, _ = model.decode_step(continuation, cache, lengths[:, None] + jnp.arange(n))
  return prefill, stepped.swapaxes(0, 1), block


def test_cached_decoding_equals_full_model_for_prompts_of_different_lengths():
  full = np.asarray(jax.random.randint(jax.random.key(7), (B, P + N), 0, V), np.int32)
  # Row b's prompt is full[b, :LENGTHS[b]]; PROMPTS supplies different tokens after it.
  prompts = np.where(np.arange(P) < LENGTHS[:, None], full[:, :P], PROMPTS)
  assert (prompts != full[:, :P]).any()
  steps = LENGTHS[:, None] + np.arange(N)
  continuation = full[ROWS, steps]
  prefill, stepped, block = map(np.asarray, teacher_forced(PARAMS, prompts, LENGTHS, continuation))
  expected = full_logits(full)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(prefill[b, :n], expected[b, :n], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stepped, expected[ROWS, steps], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(block, expected[ROWS, steps], rtol=1e-5, atol=1e-5)


def test_attention_follows_the_positions_it_is_given():
  attn = nnx.merge(GRAPHDEF, PARAMS).blocks[0].attn
  x = jax.random.normal(jax.random.key(0), (2, 5, CONFIG.d_model))
  base, _ = attn(x)
  # RoPE scores depend on relative positions only: a common offset changes nothing...
  shifted, _ = attn(x, jnp.arange(5)[None] + 7)
  np.testing.assert_allclose(shifted, base, rtol=1e-5, atol=1e-5)
  # ...and the causal order is the positions' order, not the order along the axis.
  backwards, _ = attn(x[:, ::-1], jnp.arange(5)[None, ::-1])
  np.testing.assert_allclose(backwards[:, ::-1], base, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_naive_argmax_loop():
  sequence = np.where(np.arange(P + N) < LENGTHS[:, None], np.pad(PROMPTS, ((0, 0), (0, N))), 0)
  for t in range(N):
    logits = full_logits(sequence)
    sequence[ROWS[:, 0], LENGTHS + t] = logits[ROWS[:, 0], LENGTHS - 1 + t].argmax(-1)
  expected = sequence[ROWS, LENGTHS[:, None] + np.arange(N)]

  gen = generator(GREEDY)(PARAMS, PROMPTS, LENGTHS, RNG)
  np.testing.assert_array_equal(gen.tokens, expected)
  assert np.asarray(gen.mask).all()
  np.testing.assert_array_equal(gen.logprobs, 0.0)


def test_no_prompt_lengths_means_full_rows():
  run = generator(GREEDY)
  full = run(PARAMS, PROMPTS, np.full(B, P, np.int32), RNG)
  chex.assert_trees_all_equal(run(PARAMS, PROMPTS, None, RNG), full)
  batch = sampling.completion_batch(PROMPTS, None, full)
  np.testing.assert_array_equal(batch["inputs"][:, :P], PROMPTS)
  np.testing.assert_array_equal(batch["targets"][:, P - 1:], full.tokens)


# ----------------------------------------------------------------------------------------------
# Filters and the sampler on a fixed distribution.


@pytest.mark.parametrize("k", [0, 1, 3, 10, V])
def test_top_k_filter_matches_numpy(k):
  z = jax.random.normal(jax.random.key(k), (5, V)) * 3
  np.testing.assert_array_equal(sampling.top_k_filter(z, k), np_top_k(z, k).astype(np.float32))


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.75, 0.95, 1.0])
def test_top_p_filter_matches_numpy(p):
  z = jax.random.normal(jax.random.key(1), (5, V)) * 3
  filtered = np.asarray(sampling.top_p_filter(z, p))
  np.testing.assert_array_equal(filtered, np_top_p(z, p).astype(np.float32))
  # The likeliest token survives any p.
  assert np.isfinite(filtered[np.arange(5), np.asarray(z).argmax(-1)]).all()


def test_filters_compose_temperature_then_top_k_then_top_p():
  z = jax.random.normal(jax.random.key(2), (6, V)) * 2
  filtered = sampling.filter_logits(z, temperature=0.7, top_k=9, top_p=0.6)
  expected = np_filter(z, sampling.SamplingConfig(1, temperature=0.7, top_k=9, top_p=0.6))
  np.testing.assert_array_equal(np.isfinite(filtered), np.isfinite(expected))
  np.testing.assert_allclose(np.where(np.isfinite(expected), filtered, 0),
                             np.where(np.isfinite(expected), expected, 0), rtol=1e-6)


TINY = np.log(np.array([0.32, 0.24, 0.16, 0.12, 0.09, 0.07]))


@functools.partial(jax.jit, static_argnames=("config", "draws"))
def sample_tiny(key, *, config, draws):
  return sampling.sample(key, jnp.broadcast_to(jnp.asarray(TINY, jnp.float32), (draws, TINY.size)),
                         config)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.8)])
def test_sampled_frequencies_match_the_filtered_tempered_distribution(temperature, top_k, top_p):
  config = sampling.SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p)
  draws = 20_000
  ids, logprobs = map(np.asarray, sample_tiny(jax.random.key(3), config=config, draws=draws))
  expected = special.softmax(np_filter(TINY, config))
  np.testing.assert_allclose(logprobs, np.log(expected[ids]), rtol=1e-5, atol=1e-6)
  counts = np.bincount(ids, minlength=TINY.size)
  support = expected > 0
  assert (counts[~support] == 0).all()

  def chi2(probs):  # Pearson's statistic over the ids `probs` allows.
    allowed = probs > 0
    return np.sum((counts[allowed] - draws * probs[allowed]) ** 2 / (draws * probs[allowed]))

  # A one-in-a-million threshold: generous, yet (below) it still rejects the untempered,
  # unfiltered distribution whenever the filters change it.
  threshold = stats.chi2.ppf(1 - 1e-6, df=support.sum() - 1)
  assert chi2(expected) < threshold
  plain = special.softmax(TINY)
  if not np.allclose(expected, plain, atol=0.01):
    assert chi2(plain) > threshold


@pytest.mark.parametrize("config", [sampling.SamplingConfig(1, temperature=0.0),
                                    sampling.SamplingConfig(1, temperature=3.0, greedy=True)])
def test_zero_temperature_or_greedy_flag_is_argmax_with_zero_logprob(config):
  ids, logprobs = sample_tiny(jax.random.key(0), config=config, draws=4)
  np.testing.assert_array_equal(ids, TINY.argmax())
  np.testing.assert_array_equal(logprobs, 0.0)


# ----------------------------------------------------------------------------------------------
# EOS, log-probabilities and the distillation batch.


@pytest.fixture(scope="module")
def with_eos(sampled):
  """`SAMPLE` with an EOS that row 0 emits at step 2 (and other rows wherever they do)."""
  eos = int(sampled.tokens[0, 2])
  config = dataclasses.replace(SAMPLE, eos_id=eos, pad_id=(eos + 1) % V)
  return config, generator(config)(PARAMS, PROMPTS, LENGTHS, RNG)


def test_eos_stops_a_row_pads_and_masks_the_rest(sampled, with_eos):
  config, gen = with_eos
  tokens, logprobs = np.asarray(sampled.tokens), np.asarray(sampled.logprobs)
  # Same key per step, same logits up to EOS: the rows follow the run without EOS until then.
  kept = kept_until_eos(tokens, config.eos_id)
  assert kept[0] <= 3 and (kept < N).any()
  mask = np.arange(N) < kept[:, None]
  np.testing.assert_array_equal(gen.mask, mask)
  np.testing.assert_array_equal(gen.tokens, np.where(mask, tokens, config.pad_id))
  np.testing.assert_allclose(gen.logprobs, np.where(mask, logprobs, 0.0), rtol=1e-5, atol=1e-6)
  assert gen.tokens.shape == (B, N)  # No row runs past max_new_tokens.


def test_logprobs_are_log_softmax_of_filtered_tempered_full_model_logits(with_eos):
  config, gen = with_eos
  batch = jax.tree.map(np.asarray, sampling.completion_batch(PROMPTS, LENGTHS, gen))
  logits = full_logits(batch["inputs"])
  tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
  checked = 0
  for b, t in zip(*np.nonzero(mask)):
    position = LENGTHS[b] - 1 + t
    expected = special.log_softmax(np_filter(logits[b, position], config))[tokens[b, t]]
    np.testing.assert_allclose(gen.logprobs[b, t], expected, rtol=1e-4, atol=1e-4)
    checked += 1
  assert checked == mask.sum() > B


draw = jax.jit(sampling.sample, static_argnums=2)


def test_step_t_draws_with_the_key_folded_with_t(sampled):
  batch = sampling.completion_batch(PROMPTS, LENGTHS, sampled)
  logits = full_logits(np.asarray(batch["inputs"]))
  for t in range(N):
    ids, _ = draw(jax.random.fold_in(RNG, t), logits[ROWS[:, 0], LENGTHS - 1 + t], SAMPLE)
    np.testing.assert_array_equal(ids, sampled.tokens[:, t])


def test_completion_batch_covers_completion_tokens_only(with_eos):
  _, gen = with_eos
  batch = jax.tree.map(np.asarray, sampling.completion_batch(PROMPTS, LENGTHS, gen))
  tokens, valid = np.asarray(gen.tokens), np.asarray(gen.mask)
  for key in ("inputs", "targets", "mask"):
    assert batch[key].shape == (B, P + N - 1), key
  assert batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  expected_mask = np.zeros((B, P + N - 1), np.float32)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_array_equal(batch["inputs"][b, :n], PROMPTS[b, :n])
    kept = valid[b].sum()
    np.testing.assert_array_equal(batch["targets"][b, n - 1:n - 1 + kept], tokens[b, :kept])
    expected_mask[b, n - 1:n - 1 + kept] = 1
  np.testing.assert_array_equal(batch["mask"], expected_mask)

  # The batch is what the distillation strategy consumes: it counts exactly the completion tokens.
  strategy = LogitDistillation(divergence=losses.forward_kl, kd_weight=0.5)
  logits = {"logits": jnp.asarray(full_logits(batch["inputs"])[:, :P + N - 1])}
  loss, metrics = jax.jit(strategy)(logits, logits, batch, 0)
  assert np.isfinite(loss)
  assert float(metrics["ce"][1]) == valid.sum()


# ----------------------------------------------------------------------------------------------
# Sharding and compilation.


def test_sharded_over_data_mesh_equals_unsharded(sampled):
  mesh = sharding_lib.make_mesh({"data": -1})
  assert mesh.shape["data"] == B
  batch_sharding = sharding_lib.batch_sharding(mesh)
  params = jax.device_put(PARAMS, sharding_lib.replicated(mesh))
  run = sampling.make_generate(GRAPHDEF, SAMPLE, batch_sharding=batch_sharding)
  gen = run(params, jax.device_put(PROMPTS, batch_sharding), LENGTHS, RNG)
  assert gen.tokens.sharding.is_equivalent_to(batch_sharding, 2)
  np.testing.assert_array_equal(gen.tokens, sampled.tokens)
  np.testing.assert_array_equal(gen.mask, sampled.mask)
  np.testing.assert_allclose(gen.logprobs, sampled.logprobs, rtol=1e-5, atol=1e-5)


def test_one_trace_across_calls_with_equal_shapes(sampled):
  # generate_sample carries assert_max_traces(n=1) and the `sampled` fixture traced it already.
  for seed in (1, 2):
    lengths = np.asarray(jax.random.randint(jax.random.key(seed), (B,), 1, P + 1), np.int32)
    gen = generate_sample(PARAMS, make_prompts(seed), lengths, jax.random.key(seed), config=SAMPLE)
    assert not np.array_equal(gen.tokens, sampled.tokens)


# ----------------------------------------------------------------------------------------------
# Input errors.


@pytest.mark.parametrize("changes, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(eos_id=-1), "eos_id must be None or an int >= 0"),
    (dict(pad_id=-2), "pad_id must be an int >= 0"),
])
def test_sampling_config_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(SAMPLE, **changes)


def shapes_of_generate(prompts, config=SAMPLE, prompt_lengths=None):
  fn = functools.partial(sampling.generate, GRAPHDEF, config=config, prompt_lengths=prompt_lengths)
  return jax.eval_shape(fn, PARAMS, prompts, RNG)


def test_generate_input_errors():
  with pytest.raises(ValueError, match="needs 17 positions .* more than the model's max_len 16"):
    shapes_of_generate(np.zeros((B, P + 4), np.int32))
  shapes_of_generate(np.zeros((B, P + 3), np.int32))  # P + N - 1 = max_len fits.
  with pytest.raises(ValueError, match=r"integer \[batch, length\]"):
    shapes_of_generate(np.zeros((P,), np.int32))
  with pytest.raises(ValueError, match=r"integer \[batch, length\]"):
    shapes_of_generate(np.zeros((B, P), np.float32))
  with pytest.raises(ValueError, match="eos_id 48 is outside the vocabulary"):
    shapes_of_generate(PROMPTS, dataclasses.replace(SAMPLE, eos_id=V))
  with pytest.raises(ValueError, match=r"prompt_lengths must have shape \(8,\)"):
    shapes_of_generate(PROMPTS, prompt_lengths=LENGTHS[:3])
  run = generator(SAMPLE)
  for lengths in (np.where(LENGTHS == 1, 0, LENGTHS), LENGTHS + 1):
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 6\]"):
      run(PARAMS, PROMPTS, lengths, RNG)


def test_filter_and_cache_errors():
  z = jnp.zeros((2, V))
  with pytest.raises(ValueError, match="top_k must be an int >= 0"):
    sampling.top_k_filter(z, -1)
  with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
    sampling.top_p_filter(z, 0.0)
  with pytest.raises(ValueError, match="temperature must be > 0 here"):
    sampling.apply_temperature(z, 0.0)
  model = nnx.merge(GRAPHDEF, PARAMS)
  with pytest.raises(ValueError, match="cache length 17 must lie in"):
    model.init_cache(B, 17)
  cache = jax.eval_shape(lambda: model.init_cache(B, 8))
  tokens = jnp.zeros((B, 2), jnp.int32)
  with pytest.raises(ValueError, match="positions shape"):
    jax.eval_shape(model.decode_step, tokens, cache, jnp.zeros((B, 3), jnp.int32))
  with pytest.raises(ValueError, match="cache layers must be"):
    jax.eval_shape(model.decode_step, tokens[:4], cache, jnp.zeros((4, 2), jnp.int32))
  with pytest.raises(ValueError, match="cache has 1 layers"):
    jax.eval_shape(model.decode_step, tokens, cache[:1], jnp.zeros((B, 2), jnp.int32))
