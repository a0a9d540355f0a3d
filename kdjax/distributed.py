"""Multi-process start-up: `jax.distributed.initialize` behind one switch.

A run is multi-process when the entry point gets `--distributed` or the environment has
`KDJAX_DISTRIBUTED=1`. The coordinator's `host:port` (process 0's machine), the process count and
this process's id come from the flags, else from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID` (what `launch.run --target=processes|slurm` exports); whatever stays unset JAX
detects itself from the cluster (Cloud TPU metadata, SLURM, Open MPI), so on a TPU pod
`KDJAX_DISTRIBUTED=1` alone suffices. `JAX_LOCAL_DEVICE_IDS` (the accelerators this process
drives) is read by JAX. On CPUs the processes' collectives run over gloo, JAX's default.

`initialize` must run before anything touches a JAX backend (`jax.devices()`, an array).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

from absl import flags

SWITCH_ENV = "KDJAX_DISTRIBUTED"
ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

_TRUE, _FALSE = ("1", "true", "yes"), ("", "0", "false", "no")


def _switch(value: str) -> bool:
  if value.strip().lower() in _TRUE:
    return True
  if value.strip().lower() in _FALSE:
    return False
  raise ValueError(f"{SWITCH_ENV}={value!r}: use 1 (multi-process) or 0")


def _integer(value: Optional[int], env: Mapping[str, str], name: str) -> Optional[int]:
  if value is not None:
    return value
  text = env.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{name}={text!r} is not an integer") from None


def initialize_kwargs(*, enabled: Optional[bool] = None, coordinator_address: Optional[str] = None,
                      num_processes: Optional[int] = None, process_id: Optional[int] = None,
                      environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """The arguments of `jax.distributed.initialize` for this process, or None for a single-process run.

  Args:
    enabled: the `--distributed` flag; None defers to `KDJAX_DISTRIBUTED`.
    coordinator_address: `host:port` of process 0; None: `JAX_COORDINATOR_ADDRESS`, else auto-detected.
    num_processes: None: `JAX_NUM_PROCESSES`, else auto-detected.
    process_id: in `[0, num_processes)`; None: `JAX_PROCESS_ID`, else auto-detected.
    environ: the environment to read (default `os.environ`).

  Raises:
    ValueError: on a malformed value, a process id out of range, or process settings without the switch.
  """
  env = os.environ if environ is None else environ
  if enabled is None:
    enabled = _switch(env.get(SWITCH_ENV, ""))
  if not enabled:
    given = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                            ("process_id", process_id)) if v is not None]
    if given:
      raise ValueError(f"{', '.join(given)} given without --distributed (or {SWITCH_ENV}=1)")
    return None
  address = coordinator_address or env.get(ADDRESS_ENV, "").strip() or None
  if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
    raise ValueError(f"coordinator address {address!r} must be host:port")
  count = _integer(num_processes, env, NUM_PROCESSES_ENV)
  index = _integer(process_id, env, PROCESS_ID_ENV)
  if count is not None and count < 1:
    raise ValueError(f"num_processes must be at least 1; got {count}")
  if index is not None and (index < 0 or (count is not None and index >= count)):
    raise ValueError(f"process_id {index} must lie in [0, {count if count is not None else 'num_processes'})")
  kwargs = dict(coordinator_address=address, num_processes=count, process_id=index)
  return {k: v for k, v in kwargs.items() if v is not None}


def initialize(**kwargs) -> bool:
  """Starts `jax.distributed` when `initialize_kwargs(**kwargs)` asks for it; returns whether it did
  (True as well when it was already running)."""
  settings = initialize_kwargs(**kwargs)
  if settings is None:
    return False
  import jax  # noqa: PLC0415  (here: launchers read this module's variable names without loading JAX)

  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**settings)
  return True


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[], bool]:
  """Defines `--distributed`, `--coordinator_address`, `--num_processes` and `--process_id` for an
  entry point; returns `start()`, which calls `initialize` with their values once flags are parsed."""
  switch = flags.DEFINE_bool("distributed", None, f"Run as one process of several (jax.distributed); "
                             f"default: ${SWITCH_ENV}.", flag_values=flag_values)
  address = flags.DEFINE_string("coordinator_address", None, f"host:port of process 0; default: ${ADDRESS_ENV}, "
                                "else detected from the cluster.", flag_values=flag_values)
  count = flags.DEFINE_integer("num_processes", None, f"Number of processes; default: ${NUM_PROCESSES_ENV}, else "
                               "detected.", flag_values=flag_values)
  index = flags.DEFINE_integer("process_id", None, f"This process's id; default: ${PROCESS_ID_ENV}, else detected.",
                               flag_values=flag_values)

  def start() -> bool:
    return initialize(enabled=switch.value, coordinator_address=address.value, num_processes=count.value,
                      process_id=index.value)
  return start
