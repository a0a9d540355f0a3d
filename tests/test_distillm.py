"""DistiLLM's adaptive off-policy batch source (threshold, replay buffer, exact resume) and
DistiLLM-2's paired batches and contrastive objective, against direct references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax.data import lm_pipeline
from kdjax.distill import strategies
from kdjax.distill.distillm import (AdaptiveOffPolicyBatches, AdaptiveOffPolicyConfig, ContrastiveBatches,
                                    DistiLLM2Distillation)
from kdjax.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib, state as state_lib

VOCAB, SEQ, BATCH, PROMPT = 20, 12, 8, 4
STUDENT = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ)
TEACHER = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=24, d_ff=48, max_len=SEQ)


@pytest.fixture(scope="module")
def setup():
  mesh = sharding_lib.make_mesh({"data": 8})
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
  state = state_lib.create_train_state(s_params, optax.sgd(0.1), seed=0, mesh=mesh)
  return mesh, s_graph, t_graph, t_params, state


def _host_batch(step):
  tokens = np.random.default_rng(step).integers(0, VOCAB, BATCH * SEQ + 1).astype(np.int32)
  return lm_pipeline.windows_batch(np.arange(BATCH), tokens=tokens, seq_len=SEQ)


def _adaptive(setup, losses_seen, **config):
  mesh, s_graph, _, _, _ = setup
  scripted = iter(losses_seen)
  return AdaptiveOffPolicyBatches(
      AdaptiveOffPolicyConfig(**dict(dict(eval_every=2, buffer_size=20, reuse_fraction=0.5), **config)),
      OnPolicyConfig(prompt_len=PROMPT, seed=5), seq_len=SEQ, student_graphdef=s_graph, mesh=mesh,
      validation_loss=lambda params, teacher_params: next(scripted))


def test_threshold_follows_the_validation_loss(setup):
  _, _, _, t_params, state = setup
  # Evaluations at steps 0, 2, 4, ...: a rise of ≥ 0.1 raises θ by 0.1 (never above max_threshold).
  scripted = [3.0, 2.5, 2.7, 2.65, 2.9, 3.5, 3.4, 3.6, 3.8]
  source = _adaptive(setup, scripted, threshold_step=0.1, max_threshold=0.25, loss_eps=0.1)
  thresholds = []
  for step in range(0, 2 * len(scripted), 2):
    source(state, _host_batch(step), t_params, step)
    thresholds.append(source.threshold)
  np.testing.assert_allclose(thresholds, [0, 0, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.25])


def test_sources_buffer_and_resume(setup):
  _, _, _, t_params, state = setup
  source = _adaptive(setup, [10.0] + [10.0 + i for i in range(1, 40)], threshold_step=0.5, max_threshold=0.8)
  batches = [source(state, _host_batch(step), t_params, step) for step in range(10)]
  assert source.counts["student"] > 0 and source.counts["replay"] > 0 and source.counts["data"] > 0
  buffer = source.get_state()["buffer"]
  assert len(buffer["inputs"]) == 20  # FIFO at capacity
  seen = {tuple(row) for row in np.asarray(buffer["targets"]).tolist()}
  assert all(np.asarray(batch["mask"])[:, :PROMPT - 1].sum() == 0 for batch in batches)

  # A source restored from the state continues exactly like the original.
  clone = _adaptive(setup, [10.0 + i for i in range(6, 40)], threshold_step=0.5, max_threshold=0.8)
  clone.set_state(source.get_state())
  for step in range(10, 16):
    want = source(state, _host_batch(step), t_params, step)
    got = clone(state, _host_batch(step), t_params, step)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  replayed = [s for s in range(10, 16) if np.random.default_rng([5, s, 1]).random() < source.threshold]
  assert replayed and seen  # the later steps drew student batches too


def test_contrastive_batches_pair_teacher_and_student_samples(setup):
  mesh, s_graph, t_graph, t_params, state = setup
  sampling = OnPolicyConfig(prompt_len=PROMPT, seed=2)
  paired = ContrastiveBatches(sampling, seq_len=SEQ, student_graphdef=s_graph, teacher_graphdef=t_graph, mesh=mesh)
  batch = jax.device_get(paired(state, _host_batch(0), t_params, 3))
  np.testing.assert_array_equal(batch["is_student"], np.repeat([0.0, 1.0], BATCH))
  for offset, name in ((0, "teacher"), (BATCH, "student")):
    one = OnPolicyBatches(OnPolicyConfig(prompt_len=PROMPT, seed=2, student_fraction=float(name == "student"),
                                         teacher_fraction=float(name == "teacher")), seq_len=SEQ,
                          student_graphdef=s_graph, teacher_graphdef=t_graph, mesh=mesh)
    want = jax.device_get(one(state, _host_batch(0), t_params, 3))
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(batch[key][offset:offset + BATCH], want[key])


def test_distillm2_objective():
  rng = np.random.default_rng(0)
  zs, zt = (jnp.asarray(rng.normal(size=(4, 6, 9)) * 2, jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((4, 6)) < 0.8, jnp.float32)
  is_student = jnp.asarray([0.0, 1.0, 0.0, 1.0])
  batch = {"mask": mask, "is_student": is_student, "targets": jnp.asarray(rng.integers(0, 9, (4, 6)))}
  strategy = DistiLLM2Distillation(alpha=0.1, beta=0.6)
  loss_fn = lambda z: strategy({"logits": z}, {"logits": zt}, batch, 0)  # noqa: E731
  loss, metrics = loss_fn(zs)

  p, q = jax.nn.softmax(zt), jax.nn.softmax(zs)
  skl = jnp.sum(p * (jnp.log(p) - jnp.log(0.1 * p + 0.9 * q)), -1)
  srkl = jnp.sum(q * (jnp.log(q) - jnp.log(0.9 * p + 0.1 * q)), -1)
  teacher_rows, student_rows = mask * (1 - is_student)[:, None], mask * is_student[:, None]
  want = (1.4 * jnp.sum(skl * teacher_rows) + 0.6 * jnp.sum(srkl * student_rows)) / jnp.sum(mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["srkl"][0], jnp.sum(srkl * student_rows), rtol=1e-5)

  # The SRKL mixture's student term is a constant: on student rows the gradient is that of
  # KL(q ‖ m) with m fixed, q ⊙ (log q − log m) − q · Σ q (log q − log m).
  only_student = dict(batch, is_student=jnp.ones(4))
  grad = jax.grad(lambda z: strategy({"logits": z}, {"logits": zt}, only_student, 0)[0])(zs)
  log_ratio = jnp.log(q) - jnp.log(0.9 * p + 0.1 * q)
  analytic = q * log_ratio - q * jnp.sum(q * log_ratio, -1, keepdims=True)
  np.testing.assert_allclose(grad, strategy.beta * analytic * mask[..., None] / jnp.sum(mask), rtol=1e-4, atol=1e-7)


def test_distillm2_config():
  strategy = strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="distillm2", beta=0.5)))
  assert isinstance(strategy, DistiLLM2Distillation) and strategy.beta == 0.5
  with pytest.raises(ValueError, match="beta must lie"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="distillm2", beta=3.0)))
  with pytest.raises(ValueError, match="eval_every"):
    AdaptiveOffPolicyConfig(eval_every=0)
