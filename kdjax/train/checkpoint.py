"""Orbax checkpoints of a run: train state plus the data iterator's position.

Saving the grain iterator's state next to the train state is what makes a killed run resume
with nothing lost or repeated: the restored run sees exactly the batches the uninterrupted
one would have seen. Teachers are never saved here (they are arguments of the step).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
  """Keeps the last `keep` checkpoints of one run under `directory` (saved asynchronously)."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        item_names=("state", "data"),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict] = None) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})))

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, data_state) into the shardings of `abstract_state` (arrays or
    ShapeDtypeStructs with `.sharding`). A state field without leaves in `abstract_state` (an
    empty `strategy_params`) need not be in the checkpoint: checkpoints written before the field
    existed still restore."""
    step = self._step(step)
    state = self._restore_state(step, abstract_state)
    data = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    return state, dict(data or {})

  def restore_params(self, params_template: Any, step: Optional[int] = None) -> Any:
    """Only the model parameters of a saved train state, into the shardings of `params_template`
    (the optimizer state, strategy state and data position are not read): the warm start of
    another run from this one, whatever that run's optimizer or strategy was."""
    return self._restore_state(self._step(step), {"params": params_template})["params"]

  def _step(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return step

  def _restore_state(self, step: int, abstract: Any) -> Any:
    # A partial restore reads the leaves `abstract` names and nothing else.
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract)
    return ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
