"""Distil the all-MiniLM-L6-v2 sentence encoder into a 2–3 layer student, against the embedding-only baseline.

The experiment (a config's `experiment = 'sentence_kd'`, `configs/minilm_sentence_kd.py`):
  1. loads the teacher, sentence-transformers/all-MiniLM-L6-v2 (`kdjax.models.encoder_checkpoint`;
     never trained) and its WordPiece tokenizer, and the Shakespeare lines (`kdjax.data.sentences`:
     training works for training, held-out works for evaluation);
  2. for each seed builds the student (a `BertEncoder` of `student.layers` layers), initialised either
     from the teacher's layers (`student.init = 'teacher_layers'`: embeddings and the layers
     `student.init_layers`, by default the bottom ones, DistilBERT / TinyBERT's practice) or at random,
     and trains it twice from that same initialisation, data order and step count with AdamW:
     (a) the baseline, 1 − cos(student embedding, teacher embedding) only; (b) `config.distill`
     (`kdjax.distill.sentence`: MiniLM's attention and value relations, MiniLMv2's Q-Q / K-K / V-V
     relations, hidden states), which includes the embedding term with its own weight;
  3. embeds the held-out lines with every model and reports, against the teacher's embeddings
     (`kdjax.evaluate.embeddings`): the mean cosine, nearest-neighbour recall@k among the held-out
     lines and the Spearman correlation of all pairwise similarities, for the untrained student,
     the baseline and the method; a table in `results.md` and everything in `results.json`.

Every training run checkpoints into `workdir/<run>_seed<s>` and resumes from it; a finished run is
restored and not retrained. The baseline's directory (`embedding_seed<s>`) does not depend on the
method, so experiments of several methods in one workdir share it: a workdir is meant for one teacher,
student, data and training configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from kdjax.data import sentences
from kdjax.data.wordpiece import WordPieceTokenizer
from kdjax.distill import sentence
from kdjax.evaluate import embeddings as embedding_metrics
from kdjax.experiments.vision_kd import _add_train_seconds, learning_rate_schedule
from kdjax.models.encoder import BertEncoder, EncoderConfig
from kdjax.models.encoder_checkpoint import load_bert, minilm_l6_dir
from kdjax.experiments import reporting
from kdjax.train import loop, sharding as sharding_lib, state as state_lib, step as step_lib
from kdjax.train.checkpoint import RunCheckpoints

BASELINE = "embedding"
STUDENT_INITS = ("teacher_layers", "random")


@dataclasses.dataclass
class Encoder:
  """A model as pure state (`nnx.merge(graphdef, params)`) and what the experiment reports of it."""
  name: str
  config: EncoderConfig
  graphdef: Any
  params: Any
  num_params: int
  strategy: Optional[sentence.SentenceDistillation] = None
  strategy_params: Any = dataclasses.field(default_factory=dict)
  train_seconds: float = 0.0


def count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def load_teacher(config, mesh) -> tuple[Encoder, WordPieceTokenizer]:
  """The teacher (`config.teacher.path`, or all-MiniLM-L6-v2 when empty) replicated on the mesh, and
  the tokenizer of the same directory."""
  directory = config.teacher.path or minilm_l6_dir()
  model, model_config = load_bert(directory)
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.device_put(params, sharding_lib.replicated(mesh))
  return (Encoder("teacher", model_config, graphdef, params, count_params(params)),
          WordPieceTokenizer.from_dir(directory))


def student_config(student_cfg, teacher: EncoderConfig) -> EncoderConfig:
  """The student's `EncoderConfig`: the teacher's vocabulary, positions and numerics with the section's
  `layers`, `hidden`, `heads` and `intermediate` (no pooler: the embedding is the mean pooling)."""
  return dataclasses.replace(teacher, layers=student_cfg.layers, hidden=student_cfg.hidden, heads=student_cfg.heads,
                             intermediate=student_cfg.intermediate, pooler=False)


def init_layers(student_cfg, student: EncoderConfig, teacher: EncoderConfig) -> tuple[int, ...]:
  """The teacher layers a 'teacher_layers' student copies, one per student layer (default the bottom
  ones), checked against both models."""
  layers = tuple(student_cfg.get("init_layers") or range(student.layers))
  if len(layers) != student.layers or not all(isinstance(i, int) and 0 <= i < teacher.layers for i in layers):
    raise ValueError(f"student.init_layers={layers} must name {student.layers} teacher layers in "
                     f"0..{teacher.layers - 1}, one per student layer")
  mismatched = [f"{name} {getattr(student, name)} vs {getattr(teacher, name)}"
                for name in ("hidden", "heads", "intermediate") if getattr(student, name) != getattr(teacher, name)]
  if mismatched:
    raise ValueError(f"student.init='teacher_layers' copies the teacher's layers, so the shapes must agree; student "
                     f"vs teacher: {', '.join(mismatched)} (use student.init='random')")
  return layers


def copy_teacher_layers(params, teacher_params, layers: Sequence[int]):
  """The student's params with the teacher's embeddings and layers `layers[i]` as its layer i, each
  placed with the sharding of the student parameter it replaces. Copies, never aliases: the step
  donates the student's buffers, and the teacher's must survive it."""
  source = nnx.to_pure_dict(teacher_params)
  target = nnx.to_pure_dict(params)
  copied = {k: source[k] for k in target if k != "layers"}
  copied["layers"] = {i: source["layers"][layer] for i, layer in enumerate(layers)}
  copied = jax.tree_util.tree_map(lambda new, old: jax.device_put(new, old.sharding, may_alias=False), copied, target)
  nnx.replace_by_pure_dict(params, copied)
  return params


def initial_student(config, student: EncoderConfig, teacher: Encoder, seed: int, mesh):
  """`(graphdef, params)` of the seed's untrained student, as both of its runs start."""
  make = lambda: BertEncoder(student, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, params = state_lib.create_sharded_model(make, mesh, sharding_lib.rules_from_config(config, "student"))
  if config.student.init == "teacher_layers":
    params = copy_teacher_layers(params, teacher.params, init_layers(config.student, student, teacher.config))
  return graphdef, params


def _path_has(path, name: str) -> bool:
  return any(getattr(key, "key", getattr(key, "name", None)) == name for key in path)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW (BERT's: no weight decay on biases and LayerNorm, i.e. on parameters of rank < 2) with the
  warm-up + cosine schedule, after global-norm clipping; with `freeze_word_embeddings` the word
  embeddings copied from the teacher are not updated (the corpus uses a small part of the 30522 rows,
  and weight decay would shrink every other row)."""
  decay_mask = lambda tree: jax.tree_util.tree_map(lambda x: np.ndim(x) >= 2, tree)  # noqa: E731
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  update = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
  if not cfg.freeze_word_embeddings:
    return update
  labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: "frozen" if _path_has(path, "word_embeddings") else "train", tree)
  return optax.multi_transform({"train": update, "frozen": optax.set_to_zero()}, labels)


def train_student(*, name: str, config, initial: Encoder, seed: int, strategy: sentence.SentenceDistillation,
                  teacher: Encoder, tokens, mesh, workdir: str, log: Callable[[str], None]) -> Encoder:
  """Trains (or resumes, or restores a finished) student in `workdir/name`, starting from a copy of
  `initial` (the step donates its state, and `initial` starts the seed's other runs too)."""
  train_cfg = config.student.train
  student, graphdef = initial.config, initial.graphdef
  params = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding, may_alias=False), initial.params)
  optimizer = make_optimizer(train_cfg)
  state = state_lib.create_train_state(params, optimizer, seed, mesh, strategy=strategy)
  shard_index, shard_count = sharding_lib.process_batch_shard(mesh)
  batches = iter(sentences.make_sentence_dataset(
      tokens, batch_size=sharding_lib.process_batch_size(train_cfg.batch_size, mesh), seed=seed,
      shard_index=shard_index, shard_count=shard_count))
  directory = os.path.join(workdir, name)
  checkpoints = RunCheckpoints(directory, keep=train_cfg.keep_checkpoints)
  if checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(state)
    loop.restore_data_state(data_state, batches)
    log(f"[{name}] resumed from step {int(state.step)} in {checkpoints.directory}")
  t0 = time.perf_counter()
  # A finished run restored here trains nothing, so it adds no training time.
  trains = int(state.step) < train_cfg.steps
  if trains:
    log(f"[{name}] {student.layers} layers × {student.hidden}: {count_params(state.params):,} parameters, "
        f"{train_cfg.steps} steps of {train_cfg.batch_size} lines; {strategy}")
    student_forward = sentence.encoder_forward(graphdef, features=strategy.feature_names("student"))
    teacher_forward = sentence.encoder_forward(teacher.graphdef, features=strategy.feature_names("teacher"))
    step_fn = step_lib.make_distill_step(state=state, teacher_params=teacher.params, mesh=mesh,
                                         student_forward=student_forward, teacher_forward=teacher_forward,
                                         strategy=strategy, optimizer=optimizer)
    state, _ = loop.fit(
        state=state, step_fn=step_fn, batches=batches, teacher_params=teacher.params, num_steps=train_cfg.steps,
        mesh=mesh, tokens_per_batch=train_cfg.batch_size * config.data.max_len, log_every=train_cfg.log_every,
        checkpoints=checkpoints, checkpoint_every=train_cfg.checkpoint_every, name=name, log=log,
        learning_rate=learning_rate_schedule(train_cfg),
        logdir=os.path.join(directory, "tensorboard") if train_cfg.tensorboard else None,
        hparams=dict(seed=seed, student=config.student, data=config.data, strategy=repr(strategy)))
  checkpoints.close()
  seconds = _add_train_seconds(directory, time.perf_counter() - t0 if trains else 0.0)
  return Encoder(name, student, graphdef, state.params, count_params(state.params), strategy,
                 state.strategy_params, seconds)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(params, batch, *, graphdef):
  return sentence.encoder_forward(graphdef)(params, batch)["embedding"]


def embed_lines(model: Encoder, tokens, *, batch_size: int, mesh) -> np.ndarray:
  """`[N, D_t]` float32 embeddings of every tokenised line: the model's own for the teacher, the
  strategy's `student_embedding` (through its learned map when the widths differ) for a student."""
  rows = []
  for batch in sentences.eval_batches(tokens, batch_size=batch_size):
    valid = batch.pop("mask") > 0
    rows.append(np.asarray(_embed(model.params, sharding_lib.shard_batch(batch, mesh), graphdef=model.graphdef))[valid])
  out = np.concatenate(rows)
  if model.strategy is not None:
    # One small map over all rows, outside the jitted encoder: every strategy shares its compilation.
    out = np.asarray(model.strategy.student_embedding(out, model.strategy_params))
  return out


def evaluate(model: Encoder, teacher_embeddings: np.ndarray, tokens, config, mesh) -> dict[str, float]:
  out = embedding_metrics.embedding_agreement(embed_lines(model, tokens, batch_size=config.eval.batch_size, mesh=mesh),
                                              teacher_embeddings, ks=tuple(config.eval.ks))
  return dict(out, num_params=model.num_params, train_seconds=model.train_seconds)


def _mean_std(values: list[float], digits: int = 4) -> str:
  mean = f"{statistics.fmean(values):.{digits}f}"
  return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def _metric_keys(results: dict) -> list[str]:
  return [k for k in results["student_init"][0] if k not in ("num_params", "train_seconds", "seed")]


def format_table(results: dict) -> str:
  """The results as a Markdown table (mean ± standard deviation over seeds) and each method's gains over
  the baseline. `results['runs']` lists the rows after the teacher: 'student_init', the baseline and any
  number of methods (a benchmark merges several experiments' results so)."""
  keys = _metric_keys(results)
  names = {"cosine": "cosine to teacher", "spearman": "Spearman ρ of pair similarities"}
  header = " | ".join(names.get(k, f"NN {k}") for k in keys)
  rows = [f"| model | params | {header} | train s |", "|---" * (len(keys) + 3) + "|"]
  t = results["teacher"]
  rows.append(f"| teacher {t['name']} ({t['layers']} layers) | {t['num_params']:,} | "
              + " | ".join("1 (reference)" for _ in keys) + " | - |")
  for run in results["runs"]:
    seeds = results[run]
    rows.append(f"| {results['labels'][run]} | {seeds[0]['num_params']:,} | "
                + " | ".join(_mean_std([s[k] for s in seeds]) for k in keys)
                + f" | {statistics.fmean(s['train_seconds'] for s in seeds):.0f} |")
  for method in (r for r in results["runs"] if r not in ("student_init", BASELINE)):
    pairs = list(zip(results[BASELINE], results[method]))
    rows.append("")
    rows.append(f"{method} − baseline ({len(pairs)} seed(s), same initialisation, data and steps): " + "; ".join(
        f"{k} {_mean_std([b[k] - a[k] for a, b in pairs])} (per seed "
        + ", ".join(f"{b[k] - a[k]:+.4f}" for a, b in pairs) + ")" for k in keys))
  return "\n".join(rows)


def _check_config(config) -> None:
  if config.student.init not in STUDENT_INITS:
    raise ValueError(f"unknown student.init {config.student.init!r}; known: {list(STUDENT_INITS)}")
  if config.student.train.freeze_word_embeddings and config.student.init != "teacher_layers":
    raise ValueError("student.train.freeze_word_embeddings keeps the word embeddings as initialised, which only "
                     "makes sense for student.init='teacher_layers' (random embeddings would never train)")


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs the whole experiment; returns (and writes to workdir/results.json and results.md) the results."""
  _check_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  sharding_lib.check_batch_size(config.student.train.batch_size, mesh)
  sharding_lib.check_batch_size(config.eval.batch_size, mesh)
  teacher, tokenizer = load_teacher(config, mesh)
  student = student_config(config.student, teacher.config)
  # Both strategies are built (and their head counts / widths / layers checked) before any work.
  method = config.method
  strategies = {BASELINE: sentence.sentence_strategy({"embedding_weight": 1.0}, student_config=student,
                                                     teacher_config=teacher.config)}
  if method != BASELINE:
    strategies[method] = sentence.sentence_strategy(config.distill.to_dict(), student_config=student,
                                                    teacher_config=teacher.config)
  if config.student.init == "teacher_layers":
    init_layers(config.student, student, teacher.config)
  d = config.data
  train_tokens = sentences.tokenize(tokenizer, sentences.load_lines("train", min_words=d.min_words,
                                                                    max_lines=d.train_lines or None), max_len=d.max_len)
  eval_lines = sentences.load_lines(d.eval_split, min_words=d.min_words, max_lines=d.eval_lines or None)
  eval_tokens = sentences.tokenize(tokenizer, eval_lines, max_len=d.max_len)
  log(f"teacher {teacher.config.layers} layers × {teacher.config.hidden} ({teacher.num_params:,} parameters); "
      f"{len(train_tokens['input_ids']):,} training lines, {len(eval_lines):,} held-out ({d.eval_split}) lines of "
      f"≥ {d.min_words} words, max_len {d.max_len}; mesh {dict(mesh.shape)}")
  teacher_embeddings = embed_lines(teacher, eval_tokens, batch_size=config.eval.batch_size, mesh=mesh)
  labels = {"student_init": f"student, untrained ({config.student.init})", BASELINE: "student, embedding cosine only",
            method: f"student, {method}"}
  runs = ["student_init"] + list(strategies)
  results: dict[str, Any] = {
      "teacher": dict(name=os.path.basename(os.path.normpath(config.teacher.path)) if config.teacher.path
                      else "all-MiniLM-L6-v2",
                      layers=teacher.config.layers, num_params=teacher.num_params),
      "method": method, "runs": runs, "labels": {r: labels[r] for r in runs}, "eval_lines": len(eval_lines),
      **{r: [] for r in runs}}
  for seed in range(config.seed, config.seed + config.num_seeds):
    graphdef, params = initial_student(config, student, teacher, seed, mesh)
    untrained = Encoder("student_init", student, graphdef, params, count_params(params), strategies[BASELINE],
                        _initial_strategy_params(strategies[BASELINE], seed))
    results["student_init"].append(dict(evaluate(untrained, teacher_embeddings, eval_tokens, config, mesh), seed=seed))
    for name, strategy in strategies.items():
      trained = train_student(name=f"{name}_seed{seed}", config=config, initial=untrained, seed=seed,
                              strategy=strategy, teacher=teacher, tokens=train_tokens, mesh=mesh, workdir=workdir,
                              log=log)
      results[name].append(dict(evaluate(trained, teacher_embeddings, eval_tokens, config, mesh), seed=seed))
      log(f"[{name} seed {seed}] " + " ".join(f"{k} {v:.4f}" for k, v in results[name][-1].items()
                                                  if k in _metric_keys(results)))
  table = format_table(results)
  log("\n" + table)
  reporting.write_results(workdir, results, config, table)
  results["table"] = table
  return results


def _initial_strategy_params(strategy: sentence.SentenceDistillation, seed: int):
  """The strategy's parameters as `state_lib.create_train_state` draws them for `seed` (the key
  `fold_in(PRNGKey(seed), 1)`): the untrained student's projection, when the widths differ."""
  return strategy.init_params(jax.random.fold_in(jax.random.PRNGKey(seed), 1))
