"""Operations of the training loop on a toy state: checkpoint retention and integrity, preemption,
TensorBoard scalars and hyperparameters, the profiler window (tests/test_run_operations.py runs
the same on the real experiment in subprocesses)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax.train import loop, metric_writers, sharding as sharding_lib
from kdjax.train.checkpoint import FILE_RECORD, QUARANTINE_SUFFIX, RunCheckpoints

ROWS = 8
# A failed TensorStore read (the damage tests) leaves orbax's other read coroutines to die
# unobserved, reported whenever they are collected: noise, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@flax.struct.dataclass
class _State:
  step: jax.Array
  w: jax.Array


@jax.jit
def _step(state, batch, teacher_params):
  del teacher_params
  x = batch["x"]
  w = 0.5 * state.w + jnp.mean(x)
  return state.replace(step=state.step + 1, w=w), {"loss": (jnp.sum(x), jnp.float32(x.size)), "grad_norm": (w, 1.0)}


class _Batches:
  """Batch i holds the value i + offset in every row; its position is checkpointed."""

  def __init__(self, offset=0.0):
    self.next, self.offset = 0, offset

  def __next__(self):
    self.next += 1
    return {"x": np.full((ROWS, 1), self.next - 1 + self.offset, np.float32)}

  def get_state(self):
    return {"next": self.next}

  def set_state(self, state):
    self.next = state["next"]


def _mesh():
  return sharding_lib.make_mesh({"data": -1})


def _state(step=0, w=0.0):
  return jax.device_put(_State(step=jnp.int32(step), w=jnp.float32(w)), sharding_lib.replicated(_mesh()))


def _fit(state, batches, num_steps, **kwargs):
  kwargs.setdefault("log", lambda line: None)
  return loop.fit(state=state, step_fn=_step, batches=batches, teacher_params=None, num_steps=num_steps, mesh=_mesh(),
                  tokens_per_batch=ROWS, **kwargs)


def _w_after(num_steps, offset=0.0):
  """The toy's closed form, step by step in float64: w <- w / 2 + batch value."""
  w = 0.0
  for i in range(num_steps):
    w = 0.5 * w + i + offset
  return w


def _resume(directory, batches, **kwargs):
  checkpoints = RunCheckpoints(directory, **kwargs)
  state, data = checkpoints.restore(_state())
  loop.restore_data_state(data, batches)
  return checkpoints, state


def test_a_replicated_state_is_saved_whole_without_compiling(tmp_path):
  """One process writes a replicated array from one device: orbax's replica-parallel default would
  slice it once per device, a compiled `slice` per shape and offset."""
  mesh = sharding_lib.make_mesh({"data": 8})
  state = jax.device_put(_State(step=jnp.int32(3), w=jnp.arange(24 * 7, dtype=jnp.float32).reshape(24, 7)),
                         sharding_lib.replicated(mesh))
  compiles = []
  listen = lambda event, seconds, **_: compiles.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listen)
  checkpoints = RunCheckpoints(str(tmp_path))
  try:
    checkpoints.save(3, state)
    checkpoints.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  saved = len(compiles)
  restored, _ = checkpoints.restore(state)
  checkpoints.close()
  assert saved == 0
  np.testing.assert_array_equal(restored.w, state.w)
  assert restored.w.sharding == state.w.sharding


# --- retention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_newest_and_best_by_metric(tmp_path, mode):
  values = {1: 5.0, 2: 1.0, 3: 9.0, 4: 4.0, 5: 3.0, 6: 6.0}
  checkpoints = RunCheckpoints(str(tmp_path), keep=2, keep_best=1, best_metric="val", best_mode=mode)
  for step, value in values.items():
    checkpoints.save(step, _state(step), {"next": step}, metrics={"val": value, "other": -value})
  checkpoints.wait()
  best = (min if mode == "min" else max)(values, key=values.get)
  assert checkpoints.best_step() == best
  assert checkpoints.all_steps() == sorted({best, 5, 6})
  checkpoints.close()
  # A fresh manager (a restarted run) sees the same ranking from the saved metrics.
  again = RunCheckpoints(str(tmp_path), keep=2, keep_best=1, best_metric="val", best_mode=mode)
  assert again.best_step() == best and again.latest_step() == 6
  again.close()


def test_keep_newest_only_without_keep_best(tmp_path):
  checkpoints = RunCheckpoints(str(tmp_path), keep=3)
  for step in range(1, 7):
    checkpoints.save(step, _state(step))
  checkpoints.close()
  assert checkpoints.all_steps() == [4, 5, 6] and checkpoints.best_step() is None


def test_retention_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="keep must be >= 1"):
    RunCheckpoints(str(tmp_path), keep=0)
  with pytest.raises(ValueError, match="best_metric"):
    RunCheckpoints(str(tmp_path), keep_best=1)
  with pytest.raises(ValueError, match="best_mode"):
    RunCheckpoints(str(tmp_path), keep_best=1, best_metric="val", best_mode="lowest")
  checkpoints = RunCheckpoints(str(tmp_path), keep_best=1, best_metric="val")
  with pytest.raises(ValueError, match=r"ranked by 'val'.*\['loss'\]"):
    checkpoints.save(1, _state(1), metrics={"loss": 1.0})
  with pytest.raises(ValueError, match="val is nan at step 1"):
    checkpoints.save(1, _state(1), metrics={"val": float("nan")})
  checkpoints.close()


