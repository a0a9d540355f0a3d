"""The cross-tokenizer experiment: its data pipeline, its strategies and a `runlocal` run.

The pipeline is checked against brute-force references written here (which bytes each example
holds, which positions end on the same byte, how the text splits into chunks), the strategies
against direct calls of `kdjax.losses.uld` / `alm` on the same arrays, and the experiment end
to end on the shipped Shakespeare corpus: a BPE teacher, a CE-only byte student and the ULD and
ALM students all learn, a second method reuses the first's teacher, and a killed run resumes to
exactly the result of an unbroken one.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare_cross_tokenizer
from kdjax import losses
from kdjax.data import ByteTokenizer, bpe, cross_tokenizer_pipeline as pipeline, load_split_tokens
from kdjax.distill import cross_tokenizer, strategies
from kdjax.experiments import cross_tokenizer_kd

VOCAB = 512
STUDENT_LENGTH = 64
# Tight on purpose: about one window in eight needs more BPE tokens and is cut.
TEACHER_LENGTH = 28
BATCH = 8


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def train_bytes(data_dir):
  return load_split_tokens("kdjax_shakespeare", "train", data_dir=data_dir)[:200_000]


@pytest.fixture(scope="module")
def teacher_tokenizer(data_dir):
  return bpe.train_on_split("kdjax_shakespeare", "train", data_dir=data_dir, vocab_size=VOCAB, max_bytes=100_000)


def _dataset(data, tokenizer, *, shuffle=False, seed=0, num_epochs=1):
  return pipeline.make_cross_tokenizer_dataset(
      data, window_bytes=STUDENT_LENGTH + 1, student_tokenizer=ByteTokenizer(), teacher_tokenizer=tokenizer,
      student_length=STUDENT_LENGTH, teacher_length=TEACHER_LENGTH, batch_size=BATCH, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs)


def _examples(batch):
  size = len(batch["num_bytes"])
  return [{k: v[i] for k, v in batch.items()} for i in range(size)]


def _real_ids(example, prefix):
  """The ids of the text's tokens: the first input, then every real target."""
  count = int(example[f"{prefix}mask"].sum())
  return np.concatenate([example[f"{prefix}inputs"][:1], example[f"{prefix}targets"][:count]])


def _ends(example, tokenizer):
  """Byte end offsets of the student's (one byte each) and the teacher's real tokens."""
  student = np.arange(1, _real_ids(example, "").size + 1)
  teacher = np.cumsum([len(tokenizer.token_bytes(i)) for i in _real_ids(example, "teacher_")])
  return student, teacher


@pytest.fixture(scope="module")
def batches(train_bytes, teacher_tokenizer):
  """The first windows of the corpus, in order: window k*BATCH + j is row j of batch k."""
  iterator = iter(_dataset(train_bytes, teacher_tokenizer))
  return [next(iterator) for _ in range(6)]


# ------------------------------------------------------------------------------------------------
# Data pipeline.


def test_student_and_teacher_ids_hold_the_same_bytes(batches, train_bytes, teacher_tokenizer):
  starts = pipeline.window_starts(train_bytes, STUDENT_LENGTH + 1)
  cut = 0
  for k, batch in enumerate(batches):
    for j, example in enumerate(_examples(batch)):
      start, size = int(starts[k * BATCH + j]), int(example["num_bytes"])
      text = train_bytes[start:start + size].tobytes()
      student = _real_ids(example, "").astype(np.uint8).tobytes()
      teacher = b"".join(teacher_tokenizer.token_bytes(i) for i in _real_ids(example, "teacher_"))
      assert student == text and teacher == text, (k, j)
      # The tokenisation is the teacher's own (up to the cut, which ends on a token boundary).
      own = teacher_tokenizer.encode(train_bytes[start:start + STUDENT_LENGTH + 1].tobytes())
      np.testing.assert_array_equal(_real_ids(example, "teacher_"), own[:len(_real_ids(example, "teacher_"))])
      for prefix, length in (("", STUDENT_LENGTH), ("teacher_", TEACHER_LENGTH)):
        real = int(example[f"{prefix}mask"].sum())
        np.testing.assert_array_equal(example[f"{prefix}mask"], np.arange(length) < real)
        assert not example[f"{prefix}targets"][real:].any() and not example[f"{prefix}inputs"][real + 1:].any()
      cut += size < STUDENT_LENGTH + 1
  # Only the teacher's length cuts a window (ASCII text), and it does here.
  assert 0 < cut < len(batches) * BATCH


