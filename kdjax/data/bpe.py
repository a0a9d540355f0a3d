"""A byte-level BPE tokenizer trained offline, with the byte offsets of every token.

Cross-tokenizer distillation (`kdjax.losses.tokens`) needs two tokenisations of the same text and,
for each, where every token sits in the UTF-8 bytes of that text. `BPETokenizer` gives a second
tokenizer beside `ByteTokenizer`: a GPT-2 style byte-level BPE trained with the Hugging Face
`tokenizers` library on a local corpus (e.g. the `kdjax_shakespeare` training split), so that a
byte-level student can be distilled from a subword teacher, or two BPEs of different vocabulary
sizes from each other, without any download.

    tok = train_on_split("kdjax_shakespeare", "train", data_dir=default_data_dir(), vocab_size=1024)
    tok.save("workdir/bpe1024")
    tok = BPETokenizer.load("workdir/bpe1024")
    ids, offsets = tok.encode_with_offsets("To be, or not to be")

Design choices:
  * Byte level, no normaliser, no prefix space, no special tokens: every token is a byte string
    and the token bytes concatenate to exactly the UTF-8 bytes of the input. Decoding is then
    lossless, and byte offsets follow from the token lengths alone. (The library's own offsets
    count characters, and tokens that split a multi-byte character overlap there.)
  * Training is deterministic given the corpus and the vocabulary size (checked across processes
    with tokenizers 0.23.3).
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdjax.data import text_sources

TOKENIZER_FILE = "tokenizer.json"
_NUM_BYTES = 256


def _byte_level_alphabet() -> dict[str, int]:
  """Maps each printable stand-in character of GPT-2's byte-level BPE back to its byte.

  Byte-level BPE spells byte b as the character chr(b) when that character is printable
  (33–126, 161–172, 174–255) and as chr(256 + k) for the k-th remaining byte otherwise, so that
  vocabulary entries are printable strings.
  """
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  others = [b for b in range(_NUM_BYTES) if b not in set(printable)]
  chars = {chr(b): b for b in printable}
  chars.update({chr(_NUM_BYTES + k): b for k, b in enumerate(others)})
  return chars


class BPETokenizer:
  """Byte-level BPE: text to ids, ids to text, and the byte span of every token.

  Ids are `np.int32` (vocabularies here are a few thousand entries; pipelines widen nothing).

  Attributes:
    vocab_size: Number of distinct ids. At most the size asked for at training time: a small
      corpus may run out of pairs to merge before.
  """

  def __init__(self, tokenizer: Tokenizer):
    """Wraps a `tokenizers.Tokenizer`; use `train_bpe`, `train_on_split` or `load` instead.

    Raises:
      ValueError: if the tokenizer is not a plain byte-level BPE (a normaliser, special tokens or
        a non-byte-level vocabulary would break the byte offsets).
    """
    if tokenizer.normalizer is not None:
      raise ValueError("BPETokenizer needs a tokenizer without normaliser: it would change the bytes")
    alphabet = _byte_level_alphabet()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
      raise ValueError("BPETokenizer needs the ids 0..vocab_size-1, each used once")
    token_bytes = [b""] * len(vocab)
    for piece, index in vocab.items():
      if not piece or any(c not in alphabet for c in piece):
        raise ValueError(f"token {piece!r} (id {index}) is not a byte-level BPE token")
      token_bytes[index] = bytes(alphabet[c] for c in piece)
    self._tokenizer = tokenizer
    self._token_bytes = token_bytes
    self._token_lengths = np.array([len(b) for b in token_bytes], np.int64)
    self.vocab_size = len(vocab)

  # ----------------------------------------------------------------------------------------------
  # Persistence.

  def save(self, directory: str) -> str:
    """Writes the tokenizer as `directory/tokenizer.json` (the `tokenizers` format).

    Returns:
      The path of the written file.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILE)
    self._tokenizer.save(path)
    return path

  @classmethod
  def load(cls, directory: str) -> "BPETokenizer":
    """Reads a tokenizer written by `save`.

    Raises:
      FileNotFoundError: if `directory/tokenizer.json` does not exist.
    """
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}; train one with kdjax.data.bpe.train_bpe")
    return cls(Tokenizer.from_file(path))

  def to_json(self) -> str:
    """The serialised tokenizer (what `save` writes): equal strings mean equal tokenizers."""
    return self._tokenizer.to_str()

  # ----------------------------------------------------------------------------------------------
  # Encoding and decoding.

  def encode(self, text: str | bytes) -> np.ndarray:
    """Encodes text to token ids.

    Args:
      text: A string, or UTF-8 bytes (as TFDS `Text` features come back without TensorFlow).

    Returns:
      A 1-D `np.int32` array of ids.

    Raises:
      UnicodeDecodeError: for bytes that are not valid UTF-8 (the `tokenizers` library takes text).
    """
    return self.encode_with_offsets(text)[0]

  def encode_with_offsets(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """Encodes text and returns where each token lies in its UTF-8 bytes.

    Args:
      text: A string, or UTF-8 bytes.

    Returns:
      `(ids, offsets)`: `ids` is `[N]` `np.int32`; `offsets` is `[N, 2]` `np.int64` with the
      half-open byte span `[start, end)` of each token in `text.encode("utf-8")`. The spans are
      non-empty, contiguous and cover the whole text: `offsets[0, 0] == 0`,
      `offsets[1:, 0] == offsets[:-1, 1]` and `offsets[-1, 1] == len(text_bytes)`.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
      text = bytes(text).decode("utf-8")
    ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    ends = np.cumsum(self._token_lengths[ids])
    num_bytes = len(text.encode("utf-8"))
    if ids.size and ends[-1] != num_bytes:
      # Only a tokenizer that rewrites its input (which __init__ rules out) can get here.
      raise RuntimeError(f"tokens cover {ends[-1]} bytes of a {num_bytes}-byte text")
    starts = ends - self._token_lengths[ids]
    return ids, np.stack([starts, ends], axis=-1).reshape(-1, 2)

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes that one token stands for."""
    return self._token_bytes[int(token_id)]

  def decode(self, ids: np.ndarray) -> str:
    """Decodes ids to text.

    Args:
      ids: Integer ids in [0, vocab_size), any shape (flattened) and any integer dtype.

    Returns:
      The decoded string. Byte sequences that are not valid UTF-8 (a model can emit them, or a
      window can cut a multi-byte character) become U+FFFD instead of raising, as in
      `ByteTokenizer.decode`.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"BPE ids must lie in [0, {self.vocab_size}); got [{ids.min()}, {ids.max()}].")
    return b"".join(self._token_bytes[i] for i in ids.tolist()).decode("utf-8", errors="replace")


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
  """Trains a byte-level BPE on in-memory texts.

  Args:
    texts: The training texts. Pre-tokenisation (GPT-2's regex) never crosses an item boundary,
      so pass whole documents rather than arbitrary slices.
    vocab_size: The vocabulary size to reach, including the 256 byte tokens; typical values
      here are 512–2048.
    min_frequency: A pair must occur at least this often to be merged.

  Returns:
    The trained tokenizer. The same texts and arguments give the same tokenizer.

  Raises:
    ValueError: if `vocab_size` < 256 (every byte needs a token).
  """
  if vocab_size < _NUM_BYTES:
    raise ValueError(f"vocab_size={vocab_size} is below the {_NUM_BYTES} byte tokens a byte-level BPE needs")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      show_progress=False,
      # All 256 bytes, seen or not, so any input (accents, emoji) stays encodable.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=[],
  )
  tokenizer.train_from_iterator(texts, trainer)
  return BPETokenizer(tokenizer)


def train_on_split(name: str, split: str, *, data_dir: str, vocab_size: int, max_bytes: int | None = None,
                   min_frequency: int = 2) -> BPETokenizer:
  """Trains a byte-level BPE on a split of a local corpus (see `text_sources.load_split_tokens`).

  Args:
    name: `kdjax_shakespeare` or `tiny_shakespeare`.
    split: A TFDS split, e.g. `train` (never train a tokenizer on held-out text).
    data_dir: The TFDS data directory.
    vocab_size: See `train_bpe`.
    max_bytes: Train on the first `max_bytes` bytes only (quick runs and tests).
    min_frequency: See `train_bpe`.

  Returns:
    The trained tokenizer.
  """
  data = text_sources.load_split_tokens(name, split, data_dir=data_dir)
  if max_bytes is not None:
    data = data[:max_bytes]
  # A cut may split a multi-byte character at the end; it becomes one U+FFFD.
  text = data.tobytes().decode("utf-8", errors="replace")
  return train_bpe([text], vocab_size=vocab_size, min_frequency=min_frequency)
