"""Train state and sharded creation of NNX models as pure (graphdef, params) pairs.

Models are Flax NNX modules; the step works on their pure state: `nnx.split` gives a static
`graphdef` and the `params` pytree, and `nnx.merge(graphdef, params)` rebuilds the module
inside the jitted function. Parameters are created already sharded: the model is first
traced abstractly (`nnx.eval_shape`), the rules give each parameter its sharding, and a large
model's initialiser runs under `jit(out_shardings=...)`, so no device ever holds an unsharded copy.
A small one is built op by op and then placed (`materialise`): a jitted initialiser is a new
program for every model and seed, while the ops' programs are shared by every model built.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """What a distillation step updates. Teachers are never part of it.

  `strategy_state` is the pytree of a stateful strategy (e.g. TAID's interpolation t and its
  momentum; `kdjax.distill.strategies`), updated by the step and checkpointed with the rest;
  an empty dict for stateless strategies. `strategy_params` are a strategy's own trainable
  parameters (a learned projector, MGSR's clipping sub-network): optimised with the student by
  the same optimizer (`trainable` is the tree it sees), checkpointed, never part of the model.
  `model_state` is the student's state that is not a parameter (BatchNorm running statistics,
  `nnx.BatchStat`): its forward pass in training mode returns the new value, nothing
  differentiates it, and it is checkpointed with the rest; {} for models that have none.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  strategy_state: Any = flax.struct.field(default_factory=dict)
  strategy_params: Any = flax.struct.field(default_factory=dict)
  model_state: Any = flax.struct.field(default_factory=dict)


def trainable(params, strategy_params):
  """The pytree the optimizer updates: the model's params, with a strategy's own params beside
  them when it has any (so runs without them keep the plain layout of their optimizer state)."""
  return {"model": params, "strategy": strategy_params} if strategy_params else params


