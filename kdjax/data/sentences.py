"""Lines of Shakespeare as tokenised sentence batches, for sentence-embedding distillation.

Lines come straight from the shipped texts (`kdjax.data.shakespeare.list_works`), split by work with
the corpus's own held-out plays (`shakespeare.split_works`: validation is Julius Caesar and Twelfth
Night, test Macbeth and Much Ado About Nothing), so no held-out line was seen in training. A line is
kept when, with its inline stage directions (`[Aside.]`) cut out and its spaces collapsed, it has at
least `min_words` words (runs of non-space characters with a letter) and is neither part of a stage
direction nor an act / scene heading; each split is de-duplicated (first occurrence
kept), and held-out splits also drop lines that occur in training, so the neighbour measurements of
`kdjax.evaluate.embeddings` see no twin pairs and no memorised line.

Lines are tokenised once with a WordPiece tokenizer (`kdjax.data.wordpiece`) into fixed-width int32
arrays; a batch is rows of those arrays:

    {'input_ids', 'attention_mask', 'token_type_ids': int32 [B, max_len], 'index': int32 [B],
     'mask': float32 [B]}

`index` is the line's row in its split and `mask` is 1 for real examples (0 on the rows that pad the
last evaluation batch). The training stream is a grain `MapDataset` (shuffled, a new permutation every
epoch, repeated forever), so its iterator's `get_state()` is one position that `kdjax.train.loop`
checkpoints and restores exactly.
"""

from __future__ import annotations

import functools
import re
from typing import Iterator, Mapping, Optional, Sequence

import grain
import numpy as np

from kdjax.data import shakespeare, stateless_random

Tokens = Mapping[str, np.ndarray]
TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
SPLITS = ("train", "validation", "test")

# Stage directions are bracketed ([Exit.], [Aside.] ...), inline or over several lines; headings start
# with ACT or SCENE in any case; a word must have a letter (the persons' lists align columns with ").
_INLINE_DIRECTION = re.compile(r"\[[^\]]*\]")
_HEADING = re.compile(r"^(act|scene)\b", re.I)
_WORD = re.compile(r"[A-Za-z]")
_SUBSAMPLE_STREAM = 11


def text_lines(text: str, *, min_words: int = 5) -> list[str]:
  """The kept lines of one work (see the module docstring), in reading order, duplicates included.

  Args:
    text: a whole work.
    min_words: the fewest words (with a letter) a kept line has.

  Raises:
    ValueError: `min_words` < 1.
  """
  if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
    raise ValueError(f"min_words must be a positive int, got {min_words!r}")
  kept = []
  for line in shakespeare.strip_gutenberg_boilerplate(text).splitlines():
    # What is left of a line after its inline directions; a line that opens or closes a direction
    # spanning several lines is part of it.
    line = " ".join(_INLINE_DIRECTION.sub(" ", line).split())
    if "[" in line or "]" in line or _HEADING.match(line):
      continue
    if sum(1 for word in line.split() if _WORD.search(word)) >= min_words:
      kept.append(line)
  return kept


def _split_lines(titles: Sequence[str], works: Mapping[str, object], min_words: int, exclude: frozenset) -> list[str]:
  seen, lines = set(exclude), []
  for title in titles:
    for line in text_lines(works[title].read_text(encoding="utf-8", errors="replace"), min_words=min_words):
      if line not in seen:
        seen.add(line)
        lines.append(line)
  return lines


@functools.lru_cache(maxsize=8)
def _all_lines(min_words: int) -> dict[str, tuple[str, ...]]:
  works = shakespeare.list_works()
  titles = shakespeare.split_works(list(works))
  train = _split_lines(titles["train"], works, min_words, frozenset())
  out = {"train": tuple(train)}
  for split in ("validation", "test"):
    out[split] = tuple(_split_lines(titles[split], works, min_words, frozenset(train)))
  return out


