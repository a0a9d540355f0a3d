"""Device mesh and parameter sharding rules driven by the config.

A mesh is named axes with sizes, e.g. `{'data': -1}` (−1 fills the remaining devices) or
`{'data': 2, 'fsdp': 2, 'tensor': 2}`. Batches are split along their leading axis over the data
axes ('data' and 'fsdp'); any other axis ('tensor') splits only what the rules put on it.

Parameters are placed by rules: an ordered list of `(regex, action)` pairs matched in full
(`re.fullmatch`) against each parameter's path ('blocks/0/attn/q'); the first match wins and
unmatched parameters are replicated. An action is either

  * an explicit spec: one entry per leading dimension, each a mesh axis, a tuple of axes or None,
    e.g. `(None, 'tensor')`; `()` replicates; or
  * a string of operations joined by '|', applied left to right to an all-replicated spec:
      - `replicate`;
      - `logical`: every dimension's logical name (an NNX parameter's `out_sharding` metadata,
        see `kdjax.models.decoder`) goes through the logical axis rules, a list of
        `(logical name, mesh axis | tuple of axes | None)`: the first entry for the name whose
        mesh axes this parameter does not use yet wins (so a name may list fall-backs, as in
        Flax's logical partitioning); a name without an entry stays replicated;
      - `fsdp(axis='fsdp', min_size=2**20)`: shards the largest still-replicated dimension
        divisible by the axis size (the first such on ties) of every parameter with at least
        `min_size` elements (big_vision's `fsdp`, which measures 4 MiB instead); a no-op for a
        parameter that already uses the axis, an error for a big one that no dimension fits.
    `logical|fsdp`, for example, tensor-shards by name and splits the rest over 'fsdp' (the
    fsdp + tensor layout MaxText gives large models).

`ShardingRules` bundles one model's rules with its logical table. Teacher and student each get
their own (`rules_from_config`), so a large teacher can be tensor-sharded while the student stays
data-parallel. Rules are checked against the mesh and the parameters' shapes from abstract values
only, so a bad rule fails before anything is compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AxisSpec = Optional[Union[str, Sequence[str]]]  # one dimension's placement: a mesh axis, several, or None
Action = Union[str, Sequence[AxisSpec]]
Rules = Sequence[tuple[str, Action]]
LogicalRules = Sequence[tuple[str, AxisSpec]]

# Elements, i.e. big_vision's 4 MiB threshold in float32: gathering a smaller array every step costs
# more time than splitting it saves memory.
FSDP_MIN_SIZE = 2**20


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


def _freeze(value):
  """Config lists as tuples (hashable, and what the config flags can override)."""
  return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _pairs(entries, what: str) -> tuple:
  if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
    raise ValueError(f"{what}s must be a list of (name, value) pairs, got {entries!r}")
  for entry in entries:
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"each {what} must be a (name, value) pair, got {entry!r}")
  return tuple((name, _freeze(value)) for name, value in entries)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """One model's parameter placement (see the module docstring).

  Attributes:
    params: `(regex, action)` rules; the first full match wins, unmatched parameters are replicated.
    logical: `(logical name, mesh axes)` entries, read by the `logical` operation.
  """

  params: Rules = ()
  logical: LogicalRules = ()

  def __post_init__(self):
    # Frozen dataclass: normalising the config's lists is the one write we allow ourselves.
    object.__setattr__(self, "params", _pairs(self.params or (), "sharding rule"))
    object.__setattr__(self, "logical", _pairs(self.logical or (), "logical axis rule"))


def as_rules(rules: Union[ShardingRules, Rules, None]) -> ShardingRules:
  """`rules` as `ShardingRules`: a plain list is parameter rules without a logical table."""
  return rules if isinstance(rules, ShardingRules) else ShardingRules(params=rules or ())


def rules_from_config(config, role: Optional[str] = None) -> ShardingRules:
  """One model's rules: `config[role].sharding_rules` and `config[role].logical_axis_rules`, each
  falling back to the config's top-level key of the same name when the role's is missing or empty.

  For example `config.sharding_rules = (('.*', 'replicate'),)` with `config.teacher.sharding_rules =
  (('.*', 'logical'),)` tensor-shards the teacher by `config.logical_axis_rules` and replicates the student.
  """
  section = config.get(role) if role else None

  def pick(key: str):
    own = None if section is None else section.get(key)
    return own if own else config.get(key)

  return ShardingRules(params=pick("sharding_rules"), logical=pick("logical_axis_rules"))


_OPERATIONS = {"replicate": (), "logical": (), "fsdp": ("axis", "min_size")}


def _operations(action: str) -> tuple[tuple[str, dict], ...]:
  """Parses a string action: "logical|fsdp(min_size=1024)" -> (('logical', {}), ('fsdp', {'min_size': 1024}))."""
  usage = (f"an action is a spec tuple or operations {sorted(_OPERATIONS)} joined by '|', fsdp with keyword "
           "arguments, e.g. \"logical|fsdp(axis='fsdp', min_size=65536)\"")
  ops = []
  for text in (part.strip() for part in action.split("|")):
    try:
      node = ast.parse(text, mode="eval").body
    except SyntaxError:
      raise ValueError(f"cannot parse {text!r} in sharding action {action!r}: {usage}") from None
    call = node if isinstance(node, ast.Call) else None
    head = call.func if call else node
    if not isinstance(head, ast.Name) or head.id not in _OPERATIONS or (call and call.args):
      raise ValueError(f"unknown sharding operation {text!r} in {action!r}: {usage}")
    kwargs = {}
    for keyword in call.keywords if call else ():
      if keyword.arg not in _OPERATIONS[head.id]:
        raise ValueError(f"{head.id} in {action!r} takes no argument {keyword.arg!r}; it takes "
                         f"{list(_OPERATIONS[head.id]) or 'none'}")
      try:
        kwargs[keyword.arg] = ast.literal_eval(keyword.value)
      except ValueError:
        raise ValueError(f"{head.id}({keyword.arg}=...) in {action!r} must be a literal") from None
    ops.append((head.id, kwargs))
  return tuple(ops)


def _axes(entry: AxisSpec, where: str) -> tuple[str, ...]:
  """One dimension's mesh axes as a tuple: None -> (), 'x' -> ('x',), ('x', 'y') as it is."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  if isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
    return entry
  raise ValueError(f"{where}: {entry!r} is not a mesh axis name, a tuple of names or None")


