"""Tests of kdjax.data: the offline Shakespeare builder, the split loader and the LM batches.

The local dataset is built once per session into a temporary folder; nothing here may reach a
download server (a TFDS download without network hangs rather than fails).
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.data import (
    SUPPORTED_NAMES,
    ByteTokenizer,
    eval_batches,
    load_split_tokens,
    make_lm_dataset,
    num_windows,
)
from kdjax.data import shakespeare

LOCAL = "kdjax_shakespeare"


@pytest.fixture(scope="session")
def sources(data_dir):
  return tfds.data_source(LOCAL, data_dir=data_dir, download=False)


@pytest.fixture(scope="session")
def train_tokens(data_dir):
  return load_split_tokens(LOCAL, "train", data_dir=data_dir)


def _texts(source) -> str:
  return "".join(source[i]["text"].decode() for i in range(len(source)))


# --- tokenizer -------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "O, that this too too solid flesh would melt — ça"
  ids = tok.encode(text)
  assert tok.vocab_size == 256
  assert ids.dtype == np.uint8 and ids.ndim == 1
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(ids.astype(np.int32)) == text
  assert np.array_equal(tok.encode(text.encode("utf-8")), ids)


def test_byte_tokenizer_decodes_broken_utf8_with_replacement():
  tok = ByteTokenizer()
  cut = tok.encode("ça")[1:]  # Cuts the two-byte 'ç' in half.
  assert tok.decode(cut) == "\ufffda"
  with pytest.raises(ValueError, match="256"):
    tok.decode(np.array([300]))


# --- builder ---------------------------------------------------------------------------------


def test_strip_gutenberg_boilerplate():
  raw = (
      "The Project Gutenberg EBook of Hamlet\r\nlicence text\r\n"
      "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nWho's there?\r\n\r\n"
      "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n"
  )
  assert shakespeare.strip_gutenberg_boilerplate(raw) == "HAMLET\nWho's there?\n"
  assert shakespeare.strip_gutenberg_boilerplate("\n\nPlain text.\n\n\n") == "Plain text.\n"


def test_splits_hold_out_whole_works(sources):
  titles = {split: [s[i]["title"].decode() for i in range(len(s))] for split, s in sources.items()}
  assert set(titles) == {"train", "validation", "test"}
  assert titles["validation"] == sorted(shakespeare.VALIDATION_WORKS)
  assert titles["test"] == sorted(shakespeare.TEST_WORKS)
  assert len(titles["train"]) == 38
  everything = titles["train"] + titles["validation"] + titles["test"]
  assert len(everything) == len(set(everything)) == 42  # Disjoint, and nothing lost.
  assert set(everything) == set(shakespeare.list_works())
  assert not any(t.endswith("_f") for t in everything)  # No First Folio near-duplicates.


def test_split_texts_are_real_shakespeare_without_leaks(sources):
  train, validation, test = (_texts(sources[s]) for s in ("train", "validation", "test"))
  assert "To be, or not to be,--that is the question" in train
  assert "Friends, Romans, countrymen, lend me your ears" in validation
  assert "Out, damned spot!" in test
  assert "Friends, Romans, countrymen" not in train + test
  assert "Out, damned spot" not in train + validation
  assert "Gutenberg" not in train
  assert len(train) > 4_000_000 and 100_000 < len(validation) < 400_000 and 100_000 < len(test) < 400_000


def test_prepare_is_idempotent(data_dir):
  start = time.perf_counter()
  builder = shakespeare.prepare(data_dir)
  assert time.perf_counter() - start < 2.0  # Reused, not rebuilt.
  assert builder.info.splits["validation"].num_examples == 2


# --- loader ----------------------------------------------------------------------------------


def test_load_split_tokens_concatenates_records(data_dir, sources, train_tokens):
  assert train_tokens.dtype == np.uint8 and train_tokens.ndim == 1
  assert train_tokens.tobytes().decode() == _texts(sources["train"])
  validation = load_split_tokens(LOCAL, "validation", data_dir=data_dir)
  assert ByteTokenizer().decode(validation).startswith("JULIUS CAESAR")


def test_bad_name_lists_supported_names(tmp_path):
  with pytest.raises(ValueError, match="kdjax_shakespeare, tiny_shakespeare"):
    load_split_tokens("shakespeare", "train", data_dir=str(tmp_path))
  assert SUPPORTED_NAMES == ("kdjax_shakespeare", "tiny_shakespeare")


def test_tiny_shakespeare_unprepared_fails_fast_without_network(tmp_path):
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="tfds build tiny_shakespeare --file_format=array_record"):
    load_split_tokens("tiny_shakespeare", "train", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5.0


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="would download")
def test_tiny_shakespeare_download_without_tensorflow_fails_before_downloading(tmp_path):
  with pytest.raises(ImportError, match="needs TensorFlow"):
    load_split_tokens("tiny_shakespeare", "train", data_dir=str(tmp_path), allow_download=True)
  assert not list(tmp_path.rglob("*.txt"))  # Nothing was fetched.


def test_tiny_shakespeare_reads_a_prepared_copy(tmp_path):
  # Prepare the catalogue dataset offline: its own builder and record layout, but the split
  # texts handed in directly instead of downloaded (its real split step needs network and TF).
  builder = tfds.builder("tiny_shakespeare", data_dir=str(tmp_path), file_format="array_record")
  texts = {"train": "First Citizen:\nBefore we proceed", "validation": "MENENIUS:\nWhat", "test": "ROMEO:\nAy"}
  builder._split_generators = lambda dl_manager: {  # pylint: disable=protected-access
      split: builder._generate_examples(split_key=split, split_text=text)  # pylint: disable=protected-access
      for split, text in texts.items()
  }
  builder.download_and_prepare(download_config=shakespeare.OFFLINE_DOWNLOAD_CONFIG)
  for split, text in texts.items():
    tokens = load_split_tokens("tiny_shakespeare", split, data_dir=str(tmp_path))
    assert ByteTokenizer().decode(tokens) == text


# --- training batches ------------------------------------------------------------------------


def _window_ids(batches, seq_len):
  """With tokens = arange(n), a window's first input id identifies the window."""
  return np.concatenate([b["inputs"][:, 0] for b in batches]) // seq_len


