"""Verified teacher traces: the spelling checker against a plain-Python reference, the REDI / SFT /
all objectives against NumPy float64 formulas (values and gradients), the batch hook (flags equal
the reference checker on the decoded traces, keys a function of (seed, step)), bad configs, and a
two-stage run (SFT, then REDI) through the jitted distillation step."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax.data import lm_pipeline, text_sources
from kdjax.data.tokenizers import ByteTokenizer
from kdjax.distill import strategies
from kdjax.distill.verified_traces import (VerifiedTraceBatches, VerifiedTraceConfig, VerifiedTraceDistillation,
                                           verified_traces_strategy)
from kdjax.evaluate.word_checker import WordChecker
from kdjax.models import sampling
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib, state as state_lib, step as step_lib

SEQ, PROMPT, BATCH = 32, 12, 16
TOKENIZER = ByteTokenizer()


# ------------------------------------------------------------------------------------------------
# A plain-Python checker: walks characters, no regular expressions.


def _runs(text: str) -> list[tuple[int, int, str]]:
  """(start, end, lower-cased run) of every maximal run of ASCII letters and apostrophes."""
  out, start = [], None
  for i, ch in enumerate(text + "\0"):
    inside = ch in string.ascii_letters or ch == "'"
    if inside and start is None:
      start = i
    elif not inside and start is not None:
      out.append((start, i, text[start:i].lower()))
      start = None
  return out


def reference_vocabulary(corpus: str, min_count: int = 1) -> set[str]:
  counts: dict[str, int] = {}
  for _, _, word in _runs(corpus):
    counts[word] = counts.get(word, 0) + 1
  return {w for w, n in counts.items() if n >= min_count}


def reference_check(row: str, vocabulary: set[str], min_words: int = 1) -> tuple[bool, int, int]:
  """(accepted, complete words, valid ones): runs touching either end of the row are skipped."""
  complete = [w for a, b, w in _runs(row) if a > 0 and b < len(row)]
  valid = sum(w in vocabulary for w in complete)
  return len(complete) >= min_words and valid == len(complete), len(complete), valid


CORPUS = ("KING. The king's men are come; 'tis said o'er the hill.\n"
          "QUEEN. Good morrow, my lord! The men, the hill, the KING.\n")


def _rows(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded byte rows (the padding is garbage letters, which `lengths` must cut off)."""
  encoded = [TOKENIZER.encode(t) for t in texts]
  width = max(len(e) for e in encoded) + 3
  rows = np.full((len(texts), width), ord("z"), np.int32)
  for b, e in enumerate(encoded):
    rows[b, :len(e)] = e
  return rows, np.array([len(e) for e in encoded])


