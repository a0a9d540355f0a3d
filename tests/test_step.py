"""The distillation step: sharding invariance, no retracing, strategy arithmetic, schedules."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import losses
from kdjax.distill import schedules, strategies
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib

VOCAB, LENGTH, BATCH = 32, 8, 8
STUDENT = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=LENGTH)
TEACHER = DecoderConfig(vocab_size=VOCAB, num_layers=2, num_heads=2, d_model=24, d_ff=48, max_len=LENGTH)


def _batch(seed=0, mask=None):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1))
  if mask is None:
    mask = (rng.random((BATCH, LENGTH)) < 0.7).astype(np.float32)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32), "mask": mask}


def _setup(mesh, rules=(), strategy=None):
  optimizer = optax.adamw(1e-2, weight_decay=0.0)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh, rules)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh, rules)
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
  strategy = strategy or strategies.LogitDistillation(losses.forward_kl, kd_weight=0.7, temperature=2.0)
  step = step_lib.make_distill_step(state=state, teacher_params=t_params, mesh=mesh,
                                    student_forward=step_lib.lm_forward(s_graph),
                                    teacher_forward=step_lib.lm_forward(t_graph), strategy=strategy,
                                    optimizer=optimizer)
  return state, t_params, step, (s_graph, t_graph)


def _run(mesh, rules=(), num_steps=3):
  state, t_params, step, _ = _setup(mesh, rules)
  losses_seen = []
  for i in range(num_steps):
    state, metrics = step(state, sharding_lib.shard_batch(_batch(i), mesh), t_params)
    losses_seen.append(float(metrics["loss"][0] / metrics["loss"][1]))
  return state, losses_seen


def test_eight_devices_available():
  assert jax.device_count() == 8, "tests/conftest.py must create 8 CPU devices before JAX starts"


@pytest.mark.parametrize("axes,rules", [
    ({"data": 8}, ()),
    ({"data": 4, "model": 2}, [(r".*mlp/(gate|up)", (None, "model")), (r".*mlp/down", ("model", None))]),
])
def test_sharded_step_equals_single_device(axes, rules):
  single = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  ref_state, ref_losses = _run(single)
  state, sharded_losses = _run(sharding_lib.make_mesh(axes), rules)
  np.testing.assert_allclose(sharded_losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params), rtol=1e-4, atol=1e-6)
  if rules:
    gate = state.params["blocks"][0]["mlp"]["gate"][...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_step_compiles_once():
  mesh = sharding_lib.make_mesh({"data": -1})
  optimizer = optax.sgd(0.1)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
  traced = chex.assert_max_traces(n=1)(step_lib.distill_step)
  fn = functools.partial(traced, student_forward=step_lib.lm_forward(s_graph),
                         teacher_forward=step_lib.lm_forward(t_graph),
                         strategy=strategies.LogitDistillation(losses.forward_kl), optimizer=optimizer)
  jitted = jax.jit(fn, donate_argnums=(0,))
  for i in range(4):
    state, _ = jitted(state, sharding_lib.shard_batch(_batch(i), mesh), t_params)
  assert int(state.step) == 4


def test_step_metrics_match_a_hand_computed_loss_and_gradient():
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state, t_params, step, (s_graph, t_graph) = _setup(mesh)
  params_before = jax.device_get(state.params)
  batch = _batch(5)
  mask = batch["mask"].astype(bool)

  def reference_loss(params):
    zs = nnx.merge(s_graph, params)(batch["inputs"])
    zt = nnx.merge(t_graph, t_params)(batch["inputs"])
    p = jax.nn.softmax(zt / 2.0)
    kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(zs / 2.0)), -1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(zs), batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(jnp.where(mask, 0.3 * ce + 0.7 * kl, 0.0)) / mask.sum()

  expected_loss, expected_grads = jax.value_and_grad(reference_loss)(params_before)
  teacher_before = jax.device_get(t_params)
  state, metrics = step(state, sharding_lib.shard_batch(batch, mesh), t_params)
  np.testing.assert_allclose(float(metrics["loss"][0] / metrics["loss"][1]), expected_loss, rtol=1e-5)
  expected_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(expected_grads)))
  np.testing.assert_allclose(float(metrics["grad_norm"][0]), expected_norm, rtol=1e-4)
  assert float(metrics["loss"][1]) == mask.sum()
  # The teacher is an input, not state: the step neither changes nor consumes it.
  chex.assert_trees_all_equal(jax.device_get(t_params), teacher_before)


def test_all_masked_batch_gives_zero_loss_and_gradient():
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state, t_params, step, _ = _setup(mesh)
  batch = _batch(0, mask=np.zeros((BATCH, LENGTH), np.float32))
  state, metrics = step(state, sharding_lib.shard_batch(batch, mesh), t_params)
  assert float(metrics["loss"][0]) == 0.0 and float(metrics["loss"][1]) == 0.0
  assert float(metrics["grad_norm"][0]) == 0.0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(jax.device_get(state.params)))


def test_ce_only_strategy_never_runs_the_teacher():
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  optimizer = optax.sgd(0.1)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
  step = step_lib.make_distill_step(state=state, teacher_params=None, mesh=mesh,
                                    student_forward=step_lib.lm_forward(s_graph), teacher_forward=None,
                                    strategy=strategies.LogitDistillation(divergence=None), optimizer=optimizer)
  state, metrics = step(state, sharding_lib.shard_batch(_batch(0), mesh), None)
  assert "kd" not in metrics and np.isfinite(float(metrics["loss"][0]))


def test_uneven_masks_average_per_token_not_per_shard():
  """Two shards with 1 and 9 kept tokens: the (sum, count) mean weights every token equally."""
  values = jnp.arange(20.0).reshape(2, 10)
  mask = jnp.zeros((2, 10), bool).at[0, :1].set(True).at[1, :9].set(True)
  per_shard = [losses.masked_sum_count(values[i], mask[i]) for i in range(2)]
  pooled = losses.safe_mean(sum(s for s, _ in per_shard), sum(c for _, c in per_shard))
  expected = values[mask].mean()
  np.testing.assert_allclose(pooled, expected, rtol=1e-6)
  mean_of_means = np.mean([losses.safe_mean(s, c) for s, c in per_shard])
  assert abs(mean_of_means - expected) > 1.0


def test_schedules():
  np.testing.assert_allclose(schedules.make_schedule(0.3)(17), 0.3)
  linear = schedules.make_schedule({"kind": "linear", "init": 1.0, "end": 3.0, "steps": 10})
  np.testing.assert_allclose([linear(0), linear(5), linear(20)], [1.0, 2.0, 3.0])
  warm = schedules.make_schedule({"kind": "warmup_constant", "value": 8.0, "warmup_steps": 4})
  np.testing.assert_allclose([warm(0), warm(2), warm(4), warm(100)], [0.0, 4.0, 8.0, 8.0])
  with pytest.raises(ValueError, match="unknown schedule kind"):
    schedules.make_schedule({"kind": "exp"})
  with pytest.raises(ValueError, match="bad arguments"):
    schedules.make_schedule({"kind": "linear", "init": 1.0, "ends": 2.0, "steps": 3})


def test_strategy_schedules_are_applied_at_the_step():
  strategy = strategies.strategy_from_config(ml_collections.ConfigDict(dict(
      divergence="forward_kl", kd_weight={"kind": "linear", "init": 0.0, "end": 1.0, "steps": 10}, temperature=2.0)))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
  teacher = logits[::-1]
  batch = {"targets": jnp.zeros((2, 3), jnp.int32), "mask": jnp.ones((2, 3))}
  loss_0, m0 = strategy({"logits": logits}, {"logits": teacher}, batch, 0)
  loss_10, m10 = strategy({"logits": logits}, {"logits": teacher}, batch, 10)
  np.testing.assert_allclose(loss_0, m0["ce"][0] / 6, rtol=1e-6)
  np.testing.assert_allclose(loss_10, m10["kd"][0] / 6, rtol=1e-6)
  np.testing.assert_allclose(m10["kd"][0] / 6, losses.forward_kl(logits, teacher, temperature=2.0).mean(), rtol=1e-6)


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown divergence 'kl'"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(divergence="kl")))
  with pytest.raises(ValueError, match="unknown distill config keys"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(divergence="forward_kl", temprature=2.0)))
  with pytest.raises(ValueError, match="not divisible"):
    sharding_lib.check_batch_size(12, sharding_lib.make_mesh({"data": 8}))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding_lib.make_mesh({"data": 16})
  with pytest.raises(ValueError, match="not divisible by mesh axis"):
    mesh = sharding_lib.make_mesh({"data": 1, "model": 8})
    # attn/q is [d_model 16, heads 2, head_dim 8]: 2 heads cannot split over 8 devices.
    state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh, [(r".*attn/q", (None, "model"))])


@pytest.mark.parametrize("implementation", ["tiled", "naive"])
def test_fused_head_step_equals_the_logits_step(implementation):
  """`HeadDistillation` (hidden states + heads, logits formed chunk by chunk) takes the same step as
  `LogitDistillation` on materialised logits, on 8 data-parallel devices."""
  mesh = sharding_lib.make_mesh({"data": 8})
  config = dict(divergence="generalized_jsd", divergence_kwargs={"beta": 0.3}, kd_weight=0.6, temperature=2.0)
  results = []
  for fused_head in (False, True):
    strategy = strategies.strategy_from_config(ml_collections.ConfigDict(dict(
        config, fused_head=fused_head, implementation=implementation if fused_head else "naive")))
    assert strategy.uses_head == fused_head
    optimizer = optax.sgd(0.1)
    s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
    t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
    state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
    step = step_lib.make_distill_step(
        state=state, teacher_params=t_params, mesh=mesh, student_forward=step_lib.lm_forward(s_graph, head=fused_head),
        teacher_forward=step_lib.lm_forward(t_graph, head=fused_head), strategy=strategy, optimizer=optimizer)
    for i in range(2):
      state, metrics = step(state, sharding_lib.shard_batch(_batch(i), mesh), t_params)
    results.append((jax.device_get(state.params), {k: float(metrics[k][0]) for k in ("loss", "ce", "kd", "grad_norm")}))
  (logit_params, logit_metrics), (head_params, head_metrics) = results
  for key in logit_metrics:
    np.testing.assert_allclose(head_metrics[key], logit_metrics[key], rtol=1e-5, err_msg=key)
  chex.assert_trees_all_close(head_params, logit_params, rtol=1e-5, atol=1e-6)


def test_fused_head_auto_follows_the_vocabulary_and_the_loss():
  build = lambda vocab_size, **cfg: strategies.strategy_from_config(  # noqa: E731
      ml_collections.ConfigDict(dict(dict(divergence="forward_kl"), **cfg)), vocab_size=vocab_size)
  large = strategies.FUSED_HEAD_MIN_VOCAB
  assert not build(256).uses_head and not build(None).uses_head
  assert build(large).uses_head and build(large, fused_head="auto").uses_head
  assert not build(large, fused_head="False").uses_head and build(256, fused_head="True").uses_head
  # A loss the fused head cannot compute keeps the logits under 'auto'.
  assert not build(large, divergence="adaptive_kl").uses_head
  assert not build(large, label_smoothing=0.1).uses_head
  with pytest.raises(ValueError, match="fused_head must be"):
    build(large, fused_head="sometimes")


def test_fused_head_config_errors():
  with pytest.raises(ValueError, match="fused family"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(divergence="adaptive_kl", fused_head=True)))
  with pytest.raises(ValueError, match="label_smoothing"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(divergence="forward_kl", fused_head=True,
                                                                   label_smoothing=0.1)))


class _LearnedTemperatureKD:
  """A toy strategy with its own trainable parameter: forward KL at T = exp(log_t)."""

  uses_teacher, uses_head = True, False

  def init_params(self, key):
    del key
    return {"log_t": jnp.zeros(())}

  def __call__(self, student_out, teacher_out, batch, step, *, params):
    mask = batch["mask"].astype(bool)
    kd = losses.forward_kl(student_out["logits"], teacher_out["logits"], temperature=jnp.exp(params["log_t"]),
                           where=mask)
    total = losses.masked_sum_count(kd, mask)
    return losses.safe_mean(*total), {"loss": total, "ce": total}


def test_strategy_params_are_trained_with_the_student_and_checkpointed(tmp_path):
  from kdjax.train.checkpoint import RunCheckpoints

  strategy = _LearnedTemperatureKD()
  results = []
  for mesh in (sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]), sharding_lib.make_mesh({"data": 8})):
    optimizer = optax.sgd(0.1)
    s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
    t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
    state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh, strategy=strategy)
    step = step_lib.make_distill_step(state=state, teacher_params=t_params, mesh=mesh,
                                      student_forward=step_lib.lm_forward(s_graph),
                                      teacher_forward=step_lib.lm_forward(t_graph), strategy=strategy,
                                      optimizer=optimizer)
    before = jax.device_get((state.params, state.strategy_params))
    batch = _batch(3)
    mask = batch["mask"].astype(bool)

    def reference(params, log_t):  # the same loss written out, differentiated by hand-held jax.grad
      t = jnp.exp(log_t)
      p = jax.nn.softmax(nnx.merge(t_graph, t_params)(batch["inputs"]) / t)
      logq = jax.nn.log_softmax(nnx.merge(s_graph, params)(batch["inputs"]) / t)
      return jnp.sum(jnp.where(mask, jnp.sum(p * (jnp.log(p) - logq), -1), 0.0)) / mask.sum()

    g_params, g_log_t = jax.grad(reference, argnums=(0, 1))(before[0], before[1]["log_t"])
    state, _ = step(state, sharding_lib.shard_batch(batch, mesh), t_params)
    assert abs(float(g_log_t)) > 1e-6  # the toy's temperature does get a gradient
    np.testing.assert_allclose(float(state.strategy_params["log_t"]), -0.1 * float(g_log_t), rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(jax.device_get(state.params),
                                jax.tree.map(lambda p, g: p - 0.1 * g, before[0], g_params), rtol=1e-4, atol=1e-6)
    results.append(jax.device_get(state))

    checkpoints = RunCheckpoints(str(tmp_path / f"run{len(results)}"))
    checkpoints.save(1, state)
    checkpoints.wait()
    fresh = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh, strategy=strategy)
    restored, _ = checkpoints.restore(fresh)
    checkpoints.close()
    assert float(restored.strategy_params["log_t"]) == float(state.strategy_params["log_t"])
  chex.assert_trees_all_close(results[0].strategy_params, results[1].strategy_params, rtol=1e-5)


def test_a_strategy_without_params_keeps_the_plain_optimizer_layout():
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state, *_ = _setup(mesh)
  assert state.strategy_params == {}
  mu = state.opt_state[0].mu
  assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(state.params)


def test_runs_of_one_architecture_share_one_compiled_eval_program():
  """Two students of one architecture (other seeds, built apart) evaluate with one jitted program,
  which still measures each with its own weights; another architecture gets its own."""
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  batch = sharding_lib.shard_batch(_batch(0), mesh)
  steps, ces = [], []
  for seed in (0, 5):
    graph, params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(seed)), mesh)  # noqa: B023
    steps.append(step_lib.make_eval_step(params=params, teacher_params=None, mesh=mesh,
                                         student_forward=step_lib.lm_forward(graph), teacher_forward=None))
    metrics = steps[-1](params, batch, None)
    logits = np.asarray(nnx.merge(graph, params)(jnp.asarray(batch["inputs"])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["mask"])
    np.testing.assert_allclose(float(metrics["ce"][0] / metrics["ce"][1]), (nll * mask).sum() / mask.sum(), rtol=1e-5)
    ces.append(float(metrics["ce"][0]))
  assert steps[0] is steps[1] and ces[0] != ces[1]
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
  other = step_lib.make_eval_step(params=t_params, teacher_params=None, mesh=mesh,
                                  student_forward=step_lib.lm_forward(t_graph), teacher_forward=None)
  assert other is not steps[0]
