"""On-policy (GKD) and sequence-level batches: which source a step uses, what the batches hold
(against direct calls of the sampler), their sharding, and that a run resumed from a checkpoint
samples exactly what an uninterrupted one does."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import losses
from kdjax.data import lm_pipeline
from kdjax.distill import strategies
from kdjax.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from kdjax.models import sampling
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import loop, sharding as sharding_lib, state as state_lib, step as step_lib
from kdjax.train.checkpoint import RunCheckpoints

VOCAB, SEQ, BATCH, PROMPT = 20, 12, 8, 4
STUDENT = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ)
TEACHER = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=24, d_ff=48, max_len=SEQ)


def test_source_choice_is_a_function_of_seed_and_step():
  config = OnPolicyConfig(student_fraction=0.5, teacher_fraction=0.2, seed=3)
  choices = [config.source(step) for step in range(4000)]
  assert choices == [config.source(step) for step in range(4000)]
  freq = {name: choices.count(name) / len(choices) for name in ("student", "teacher", "data")}
  assert abs(freq["student"] - 0.5) < 0.03 and abs(freq["teacher"] - 0.2) < 0.03, freq
  assert [OnPolicyConfig(seed=4, student_fraction=0.5).source(s) for s in range(50)] != choices[:50]
  assert not OnPolicyConfig().active and config.active
  with pytest.raises(ValueError, match="at most 1"):
    OnPolicyConfig(student_fraction=0.7, teacher_fraction=0.4)
  with pytest.raises(ValueError, match="student_fraction must lie"):
    OnPolicyConfig(student_fraction=1.5)
  with pytest.raises(ValueError, match=r"unknown on_policy config keys \['lambda_'\]"):
    OnPolicyConfig.from_config(ml_collections.ConfigDict({"lambda_": 0.5}))


def _models(mesh):
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
  return s_graph, s_params, t_graph, t_params


def _host_batch(seed=0):
  tokens = np.random.default_rng(seed).integers(0, VOCAB, BATCH * SEQ + 1).astype(np.int32)
  return lm_pipeline.windows_batch(np.arange(BATCH), tokens=tokens, seq_len=SEQ)


def _step_of(config, source):
  return next(step for step in range(1000) if config.source(step) == source)


def test_batches_from_each_source():
  mesh = sharding_lib.make_mesh({"data": 8})
  s_graph, s_params, t_graph, t_params = _models(mesh)
  config = OnPolicyConfig(student_fraction=0.4, teacher_fraction=0.3, prompt_len=PROMPT, temperature=0.8, seed=1)
  source = OnPolicyBatches(config, seq_len=SEQ, student_graphdef=s_graph, teacher_graphdef=t_graph, mesh=mesh)
  state = state_lib.create_train_state(s_params, optax.sgd(0.1), seed=0, mesh=mesh)
  host = _host_batch()
  sampler = sampling.SamplingConfig(max_new_tokens=SEQ - PROMPT + 1, temperature=0.8)

  data = source(state, host, t_params, _step_of(config, "data"))
  np.testing.assert_array_equal(data["inputs"], host["inputs"])
  assert np.all(np.asarray(data["mask"])[:, :PROMPT - 1] == 0) and np.all(np.asarray(data["mask"])[:, PROMPT - 1:] == 1)

  for name, graphdef, params in (("student", s_graph, s_params), ("teacher", t_graph, t_params)):
    step = _step_of(config, name)
    batch = source(state, host, t_params, step)
    assert batch["inputs"].sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh), 2)
    key = jax.random.fold_in(jax.random.PRNGKey(1), step)
    want = sampling.generate(graphdef, params, host["inputs"][:, :PROMPT], key, config=sampler)
    np.testing.assert_array_equal(np.asarray(batch["inputs"])[:, :PROMPT], host["inputs"][:, :PROMPT])
    np.testing.assert_array_equal(np.asarray(batch["targets"])[:, PROMPT - 1:], np.asarray(want.tokens))
    assert np.all(np.asarray(batch["mask"])[:, :PROMPT - 1] == 0) and np.all(np.asarray(batch["mask"])[:, PROMPT - 1:] == 1)
    assert not np.array_equal(np.asarray(batch["targets"])[:, PROMPT:], host["targets"][:, PROMPT:])
  assert source.counts == {"data": 1, "student": 1, "teacher": 1}

  with pytest.raises(ValueError, match="shorter than"):
    OnPolicyBatches(OnPolicyConfig(prompt_len=SEQ), seq_len=SEQ, student_graphdef=s_graph, teacher_graphdef=None,
                    mesh=mesh)


def _train(workdir, num_steps, *, stop_at=None):
  """GKD (JSD β = 0.5, λ = 0.5) for `num_steps`, checkpointing every 2 steps; resumes from `workdir`."""
  mesh = sharding_lib.make_mesh({"data": 8})
  s_graph, s_params, t_graph, t_params = _models(mesh)
  optimizer = optax.adam(1e-2)
  strategy = strategies.strategy_from_config(ml_collections.ConfigDict(dict(
      divergence="generalized_jsd", divergence_kwargs={"beta": 0.5}, kd_weight=1.0)))
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
  tokens = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.int32)
  batches = iter(lm_pipeline.make_lm_dataset(tokens, seq_len=SEQ, batch_size=BATCH, seed=0, shuffle=True,
                                             num_epochs=None))
  checkpoints = RunCheckpoints(workdir)
  if checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(state)
    loop.restore_data_state(data_state, batches)
  step = step_lib.make_distill_step(state=state, teacher_params=t_params, mesh=mesh,
                                    student_forward=step_lib.lm_forward(s_graph),
                                    teacher_forward=step_lib.lm_forward(t_graph), strategy=strategy,
                                    optimizer=optimizer)
  source = OnPolicyBatches(OnPolicyConfig(student_fraction=0.5, prompt_len=PROMPT, seed=7), seq_len=SEQ,
                           student_graphdef=s_graph, teacher_graphdef=t_graph, mesh=mesh)
  state, _ = loop.fit(state=state, step_fn=step, batches=batches, teacher_params=t_params,
                      num_steps=stop_at or num_steps, mesh=mesh, tokens_per_batch=BATCH * SEQ, log_every=2,
                      checkpoints=checkpoints, checkpoint_every=2, log=lambda line: None, prepare_batch=source)
  checkpoints.close()
  return jax.device_get(state.params), source.counts


def test_resumed_on_policy_run_samples_what_an_unbroken_one_does(tmp_path):
  unbroken, counts = _train(str(tmp_path / "unbroken"), 6)
  assert counts["student"] > 0 and counts["data"] > 0
  _train(str(tmp_path / "broken"), 6, stop_at=4)
  resumed, _ = _train(str(tmp_path / "broken"), 6)
  jax.tree.map(np.testing.assert_array_equal, resumed, unbroken)


def test_gkd_loss_counts_only_the_continuation():
  """The strategy's token count on a sampled batch is the number of continuation tokens."""
  mesh = sharding_lib.make_mesh({"data": 8})
  s_graph, s_params, t_graph, t_params = _models(mesh)
  config = OnPolicyConfig(student_fraction=1.0, prompt_len=PROMPT)
  source = OnPolicyBatches(config, seq_len=SEQ, student_graphdef=s_graph, teacher_graphdef=t_graph, mesh=mesh)
  state = state_lib.create_train_state(s_params, optax.sgd(0.1), seed=0, mesh=mesh)
  batch = source(state, _host_batch(), t_params, 0)
  strategy = strategies.LogitDistillation(losses.generalized_jsd, kd_weight=1.0, divergence_kwargs=(("beta", 0.5),))
  student = {"logits": nnx.merge(s_graph, s_params)(batch["inputs"])}
  teacher = {"logits": nnx.merge(t_graph, t_params)(batch["inputs"])}
  _, metrics = strategy(student, teacher, batch, 0)
  assert float(metrics["kd"][1]) == BATCH * (SEQ - PROMPT + 1)
