"""Mesh and parameter sharding from the config: rule semantics, layouts equal to one device, sharded
creation, and config errors raised before anything compiles (8 simulated CPU devices)."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import shakespeare_kd
from kdjax import losses
from kdjax.distill import strategies
from kdjax.experiments import lm_kd
from kdjax.models.decoder import LOGICAL_AXES, DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib

VOCAB, LENGTH, BATCH, STEPS = 32, 8, 8, 3
STUDENT = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=LENGTH)
TEACHER = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=24, d_ff=48, max_len=LENGTH)
TENSOR_TABLE = (("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))
FSDP = ((".*", "fsdp(min_size=64)"),)  # the toy models' norms (16 / 24 elements) stay replicated
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1))
  mask = (rng.random((BATCH, LENGTH)) < 0.7).astype(np.float32)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32), "mask": mask}


def _spec(tree, path):
  """The spec at `path` of a params tree (arrays) or a shardings tree (NamedShardings)."""
  node = tree
  for key in path.split("/"):
    node = node[int(key) if key.isdigit() else key]
  value = node.get_value()
  return getattr(value, "sharding", value).spec


@contextlib.contextmanager
def _no_compilation():
  """Fails if XLA compiles anything inside the block."""
  compiled = []

  def listener(name, *args, **kwargs):
    if name == COMPILE_EVENT:
      compiled.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiled, f"{len(compiled)} compilation(s) ran"


def _train(mesh, student_rules=(), teacher_rules=(), monkeypatch=None):
  """Three AdamW steps of forward-KL distillation; per-step metrics, the final state, the jitted step."""
  if monkeypatch is not None:  # every call after the first would retrace: chex counts the traces
    chex.clear_trace_counter()
    monkeypatch.setattr(step_lib, "distill_step", chex.assert_max_traces(step_lib.distill_step, n=1))
  optimizer = optax.adamw(1e-2, weight_decay=0.0)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh, student_rules)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh, teacher_rules)
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
  step = step_lib.make_distill_step(
      state=state, teacher_params=t_params, mesh=mesh, student_forward=step_lib.lm_forward(s_graph),
      teacher_forward=step_lib.lm_forward(t_graph),
      strategy=strategies.LogitDistillation(losses.forward_kl, kd_weight=0.7, temperature=2.0), optimizer=optimizer)
  seen = []
  for i in range(STEPS):
    state, metrics = step(state, sharding_lib.shard_batch(_batch(i), mesh), t_params)
    seen.append({k: float(metrics[k][0] / metrics[k][1]) for k in ("loss", "grad_norm", "update_norm")})
  return seen, state, t_params, step


@pytest.fixture(scope="module")
def one_device():
  metrics, state, _, _ = _train(sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  return metrics, jax.device_get(state.params)


# Each layout: mesh, student rules, teacher rules, and the spec each model's MLP gate [embed, mlp] must get.
LAYOUTS = {
    "data=8": ({"data": 8}, (), (), P(), P()),
    "fsdp=8": ({"fsdp": 8}, FSDP, FSDP, P(None, "fsdp"), P(None, "fsdp")),
    "data=2,fsdp=4": ({"data": 2, "fsdp": 4}, FSDP, FSDP, P(None, "fsdp"), P(None, "fsdp")),
    "data=4,tensor=2": ({"data": 4, "tensor": 2}, sharding_lib.ShardingRules(((".*", "logical"),), TENSOR_TABLE),
                        sharding_lib.ShardingRules(((".*", "logical"),), TENSOR_TABLE), P(None, "tensor"),
                        P(None, "tensor")),
    # The large-teacher layout: teacher tensor-sharded by name and fsdp over the rest, student fsdp only.
    "teacher tensor+fsdp, student fsdp": (
        {"fsdp": 4, "tensor": 2}, FSDP,
        sharding_lib.ShardingRules(((".*", "logical|fsdp(min_size=64)"),), TENSOR_TABLE),
        P(None, "fsdp"), P("fsdp", "tensor")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_takes_the_single_device_steps_without_recompiling(layout, one_device, monkeypatch):
  axes, student_rules, teacher_rules, student_gate, teacher_gate = LAYOUTS[layout]
  mesh = sharding_lib.make_mesh(axes)
  metrics, state, t_params, step = _train(mesh, student_rules, teacher_rules, monkeypatch)
  ref_metrics, ref_params = one_device
  for key in ("loss", "grad_norm", "update_norm"):
    np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in ref_metrics], rtol=2e-5, err_msg=key)
  chex.assert_trees_all_close(jax.device_get(state.params), ref_params, rtol=1e-4, atol=1e-6)
  assert step._cache_size() == 1
  # The layout really is the one asked for, and the step kept it.
  assert _spec(state.params, "blocks/0/mlp/gate") == student_gate
  assert _spec(t_params, "blocks/0/mlp/gate") == teacher_gate


@pytest.mark.parametrize("path", ["op by op", "jitted"])
def test_params_and_optimizer_state_are_created_in_their_shards(path, monkeypatch):
  if path == "jitted":  # what a model over EAGER_INIT_BYTES takes
    monkeypatch.setattr(state_lib, "EAGER_INIT_BYTES", 0)
  mesh = sharding_lib.make_mesh({"fsdp": 8})
  _, params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh, FSDP)
  state = state_lib.create_train_state(params, optax.adamw(1e-3), seed=0, mesh=mesh)
  adam = state.opt_state[0]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  sharded = 0
  for (path, p), mu, nu in zip(leaves, jax.tree_util.tree_leaves(adam.mu), jax.tree_util.tree_leaves(adam.nu)):
    name = sharding_lib.path_to_str(path)
    assert mu.sharding == p.sharding and nu.sharding == p.sharding, name
    held = sum(s.data.size for s in p.addressable_shards)
    if p.size >= 64:  # fsdp: every device holds 1/8, so the devices together hold exactly one copy
      sharded += 1
      assert held == p.size, name
      assert all(s.data.size * 8 == p.size for s in p.addressable_shards), name
    else:
      assert held == 8 * p.size and p.sharding.spec == P(), name
  assert sharded > len(leaves) // 2
  assert adam.count.sharding.spec == P()


class _DirectDraws(nnx.Module):
  """Two parameters that fsdp splits along a trailing dimension, drawn in their own shapes."""

  def __init__(self, rngs):
    self.wide = nnx.Param(jax.random.normal(rngs.params(), (64, 1024)))
    self.deep = nnx.Param(jax.random.normal(rngs.params(), (8, 96, 512)))


def test_small_and_large_models_are_initialised_alike(monkeypatch):
  """The op-by-op path (small models) and the jitted one give the same values and placements."""
  mesh = sharding_lib.make_mesh({"fsdp": 4, "tensor": 2})
  make = lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(3))  # noqa: E731
  rules = sharding_lib.ShardingRules(((".*", "logical|fsdp(min_size=64)"),), TENSOR_TABLE)
  _, eager = state_lib.create_sharded_model(make, mesh, rules)
  monkeypatch.setattr(state_lib, "EAGER_INIT_BYTES", 0)
  _, jitted = state_lib.create_sharded_model(make, mesh, rules)
  # XLA may fuse the random draws' float transforms, so the values agree to rounding.
  chex.assert_trees_all_close(jax.device_get(eager), jax.device_get(jitted), rtol=1e-6, atol=1e-7)
  assert jax.tree_util.tree_map(lambda a: a.sharding, eager) == jax.tree_util.tree_map(lambda a: a.sharding, jitted)
  assert any(a.sharding.spec != P() for a in jax.tree_util.tree_leaves(eager))


def _init_memory(make_model):
  mesh = sharding_lib.make_mesh({"fsdp": 8})
  _, abstract, shardings = state_lib.model_shardings(make_model, mesh, ((".*", "fsdp(min_size=1024)"),))
  sizes = [x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract)]
  memory = state_lib.sharded_initializer(lambda: nnx.split(make_model(), nnx.Param)[1], shardings).lower().compile().memory_analysis()
  return memory, sum(sizes), max(sizes)


def test_the_sharded_initializer_never_holds_a_full_copy():
  memory, total, largest = _init_memory(lambda: _DirectDraws(nnx.Rngs(0)))
  np.testing.assert_allclose(memory.output_size_in_bytes, total / 8, rtol=1e-3)  # one eighth, plus a tuple header
  # A full copy of the largest parameter on any device would need at least its whole size.
  assert memory.temp_size_in_bytes < largest


def test_the_decoder_initializer_never_holds_a_full_copy():
  config = DecoderConfig(vocab_size=256, num_layers=1, num_heads=4, d_model=128, d_ff=1024, max_len=8)
  memory, total, largest = _init_memory(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  assert memory.temp_size_in_bytes < largest


MESH_TENSOR = {"fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("shape,action,mesh_axes,expected", [
    ((16, 32), "fsdp(min_size=0)", {"fsdp": 8}, P(None, "fsdp")),  # the largest dimension
    ((32, 16), "fsdp(min_size=0)", {"fsdp": 8}, P("fsdp")),
    ((24, 24), "fsdp(min_size=0)", {"fsdp": 8}, P("fsdp")),  # ties: the first
    ((6, 40), "fsdp(min_size=0)", {"fsdp": 8}, P(None, "fsdp")),
    ((12, 20, 16), "fsdp(min_size=0)", {"fsdp": 8}, P(None, None, "fsdp")),  # the largest that divides
    ((1000,), "fsdp", {"fsdp": 8}, P()),  # under the default min_size
    ((1000,), "fsdp(min_size=1000)", {"fsdp": 8}, P("fsdp")),  # min_size counts elements, inclusive
    ((1000,), "fsdp(min_size=1001)", {"fsdp": 8}, P()),
    ((16, 32), "fsdp(axis=('data', 'fsdp'), min_size=0)", {"data": 2, "fsdp": 4}, P(None, ("data", "fsdp"))),
    ((16, 32), "logical|fsdp(min_size=0)", MESH_TENSOR, P("fsdp", "tensor")),
    ((16, 32), "fsdp(min_size=0)|logical", MESH_TENSOR, P(None, "fsdp")),  # order matters: mlp is taken
    ((16, 32), "logical|replicate", MESH_TENSOR, P()),
    ((16, 32), (None, "fsdp"), MESH_TENSOR, P(None, "fsdp")),
    ((16, 32), ("fsdp",), MESH_TENSOR, P("fsdp")),  # a short spec replicates the rest
])
def test_rule_actions_place_one_parameter(shape, action, mesh_axes, expected):
  mesh = sharding_lib.make_mesh(mesh_axes)
  rules = sharding_lib.ShardingRules([(r".*gate", action)], [("mlp", "tensor")])
  assert sharding_lib.spec_for("blocks/0/mlp/gate", shape, mesh, rules, ("embed", "mlp")) == expected


def test_logical_rules_take_the_first_free_entry_and_skip_used_axes():
  mesh = sharding_lib.make_mesh(MESH_TENSOR)
  table = [("heads", "tensor"), ("head_dim", "tensor"), ("head_dim", "fsdp"), ("embed", None), ("embed", "fsdp")]
  rules = sharding_lib.ShardingRules([(".*", "logical")], table)
  # q [embed, heads, head_dim]: 'embed' stops at its first entry (None); head_dim falls back past 'tensor'.
  q_spec = sharding_lib.spec_for("q", (16, 2, 8), mesh, rules, ("embed", "heads", "head_dim"))
  assert q_spec == P(None, "tensor", "fsdp")
  # An fsdp after 'logical' leaves a parameter alone when the axis is already in use.
  fsdp_embed = sharding_lib.ShardingRules([(".*", "logical|fsdp(min_size=0)")], [("embed", "fsdp")])
  assert sharding_lib.spec_for("w", (16, 32), mesh, fsdp_embed, ("embed", "mlp")) == P("fsdp")


def test_logical_rules_match_flax_on_the_decoder():
  """The decoder's annotations through our rules give the specs Flax's own logical partitioning gives."""
  mesh = sharding_lib.make_mesh(MESH_TENSOR)
  table = [("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("embed", "fsdp")]
  table += [(name, None) for name in LOGICAL_AXES if name not in dict(table)]  # flax passes unmapped names through
  config = DecoderConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=16, d_ff=32, max_len=LENGTH,
                         num_kv_heads=2, qkv_bias=True, qk_norm=True)
  _, abstract, shardings = state_lib.model_shardings(lambda: DecoderLM(config, rngs=nnx.Rngs(0)), mesh,
                                                     sharding_lib.ShardingRules([(".*", "logical")], table))
  ours = jax.tree_util.tree_leaves(shardings)
  with nnx.logical_axis_rules(table):
    theirs = jax.tree_util.tree_leaves(nnx.get_partition_spec(abstract))
  assert len(ours) == len(theirs) > 20
  trim = lambda spec: tuple(spec)[:max([i + 1 for i, a in enumerate(spec) if a is not None], default=0)]  # noqa: E731
  assert [trim(s.spec) for s in ours] == [trim(s) for s in theirs]
  assert {s.spec for s in ours} >= {P("fsdp", "tensor"), P("tensor", None, "fsdp"), P("tensor", "fsdp")}


def test_rules_from_config_fall_back_to_the_top_level_keys():
  config = ml_collections.ConfigDict(dict(
      sharding_rules=((".*", "replicate"),), logical_axis_rules=(("mlp", "tensor"),),
      teacher=dict(sharding_rules=[[".*", "logical"]], logical_axis_rules=()), student=dict(sharding_rules=())))
  teacher, student = (sharding_lib.rules_from_config(config, role) for role in ("teacher", "student"))
  assert teacher == sharding_lib.ShardingRules(((".*", "logical"),), (("mlp", "tensor"),))
  assert student == sharding_lib.ShardingRules(((".*", "replicate"),), (("mlp", "tensor"),))
  assert sharding_lib.rules_from_config(config) == student and len({teacher, student}) == 2  # hashable


def test_the_experiment_hands_each_model_its_own_rules(monkeypatch):
  seen = {}
  monkeypatch.setattr(lm_kd, "train_lm", lambda **kwargs: seen.setdefault(kwargs["name"], kwargs["rules"]))
  config = shakespeare_kd.get_config("runlocal")
  rules = {"teacher": sharding_lib.ShardingRules(((".*", "logical"),), TENSOR_TABLE),
           "student": sharding_lib.ShardingRules(FSDP)}
  exp = lm_kd._Experiment(config=config, workdir="", mesh=None, rules=rules, log=print, data_dir="",
                          eval_tokens=np.zeros(8, np.uint8), student_cfg=STUDENT)
  for role in ("teacher", "student"):
    exp.train(role, config, role, train_tokens=np.zeros(8, np.uint8))
  assert seen == rules


def test_the_shipped_config_replicates_and_names_a_tensor_axis():
  config = shakespeare_kd.get_config("runlocal")
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  assert mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
  for role in ("teacher", "student"):
    rules = sharding_lib.rules_from_config(config, role)
    sharding_lib.check_rules(rules, mesh)
    assert sharding_lib.spec_for("blocks/0/mlp/gate", (32, 64), mesh, rules, ("embed", "mlp")) == P()


def test_the_no_compilation_guard_sees_a_compilation():
  with pytest.raises(AssertionError, match="compilation"):
    with _no_compilation():
      jax.jit(lambda x: x * 3 + 1)(jnp.ones(5))


def _student(mesh, rules, config=STUDENT):
  state_lib.create_sharded_model(lambda: DecoderLM(config, rngs=nnx.Rngs(0)), mesh, rules)


ODD = DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=3, d_model=18, d_ff=36, max_len=LENGTH)  # q [18, 3, 6]


@pytest.mark.parametrize("mesh_axes,rules,config,match", [
    ({"data": 8}, [(r".*mlp/gate", (None, "tensr"))], STUDENT, "names mesh axis 'tensr'.*add it to config.mesh"),
    ({"data": 8}, [(".*", "fsdp")], STUDENT, "names mesh axis 'fsdp'"),  # fsdp's default axis
    ({"data": 8}, sharding_lib.ShardingRules([(".*", "logical")], [("mlp", "model")]), STUDENT,
     "logical axis rule 'mlp'.*names mesh axis 'model'"),
    ({"fsdp": 8}, [(".*", "fsdp(min_size=64)")], ODD, r"no free dimension of \(18, 3, 6\).*raise min_size above 324"),
    ({"tensor": 8}, sharding_lib.ShardingRules([(".*", "logical")], [("heads", "tensor")]), STUDENT,
     r"dim \d \('heads'\) of size 2 is not divisible by mesh axis \('tensor',\) of size 8"),
    ({"data": 8}, sharding_lib.ShardingRules([(".*", "logical")], [("mpl", "data")]), STUDENT,
     r"name \['mpl'\], which no parameter carries"),
    ({"fsdp": 8}, [(".*", ("fsdp", "fsdp"))], STUDENT, "uses a mesh axis twice"),
    ({"fsdp": 8}, [(".*", "fsdpp")], STUDENT, "unknown sharding operation 'fsdpp'"),
    ({"fsdp": 8}, [(".*", "fsdp(size=4)")], STUDENT, "takes no argument 'size'"),
    ({"fsdp": 8}, [(".*", "fsdp(min_size=-1)")], STUDENT, "min_size must be a non-negative int"),
    ({"fsdp": 8}, [(".*", "fsdp(min_size=n)")], STUDENT, "must be a literal"),
    ({"fsdp": 8}, [("(", "replicate")], STUDENT, "bad regex"),
    ({"fsdp": 8}, [(".*", "replicate", "extra")], STUDENT, r"must be a \(name, value\) pair"),
    ({"fsdp": 8}, [(".*attn/q", (None, None, None, "fsdp"))], STUDENT, "more entries than the parameter"),
])
def test_config_errors_are_raised_before_anything_compiles(mesh_axes, rules, config, match):
  mesh = sharding_lib.make_mesh(mesh_axes)
  with _no_compilation(), pytest.raises(ValueError, match=match):
    _student(mesh, rules, config)


def test_an_earlier_rule_exempts_the_parameters_that_no_dimension_fits():
  mesh = sharding_lib.make_mesh({"fsdp": 8})
  _, _, shardings = state_lib.model_shardings(lambda: DecoderLM(ODD, rngs=nnx.Rngs(0)), mesh,
                                              [(r".*/(attn|mlp)/.*", "replicate"), (".*", "fsdp(min_size=64)")])
  spec = lambda *path: _spec(shardings, "/".join(path))  # noqa: E731
  assert spec("blocks", "0", "attn", "q") == P() and spec("blocks", "0", "mlp", "gate") == P()
  assert spec("embedding") == P("fsdp") and spec("lm_head") == P(None, "fsdp")


def test_mesh_and_batch_errors_name_the_fix():
  with _no_compilation():
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available.*use -1"):
      sharding_lib.make_mesh({"data": 2, "tensor": 3})
    with pytest.raises(ValueError, match="8 devices are not divisible by the fixed axes"):
      sharding_lib.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices.*choose a multiple of 8"):
      sharding_lib.check_batch_size(12, sharding_lib.make_mesh({"data": 2, "fsdp": 4}))
    sharding_lib.check_batch_size(12, sharding_lib.make_mesh({"data": 2, "tensor": 4}))  # tensor does not split it


@pytest.mark.parametrize("override,match", [
    (dict(mesh={"data": 2, "fsdp": 2, "tensor": 3}), "needs 12 devices"),
    (dict(mesh={"data": 1, "fsdp": 1, "tensor": 8}, logical_axis_rules=(("heads", "tensor"),),
          student={"sharding_rules": ((".*", "logical"),)}), r"dim \d \('heads'\) of size 2 is not divisible"),
    (dict(teacher={"sharding_rules": ((".*", "fsdp(axis='fsdpp')"),)}), "names mesh axis 'fsdpp'"),
])
def test_the_experiment_rejects_a_bad_layout_before_compiling_or_training(override, match, tmp_path):
  config = shakespeare_kd.get_config("runlocal")
  config.unlock()
  for key, value in override.items():
    if isinstance(value, dict) and key != "mesh":
      config[key].update(value)
    else:
      config[key] = value
  with _no_compilation(), pytest.raises(ValueError, match=match):
    lm_kd.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "teacher").exists()