def test_alignment_arrays_satisfy_the_alignment_properties(batches, teacher_tokenizer):
  for batch in batches:
    for example in _examples(batch):
      student_ends, teacher_ends = _ends(example, teacher_tokenizer)
      shared = np.intersect1d(student_ends, teacher_ends)

      # Pairs: every position pair whose tokens end on the same byte, both with logits, in order.
      want = [(i, j) for j, end in enumerate(teacher_ends) for i in np.flatnonzero(student_ends == end)
              if i < STUDENT_LENGTH and j < TEACHER_LENGTH]
      where = example["pair_where"]
      assert where.shape == (min(STUDENT_LENGTH, TEACHER_LENGTH),) and where.sum() == len(want)
      np.testing.assert_array_equal(where, np.arange(where.size) < len(want))
      got = list(zip(example["pair_student_index"][where], example["pair_teacher_index"][where]))
      assert got == want
      assert not example["pair_student_index"][~where].any() and not example["pair_teacher_index"][~where].any()

      # Chunks: cut at every shared boundary, so each chunk is covered by whole tokens on both
      # sides; chunk 0 holds token 0 of both sides (no prediction) and is not scored.
      num_chunks = min(STUDENT_LENGTH, TEACHER_LENGTH) + 1
      for side, ends, length in (("student", student_ends, STUDENT_LENGTH), ("teacher", teacher_ends, TEACHER_LENGTH)):
        ids = example[f"chunk_{side}_chunk_ids"]
        assert ids.shape == (length + 1,)
        np.testing.assert_array_equal(ids[:ends.size], np.searchsorted(shared, ends))
        assert np.all(ids[ends.size:] == num_chunks)
      spans = example["chunk_spans"][:shared.size]
      np.testing.assert_array_equal(spans[:, 1], shared)
      np.testing.assert_array_equal(spans[:, 0], np.concatenate([[0], shared[:-1]]))
      chunk = np.arange(num_chunks)
      np.testing.assert_array_equal(example["chunk_where"], (chunk > 0) & (chunk < shared.size))


def test_iterator_checkpoint_resumes_exactly(train_bytes, teacher_tokenizer):
  dataset = _dataset(train_bytes, teacher_tokenizer, shuffle=True, seed=3, num_epochs=None)
  iterator = iter(dataset)
  for _ in range(4):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as RunCheckpoints stores it
  reference = [next(iterator) for _ in range(3)]
  resumed = iter(_dataset(train_bytes, teacher_tokenizer, shuffle=True, seed=3, num_epochs=None))
  resumed.set_state(state)
  for want in reference:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The seed decides the order: the same seed again gives the same first batch, another does not.
  first = next(iter(dataset))["inputs"]
  np.testing.assert_array_equal(next(iter(_dataset(train_bytes, teacher_tokenizer, shuffle=True, seed=3,
                                                   num_epochs=None)))["inputs"], first)
  assert not np.array_equal(next(iter(_dataset(train_bytes, teacher_tokenizer, shuffle=True, seed=4,
                                               num_epochs=None)))["inputs"], first)


def test_windows_never_split_a_character(teacher_tokenizer):
  text = "naïve café — Ærøskøbing, 東京 😀 and plain words. " * 40
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  window = 33
  starts = pipeline.window_starts(data, window)
  assert starts.size > 0 and np.all(starts + window <= data.size)
  assert all((data[s] & 0xC0) != 0x80 for s in starts)
  for i in range(starts.size):
    example = pipeline.make_example(
        i, data=data, starts=starts, window_bytes=window, student_tokenizer=ByteTokenizer(),
        teacher_tokenizer=teacher_tokenizer, student_length=window - 1, teacher_length=window - 1)
    size = int(example["num_bytes"])
    covered = data[starts[i]:starts[i] + size].tobytes()
    covered.decode("utf-8")  # whole characters only
    assert size == pipeline.complete_characters(data[starts[i]:starts[i] + window])
    assert _real_ids(example, "").astype(np.uint8).tobytes() == covered
  assert pipeline.complete_characters(np.frombuffer("a東".encode()[:3], np.uint8)) == 1
  assert pipeline.complete_characters(np.frombuffer("a東".encode(), np.uint8)) == 4