def model_shardings(make_model: Callable[[], nnx.Module], mesh: Mesh, rules=()):
  """A model's structure, abstract parameters and their shardings, from tracing alone.

  Nothing is compiled or allocated, so a rule that does not fit the mesh or a parameter's shape
  raises its ValueError here, before any work (`kdjax.experiments.lm_kd.run` checks every model so).

  Args:
    make_model: builds the module (closing over its config and seed).
    mesh: the device mesh.
    rules: `kdjax.train.sharding.ShardingRules`, or a list of `(regex, action)` rules.

  Returns:
    (graphdef, abstract params, shardings): the shardings as a tree of the params' shape, each
    `nnx.Param` holding its `NamedSharding`.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  leftovers = nnx.state(abstract, nnx.Not(nnx.Param))
  if jax.tree_util.tree_leaves(leftovers):
    raise ValueError("kdjax steps train models whose state is all nnx.Param; this model also holds "
                     f"{type(leftovers).__name__} leaves {jax.tree_util.tree_structure(leftovers)}")
  return graphdef, abstract_params, sharding_lib.tree_shardings(abstract_params, mesh, rules)


# Below this many bytes of parameters (the whole model), a model is built op by op on one device and
# then placed. Measured (CPU, 8 simulated devices, LLVM -O0): a resnet32 took 5.5 s through a jitted
# initialiser, which compiles one program per model and seed, and 0.35 s op by op, whose small
# programs are cached across models. Above it, one device may not hold the whole model.
EAGER_INIT_BYTES = 1 << 28


def sharded_initializer(make: Callable[[], Any], shardings) -> Callable[[], Any]:
  """`make` (e.g. a model's parameters) as a jitted function whose outputs are placed by
  `shardings`: each device computes only its own shards, as long as the model's initialisers
  partition (random draws do under `jax_threefry_partitionable`, JAX's default)."""
  return jax.jit(make, out_shardings=shardings)


def materialise(make: Callable[[], Any], abstract, shardings) -> Any:
  """`make()` placed by `shardings`: run op by op and then moved when `abstract` (its shapes) is
  under `EAGER_INIT_BYTES` and the mesh is in one process; otherwise by `sharded_initializer`."""
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
  if nbytes < EAGER_INIT_BYTES and jax.process_count() == 1:
    return jax.device_put(make(), shardings)
  return sharded_initializer(make, shardings)()


def create_sharded_model_with_state(make_model: Callable[[], nnx.Module], mesh: Mesh, rules=()):
  """`create_sharded_model` for models that also hold non-parameter state (BatchNorm statistics).

  Returns:
    (graphdef, params, model_state): `nnx.merge(graphdef, params, model_state)` rebuilds the
    module; the params are placed by `rules`, the (small, per-channel) state is replicated.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
  shardings = (sharding_lib.tree_shardings(abstract_params, mesh, rules),
               jax.tree_util.tree_map(lambda _: sharding_lib.replicated(mesh), abstract_rest))
  params, rest = materialise(lambda: tuple(nnx.split(make_model(), nnx.Param, ...)[1:]),
                             (abstract_params, abstract_rest), shardings)
  return graphdef, params, rest


def create_sharded_model(make_model: Callable[[], nnx.Module], mesh: Mesh, rules=()):
  """Creates a model's parameters directly in their shardings (`materialise`).

  Args:
    make_model: builds the module (closing over its config and seed).
    mesh: the device mesh.
    rules: `kdjax.train.sharding.ShardingRules`, or a list of `(regex, action)` rules.

  Returns:
    (graphdef, params): the static structure and the sharded parameter state.
  """
  graphdef, abstract, shardings = model_shardings(make_model, mesh, rules)
  return graphdef, materialise(lambda: nnx.split(make_model(), nnx.Param)[1], abstract, shardings)


def create_train_state(params, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
                       strategy=None, model_state=None) -> TrainState:
  """Wraps sharded params with a sharded optimizer state (same layout as the params).

  `model_state` is the student's non-parameter state (`create_sharded_model_with_state`), kept
  beside the params and never given to the optimizer.

  A `strategy` with an `init_state()` gets its state created here, and one with
  `init_params(key)` its trainable parameters (from `fold_in(PRNGKey(seed), 1)`), both replicated
  over the mesh.
  """
  replicated = sharding_lib.replicated(mesh)
  init_params = getattr(strategy, "init_params", None)
  strategy_params = {} if init_params is None else jax.device_put(
      jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                             init_params(jax.random.fold_in(jax.random.PRNGKey(seed), 1))), replicated)
  optimised = trainable(params, strategy_params)
  param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, optimised)
  opt_abstract = jax.eval_shape(optimizer.init, optimised)
  # Optimizer moments mirror their parameters; scalars (counts) are replicated.
  opt_shardings = _mirror_shardings(opt_abstract, optimised, param_shardings, mesh)
  opt_state = materialise(lambda: optimizer.init(optimised), opt_abstract, opt_shardings)
  return TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
      params=params,
      opt_state=opt_state,
      rng=jax.device_put(jax.random.PRNGKey(seed), replicated),
      strategy_state=jax.device_put(initial_strategy_state(strategy), replicated),
      strategy_params=strategy_params,
      model_state={} if model_state is None else model_state,
  )


def initial_strategy_state(strategy) -> Any:
  """The strategy's `init_state()` as float32 arrays, or {} for a stateless strategy."""
  init = getattr(strategy, "init_state", None)
  return {} if init is None else jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), init())


def _mirror_shardings(opt_abstract, params, param_shardings, mesh):
  """Shardings for optimizer state: subtrees shaped like the params (Adam's μ and ν) take the
  params' shardings; everything else (step counts) is replicated."""
  param_struct = jax.tree_util.tree_structure(params)
  mirrors = lambda node: jax.tree_util.tree_structure(node) == param_struct
  return jax.tree_util.tree_map(
      lambda node: param_shardings if mirrors(node) else sharding_lib.replicated(mesh),
      opt_abstract, is_leaf=mirrors)


def state_shardings(state: TrainState):
  return jax.tree_util.tree_map(lambda x: x.sharding, state)
