"""Batches of one text for two tokenizers: a student's ids, a teacher's ids and their alignments.

Cross-tokenizer distillation (`kdjax.losses.tokens`, `kdjax.distill.cross_tokenizer`) needs,
for every training window, both tokenisations of the *same* bytes and the host-computed index
arrays that say which parts of them correspond. Windows are therefore defined in bytes, not in
tokens: window `i` is the `window_bytes` bytes from `starts[i]`, with

    starts[i] ≈ i · (window_bytes − 1)

moved forward to the next UTF-8 character boundary (a no-op on ASCII text), so consecutive
windows share one boundary byte as in `kdjax.data.lm_pipeline` and, with a byte-level student on
ASCII text, every byte after the first is a student target exactly once per epoch. Each side's tokens are
padded to a fixed length, so every example has the same shapes and the step jits once:

  * `inputs`, `targets`, `mask` `[L_s]`: the student's next-token batch (what
    `kdjax.distill.strategies.LogitDistillation` reads);
  * `teacher_inputs`, `teacher_targets`, `teacher_mask` `[L_t]`: the same for the teacher;
  * `pair_student_index`, `pair_teacher_index`, `pair_where` `[P = min(L_s, L_t)]`: a
    `PositionAlignment` of the positions whose tokens end at the same byte *and* both have
    logits (ULD);
  * `chunk_student_chunk_ids` `[L_s + 1]`, `chunk_teacher_chunk_ids` `[L_t + 1]`,
    `chunk_where` `[C = min(L_s, L_t) + 1]`, `chunk_spans` `[C, 2]`: a `ChunkAlignment` over the
    tokens of the text (token 0 included, unscored: it has no prediction), for ALM;
  * `num_bytes` `[]`: how many bytes of the window both tokenisations cover.

An alignment's fields sit under `{prefix}_{field}` with the field names of
`kdjax.losses.tokens.PositionAlignment` ('pair') and `ChunkAlignment` ('chunk'):
`alignment_from_batch` rebuilds them.

A side holds at most `L + 1` tokens (L inputs and the last target). When a window needs more
on either side, it is cut at the last byte where both tokenisations end a token and both still
fit; the rest of the window is padding (`mask` 0, no pair, no chunk). A trailing multi-byte
character that the window cuts is dropped the same way. With a byte student of
`L_s = window_bytes − 1` only the teacher's `L_t` can cut an ASCII window: choose it so that
few windows are cut (`count_truncated` counts them).

Training batches come from a grain `MapDataset` over window indices, like
`lm_pipeline.make_lm_dataset`: shuffled per epoch from a seed, sharded per process, and its
iterator's `get_state()` / `set_state()` checkpoint and resume the exact position.
"""

from __future__ import annotations

import functools
from typing import Optional, Protocol, TypeVar

import grain
import numpy as np

from kdjax.losses import tokens as token_losses

Example = dict[str, np.ndarray]
_Alignment = TypeVar("_Alignment", token_losses.PositionAlignment, token_losses.ChunkAlignment)

PAIR_PREFIX = "pair"
CHUNK_PREFIX = "chunk"


class OffsetTokenizer(Protocol):
  """What the pipeline needs of a tokenizer (`ByteTokenizer`, `BPETokenizer`)."""

  def encode_with_offsets(self, text: bytes) -> tuple[np.ndarray, np.ndarray]:
    ...


# ------------------------------------------------------------------------------------------------
# Windows in bytes.


def _is_char_start(data: np.ndarray) -> np.ndarray:
  """UTF-8 continuation bytes are 10xxxxxx; every other byte starts a character."""
  return (np.asarray(data, np.uint8) & 0xC0) != 0x80