def _check_mesh_axes(axes: Iterable[str], mesh: Mesh, where: str) -> None:
  for axis in axes:
    if axis not in mesh.axis_names:
      raise ValueError(f"{where} names mesh axis {axis!r}, but the mesh has axes {tuple(mesh.axis_names)}: add it "
                       "to config.mesh (size 1 leaves it unused) or fix the rule")


def check_rules(rules: Union[ShardingRules, Rules, None], mesh: Mesh) -> ShardingRules:
  """Checks what rules say without any parameter: regexes, operations and their arguments, mesh
  axis names. Raises a ValueError naming the rule; returns the rules as `ShardingRules`."""
  rules = as_rules(rules)
  for pattern, action in rules.params:
    where = f"sharding rule {pattern!r} -> {action!r}"
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}: bad regex ({e})") from None
    if isinstance(action, str):
      for op, kwargs in _operations(action):
        if op == "fsdp":
          _check_mesh_axes(_axes(kwargs.get("axis", "fsdp"), where), mesh, where)
          min_size = kwargs.get("min_size", FSDP_MIN_SIZE)
          if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"{where}: min_size must be a non-negative int (elements), got {min_size!r}")
    elif isinstance(action, tuple):
      for entry in action:
        _check_mesh_axes(_axes(entry, where), mesh, where)
    else:
      raise ValueError(f"{where}: an action is a spec tuple or a string of operations")
  for name, entry in rules.logical:
    where = f"logical axis rule {name!r} -> {entry!r}"
    _check_mesh_axes(_axes(entry, where), mesh, where)
  return rules


