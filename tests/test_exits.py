"""Exit-branch distillation (OFA-KD, Be Your Own Teacher), the OFA loss, and the student's EMA as teacher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import vision_methods
from kdjax import losses
from kdjax.distill import exit_branches, exits
from kdjax.losses.ofa import ofa_loss
from kdjax.models.vision import registry
from kdjax.train import sharding as sharding_lib, state as state_lib, step as step_lib

SHAPE = (8, 8, 1)
K = 10


def _model(name, seed):
  return lambda: registry.vision_model(name, num_classes=K, rngs=nnx.Rngs(seed), input_shape=SHAPE)


def _shapes(name):
  return registry.activation_shapes(nnx.eval_shape(_model(name, 0)), SHAPE)


def _batch(seed=0, b=16):
  rng = np.random.default_rng(seed)
  return {"images": rng.normal(size=(b, *SHAPE)).astype(np.float32), "targets": rng.integers(0, K, b).astype(np.int32),
          "mask": np.ones(b, np.float32)}


def _section(method):
  section = dict(vision_methods.distill_section(method, steps=10))
  assert section.pop("strategy") == ("ema" if method == "ema" else "exits")
  return section


@pytest.fixture(scope="module")
def mesh():
  return sharding_lib.make_mesh({"data": -1})


# --- the OFA loss -----------------------------------------------------------------------------------

def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_ofa(zs, zt, labels, gamma, temperature):
  """The paper's split: target class weighted (1 + p_y)^γ − 1, the others p_c^γ (float64 loops)."""
  q, p = _np_softmax(zs / temperature), _np_softmax(zt / temperature)
  out = np.zeros(len(zs))
  for b, y in enumerate(labels):
    out[b] = -((1.0 + p[b, y]) ** gamma - 1.0) * np.log(q[b, y])
    out[b] -= sum(p[b, c] ** gamma * np.log(q[b, c]) for c in range(zs.shape[1]) if c != y)
  return out


@pytest.mark.parametrize("gamma,temperature", [(1.5, 1.0), (2.0, 2.0), (0.7, 1.0)])
def test_ofa_loss_matches_the_formula(gamma, temperature):
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(6, 7)) * 2, rng.normal(size=(6, 7)) * 3
  labels = rng.integers(0, 7, 6)
  mask = np.array([1, 1, 0, 1, 1, 0], bool)
  got = ofa_loss(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(labels), gamma=gamma,
                 temperature=temperature, where=jnp.asarray(mask))
  want = np.where(mask, _np_ofa(zs, zt, labels, gamma, temperature), 0.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # With the hard-label CE the sum is the paper's −(1 + p_y)^γ log q_y − Σ_{c≠y} p_c^γ log q_c.
  ce = losses.cross_entropy(jnp.asarray(zs, jnp.float32), jnp.asarray(labels))
  q, p = _np_softmax(zs), _np_softmax(zt)
  rows = np.arange(6)
  paper = -(1 + p[rows, labels]) ** gamma * np.log(q[rows, labels]) - np.sum(
      np.where(np.eye(7, dtype=bool)[labels], 0.0, p**gamma * np.log(q)), -1)
  ours = ofa_loss(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(labels), gamma=gamma)
  np.testing.assert_allclose(ce + ours, paper, rtol=2e-5)


def test_ofa_at_gamma_one_is_soft_cross_entropy():
  """γ = 1: L = KL(p ‖ q) + H(p), so L − H(p) is Hinton KD / T² and the student gradients agree."""
  rng = np.random.default_rng(1)
  zs, zt = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32), jnp.asarray(rng.normal(size=(5, 9)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 9, 5))
  t = 3.0
  p = _np_softmax(np.asarray(zt, np.float64) / t)
  entropy = -np.sum(p * np.log(p), -1)
  ofa = ofa_loss(zs, zt, labels, gamma=1.0, temperature=t)
  np.testing.assert_allclose(ofa - entropy, losses.hinton_kd(zs, zt, temperature=t) / t**2, rtol=1e-4, atol=1e-6)
  g_ofa = jax.grad(lambda z: jnp.sum(ofa_loss(z, zt, labels, gamma=1.0, temperature=t)))(zs)
  g_kd = jax.grad(lambda z: jnp.sum(losses.hinton_kd(z, zt, temperature=t)) / t**2)(zs)
  np.testing.assert_allclose(g_ofa, g_kd, rtol=1e-4, atol=1e-6)


def test_ofa_bad_input_is_named():
  z = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="gamma must be > 0"):
    ofa_loss(z, z, jnp.zeros(3, jnp.int32), gamma=0.0)
  with pytest.raises(ValueError, match="labels shape"):
    ofa_loss(z, z, jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="vocab mismatch"):
    ofa_loss(z, jnp.zeros((3, 5)), jnp.zeros(3, jnp.int32))


# --- exit branches ----------------------------------------------------------------------------------

