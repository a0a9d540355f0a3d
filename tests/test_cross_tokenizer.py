"""Tests of cross-tokenizer distillation: the byte-level BPE, the alignments, ULD and ALM.

Expected values come from `cross_tokenizer_reference` (float64, other algorithms) or from
invariants: round trips, partitions, permutation invariance, minima. The BPE is trained on the
first 300 kB of the local Shakespeare training split, which takes well under a second.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cross_tokenizer_reference as ref  # tests/ is on sys.path under pytest's rootdir conftest
import numpy_reference
from kdjax.data import ByteTokenizer, bpe, load_split_tokens
from kdjax.losses import masked_mean
from kdjax.losses import tokens

VOCAB = 1024
TRAIN_BYTES = 300_000
UNICODE_TEXTS = (
    "",
    "a",
    "naïve café — Ærøskøbing, 東京, 😀🎭\n\ttabs  and   spaces\r\n",
    "\x00\x7f control bytes \u200b zero width",
)


# ------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def bpe_tokenizer(data_dir):
  return bpe.train_on_split("kdjax_shakespeare", "train", data_dir=data_dir, vocab_size=VOCAB,
                            max_bytes=TRAIN_BYTES)


@pytest.fixture(scope="module")
def held_out_text(data_dir):
  """A passage of a validation play: text the tokenizer was not trained on."""
  data = load_split_tokens("kdjax_shakespeare", "validation", data_dir=data_dir)
  return ByteTokenizer().decode(data[20_000:24_000])


def _assert_tiles(offsets, num_bytes):
  """Spans are non-empty, contiguous and cover [0, num_bytes) exactly."""
  offsets = np.asarray(offsets)
  assert offsets.shape == (offsets.shape[0], 2)
  if num_bytes == 0:
    assert offsets.shape[0] == 0
    return
  assert offsets[0, 0] == 0 and offsets[-1, 1] == num_bytes
  np.testing.assert_array_equal(offsets[1:, 0], offsets[:-1, 1])
  assert np.all(offsets[:, 1] > offsets[:, 0])


# ------------------------------------------------------------------------------------------------
# Byte-level BPE.


def test_bpe_round_trip_and_byte_offsets(bpe_tokenizer, held_out_text):
  for text in (held_out_text, *UNICODE_TEXTS):
    data = text.encode("utf-8")
    ids, offsets = bpe_tokenizer.encode_with_offsets(text)
    assert ids.dtype == np.int32 and offsets.dtype == np.int64
    assert bpe_tokenizer.decode(ids) == text
    _assert_tiles(offsets, len(data))
    for token_id, (start, end) in zip(ids, offsets):
      assert bpe_tokenizer.token_bytes(token_id) == data[start:end]
    np.testing.assert_array_equal(bpe_tokenizer.encode(data), ids)  # bytes in, same ids
  # Merges learnt on Shakespeare compress unseen Shakespeare well below one token per byte.
  assert bpe_tokenizer.encode(held_out_text).size < 0.5 * len(held_out_text.encode())
  # Multi-byte characters are split into bytes where the vocabulary has no merge for them.
  emoji_ids, emoji_offsets = bpe_tokenizer.encode_with_offsets("😀")
  _assert_tiles(emoji_offsets, 4)
  assert bpe_tokenizer.decode(emoji_ids[:1]) == "\ufffd"  # a partial character decodes to U+FFFD


def test_byte_tokenizer_offsets_have_the_same_shape(held_out_text):
  ids, offsets = ByteTokenizer().encode_with_offsets(held_out_text)
  _assert_tiles(offsets, ids.size)
  np.testing.assert_array_equal(offsets[:, 1] - offsets[:, 0], 1)


def test_bpe_training_is_deterministic_and_saves(bpe_tokenizer, data_dir, tmp_path, held_out_text):
  again = bpe.train_on_split("kdjax_shakespeare", "train", data_dir=data_dir, vocab_size=VOCAB,
                             max_bytes=TRAIN_BYTES)
  assert again.to_json() == bpe_tokenizer.to_json()
  assert bpe_tokenizer.vocab_size == VOCAB  # 300 kB offer far more than 768 merges

  path = bpe_tokenizer.save(str(tmp_path / "bpe"))
  assert os.path.basename(path) == bpe.TOKENIZER_FILE
  loaded = bpe.BPETokenizer.load(str(tmp_path / "bpe"))
  assert loaded.to_json() == bpe_tokenizer.to_json()
  np.testing.assert_array_equal(loaded.encode(held_out_text), bpe_tokenizer.encode(held_out_text))

  smaller = bpe.train_on_split("kdjax_shakespeare", "train", data_dir=data_dir, vocab_size=512,
                               max_bytes=TRAIN_BYTES)
  assert smaller.vocab_size == 512
  assert smaller.encode(held_out_text).size > bpe_tokenizer.encode(held_out_text).size


def test_bpe_training_is_deterministic_across_processes(tmp_path):
  """Rust hash maps are seeded per process: train the same corpus in two fresh processes."""
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["thou", "thee", "art", "love", "night", "sweet", "the", "and", "of", "king", "é", "東"]
  corpus.write_text(" ".join(rng.choice(words, size=20_000)), encoding="utf-8")
  script = textwrap.dedent(f"""
      import hashlib, pathlib, sys
      sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
      from kdjax.data import bpe
      tok = bpe.train_bpe([pathlib.Path({str(corpus)!r}).read_text(encoding="utf-8")], vocab_size=300)
      print(hashlib.sha256(tok.to_json().encode()).hexdigest())
  """)
  digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
             for _ in range(2)}
  local = bpe.train_bpe([corpus.read_text(encoding="utf-8")], vocab_size=300)
  assert digests == {hashlib.sha256(local.to_json().encode()).hexdigest() + "\n"}


def test_bpe_bad_inputs(bpe_tokenizer, tmp_path):
  with pytest.raises(ValueError, match="below the 256 byte tokens"):
    bpe.train_bpe(["abc"], vocab_size=100)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1024\)"):
    bpe_tokenizer.decode(np.array([0, VOCAB]))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    bpe.BPETokenizer.load(str(tmp_path / "missing"))
  with pytest.raises(UnicodeDecodeError):
    bpe_tokenizer.encode(b"\xff\xfe")


# ------------------------------------------------------------------------------------------------
# Alignments.


def _offsets(cuts, length):
  """Token spans of a tokenisation of `length` bytes cut at `cuts` (interior offsets)."""
  edges = np.array([0, *sorted(set(cuts)), length])
  return np.stack([edges[:-1], edges[1:]], axis=-1)


def _check_chunk_alignment(alignment, s_off, t_off):
  """Every chunk is covered exactly by whole tokens on both sides; the chunks tile the text;
  the result equals the reference's two-pointer walk."""
  groups = ref.chunk_groups(s_off, t_off)
  num = len(groups)
  spans = alignment.spans[:num]
  _assert_tiles(spans - s_off[0, 0], s_off[-1, 1] - s_off[0, 0])
  for k, (s_group, t_group, span) in enumerate(groups):
    assert tuple(spans[k]) == span
    np.testing.assert_array_equal(np.flatnonzero(alignment.student_chunk_ids[:len(s_off)] == k), s_group)
    np.testing.assert_array_equal(np.flatnonzero(alignment.teacher_chunk_ids[:len(t_off)] == k), t_group)
    for offsets, group in ((s_off, s_group), (t_off, t_group)):
      assert offsets[group[0], 0] == span[0] and offsets[group[-1], 1] == span[1]
  assert not alignment.where[num:].any()
  np.testing.assert_array_equal(alignment.spans[num:], 0)


