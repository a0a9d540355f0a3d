"""The offline teacher cache: what it stores (against NumPy), that the batches read back are those
of the windows they belong to, that distilling from a full-vocabulary float32 cache is exactly
online distillation, and its failure modes (other settings, an unfinished build)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdjax.data import lm_pipeline, teacher_cache
from kdjax.distill import strategies
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import step as step_lib

VOCAB, SEQ = 24, 8
TEACHER = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ)
STUDENT = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=8, d_ff=16, max_len=SEQ)


@pytest.fixture(scope="module")
def teacher():
  graphdef, params = nnx.split(DecoderLM(TEACHER, rngs=nnx.Rngs(3)), nnx.Param)
  return step_lib.lm_forward(graphdef), params


def _tokens(n=8 * 11 + 1, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int32)


def test_summary_against_numpy():
  logits = np.random.default_rng(1).normal(size=(3, 5, VOCAB)) * 4
  got = jax.device_get(teacher_cache.teacher_summary(jnp.asarray(logits, jnp.float32), k=6, temperature=2.0))
  order = np.argsort(-logits, axis=-1)[..., :6]
  np.testing.assert_array_equal(got["teacher_indices"], order)
  np.testing.assert_allclose(got["teacher_values"], np.take_along_axis(logits, order, -1), rtol=1e-6)
  s = logits / 2.0
  lse = np.log(np.exp(s).sum(-1))
  p = np.exp(s - lse[..., None])
  outside = np.ones_like(p, bool)
  np.put_along_axis(outside, order, False, -1)
  np.testing.assert_allclose(got["teacher_lse"], lse, rtol=1e-6)
  np.testing.assert_allclose(got["teacher_tail"], np.log((p * outside).sum(-1)), rtol=1e-5)


def test_cache_round_trip_reuse_and_refusals(tmp_path, teacher):
  forward, params = teacher
  tokens = _tokens()
  directory = str(tmp_path / "cache")
  common = dict(tokens=tokens, seq_len=SEQ, k=5, temperature=1.5, forward=forward, params=params, vocab_size=VOCAB,
                batch_size=4, log=lambda line: None)
  built = teacher_cache.build_teacher_cache(directory, value_dtype="float32", **common)
  spec = built["spec"]
  assert not built["reused"] and spec.num_windows == 11 and spec.index_dtype == "uint8"
  assert built["bytes"] > 0 and built["seconds"] > 0

  # Every window reads back as the summary of that window's teacher logits.
  reader = teacher_cache.CachedTeacher(directory)
  ids = np.array([10, 0, 7, 3])
  window = lm_pipeline.windows_batch(ids, tokens=tokens, seq_len=SEQ)
  want = jax.device_get(teacher_cache.teacher_summary(forward(params, window)["logits"], k=5, temperature=1.5))
  got = reader(ids)
  for name in want:
    np.testing.assert_allclose(got[name].astype(np.float32), want[name], rtol=1e-5, atol=1e-6, err_msg=name)

  again = teacher_cache.build_teacher_cache(directory, value_dtype="float32", **common)
  assert again["reused"] and again["spec"] == spec
  with pytest.raises(ValueError, match=r"other settings.*'k': \(5, 6\)"):
    teacher_cache.build_teacher_cache(directory, value_dtype="float32", **dict(common, k=6))
  with pytest.raises(ValueError, match="value_dtype"):
    teacher_cache.build_teacher_cache(str(tmp_path / "other"), value_dtype="bfloat16", **common)

  half = teacher_cache.build_teacher_cache(str(tmp_path / "half"), value_dtype="float16", **common)
  # float16 logits: 2 of the 4 bytes (the file is compressed and padded, so compare the records).
  assert half["spec"].record_bytes == spec.record_bytes - 2 * SEQ * 5
  np.testing.assert_allclose(teacher_cache.CachedTeacher(str(tmp_path / "half"))(ids)["teacher_values"],
                             got["teacher_values"], rtol=2e-3, atol=2e-3)

  os.remove(os.path.join(directory, teacher_cache.SPEC))  # as if the build had been killed before its end
  with pytest.raises(FileNotFoundError, match="no finished teacher cache"):
    teacher_cache.CachedTeacher(directory)
  with pytest.raises(ValueError, match="corrupt"):
    spec.decode(b"\0" * (spec.record_bytes - 1))


def test_training_batches_carry_their_windows_teacher(tmp_path, teacher):
  forward, params = teacher
  tokens = _tokens()
  directory = str(tmp_path / "cache")
  teacher_cache.build_teacher_cache(directory, tokens=tokens, seq_len=SEQ, k=4, temperature=1.0, forward=forward,
                                    params=params, vocab_size=VOCAB, batch_size=8, log=lambda line: None)
  reader = teacher_cache.CachedTeacher(directory)
  ds = lm_pipeline.make_lm_dataset(tokens, seq_len=SEQ, batch_size=3, seed=0, shuffle=True, num_epochs=None,
                                   window_features=reader)
  for batch in [ds[i] for i in range(4)]:
    logits = forward(params, {"inputs": batch["inputs"]})["logits"]
    np.testing.assert_array_equal(batch["teacher_indices"], jax.lax.top_k(logits, 4)[1])


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_vocabulary_cache_is_online_distillation(tmp_path, teacher, tail):
  """k = V in float32: the cached strategy's loss and gradient equal online forward-KL distillation."""
  forward, params = teacher
  tokens = _tokens()
  directory = str(tmp_path / "cache")
  teacher_cache.build_teacher_cache(directory, tokens=tokens, seq_len=SEQ, k=VOCAB, temperature=2.0,
                                    forward=forward, params=params, vocab_size=VOCAB, batch_size=8,
                                    value_dtype="float32", log=lambda line: None)
  ids = np.array([1, 4, 9])
  batch = lm_pipeline.windows_batch(ids, tokens=tokens, seq_len=SEQ, window_features=teacher_cache.CachedTeacher(
      directory))
  batch["mask"][0, :3] = 0.0
  cached = strategies.strategy_from_config(ml_collections.ConfigDict(dict(
      method="teacher_cache", divergence="forward_kl", kd_weight=0.7, temperature=2.0, tail=tail, top_k=VOCAB)),
      vocab_size=VOCAB)
  online = strategies.strategy_from_config(ml_collections.ConfigDict(dict(
      divergence="forward_kl", kd_weight=0.7, temperature=2.0)), vocab_size=VOCAB)
  assert not cached.uses_teacher
  s_graph, s_params = nnx.split(DecoderLM(STUDENT, rngs=nnx.Rngs(0)), nnx.Param)
  student = step_lib.lm_forward(s_graph)
  teacher_out = forward(params, batch)
  run = lambda strategy, t_out: jax.value_and_grad(  # noqa: E731
      lambda p: strategy(student(p, batch), t_out, batch, 0), has_aux=True)(s_params)
  (loss, metrics), grads = run(cached, None)
  (want, want_metrics), want_grads = run(online, teacher_out)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for key in ("ce", "kd", "teacher_agreement"):
    np.testing.assert_allclose(metrics[key][0], want_metrics[key][0], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, want_grads)


def test_cache_config_errors():
  build = lambda **cfg: strategies.strategy_from_config(  # noqa: E731
      ml_collections.ConfigDict(dict(dict(method="teacher_cache"), **cfg)), vocab_size=VOCAB)
  with pytest.raises(ValueError, match="fused family"):
    build(divergence="adaptive_kl")
  with pytest.raises(ValueError, match="one temperature"):
    build(temperature={"kind": "linear", "init": 1.0, "end": 2.0, "steps": 10})
  with pytest.raises(ValueError, match="top_k"):
    build(top_k=VOCAB + 1)
  with pytest.raises(ValueError, match="tail policy"):
    build(tail="drop")
  with pytest.raises(ValueError, match="unknown distill config keys"):
    build(k=4)
