"""A spelling checker for byte-level text: the verifier of teacher traces and a pass-rate metric.

Rejection-sampling distillation ("Not All Correct Answers Are Equal: Why Your Distillation Source
Matters") keeps only the teacher outputs a checker accepts; REDI (Xu et al. 2025, arXiv 2505.24850)
also uses the rejected ones as negatives. On a byte-level corpus the checkable property is
spelling: a continuation is accepted iff every complete word in it is a word of the training text.

Definitions (the same for the word list and for the rows checked):
  * a word is a maximal run of ASCII letters and apostrophes (`[A-Za-z']+`), compared in lower
    case, so that a capitalised line start or an all-caps speaker name counts as the word itself;
  * the word list holds the words occurring at least `min_count` times in the training bytes;
  * in a row (a continuation of `length` bytes), a run touching byte 0 or byte `length - 1` is a
    partial word (it may continue the prompt's last word, or go on past the sample) and is not
    checked; every other run is a complete word;
  * a row is accepted iff it has at least `min_words` complete words and all of them are listed.
    `min_words = 1` (the default) rejects a row with nothing to check, such as one long run of
    letters, which would otherwise pass vacuously; `min_words = 0` is the literal "every word"
    rule.

Bytes outside ASCII (pieces of UTF-8 characters) separate words like punctuation does.
"""

from __future__ import annotations

import collections
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models import sampling

_WORD = re.compile(rb"[a-z']+")


class WordCheck(NamedTuple):
  """The checker's verdict on a batch of rows.

  Attributes:
    accepted: bool `[B]`.
    words: int `[B]`, complete words per row.
    valid_words: int `[B]`, complete words found in the word list.
  """

  accepted: np.ndarray
  words: np.ndarray
  valid_words: np.ndarray

  @property
  def valid_fraction(self) -> np.ndarray:
    """valid_words / words per row; NaN for a row without complete words (nothing was measured)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.words > 0, self.valid_words / np.maximum(self.words, 1), np.nan)


def _words(text: bytes) -> list[bytes]:
  return _WORD.findall(text.lower())


def complete_words(row: bytes) -> list[bytes]:
  """The lower-cased complete words of one row: the runs that touch neither end of it."""
  return [m.group() for m in _WORD.finditer(row.lower()) if m.start() > 0 and m.end() < len(row)]


class WordChecker:
  """Accepts a byte row iff its complete words are words of a training text (module docstring).

  Args:
    counts: occurrences of each lower-cased word in the training text.
    min_count: a word is listed iff it occurs at least this often.
    min_words: the fewest complete words an accepted row has.
  """

  def __init__(self, counts: collections.Counter, *, min_count: int = 1, min_words: int = 1):
    if not isinstance(min_count, (int, np.integer)) or min_count < 1:
      raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
    if not isinstance(min_words, (int, np.integer)) or min_words < 0:
      raise ValueError(f"min_words must be an int >= 0, got {min_words!r}")
    self.min_count, self.min_words = int(min_count), int(min_words)
    self.vocabulary = frozenset(w for w, n in counts.items() if n >= min_count)
    if not self.vocabulary:
      raise ValueError(f"no word occurs at least min_count={min_count} times in the training text")

  @classmethod
  def from_tokens(cls, byte_ids, min_count: int = 1, min_words: int = 1) -> "WordChecker":
    """The checker whose word list is that of the byte ids `byte_ids` (e.g. the training split)."""
    ids = np.asarray(byte_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() > 255)):
      raise ValueError(f"byte_ids must be a 1-D array of byte ids in [0, 256), got {ids.dtype} {ids.shape}")
    return cls(collections.Counter(_words(ids.astype(np.uint8).tobytes())), min_count=min_count,
               min_words=min_words)

  def __len__(self) -> int:
    return len(self.vocabulary)

  def __contains__(self, word: str | bytes) -> bool:
    return (word.encode() if isinstance(word, str) else bytes(word)).lower() in self.vocabulary

  def check(self, byte_rows, lengths=None) -> WordCheck:
    """Checks rows of byte ids.

    Args:
      byte_rows: int `[B, N]` byte ids (e.g. `Generation.tokens`).
      lengths: int `[B]` in `[0, N]`, the valid bytes of each row (e.g. `Generation.mask.sum(1)`);
        None means every row is `N` long.
    """
    rows = np.asarray(byte_rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
      raise ValueError(f"byte_rows must be integer [batch, length], got {rows.dtype} {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() > 255):
      raise ValueError(f"byte_rows must hold byte ids in [0, 256), got values in [{rows.min()}, {rows.max()}]")
    batch, width = rows.shape
    lengths = np.full((batch,), width) if lengths is None else np.asarray(lengths)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f"lengths must be integer of shape ({batch},), got {lengths.dtype} {lengths.shape}")
    if np.any((lengths < 0) | (lengths > width)):
      raise ValueError(f"lengths must lie in [0, {width}], got {lengths.tolist()}")
    data = rows.astype(np.uint8)
    words = np.zeros((batch,), np.int64)
    valid = np.zeros((batch,), np.int64)
    for b in range(batch):
      found = complete_words(data[b, :lengths[b]].tobytes())
      words[b] = len(found)
      valid[b] = sum(w in self.vocabulary for w in found)
    return WordCheck(accepted=(words >= self.min_words) & (valid == words), words=words, valid_words=valid)

  def pass_rate(self, graphdef, params: Any, prompts, sampling_config: sampling.SamplingConfig, key: jax.Array, *,
                batch_sharding: Optional[jax.sharding.Sharding] = None) -> dict[str, float]:
    """Samples a continuation of every prompt from the model and checks them.

    Args:
      graphdef, params: the `DecoderLM` (`nnx.split`).
      prompts: int `[B, P]`, full rows (e.g. the first P bytes of held-out windows).
      sampling_config: how the continuations are drawn (`max_new_tokens` is their length).
      key: the sampling key.
      batch_sharding: optional sharding of the prompts and samples along the batch.

    Returns:
      `pass_rate` (share of accepted rows), `valid_word_rate` (valid / all complete words, over the
      whole batch), `words_per_row` and `rows`.
    """
    generate = sampling.make_generate(graphdef, sampling_config, batch_sharding=batch_sharding)
    generation = generate(params, jnp.asarray(prompts, jnp.int32), None, key)
    tokens, mask = jax.device_get((generation.tokens, generation.mask))
    verdict = self.check(tokens, np.asarray(mask).sum(axis=1))
    total = int(verdict.words.sum())
    return {"pass_rate": float(verdict.accepted.mean()),
            "valid_word_rate": float(verdict.valid_words.sum()) / total if total else float("nan"),
            "words_per_row": float(verdict.words.mean()), "rows": float(len(verdict.accepted))}