def test_align_chunks_hand_checked():
  # "the cat" as the| |cat and t|he| cat: cut only where both cut, after "the".
  s_off, t_off = np.array([[0, 3], [3, 4], [4, 7]]), np.array([[0, 1], [1, 3], [3, 7]])
  a = tokens.align_chunks(s_off, t_off, student_length=5, teacher_length=4)
  np.testing.assert_array_equal(a.student_chunk_ids, [0, 1, 1, 4, 4])  # padding -> C = 4
  np.testing.assert_array_equal(a.teacher_chunk_ids, [0, 0, 1, 4])
  np.testing.assert_array_equal(a.where, [True, True, False, False])
  np.testing.assert_array_equal(a.spans, [[0, 3], [3, 7], [0, 0], [0, 0]])

  # "né" is 3 bytes, n|é1|é2 at byte level. Against one token "né", one chunk; against
  # "né1"|"é2" (a token boundary inside the character) the cut falls inside "é": offsets are bytes.
  byte_level = np.array([[0, 1], [1, 2], [2, 3]])
  a = tokens.align_chunks(byte_level, np.array([[0, 3]]))
  np.testing.assert_array_equal(a.student_chunk_ids, [0, 0, 0])
  np.testing.assert_array_equal(a.teacher_chunk_ids, [0])
  np.testing.assert_array_equal(a.where, [True])
  a = tokens.align_chunks(byte_level, np.array([[0, 2], [2, 3]]))
  np.testing.assert_array_equal(a.student_chunk_ids, [0, 0, 1])
  np.testing.assert_array_equal(a.spans, [[0, 2], [2, 3]])

  # An unscored first token (no BOS) masks its chunk only.
  a = tokens.align_chunks(s_off, t_off, student_scored=[False, True, True])
  np.testing.assert_array_equal(a.where, [False, True, False])