def _logical(spec: list, names, table: LogicalRules, where: str) -> list:
  """Places each still-replicated dimension by its logical name: the first table entry for the name
  whose mesh axes the parameter does not use yet."""
  if names is None:
    raise ValueError(f"{where}: the parameter carries no logical axis names; give it an explicit spec or fsdp, or "
                     "annotate it (nnx.Param(value, out_sharding=names))")
  if len(names) != len(spec):
    raise ValueError(f"{where}: {len(names)} logical names {tuple(names)} for {len(spec)} dimensions")
  spec = list(spec)
  for dim, logical in enumerate(names):
    if spec[dim] or logical is None:
      continue
    used = {a for axes in spec for a in axes}
    for entry, target in table:
      axes = _axes(target, f"logical axis rule {entry!r}")
      if entry == logical and not used.intersection(axes):
        spec[dim] = axes
        break
  return spec


def _fsdp(spec: list, shape: tuple[int, ...], mesh: Mesh, where: str, axis: AxisSpec = "fsdp",
          min_size: int = FSDP_MIN_SIZE) -> list:
  """Splits the largest still-replicated dimension divisible by the axis size (the first on ties)."""
  axes = _axes(axis, where)
  size = math.prod(shape)
  if size < min_size or any(set(axes) & set(placed) for placed in spec):
    return spec
  n = math.prod(mesh.shape[a] for a in axes)
  free = [d for d, (length, placed) in enumerate(zip(shape, spec)) if not placed and length % n == 0]
  if not free:
    raise ValueError(f"{where}: no free dimension of {shape} ({size} elements, at least min_size {min_size}) is "
                     f"divisible by mesh axis {axis!r} of size {n}: change the mesh, raise min_size above {size}, or "
                     "give the parameter an earlier rule (e.g. 'replicate')")
  best = max(free, key=lambda d: (shape[d], -d))
  return spec[:best] + [axes] + spec[best + 1:]


