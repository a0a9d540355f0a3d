"""Invariants of the decoder LM: shapes, causality, GQA, tying, pure form, soft-cap, sharding.

Compilation dominates the run time on CPU, so most tests share one configuration (`BASE`, with
grouped-query attention) and go through `run`, which compiles once per configuration and method.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import DecoderConfig, DecoderLM, count_params, init_decoder
from kdjax.models import decoder

V = 64
BASE_ARGS = dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64,
                 max_len=16)
BASE = DecoderConfig(**BASE_ARGS)
# Every optional parameter switched on, so tests can see each one take part.
FULL_ARGS = dict(qkv_bias=True, qk_norm=True, norm="layernorm", tie_embeddings=True)


def config(**overrides) -> DecoderConfig:
  # Not dataclasses.replace: that would carry BASE's filled-in head_dim over.
  return DecoderConfig(**{**BASE_ARGS, **overrides})


def tokens(batch=2, length=12, vocab=V, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pure(graphdef, method, state, x):
  return getattr(nnx.merge(graphdef, state), method)(x)


def run(model, x, method="__call__"):
  """`model.method(x)`, jitted through the pure form; eager NNX would compile op by op."""
  graphdef, state = nnx.split(model)
  return _pure(graphdef, method, state, x)


def next_token_loss(graphdef, state, x):
  logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(x)[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))


@functools.partial(jax.jit, static_argnums=0)
@chex.assert_max_traces(n=1)  # Only ever called on FULL, with one input shape: one trace.
def loss_and_grad(graphdef, state, x):
  return jax.value_and_grad(next_token_loss, argnums=1)(graphdef, state, x)


@pytest.fixture(scope="module")
def model():
  return init_decoder(BASE, seed=0)


def test_shapes_and_dtypes(model):
  x = tokens()
  logits = run(model, x)
  chex.assert_shape(logits, (2, 12, V))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  chex.assert_shape(run(model, x, "features"), (2, 12, BASE.d_model))
  chex.assert_shape(model.head_weights(), (BASE.d_model, V))


def test_logits_are_features_times_head(model):
  x = tokens()
  expected = np.asarray(run(model, x, "features")) @ np.asarray(model.head_weights())
  np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, FULL_ARGS])
def test_init_gives_unit_scale_logits(overrides):
  # Unit-RMS features against a head of std d_model**-0.5: logits of std ~1 whether or not the
  # head is tied, so training starts near log(V) rather than from confident nonsense.
  logits = run(init_decoder(config(**overrides), seed=0), tokens(batch=8))
  assert 0.7 < float(jnp.std(logits, axis=-1).mean()) < 1.4


def test_init_is_seeded():
  x = tokens()
  logits = lambda seed: run(init_decoder(BASE, seed), x)  # noqa: E731
  np.testing.assert_array_equal(logits(3), logits(3))
  assert not np.allclose(logits(3), logits(4))
  np.testing.assert_array_equal(run(DecoderLM(BASE, rngs=nnx.Rngs(3)), x), logits(3))


@pytest.mark.parametrize("t", [0, 5, 11])
def test_causal(model, t):
  x = tokens()
  y = x.at[:, t].set((x[:, t] + 1) % V)
  before, after = run(model, x), run(model, y)
  np.testing.assert_allclose(before[:, :t], after[:, :t], atol=1e-6)
  # The changed token must matter where it is visible, or the check above proves nothing.
  assert np.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads(model):
  # Key/value head j serves query heads j*G .. (j+1)*G-1 (Hugging Face `repeat_kv`), so an MHA
  # model whose k/v kernels repeat each GQA head G times in a row gives the same logits.
  assert model.blocks[0].attn.k.shape == (32, 2, 8)
  mha = init_decoder(config(num_kv_heads=4), seed=1)
  gqa_params = dict(nnx.to_flat_state(nnx.state(model)))
  mha_state = nnx.state(mha)
  for path, var in nnx.to_flat_state(mha_state):
    value = gqa_params[path][...]
    var.set_value(jnp.repeat(value, 2, axis=1) if path[-1] in ("k", "v") else value)
  nnx.update(mha, mha_state)
  x = tokens()
  np.testing.assert_allclose(run(model, x), run(mha, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_param_count(kv):
  c = config(num_kv_heads=kv)
  d, hd = c.d_model, c.head_dim
  per_block = (2 * d * c.num_heads * hd + 2 * d * kv * hd  # q, o; k, v
               + 3 * d * c.d_ff + 2 * d)                # SwiGLU; two norm scales
  expected = 2 * V * d + c.num_layers * per_block + d   # embedding and head; final norm
  assert count_params(init_decoder(c, seed=0)) == expected


def test_tied_embeddings_share_one_parameter():
  tied = init_decoder(config(**FULL_ARGS), seed=0)
  untied = init_decoder(config(**{**FULL_ARGS, "tie_embeddings": False}), seed=0)
  assert tied.lm_head is None
  assert count_params(untied) - count_params(tied) == V * BASE.d_model
  np.testing.assert_array_equal(tied.head_weights(), tied.embedding[...].T)

  # Tokens V/2 .. V-1 never appear in the input, so their embedding rows get gradient only
  # through the head: a tied model must deliver it there.
  graphdef, state = nnx.split(tied)
  _, grad = loss_and_grad(graphdef, state, tokens(vocab=V // 2))
  assert np.abs(grad["embedding"][...][V // 2:]).min(axis=-1).max() > 0


def test_split_merge_round_trip_and_pure_form_under_jit_and_grad():
  model = init_decoder(config(**FULL_ARGS), seed=0)
  x = tokens()
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state)
  chex.assert_trees_all_equal(nnx.state(merged), state)
  np.testing.assert_array_equal(run(merged, x), run(model, x))

  value, grad = loss_and_grad(graphdef, state, x)
  # A second model's split has an equal graphdef: the jitted pure function is reused as is.
  other_graphdef, other_state = nnx.split(init_decoder(config(**FULL_ARGS), seed=1))
  value_again, _ = loss_and_grad(other_graphdef, other_state, tokens(seed=1))
  assert np.isfinite(value) and np.isfinite(value_again)
  chex.assert_trees_all_equal_shapes(grad, state)
  chex.assert_tree_all_finite(grad)
  # Biases and norm offsets start at zero, but none of them has a zero gradient.
  for path, g in nnx.to_flat_state(grad):
    assert np.abs(g[...]).max() > 0, path


def test_softcap_bounds_logits(model):
  cap = 5.0
  capped = init_decoder(config(logit_softcap=cap), seed=0)
  # Blow the head up so that uncapped logits run far past the cap.
  capped.lm_head.set_value(capped.lm_head[...] * 100.0)
  uncapped = init_decoder(BASE, seed=0)
  nnx.update(uncapped, nnx.state(capped))
  x = tokens()
  logits, raw = run(capped, x), run(uncapped, x)
  assert np.abs(raw).max() > 10 * cap
  assert np.abs(logits).max() <= cap
  np.testing.assert_allclose(logits, cap * np.tanh(raw / cap), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(model):
  low = init_decoder(config(dtype=jnp.bfloat16), seed=0)
  x = tokens()
  assert jax.eval_shape(low.features, x).dtype == jnp.bfloat16
  for _, var in nnx.to_flat_state(nnx.state(low, nnx.Param)):
    assert var[...].dtype == jnp.float32
  logits = run(low, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, run(model, x), atol=0.1)


rope = jax.jit(decoder.rope, static_argnums=1)


def test_rope_is_identity_at_position_zero_and_keeps_norms():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  y = rope(x, 10_000.0)
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 8))
  # Row i of `rotated` is q or k placed at position i.
  rotated_q = rope(jnp.broadcast_to(q, (1, 10, 1, 8)), 100.0)[0, :, 0]
  rotated_k = rope(jnp.broadcast_to(k, (1, 10, 1, 8)), 100.0)[0, :, 0]
  score = lambda i, j: float(rotated_q[i] @ rotated_k[j])  # noqa: E731
  np.testing.assert_allclose(score(5, 2), score(8, 5), rtol=1e-4)
  np.testing.assert_allclose(score(3, 3), float(q @ k), rtol=1e-4)
  assert not np.isclose(score(5, 2), score(5, 4))


def test_input_shape_errors(model):
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(model, tokens(length=17))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    jax.eval_shape(model, tokens()[0])


def test_every_parameter_names_its_logical_axes():
  full = init_decoder(config(**FULL_ARGS), seed=0)
  for path, var in nnx.to_flat_state(nnx.state(full, nnx.Param)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var[...].ndim, path
    assert set(axes) <= set(decoder.LOGICAL_AXES), path


def test_sharded_forward_equals_unsharded(model):
  x = tokens(batch=4)
  expected = run(model, x)
  # Auto axes: XLA propagates the parameter shardings through the model (GSPMD), which is how
  # the logical names are meant to be used; the model itself sets no activation shardings.
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = [("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
           ("embed", None), ("head_dim", None), ("norm", None)]
  graphdef, state = nnx.split(model)
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
  state = jax.device_put(state, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs))
  assert state["blocks"][0]["mlp"]["up"][...].sharding.spec == jax.P(None, "model")
  assert state["embedding"][...].sharding.spec == jax.P("model", None)
  x = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, x)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=30), "d_model .* divisible by num_heads"),
    (dict(num_kv_heads=3), "num_heads .* divisible by num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads must be a positive int"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(vocab_size=-1), "vocab_size must be a positive int"),
    (dict(d_ff=2.5), "d_ff must be a positive int"),
    (dict(head_dim=7), "head_dim must be a positive even int"),
    (dict(d_model=12, num_heads=4), "head_dim must be a positive even int"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
    (dict(param_dtype="not-a-dtype"), "param_dtype is not a dtype"),
])
def test_config_validation(overrides, message):
  with pytest.raises(ValueError, match=message):
    config(**overrides)


def test_config_defaults_are_filled_in():
  c = DecoderConfig(vocab_size=V, num_layers=1, num_heads=4, d_model=32, d_ff=64, max_len=8)
  assert c.num_kv_heads == c.num_heads == 4
  assert c.head_dim == 8
  # An explicit head_dim frees d_model from divisibility, as in Qwen3.
  assert config(d_model=30, head_dim=8).head_dim == 8
  hash(c)  # The config is static in the graphdef, so it must stay hashable.