def test_align_positions_hand_checked():
  s_off, t_off = np.array([[0, 3], [3, 4], [4, 7]]), np.array([[0, 1], [1, 3], [3, 7]])
  a = tokens.align_positions(s_off, t_off, max_pairs=4)
  np.testing.assert_array_equal(a.student_index, [0, 2, 0, 0])
  np.testing.assert_array_equal(a.teacher_index, [1, 2, 0, 0])
  np.testing.assert_array_equal(a.where, [True, True, False, False])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_alignments_match_the_reference_walk(data):
  length = data.draw(st.integers(1, 40))
  start = data.draw(st.integers(0, 5))  # texts need not start at byte 0 (windows)
  cuts = st.sets(st.integers(1, max(1, length - 1)), max_size=length)
  interior = cuts.map(lambda c: {x for x in c if x < length})
  s_off = _offsets(data.draw(interior), length) + start
  t_off = _offsets(data.draw(interior), length) + start
  s_scored = np.array(data.draw(st.lists(st.booleans(), min_size=len(s_off), max_size=len(s_off))))
  t_scored = np.array(data.draw(st.lists(st.booleans(), min_size=len(t_off), max_size=len(t_off))))

  a = tokens.align_chunks(s_off, t_off, student_length=len(s_off) + 2, teacher_length=len(t_off) + 1,
                          student_scored=s_scored, teacher_scored=t_scored)
  _check_chunk_alignment(a, s_off, t_off)
  groups = ref.chunk_groups(s_off, t_off)
  expected_where = [bool(s_scored[g_s].all() and t_scored[g_t].all()) for g_s, g_t, _ in groups]
  np.testing.assert_array_equal(a.where[:len(groups)], expected_where)
  assert np.all(a.student_chunk_ids[len(s_off):] == a.where.size)
  assert np.all(a.teacher_chunk_ids[len(t_off):] == a.where.size)

  p = tokens.align_positions(s_off, t_off)
  pairs = ref.position_pairs(s_off, t_off)
  assert p.where.sum() == len(pairs) == len(groups)  # one pair per chunk end
  assert list(zip(p.student_index[p.where].tolist(), p.teacher_index[p.where].tolist())) == pairs