def _partition_spec(spec: list, shape: tuple[int, ...], mesh: Mesh, names, where: str) -> P:
  used = [a for axes in spec for a in axes]
  _check_mesh_axes(used, mesh, where)
  if len(set(used)) < len(used):
    raise ValueError(f"{where}: the placement {tuple(spec)} uses a mesh axis twice; an axis splits one dimension only")
  for dim, (length, axes) in enumerate(zip(shape, spec)):
    n = math.prod(mesh.shape[a] for a in axes)
    if length % n:
      label = f"dim {dim} ({names[dim]!r})" if names else f"dim {dim}"
      raise ValueError(f"{where}: {label} of size {length} is not divisible by mesh axis {axes} of size {n}: change "
                       "the mesh or the rule (a logical name can map to None)")
  entries = [None if not axes else axes[0] if len(axes) == 1 else axes for axes in spec]
  while entries and entries[-1] is None:  # P('x', None) and P('x') are one placement; keep the short form
    entries.pop()
  return P(*entries)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: Union[ShardingRules, Rules] = (),
             logical_names: Optional[Sequence[Optional[str]]] = None) -> P:
  """The PartitionSpec of one parameter by the first matching rule (replicated if none).

  Args:
    name: the parameter's path, e.g. 'blocks/0/mlp/gate'.
    shape: its shape.
    mesh: the device mesh.
    rules: `ShardingRules`, or a list of `(regex, action)` rules.
    logical_names: one logical axis name (or None) per dimension, read by the `logical` operation.
  """
  rules = as_rules(rules)
  shape = tuple(int(d) for d in shape)
  for pattern, action in rules.params:
    if not re.fullmatch(pattern, name):
      continue
    where = f"sharding rule {pattern!r} -> {action!r} on {name} {shape}"
    if isinstance(action, str):
      spec = [()] * len(shape)
      for op, kwargs in _operations(action):
        if op == "replicate":
          spec = [()] * len(shape)
        elif op == "logical":
          spec = _logical(spec, logical_names, rules.logical, where)
        else:
          spec = _fsdp(spec, shape, mesh, where, **kwargs)
    else:
      if len(action) > len(shape):
        raise ValueError(f"{where}: the spec has more entries than the parameter has dimensions")
      spec = [_axes(entry, where) for entry in action] + [()] * (len(shape) - len(action))
    return _partition_spec(spec, shape, mesh, logical_names, where)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Union[ShardingRules, Rules] = ()) -> Any:
  """NamedShardings for every array of `tree` (abstract or concrete) from the rules.

  NNX parameters (`nnx.Variable` leaves) keep their wrappers, with the sharding as the value, and
  lend their logical axis names (`out_sharding` metadata) to the `logical` operation. When the tree
  carries logical names, a logical table entry for a name that no parameter carries (a typo) is an error.
  """
  rules = check_rules(rules, mesh)
  carried: set[str] = set()

  def one(path, leaf):
    if not isinstance(leaf, nnx.Variable):
      return NamedSharding(mesh, spec_for(path_to_str(path), np.shape(leaf), mesh, rules))
    names = leaf.get_metadata().get("out_sharding") or None
    carried.update(n for n in names or () if n is not None)
    spec = spec_for(path_to_str(path), np.shape(leaf.get_value()), mesh, rules, names)
    return leaf.replace(value=NamedSharding(mesh, spec))

  shardings = jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  unknown = sorted({name for name, _ in rules.logical} - carried)
  if carried and unknown:
    raise ValueError(f"logical_axis_rules name {unknown}, which no parameter carries; the parameters' logical axes "
                     f"are {sorted(carried)}")
  return shardings


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


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
  """Which slice of every global batch this process loads: `(shard_index, shard_count)`.

  The batch's leading axis is split over the data axes into `n` row blocks; each process holds
  the blocks of its own devices. Processes that hold the same blocks (a model axis spanning
  processes) are replicas and must load the same rows; the distinct block sets, ordered by their
  first block, are the shards. Pass the result to the data pipeline
  (`lm_pipeline.make_lm_dataset(shard_index=, shard_count=)`): the global batch is then the
  processes' batches concatenated in shard order, which is what `shard_batch` assembles. For a
  data-parallel mesh over `jax.devices()` this is `(jax.process_index(), jax.process_count())`;
  `(0, 1)` in a single-process run.

  Raises:
    ValueError: when this process holds no device of the mesh, or the processes' blocks are not
      contiguous runs of equal length (a mesh whose devices are not grouped by process along the
      data axes).
  """
  n = math.prod(mesh.shape[a] for a in data_axes(mesh))
  blocks: dict[int, set[int]] = {}
  for device, index in batch_sharding(mesh).devices_indices_map((n,)).items():
    blocks.setdefault(device.process_index, set()).update(range(n)[index[0]])
  if jax.process_index() not in blocks:
    raise ValueError(f"mesh {dict(mesh.shape)} holds no device of process {jax.process_index()}: build the mesh "
                     "over every process's devices (make_mesh uses jax.devices())")
  groups = sorted({tuple(sorted(b)) for b in blocks.values()})
  size = len(groups[0])
  if [i for g in groups for i in g] != list(range(n)) or any(len(g) != size for g in groups):
    raise ValueError(f"mesh {dict(mesh.shape)}: the processes hold batch blocks {sorted(blocks.items())}, not equal "
                     "contiguous runs: order the mesh's devices by process along the data axes")
  return groups.index(tuple(sorted(blocks[jax.process_index()]))), len(groups)


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of a global batch that this process loads (see `process_batch_shard`)."""
  check_batch_size(global_batch_size, mesh)
  return global_batch_size // process_batch_shard(mesh)[1]


def shard_rows(value, mesh: Mesh) -> jax.Array:
  """Places one array of batch rows on the mesh, split along its leading axis.

  Single process: `value` holds every row and is copied with `device_put`. Several processes:
  `value` holds this process's rows only (its shard of `process_batch_shard`) and the global array,
  `count` times as long, is assembled with `jax.make_array_from_process_local_data`, so no host
  ever holds the global batch. An array that is already global (spanning processes) is resharded.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1 or (isinstance(value, jax.Array) and not value.is_fully_addressable):
    return jax.device_put(value if isinstance(value, jax.Array) else np.asarray(value), sharding)
  local = np.asarray(value)
  if local.ndim == 0:
    raise ValueError(f"a batch field must have a leading batch axis; got a scalar {local!r}")
  count = process_batch_shard(mesh)[1]
  return jax.make_array_from_process_local_data(sharding, local, (local.shape[0] * count,) + local.shape[1:])


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a batch on the mesh, split along its leading axis: every field through `shard_rows`
  (the whole global batch in a single-process run, this process's rows in a multi-process one)."""
  return {k: shard_rows(v, mesh) for k, v in batch.items()}
