"""Runs of a launch: one, or a config module's sweep expanded into one run per entry.

A config module may define `get_sweep()` returning a list of dicts, each one run's overrides:
`'config.<path>': value` becomes the flag `--config.<path>=value`, and `'arg': 'k=v,...'` (or a dict)
is merged into the `:arg` of `--config=path:arg`, replacing items of the same key (so a sweep over
`method=` works on top of `:runlocal`). Each run gets its own workdir, `<workdir>/<name>`, the name
being the sanitised override string: `{'arg': 'method=gkd', 'config.seed': 1}` -> `method-gkd_seed-1`.

Only the config module itself is imported (for `get_sweep` and a check of every run's `get_config`),
never JAX: planning a launch is instant and needs no accelerator.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from types import ModuleType
from typing import Any, Mapping, Sequence

ARG_KEY = "arg"
CONFIG_PREFIX = "config."


@dataclasses.dataclass(frozen=True)
class Run:
  """One invocation of the entry point.

  Attributes:
    config: `path[:arg]` for `--config`.
    workdir: the run's own directory.
    flags: further flags (`--config.<path>=value` overrides, then the launch's pass-through flags).
    name: the sanitised override string of a sweep entry ('' for a plain run).
  """

  config: str
  workdir: str
  flags: tuple[str, ...] = ()
  name: str = ""


def split_config(spec: str) -> tuple[str, str]:
  """'configs/x.py:runlocal,seed=1' -> ('configs/x.py', 'runlocal,seed=1')."""
  path, _, arg = spec.partition(":")
  return path, arg


def _arg_items(arg: str | Mapping[str, Any]) -> dict[str, str]:
  """Config-argument items by key: 'runlocal,seed=1' -> {'runlocal': 'runlocal', 'seed': 'seed=1'}."""
  if isinstance(arg, Mapping):
    return {str(k): f"{k}={format_value(v)}" for k, v in arg.items()}
  items = {}
  for item in filter(None, str(arg).split(",")):
    items[item.partition("=")[0]] = item
  return items


def merge_arg(base: str, extra: str | Mapping[str, Any]) -> str:
  """The config argument `base` with the items of `extra` replacing (or added after) those of the same key."""
  return ",".join({**_arg_items(base), **_arg_items(extra)}.values())


def format_value(value: Any) -> str:
  """A value as the text of a flag (`ml_collections` parses booleans as true / false)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def sanitise(text: str) -> str:
  """A directory name from an override string: '=' -> '-', and each run of anything else but letters,
  digits, '.' and '-' (',' included) -> one '_'."""
  name = re.sub(r"[^A-Za-z0-9.-]+", "_", text.replace("=", "-")).strip("._")
  if not name:
    raise ValueError(f"override string {text!r} gives an empty directory name")
  return name


def load_config_module(path: str) -> ModuleType:
  """Imports a config file (as `config_flags` does, by path, not as a package module)."""
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_launch_config_{sanitise(path)}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  return module


def sweep_entries(module: ModuleType) -> list[dict]:
  """The module's `get_sweep()`, checked: a non-empty list of non-empty dicts of known keys."""
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--sweep: config {module.__file__!r} defines no get_sweep()")
  entries = module.get_sweep()
  if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
    raise ValueError(f"get_sweep() of {module.__file__!r} must return a non-empty list of dicts; got {entries!r}")
  for entry in entries:
    if not isinstance(entry, Mapping) or not entry:
      raise ValueError(f"get_sweep() entry {entry!r} is not a non-empty dict of overrides")
    for key in entry:
      is_path = isinstance(key, str) and key.startswith(CONFIG_PREFIX) and len(key) > len(CONFIG_PREFIX)
      if key != ARG_KEY and not is_path:
        raise ValueError(f"get_sweep() entry {dict(entry)!r}: key {key!r} is neither {ARG_KEY!r} nor "
                         f"'{CONFIG_PREFIX}<field path>'")
  return [dict(entry) for entry in entries]


def override_string(entry: Mapping[str, Any]) -> str:
  """'k=v,...' of a sweep entry, in its order: arg items, then config paths without 'config.'."""
  parts = []
  for key, value in entry.items():
    if key == ARG_KEY:
      parts.extend(_arg_items(value).values())
    else:
      parts.append(f"{key[len(CONFIG_PREFIX):]}={format_value(value)}")
  return ",".join(parts)


def expand(config: str, workdir: str, entries: Sequence[Mapping[str, Any]] | None = None,
           extra_flags: Sequence[str] = ()) -> list[Run]:
  """The runs of a launch: `[Run(config, workdir)]` without entries, else one run per sweep entry.

  Raises:
    ValueError: when two entries give the same directory name.
  """
  if entries is None:
    return [Run(config=config, workdir=workdir, flags=tuple(extra_flags))]
  path, arg = split_config(config)
  runs, seen = [], {}
  for entry in entries:
    name = sanitise(override_string(entry))
    if name in seen:
      raise ValueError(f"sweep entries {seen[name]!r} and {dict(entry)!r} share the directory name {name!r}")
    seen[name] = dict(entry)
    merged = merge_arg(arg, entry[ARG_KEY]) if ARG_KEY in entry else arg
    overrides = tuple(f"--{key}={format_value(value)}" for key, value in entry.items() if key != ARG_KEY)
    runs.append(Run(config=f"{path}:{merged}" if merged else path, workdir=os.path.join(workdir, name),
                    flags=overrides + tuple(extra_flags), name=name))
  return runs


def plan(config: str, workdir: str, *, sweep: bool, extra_flags: Sequence[str] = ()) -> list[Run]:
  """Loads the config module, expands its sweep if asked, and builds every run's config once so
  that a bad argument fails here, before anything is started."""
  module = load_config_module(split_config(config)[0])
  runs = expand(config, workdir, sweep_entries(module) if sweep else None, extra_flags)
  for run in runs:
    try:
      arg = split_config(run.config)[1]
      # As config_flags calls it: with the argument only when there is one.
      module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
      raise ValueError(f"--config={run.config}: {e}") from e
  return runs