def test_alignment_of_real_tokenizers(bpe_tokenizer, held_out_text, data_dir):
  text = held_out_text[:1500]
  byte_off = ByteTokenizer().encode_with_offsets(text)[1]
  bpe_ids, bpe_off = bpe_tokenizer.encode_with_offsets(text)
  # Against bytes, every BPE token end is shared: the chunks are exactly the BPE tokens.
  a = tokens.align_chunks(byte_off, bpe_off)
  _check_chunk_alignment(a, byte_off, bpe_off)
  np.testing.assert_array_equal(a.teacher_chunk_ids, np.arange(bpe_ids.size))
  np.testing.assert_array_equal(a.spans[:bpe_ids.size], bpe_off)

  small = bpe.train_on_split("kdjax_shakespeare", "train", data_dir=data_dir, vocab_size=512,
                             max_bytes=100_000)
  small_off = small.encode_with_offsets(text)[1]
  a = tokens.align_chunks(small_off, bpe_off)
  _check_chunk_alignment(a, small_off, bpe_off)
  # Two BPEs of one corpus agree on most word boundaries: far more chunks than 1, fewer than tokens.
  assert 0.3 * bpe_ids.size < a.where.sum() <= bpe_ids.size


def test_alignment_errors():
  good = np.array([[0, 2], [2, 5]])
  cases = {
      "not contiguous": (np.array([[0, 2], [3, 5]]), good),
      "do not cover the same text": (good, np.array([[0, 2], [2, 4]])),
      "empty or reversed span": (np.array([[0, 2], [2, 2], [2, 5]]), good),
      r"shape \[N >= 1, 2\]": (np.zeros((0, 2), np.int64), good),
      "integer byte offsets": (good.astype(np.float32), good),
  }
  for message, (s_off, t_off) in cases.items():
    for fn in (tokens.align_chunks, tokens.align_positions):
      with pytest.raises(ValueError, match=message):
        fn(s_off, t_off)
  with pytest.raises(ValueError, match="student_length=1 is smaller"):
    tokens.align_chunks(good, good, student_length=1)
  with pytest.raises(ValueError, match="max_chunks=1 is smaller"):
    tokens.align_chunks(good, good, max_chunks=1)
  with pytest.raises(ValueError, match="max_pairs=1 is smaller"):
    tokens.align_positions(good, good, max_pairs=1)
  with pytest.raises(ValueError, match="teacher_scored has shape"):
    tokens.align_chunks(good, good, teacher_scored=[True])
  with pytest.raises(ValueError, match="shapes differ across examples"):
    tokens.stack_alignments([tokens.align_chunks(good, good), tokens.align_chunks(good, good, max_chunks=3)])


# ------------------------------------------------------------------------------------------------
# ULD.

_uld = jax.jit(tokens.uld, static_argnames="temperature")