def test_lm_batches_shapes_dtypes_and_shift(train_tokens):
  seq_len, batch_size = 64, 8
  ds = make_lm_dataset(
      train_tokens, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1
  )
  assert len(ds) == num_windows(len(train_tokens), seq_len) // batch_size
  batch = ds[0]
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (batch_size, seq_len)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1)
  # Unshuffled window j is tokens[j*L : j*L + L + 1]: inputs its head, targets its tail.
  for j in range(batch_size):
    window = train_tokens[j * seq_len : j * seq_len + seq_len + 1].astype(np.int32)
    np.testing.assert_array_equal(batch["inputs"][j], window[:-1])
    np.testing.assert_array_equal(batch["targets"][j], window[1:])
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_shuffle_visits_every_window_once_per_epoch_in_a_new_order():
  seq_len, n = 4, 4 * 50 + 3
  tokens = np.arange(n, dtype=np.int32)
  ds = make_lm_dataset(
      tokens, seq_len=seq_len, batch_size=5, seed=3, shuffle=True, num_epochs=2, drop_remainder=False
  )
  ids = _window_ids(list(ds), seq_len)
  first, second = ids[:50], ids[50:]
  np.testing.assert_array_equal(np.sort(first), np.arange(50))
  np.testing.assert_array_equal(np.sort(second), np.arange(50))
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, np.arange(50))


def test_shards_are_disjoint_and_equal():
  seq_len, n = 4, 4 * 41 + 1  # 41 windows: one is dropped so both shards get 20.
  tokens = np.arange(n, dtype=np.int32)
  shards = [
      _window_ids(
          list(make_lm_dataset(
              tokens, seq_len=seq_len, batch_size=4, seed=0, shuffle=True, num_epochs=1,
              shard_index=k, shard_count=2,
          )),
          seq_len,
      )
      for k in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) == 20
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) <= set(range(41))


def test_iterator_state_resumes_at_the_same_batch(train_tokens):
  ds = make_lm_dataset(train_tokens, seq_len=32, batch_size=4, seed=7, shuffle=True, num_epochs=None)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_bad_lm_arguments_raise():
  with pytest.raises(ValueError, match="no window"):
    make_lm_dataset(np.arange(5), seq_len=8, batch_size=1, seed=0, shuffle=False, num_epochs=1)
  with pytest.raises(ValueError, match="shard_index"):
    make_lm_dataset(np.arange(50), seq_len=4, batch_size=1, seed=0, shuffle=False, num_epochs=1,
                    shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="1-D integer"):
    make_lm_dataset(np.zeros((4, 4)), seq_len=2, batch_size=1, seed=0, shuffle=False, num_epochs=1)


# --- evaluation batches ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 37, 4 * 8 * 3 + 1])
@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_batches_count_every_target_once(n, shard_count):
  seq_len, batch_size = 4, 3
  tokens = np.arange(100, 100 + n, dtype=np.int32)  # Unique ids: a target identifies itself.
  counted, lengths = [], []
  for k in range(shard_count):
    batches = list(eval_batches(
        tokens, seq_len=seq_len, batch_size=batch_size, shard_index=k, shard_count=shard_count
    ))
    lengths.append(len(batches))
    for b in batches:
      assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (batch_size, seq_len)
      assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["mask"].dtype == np.float32
      real = b["mask"] > 0
      counted.extend(b["targets"][real].tolist())
      # Where a target is real, its input is the token just before it.
      np.testing.assert_array_equal(b["inputs"][real], b["targets"][real] - 1)
      assert np.all(b["targets"][~real] == 0)
  assert len(set(lengths)) == 1  # Every shard runs the same number of steps.
  assert sorted(counted) == tokens[1:].tolist()


def test_eval_batches_on_a_real_split(data_dir):
  tokens = load_split_tokens(LOCAL, "test", data_dir=data_dir)
  batches = list(eval_batches(tokens, seq_len=128, batch_size=16))
  assert sum(b["mask"].sum() for b in batches) == len(tokens) - 1
  assert len(list(eval_batches(tokens, seq_len=128, batch_size=16, max_batches=3))) == 3
  # Deterministic: a second pass gives the same batches.
  again = next(eval_batches(tokens, seq_len=128, batch_size=16))
  np.testing.assert_array_equal(again["inputs"], batches[0]["inputs"])
