"""TAID: the interpolated-target loss against NumPy, its adaptive schedule against a NumPy replay of
the paper's update rule, and the stateful strategy inside the sharded step (state updated,
checkpointed and resumed)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import losses
from kdjax.distill import strategies
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib
from kdjax.train.checkpoint import RunCheckpoints

VOCAB, LENGTH, BATCH = 32, 8, 8


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_taid(zs, zt, t, temperature):
  p = _np_softmax(((1 - t) * zs + t * zt) / temperature)
  q = _np_softmax(zs / temperature)
  return -(p * np.log(q)).sum(-1), p, q


@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_taid_loss_and_gradient_against_numpy(t, temperature):
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(2, 6, 11)) * 2.0
  where = np.array([True, True, False, True, True, False])
  got = losses.taid(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), interpolation=t,
                    temperature=temperature, where=where)
  want, p, q = _np_taid(zs, zt, t, temperature)
  np.testing.assert_allclose(got, np.where(where, want, 0.0), rtol=1e-5, atol=1e-6)
  # The student leg of the target is a constant: the gradient is that of KL(p_t ‖ q), (q − p_t)/T.
  grad = jax.grad(lambda z: jnp.sum(losses.taid(z, jnp.asarray(zt, jnp.float32), interpolation=t,
                                                temperature=temperature, where=where)))(jnp.asarray(zs, jnp.float32))
  np.testing.assert_allclose(grad, np.where(where[:, None], (q - p) / temperature, 0.0), rtol=1e-5, atol=1e-6)
  if t == 1.0:  # the teacher's own distribution: forward KL plus the teacher's entropy
    kl = losses.forward_kl(zs, zt, temperature=temperature, where=where)
    entropy = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(got, np.where(where, kl + entropy, 0.0), rtol=1e-5, atol=1e-5)


def test_taid_absent_ids_stay_finite():
  zs = jnp.asarray([[0.5, -jnp.inf, 1.0, 2.0]])
  zt = jnp.asarray([[1.0, -jnp.inf, -jnp.inf, 0.0]])
  for t in (0.0, 0.5, 1.0):
    value, grad = jax.value_and_grad(lambda z: jnp.sum(losses.taid(z, zt, interpolation=t)))(zs)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), (t, value, grad)


def _np_schedule(loss_sequence, num_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True):
  """The paper's update rule, replayed in NumPy: t used at each step."""
  t, prev, momentum, used = t_start, math.inf, 0.0, []
  for step, loss in enumerate(loss_sequence):
    used.append(t)
    if math.isinf(prev):
      prev = loss
      continue
    momentum = beta * momentum + (1 - beta) * (prev - loss) / (prev + 1e-15)
    linear = t_start + (t_end - t_start) * step / num_steps
    t = min(t_end, max(linear, t + alpha * (1 / (1 + math.exp(-momentum))) * (1 - t))) if adaptive else linear
    prev = loss
  return used


@pytest.mark.parametrize("adaptive", [True, False])
def test_update_rule_against_a_numpy_replay(adaptive):
  """A falling then rising loss; α_t large enough that the adaptive term overtakes the linear one."""
  loss_sequence = [3.0, 2.5, 2.2, 2.0, 1.9, 1.85, 2.1, 2.4, 1.5, 1.2]
  strategy = strategies.TAIDDistillation(num_steps=40, alpha=0.2, adaptive=adaptive)
  state = state_lib.initial_strategy_state(strategy)
  used = []
  for step, loss in enumerate(loss_sequence):
    used.append(float(state["t"]))
    state = strategy.update_state(state, {"kd": (jnp.float32(loss * 4), jnp.float32(4))}, jnp.int32(step))
  want = _np_schedule(loss_sequence, 40, alpha=0.2, adaptive=adaptive)
  np.testing.assert_allclose(used, want, rtol=1e-6)
  linear = [0.4 + 0.6 * max(s - 1, 0) / 40 for s in range(len(loss_sequence))]
  assert all(a <= b + 1e-7 for a, b in zip(used, used[1:])) and all(u >= l - 1e-7 for u, l in zip(used, linear))
  if adaptive:
    assert used[-1] > linear[-1] + 0.01  # the falling loss pushed t ahead of the linear schedule


