"""BERT's WordPiece tokenizer (the one a checkpoint ships in ``tokenizer.json``), batched to arrays.

A thin wrapper over the ``tokenizers`` library: the checkpoint's own normaliser (BERT's: clean
text, lower-case, strip accents, split CJK characters), pre-tokeniser (whitespace and punctuation),
WordPiece model (greedy longest match first, ``##`` continuations, ``[UNK]`` for words it cannot
spell) and ``[CLS] ... [SEP]`` template are used as they are, so ids equal what
``transformers`` / sentence-transformers feed the same model. Padding and truncation are ours: the
file's own settings (all-MiniLM-L6-v2's pads every text to 128) are switched off, and each batch is
truncated and padded to the ``max_len`` asked for.

    tok = WordPieceTokenizer.from_dir(minilm_l6_dir())
    batch = tok.encode_batch(["To be, or not to be"], max_len=32)
    hidden = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, models

TOKENIZER_FILE = "tokenizer.json"


class WordPieceTokenizer:
  """A BERT WordPiece tokenizer that returns padded int32 batches.

  Attributes:
    vocab_size: number of ids, added special tokens included.
    pad_id, cls_id, sep_id, unk_id: ids of ``[PAD]``, ``[CLS]``, ``[SEP]`` and ``[UNK]``.
  """

  def __init__(self, tokenizer: Tokenizer):
    """Wraps a WordPiece ``tokenizers.Tokenizer``; use :meth:`from_dir` instead.

    Raises:
      ValueError: the model is not WordPiece, or one of the four special tokens is missing.
    """
    if not isinstance(tokenizer.model, models.WordPiece):
      raise ValueError(f"WordPieceTokenizer needs a WordPiece model, got {type(tokenizer.model).__name__}.")
    ids = {}
    for token in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"):
      ids[token] = tokenizer.token_to_id(token)
      if ids[token] is None:
        raise ValueError(f"the vocabulary has no {token} token.")
    tokenizer.no_padding()  # Ours, per batch (see encode_batch).
    self._tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.pad_id, self.cls_id, self.sep_id, self.unk_id = (ids[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"))

  @classmethod
  def from_dir(cls, directory: str | os.PathLike) -> "WordPieceTokenizer":
    """Reads ``directory/tokenizer.json`` (a Hugging Face model directory).

    Raises:
      FileNotFoundError: the file does not exist.
    """
    path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}.")
    return cls(Tokenizer.from_file(path))

  def tokens(self, text: str) -> list[str]:
    """The word pieces of ``text``, ``[CLS]`` and ``[SEP]`` included (for inspection)."""
    return self._tokenizer.encode(text).tokens

  def encode_batch(self, texts: Iterable[str | bytes], max_len: int) -> dict[str, np.ndarray]:
    """Tokenises single sentences into a padded batch.

    Each row is ``[CLS] pieces [SEP]`` with the pieces truncated so that the row fits ``max_len``
    (the ``[SEP]`` is kept), then right-padded with ``[PAD]``.

    Args:
      texts: the sentences, as strings or UTF-8 bytes (TFDS ``Text`` features).
      max_len: width of the batch, at least 2 (room for ``[CLS]`` and ``[SEP]``).

    Returns:
      ``{"input_ids", "attention_mask", "token_type_ids"}``, each int32 ``[len(texts), max_len]``;
      the mask is 1 on real tokens (specials included) and 0 on padding, the token types all 0.

    Raises:
      ValueError: ``max_len`` < 2 or ``texts`` is a single string (a batch of characters is never meant).
    """
    if isinstance(texts, (str, bytes)):
      raise ValueError("texts must be a sequence of sentences, not one string; wrap it in a list.")
    if not isinstance(max_len, (int, np.integer)) or max_len < 2:
      raise ValueError(f"max_len must be an int >= 2 ([CLS] and [SEP] take two positions), got {max_len!r}.")
    texts = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else t for t in texts]
    self._tokenizer.enable_truncation(max_length=int(max_len))
    encodings = self._tokenizer.encode_batch(texts)
    out = {"input_ids": np.full((len(texts), max_len), self.pad_id, np.int32),
           "attention_mask": np.zeros((len(texts), max_len), np.int32),
           "token_type_ids": np.zeros((len(texts), max_len), np.int32)}
    for row, encoding in enumerate(encodings):
      n = len(encoding.ids)
      out["input_ids"][row, :n] = encoding.ids
      out["attention_mask"][row, :n] = 1
      out["token_type_ids"][row, :n] = encoding.type_ids
    return out
