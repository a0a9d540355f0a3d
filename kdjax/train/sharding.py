"""Device mesh and sharding rules driven by the config.

A mesh is named axes with sizes, e.g. `{'data': -1}` (−1 fills the remaining devices) or
`{'data': 2, 'model': 4}`. Parameters are placed by rules: an ordered list of
`(regex, spec)` pairs matched against each parameter's path ('blocks/0/attn/q/kernel');
the first match wins, `spec` is a tuple with one mesh axis name (or None) per array dimension,
and unmatched parameters are replicated. Batches are split along their leading axis over
the data axes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Sequence[Optional[str]]]]


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a mesh with the given named axis sizes; at most one size may be −1 (fill)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(axes)
  sizes = [int(axes[n]) for n in names]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may have size -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(axes)}: {len(devices)} devices are not divisible by the fixed axes ({known})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices but {len(devices)} "
                     "are available: change config.mesh so the sizes multiply to the device count (or use -1)")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def path_to_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  # NNX variables are pytree nodes whose array sits under a trailing 'value' key: rules name
  # the parameter ('blocks/0/mlp/gate'), not that implementation detail.
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec of one parameter by the first matching rule (replicated if none)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, name):
      spec = tuple(spec)
      if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} -> {spec} has more entries than {name} has dims {tuple(shape)}")
      for dim, axis in zip(shape, spec):
        axis_size = 1 if axis is None else math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
        if dim % axis_size:
          raise ValueError(f"sharding rule {pattern!r}: {name} dim {dim} is not divisible by mesh axis {axis} "
                           f"of size {axis_size}")
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = ()) -> Any:
  """NamedShardings for every array leaf of `tree` (abstract or concrete) from the rules."""
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_to_str(path), np.shape(leaf), mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_axes(mesh: Mesh, names: Iterable[str] = ("data", "fsdp")) -> tuple[str, ...]:
  """The mesh axes that split the batch (those of `names` present in the mesh)."""
  return tuple(n for n in names if n in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the data axes, replicating the rest."""
  axes = data_axes(mesh)
  return NamedSharding(mesh, P(axes if axes else None))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = math.prod(mesh.shape[a] for a in data_axes(mesh))
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the data axes "
                     f"{data_axes(mesh)}: choose a multiple of {n}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, split along its leading axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