def _activations(name, names, seed=0):
  graphdef, state = nnx.split(_model(name, 0)())
  # Jitted: an eager forward dispatches op by op, far slower on these shared CPUs than compiling it.
  forward = jax.jit(step_lib.classifier_forward(graphdef, features=names))
  return forward(state, jax.tree_util.tree_map(jnp.asarray, _batch(seed)))


@functools.lru_cache(maxsize=None)
def _jitted_branch(branch):
  return jax.jit(lambda p, x, w: exit_branches.apply_branch(branch, p, x, where=w))


def _apply(branch, params, x, where=None):
  return _jitted_branch(branch)(params, x, where)


def test_branch_shapes_for_a_resnet_and_a_vit():
  """Each exit halves its map down to the deepest stage's size and ends at W features, K logits."""
  resnet = exits.exit_strategy({}, student_shapes=_shapes("resnet8"), teacher_shapes=_shapes("resnet14"),
                               num_classes=K)
  # 8×8 digits: stages of 8, 4, 2 pixels → 2, 1, 0 SepConv blocks; W = max(64, 64).
  assert [(b.source, b.num_down, b.channels) for b in resnet.branches] == [
      ("stage1", 2, (16, 32, 64)), ("stage2", 1, (32, 64)), ("stage3", 0, (64,))]
  vit = exits.exit_strategy({"exits": ["block1", "block3"], "width": 48}, student_shapes=_shapes("deit"),
                            teacher_shapes=None, num_classes=K)
  # DeiT: a class and a distillation token before a 2×2 patch grid; its blocks share one grid.
  assert [(b.in_shape, b.prefix_tokens, b.num_down) for b in vit.branches] == [((6, 64), 2, 0)] * 2
  for model, strategy in (("resnet8", resnet), ("deit", vit)):
    params = jax.eval_shape(strategy.init_params, jax.random.PRNGKey(0))
    shapes = _shapes(model)
    for i, branch in enumerate(strategy.branches):
      x = jax.ShapeDtypeStruct((16, *shapes[branch.source]), jnp.float32)
      feature, logits = jax.eval_shape(lambda p, x, b=branch: exit_branches.apply_branch(b, p, x),
                                       params[f"exit{i}"], x)
      assert feature.shape == (16, branch.width) and logits.shape == (16, K)


def test_branch_statistics_ignore_masked_examples():
  """Masked examples change nothing for the kept ones (their BatchNorm statistics skip them)."""
  branch = exit_branches.ExitBranch("stage1", (8, 8, 16), width=32, num_classes=K, num_down=2)
  params = exit_branches.init_branch(jax.random.PRNGKey(1), branch)
  x = jax.random.normal(jax.random.PRNGKey(2), (6, 8, 8, 16))
  mask = jnp.array([1, 1, 1, 0, 0, 1], bool)
  garbage = x.at[3:5].set(100.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 16)))
  _, a = _apply(branch, params, x, mask)
  _, b = _apply(branch, params, garbage, mask)
  _, kept_only = _apply(branch, params, x[mask])
  np.testing.assert_allclose(a[mask], b[mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a[mask], kept_only, rtol=1e-5, atol=1e-5)


def test_bad_exit_configs_are_named():
  shapes = _shapes("resnet8")
  def build(cfg):
    return exits.exit_strategy(cfg, student_shapes=shapes, teacher_shapes=shapes, num_classes=K)
  with pytest.raises(ValueError, match="unknown distill config keys"):
    build({"gama": 2.0})
  with pytest.raises(ValueError, match="records no activation 'stage7'"):
    build({"exits": ["stage7"]})
  with pytest.raises(ValueError, match="gamma has 2 values"):
    build({"gamma": [1.0, 2.0]})
  with pytest.raises(ValueError, match="must be equal"):
    build({"target": "final", "width": 32, "hint_weight": 1.0})
  with pytest.raises(ValueError, match="unknown exit target"):
    build({"target": "teachers"})
  with pytest.raises(ValueError, match="square patch grid"):
    exit_branches.ExitBranch("block0", (7, 64), width=8, num_classes=K, prefix_tokens=1)


# --- the strategies, against their terms recomputed by hand -----------------------------------------

@pytest.mark.parametrize("method", ["ofa", "self_distill"])
def test_loss_is_the_weighted_sum_and_each_exit_reports_accuracy(method):
  section = _section(method)
  strategy = exits.exit_strategy(section, student_shapes=_shapes("resnet8"), teacher_shapes=_shapes("resnet14"),
                                 num_classes=K)
  assert strategy.uses_teacher == (method == "ofa")
  params = strategy.init_params(jax.random.PRNGKey(0))
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(0))
  s_out = _activations("resnet8", strategy.feature_names("student"))
  t_logits = jnp.asarray(np.random.default_rng(5).normal(size=(16, K)) * 3.0, jnp.float32)  # any teacher's logits
  loss, metrics = strategy(s_out, {"logits": t_logits}, batch, 0, params=params)
  z, y = s_out["logits"], batch["targets"]
  ce = lambda logits: float(jnp.mean(losses.cross_entropy(logits, y)))  # noqa: E731
  w = section
  want = w["ce_weight"] * ce(z)
  if method == "ofa":
    want += w["kd_weight"] * float(jnp.mean(ofa_loss(z, t_logits, y, gamma=w["gamma"])))
  for i, branch in enumerate(strategy.branches):
    feature, zi = _apply(branch, params[f"exit{i}"], s_out["features"][branch.source])
    if method == "ofa":
      want += w["exit_weight"] * float(jnp.mean(ofa_loss(zi, t_logits, y, gamma=w["gamma"])))
    else:
      want += w["exit_ce_weight"] * ce(zi)
      want += w["exit_weight"] * float(jnp.mean(losses.hinton_kd(zi, z, temperature=w["temperature"])))
      want += w["hint_weight"] * float(np.mean((np.asarray(feature) - np.asarray(s_out["features"]["pre_logits"]))**2))
    s, c = metrics[f"exit_{branch.source}/accuracy"]
    assert float(s) / float(c) == pytest.approx(np.mean(np.argmax(np.asarray(zi), -1) == np.asarray(y)))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  exits_named = ["stage1", "stage2", "stage3"] if method == "ofa" else ["stage1", "stage2"]
  assert [b.source for b in strategy.branches] == exits_named