def window_starts(data: np.ndarray, window_bytes: int) -> np.ndarray:
  """The first byte of every full window, each on a UTF-8 character boundary.

  Args:
    data: `[n]` bytes of a split (uint8 ids, as `text_sources.load_split_tokens` returns).
    window_bytes: bytes per window, at least 2.

  Returns:
    `[num_windows]` int64 start offsets, increasing, each with `start + window_bytes <= n`.
  """
  if window_bytes < 2:
    raise ValueError(f"window_bytes must be at least 2 (one input and one target); got {window_bytes}")
  stride = window_bytes - 1
  boundaries = np.flatnonzero(_is_char_start(data))
  wanted = np.arange(max(len(data) - 1, 0) // stride, dtype=np.int64) * stride
  snapped = np.searchsorted(boundaries, wanted)
  starts = boundaries[snapped[snapped < boundaries.size]].astype(np.int64)
  return starts[starts + window_bytes <= len(data)]


def complete_characters(data: np.ndarray) -> int:
  """How many leading bytes of `data` form whole UTF-8 characters (a cut last one is left out).

  Only the last character can be cut: `data` is assumed to start on a character boundary.
  """
  data = np.asarray(data, np.uint8)
  starts = np.flatnonzero(_is_char_start(data[-4:]))
  if starts.size == 0:
    return len(data)
  last = len(data) - min(len(data), 4) + int(starts[-1])
  lead = int(data[last])
  # The lead byte's high bits give the character's length: 0xxxxxxx 1, 110xxxxx 2, 1110xxxx 3, 11110xxx 4.
  length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
  return len(data) if last + length <= len(data) else last


def window_text(data: np.ndarray, start: int, window_bytes: int) -> bytes:
  """The window's bytes from `start`, without a multi-byte character cut at its end.

  Raises:
    ValueError: if not even one character fits (a window shorter than a character).
  """
  window = np.asarray(data[start:start + window_bytes], np.uint8)
  text = window[:complete_characters(window)].tobytes()
  if not text:
    raise ValueError(f"the window at byte {start} holds no whole character: raise window_bytes ({window_bytes})")
  return text


# ------------------------------------------------------------------------------------------------
# One example.


def _fitting_end(student_offsets: np.ndarray, teacher_offsets: np.ndarray, student_capacity: int,
                 teacher_capacity: int) -> int:
  """The last byte offset that ends a token on both sides with each side within its capacity."""
  limit = min(student_offsets[min(len(student_offsets), student_capacity) - 1, 1],
              teacher_offsets[min(len(teacher_offsets), teacher_capacity) - 1, 1])
  shared = np.intersect1d(student_offsets[:, 1], teacher_offsets[:, 1], assume_unique=True)
  shared = shared[shared <= limit]
  if shared.size == 0:
    raise ValueError(f"no common token boundary within the first {student_capacity} student and "
                     f"{teacher_capacity} teacher tokens of a window: raise the sequence lengths")
  return int(shared[-1])


def _next_token_fields(ids: np.ndarray, length: int, prefix: str) -> Example:
  """`{prefix}inputs/targets/mask` of `length` positions from the `<= length + 1` ids of a text."""
  padded = np.zeros(length + 1, np.int32)
  padded[:ids.size] = ids
  return {f"{prefix}inputs": padded[:-1], f"{prefix}targets": padded[1:],
          f"{prefix}mask": (np.arange(length) < ids.size - 1).astype(np.float32)}


def _logit_pairs(student_offsets: np.ndarray, teacher_offsets: np.ndarray, student_length: int,
                 teacher_length: int) -> token_losses.PositionAlignment:
  """`align_positions`, keeping the pairs whose positions are model inputs (so have logits).

  Only the last token of a full side is not an input; every other pair is kept, and they are
  at most min(L_s, L_t).
  """
  pairs = token_losses.align_positions(student_offsets, teacher_offsets)
  keep = pairs.where & (pairs.student_index < student_length) & (pairs.teacher_index < teacher_length)
  size = min(student_length, teacher_length)

  def padded(values, dtype):
    out = np.zeros(size, dtype)
    out[:int(keep.sum())] = values[keep]
    return out

  return token_losses.PositionAlignment(padded(pairs.student_index, np.int32),
                                        padded(pairs.teacher_index, np.int32), padded(keep, bool))


def _alignment_fields(alignment, prefix: str) -> Example:
  return {f"{prefix}_{name}": value for name, value in alignment._asdict().items()}


def alignment_from_batch(kind: type[_Alignment], batch, prefix: str) -> _Alignment:
  """Rebuilds a `PositionAlignment` (prefix 'pair') or `ChunkAlignment` ('chunk') from a batch.

  Works on NumPy and traced arrays alike (the strategies call it inside the step).
  """
  return kind(*(batch[f"{prefix}_{name}"] for name in kind._fields))


def make_example(window: int, *, data: np.ndarray, starts: np.ndarray, window_bytes: int,
                 student_tokenizer: OffsetTokenizer, teacher_tokenizer: OffsetTokenizer,
                 student_length: int, teacher_length: int) -> Example:
  """The fields of one window (see the module docstring); module-level so that it pickles.

  Args:
    window: the window's index into `starts`.
    data: the split's bytes.
    starts: `window_starts(data, window_bytes)`.
    window_bytes: bytes per window.
    student_tokenizer: gives the student's ids and byte offsets.
    teacher_tokenizer: likewise for the teacher.
    student_length: L_s, the student's input positions.
    teacher_length: L_t, the teacher's input positions.

  Returns:
    The example's arrays, the same shapes for every window.
  """
  text = window_text(data, int(starts[window]), window_bytes)
  student_ids, student_offsets = student_tokenizer.encode_with_offsets(text)
  teacher_ids, teacher_offsets = teacher_tokenizer.encode_with_offsets(text)
  end = _fitting_end(student_offsets, teacher_offsets, student_length + 1, teacher_length + 1)
  student_kept = student_offsets[:, 1] <= end
  teacher_kept = teacher_offsets[:, 1] <= end
  student_ids, student_offsets = student_ids[student_kept], student_offsets[student_kept]
  teacher_ids, teacher_offsets = teacher_ids[teacher_kept], teacher_offsets[teacher_kept]

  # Token 0 of each side has no prediction (no BOS): its chunk's likelihood would be incomplete.
  chunks = token_losses.align_chunks(
      student_offsets, teacher_offsets, student_length=student_length + 1, teacher_length=teacher_length + 1,
      max_chunks=min(student_length, teacher_length) + 1, student_scored=np.arange(student_ids.size) > 0,
      teacher_scored=np.arange(teacher_ids.size) > 0)
  pairs = _logit_pairs(student_offsets, teacher_offsets, student_length, teacher_length)
  return {
      **_next_token_fields(student_ids, student_length, ""),
      **_next_token_fields(teacher_ids, teacher_length, "teacher_"),
      **_alignment_fields(pairs, PAIR_PREFIX),
      **_alignment_fields(chunks, CHUNK_PREFIX),
      "num_bytes": np.asarray(end, np.int32),
  }


# ------------------------------------------------------------------------------------------------
# Datasets.


def make_cross_tokenizer_dataset(
    data: np.ndarray,
    *,
    window_bytes: int,
    student_tokenizer: OffsetTokenizer,
    teacher_tokenizer: OffsetTokenizer,
    student_length: int,
    teacher_length: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: Optional[int],
    drop_remainder: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
  """A grain dataset of batches of windows, each tokenised for both models and aligned.

  Sharding, shuffling and repetition follow `lm_pipeline.make_lm_dataset`: shard `k` of `n`
  gets windows `k, k + n, ...` (the same number per shard), shuffled per epoch from `seed`,
  batched after repeating. Tokenisation and alignment run lazily per example, on the host.

  Args:
    data: `[n]` bytes of the split (uint8).
    window_bytes: bytes per window; `student_length + 1` for a byte-level student.
    student_tokenizer: the student's tokenizer (e.g. `ByteTokenizer()`).
    teacher_tokenizer: the teacher's (e.g. a `BPETokenizer`).
    student_length: L_s, the student's input positions.
    teacher_length: L_t, the teacher's input positions.
    batch_size: windows per batch on this process.
    seed: shuffle seed in [0, 2**32).
    shuffle: shuffle the windows (train) or keep corpus order.
    num_epochs: passes over the shard; None repeats forever.
    drop_remainder: drop a final batch smaller than `batch_size`.
    shard_index: this process's shard.
    shard_count: number of shards.

  Returns:
    A `grain.MapDataset` of batches of the fields in the module docstring, each with a leading
    batch axis.

  Raises:
    ValueError: on bad arguments, or a shard that would hold no window.
  """
  data = np.asarray(data)
  if data.ndim != 1 or data.dtype != np.uint8:
    raise ValueError(f"data must be the 1-D uint8 bytes of a split; got {data.dtype} of shape {data.shape}")
  if min(student_length, teacher_length, batch_size) < 1:
    raise ValueError(f"student_length, teacher_length and batch_size must be positive; got "
                     f"{student_length}, {teacher_length}, {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, {shard_count}); got {shard_index}")
  starts = window_starts(data, window_bytes)
  per_shard = len(starts) // shard_count
  if per_shard == 0:
    raise ValueError(f"{len(data)} bytes give no window of {window_bytes} bytes for each of {shard_count} shards")
  ds = grain.MapDataset.range(shard_index, per_shard * shard_count, shard_count)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(functools.partial(
      make_example, data=data, starts=starts, window_bytes=window_bytes, student_tokenizer=student_tokenizer,
      teacher_tokenizer=teacher_tokenizer, student_length=student_length, teacher_length=teacher_length))
  return ds.batch(batch_size, drop_remainder=drop_remainder)


def count_truncated(data: np.ndarray, *, window_bytes: int, teacher_tokenizer: OffsetTokenizer,
                    teacher_length: int, max_windows: Optional[int] = None) -> tuple[int, int]:
  """How many windows hold more than `teacher_length + 1` teacher tokens (and would be cut).

  Returns:
    `(cut windows, windows looked at)` over the first `max_windows` windows (all by default).
  """
  starts = window_starts(data, window_bytes)[:max_windows]
  cut = 0
  for start in starts:
    ids, _ = teacher_tokenizer.encode_with_offsets(window_text(data, int(start), window_bytes))
    cut += int(ids.size > teacher_length + 1)
  return cut, len(starts)