def _logits(rng, shape, scale=3.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("vocabs", [(7, 11), (11, 7), (9, 9)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_reference(vocabs, temperature):
  rng = np.random.default_rng(vocabs[0] * 10 + vocabs[1])
  zs, zt = _logits(rng, (2, 5, vocabs[0])), _logits(rng, (2, 5, vocabs[1]))
  where = rng.random((2, 5)) > 0.3
  where[0, 0], where[1, -1] = True, False
  got = _uld(zs, zt, temperature=temperature, where=where)
  np.testing.assert_allclose(got, ref.uld(zs, zt, temperature, where), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_uld(zs, zt, temperature=temperature), ref.uld(zs, zt, temperature),
                             rtol=1e-5, atol=1e-6)


def test_uld_is_zero_for_permuted_distributions():
  rng = np.random.default_rng(1)
  zs = _logits(rng, (4, 6, 13))
  permuted = zs[..., rng.permutation(13)]
  np.testing.assert_allclose(_uld(zs, permuted), 0.0, atol=1e-6)
  # A larger teacher vocabulary whose extra tokens have probability 0 (−inf logits).
  padded = np.concatenate([permuted, np.full((4, 6, 5), -np.inf, np.float32)], axis=-1)
  padded = padded[..., rng.permutation(18)]
  np.testing.assert_allclose(_uld(zs, padded), 0.0, atol=1e-6)
  assert np.all(np.asarray(_uld(zs, _logits(rng, (4, 6, 18)))) > 1e-2)


def test_uld_is_invariant_to_relabelling_either_vocabulary():
  rng = np.random.default_rng(2)
  zs, zt = _logits(rng, (3, 4, 10)), _logits(rng, (3, 4, 15))
  base = _uld(zs, zt)
  for _ in range(3):
    relabelled = _uld(zs[..., rng.permutation(10)], zt[..., rng.permutation(15)])
    np.testing.assert_allclose(relabelled, base, rtol=1e-6, atol=1e-7)


def test_uld_gradient_and_masks():
  rng = np.random.default_rng(3)
  zs, zt = _logits(rng, (3, 7)).astype(np.float64), _logits(rng, (3, 12)).astype(np.float64)
  where = np.array([True, False, True])
  zs_garbage = zs.copy()
  zs_garbage[1] = np.nan  # a masked row's logits may be anything
  loss = lambda x: jnp.sum(tokens.uld(x, zt.astype(np.float32), temperature=1.5, where=where))
  grad = np.asarray(jax.grad(loss)(zs_garbage.astype(np.float32)))
  assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0)
  values = tokens.uld(zs_garbage.astype(np.float32), zt.astype(np.float32), where=where)
  np.testing.assert_array_equal(values[1], 0)
  numerical = numpy_reference.numerical_grad(lambda x: ref.uld(x, zt, 1.5, where), zs)
  np.testing.assert_allclose(grad, numerical, rtol=1e-4, atol=1e-5)


def test_uld_on_aligned_positions_of_two_tokenizers(bpe_tokenizer, held_out_text):
  text = held_out_text[:300]
  byte_off = ByteTokenizer().encode_with_offsets(text)[1]
  bpe_off = bpe_tokenizer.encode_with_offsets(text)[1]
  pairs = tokens.align_positions(byte_off, bpe_off, max_pairs=len(bpe_off) + 3)
  rng = np.random.default_rng(4)
  zs, zt = _logits(rng, (len(byte_off), 256)), _logits(rng, (len(bpe_off), VOCAB))
  s, t, where = tokens.gather_position_pairs(zs, zt, pairs)
  assert s.shape == (len(bpe_off) + 3, 256) and t.shape == (len(bpe_off) + 3, VOCAB)
  # Against bytes every BPE position has a partner: the byte that ends its token.
  np.testing.assert_array_equal(pairs.student_index[:len(bpe_off)], bpe_off[:, 1] - 1)
  got = tokens.uld(s, t, where=where)
  keep = np.asarray(where)
  np.testing.assert_allclose(np.asarray(got)[keep], ref.uld(zs[bpe_off[:, 1] - 1], zt), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[~keep] == 0)


def test_uld_shape_errors():
  with pytest.raises(ValueError, match="same leading axes"):
    tokens.uld(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4, 6)))
  with pytest.raises(ValueError, match="`where` mask has shape"):
    tokens.uld(jnp.zeros((2, 5)), jnp.zeros((2, 6)), where=jnp.ones((3,), bool))


# ------------------------------------------------------------------------------------------------
# ALM.

_alm = jax.jit(tokens.alm, static_argnames="temperature")


