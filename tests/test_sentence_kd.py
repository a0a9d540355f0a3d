"""Sentence-embedding distillation: the strategy, the embedding-agreement metrics, the line data, the experiment.

References are independent of the code under test: float64 NumPy for the embedding terms, explicit
Python loops over sets for neighbour recall and SciPy for Spearman's ρ and average ranks; properties for
the rest (a student that is a copy of the teacher has loss 0 in every term; a student whose learned map
sends its embedding onto the teacher's has an embedding loss of 0; a dropped sentence changes nothing;
a rotation of the embedding space keeps every neighbour and rank). The experiment test runs the
`runlocal` config end to end with the real all-MiniLM-L6-v2 teacher.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from kdjax.data import sentences
from kdjax.distill import sentence
from kdjax.evaluate import embeddings as E
from kdjax.losses import transformer_relations as R
from kdjax.models.encoder import BertEncoder, EncoderConfig

TEACHER = EncoderConfig(vocab_size=60, hidden=16, layers=2, heads=4, intermediate=24, max_positions=12)
# Narrower than the teacher (a learned map) with the same head count (MiniLM's terms apply).
NARROW = dataclasses.replace(TEACHER, hidden=8, intermediate=12, layers=1)
FULL_METHOD = dict(embedding_weight=1.0, mse_weight=2.0, attention_weight=0.5, value_weight=0.7, relation_weight=0.3,
                   relation_heads=2, hidden_weight=0.4)
TERMS = ("embedding", "mse", "attention", "value", "relation", "hidden")


def _model(config, seed):
  return nnx.split(BertEncoder(config, rngs=nnx.Rngs(seed)), nnx.Param)


def _batch(rng, lengths, mask, width=10, vocab=60):
  """A right-padded batch of 4 sentences (one shape for every test: one compilation per strategy)."""
  lengths = np.asarray(lengths)
  ids = rng.integers(1, vocab, size=(len(lengths), width)).astype(np.int32)
  attention = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids, "attention_mask": attention, "token_type_ids": np.zeros_like(ids),
          "mask": np.asarray(mask, np.float32)}


@functools.partial(jax.jit, static_argnames=("strategy", "student_graphdef", "teacher_graphdef"))
def _loss(student_params, teacher_params, batch, own, *, strategy, student_graphdef, teacher_graphdef):
  """(loss, metrics, student outputs, teacher outputs) in one program."""
  s_out = sentence.encoder_forward(student_graphdef, features=strategy.feature_names("student"))(student_params, batch)
  t_out = sentence.encoder_forward(teacher_graphdef, features=strategy.feature_names("teacher"))(teacher_params, batch)
  loss, metrics = strategy(s_out, t_out, batch, 0, params=own)
  return loss, metrics, s_out, t_out


def _evaluate(strategy, student, teacher, batch, own=None):
  (sg, sp), (tg, tp) = student, teacher
  return _loss(sp, tp, batch, own, strategy=strategy, student_graphdef=sg, teacher_graphdef=tg)


# --------------------------------------------------------------------------------------------
# The strategy.


def test_copy_of_teacher_has_zero_loss_in_every_term():
  teacher = _model(TEACHER, 0)
  student = _model(TEACHER, 0)  # the same seed: an exact copy
  strategy = sentence.sentence_strategy(FULL_METHOD, student_config=TEACHER, teacher_config=TEACHER)
  assert strategy.hidden_pairs == ((0, 0), (1, 1)) and not strategy.projected
  rng = np.random.default_rng(0)
  batch = _batch(rng, [10, 3, 6, 1], mask=[1, 1, 0, 1])
  loss, metrics, _, _ = _evaluate(strategy, student, teacher, batch)
  assert set(metrics) >= {"loss", "cosine", *TERMS}
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-5)
  for name in TERMS:
    np.testing.assert_allclose(float(metrics[name][0]), 0.0, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(metrics["cosine"][0] / metrics["cosine"][1]), 1.0, atol=1e-5)
  assert float(metrics["loss"][1]) == 3.0  # the dropped sentence is not counted

  # Another student: new tokens in the dropped sentence change nothing.
  other_student = _model(TEACHER, 5)
  other = dict(batch, input_ids=batch["input_ids"].copy())
  other["input_ids"][2] = rng.integers(1, 60, size=10)
  a = _evaluate(strategy, other_student, teacher, batch)[0]
  b = _evaluate(strategy, other_student, teacher, other)[0]
  assert float(a) > 0
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


J_ATTENTION = jax.jit(R.attention_kl)
J_VALUE = jax.jit(R.value_relation)
J_RELATION = jax.jit(R.relation_kl, static_argnames="num_relation_heads")


def _cos(a, b):
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_loss_matches_numpy_and_the_relation_losses():
  """The embedding and hidden terms against float64 NumPy; the relation terms are the library's losses
  (tested against their own references in test_transformer_relations) on the captured activations."""
  one = dataclasses.replace(TEACHER, layers=1)
  teacher, student = _model(TEACHER, 0), _model(one, 3)
  strategy = sentence.sentence_strategy(dict(FULL_METHOD, teacher_layer=0), student_config=one, teacher_config=TEACHER)
  assert strategy.relation_layers == (0, 0) and strategy.hidden_pairs == ((0, 1),)
  batch = _batch(np.random.default_rng(1), [10, 4, 7, 2], mask=[1, 0, 1, 1])
  loss, metrics, s, t = _evaluate(strategy, student, teacher, batch)
  keep = np.asarray(batch["mask"]) > 0
  es, et = np.asarray(s["embedding"], np.float64), np.asarray(t["embedding"], np.float64)
  cos = np.array([_cos(a, b) for a, b in zip(es, et)])
  mse = np.array([np.mean((a - b) ** 2) for a, b in zip(es, et)])
  tokens = (batch["attention_mask"] > 0) & keep[:, None]
  hs = np.asarray(s["features"]["layer0/output"], np.float64)
  ht = np.asarray(t["features"]["layer1/output"], np.float64)
  hidden = np.array([np.mean([1 - _cos(hs[b, i], ht[b, i]) for i in range(hs.shape[1]) if tokens[b, i]] or [0.0])
                     for b in range(len(keep))])
  sf, tf = s["features"], t["features"]
  attention = np.asarray(J_ATTENTION(sf["layer0/attention_probs"], tf["layer0/attention_probs"], where=tokens))
  value = np.asarray(J_VALUE(sf["layer0/values"], tf["layer0/values"], where=tokens))
  relation = sum(np.asarray(J_RELATION(sf[f"layer0/{p}"], tf[f"layer0/{p}"], num_relation_heads=2, where=tokens))
                 for p in ("queries", "keys", "values"))
  per_example = 1.0 * (1 - cos) + 2.0 * mse + 0.5 * attention + 0.7 * value + 0.3 * relation + 0.4 * hidden
  np.testing.assert_allclose(float(loss), per_example[keep].mean(), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["cosine"][0]), cos[keep].sum(), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["hidden"][0]), hidden[keep].sum(), rtol=2e-5)
  assert min(float(metrics[k][0]) for k in ("attention", "value", "relation", "hidden")) > 0


def test_projection_onto_the_teacher_width_and_finite_gradients():
  """A map W, b that sends the student's embedding exactly onto the teacher's gives embedding loss 0;
  gradients reach the student and both maps and are finite, with a sentence of padding only."""
  teacher, student = _model(TEACHER, 0), _model(NARROW, 1)
  strategy = sentence.sentence_strategy(FULL_METHOD, student_config=NARROW, teacher_config=TEACHER)
  assert strategy.projected and strategy.hidden_pairs == ((0, 1),)
  batch = _batch(np.random.default_rng(3), [10, 0, 5, 8], mask=[1, 1, 0, 1])
  own = strategy.init_params(jax.random.PRNGKey(0))
  assert own["embedding"]["kernel"].shape == (8, 16) and own["hidden0"]["kernel"].shape == (8, 16)

  @jax.jit
  def loss_and_grads(params, own):
    def loss_fn(params, own):
      loss, metrics, s, t = _loss(params, teacher[1], batch, own, strategy=strategy, student_graphdef=student[0],
                                  teacher_graphdef=teacher[0])
      return loss, (metrics, s["embedding"], t["embedding"])
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, own)

  (loss, (_, es, et)), grads = loss_and_grads(student[1], own)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  for g in (grads[0], grads[1]["embedding"], grads[1]["hidden0"]):
    assert float(optax.tree.norm(g)) > 0
  # Least squares through 4 points in 8 dimensions is exact.
  kernel = np.linalg.lstsq(np.asarray(es, np.float64), np.asarray(et, np.float64), rcond=None)[0]
  exact = dict(own, embedding={"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros(16)})
  (_, (metrics, _, _)), _ = loss_and_grads(student[1], exact)
  # 0 for both real sentences; the padding-only one has zero embeddings, whose cosine is 0 (distance 1).
  np.testing.assert_allclose(float(metrics["embedding"][0]), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="learned map"):
    strategy.student_embedding(jnp.zeros((2, 8)), None)


def test_feature_names():
  minilm = sentence.sentence_strategy(dict(attention_weight=1.0, value_weight=1.0),
                                      student_config=dataclasses.replace(TEACHER, layers=1), teacher_config=TEACHER)
  assert minilm.feature_names("student") == ("layer0/attention_probs", "layer0/values")
  assert minilm.feature_names("teacher") == ("layer1/attention_probs", "layer1/values")
  v2 = sentence.sentence_strategy(dict(relation_weight=1.0, relation_heads=2, teacher_layer=0), student_config=NARROW,
                                  teacher_config=TEACHER)
  assert v2.feature_names("teacher") == ("layer0/queries", "layer0/keys", "layer0/values")
  hidden = sentence.sentence_strategy(dict(hidden_weight=1.0), student_config=NARROW, teacher_config=TEACHER)
  assert hidden.feature_names("student") == ("layer0/output",) and hidden.feature_names("teacher") == ("layer1/output",)
  baseline = sentence.sentence_strategy({}, student_config=TEACHER, teacher_config=TEACHER)
  assert baseline.feature_names("student") == () and baseline.embedding_weight == 1.0
  with pytest.raises(ValueError, match="role"):
    baseline.feature_names("both")


TWO_HEADS = dataclasses.replace(NARROW, heads=2)


@pytest.mark.parametrize("cfg, match", [
    (dict(attention_wieght=1.0), "unknown sentence distillation config keys"),
    (dict(attention_weight=1.0), "pair heads one to one"),
    (dict(value_weight=1.0), "pair heads one to one"),
    (dict(relation_weight=1.0, relation_heads=3), "must divide the student width 8"),
    (dict(relation_weight=1.0, relation_heads=16), "must divide the student width"),
    (dict(embedding_weight=0.0), "every weight is 0"),
    (dict(embedding_weight=-1.0), "non-negative"),
    (dict(teacher_layer=2), "not a layer of the 2-layer teacher"),
    (dict(hidden_weight=1.0, layer_map="middle"), "unknown layer_map mode"),
    (dict(hidden_weight=1.0, layer_map="custom", layer_map_custom=((0, 5),)), "out of range"),
])
def test_bad_configs_raise(cfg, match):
  with pytest.raises(ValueError, match=match):
    sentence.sentence_strategy(cfg, student_config=TWO_HEADS, teacher_config=TEACHER)


def test_minilmv2_allows_different_head_counts():
  v2 = sentence.sentence_strategy(dict(relation_weight=1.0, relation_heads=4), student_config=TWO_HEADS,
                                  teacher_config=TEACHER)
  assert (v2.student_heads, v2.teacher_heads, v2.relation_heads) == (2, 4, 4)


# --------------------------------------------------------------------------------------------
# Embedding agreement metrics.


def _reference_recall(student, teacher, k):
  """Explicit loops: cosine to every other row, sorted (ties by index), overlap of the top-k sets."""
  def top(x, i):
    sims = [(-(x[i] @ x[j]) / np.linalg.norm(x[i]) / np.linalg.norm(x[j]), j) for j in range(len(x)) if j != i]
    return {j for _, j in sorted(sims)[:k]}
  return np.mean([len(top(student, i) & top(teacher, i)) / k for i in range(len(student))])


def test_neighbour_recall_matches_loops():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(40, 6))
  student = teacher[:, :4] + 0.7 * rng.normal(size=(40, 4))  # another width, partly agreeing
  for k in (1, 3, 5):
    np.testing.assert_allclose(E.neighbour_recall(student, teacher, k), _reference_recall(student, teacher, k))
  assert 0 < E.neighbour_recall(student, teacher, 5) < 1


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(1)
  teacher = rng.normal(size=(30, 8))
  # 0/1 rows with four ones: norm 2, so every cosine is an exact multiple of 1/4 in any arithmetic, and
  # most pairs tie.
  student = np.stack([rng.permutation(np.r_[np.ones(4), np.zeros(4)]) for _ in range(30)])
  upper = np.triu_indices(30, 1)
  sim = lambda x: np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in x] for a in x])[upper]  # noqa: E731
  expected = scipy.stats.spearmanr(sim(student), sim(teacher)).statistic
  np.testing.assert_allclose(E.similarity_spearman(student, teacher), expected, rtol=1e-10)
  ties = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 3.0])
  np.testing.assert_allclose(E.average_ranks(ties), scipy.stats.rankdata(ties) - 1)


def test_metrics_limit_cases():
  rng = np.random.default_rng(2)
  teacher = rng.normal(size=(25, 6))
  rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
  rotated = teacher @ rotation
  out = E.embedding_agreement(rotated, teacher, ks=(1, 5))
  assert out["recall@1"] == 1.0 and out["recall@5"] == 1.0
  np.testing.assert_allclose(out["spearman"], 1.0, atol=1e-12)
  assert out["cosine"] < 0.9  # a rotation keeps every relation but not the vectors
  np.testing.assert_allclose(E.mean_cosine(3.0 * teacher, teacher), 1.0)
  np.testing.assert_allclose(E.mean_cosine(-teacher, teacher), -1.0)
  assert E.similarity_spearman(np.ones((5, 3)), teacher[:5]) == 0.0  # constant similarities: 0, not NaN
  assert "cosine" not in E.embedding_agreement(teacher[:, :4], teacher)


@pytest.mark.parametrize("call, match", [
    (lambda t: E.neighbour_recall(t, t, 25), r"k must be an int in \[1, N - 1\]"),
    (lambda t: E.neighbour_recall(t, t, 0), "k must be"),
    (lambda t: E.mean_cosine(t[:, :3], t), "differ in width"),
    (lambda t: E.similarity_spearman(t[:10], t), "same N"),
    (lambda t: E.similarity_spearman(t[:2], t[:2]), "at least 3"),
    (lambda t: E.mean_cosine(np.full_like(t, np.nan), t), "NaN"),
])
def test_metric_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call(np.random.default_rng(3).normal(size=(25, 6)))


# --------------------------------------------------------------------------------------------
# Lines and batches.


def test_lines_are_split_by_work_and_filtered():
  train = sentences.load_lines("train")
  validation = sentences.load_lines("validation")
  assert len(train) > 50_000 and len(validation) > 3_000
  assert not set(validation) & set(train) and len(set(validation)) == len(validation)
  for line in validation + train[:5000]:
    assert sum(any(c.isalpha() for c in w) for w in line.split()) >= 5 and "[" not in line and "]" not in line
    assert not line.lower().startswith(("act ", "scene "))
  assert sentences.text_lines("Enter.\n[Enter the Ghost and all the others.]\nTo be, or not to be, that is\n"
                              "ACT I. Scene one of the play\nO! [Aside.] he is not here, my lord\n") == [
                                  "To be, or not to be, that is", "O! he is not here, my lord"]
  small, large = (sentences.load_lines("validation", max_lines=n, seed=1) for n in (50, 200))
  assert len(small) == 50 and set(small) <= set(large) and small == [x for x in validation if x in set(small)]
  assert small != sentences.load_lines("validation", max_lines=50, seed=2)
  with pytest.raises(ValueError, match="unknown split"):
    sentences.load_lines("dev")


def _tokens(n, width=6):
  ids = np.arange(n * width, dtype=np.int32).reshape(n, width)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_training_stream_resumes_exactly_and_covers_each_epoch():
  tokens = _tokens(20)
  it = iter(sentences.make_sentence_dataset(tokens, batch_size=4, seed=3))
  first = [next(it) for _ in range(5)]  # one epoch
  assert sorted(np.concatenate([b["index"] for b in first]).tolist()) == list(range(20))
  np.testing.assert_array_equal(first[0]["input_ids"], tokens["input_ids"][first[0]["index"]])
  state = it.get_state()
  expected = [next(it)["index"] for _ in range(3)]
  again = iter(sentences.make_sentence_dataset(tokens, batch_size=4, seed=3))
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again)["index"], want)
  with pytest.raises(ValueError, match="fewer than one batch"):
    sentences.make_sentence_dataset(_tokens(3), batch_size=4, seed=0)


def test_eval_batches_count_each_line_once():
  tokens = _tokens(10)
  batches = list(sentences.eval_batches(tokens, batch_size=4))
  assert len(batches) == 3 and batches[-1]["mask"].tolist() == [1, 1, 0, 0]
  assert np.concatenate([b["index"][b["mask"] > 0] for b in batches]).tolist() == list(range(10))


# --------------------------------------------------------------------------------------------
# Experiment pieces and the experiment.


def test_teacher_layers_copy_and_frozen_word_embeddings():
  from kdjax.experiments import sentence_kd
  teacher = BertEncoder(TEACHER, rngs=nnx.Rngs(0))
  t_graphdef, t_params = nnx.split(teacher, nnx.Param)
  one = dataclasses.replace(TEACHER, layers=1)
  graphdef, params = nnx.split(BertEncoder(one, rngs=nnx.Rngs(9)), nnx.Param)
  params = sentence_kd.copy_teacher_layers(params, t_params, (1,))
  np.testing.assert_array_equal(np.asarray(params["layers"][0]["q"][...]), np.asarray(t_params["layers"][1]["q"][...]))
  np.testing.assert_array_equal(np.asarray(params["word_embeddings"][...]),
                                np.asarray(t_params["word_embeddings"][...]))
  with pytest.raises(ValueError, match="hidden 8 vs 16"):
    sentence_kd.init_layers({"init_layers": ()}, NARROW, TEACHER)
  with pytest.raises(ValueError, match="must name 1 teacher layers"):
    sentence_kd.init_layers({"init_layers": (0, 1)}, one, TEACHER)

  cfg = dict(learning_rate=1e-2, warmup_steps=1, steps=4, schedule="cosine", decay_at=(), b1=0.9, b2=0.999,
             weight_decay=0.01, clip_norm=1.0, freeze_word_embeddings=True)
  optimizer = sentence_kd.make_optimizer(ml_collections.ConfigDict(cfg))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  update = jax.jit(optimizer.update)
  opt_state = jax.jit(optimizer.init)(params)
  for _ in range(2):
    updates, opt_state = update(grads, opt_state, params)
  assert float(jnp.abs(updates["word_embeddings"][...]).max()) == 0.0
  assert float(jnp.abs(updates["layers"][0]["q"][...]).min()) > 0
  assert float(jnp.abs(updates["position_embeddings"][...]).min()) > 0


def test_runlocal_experiment_with_the_real_teacher(tmp_path):
  from configs import minilm_sentence_kd
  from kdjax.experiments import sentence_kd
  config = minilm_sentence_kd.get_config("runlocal,layers=2,method=minilm")
  lines = []
  results = sentence_kd.run(config, str(tmp_path), log=lines.append)
  init, baseline, method = (results[k][0] for k in ("student_init", "embedding", "minilm"))
  # The baseline optimises the cosine directly; the method's other terms may slow it, not reverse it.
  assert baseline["cosine"] > init["cosine"] + 0.02
  assert method["cosine"] > init["cosine"]
  for row in (init, baseline, method):
    assert 0 <= row["recall@1"] <= 1 and -1 <= row["spearman"] <= 1
  assert json.load(open(tmp_path / "results.json"))["results"]["method"] == "minilm"
  assert "student, minilm" in open(tmp_path / "results.md").read()
  # A second run restores both finished students: nothing retrains, the numbers are the same.
  again_lines = []
  again = sentence_kd.run(config, str(tmp_path), log=again_lines.append)
  assert sum("resumed from step 6" in line for line in again_lines) == 2
  assert not any(" step 2/6 " in line for line in again_lines)
  for k in ("embedding", "minilm"):
    np.testing.assert_allclose(again[k][0]["cosine"], results[k][0]["cosine"], rtol=1e-6)
  assert os.path.isdir(tmp_path / "minilm_seed0")


def test_config_errors():
  from configs import minilm_sentence_kd
  with pytest.raises(ValueError, match="unknown method"):
    minilm_sentence_kd.get_config("method=tinybert")
  with pytest.raises(ValueError, match="layers must be 2 or 3"):
    minilm_sentence_kd.get_config("layers=4")
  assert minilm_sentence_kd.get_config("hidden=256,student_init=random").distill.relation_heads == 8
