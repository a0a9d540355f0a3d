"""Parsing of the `:arg` suffix of `--config=configs/x.py:arg` (big_vision style)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'runlocal,seed=3' into a ConfigDict over `defaults`.

  A bare word sets a boolean default to True; `key=value` converts value to the default's type.
  Unknown keys raise, naming the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not eq:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def from_section(cls: type, section: Optional[Any], name: str):
  """`cls(**section)` for a dataclass read from a config section (None: the defaults), an unknown
  key raising with the known ones."""
  values = dict(section or {})
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - known
  if unknown:
    raise ValueError(f"unknown {name} config keys {sorted(unknown)}; known: {sorted(known)}")
  return cls(**values)
