"""Tokenizers that turn text into integer ids and back.

Only a byte-level tokenizer lives here for now: it needs no vocabulary file, covers every input
(UTF-8 bytes), and keeps a character-level language model honest about what it must learn.
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """Maps text to its UTF-8 bytes, one token per byte.

  Ids are stored as `np.uint8`: a whole corpus then costs one byte per token in host memory, and
  pipelines widen to int32 only per batch.

  Attributes:
    vocab_size: Number of distinct ids, 256.
  """

  vocab_size: int = 256

  def encode(self, text: str | bytes) -> np.ndarray:
    """Encodes text to byte ids.

    Args:
      text: A string (encoded as UTF-8) or raw bytes (taken as they are, as TFDS `Text` features
        come back from a data source without TensorFlow).

    Returns:
      A 1-D `np.uint8` array of ids.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    # frombuffer shares the immutable bytes; copy so callers get an ordinary writable array.
    return np.frombuffer(data, dtype=np.uint8).copy()

  def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """Encodes text and returns each token's byte span, as `BPETokenizer.encode_with_offsets`.

    Returns:
      `(ids, offsets)`: `ids` as from `encode`; `offsets` is `[N, 2]` `np.int64`, row i being
      `(i, i + 1)`: one byte per token.
    """
    ids = self.encode(text)
    starts = np.arange(ids.size, dtype=np.int64)
    return ids, np.stack([starts, starts + 1], axis=-1)

  def decode(self, ids: np.ndarray) -> str:
    """Decodes byte ids to text.

    Args:
      ids: Integer ids in [0, 256), any shape (flattened) and any integer dtype.

    Returns:
      The decoded string. Byte sequences that are not valid UTF-8 (a model can emit them, or a
      window can cut a multi-byte character) become U+FFFD instead of raising.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"Byte ids must lie in [0, {self.vocab_size}); got [{ids.min()}, {ids.max()}].")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
