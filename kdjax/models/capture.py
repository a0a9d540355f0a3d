"""Named intermediate activations of NNX models, exposed without changing how they are called.

A model marks the values a distillation method may want (block outputs, attention
probabilities, queries / keys / values, pre-logit features) with `record(name, value)`; the
call does nothing unless a caller asked for activations:

    with capture(["stage2", "pre_logits"]) as acts:
      logits = model(images)          # the model's normal call, unchanged
    acts["stage2"], acts["pre_logits"]

Inside `jax.jit` the same code traces the values into the outputs of the forward function
(`kdjax.train.step.vision_forward` returns them under `'features'`), and values nobody asked for
are never kept, so a plain call (or a forward that captures nothing) costs nothing extra.

Why not `nnx.Module.sow`: sown values become module state, so in eager use every call appends to
the model (memory that grows with the number of calls), and they would have to be popped out of
the merged module by every forward function; a capture scope is explicit about what is wanted,
for how long, and leaves the module's state alone.

Names are flat strings chosen by each model and listed by its `activation_names()` (for example
`'stage1'`, `'block3/attention_probs'`); asking for a name the model never records is an error
raised when the scope closes, so a typo in a config cannot silently train on nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Optional

# The innermost open capture scope: (wanted names or None for all, the dict being filled, every
# name recorded so far, kept for the error message of a missing name).
_SCOPE: contextvars.ContextVar[Optional[tuple[Optional[frozenset], dict, set]]] = contextvars.ContextVar(
    "kdjax_capture_scope", default=None)


def record(name: str, value: Any) -> Any:
  """Offers `value` under `name` to the open capture scope; returns `value` unchanged.

  Recording a name twice in one scope is an error: two modules claimed the same name, and one
  of them would silently win.
  """
  scope = _SCOPE.get()
  if scope is not None:
    wanted, found, seen = scope
    if name in seen:
      raise ValueError(f"activation {name!r} was recorded twice in one call: names must be unique per model")
    seen.add(name)
    if wanted is None or name in wanted:
      found[name] = value
  return value


def is_capturing(name: Optional[str] = None) -> bool:
  """Whether a scope is open (and wants `name`, if given): lets a model skip computing a value
  (such as attention probabilities a fused kernel never forms) that nobody asked for."""
  scope = _SCOPE.get()
  if scope is None:
    return False
  return name is None or scope[0] is None or name in scope[0]


@contextlib.contextmanager
def capture(names: Optional[Iterable[str]] = None, *, strict: bool = True) -> Iterator[dict[str, Any]]:
  """Collects the activations recorded while the scope is open.

  Args:
    names: the activation names to keep; None keeps every recorded one.
    strict: raise when a requested name was never recorded (off only for exploring a model).

  Yields:
    A dict that is filled with `{name: value}` as the model runs.
  """
  wanted = None if names is None else frozenset(names)
  found: dict[str, Any] = {}
  seen: set[str] = set()
  token = _SCOPE.set((wanted, found, seen))
  try:
    yield found
  finally:
    _SCOPE.reset(token)
  if strict and wanted is not None:
    missing = sorted(wanted - set(found))
    if missing:
      raise ValueError(f"activations {missing} were requested but the model never recorded them; "
                       f"it recorded {sorted(seen)}")