# --- integrity ---------------------------------------------------------------------------------

def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _largest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _flip_a_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


DAMAGE = {
    "truncated array file": lambda d: _truncate(_largest_array_file(d)),
    "flipped byte": lambda d: _flip_a_byte(_largest_array_file(d)),
    "no commit marker": lambda d: os.remove(os.path.join(d, "commit_success.txt")),
    "deleted item": lambda d: shutil.rmtree(os.path.join(d, "data")),
    # A kill between the save and its file record: only the restore itself can find the damage.
    "truncated, no record": lambda d: (os.remove(os.path.join(d, FILE_RECORD)), _truncate(_largest_array_file(d))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
  directory = str(tmp_path / "run")
  checkpoints = RunCheckpoints(directory, keep=3)
  for step in (1, 2, 3):
    checkpoints.save(step, _State(step=jnp.int32(step), w=jnp.arange(256.0) * step), {"next": step})
  checkpoints.close()
  DAMAGE[damage](os.path.join(directory, "3"))
  warnings = []
  again = RunCheckpoints(directory, keep=3, warn=warnings.append)
  state, data = again.restore(_State(step=jnp.int32(0), w=jnp.zeros(256)))
  assert int(state.step) == 2 and data == {"next": 2}
  np.testing.assert_array_equal(np.asarray(state.w), np.arange(256.0) * 2)
  assert len(warnings) == 1 and "checkpoint step 3 " in warnings[0], warnings
  assert os.path.isdir(os.path.join(directory, "3" + QUARANTINE_SUFFIX)) and again.all_steps() == [1, 2]
  # The run goes on: step 3 can be saved again, and a damaged step asked for by number raises.
  assert again.save(3, state, data)
  again.close()
  assert again.latest_step() == 3
  _truncate(_largest_array_file(os.path.join(directory, "1")))
  with pytest.raises(ValueError, match="checkpoint step 1 .* is damaged"):
    again.restore(_State(step=jnp.int32(0), w=jnp.zeros(256)), step=1)


def test_no_usable_checkpoint_and_a_template_that_does_not_fit(tmp_path):
  directory = str(tmp_path)
  checkpoints = RunCheckpoints(directory)
  checkpoints.save(1, _State(step=jnp.int32(1), w=jnp.zeros(4)))
  checkpoints.close()
  # Intact files and a model of another shape: the caller's error, naming the leaf and both
  # shapes, raised before any array is read, the checkpoint kept.
  with pytest.raises(ValueError, match=r"does not fit the template: \.w: stored shape \(4,\), wanted \(5,\)"):
    RunCheckpoints(directory, warn=lambda m: None).restore(_State(step=jnp.int32(0), w=jnp.zeros(5)))
  assert RunCheckpoints(directory).all_steps() == [1]
  os.remove(os.path.join(directory, "1", "state", "commit_success.txt"))
  again = RunCheckpoints(directory, warn=lambda m: None)
  assert again.latest_step() is None
  with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
    again.restore(_State(step=jnp.int32(0), w=jnp.zeros(4)))


# --- preemption --------------------------------------------------------------------------------

def test_sigterm_saves_the_current_step_and_a_resumed_fit_equals_an_unbroken_one(tmp_path):
  unbroken, _ = _fit(_state(), _Batches(), 9, log_every=3)
  # The test's own handler: a fit that did not take the signal over would leave it here (and
  # not kill pytest); fit must put it back afterwards.
  escaped = []

  def handler(*args):
    escaped.append(args)

  previous = signal.signal(signal.SIGTERM, handler)
  calls = []

  def step_then_signal(state, batch, teacher_params):
    calls.append(1)
    if len(calls) == 4:  # arrives during the fourth step: the loop stops after it
      os.kill(os.getpid(), signal.SIGTERM)
    return _step(state, batch, teacher_params)

  lines = []
  checkpoints = RunCheckpoints(str(tmp_path), keep=2)
  try:
    with pytest.raises(loop.Preempted) as stopped:
      loop.fit(state=_state(), step_fn=step_then_signal, batches=_Batches(), teacher_params=None, num_steps=9,
               mesh=_mesh(), tokens_per_batch=ROWS, log_every=3, checkpoints=checkpoints, checkpoint_every=3,
               log=lines.append)
    after = signal.getsignal(signal.SIGTERM)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not escaped and after is handler
  assert stopped.value.step == 4 and stopped.value.code == loop.PREEMPTED_EXIT_CODE == 143
  assert lines[-1].startswith("[train] preempted at step 4/9 by signal 15"), lines
  # Saved and on disk (with its file record) before the exception: a new process finds it.
  assert RunCheckpoints(str(tmp_path)).latest_step() == 4
  assert os.path.exists(tmp_path / "4" / FILE_RECORD)
  batches = _Batches()
  checkpoints, state = _resume(str(tmp_path), batches)
  assert int(state.step) == 4 and batches.next == 4
  resumed, history = _fit(state, batches, 9, log_every=3, checkpoints=checkpoints)
  np.testing.assert_allclose(float(resumed.w), _w_after(9), rtol=1e-6)
  assert float(resumed.w) == float(unbroken.w)
  assert [step for step, _ in history] == [6, 9]


def test_sigterm_outside_the_main_thread_is_left_alone():
  # Signal handlers can only be set from the main thread; fit must still run there.
  import threading

  out = {}
  worker = threading.Thread(target=lambda: out.update(state=_fit(_state(), _Batches(), 3, log_every=3)[0]))
  worker.start()
  worker.join()
  assert int(out["state"].step) == 3


# --- TensorBoard ---------------------------------------------------------------------------------

def test_tensorboard_scalars_are_the_window_means(tmp_path):
  logdir = str(tmp_path / "tb")
  hparams = {"seed": 3, "train": ml_collections.ConfigDict({"steps": 8, "lr": 0.5}), "note": None, "rules": [1, 2]}
  _, history = _fit(_state(), _Batches(), 8, log_every=3, logdir=logdir, hparams=hparams,
                    learning_rate=lambda step: 0.1 * step)
  scalars = metric_writers.read_scalars(logdir)
  # Window means of the batch values 0..7 in windows [0, 3), [3, 6), [6, 8).
  want = [(3, 1.0), (6, 4.0), (8, 6.5)]
  assert scalars["train/loss"] == want
  assert [s for s, _ in scalars["train/grad_norm"]] == [3, 6, 8]
  np.testing.assert_allclose([v for _, v in scalars["train/grad_norm"]], [h["grad_norm"] for _, h in history],
                             rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["train/learning_rate"]], [0.2, 0.5, 0.7], rtol=1e-6)
  assert all(v > 0 for _, v in scalars["perf/tokens_per_second"])
  texts = metric_writers.read_texts(logdir)
  written = json.loads(texts[metric_writers.CONFIG_TAG + "/text_summary"][0])
  assert written == {"seed": 3, "train.steps": 8, "train.lr": 0.5, "note": None, "rules": [1, 2]}
  tags = {value.tag for event in metric_writers.read_events(logdir) for value in event.summary.value}
  assert "_hparams_/session_start_info" in tags


def test_a_resumed_run_replaces_the_curves_of_the_steps_it_redoes(tmp_path):
  run, logdir = str(tmp_path / "run"), str(tmp_path / "run" / "tb")
  _fit(_state(), _Batches(), 8, log_every=2, logdir=logdir, checkpoints=RunCheckpoints(run, keep=5),
       checkpoint_every=2)
  # As after a kill -9 at step 8 whose last good checkpoint is step 4: steps 5..8 are redone,
  # here on other data (offset 100) so that the surviving points show which invocation wrote them.
  batches = _Batches(offset=100.0)
  checkpoints = RunCheckpoints(run, keep=5)
  state, data = checkpoints.restore(_state(), step=4)
  loop.restore_data_state(data, batches)
  _fit(state, batches, 8, log_every=2, logdir=logdir)
  assert metric_writers.read_scalars(logdir)["train/loss"] == [(2, 0.5), (4, 2.5), (6, 104.5), (8, 106.5)]


def test_writer_of_other_processes_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metric_writers.create_writer(str(tmp_path / "tb"))
  writer.write_scalars(1, {"a": 1.0})
  writer.close()
  assert isinstance(writer, metric_writers.NullWriter) and not (tmp_path / "tb").exists()


# --- monitor-ranked checkpoints, profiler ------------------------------------------------------------

def test_checkpoints_are_ranked_by_the_monitor_at_their_step(tmp_path):
  values = {2: 3.0, 4: 1.0, 6: 2.0, 8: 5.0}
  seen = []

  def monitor(state, step):
    seen.append(step)
    return {"val": values[step]}

  checkpoints = RunCheckpoints(str(tmp_path), keep=1, keep_best=1, best_metric="val")
  # monitor_every 4 and checkpoint_every 2: the saves at 2 and 6 run the monitor for their rank.
  _fit(_state(), _Batches(), 8, log_every=4, checkpoints=checkpoints, checkpoint_every=2, monitor=monitor,
       monitor_every=4)
  assert seen == [2, 4, 6, 8]
  assert checkpoints.all_steps() == [4, 8] and checkpoints.best_step() == 4
  with pytest.raises(ValueError, match="needs a monitor"):
    _fit(_state(), _Batches(), 2, checkpoints=checkpoints)


def test_profiler_traces_the_asked_steps(tmp_path):
  lines = []
  _fit(_state(), _Batches(), 5, log_every=5, profile_start=2, profile_steps=2, profile_dir=str(tmp_path),
       log=lines.append)
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb")), os.listdir(tmp_path)
  assert f"[train] profile of steps 3..4 in {tmp_path}" in lines
  with pytest.raises(ValueError, match="needs both profile_start"):
    _fit(_state(), _Batches(), 2, profile_steps=2, profile_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs profile_dir"):
    _fit(_state(), _Batches(), 2, profile_start=1, profile_steps=1)
