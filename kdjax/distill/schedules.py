"""Schedules for the scalars of a distillation objective (KD weight α, temperature T, ...).

A schedule is any function `step -> value` that traces under jit, which is exactly what
optax's schedules are; this module only builds them from a config.
"""

from __future__ import annotations

from typing import Callable, Union

import ml_collections
import optax

Schedule = Callable[..., float]
ScheduleSpec = Union[float, int, ml_collections.ConfigDict, dict]


def _warmup_then(value: float, warmup_steps: int, after: Schedule) -> Schedule:
  return optax.join_schedules([optax.linear_schedule(0.0, value, warmup_steps), after], [warmup_steps])


def make_schedule(spec: ScheduleSpec) -> Schedule:
  """Builds a schedule from a number (constant) or a config.

  Config forms (keys beyond these raise, so a typo is never ignored):
    {kind: 'constant', value}
    {kind: 'linear', init, end, steps}                   linear from init to end, then end
    {kind: 'warmup_constant', value, warmup_steps}       0 → value linearly (DKD's warm-up)
    {kind: 'cosine', init, end, steps}                   cosine decay from init to end
  """
  if isinstance(spec, (int, float)):
    return optax.constant_schedule(float(spec))
  spec = dict(spec)
  kind = spec.pop("kind", None)
  builders = {
      "constant": lambda value: optax.constant_schedule(value),
      "linear": lambda init, end, steps: optax.linear_schedule(init, end, steps),
      "warmup_constant": lambda value, warmup_steps: _warmup_then(
          value, warmup_steps, optax.constant_schedule(value)),
      "cosine": lambda init, end, steps: optax.cosine_decay_schedule(init, steps, alpha=end / init if init else 0.0),
  }
  if kind not in builders:
    raise ValueError(f"unknown schedule kind {kind!r}; known: {sorted(builders)}")
  try:
    return builders[kind](**spec)
  except TypeError as e:
    raise ValueError(f"bad arguments {sorted(spec)} for schedule kind {kind!r}: {e}") from None