def load_lines(split: str, *, min_words: int = 5, max_lines: Optional[int] = None, seed: int = 0) -> list[str]:
  """The de-duplicated kept lines of a split (works in title order, lines in reading order).

  Args:
    split: 'train', 'validation' or 'test' (`kdjax.data.shakespeare.split_works`).
    min_words: the fewest words a kept line has.
    max_lines: keep a subset of this many lines (all when None or larger than the split), chosen by
      `stateless_random.hash64(seed, stream, row)` and returned in their original order, so the subset
      is the same on every machine and a larger one contains a smaller one of the same seed.
    seed: the subset's seed.

  Raises:
    ValueError: an unknown split or a `max_lines` < 1.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
  lines = list(_all_lines(min_words)[split])
  if max_lines is None or max_lines >= len(lines):
    return lines
  if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1:
    raise ValueError(f"max_lines must be a positive int or None, got {max_lines!r}")
  keys = stateless_random.hash64(seed, _SUBSAMPLE_STREAM, np.arange(len(lines)))
  rows = np.sort(np.argsort(keys, kind="stable")[:max_lines])
  return [lines[i] for i in rows]


def tokenize(tokenizer, lines: Sequence[str], *, max_len: int) -> dict[str, np.ndarray]:
  """`tokenizer.encode_batch(lines, max_len)` (`[CLS] pieces [SEP]`, truncated, right-padded).

  Raises:
    ValueError: no lines.
  """
  if not lines:
    raise ValueError("tokenize needs at least one line")
  return tokenizer.encode_batch(list(lines), max_len)


def _check_tokens(tokens: Tokens) -> int:
  missing = [k for k in TOKEN_FIELDS if k not in tokens]
  if missing:
    raise ValueError(f"token arrays lack {missing}; need {list(TOKEN_FIELDS)}, got {sorted(tokens)}")
  shapes = {k: np.shape(tokens[k]) for k in TOKEN_FIELDS}
  if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
    raise ValueError(f"token arrays must all be [N, max_len]; got {shapes}")
  return shapes["input_ids"][0]


def gather_rows(rows: np.ndarray, *, tokens: Tokens, valid: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """The batch of `rows` (module level so that grain can pickle it); `valid` gives its `mask`."""
  rows = np.asarray(rows, np.int64)
  batch = {k: np.asarray(tokens[k][rows], np.int32) for k in TOKEN_FIELDS}
  batch["index"] = rows.astype(np.int32)
  batch["mask"] = np.ones(len(rows), np.float32) if valid is None else np.asarray(valid, np.float32)
  return batch


def make_sentence_dataset(tokens: Tokens, *, batch_size: int, seed: int, shuffle: bool = True,
                          num_epochs: Optional[int] = None, shard_index: int = 0,
                          shard_count: int = 1) -> grain.MapDataset:
  """The training stream: a grain dataset of batches of lines.

  Shard `k` of `n` holds lines `k, k + n, ...` (truncated to equal counts, so hosts run the same
  number of steps); with `shuffle`, every epoch is a fresh permutation of the shard (grain folds the
  epoch into `seed`). Batches are formed after repeating, so an epoch boundary may fall inside one.
  Iterate with `iter(ds)`; the iterator's `get_state()` / `set_state()` checkpoint it.

  Args:
    tokens: `tokenize`'s arrays.
    batch_size: lines per batch on this process.
    seed: shuffle seed, in [0, 2**32).
    shuffle: shuffle (training) or keep row order.
    num_epochs: passes over the shard; None repeats forever.
    shard_index, shard_count: this process's shard (`jax.process_index()`, `jax.process_count()`).

  Raises:
    ValueError: bad arrays or arguments, or a shard smaller than one batch.
  """
  n = _check_tokens(tokens)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, {shard_count}), got {shard_index}")
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
  per_shard = n // shard_count
  if per_shard < batch_size:
    raise ValueError(f"{n} lines over {shard_count} shard(s) leave {per_shard} per shard, fewer than one batch "
                     f"of {batch_size}")
  ds = grain.MapDataset.range(shard_index, per_shard * shard_count, shard_count)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
  return ds.map(functools.partial(gather_rows, tokens=dict(tokens)))


def eval_batches(tokens: Tokens, *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every line once, in row order; the last batch is filled by repeating the last line with `mask` 0
  (real tokens, so no model sees an empty row), so `sum(x * mask)` counts each line exactly once."""
  n = _check_tokens(tokens)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    yield gather_rows(np.minimum(rows, n - 1), tokens=tokens, valid=rows < n)