def _random_batch(rng, batch=3, length=24, pad=3):
  """Stacked chunk alignments of random tokenisations, with unscored tokens and padding."""
  examples = []
  for _ in range(batch):
    n = int(rng.integers(4, length))
    s_off = _offsets(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False), n)
    t_off = _offsets(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False), n)
    s_scored, t_scored = rng.random(len(s_off)) > 0.15, rng.random(len(t_off)) > 0.15
    examples.append((s_off, t_off, s_scored, t_scored))
  n_s = n_t = length + pad  # fixed shapes, whatever the draws
  alignment = tokens.stack_alignments([
      tokens.align_chunks(s, t, student_length=n_s, teacher_length=n_t, max_chunks=length,
                          student_scored=ss, teacher_scored=ts) for s, t, ss, ts in examples])
  s_lp = -rng.exponential(1.5, size=(batch, n_s))
  t_lp = -rng.exponential(1.5, size=(batch, n_t))
  return examples, alignment, s_lp, t_lp


def _reference_alm(examples, alignment, s_lp, t_lp, temperature):
  out = np.zeros(alignment.where.shape)
  for b, (s_off, t_off, _, _) in enumerate(examples):
    groups = ref.chunk_groups(s_off, t_off)
    kept = alignment.where[b, :len(groups)]
    values = ref.alm(s_lp[b], t_lp[b], groups, kept, temperature, tokens.ALM_EPSILON)
    out[b, :len(values)] = values
  return out


def _garbage_where_unused(alignment, s_lp, t_lp):
  """NaN / −inf log-probs on padding and on tokens of masked chunks, which must not matter."""
  s_lp, t_lp = s_lp.copy(), t_lp.copy()
  for lp, ids in ((s_lp, alignment.student_chunk_ids), (t_lp, alignment.teacher_chunk_ids)):
    c = alignment.where.shape[-1]
    used = np.take_along_axis(np.pad(alignment.where, ((0, 0), (0, 1))), np.minimum(ids, c), axis=-1)
    lp[~used] = np.where(np.arange((~used).sum()) % 2, np.nan, -np.inf)
  return s_lp, t_lp


@pytest.mark.parametrize("temperature", [1.0, 10.0, 100.0])
def test_alm_matches_reference(temperature):
  rng = np.random.default_rng(int(temperature))
  examples, alignment, s_lp, t_lp = _random_batch(rng)
  assert alignment.where.sum() > 5 and (~alignment.where).sum() > 5
  want = _reference_alm(examples, alignment, s_lp, t_lp, temperature)
  s_bad, t_bad = _garbage_where_unused(alignment, s_lp, t_lp)
  got = _alm(s_bad.astype(np.float32), t_bad.astype(np.float32), alignment, temperature=temperature)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(masked_mean(got, alignment.where), want[alignment.where].mean(), rtol=2e-5)


def test_chunk_log_likelihoods_sum_the_chunk_tokens():
  # Student cuts at odd offsets, teacher at even ones: the only shared end is the text's end,
  # so the single chunk's log-likelihood is each model's whole-sequence log-likelihood.
  n = 12
  s_off, t_off = _offsets(range(1, n, 2), n), _offsets(range(2, n, 2), n)
  a = tokens.align_chunks(s_off, t_off, student_length=len(s_off) + 2)
  assert a.where.sum() == 1
  rng = np.random.default_rng(5)
  s_lp = -rng.exponential(size=len(s_off) + 2).astype(np.float32)
  got = tokens.chunk_log_likelihoods(s_lp, a.student_chunk_ids, a.where.size)
  np.testing.assert_allclose(got[0], s_lp[:len(s_off)].sum(), rtol=1e-6)
  np.testing.assert_array_equal(got[1:], 0)
  # For any partition, the chunk log-likelihoods add up to the sequence log-likelihood.
  examples, alignment, s_lp, t_lp = _random_batch(rng)
  for lp, ids, offsets in ((s_lp, alignment.student_chunk_ids, 0), (t_lp, alignment.teacher_chunk_ids, 1)):
    sums = tokens.chunk_log_likelihoods(lp, ids, alignment.where.shape[-1])
    real = np.array([[i < len(e[offsets]) for i in range(lp.shape[1])] for e in examples])
    np.testing.assert_allclose(np.sum(sums, -1), np.where(real, lp, 0).sum(-1), rtol=1e-5)


