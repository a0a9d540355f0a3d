"""The classifier distillation strategy, BatchNorm state in the step, and the vision experiment."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import cifar100_kd
from configs import vision_kd as vision_config
from configs import vision_methods
from kdjax import losses
from kdjax.distill import exits, representation
from kdjax.experiments import vision_kd
from kdjax.losses import features as F
from kdjax.models.vision import registry
from kdjax.train import sharding as sharding_lib, state as state_lib, step as step_lib

SHAPE = (8, 8, 1)


def _model(name, seed):
  return lambda: registry.vision_model(name, num_classes=10, rngs=nnx.Rngs(seed), input_shape=SHAPE)


def _batch(seed=0, b=16):
  rng = np.random.default_rng(seed)
  return {"images": rng.normal(size=(b, *SHAPE)).astype(np.float32), "targets": rng.integers(0, 10, b).astype(np.int32),
          "mask": np.ones(b, np.float32), "index": np.arange(b, dtype=np.int32) + 8 * seed}


def _setup(strategy, mesh, student="resnet8", teacher="resnet14"):
  g, p, s = state_lib.create_sharded_model_with_state(_model(student, 0), mesh)
  tg, tp, ts = state_lib.create_sharded_model_with_state(_model(teacher, 1), mesh)
  opt = optax.sgd(0.05, momentum=0.9)
  state = state_lib.create_train_state(p, opt, 0, mesh, strategy=strategy, model_state=s)
  step = step_lib.make_distill_step(
      state=state, teacher_params=(tp, ts), mesh=mesh,
      student_forward=step_lib.classifier_forward(g, train=True, features=strategy.feature_names("student")),
      teacher_forward=step_lib.classifier_forward(tg, features=strategy.feature_names("teacher")),
      strategy=strategy, optimizer=opt)
  return state, step, (tp, ts), (g, tg)


def _shapes(name):
  return registry.activation_shapes(nnx.eval_shape(_model(name, 0)), SHAPE)


def _strategy(method, steps=10, **kwargs):
  return representation.representation_strategy(
      vision_methods.distill_section(method, steps=steps), student_shapes=_shapes("resnet8"),
      teacher_shapes=_shapes("resnet14"), num_steps=steps, train_labels=np.arange(64) % 10, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def mesh():
  return sharding_lib.make_mesh({"data": -1})


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "fitnet", "at", "rkd", "pkt", "sp", "cc", "nst", "crd", "trg", "mi_alpha",
                                    "nd"])
def test_every_method_trains_a_few_steps(method, mesh):
  """Each recipe compiles once, gives finite losses and moves the student (and its heads)."""
  class_means = jnp.asarray(np.random.default_rng(0).normal(size=(10, 64)), jnp.float32) if method == "nd" else None
  strategy = _small_crd(_strategy(method, class_means=class_means))
  state, step, teacher, _ = _setup(strategy, mesh)
  before = jax.tree_util.tree_map(np.array, (state.params, state.strategy_params, state.model_state))
  for i in range(2):
    state, metrics = step(state, sharding_lib.shard_batch(_batch(i), mesh), teacher)
    assert np.isfinite(float(metrics["loss"][0]))
  after = (state.params, state.strategy_params, state.model_state)
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, after)
  assert any(jax.tree_util.tree_leaves(changed[0])), "student parameters did not move"
  assert any(jax.tree_util.tree_leaves(changed[2])), "BatchNorm statistics were not updated"
  if jax.tree_util.tree_leaves(before[1]):
    assert any(jax.tree_util.tree_leaves(changed[1])), "the strategy's heads did not move"
  expected = {"fitnet": "feature/fitnet", "at": "feature/at", "crd": "feature/crd", "kd": "kd", "dkd": "kd"}
  assert expected.get(method, "loss") in metrics


def _small_crd(strategy):
  """The strategy with 8 CRD negatives instead of thousands (64 training examples here)."""
  if strategy.crd is None:
    return strategy
  return dataclasses.replace(strategy, crd=dataclasses.replace(strategy.crd, num_negatives=8))


def test_loss_is_the_weighted_sum_of_its_terms(mesh):
  """CE + w·AT over three stage pairs, recomputed from the captured activations by hand."""
  strategy = _strategy("at")
  _, _, (tp, ts), (g, tg) = _setup(strategy, mesh)
  params, state = nnx.split(_model("resnet8", 0)(), nnx.Param, ...)[1:]
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(0))
  s_out = step_lib.classifier_forward(g, features=strategy.feature_names("student"))((params, state), batch)
  t_out = step_lib.classifier_forward(tg, features=strategy.feature_names("teacher"))((tp, ts), batch)
  loss, metrics, _ = strategy(s_out, t_out, batch, 0)
  ce = jnp.mean(losses.cross_entropy(s_out["logits"], batch["targets"]))
  at = sum(jnp.mean(F.attention_transfer(s_out["features"][n], t_out["features"][n])) for n in vision_methods.STAGES)
  np.testing.assert_allclose(loss, ce + F.CIFAR100_WEIGHTS["attention_transfer"] * at, rtol=1e-5)
  np.testing.assert_allclose(metrics["feature/at"][0] / metrics["feature/at"][1], at, rtol=1e-5)


def test_kd_equals_hinton_weighted(mesh):
  strategy = _strategy("kd")
  logits_s = jnp.asarray(np.random.default_rng(1).normal(size=(6, 10)), jnp.float32)
  logits_t = jnp.asarray(np.random.default_rng(2).normal(size=(6, 10)), jnp.float32)
  batch = {"targets": jnp.arange(6) % 10, "mask": jnp.ones(6)}
  loss, _, _ = strategy({"logits": logits_s}, {"logits": logits_t}, batch, 0)
  want = 0.1 * np.mean(losses.cross_entropy(logits_s, batch["targets"])) + 0.9 * np.mean(
      losses.hinton_kd(logits_s, logits_t, temperature=4.0))
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_mixup_cross_entropy_mixes_both_labels():
  strategy = representation.RepresentationDistillation()
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 10)), jnp.float32)
  batch = {"targets": jnp.array([0, 1, 2, 3]), "targets_b": jnp.array([3, 0, 1, 2]), "mix": jnp.full(4, 0.3),
           "mask": jnp.ones(4)}
  loss, _, _ = strategy({"logits": logits}, None, batch, 0)
  log_p = np.asarray(jax.nn.log_softmax(logits))
  want = -np.mean(0.3 * log_p[np.arange(4), [0, 1, 2, 3]] + 0.7 * log_p[np.arange(4), [3, 0, 1, 2]])
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_crd_memory_is_written_from_the_batch(mesh):
  strategy = _small_crd(_strategy("crd"))
  state, step, teacher, _ = _setup(strategy, mesh)
  memory = np.array(state.strategy_state["memory_student"])
  batch = _batch(0)
  state, _ = step(state, sharding_lib.shard_batch(batch, mesh), teacher)
  new = np.array(state.strategy_state["memory_student"])
  written = np.zeros(len(memory), bool)
  written[batch["index"]] = True
  np.testing.assert_array_equal(new[~written], memory[~written])
  np.testing.assert_allclose(np.linalg.norm(new[written], axis=-1), 1.0, rtol=1e-5)
  assert float(state.strategy_state["log_z_set"]) == 1.0
  log_z = np.array(state.strategy_state["log_z"])
  state, _ = step(state, sharding_lib.shard_batch(_batch(1), mesh), teacher)
  np.testing.assert_array_equal(np.array(state.strategy_state["log_z"]), log_z)  # Z fixed after the first batch


def test_bad_sections_are_named():
  with pytest.raises(ValueError, match="unknown distill config keys"):
    representation.representation_strategy({"kd_wieght": 1.0}, student_shapes={}, teacher_shapes={}, num_steps=1)
  with pytest.raises(ValueError, match="records no activation 'stage9'"):
    representation.representation_strategy({"features": [dict(loss="at", student="stage9")]},
                                           student_shapes=_shapes("resnet8"), teacher_shapes=_shapes("resnet14"),
                                           num_steps=1)
  with pytest.raises(ValueError, match="unknown feature loss"):
    representation.representation_strategy({"features": [dict(loss="atx", student="stage1")]},
                                           student_shapes=_shapes("resnet8"), teacher_shapes=_shapes("resnet14"),
                                           num_steps=1)
  with pytest.raises(ValueError, match="unknown vision method"):
    vision_methods.distill_section("fitnets", steps=1)


def test_ensemble_target_is_the_mean_probability():
  logits = [jnp.asarray(np.random.default_rng(i).normal(size=(5, 10)), jnp.float32) for i in range(3)]
  members = [vision_kd.Classifier(f"t{i}", None, None, None, 0, 0.0) for i in range(3)]
  forwards = [lambda p, b, i=i: {"logits": logits[i], "features": {}} for i in range(3)]
  original = step_lib.classifier_forward
  try:
    step_lib.classifier_forward = lambda graphdef, **kw: forwards.pop(0)
    _, forward = vision_kd.ensemble_forward(members)
  finally:
    step_lib.classifier_forward = original
  out = forward([None] * 3, {})
  want = np.mean([np.asarray(jax.nn.softmax(z)) for z in logits], axis=0)
  np.testing.assert_allclose(np.exp(out["logits"]), want, rtol=1e-5)


def test_runs_of_one_architecture_share_their_forwards(mesh):
  """Forwards are cached per architecture, so the eval programs built from them
  (`step_lib.make_eval_step`) compile once per architecture, not once per run: single models and
  ensembles of other seeds share theirs, which still compute each one's own outputs; another
  architecture or another set of captured features gets its own."""
  members = []
  for seed in range(4):
    g, p, s = state_lib.create_sharded_model_with_state(_model("resnet8", seed), mesh)
    members.append(vision_kd.Classifier(f"s{seed}", g, p, s, 0, 0.0))
  (p0, single0), (p1, single1) = (vision_kd.ensemble_forward(members[i:i + 1]) for i in (0, 1))
  (e0_params, ens0), (e1_params, ens1) = (vision_kd.ensemble_forward(members[i:i + 2]) for i in (0, 2))
  assert single0 is single1 and ens0 is ens1 and ens0 is not single0
  batch = sharding_lib.shard_batch(_batch(), mesh)
  logits = jax.jit(lambda p, b: single0(p, b)["logits"])
  assert not np.allclose(logits(p0, batch), logits(p1, batch))
  log_mean = np.log(np.mean([np.asarray(jax.nn.softmax(logits(m.variables, batch))) for m in members[2:]], axis=0))
  np.testing.assert_allclose(jax.jit(ens1)(e1_params, batch)["logits"], log_mean, rtol=1e-4, atol=1e-5)
  tg, _, _ = state_lib.create_sharded_model_with_state(_model("resnet14", 0), mesh)
  assert step_lib.classifier_forward(tg) is not single0
  assert step_lib.classifier_forward(members[0].graphdef, features=["pre_logits"]) is not single0


def _runlocal(method, workdir, **overrides):
  config = vision_config.get_config(f"runlocal,method={method},dataset=digits,teacher=resnet14,student=resnet8")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
  return vision_kd.run(config, str(workdir), log=lambda s: None)


def test_runlocal_experiment_end_to_end_and_resume(tmp_path, monkeypatch):
  """The experiment trains a teacher and both students on real digits (KD++: KD + ND, whose class
  centres come from the trained teacher), writes its table, and a rerun restores every finished run
  instead of training again."""
  results = _runlocal("nd", tmp_path)
  assert "KD gain over the no-teacher student" in results["table"]
  stored = json.loads((tmp_path / "results_nd.json").read_text())["results"]
  assert stored["teachers"][0]["accuracy"] > 0.2  # chance is 0.1 on ten digits
  assert 0.0 <= stored["student_kd"][0]["teacher_agreement"] <= 1.0
  calls = []
  monkeypatch.setattr(vision_kd.loop, "fit", lambda **kw: calls.append(kw) or (kw["state"], []))
  again = _runlocal("nd", tmp_path)
  assert not calls, "a finished run was trained again"
  assert again["student_kd"][0]["accuracy"] == pytest.approx(stored["student_kd"][0]["accuracy"])


@pytest.mark.parametrize("pair", sorted(cifar100_kd.PAIRS))
def test_cifar100_configs_build_every_method(pair):
  """Every published pair's config builds its strategy and heads for every method against the
  models' traced activations (a layer a method needs that a model lacks fails here, not after
  training)."""
  base = cifar100_kd.get_config(f"runlocal,pair={pair}")
  shapes = {role: registry.activation_shapes(nnx.eval_shape(
      lambda r=role: registry.vision_model(base[r].model.name, num_classes=100, rngs=nnx.Rngs(0),
                                           input_shape=(32, 32, 3))), (32, 32, 3)) for role in ("teacher", "student")}
  for method in vision_methods.METHODS:
    config = cifar100_kd.get_config(f"runlocal,pair={pair},method={method}")
    strategy = representation.representation_strategy(
        config.distill.to_dict(), student_shapes=shapes["student"], teacher_shapes=shapes["teacher"],
        num_steps=config.student.train.steps, class_means=jnp.zeros((100, shapes["teacher"]["pre_logits"][-1])),
        train_labels=np.arange(512) % 100,
        num_classes=100)
    # The heads' sizes fit and the loss traces on the models' activation shapes (nothing drawn or run).
    outputs = {role: {"logits": jax.ShapeDtypeStruct((4, 100), jnp.float32),
                      "features": {n: jax.ShapeDtypeStruct((4, *shapes[role][n]), jnp.float32)
                                   for n in strategy.feature_names(role)}} for role in ("student", "teacher")}
    batch = {"targets": jnp.zeros(4, jnp.int32), "mask": jnp.ones(4), "index": jnp.arange(4),
             "rng": jax.random.PRNGKey(0)}
    loss = jax.eval_shape(lambda o: strategy(o["student"], o["teacher"], batch, 0, state=strategy.init_state(),
                                             params=strategy.init_params(jax.random.PRNGKey(0)))[0], outputs)
    assert loss.shape == () and strategy.uses_teacher, (pair, method)


def test_cifar100_runlocal_trains_on_mock_data(tmp_path):
  """The CIFAR-100 recipe end to end on mock CIFAR-100 (same shapes and classes), a few steps."""
  config = cifar100_kd.get_config("runlocal,pair=vgg13-vgg8,method=dkd")
  results = vision_kd.run(config, str(tmp_path), log=lambda s: None)
  assert len(results["student_kd"]) == 1 and np.isfinite(results["student_kd"][0]["ce"])
  assert results["teachers"][0]["num_params"] > results["student_kd"][0]["num_params"]


def test_deit_distillation_token_reads_the_distill_head(mesh):
  """DeiT hard distillation: CE on the class head, the teacher's argmax on the distillation head."""
  strategy = representation.representation_strategy(
      vision_methods.distill_section("deit_hard", steps=4), student_shapes=_shapes("deit"),
      teacher_shapes=_shapes("resnet14"), num_steps=4)
  assert set(strategy.feature_names("student")) == {"distill_logits", "class_logits"}
  rng = np.random.default_rng(5)
  cls, dist, teacher = (jnp.asarray(rng.normal(size=(6, 10)), jnp.float32) for _ in range(3))
  batch = {"targets": jnp.arange(6) % 10, "mask": jnp.ones(6)}
  loss, _, _ = strategy({"logits": (cls + dist) / 2, "features": {"class_logits": cls, "distill_logits": dist}},
                        {"logits": teacher}, batch, 0)
  want = 0.5 * np.mean(losses.cross_entropy(cls, batch["targets"])) + 0.5 * np.mean(
      losses.cross_entropy(dist, jnp.argmax(teacher, -1)))
  np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize("size,target", [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((8, 2), (4, 4)), ((4, 4), (4, 4))])