def test_checker_matches_the_reference_on_hand_made_rows():
  checker = WordChecker.from_tokens(TOKENIZER.encode(CORPUS))
  vocabulary = reference_vocabulary(CORPUS)
  assert checker.vocabulary == {w.encode() for w in vocabulary}
  texts = [
      "xq the king's men qx",    # partial edge words ignored, the inner ones listed
      " the kingz said, ",       # an unknown inner word
      "the men",                 # both words touch an edge: nothing to check
      " The KING. ",             # case folded, punctuation separates
      "'tis o'er the hill'",     # apostrophes are part of words; the last run is partial
      ", 'tis: o'er; said! ",    # elisions as complete words
      "ing; the  hill; mor",
      " tis ",                   # 'tis is listed, tis is not
      "", "a", " ",
      "\u00e9the men\u00e9",     # non-ASCII bytes separate words
  ]
  rows, lengths = _rows(texts)
  verdict = checker.check(rows, lengths)
  for b, text in enumerate(texts):
    assert (bool(verdict.accepted[b]), int(verdict.words[b]), int(verdict.valid_words[b])) == \
        reference_check(text, vocabulary), text
  # The cases spelled out, so that a reference sharing a mistake with the checker still fails.
  np.testing.assert_array_equal(verdict.accepted, [1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(verdict.words, [3, 3, 0, 2, 2, 3, 2, 1, 0, 0, 0, 2])
  np.testing.assert_allclose(verdict.valid_fraction[:3], [1.0, 2 / 3, np.nan])
  # min_words = 0: a row without complete words passes (the literal "every word" rule).
  lenient = WordChecker.from_tokens(TOKENIZER.encode(CORPUS), min_words=0)
  assert lenient.check(rows, lengths).accepted.tolist() == [reference_check(t, vocabulary, 0)[0] for t in texts]
  # min_count = 2: words seen once leave the list.
  strict = WordChecker.from_tokens(TOKENIZER.encode(CORPUS), min_count=2)
  assert strict.vocabulary == {w.encode() for w in reference_vocabulary(CORPUS, 2)}
  assert "the" in strict and "said" not in strict and "said" in checker
  # Without lengths every row is read to its full width (the padding then joins the last word).
  full = checker.check(rows)
  assert full.accepted.tolist() == [reference_check(TOKENIZER.decode(r), vocabulary)[0] for r in rows]


def test_checker_rejects_bad_input():
  checker = WordChecker.from_tokens(TOKENIZER.encode(CORPUS))
  rows, lengths = _rows(["a b c"])
  with pytest.raises(ValueError, match="lengths must lie in"):
    checker.check(rows, lengths + 10)
  with pytest.raises(ValueError, match=r"lengths must be integer of shape \(1,\)"):
    checker.check(rows, np.array([1, 2]))
  with pytest.raises(ValueError, match="byte_rows must be integer"):
    checker.check(rows[0])
  with pytest.raises(ValueError, match="byte ids in"):
    checker.check(rows + 300)
  with pytest.raises(ValueError, match="min_count must be"):
    WordChecker.from_tokens(TOKENIZER.encode(CORPUS), min_count=0)
  with pytest.raises(ValueError, match="no word occurs"):
    WordChecker.from_tokens(TOKENIZER.encode(CORPUS), min_count=1000)


def test_checker_on_shakespeare_matches_the_reference(data_dir):
  """Held-out windows of real text against the word list of two training works."""
  train = text_sources.load_split_tokens("kdjax_shakespeare", "train[:2]", data_dir=data_dir)
  held_out = text_sources.load_split_tokens("kdjax_shakespeare", "validation", data_dir=data_dir)
  checker = WordChecker.from_tokens(train)
  vocabulary = reference_vocabulary(TOKENIZER.decode(train))
  assert checker.vocabulary == {w.encode() for w in vocabulary}
  starts = np.random.default_rng(0).integers(0, len(held_out) - 40, 200)
  rows = np.stack([held_out[s:s + 40] for s in starts]).astype(np.int32)
  verdict = checker.check(rows)
  want = [reference_check(TOKENIZER.decode(r), vocabulary) for r in rows]
  assert verdict.accepted.tolist() == [w[0] for w in want]
  assert verdict.valid_words.tolist() == [w[2] for w in want]
  # Real text mostly passes, shuffled bytes of it almost never do: the filter is real.
  shuffled = np.random.default_rng(1).permutation(rows.reshape(-1)).reshape(rows.shape)
  assert verdict.accepted.mean() > 0.5 > 0.05 > checker.check(shuffled).accepted.mean()


# ------------------------------------------------------------------------------------------------
# The objectives against NumPy float64.


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  shifted = z - z.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _objective_batch(seed=0, lengths=(5, 3, 4, 1, 2, 0), ok=(1, 0, 1, 0, 0, 1), width=6, vocab=7):
  """A batch with uneven continuation lengths (one row has none) after a one-token prompt."""
  rng = np.random.default_rng(seed)
  rows = len(lengths)
  mask = np.zeros((rows, width), np.float32)
  for b, n in enumerate(lengths):
    mask[b, 1:1 + n] = 1.0
  batch = {"targets": rng.integers(0, vocab, (rows, width)).astype(np.int32), "mask": mask,
           "trace_ok": np.asarray(ok, np.float32)}
  return rng.normal(0, 2, (rows, width, vocab)).astype(np.float32), batch


def reference_redi(logits, batch, alpha):
  """(loss, d loss / d logits) of mean_P(−ℓ) + α·mean_N(ℓ), row by row."""
  logp = _log_softmax(logits)
  probs = np.exp(logp)
  positives, negatives = [], []
  for b in range(len(logits)):
    kept = np.flatnonzero(batch["mask"][b])
    if kept.size:
      mean_logp = sum(logp[b, t, batch["targets"][b, t]] for t in kept) / kept.size
      (positives if batch["trace_ok"][b] else negatives).append((b, kept, mean_logp))
  loss = (-np.mean([m for _, _, m in positives]) if positives else 0.0) + \
      (alpha * np.mean([m for _, _, m in negatives]) if negatives else 0.0)
  grad = np.zeros_like(probs)
  for group, weight in ((positives, -1.0 / max(len(positives), 1)), (negatives, alpha / max(len(negatives), 1))):
    for b, kept, _ in group:
      for t in kept:
        # d log softmax(z)[y] / dz = onehot(y) − softmax(z), averaged over the row's tokens.
        grad[b, t] = weight * (np.eye(logits.shape[-1])[batch["targets"][b, t]] - probs[b, t]) / kept.size
  return loss, grad


def _loss_and_grad(strategy, logits, batch):
  def loss(z):
    return strategy({"logits": z}, None, {k: jnp.asarray(v) for k, v in batch.items()}, 0)
  (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(logits))
  return float(value), np.asarray(grad), jax.tree.map(float, metrics)


@pytest.mark.parametrize("alpha", [0.8, 0.3, 1.0])
def test_redi_loss_and_gradient_match_numpy(alpha):
  logits, batch = _objective_batch()
  value, grad, metrics = _loss_and_grad(VerifiedTraceDistillation("redi", alpha), logits, batch)
  want, want_grad = reference_redi(logits, batch, alpha)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  # Metrics: 3 of the 5 rows with tokens are rejected; the row without tokens counts nowhere.
  logp = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  rejected = batch["mask"] * (1 - batch["trace_ok"][:, None])
  np.testing.assert_allclose(metrics["negative_logp"][0] / metrics["negative_logp"][1],
                             (logp * rejected).sum() / rejected.sum(), rtol=1e-5)
  assert metrics["accepted"] == (2.0, 5.0) and metrics["no_positive"][0] == 0.0
  assert metrics["redi_positive"][1] == 2.0 and metrics["redi_negative"][1] == 3.0


def test_redi_without_negatives_is_length_normalised_sft():
  logits, batch = _objective_batch(seed=1)
  value, grad, _ = _loss_and_grad(VerifiedTraceDistillation("redi", 0.0), logits, batch)
  logp = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  rows = [b for b in range(len(logits)) if batch["trace_ok"][b] and batch["mask"][b].any()]
  sft = np.mean([-(logp[b] * batch["mask"][b]).sum() / batch["mask"][b].sum() for b in rows])
  np.testing.assert_allclose(value, sft, rtol=1e-5)
  assert np.all(grad[batch["trace_ok"] == 0] == 0)
  # With equal lengths the length normalisation is the token mean: REDI(α = 0) is the 'sft' mode.
  logits, batch = _objective_batch(seed=2, lengths=(4,) * 6)
  redi = _loss_and_grad(VerifiedTraceDistillation("redi", 0.0), logits, batch)
  sft = _loss_and_grad(VerifiedTraceDistillation("sft"), logits, batch)
  np.testing.assert_allclose(redi[0], sft[0], rtol=1e-5)
  np.testing.assert_allclose(redi[1], sft[1], rtol=1e-5, atol=1e-7)


def test_sft_ignores_rejected_rows_and_all_uses_every_row():
  logits, batch = _objective_batch(seed=3)
  sft = VerifiedTraceDistillation("sft")
  value, grad, metrics = _loss_and_grad(sft, logits, batch)
  rejected = batch["trace_ok"] == 0
  changed_logits, changed = logits.copy(), dict(batch, targets=batch["targets"].copy())
  changed_logits[rejected] = np.random.default_rng(9).normal(0, 3, changed_logits[rejected].shape)
  changed["targets"][rejected] = (changed["targets"][rejected] + 1) % logits.shape[-1]
  value2, grad2, _ = _loss_and_grad(sft, changed_logits, changed)
  assert value2 == pytest.approx(value, rel=1e-6)
  np.testing.assert_allclose(grad2, grad, atol=1e-7)
  assert np.all(grad[rejected] == 0)
  # The token mean of CE over accepted rows, and 'all' is plain CE training on every trace.
  positive = batch["mask"] * batch["trace_ok"][:, None]
  nll = -np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(value, (nll * positive).sum() / positive.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"][0] / metrics["ce"][1], value, rtol=1e-6)
  ce_only = strategies.LogitDistillation(divergence=None)
  every = _loss_and_grad(VerifiedTraceDistillation("all"), logits, dict(batch, trace_ok=1 - batch["trace_ok"]))
  plain = _loss_and_grad(ce_only, logits, {k: v for k, v in batch.items() if k != "trace_ok"})
  np.testing.assert_allclose(every[0], plain[0], rtol=1e-6)
  np.testing.assert_allclose(every[1], plain[1], atol=1e-7)


@pytest.mark.parametrize("mode", ["sft", "redi", "all"])
def test_a_batch_without_accepted_traces_is_finite(mode):
  logits, batch = _objective_batch(seed=4, ok=(0,) * 6)
  value, grad, metrics = _loss_and_grad(VerifiedTraceDistillation(mode, 0.8), logits, batch)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  assert metrics["no_positive"] == (1.0, 1.0) and metrics["accepted"][0] == 0.0 and metrics["ce"] == (0.0, 0.0)
  if mode == "sft":
    assert value == 0.0 and np.all(grad == 0)
  if mode == "redi":  # the positive part is 0: α times the mean negative log-likelihood
    np.testing.assert_allclose(value, reference_redi(logits, batch, 0.8)[0], rtol=1e-5)
    assert value < 0
  # And the other extreme: only accepted traces leave REDI's negative part 0.
  logits, batch = _objective_batch(seed=4, ok=(1,) * 6)
  value, _, metrics = _loss_and_grad(VerifiedTraceDistillation("redi", 0.8), logits, batch)
  np.testing.assert_allclose(value, reference_redi(logits, batch, 0.8)[0], rtol=1e-5)
  assert metrics["negative_logp"][1] == 0.0


def test_bad_configs_raise():
  assert verified_traces_strategy({"mode": "sft"}, vocab_size=256, num_steps=10) == VerifiedTraceDistillation("sft")
  assert verified_traces_strategy({}, vocab_size=256, num_steps=10) == VerifiedTraceDistillation("redi", 0.8)
  with pytest.raises(ValueError, match=r"unknown distill config keys \['beta'\]"):
    verified_traces_strategy({"beta": 0.1}, vocab_size=256, num_steps=10)
  with pytest.raises(ValueError, match="unknown verified-trace mode 'dpo'"):
    verified_traces_strategy({"mode": "dpo"}, vocab_size=256, num_steps=10)
  with pytest.raises(ValueError, match="alpha must lie in"):
    VerifiedTraceDistillation("redi", 1.5)
  with pytest.raises(ValueError, match=r"unknown verified_traces config keys \['lambda_'\]"):
    VerifiedTraceConfig.from_config(ml_collections.ConfigDict({"lambda_": 0.5}))
  with pytest.raises(ValueError, match="prompt_len must be"):
    VerifiedTraceConfig.from_config({"prompt_len": 0})
  logits, batch = _objective_batch()
  with pytest.raises(ValueError, match="one flag per row"):
    VerifiedTraceDistillation("redi")({"logits": logits}, None, dict(batch, trace_ok=batch["mask"]), 0)


# ------------------------------------------------------------------------------------------------
# The hook and a run, with a teacher that has learned a little spelling.

TEACHER = DecoderConfig(vocab_size=256, num_layers=1, num_heads=2, d_model=48, d_ff=96, max_len=SEQ)
STUDENT = DecoderConfig(vocab_size=256, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ)


def _fit(graphdef, params, strategy, batches, steps, mesh, learning_rate=1e-2):
  """`steps` updates of `params` on `batches(step) -> device batch`; returns (params, losses)."""
  optimizer = optax.adam(learning_rate)
  state = state_lib.create_train_state(params, optimizer, seed=0, mesh=mesh)
  step_fn = step_lib.make_distill_step(state=state, teacher_params=None, mesh=mesh,
                                       student_forward=step_lib.lm_forward(graphdef), teacher_forward=None,
                                       strategy=strategy, optimizer=optimizer)
  history = []
  for step in range(steps):
    state, metrics = step_fn(state, batches(step, state), None)
    history.append(float(metrics["loss"][0]) / max(float(metrics["loss"][1]), 1.0))
  return state.params, history


@pytest.fixture(scope="module")
def world(data_dir):
  mesh = sharding_lib.make_mesh({"data": 8})
  train = text_sources.load_split_tokens("kdjax_shakespeare", "train[:3]", data_dir=data_dir)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(TEACHER, rngs=nnx.Rngs(1)), mesh)
  windows = iter(lm_pipeline.make_lm_dataset(train, seq_len=SEQ, batch_size=BATCH, seed=0, shuffle=True,
                                             num_epochs=None))
  t_params, _ = _fit(t_graph, t_params, strategies.LogitDistillation(divergence=None),
                     lambda step, state: sharding_lib.shard_batch(next(windows), mesh), 300, mesh)
  # At T = 0.5 about a fifth of this teacher's traces pass: both labels occur in every few batches.
  config = VerifiedTraceConfig(prompt_len=PROMPT, temperature=0.5, seed=3)
  checker = config.checker(train)
  out = dict(mesh=mesh, train=train, t_graph=t_graph, t_params=t_params, config=config, checker=checker,
             vocabulary=reference_vocabulary(TOKENIZER.decode(train)))
  # One hook for the tests below: each new hook compiles its sampler again.
  return dict(out, hook=_hook(out))


def _host_batch(world, index):
  return lm_pipeline.windows_batch(np.arange(BATCH) + BATCH * index, tokens=world["train"], seq_len=SEQ)


def _hook(world, **config):
  return VerifiedTraceBatches(VerifiedTraceConfig(**dict(vars(world["config"]), **config)), seq_len=SEQ,
                              teacher_graphdef=world["t_graph"], mesh=world["mesh"], checker=world["checker"],
                              teacher_params=world["t_params"])


def test_hook_labels_the_teachers_traces(world):
  hook = world["hook"]
  hook.set_state({"accepted": 0, "rejected": 0})
  host = _host_batch(world, 0)
  flags = []
  for step in range(3):
    batch = hook(None, host, None, step)
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (BATCH, SEQ)
    assert batch["trace_ok"].shape == (BATCH,) and batch["trace_ok"].dtype == jnp.float32
    assert batch["trace_ok"].sharding.is_equivalent_to(sharding_lib.batch_sharding(world["mesh"]), 1)
    mask = np.asarray(batch["mask"])
    assert np.all(mask[:, :PROMPT - 1] == 0) and np.all(mask[:, PROMPT - 1:] == 1)
    np.testing.assert_array_equal(np.asarray(batch["inputs"])[:, :PROMPT], host["inputs"][:, :PROMPT])
    traces = [TOKENIZER.decode(row) for row in np.asarray(batch["targets"])[:, PROMPT - 1:]]
    np.testing.assert_array_equal(batch["trace_ok"], [reference_check(t, world["vocabulary"])[0] for t in traces])
    flags.append(np.asarray(batch["trace_ok"]))
  flags = np.concatenate(flags)
  assert 0 < flags.sum() < len(flags), "the teacher's traces should be neither all accepted nor all rejected"
  assert hook.counts == {"accepted": int(flags.sum()), "rejected": int(len(flags) - flags.sum())}
  # The same (seed, step) gives the same traces, in a fresh hook too (a resumed run); another step
  # does not. The loop's teacher_params, when given, are used.
  again = _hook(world)
  np.testing.assert_array_equal(again(None, host, world["t_params"], 2)["targets"], batch["targets"])
  assert not np.array_equal(hook(None, host, None, 3)["targets"], batch["targets"])
  restored = _hook(world)
  restored.set_state(hook.get_state())
  assert restored.counts == hook.counts
  with pytest.raises(ValueError, match="needs the teacher's parameters"):
    VerifiedTraceBatches(world["config"], seq_len=SEQ, teacher_graphdef=world["t_graph"], mesh=world["mesh"],
                         checker=world["checker"])(None, host, None, 0)
  with pytest.raises(ValueError, match="shorter than"):
    _hook(world, prompt_len=SEQ)


def test_pass_rate_is_the_checker_on_the_models_samples(world):
  prompts = _host_batch(world, 5)["inputs"][:, :PROMPT]
  config = sampling.SamplingConfig(max_new_tokens=SEQ - PROMPT + 1, temperature=0.8)
  key = jax.random.PRNGKey(11)
  result = world["checker"].pass_rate(world["t_graph"], world["t_params"], prompts, config, key)
  generation = sampling.make_generate(world["t_graph"], config)(world["t_params"], prompts, None, key)
  want = [reference_check(TOKENIZER.decode(row), world["vocabulary"]) for row in np.asarray(generation.tokens)]
  assert result["pass_rate"] == pytest.approx(np.mean([w[0] for w in want]))
  assert result["valid_word_rate"] == pytest.approx(sum(w[2] for w in want) / sum(w[1] for w in want))
  assert result["rows"] == BATCH


def test_two_stages_sft_then_redi_reduce_their_losses(world):
  """Stage 1 SFT on fresh accepted traces each step, stage 2 REDI from its result on a fixed set of
  traces, each through the jitted step.

  SFT's loss falls on traces it did not train on. REDI's falls on the traces it trains on, by
  raising the accepted ones' likelihood and lowering the rejected ones'. Its loss on unseen
  traces is CE(accepted) − α·CE(rejected): two like-distributed parts that largely cancel, which
  made a held-out REDI check flip sign with the CPU's floating-point rounding.
  """
  mesh = world["mesh"]
  s_graph, params = state_lib.create_sharded_model(lambda: DecoderLM(STUDENT, rngs=nnx.Rngs(0)), mesh)
  hook = world["hook"]
  forward = step_lib.lm_forward(s_graph)

  def measured(strategy, params, batches):
    metrics = jax.jit(lambda p, b: strategy(forward(p, b), None, b, 0)[1])
    parts = [metrics(params, b) for b in batches]
    return {k: sum(float(m[k][0]) for m in parts) / max(sum(float(m[k][1]) for m in parts), 1.0) for k in parts[0]}

  sft = VerifiedTraceDistillation("sft", 0.8)
  held = [hook(None, _host_batch(world, 40), None, 1000)]
  before = measured(sft, params, held)
  fresh = lambda step, state: hook(state, _host_batch(world, step % 4), None, step)  # noqa: E731
  params, history = _fit(s_graph, params, sft, fresh, 12, mesh)
  assert np.all(np.isfinite(history)), history
  after = measured(sft, params, held)
  assert after["loss"] < before["loss"] - 0.5, (before, after, history)

  redi = VerifiedTraceDistillation("redi", 0.8)
  traces = [hook(None, _host_batch(world, i), None, i) for i in range(4)]
  before = measured(redi, params, traces)
  assert 0 < before["accepted"] < 1  # both terms take part
  params, history = _fit(s_graph, params, redi, lambda step, state: traces[step % 4], 8, mesh)
  assert np.all(np.isfinite(history)), history
  after = measured(redi, params, traces)
  assert after["loss"] < before["loss"] - 0.3, (before, after, history)
  assert after["redi_positive"] < before["redi_positive"] - 0.2, (before, after)  # accepted: −ℓ falls
  assert after["redi_negative"] < before["redi_negative"], (before, after)  # rejected: ℓ falls
