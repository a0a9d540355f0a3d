"""Orbax checkpoints of a run: train state plus the data iterator's position.

Saving the grain iterator's state next to the train state is what makes a killed run resume
with nothing lost or repeated: the restored run sees exactly the batches the uninterrupted
one would have seen. Teachers are never saved here (they are arguments of the step, not part
of the train state).

Resume order
------------
A run (`kdjax.experiments.lm_kd.train_lm`) starts from the first of:

1. the newest good checkpoint in its own directory (`RunCheckpoints.latest_step`): train
   state, optimizer, strategy state and data position, so training continues exactly;
2. an explicit initial checkpoint (`student.init_from`: another run directory, of which only
   the latest model parameters are read; the optimizer starts fresh);
3. the seed's random initialisation.

Saves are asynchronous (orbax writes while training goes on); `wait` and `close` block until
they are on disk. Retention keeps the newest `keep` checkpoints and, with `keep_best`, also the
`keep_best` best by a metric the caller passes to `save` (e.g. the validation CE of the
teacher-hacking monitor, `best_mode='min'`); `best_step` names the best one.

Integrity
---------
Orbax makes a save atomic (it writes a temporary directory and renames it, or writes a commit
marker last on object stores), so a kill during a save leaves no half checkpoint behind.
What it does not catch is a checkpoint damaged afterwards or copied in part (a truncated
array file, a lost item, a step directory without its commit marker): restored, it fails
with an obscure TensorStore error, or worse, restores wrong numbers silently (zstd chunks carry
no checksum). So:

* once a save is on disk, process 0 records the size and CRC-32 of each of its files in
  `<step>/kdjax_files.json` (a run killed between the save and that record leaves the step
  without one: it is then checked by the markers and the restore alone);
* `latest_step` and `restore` check the newest step first (orbax's commit markers, the
  items, the recorded files) and a restore that still fails counts as damage too. A damaged
  step is renamed `<step>.corrupt` (kept for inspection; orbax no longer sees it), a warning
  naming the step and the reason is logged, and the previous step is tried.

A read error on a step whose files all match their record is not damage (a model that does
not fit the checkpoint): it is raised.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store  # pinned orbax: what its default handler uses

ITEMS = ("state", "data")
FILE_RECORD = "kdjax_files.json"
QUARANTINE_SUFFIX = ".corrupt"
# orbax's commit marker (`orbax.checkpoint._src.path.atomicity_types.COMMIT_SUCCESS_FILE`): in a
# finished step directory and in each of its items.
COMMIT_MARKER = "commit_success.txt"
_CHUNK = 1 << 22


def _file_crc(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      crc = zlib.crc32(block, crc)
  return crc


def _files(step_dir: str) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file under `step_dir` but the record."""
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if not rel.startswith(FILE_RECORD):  # the record and its temporary copy
        out[rel] = [os.path.getsize(path), _file_crc(path)]
  return out


def _save_replicated_arrays_whole() -> None:
  """In a one-process run, writes each replicated array from one device, not in slices.

  Orbax's default (replica-parallel saving) splits a replicated array into one slice per replica so
  that several hosts share the writing. In one process the same bytes go to the same host anyway,
  and every slice shape and offset is a jitted `slice` compiled on first use: measured, 1,728 of
  them (112 compiles) in one small LM experiment, whose saves then blocked 4.0 s instead of 0.2 s.
  Several processes keep orbax's default. Orbax's handler registry is global, so every orbax save
  in the process then writes so.
  """
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                  array_metadata_store=array_metadata_store.Store()),
        override=True)


