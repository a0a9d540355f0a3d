"""Language-modelling batches from a flat array of token ids.

Window `i` of a split is `tokens[i*L : i*L + L + 1]`: `inputs` are its first `L` ids and
`targets` its last `L` (the next-token shift), so consecutive windows share one boundary token
and every token after the first is a target exactly once.

Training batches come from a grain `MapDataset` (index-based, so its iterator checkpoints as a
few integers and resumes exactly); evaluation batches come from a plain generator that pads the
tail with `mask=0` instead of dropping it. Every batch is
`{'inputs': int32 [B, L], 'targets': int32 [B, L], 'mask': float32 [B, L]}`.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional

import grain
import numpy as np

Batch = dict[str, np.ndarray]


def _check_tokens(tokens: np.ndarray, seq_len: int, batch_size: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array; got {tokens.dtype} of shape {tokens.shape}")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive; got {seq_len}, {batch_size}")
  return tokens


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Number of full windows (`seq_len + 1` tokens each, overlapping by one) in `num_tokens`."""
  return max(num_tokens - 1, 0) // seq_len


def windows_batch(window_ids: np.ndarray, *, tokens: np.ndarray, seq_len: int,
                  window_features: Optional[Callable[[np.ndarray], Batch]] = None) -> Batch:
  """Turns a batch of window indices into an LM batch (a module-level function so it pickles).

  `window_features(window_ids)` adds per-window fields (e.g. an offline teacher's top-k,
  `kdjax.data.teacher_cache.CachedTeacher`).
  """
  starts = np.asarray(window_ids, np.int64) * seq_len
  rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  batch = {
      "inputs": np.ascontiguousarray(rows[:, :-1]),
      "targets": np.ascontiguousarray(rows[:, 1:]),
      "mask": np.ones((rows.shape[0], seq_len), np.float32),
  }
  if window_features is not None:
    batch.update(window_features(np.asarray(window_ids)))
  return batch


def make_lm_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    drop_remainder: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    window_features: Optional[Callable[[np.ndarray], Batch]] = None,
) -> grain.MapDataset:
  """Returns a grain dataset of training batches of non-overlapping windows.

  Sharding is per process: shard `k` of `n` gets windows `k, k + n, k + 2n, ...`, truncated so
  that every shard holds the same number of windows (hosts then run the same number of steps).
  The per-process batch size is `batch_size`; the global batch is `batch_size * shard_count`.

  With `shuffle`, windows are permuted within the shard and each epoch gets a different
  permutation (grain folds the epoch into the seed). Batches are formed after repeating, so
  with `drop_remainder` only the very last partial batch is dropped, not one per epoch.

  Iterate with `iter(ds)` (or `ds.to_iter_dataset(read_options)` for threaded prefetch); the
  iterator's `get_state()` / `set_state()` checkpoint and resume the exact position.

  Args:
    tokens: 1-D integer ids of the whole split (any integer dtype; batches are int32).
    seq_len: Window length `L`.
    batch_size: Windows per batch on this process.
    seed: Shuffle seed in [0, 2**32); the same on every process.
    shuffle: Whether to shuffle windows (train) or keep corpus order.
    num_epochs: Passes over the shard; None repeats forever.
    drop_remainder: Drop a final batch smaller than `batch_size`.
    shard_index: This process's shard, e.g. `jax.process_index()`.
    shard_count: Number of shards, e.g. `jax.process_count()`.
    window_features: optional `window ids -> {name: [B, ...]}` merged into each batch.

  Returns:
    A `grain.MapDataset` of batches `{'inputs', 'targets', 'mask'}` (plus the window features).

  Raises:
    ValueError: on bad arguments, or a shard that would hold no window.
  """
  tokens = _check_tokens(tokens, seq_len, batch_size)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, {shard_count}); got {shard_index}")
  per_shard = num_windows(len(tokens), seq_len) // shard_count
  if per_shard == 0:
    raise ValueError(
        f"{len(tokens)} tokens give no window of {seq_len + 1} tokens for each of {shard_count} shards"
    )
  ds = grain.MapDataset.range(shard_index, per_shard * shard_count, shard_count)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(functools.partial(windows_batch, tokens=tokens, seq_len=seq_len, window_features=window_features))


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[Batch]:
  """Yields deterministic, unshuffled batches that cover every target token exactly once.

  The last window may be partial and the last batches padded with whole windows: both carry
  `mask=0` (and id 0) where there is no real target, so `sum(loss * mask) / sum(mask)` is the
  exact per-token average of the split. Global step `s` covers windows
  `[s*B*n, (s+1)*B*n)`; shard `k` of `n` yields rows `[k*B, (k+1)*B)` of it, so every shard
  yields the same number of batches and the shards together count each token once.

  Args:
    tokens: 1-D integer ids of the whole split.
    seq_len: Window length `L`.
    batch_size: Windows per batch on this process.
    max_batches: Stop after this many batches (a quick, partial evaluation); None for all.
    shard_index: This process's shard.
    shard_count: Number of shards.

  Yields:
    Batches `{'inputs': int32 [B, L], 'targets': int32 [B, L], 'mask': float32 [B, L]}`.
  """
  tokens = _check_tokens(tokens, seq_len, batch_size)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, {shard_count}); got {shard_index}")
  n = len(tokens)
  if n < 2:
    return
  windows = -(-(n - 1) // seq_len)  # ceil: the last window may be partial.
  per_step = batch_size * shard_count
  steps = -(-windows // per_step)
  if max_batches is not None:
    steps = min(steps, max_batches)
  offsets = np.arange(seq_len + 1)
  for step in range(steps):
    first = step * per_step + shard_index * batch_size
    positions = (first + np.arange(batch_size))[:, None] * seq_len + offsets
    real = positions < n
    # Clip so padded positions index a real token; `real` then zeroes them.
    rows = np.where(real, tokens[np.minimum(positions, n - 1)], 0).astype(np.int32)
    yield {
        "inputs": np.ascontiguousarray(rows[:, :-1]),
        "targets": np.ascontiguousarray(rows[:, 1:]),
        "mask": real[:, 1:].astype(np.float32),
    }