def test_alm_gradients_are_finite_with_masks_and_match_finite_differences():
  rng = np.random.default_rng(6)
  examples, alignment, s_lp, t_lp = _random_batch(rng)
  s_bad, t_bad = _garbage_where_unused(alignment, s_lp, t_lp)
  temperature = 10.0
  loss = lambda s, t: jnp.sum(tokens.alm(s, t, alignment, temperature=temperature))
  grads = jax.grad(loss, argnums=(0, 1))(s_bad.astype(np.float32), t_bad.astype(np.float32))
  g_s, g_t = (np.asarray(g) for g in grads)
  assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t))
  np.testing.assert_array_equal(g_s[~np.isfinite(s_bad)], 0)
  np.testing.assert_array_equal(g_t[~np.isfinite(t_bad)], 0)
  numerical = numpy_reference.numerical_grad(
      lambda x: _reference_alm(examples, alignment, x, t_lp, temperature), s_lp, eps=1e-4)
  np.testing.assert_allclose(g_s, numerical, rtol=1e-3, atol=1e-6)


def test_alm_is_smallest_when_chunk_likelihoods_match():
  """Different tokens, same chunk likelihoods: the student gradient vanishes, the value is the
  teacher's binary entropy, and moving a chunk's likelihood either way increases the loss."""
  rng = np.random.default_rng(7)
  examples, alignment, s_lp, t_lp = _random_batch(rng)
  c = alignment.where.shape[-1]
  t_chunks = np.asarray(tokens.chunk_log_likelihoods(t_lp, alignment.teacher_chunk_ids, c))
  # Spread each teacher chunk's log-likelihood evenly over the student tokens of that chunk.
  ids = alignment.student_chunk_ids
  counts = np.stack([np.bincount(np.minimum(i, c), minlength=c + 1)[:c] for i in ids])
  matched = np.where(ids < c, np.take_along_axis(np.pad(t_chunks / np.maximum(counts, 1), ((0, 0), (0, 1))),
                                                  np.minimum(ids, c), axis=-1), 0.0)
  s32, t32 = matched.astype(np.float32), t_lp.astype(np.float32)
  for temperature in (1.0, 100.0):
    values = np.asarray(_alm(s32, t32, alignment, temperature=temperature))
    entropy = np.array([[ref.binary_entropy(np.exp(x / temperature - tokens.ALM_EPSILON)) for x in row]
                        for row in t_chunks])
    np.testing.assert_allclose(values[alignment.where], entropy[alignment.where], rtol=1e-4)
    grad_fn = jax.grad(lambda s, T=temperature: jnp.sum(tokens.alm(s, t32, alignment, temperature=T)))
    # Vanishing relative to the gradient one nat per token away from the match.
    assert np.abs(grad_fn(s32)).max() < 1e-3 * np.abs(grad_fn(np.where(ids < c, s32 - 1.0, s32))).max()
    for shift in (-0.5, 0.5):
      moved_s = np.minimum(s32 + shift * (ids < c), 0.0)
      moved = np.asarray(_alm(moved_s, t32, alignment, temperature=temperature))
      assert np.all(moved[alignment.where] > values[alignment.where])


def test_alm_jits_once_per_shape():
  rng = np.random.default_rng(8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, t, a):
    return masked_mean(tokens.alm(s, t, a), a.where)

  for _ in range(3):  # new tokenisations, same padded shapes: no retrace
    _, alignment, s_lp, t_lp = _random_batch(rng)
    step(s_lp, t_lp, alignment)


