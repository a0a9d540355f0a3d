"""The training loop: feed batches to a jitted step, log with ETA, checkpoint, resume."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, Optional

from jax.sharding import Mesh

from kdjax.train import sharding as sharding_lib
from kdjax.train.checkpoint import RunCheckpoints
from kdjax.train.step import mean_metrics, sum_metrics


def _clock(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 60:d}:{seconds % 60:02d}"


_SOURCE_KEY = "batch_source"


def data_state(batches: Iterator, prepare_batch: Optional[Callable] = None) -> dict:
  """What a checkpoint keeps of the data: the iterator's position and, if the batch hook has
  state (a replay buffer, an adaptive threshold), that too."""
  out = dict(batches.get_state()) if hasattr(batches, "get_state") else {}
  if hasattr(prepare_batch, "get_state"):
    out[_SOURCE_KEY] = prepare_batch.get_state()
  return out


def restore_data_state(state: dict, batches: Iterator, prepare_batch: Optional[Callable] = None) -> None:
  """The inverse of `data_state`: puts the iterator and the batch hook back where they were."""
  state = dict(state or {})
  source = state.pop(_SOURCE_KEY, None)
  if state:
    batches.set_state(state)
  if source is not None and hasattr(prepare_batch, "set_state"):
    prepare_batch.set_state(source)


def fit(*, state, step_fn: Callable, batches: Iterator, teacher_params: Any, num_steps: int, mesh: Mesh,
        tokens_per_batch: int, log_every: int = 50, checkpoints: Optional[RunCheckpoints] = None,
        checkpoint_every: int = 0, name: str = "train", log: Callable[[str], None] = print,
        prepare_batch: Optional[Callable] = None, monitor: Optional[Callable] = None, monitor_every: int = 0):
  """Runs `step_fn` from `state.step` up to `num_steps`.

  Args:
    state: a TrainState (possibly restored; training continues from its step).
    step_fn: `(state, batch, teacher_params) -> (state, metrics)`, already jitted.
    batches: an iterator of host batches (a grain iterator, whose state is checkpointed).
    teacher_params: passed to every step (None without a teacher).
    num_steps: the total step count of the run.
    mesh: where batches are placed.
    tokens_per_batch: for the tokens/s figure.
    log_every: steps between progress lines (loss, tokens/s, ETA).
    checkpoints: where to save; None saves nothing.
    checkpoint_every: steps between saves (0: only at the end).
    name: prefix of the progress lines.
    log: where progress lines go.
    prepare_batch: `(state, host_batch, teacher_params, step) -> device batch` replacing the plain
      sharding of each batch (e.g. `kdjax.distill.on_policy.OnPolicyBatches`: the student's samples).
    monitor: `(state, step) -> {name: float}` run every `monitor_every` steps and
      at the end, its values logged (e.g. `kdjax.evaluate.teacher_hacking.TeacherHackingMonitor`);
      its time is left out of the tokens/s figure.
    monitor_every: steps between monitor calls (0: only at the end).

  Returns:
    (state, history) with history a list of (step, mean metrics) per logging window.

  Raises:
    FloatingPointError: when the loss becomes NaN or infinite, naming the step.
  """
  start = int(state.step)
  history = []
  window, timed_from, timed_steps = None, None, 0
  for step in range(start, num_steps):
    batch = next(batches)
    if prepare_batch is None:
      batch = sharding_lib.shard_batch(batch, mesh)
    else:
      batch = prepare_batch(state, batch, teacher_params, step)
    state, metrics = step_fn(state, batch, teacher_params)
    window = sum_metrics(window, metrics)
    done = step + 1
    if timed_from is None:
      # The first step compiles; time the rest for an honest rate and ETA.
      float(metrics["loss"][0])
      timed_from, timed_steps = time.perf_counter(), 0
    else:
      timed_steps += 1
    if done % log_every == 0 or done == num_steps:
      values = mean_metrics(window)
      window = None
      if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"[{name}] loss is {values['loss']} at step {done}: lower the learning rate, "
                                 "check the inputs (an all -inf logit row?) or the temperature")
      elapsed = time.perf_counter() - timed_from
      rate = timed_steps / elapsed if elapsed > 0 and timed_steps else float("nan")
      eta = (num_steps - done) / rate if rate == rate and rate > 0 else float("nan")
      extra = " ".join(f"{k} {values[k]:.4f}" for k in ("ce", "kd", "teacher_agreement", "taid_t") if k in values)
      log(f"[{name}] step {done}/{num_steps} loss {values['loss']:.4f} {extra} grad_norm {values['grad_norm']:.3f} "
          f"| {rate * tokens_per_batch:,.0f} tok/s | ETA {_clock(eta) if eta == eta else '?'}")
      history.append((done, values))
    if monitor is not None and ((monitor_every and done % monitor_every == 0) or done == num_steps):
      began = time.perf_counter()
      values = monitor(state, done)
      log(f"[{name}] monitor step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))
      if timed_from is not None:
        timed_from += time.perf_counter() - began
    if checkpoints is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == num_steps):
      checkpoints.save(done, state, data_state(batches, prepare_batch))
  if checkpoints is not None:
    checkpoints.wait()
  return state, history
