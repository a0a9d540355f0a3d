"""An offline teacher: its top-k logits for every training token, precomputed into array_record.

Distilling from a cache means the teacher runs once (and need not fit beside the student), and a
step reads k (logit, id) pairs per token instead of running a forward pass. Per token the cache
stores, at the loss's temperature T:

  * the teacher's k largest logits z_t (in `value_dtype`, float16 by default) and their ids
    (uint8 / uint16 where the vocabulary allows, else int32), largest first;
  * lse = log Σ_v exp(z_t,v / T) over the whole vocabulary, so that log p = z_t / T − lse is
    exact for the stored ids;
  * tail = log Σ_{v∉S} p_v, the log-mass outside the top-k, summed over those ids from the full
    logits (float32): the `bucket` tail policy then needs no float32 floor
    (`kdjax.kernels.fused_topk_divergence(..., teacher_tail=...)`).

Layout: one record per window of the LM pipeline (`kdjax.data.lm_pipeline`: window i is
`tokens[i·L : i·L + L + 1]`), in window order, each the bytes of its four arrays back to back,
so a batch of window ids is a batch of record lookups. `spec.json` (written last, so a killed
build is never mistaken for a finished one) records the shapes, dtypes, k, T and the token
count; a cache built for other settings is refused, naming the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from kdjax.data import lm_pipeline

RECORDS = "teacher.array_record"
SPEC = "spec.json"
VALUE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """What a cache holds; two caches with equal specs are interchangeable."""

  seq_len: int
  k: int
  temperature: float
  vocab_size: int
  value_dtype: str
  num_tokens: int

  @property
  def index_dtype(self) -> str:
    """The narrowest integer type that holds every id."""
    return "uint8" if self.vocab_size <= 1 << 8 else "uint16" if self.vocab_size <= 1 << 16 else "int32"

  @property
  def num_windows(self) -> int:
    return lm_pipeline.num_windows(self.num_tokens, self.seq_len)

  def _fields(self) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of each array of one record, in storage order."""
    topk = (self.seq_len, self.k)
    return [("teacher_values", self.value_dtype, topk), ("teacher_indices", self.index_dtype, topk),
            ("teacher_lse", "float32", (self.seq_len,)), ("teacher_tail", "float32", (self.seq_len,))]

  @property
  def record_bytes(self) -> int:
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for _, dtype, shape in self._fields())

  def encode(self, arrays: dict[str, np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(arrays[name], dtype).tobytes() for name, dtype, _ in self._fields())

  def decode(self, record: bytes) -> dict[str, np.ndarray]:
    if len(record) != self.record_bytes:
      raise ValueError(f"a cache record has {len(record)} bytes, the spec says {self.record_bytes}: corrupt cache")
    out, offset = {}, 0
    for name, dtype, shape in self._fields():
      size = np.dtype(dtype).itemsize * int(np.prod(shape))
      out[name] = np.frombuffer(record, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
      offset += size
    return out


def teacher_summary(logits: jax.Array, *, k: int, temperature) -> dict[str, jax.Array]:
  """Top-k logits and ids, the log-normaliser at T and the log-mass outside the top-k, per position.

  Args:
    logits: teacher logits `[..., V]`.
    k: how many ids to keep.
    temperature: T.

  Returns:
    `teacher_values` float32 `[..., k]` (largest first), `teacher_indices` int32 `[..., k]`,
    `teacher_lse` and `teacher_tail` float32 `[...]`.
  """
  z = logits.astype(jnp.float32)
  values, indices = jax.lax.top_k(z, k)
  s = z / temperature
  lse = jax.nn.logsumexp(s, axis=-1)
  in_support = jnp.put_along_axis(jnp.zeros(z.shape, bool), indices, True, axis=-1, inplace=False)
  # The tail is summed over its own ids: 1 − Σ_S p would round a confident teacher's tail to 0.
  tail = jax.nn.logsumexp(jnp.where(in_support, -jnp.inf, s), axis=-1) - lse
  return {"teacher_values": values, "teacher_indices": indices, "teacher_lse": lse, "teacher_tail": tail}


def read_spec(directory: str) -> Optional[CacheSpec]:
  """The spec of a finished cache in `directory`, or None if there is none (or it is unfinished)."""
  path = os.path.join(directory, SPEC)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return CacheSpec(**json.load(f))


def build_teacher_cache(directory: str, *, tokens: np.ndarray, seq_len: int, k: int, temperature: float,
                        forward: Callable[[Any, dict], dict], params: Any, vocab_size: int, batch_size: int = 32,
                        value_dtype: str = "float16", place: Callable[[dict], dict] = lambda batch: batch,
                        log: Callable[[str], None] = print) -> dict:
  """Runs the teacher over every window of `tokens` and writes the cache (or reuses a finished one).

  Args:
    directory: where the cache lives.
    tokens: the 1-D ids of the split (the LM pipeline's windows of `seq_len` are cached).
    seq_len: window length L.
    k: ids kept per token (at most the vocabulary).
    temperature: T of the stored normaliser and tail (the loss must use the same T).
    forward: `(params, batch) -> {'logits': [B, L, V]}` (`kdjax.train.step.lm_forward`).
    params: the teacher's parameters.
    vocab_size: V.
    batch_size: windows per teacher call (the last batch is padded with window 0, then dropped).
    value_dtype: 'float16' (half the disk) or 'float32' for the stored logits.
    place: puts a host batch on devices (e.g. sharded over a mesh).
    log: progress lines.

  Returns:
    {'spec': CacheSpec, 'bytes': file size, 'seconds': build time (0 when reused), 'reused': bool}.

  Raises:
    ValueError: on bad arguments, or a finished cache in `directory` built for other settings.
  """
  if value_dtype not in VALUE_DTYPES:
    raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")
  if not 0 < k <= vocab_size:
    raise ValueError(f"k must lie in [1, vocab_size={vocab_size}], got {k}")
  spec = CacheSpec(seq_len=seq_len, k=k, temperature=float(temperature), vocab_size=vocab_size,
                   value_dtype=value_dtype, num_tokens=int(len(tokens)))
  records = os.path.join(directory, RECORDS)
  existing = read_spec(directory)
  if existing is not None:
    if existing != spec:
      differ = {f.name: (getattr(existing, f.name), getattr(spec, f.name)) for f in dataclasses.fields(spec)
                if getattr(existing, f.name) != getattr(spec, f.name)}
      raise ValueError(f"the teacher cache in {directory} was built for other settings (cached, requested): "
                       f"{differ}; use another directory or delete it")
    return {"spec": spec, "bytes": os.path.getsize(records), "seconds": 0.0, "reused": True}
  if spec.num_windows == 0:
    raise ValueError(f"{len(tokens)} tokens give no window of {seq_len + 1}")

  os.makedirs(directory, exist_ok=True)
  summarize = jax.jit(lambda p, inputs: teacher_summary(forward(p, {"inputs": inputs})["logits"], k=k,
                                                        temperature=temperature))
  partial = records + ".partial"
  writer = ArrayRecordWriter(partial, "group_size:1")
  start = time.perf_counter()
  tokens = np.asarray(tokens)
  for first in range(0, spec.num_windows, batch_size):
    ids = np.arange(first, first + batch_size)
    real = ids < spec.num_windows
    batch = lm_pipeline.windows_batch(np.where(real, ids, 0), tokens=tokens, seq_len=seq_len)
    summary = jax.device_get(summarize(params, place({"inputs": batch["inputs"]})["inputs"]))
    for row in np.flatnonzero(real):
      writer.write(spec.encode({name: value[row] for name, value in summary.items()}))
    if (first // batch_size) % 50 == 0:
      log(f"[teacher cache] {min(first + batch_size, spec.num_windows)}/{spec.num_windows} windows")
  writer.close()
  os.replace(partial, records)
  with open(os.path.join(directory, SPEC), "w") as f:
    json.dump(dataclasses.asdict(spec), f)
  seconds = time.perf_counter() - start
  size = os.path.getsize(records)
  log(f"[teacher cache] {spec.num_windows} windows, k={k}, {size / 2**20:.1f} MiB in {seconds:.1f} s")
  return {"spec": spec, "bytes": size, "seconds": seconds, "reused": False}


class CachedTeacher:
  """Window ids → the cached teacher fields of those windows (`lm_pipeline`'s `window_features`).

  Opens the records lazily, so it pickles into grain's worker processes.
  """

  def __init__(self, directory: str):
    spec = read_spec(directory)
    if spec is None:
      raise FileNotFoundError(f"no finished teacher cache in {directory} (no {SPEC}); build it first")
    self.spec = spec
    self._path = os.path.join(directory, RECORDS)
    self._source = None

  def __getstate__(self):
    return {"spec": self.spec, "_path": self._path, "_source": None}

  def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource([self._path])
      if len(self._source) != self.spec.num_windows:
        raise ValueError(f"{self._path} holds {len(self._source)} records, the spec {self.spec.num_windows}")
    rows = [self.spec.decode(self._source[int(i)]) for i in window_ids]
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