def test_config_builds_taid_and_rejects_bad_sections():
  config = ml_collections.ConfigDict(dict(method="taid", kd_weight=1.0, temperature=1.0,
                                          taid=dict(t_start=0.3, alpha=1e-3)))
  strategy = strategies.strategy_from_config(config, num_steps=100)
  assert isinstance(strategy, strategies.TAIDDistillation) and strategy.t_start == 0.3 and strategy.uses_teacher
  with pytest.raises(ValueError, match="num_steps"):
    strategies.strategy_from_config(config)
  with pytest.raises(ValueError, match=r"unknown distill config keys \['divergence'\] for method 'taid'"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="taid", divergence="forward_kl")),
                                    num_steps=10)
  with pytest.raises(ValueError, match="t_stat"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="taid", taid=dict(t_stat=0.1))),
                                    num_steps=10)
  with pytest.raises(ValueError, match="t_start < t_end"):
    strategies.TAIDDistillation(num_steps=10, t_start=0.9, t_end=0.5)
  with pytest.raises(ValueError, match="unknown distill method 'tiad'"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="tiad")))


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "mask": (rng.random((BATCH, LENGTH)) < 0.8).astype(np.float32)}


def test_taid_step_carries_and_checkpoints_its_state(tmp_path):
  """On 8 data-parallel devices: each step's loss is TAID's at the t in the state, t follows the
  NumPy replay of the reported losses, and a checkpoint restores t, momentum and the last loss."""
  mesh = sharding_lib.make_mesh({"data": 8})
  student = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=LENGTH)
  teacher = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=24, d_ff=48, max_len=LENGTH)
  strategy = strategies.TAIDDistillation(num_steps=6, alpha=0.3)
  optimizer = optax.sgd(0.5)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(student, rngs=nnx.Rngs(0)), mesh)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(teacher, rngs=nnx.Rngs(1)), mesh)
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh, strategy=strategy)
  step = step_lib.make_distill_step(state=state, teacher_params=t_params, mesh=mesh,
                                    student_forward=step_lib.lm_forward(s_graph),
                                    teacher_forward=step_lib.lm_forward(t_graph), strategy=strategy,
                                    optimizer=optimizer)
  seen, used = [], []
  for i in range(4):
    batch = _batch(i)
    t_now = float(state.strategy_state["t"])
    s_logits = nnx.merge(s_graph, state.params)(batch["inputs"])
    z_t = nnx.merge(t_graph, t_params)(batch["inputs"])
    want = losses.masked_mean(losses.taid(s_logits, z_t, interpolation=t_now, where=batch["mask"] > 0),
                              batch["mask"] > 0)
    state, metrics = step(state, sharding_lib.shard_batch(batch, mesh), t_params)
    np.testing.assert_allclose(float(metrics["kd"][0] / metrics["kd"][1]), float(want), rtol=1e-5)
    assert float(metrics["taid_t"][0]) == pytest.approx(t_now)
    seen.append(float(metrics["kd"][0] / metrics["kd"][1]))
    used.append(t_now)
  np.testing.assert_allclose(used, _np_schedule(seen, 6, alpha=0.3), rtol=1e-6)

  checkpoints = RunCheckpoints(str(tmp_path / "ckpt"))
  checkpoints.save(4, state)
  checkpoints.wait()
  # A fresh state (t back at t_start) as the target: the values must come from the checkpoint.
  fresh = state_lib.create_train_state(jax.tree.map(lambda x: x.copy(), state.params), optimizer, seed=0, mesh=mesh,
                                       strategy=strategy)
  assert float(fresh.strategy_state["t"]) != float(state.strategy_state["t"])
  restored, _ = checkpoints.restore(fresh)
  checkpoints.close()
  for key in ("t", "prev_loss", "momentum"):
    assert float(restored.strategy_state[key]) == float(state.strategy_state[key]), key