def _setup(strategy, mesh, student="resnet8", teacher="resnet8"):
  g, p, s = state_lib.create_sharded_model_with_state(_model(student, 0), mesh)
  tg, tp, ts = state_lib.create_sharded_model_with_state(_model(teacher, 1), mesh)
  opt = optax.sgd(0.05, momentum=0.9)
  state = state_lib.create_train_state(p, opt, 0, mesh, strategy=strategy, model_state=s)
  student_forward = step_lib.classifier_forward(g, train=True, features=strategy.feature_names("student"))
  if getattr(strategy, "reads_student_weights", False):
    student_forward = exits.expose_weights(student_forward)
  step = step_lib.make_distill_step(
      state=state, teacher_params=(tp, ts), mesh=mesh, student_forward=student_forward,
      teacher_forward=step_lib.classifier_forward(tg, features=strategy.feature_names("teacher")),
      strategy=strategy, optimizer=opt)
  return state, step, (tp, ts)


def _train(strategy, mesh, steps=5):
  """`steps` updates on one repeated batch; returns the states before and after each, and the losses."""
  state, step, teacher = _setup(strategy, mesh)
  batch = sharding_lib.shard_batch(_batch(0), mesh)
  snapshot = lambda s: jax.tree_util.tree_map(np.array, (s.params, s.model_state, s.strategy_params))  # noqa: E731
  states, values = [snapshot(state)], []
  for _ in range(steps):
    state, metrics = step(state, batch, teacher)
    states.append(snapshot(state))
    values.append(float(metrics["loss"][0] / metrics["loss"][1]))
  assert all(np.isfinite(values)) and values[-1] < 0.9 * values[0], f"the loss did not fall: {values}"
  return state, states, metrics


@pytest.mark.parametrize("method", ["ofa", "self_distill"])
def test_a_few_steps_lower_the_loss_and_train_the_exits(method, mesh):
  strategy = exits.exit_strategy(_section(method), student_shapes=_shapes("resnet8"),
                                 teacher_shapes=_shapes("resnet8"), num_classes=K)
  _, states, metrics = _train(strategy, mesh)
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), states[0][2], states[-1][2])
  assert all(jax.tree_util.tree_leaves(moved)), "an exit's parameters did not move"
  assert {f"exit_{b.source}/accuracy" for b in strategy.branches} <= set(metrics)


def test_ema_update_is_exact_and_the_loss_falls(mesh):
  """θ_ema is the student at step 0, then θ_ema ← m·θ_ema + (1 − m)·θ with θ the pre-update weights
  (parameters and BatchNorm statistics)."""
  strategy = exits.ema_strategy(dict(_section("ema"), momentum=0.9), make_student=_model("resnet8", 0))
  state, states, metrics = _train(strategy, mesh)
  want = states[0][:2]
  for theta in states[1:-1]:
    want = jax.tree_util.tree_map(lambda e, w: 0.9 * e + 0.1 * w, want, theta[:2])
  got = jax.tree_util.tree_map(np.array, state.strategy_state["weights"])
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  assert float(state.strategy_state["started"]) == 1.0
  assert {"ema_accuracy", "teacher_agreement", "kd"} <= set(metrics)


def test_ema_needs_the_students_weights():
  strategy = exits.ema_strategy(_section("ema"), make_student=_model("resnet8", 0))
  with pytest.raises(ValueError, match="expose_weights"):
    strategy({"logits": jnp.zeros((2, K))}, None, {"mask": jnp.ones(2), "targets": jnp.zeros(2, jnp.int32)}, 0,
             state=strategy.init_state())
  with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
    exits.ema_strategy({"momentum": 1.5}, make_student=_model("resnet8", 0))