def test_linear_head_resamples_the_student_map_to_the_teacher_size(size, target):
  """A larger student map is average-pooled, a smaller one repeated (nearest neighbour), per axis."""
  x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  want = x
  for axis, (n, goal) in enumerate(zip(size, target), start=1):
    if n > goal:  # output cell i: the mean of input cells i·f … (i+1)·f − 1
      f = n // goal
      want = np.stack([np.take(want, range(i * f, (i + 1) * f), axis=axis).mean(axis=axis) for i in range(goal)],
                      axis=axis)
    elif n < goal:
      index = np.arange(goal) // (goal // n)
      want = np.take(want, index, axis=axis)
  np.testing.assert_allclose(representation._resize_map(jnp.asarray(x), target), want, rtol=1e-6)


def test_linear_head_rejects_a_non_integer_map_ratio():
  with pytest.raises(ValueError, match="integer multiple"):
    representation._resize_map(jnp.zeros((1, 6, 6, 2)), (4, 4))


def test_ema_weights_come_back_with_the_student(tmp_path):
  """EMA self-distillation returns the average of the student's weights beside the student, and the
  experiment evaluates it; at momentum 1 the average stays the student's initial weights."""
  config = vision_config.get_config("runlocal,method=ema,dataset=digits,student=resnet8")
  data = vision_kd.load_data(config)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  section = config.distill.to_dict()
  section.pop("strategy")
  make = vision_kd._make_model(config.student.model, 10, data.info.image_shape, 0)
  strategy = exits.ema_strategy(dict(section, momentum=1.0), make_student=make)
  trained = vision_kd.train_classifier(name="student", model_cfg=config.student.model, train_cfg=config.student.train,
                                       seed=0, strategy=strategy, teacher=None, data=data, config=config, mesh=mesh,
                                       workdir=str(tmp_path), log=lambda s: None)
  _, params, model_state = state_lib.create_sharded_model_with_state(make, mesh)  # the run's initial weights
  for got, want in ((trained.ema.params, params), (trained.ema.model_state, model_state)):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), trained.params, params)
  assert any(jax.tree_util.tree_leaves(moved)), "the student itself did not train"
  untrained = vision_kd.evaluate([trained.ema], None, data, batch_size=config.eval.batch_size, mesh=mesh)
  run = dict(untrained, num_params=1, train_seconds=0.0, teacher_agreement=0.5)
  table = vision_kd.format_table({"teachers": [], "student_ce": [run],
                                  "student_kd": [dict(run, ema=dict(untrained, teacher_agreement=0.5))]})
  assert f"| student_kd (EMA of its weights) | 1 | {100 * untrained['accuracy']:.2f} | 50.00 | - |" in table
