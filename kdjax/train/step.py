"""The pure distillation step and its jitted, sharded builder.

    new_state, metrics = step(state, batch, teacher_params)

`distill_step` is a module-level pure function whose dependencies (forward functions,
strategy, optimizer) are keyword-only and bound with `functools.partial`; `make_distill_step`
jits it with explicit shardings over a mesh and donates the state. The teacher's parameters
are an argument of every call (never optimizer state or checkpoint content) and its forward
pass runs inside the step under `stop_gradient`, so its logits never cross the jit boundary.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import losses
from kdjax.models import capture
from kdjax.train import sharding as sharding_lib
from kdjax.train.state import TrainState, state_shardings, trainable

Forward = Callable[[Any, Mapping[str, jax.Array]], dict]


@functools.lru_cache(maxsize=None)
def lm_forward(graphdef, *, head: bool = False) -> Forward:
  """A forward function `(params, batch) -> outputs` for an NNX language model.

  One function per (graphdef, head): the graphdef holds the model's whole config, so equal ones
  compute the same, and programs built from the same forward (`make_eval_step`) are shared by
  every run of that architecture (a CE-only and a distilled student evaluate with one program).

  Outputs are `{'logits'}`, or with `head=True` `{'features': h [B, L, H], 'head': W [H, V]}`
  (`DecoderLM.features` / `head_weights`) for strategies that fuse the head into the loss
  (`kdjax.distill.strategies.HeadDistillation`).
  """
  def forward(params, batch):
    model = nnx.merge(graphdef, params)
    if not head:
      return {"logits": model(batch["inputs"])}
    if getattr(model.config, "logit_softcap", None) is not None:
      raise ValueError("a fused head does not apply the model's logit_softcap yet: use logits outputs")
    return {"features": model.features(batch["inputs"]), "head": model.head_weights()}
  return forward


def classifier_forward(graphdef, *, train: bool = False, features=()) -> Forward:
  """A forward function for an NNX image classifier (`kdjax.models.vision`) or any model called
  as `model(batch['images'], train=...)`.

  `forward(params, batch, model_state=None)` returns `{'logits', 'features'}`, the features being
  the activations named in `features` (`kdjax.models.capture`); with `train=True` and a
  `model_state` (BatchNorm statistics) also `'model_state'`, its value after this batch. A
  teacher's params may be the pair `(params, model_state)`: it runs in eval mode on its
  running statistics. Like `lm_forward`, one function per (graphdef, train, features), so the
  programs built from it are shared by every run of that architecture.
  """
  return _classifier_forward(graphdef, train, tuple(features))


@functools.lru_cache(maxsize=None)
def _classifier_forward(graphdef, train: bool, names: tuple[str, ...]) -> Forward:
  def forward(params, batch, model_state=None):
    if model_state is None and isinstance(params, tuple):
      params, model_state = params
    # As a pure dict: State leaves are Variables bound to the trace that made them (the jit
    # around the step), and BatchNorm could not update them inside the gradient's trace.
    model = nnx.merge(graphdef, params) if model_state is None else nnx.merge(graphdef, params,
                                                                              nnx.to_pure_dict(model_state))
    with capture.capture(names) as acts:
      logits = model(batch["images"], train=train)
    out = {"logits": logits, "features": dict(acts)}
    if train and model_state is not None:
      out["model_state"] = nnx.state(model, nnx.Not(nnx.Param))
    return out
  return forward


def distill_step(state: TrainState, batch, teacher_params, *, student_forward: Forward,
                 teacher_forward: Optional[Forward], strategy, optimizer: optax.GradientTransformation):
  """One optimizer update of the student on one (global) batch.

  Returns the new state and metrics as `(sum, count)` pairs: the strategy's, plus the global
  L2 norms of gradients, parameters and updates.

  A stateful strategy's new state is `strategy.update_state(state, metrics, step)`, or, when its
  call returns three values `(loss, metrics, new_state)`, that new state (CRD's memory bank is
  written from the batch's embeddings, which only the call sees). A student with non-parameter
  state (`state.model_state`: BatchNorm statistics) gets it as `model_state=` and returns the new
  value as `'model_state'` in its outputs.
  """
  # fold_in(rng, step) gives every step its own key without carrying a split chain; models
  # that need randomness (dropout, sampling) read it from the batch.
  step_rng = jax.random.fold_in(state.rng, state.step)
  batch = dict(batch, rng=step_rng)
  teacher_out = None
  if strategy.uses_teacher:
    teacher_out = jax.lax.stop_gradient(teacher_forward(teacher_params, batch))

  stateful = hasattr(strategy, "init_state")
  with_params = bool(state.strategy_params)
  extra = {"state": state.strategy_state} if stateful else {}

  with_model_state = bool(jax.tree_util.tree_leaves(state.model_state))

  def loss_fn(optimised):
    params, own = (optimised["model"], optimised["strategy"]) if with_params else (optimised, None)
    own_params = {"params": own} if with_params else {}
    if with_model_state:
      student_out = dict(student_forward(params, batch, model_state=state.model_state))
      model_state = student_out.pop("model_state")
    else:
      student_out, model_state = student_forward(params, batch), state.model_state
    loss, metrics, *new_strategy_state = strategy(student_out, teacher_out, batch, state.step, **extra, **own_params)
    return loss, (metrics, model_state, new_strategy_state[0] if new_strategy_state else None)

  optimised = trainable(state.params, state.strategy_params)
  (_, (metrics, model_state, new_strategy_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(optimised)
  if not stateful:
    strategy_state = {}
  elif new_strategy_state is not None:
    strategy_state = jax.lax.stop_gradient(new_strategy_state)
  else:
    strategy_state = strategy.update_state(state.strategy_state, metrics, state.step)
  updates, opt_state = optimizer.update(grads, state.opt_state, optimised)
  optimised = optax.apply_updates(optimised, updates)
  params, strategy_params = (optimised["model"], optimised["strategy"]) if with_params else (optimised, {})
  one = jnp.ones((), jnp.float32)
  metrics = dict(metrics)
  metrics["grad_norm"] = (optax.tree.norm(grads), one)
  metrics["param_norm"] = (optax.tree.norm(params), one)
  metrics["update_norm"] = (optax.tree.norm(updates), one)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, strategy_state=strategy_state,
                            strategy_params=strategy_params, model_state=model_state)
  return new_state, metrics


def make_distill_step(*, state: TrainState, teacher_params, mesh: Mesh, student_forward: Forward,
                      teacher_forward: Optional[Forward], strategy, optimizer):
  """Jits `distill_step` with the shardings of `state` / `teacher_params` and a data-parallel batch.

  The state is donated: its buffers are reused for the new state, halving peak parameter
  memory. Call the result as `step(state, batch, teacher_params)`.
  """
  fn = functools.partial(distill_step, student_forward=student_forward, teacher_forward=teacher_forward,
                         strategy=strategy, optimizer=optimizer)
  s_shardings = state_shardings(state)
  t_shardings = jax.tree_util.tree_map(lambda x: x.sharding, teacher_params)
  return jax.jit(
      fn,
      in_shardings=(s_shardings, sharding_lib.batch_sharding(mesh), t_shardings),
      out_shardings=(s_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0,),
  )


def lm_eval_step(params, batch, teacher_params, *, student_forward: Forward, teacher_forward: Optional[Forward]):
  """Held-out measurements of a language model as (sum, count) pairs.

  Cross-entropy and top-1 accuracy against the data; with a teacher, also the forward KL to it,
  the total variation (1 − TVD is the per-token speculative acceptance rate) and top-1
  agreement.
  """
  mask = batch["mask"].astype(bool)
  logits = student_forward(params, batch)["logits"]
  ce = losses.cross_entropy(logits, batch["targets"], where=mask)
  out = {
      "ce": losses.masked_sum_count(ce, mask),
      "accuracy": losses.masked_sum_count((jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32), mask),
  }
  if teacher_forward is not None:
    t_logits = teacher_forward(teacher_params, batch)["logits"]
    out["kl_to_teacher"] = losses.masked_sum_count(losses.forward_kl(logits, t_logits, where=mask), mask)
    out["tvd_to_teacher"] = losses.masked_sum_count(losses.total_variation(logits, t_logits, where=mask), mask)
    out["teacher_agreement"] = losses.masked_sum_count(
        (jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32), mask)
  return out


def make_eval_step(*, params, teacher_params, mesh: Mesh, student_forward: Forward,
                   teacher_forward: Optional[Forward]):
  """`lm_eval_step` jitted for `params` / `teacher_params` in their shardings; the same forwards
  and shardings get the same jitted function back, so its compiled program is reused."""
  placed = lambda tree: jax.tree_util.tree_flatten(jax.tree_util.tree_map(lambda x: x.sharding, tree))  # noqa: E731
  (p_leaves, p_tree), (t_leaves, t_tree) = placed(params), placed(teacher_params)
  return _jitted_eval_step(student_forward, teacher_forward, tuple(p_leaves), p_tree, tuple(t_leaves), t_tree,
                           sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _jitted_eval_step(student_forward, teacher_forward, p_leaves, p_tree, t_leaves, t_tree, batch_sharding,
                      replicated):
  fn = functools.partial(lm_eval_step, student_forward=student_forward, teacher_forward=teacher_forward)
  return jax.jit(fn, in_shardings=(p_tree.unflatten(p_leaves), batch_sharding, t_tree.unflatten(t_leaves)),
                 out_shardings=replicated)


def sum_metrics(a: Optional[dict], b: dict) -> dict:
  """Adds two dicts of (sum, count) pairs (the first may be None)."""
  if a is None:
    return dict(b)
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in b}


def mean_metrics(metrics: dict) -> dict[str, float]:
  """Reduces (sum, count) pairs to floats."""
  return {k: float(s) / max(float(c), 1.0) for k, (s, c) in metrics.items()}