# ------------------------------------------------------------------------------------------------
# Strategies.


def _model_outputs(batch, seed=0):
  """Random logits of the student [B, L_s, 256] and the teacher [B, L_t, V_t], unit scale."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  size = len(batch["num_bytes"])
  student = 2.0 * jax.random.normal(k1, (size, STUDENT_LENGTH, 256))
  teacher = 2.0 * jax.random.normal(k2, (size, TEACHER_LENGTH, VOCAB))
  return student, teacher


def _direct_objective(ce_values, mask, kd_values, kd_where, alpha):
  return (1 - alpha) * losses.masked_mean(ce_values, mask) + alpha * losses.masked_mean(kd_values, kd_where)


def _uld_direct(student, teacher, batch, *, alpha, temperature):
  mask = batch["mask"].astype(bool)
  pairs = losses.PositionAlignment(batch["pair_student_index"], batch["pair_teacher_index"], batch["pair_where"])
  paired_student, paired_teacher, where = losses.gather_position_pairs(student, teacher, pairs)
  values = losses.uld(paired_student, paired_teacher, temperature=temperature, where=where)
  ce = losses.cross_entropy(student, batch["targets"], where=mask)
  return _direct_objective(ce, mask, values, where, alpha), values, where


def _log_probs_of(logits, ids, mask):
  """log p(token i | tokens < i) for i = 1..L from the logits at i − 1; 0 for token 0 and padding."""
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[..., None], -1)[..., 0]
  return jnp.pad(jnp.where(mask, log_p, 0.0), [(0, 0), (1, 0)])


def _alm_direct(student, teacher, batch, *, alpha, temperature):
  mask = batch["mask"].astype(bool)
  chunks = losses.ChunkAlignment(batch["chunk_student_chunk_ids"], batch["chunk_teacher_chunk_ids"],
                                 batch["chunk_where"], batch["chunk_spans"])
  values = losses.alm(_log_probs_of(student, batch["targets"], mask),
                      _log_probs_of(teacher, batch["teacher_targets"], batch["teacher_mask"].astype(bool)),
                      chunks, temperature=temperature)
  ce = losses.cross_entropy(student, batch["targets"], where=mask)
  return _direct_objective(ce, mask, values, chunks.where, alpha), values, chunks.where


@pytest.mark.parametrize("kind, direct, temperature", [
    (cross_tokenizer.ULDDistillation, _uld_direct, 2.0),
    (cross_tokenizer.ALMDistillation, _alm_direct, 100.0),
])
def test_strategies_equal_the_direct_losses(batches, kind, direct, temperature):
  batch = jax.tree.map(jnp.asarray, batches[1])
  student, teacher = _model_outputs(batch)
  alpha = 0.3
  strategy = kind(kd_weight=alpha, temperature=temperature)
  objective = lambda s, t: strategy({"logits": s}, {"logits": t}, batch, jnp.int32(0))  # noqa: E731
  loss, metrics = jax.jit(objective)(student, teacher)
  want, values, where = direct(student, teacher, batch, alpha=alpha, temperature=temperature)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["kd"][0], jnp.sum(jnp.where(where, values, 0.0)), rtol=1e-5)
  assert float(metrics["kd"][1]) == float(jnp.sum(where)) > 0
  assert float(metrics["ce"][1]) == float(batch["mask"].sum())
  np.testing.assert_allclose(metrics["loss"][0] / metrics["loss"][1], want, rtol=1e-5)

  # Same gradient for the student; none reaches the (frozen) teacher.
  grad_s, grad_t = jax.grad(lambda s, t: objective(s, t)[0], argnums=(0, 1))(student, teacher)
  want_grad = jax.grad(lambda s: direct(s, teacher, batch, alpha=alpha, temperature=temperature)[0])(student)
  np.testing.assert_allclose(grad_s, want_grad, rtol=1e-4, atol=1e-8)
  assert not np.any(np.asarray(grad_t))


@pytest.mark.parametrize("kind", [cross_tokenizer.ULDDistillation, cross_tokenizer.ALMDistillation])
def test_zero_kd_weight_is_the_ce_only_student(batches, kind):
  batch = jax.tree.map(jnp.asarray, batches[0])
  student, teacher = _model_outputs(batch, seed=1)
  loss, _ = kind(kd_weight=0.0)({"logits": student}, {"logits": teacher}, batch, 0)
  ce_loss, _ = strategies.LogitDistillation(divergence=None)({"logits": student}, None, batch, 0)
  np.testing.assert_allclose(loss, ce_loss, rtol=1e-6)


def test_strategy_from_config():
  uld = cross_tokenizer.strategy_from_config({"method": "uld", "kd_weight": 0.25})
  alm = cross_tokenizer.strategy_from_config({"method": "alm"})
  assert isinstance(uld, cross_tokenizer.ULDDistillation) and isinstance(alm, cross_tokenizer.ALMDistillation)
  assert float(uld.kd_weight(0)) == 0.25 and float(uld.temperature(0)) == 1.0
  assert float(alm.temperature(0)) == 100.0 and float(alm.kd_weight(0)) == 0.5
  with pytest.raises(ValueError, match="unknown cross-tokenizer method 'gold'"):
    cross_tokenizer.strategy_from_config({"method": "gold"})
  with pytest.raises(ValueError, match=r"unknown distill config keys \['temprature'\]"):
    cross_tokenizer.strategy_from_config({"method": "alm", "temprature": 1.0})
  with pytest.raises(ValueError, match="unknown method 'kl'"):
    shakespeare_cross_tokenizer.get_config("method=kl")


# ------------------------------------------------------------------------------------------------
# The experiment, end to end (runlocal).


def _runlocal(data_dir, method):
  config = shakespeare_cross_tokenizer.get_config(f"runlocal,method={method}")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def uld_run(tmp_path_factory, data_dir):
  """A finished runlocal ULD run: tokenizer, teacher, CE-only and ULD students."""
  workdir = tmp_path_factory.mktemp("uld")
  return workdir, cross_tokenizer_kd.run(_runlocal(data_dir, "uld"), str(workdir), log=lambda line: None)


@pytest.fixture(scope="module")
def alm_run(uld_run, tmp_path_factory, data_dir):
  """An ALM run on a copy of the ULD run's workdir whose CE-only student lost its last checkpoint.

  runlocal checkpoints every 20 of 30 steps: without the final one, the CE-only student is where
  a run killed between steps 20 and 30 leaves it, and must redo steps 21..30 on exactly the
  same batches.
  """
  workdir = tmp_path_factory.mktemp("alm") / "run"
  shutil.copytree(uld_run[0], workdir)
  shutil.rmtree(workdir / "student_ce_seed0" / "30")
  lines = []
  return workdir, cross_tokenizer_kd.run(_runlocal(data_dir, "alm"), str(workdir), log=lines.append), lines


def test_runlocal_teacher_and_students_learn(uld_run, alm_run):
  workdir, uld = uld_run
  _, alm, _ = alm_run
  teacher = uld["teacher"]
  # Untrained models (unit-scale logits) score about ln V nats per token.
  assert teacher["ce_per_token"] < math.log(VOCAB) - 1.0, teacher
  for name, run in (("student_ce", uld["student_ce"]), ("student_uld", uld["student_uld"]),
                    ("student_alm", alm["student_alm"])):
    assert run["nats_per_byte"] < math.log(256) - 1.0, (name, run)
    assert teacher["nats_per_byte"] < run["nats_per_byte"] - 0.3, (name, run, teacher)
  saved = json.loads((workdir / "results_uld_seed0.json").read_text())
  assert saved["config"]["distill"]["method"] == "uld"
  assert (workdir / "results_uld_seed0.md").read_text().startswith("| model |")
  assert "| student_uld | bytes |" in uld["table"] and "| student_alm | bytes |" in alm["table"]


def test_second_method_reuses_the_first_and_a_killed_run_resumes_exactly(uld_run, alm_run):
  _, uld = uld_run
  _, alm, lines = alm_run
  assert any(line.startswith("[teacher] resumed from step 80") for line in lines), lines
  assert any(line.startswith("[student_ce_seed0] resumed from step 20") for line in lines), lines
  # Only the ten lost CE steps and the ALM student are trained; the tokenizer is reused.
  assert sum(" steps of " in line for line in lines) == 2, lines
  assert not any(line.startswith("[tokenizer]") for line in lines), lines
  for key in ("nats_per_byte", "ce_per_token"):
    np.testing.assert_allclose(alm["student_ce"][key], uld["student_ce"][key], rtol=1e-6, err_msg=key)
  assert alm["teacher"]["nats_per_byte"] == uld["teacher"]["nats_per_byte"]