def test_alm_shape_errors():
  a = tokens.align_chunks(np.array([[0, 2], [2, 5]]), np.array([[0, 5]]))
  with pytest.raises(ValueError, match="student log-probs"):
    tokens.alm(jnp.zeros(3), jnp.zeros(1), a)
  with pytest.raises(ValueError, match="teacher log-probs"):
    tokens.alm(jnp.zeros(2), jnp.zeros((2, 1)), a)
  with pytest.raises(ValueError, match="same shape"):
    tokens.chunk_log_likelihoods(jnp.zeros(3), jnp.zeros(4, jnp.int32), 2)


# ------------------------------------------------------------------------------------------------
# Parity with TRL's ULD (GOLD trainer, trl.experimental.gold, TRL 1.16).


def _trl_uld():
  torch = pytest.importorskip("torch")
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
  return torch, gold.ULDLoss


@pytest.mark.torch_ref
def test_uld_matches_trl_uld_loss():
  """TRL's ULDLoss without byte-offset merging pairs the i-th answer tokens of both models,
  sums the sorted-L1 over pairs, divides by the pair count and averages over the batch."""
  torch, uld_loss_cls = _trl_uld()
  import types
  config = types.SimpleNamespace(
      uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=2.0,
      uld_teacher_temperature=2.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
      use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False)
  trl_loss = uld_loss_cls(config)

  rng = np.random.default_rng(9)
  zs, zt = _logits(rng, (2, 7, 33)), _logits(rng, (2, 9, 50))
  s_labels, t_labels = np.full((2, 7), -100), np.full((2, 9), -100)
  s_labels[0, 2:], s_labels[1, 1:5] = 1, 1   # answers of 5 and 4 student tokens
  t_labels[0, 3:], t_labels[1, 2:8] = 1, 1   # answers of 6 and 6 teacher tokens
  zs_t = torch.tensor(zs, requires_grad=True)
  value = trl_loss(zs_t, torch.tensor(zt), torch.tensor(s_labels), torch.tensor(t_labels),
                   torch.tensor(np.maximum(s_labels, 0)), torch.tensor(np.maximum(t_labels, 0)))
  value.backward()

  def ours(s):
    per_example = []
    for b in range(2):
      s_pos, t_pos = np.flatnonzero(s_labels[b] != -100), np.flatnonzero(t_labels[b] != -100)
      n = min(len(s_pos), len(t_pos))
      per_example.append(jnp.mean(tokens.uld(s[b, s_pos[:n]], zt[b, t_pos[:n]], temperature=2.0)))
    return jnp.mean(jnp.stack(per_example))

  got, grad = jax.value_and_grad(ours)(jnp.asarray(zs))
  np.testing.assert_allclose(float(got), float(value.detach()), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), zs_t.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.torch_ref
def test_chunks_match_trl_byte_offset_groups(bpe_tokenizer, held_out_text):
  """TRL's extended ULD merges tokens into groups that close where both tokenisations end a
  token at the same byte: the same partition as `align_chunks`."""
  _, uld_loss_cls = _trl_uld()
  rng = np.random.default_rng(10)
  cases = [(ByteTokenizer().encode_with_offsets(held_out_text[:400])[1],
            bpe_tokenizer.encode_with_offsets(held_out_text[:400])[1])]
  for _ in range(20):
    n = int(rng.integers(2, 30))
    cases.append((_offsets(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False), n),
                  _offsets(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False), n)))
  for s_off, t_off in cases:
    s_groups, t_groups = uld_loss_cls._align_by_byte_offsets(s_off.tolist(), t_off.tolist())
    a = tokens.align_chunks(s_off, t_off)
    assert a.where.sum() == len(s_groups) == len(t_groups)
    for k, (s_group, t_group) in enumerate(zip(s_groups, t_groups)):
      np.testing.assert_array_equal(np.flatnonzero(a.student_chunk_ids == k), s_group)
      np.testing.assert_array_equal(np.flatnonzero(a.teacher_chunk_ids == k), t_group)
