"""The training loop: feed batches to a jitted step, log with ETA, checkpoint, resume.

Operations around the step, all optional:
  * progress lines (loss, tokens/s, ETA) every `log_every` steps, and the same window means as
    TensorBoard scalars under `logdir` (process 0; `kdjax.train.metric_writers`), with the
    tokens/s, the learning rate and the run's hyperparameters;
  * asynchronous checkpoints every `checkpoint_every` steps and at the end
    (`kdjax.train.checkpoint.RunCheckpoints`: resume order, retention, integrity);
  * preemption: a SIGTERM (what a cluster scheduler or `kill` sends before killing) ends the
    current step, saves a checkpoint of it, waits for every save to reach the disk and raises
    `Preempted` (exit status 143), after the line "[name] preempted at step N ...". Rerunning
    the same command resumes at step N with nothing lost. In a multi-process run the hosts agree
    on the step through JAX's preemption service (`jax.distributed`), which receives the signal;
  * a `jax.profiler` trace of steps `profile_start + 1 .. profile_start + profile_steps`.

A kill -9 loses the steps after the last checkpoint, which the restarted run redoes on the same
batches (the data position is checkpointed too): the result is bit-identical to an unbroken run.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from kdjax.train import metric_writers
from kdjax.train import sharding as sharding_lib
from kdjax.train.checkpoint import RunCheckpoints
from kdjax.train.step import mean_metrics, sum_metrics

# The exit status of a preempted run: 128 + SIGTERM, what a process killed by the signal reports.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
  """Raised by `fit` after a termination signal, once the checkpoint of `step` is on disk.

  A SystemExit, so that `except Exception` does not swallow it and an uncaught one ends the
  process quietly with status 143 after the loop's own "preempted at step N" line.
  """

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


class _Preemption:
  """Whether the loop was asked to stop, as a context manager around it.

  One process: a handler of `signals` records the request (the previous handlers come back on
  exit). Several: `multihost_utils.reached_preemption_sync_point`, true at the same step on
  every host (JAX's preemption service receives the signal; a Python handler would hide it).
  """

  def __init__(self, signals: Sequence[int]):
    self._signals = tuple(signals)
    self._previous: dict = {}
    self.signal: Optional[int] = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    # Signal handlers can only be set from the main thread; elsewhere nothing is watched.
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def due(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service off: nothing to watch
        self._multi = False
    return self.signal is not None


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


def _check_profile(profile_start: int, profile_steps: int, profile_dir: Optional[str]) -> bool:
  """Whether a trace is asked for; a half-given window is an error, not a silent no-op."""
  if profile_start < 0 or profile_steps < 0:
    raise ValueError(f"profile_start and profile_steps must be >= 0, got {profile_start} and {profile_steps}")
  if bool(profile_start) != bool(profile_steps):
    raise ValueError(f"a profile needs both profile_start (steps before the trace, >= 1 to leave out the compiling "
                     f"first step) and profile_steps; got {profile_start} and {profile_steps} (0 and 0: off)")
  if profile_steps and not profile_dir:
    raise ValueError("a profile needs profile_dir: where jax.profiler writes the trace")
  return bool(profile_steps)


def fit(*, state, step_fn: Callable, batches: Iterator, teacher_params: Any, num_steps: int, mesh: Mesh,
        tokens_per_batch: int, log_every: int = 50, checkpoints: Optional[RunCheckpoints] = None,
        checkpoint_every: int = 0, name: str = "train", log: Callable[[str], None] = print,
        prepare_batch: Optional[Callable] = None, monitor: Optional[Callable] = None, monitor_every: int = 0,
        logdir: Optional[str] = None, hparams: Optional[Mapping[str, Any]] = None,
        learning_rate: Optional[Callable[[int], Any]] = None, profile_start: int = 0, profile_steps: int = 0,
        profile_dir: Optional[str] = None, preemption_signals: Sequence[int] = (signal.SIGTERM,)):
  """Runs `step_fn` from `state.step` up to `num_steps`.

  Args:
    state: a TrainState (possibly restored; training continues from its step).
    step_fn: `(state, batch, teacher_params) -> (state, metrics)`, already jitted.
    batches: an iterator of host batches (a grain iterator, whose state is checkpointed).
    teacher_params: passed to every step (None without a teacher).
    num_steps: the total step count of the run.
    mesh: where batches are placed.
    tokens_per_batch: for the tokens/s figure.
    log_every: steps between progress lines (loss, tokens/s, ETA) and TensorBoard scalars.
    checkpoints: where to save; None saves nothing. When it keeps the best checkpoints
      (`keep_best`), each save is ranked by the monitor's values at its step (the monitor runs
      at a save step if it did not already), so a monitor is then required.
    checkpoint_every: steps between saves (0: only at the end).
    name: prefix of the progress lines.
    log: where progress lines go (process 0 only).
    prepare_batch: `(state, host_batch, teacher_params, step) -> device batch` replacing the plain
      sharding of each batch (e.g. `kdjax.distill.on_policy.OnPolicyBatches`: the student's samples).
    monitor: `(state, step) -> {name: float}` run every `monitor_every` steps and
      at the end, its values logged (e.g. `kdjax.evaluate.teacher_hacking.TeacherHackingMonitor`);
      its time is left out of the tokens/s figure.
    monitor_every: steps between monitor calls (0: only at the end).
    logdir: where TensorBoard event files go (process 0 writes them): per logging window the
      mean of each metric (`train/<key>`), `perf/tokens_per_second` and `train/learning_rate`;
      the monitor's values (`monitor/<key>`); `hparams` once at the start. None: no files.
    hparams: the run's hyperparameters (nested mappings), written once to `logdir`.
    learning_rate: the optimizer's schedule, `step -> rate` (an optax schedule), for TensorBoard.
    profile_start: steps completed before a `jax.profiler` trace starts (0: no trace).
    profile_steps: how many steps the trace covers (0: no trace).
    profile_dir: where the trace goes (TensorBoard's profile plugin reads it).
    preemption_signals: the signals that make the loop save and stop (see `Preempted`).

  Returns:
    (state, history) with history a list of (step, mean metrics) per logging window.

  Raises:
    FloatingPointError: when the loss becomes NaN or infinite, naming the step.
    Preempted: after one of `preemption_signals`, once the checkpoint of the current step is saved.
    ValueError: for a half-given profile window, or `keep_best` checkpoints without a monitor.
  """
  profiling = _check_profile(profile_start, profile_steps, profile_dir)
  if jax.process_index() != 0:
    log = lambda line: None  # noqa: E731 - one set of progress lines, from process 0
  tracks_best = checkpoints is not None and checkpoints.tracks_best
  if tracks_best and monitor is None:
    raise ValueError(f"[{name}] the checkpoints keep the best by {checkpoints.best_metric!r}, which needs a monitor "
                     "that reports it (or keep_best=0)")
  start = int(state.step)
  history = []
  window, timed_from, timed_steps = None, None, 0
  # A resumed run hides what a killed one logged after its resume step (it logs those steps again;
  # scalars carry the count of steps done).
  writer = metric_writers.create_writer(logdir, purge_step=start + 1 if start else None)
  tracing = False
  try:
    if hparams:
      writer.write_hparams(hparams, step=start)
    with _Preemption(preemption_signals) as preemption:
      for step in range(start, num_steps):
        if profiling and step == profile_start:
          jax.profiler.start_trace(profile_dir)
          tracing = True
        with jax.profiler.StepTraceAnnotation(name, step_num=step) if tracing else contextlib.nullcontext():
          batch = next(batches)
          if prepare_batch is None:
            batch = sharding_lib.shard_batch(batch, mesh)
          else:
            batch = prepare_batch(state, batch, teacher_params, step)
          state, metrics = step_fn(state, batch, teacher_params)
        done = step + 1
        if tracing and done == profile_start + profile_steps:
          jax.block_until_ready(state)  # the trace must hold the device work of its last step
          jax.profiler.stop_trace()
          tracing = False
          log(f"[{name}] profile of steps {profile_start + 1}..{done} in {profile_dir}")
        window = sum_metrics(window, metrics)
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
          scalars = {f"train/{k}": v for k, v in values.items()}
          scalars["perf/tokens_per_second"] = rate * tokens_per_batch
          if learning_rate is not None:
            scalars["train/learning_rate"] = float(learning_rate(done - 1))  # the rate of the window's last update
          writer.write_scalars(done, scalars)
          history.append((done, values))
        save = checkpoints is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == num_steps)
        monitored = None
        if monitor is not None and ((monitor_every and done % monitor_every == 0) or done == num_steps
                                    or (save and tracks_best)):
          began = time.perf_counter()
          monitored = monitor(state, done)
          log(f"[{name}] monitor step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in monitored.items()))
          writer.write_scalars(done, {f"monitor/{k}": v for k, v in monitored.items()})
          if timed_from is not None:
            timed_from += time.perf_counter() - began
        if save:
          # A resumed run logs only the steps after its checkpoint: what was logged up to it must
          # be on disk before the checkpoint is (a kill -9 otherwise loses the unflushed points).
          writer.flush()
          checkpoints.save(done, state, data_state(batches, prepare_batch), metrics=monitored if tracks_best else None)
        if preemption.due(done):
          if checkpoints is not None:
            checkpoints.save(done, state, data_state(batches, prepare_batch))  # a no-op if `save` just did
            checkpoints.wait()
          where = f"checkpoint in {checkpoints.directory}" if checkpoints is not None else "no checkpoints kept"
          cause = f" by signal {preemption.signal}" if preemption.signal is not None else ""
          log(f"[{name}] preempted at step {done}/{num_steps}{cause}: {where}; rerun the same command to resume")
          raise Preempted(done)
  finally:
    if tracing:
      jax.profiler.stop_trace()
    writer.close()
    if checkpoints is not None:
      checkpoints.wait()  # after an error too: a save in flight holds a good state
  return state, history