class RunCheckpoints:
  """The checkpoints of one run under `directory` (saved asynchronously; see the module doc).

  Args:
    directory: the run's checkpoint directory (created if missing).
    keep: how many of the newest checkpoints to keep (>= 1).
    keep_best: how many of the best checkpoints by `best_metric` to keep besides (0: none).
    best_metric: the key of the `metrics` dict passed to `save` that ranks checkpoints.
    best_mode: 'min' (a loss) or 'max' (an accuracy).
    warn: where the warning about a damaged checkpoint goes.
  """

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 0, best_metric: Optional[str] = None,
               best_mode: str = "min", warn: Callable[[str], None] = logging.warning):
    if int(keep) < 1:
      raise ValueError(f"keep must be >= 1 (the newest checkpoint is what a run resumes from), got {keep}")
    if int(keep_best) < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if keep_best and not best_metric:
      raise ValueError("keep_best > 0 needs best_metric: the key of the metrics passed to save that ranks checkpoints")
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric if keep_best else None
    self._warn = warn
    self._verified: set[int] = set()
    self._unrecorded: set[int] = set()  # saved this session, file record not yet written
    _save_replicated_arrays_whole()
    options = dict(create=True, enable_async_checkpointing=True)
    if self.best_metric:
      metric = lambda metrics: float(metrics[best_metric])  # noqa: E731
      # The newest `keep` (what a resume needs) or the best `keep_best`: either keeps a step.
      # BestN sorts by the metric, reversed for 'min', and keeps the last n.
      policy = checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=int(keep)),
          checkpoint_managers.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=int(keep_best),
                                    keep_checkpoints_without_metrics=False)])
      options.update(best_fn=metric, best_mode=best_mode, preservation_policy=policy)
    else:
      options.update(max_to_keep=int(keep))
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(**options),
                                          item_names=ITEMS)

  @property
  def tracks_best(self) -> bool:
    return self.best_metric is not None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest step that passes the integrity checks (damaged newer ones are set aside)."""
    for step in reversed(self.all_steps()):
      reason = self._agreed_check(step)
      if reason is None:
        return step
      self._quarantine(step, reason)
    return None

  def _agreed_check(self, step: int) -> Optional[str]:
    """`check` by process 0, its verdict shared: every host must set aside the same steps."""
    if jax.process_count() == 1:
      return self.check(step)
    reason = self.check(step) if jax.process_index() == 0 else None
    good = bool(multihost_utils.broadcast_one_to_all(np.int32(reason is None)))
    return None if good else reason or "process 0 found it damaged"

  def best_step(self) -> Optional[int]:
    """The step with the best `best_metric` among the kept ones (None without `keep_best`)."""
    if not self.tracks_best:
      return None
    return self._manager.best_step() if any(self._manager.metrics(s) is not None for s in self.all_steps()) else None

  def check(self, step: int) -> Optional[str]:
    """Why checkpoint `step` is unusable, or None when its markers, items and recorded files are intact."""
    if step in self._verified:
      return None
    step_dir = os.path.join(self.directory, str(step))
    for place in ("", *ITEMS):
      if not os.path.isdir(os.path.join(step_dir, place)):
        return f"its item {place!r} is missing" if place else "its directory is missing"
      if not os.path.exists(os.path.join(step_dir, place, COMMIT_MARKER)):
        return f"{os.path.join(place, COMMIT_MARKER) if place else COMMIT_MARKER} (orbax's commit marker) is missing"
    record = os.path.join(step_dir, FILE_RECORD)
    if os.path.exists(record):
      try:
        with open(record) as f:
          want = json.load(f)
      except ValueError as e:
        return f"its file record {FILE_RECORD} is unreadable ({e})"
      for rel, (size, crc) in sorted(want.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.exists(path):
          return f"{rel} is missing"
        if os.path.getsize(path) != size:
          return f"{rel} has {os.path.getsize(path)} bytes, {size} were written"
        if _file_crc(path) != crc:
          return f"{rel} does not match its CRC-32"
    self._verified.add(step)
    return None

  def save(self, step: int, state: Any, data_state: Optional[dict] = None, metrics: Optional[dict] = None) -> bool:
    """Starts saving `state` and `data_state` (JSON) as checkpoint `step`; returns False when
    the step is already saved. `metrics` rank it for `keep_best` (it must then hold `best_metric`)."""
    if metrics is not None and self.tracks_best:
      value = metrics.get(self.best_metric)
      if value is None:
        raise ValueError(f"checkpoints are ranked by {self.best_metric!r}; the metrics have only {sorted(metrics)}")
      if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{self.best_metric} is {value} at step {step}: a checkpoint cannot be ranked by it")
      metrics = {k: float(v) for k, v in metrics.items()}
    self.wait()  # orbax waits for the previous save here anyway; it can then be recorded
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})), metrics=metrics)
    if saved:
      self._unrecorded.add(step)
    return bool(saved)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, data_state) into the shardings of `abstract_state` (arrays or
    ShapeDtypeStructs with `.sharding`): of `step`, or of the newest good step (see the module
    doc). A state field without leaves in `abstract_state` (an empty `strategy_params`) need not
    be in the checkpoint: checkpoints written before the field existed still restore."""
    def read(s):
      state = self._restore_state(s, abstract_state)
      data = self._manager.restore(s, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
      return state, dict(data or {})

    return self._read_good(read, step)

  def restore_params(self, params_template: Any, step: Optional[int] = None) -> Any:
    """Only the model parameters of a saved train state, into the shardings of `params_template`
    (the optimizer state, strategy state and data position are not read): the warm start of
    another run from this one, whatever that run's optimizer or strategy was."""
    return self._read_good(lambda s: self._restore_state(s, {"params": params_template})["params"], step)

  def _read_good(self, read: Callable[[int], Any], step: Optional[int]) -> Any:
    if step is not None:
      reason = self.check(step)
      if reason is not None:
        raise ValueError(f"checkpoint step {step} in {self.directory} is damaged: {reason}")
      return read(step)
    while (step := self.latest_step()) is not None:
      recorded = os.path.exists(os.path.join(self.directory, str(step), FILE_RECORD))
      try:
        return read(step)
      except Exception as e:  # noqa: BLE001 - TensorStore and orbax raise many kinds
        if recorded:
          raise  # the files are as written: the caller's template does not fit
        self._quarantine(step, f"restoring it failed: {type(e).__name__}: {str(e)[:300]}")
    raise FileNotFoundError(f"no usable checkpoint in {self.directory}")

  def _quarantine(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst, n = src + QUARANTINE_SUFFIX, 1
    while os.path.exists(dst):
      dst, n = f"{src}{QUARANTINE_SUFFIX}{n}", n + 1
    self._warn(f"checkpoint step {step} in {self.directory} is damaged: {reason}; moved to {os.path.basename(dst)}, "
               "using the previous checkpoint")
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    ocp.multihost.sync_global_processes(f"kdjax_quarantine_{step}")
    self._verified.discard(step)
    self._unrecorded.discard(step)
    self._manager.reload()

  def _restore_state(self, step: int, abstract: Any) -> Any:
    path = os.path.join(self.directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    # Shapes are checked on the metadata first: orbax would start every read and, at the first
    # mismatch, leave the others' TensorStore futures calling into its closed event loop.
    misfits = _misfits(abstract, checkpointer.metadata(path).item_metadata.tree)
    if misfits:
      raise ValueError(f"checkpoint step {step} in {self.directory} does not fit the template: {'; '.join(misfits[:5])}"
                       + (f" and {len(misfits) - 5} more" if len(misfits) > 5 else ""))
    # A partial restore reads the leaves `abstract` names and nothing else.
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract)
    return checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))

  def wait(self) -> None:
    """Blocks until the saves started are on disk, then records their files (process 0)."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      kept = set(self._manager.all_steps())
      for step in sorted(self._unrecorded & kept):
        step_dir = os.path.join(self.directory, str(step))
        files, tmp = _files(step_dir), os.path.join(step_dir, FILE_RECORD + ".tmp")
        with open(tmp, "w") as f:
          json.dump(files, f)
        os.replace(tmp, os.path.join(step_dir, FILE_RECORD))  # a kill leaves the old state or the whole record
    self._unrecorded.clear()

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _misfits(abstract: Any, stored: Any) -> list[str]:
  """'path: stored shape S, wanted W' for each leaf of `abstract` whose stored array has another
  shape (a leaf the checkpoint lacks is left to orbax's own error)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    node = stored
    for entry in path:
      key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
      if isinstance(node, dict):
        node = node.get(str(key), node.get(key))
      else:
        node = node[key] if isinstance(node, (list, tuple)) and isinstance(key, int) and key < len(node) else None
      if node is None:
        break
    if node is not None and hasattr(node, "shape") and tuple(node.shape) != tuple(leaf.shape):
      out.append(f"{jax.tree_util.keystr(path)}: stored shape {tuple(node.shape)}, wanted {tuple(leaf.shape)}")
  return out
