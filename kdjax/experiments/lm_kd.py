"""Distil a decoder LM into a smaller one on a text corpus, against the no-teacher baseline.

The experiment (a config's `experiment = 'lm_kd'`):
  1. trains the teacher with cross-entropy, or restores it from `workdir/teacher` when a
     previous run finished it (teachers are trained once and cached);
  2. for each seed, trains the student twice with the same initialisation, data order and
     step count: (a) cross-entropy only, (b) with the distillation strategy of
     `config.distill`;
  3. evaluates everything on the held-out split and prints one table (validation CE in
     nats per byte, perplexity, bits per byte, agreement with the teacher) with the KD gain.

Every run checkpoints into its own directory and resumes from it, so a killed experiment
restarted with the same command loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import optax

from kdjax import losses
from kdjax.data import lm_pipeline, teacher_cache, text_sources
from kdjax.data.tokenizers import ByteTokenizer
from kdjax.distill import strategies
from kdjax.distill.distillm import (AdaptiveOffPolicyBatches, AdaptiveOffPolicyConfig, ContrastiveBatches,
                                   DistiLLM2Distillation)
from kdjax.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from kdjax.evaluate.teacher_hacking import TeacherHackingMonitor
from kdjax.models import sampling
from kdjax.models.decoder import DecoderConfig, DecoderLM, count_params
from kdjax.train import loop, sharding as sharding_lib, state as state_lib, step as step_lib
from kdjax.train.checkpoint import RunCheckpoints

from flax import nnx


@dataclasses.dataclass
class TrainedModel:
  graphdef: Any
  params: Any
  num_params: int
  train_seconds: float
  monitor: Optional[dict] = None  # the teacher-hacking monitor's summary, when one ran


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay and global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, end_value=cfg.learning_rate * cfg.final_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b2=0.98, weight_decay=cfg.weight_decay))


def _model_config(cfg: ml_collections.ConfigDict, *, vocab_size: int, seq_len: int) -> DecoderConfig:
  return DecoderConfig(vocab_size=vocab_size, max_len=seq_len, **cfg.to_dict())


def train_lm(*, name: str, model_cfg: DecoderConfig, train_cfg: ml_collections.ConfigDict, seed: int,
             strategy, teacher: Optional[TrainedModel], train_tokens: np.ndarray, data_cfg, mesh,
             rules, workdir: str, log: Callable[[str], None], window_features=None,
             batch_source: Optional[Callable] = None, monitor: Optional[Callable] = None,
             teacher_forward: Optional[Callable] = None) -> TrainedModel:
  """Trains (or resumes, or restores a finished) model in `workdir/name`.

  `window_features` adds per-window batch fields (an offline teacher cache's top-k);
  `batch_source(graphdef, seed)` makes the loop's batch hook (on-policy samples, DistiLLM's replay);
  `monitor(graphdef)` the loop's monitor (teacher hacking), whose `summary()` the result keeps;
  `teacher_forward` replaces the teacher's plain forward (AdaSPEC's teacher + reference pair).
  """
  graphdef, params = state_lib.create_sharded_model(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(seed)), mesh, rules)
  prepare = None if batch_source is None else batch_source(graphdef, seed)
  watch = None if monitor is None else monitor(graphdef)
  optimizer = make_optimizer(train_cfg)
  state = state_lib.create_train_state(params, optimizer, seed, mesh, strategy=strategy)
  batches = iter(lm_pipeline.make_lm_dataset(
      train_tokens, seq_len=data_cfg.seq_len, batch_size=train_cfg.batch_size, seed=seed, shuffle=True,
      num_epochs=None, shard_index=jax.process_index(), shard_count=jax.process_count(),
      window_features=window_features))
  checkpoints = RunCheckpoints(os.path.join(workdir, name), keep=train_cfg.get("keep_checkpoints", 2))
  if checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(state)
    loop.restore_data_state(data_state, batches, prepare)
    log(f"[{name}] resumed from step {int(state.step)} in {checkpoints.directory}")
  num_params = count_params(nnx.merge(graphdef, state.params))
  t0 = time.perf_counter()
  if int(state.step) < train_cfg.steps:
    log(f"[{name}] {num_params:,} parameters, {train_cfg.steps} steps of {train_cfg.batch_size}x{data_cfg.seq_len} tokens")
    step_fn = step_lib.make_distill_step(
        state=state, teacher_params=None if teacher is None else teacher.params, mesh=mesh,
        student_forward=step_lib.lm_forward(graphdef, head=strategy.uses_head),
        teacher_forward=teacher_forward or (None if teacher is None else
                                            step_lib.lm_forward(teacher.graphdef, head=strategy.uses_head)),
        strategy=strategy, optimizer=optimizer)
    state, _ = loop.fit(
        state=state, step_fn=step_fn, batches=batches, teacher_params=None if teacher is None else teacher.params,
        num_steps=train_cfg.steps, mesh=mesh, tokens_per_batch=train_cfg.batch_size * data_cfg.seq_len,
        log_every=train_cfg.log_every, checkpoints=checkpoints, checkpoint_every=train_cfg.checkpoint_every,
        name=name, log=log, prepare_batch=prepare, monitor=watch,
        monitor_every=train_cfg.get("monitor_every", 0))
    if prepare is not None:
      log(f"[{name}] batch sources this run: {prepare.counts}")
  checkpoints.close()
  facts = _run_facts(os.path.join(workdir, name), time.perf_counter() - t0,
                     None if watch is None or not watch.history else watch.summary())
  return TrainedModel(graphdef, state.params, num_params, facts["train_seconds"], facts["monitor"])


def _run_facts(directory: str, seconds: float, monitor: Optional[dict]) -> dict:
  """The run's training seconds over all its invocations and its latest monitor summary, kept in
  `directory/run_facts.json`, so a finished run restored later reports what its training took."""
  path = os.path.join(directory, "run_facts.json")
  facts = {"train_seconds": 0.0, "monitor": None}
  if os.path.exists(path):
    with open(path) as f:
      facts.update(json.load(f))
  facts["train_seconds"] += seconds
  if monitor is not None:
    facts["monitor"] = monitor
  with open(path, "w") as f:
    json.dump(facts, f)
  return facts


def evaluate_lm(model: TrainedModel, teacher: Optional[TrainedModel], tokens: np.ndarray, *, data_cfg, eval_cfg,
                mesh) -> dict[str, float]:
  """Held-out CE (nats/byte), perplexity, bits per byte and teacher agreement over the split."""
  eval_step = step_lib.make_eval_step(
      params=model.params, teacher_params=None if teacher is None else teacher.params, mesh=mesh,
      student_forward=step_lib.lm_forward(model.graphdef),
      teacher_forward=None if teacher is None else step_lib.lm_forward(teacher.graphdef))
  totals = None
  for batch in lm_pipeline.eval_batches(tokens, seq_len=data_cfg.seq_len, batch_size=eval_cfg.batch_size,
                                        max_batches=eval_cfg.max_batches or None):
    out = eval_step(model.params, sharding_lib.shard_batch(batch, mesh), None if teacher is None else teacher.params)
    totals = step_lib.sum_metrics(totals, out)
  if totals is None:
    raise ValueError(f"the evaluation split has {len(tokens)} tokens: too few for one window of {data_cfg.seq_len}")
  results = step_lib.mean_metrics(totals)
  results["perplexity"] = math.exp(results["ce"])
  results["bits_per_byte"] = results["ce"] / math.log(2)
  results["eval_tokens"] = float(totals["ce"][1])
  return results


def restore_model(config: ml_collections.ConfigDict, workdir: str, name: str) -> TrainedModel:
  """A finished model of a run of this experiment (`teacher`, `student_ce_seed0`, `student_kd_seed1`, ...)
  restored from its checkpoint in `workdir` (for analyses after the run, e.g. speculative decoding)."""
  role = "teacher" if name == "teacher" else "student"
  model_cfg = _model_config(config[role].model, vocab_size=ByteTokenizer.vocab_size, seq_len=config.data.seq_len)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  graphdef, params = state_lib.create_sharded_model(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(0)), mesh,
                                                    [tuple(r) for r in config.sharding_rules])
  strategy = None
  if name.startswith("student_kd"):  # a stateful strategy's state is part of the checkpoint
    strategy = strategies.strategy_from_config(config.distill, vocab_size=ByteTokenizer.vocab_size,
                                               num_steps=config.student.train.steps)
  state = state_lib.create_train_state(params, make_optimizer(config[role].train), 0, mesh, strategy=strategy)
  checkpoints = RunCheckpoints(os.path.join(workdir, name))
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint of {name!r} in {workdir}")
  state, _ = checkpoints.restore(state)
  checkpoints.close()
  return TrainedModel(graphdef, state.params, count_params(nnx.merge(graphdef, state.params)), 0.0)


def sample_text(model: TrainedModel, prompt: np.ndarray, *, new_tokens: int, temperature: float, seed: int) -> str:
  """The model's continuation of the byte prompt, sampled at `temperature` (top-k / top-p off)."""
  config = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=temperature)
  generation = sampling.generate(model.graphdef, model.params, jax.numpy.asarray(prompt[None], jax.numpy.int32),
                                 jax.random.PRNGKey(seed), config=config)
  return ByteTokenizer().decode(np.asarray(generation.tokens[0])[np.asarray(generation.mask[0])])


def _mean_std(values: list[float], digits: int = 4, sign: str = "") -> str:
  """'mean ± sample std' over seeds; the mean alone for one seed (no spread was measured)."""
  mean = f"{statistics.fmean(values):{sign}.{digits}f}"
  return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def format_table(results: dict) -> str:
  """The experiment's summary: one row per model, mean ± std over seeds, then the KD gain."""
  rows = ["| model | params | val CE (nats/byte) | perplexity | bits/byte | top-1 agreement with teacher |",
          "|---|---|---|---|---|---|"]
  t = results["teacher"]
  rows.append(f"| teacher | {t['num_params']:,} | {t['ce']:.4f} | {t['perplexity']:.3f} | {t['bits_per_byte']:.4f} | - |")
  for name in ("student_ce", "student_kd"):
    runs = results[name]
    column = lambda key, digits=4: _mean_std([r[key] for r in runs], digits)  # noqa: E731
    rows.append(f"| {name} | {runs[0]['num_params']:,} | {column('ce')} | {column('perplexity', 3)} | "
                f"{column('bits_per_byte')} | {column('teacher_agreement', 3)} |")
  gains = [a["ce"] - b["ce"] for a, b in zip(results["student_ce"], results["student_kd"])]
  ppl_gain = [a["perplexity"] - b["perplexity"] for a, b in zip(results["student_ce"], results["student_kd"])]
  rows.append("")
  rows.append(f"KD gain over the no-teacher student ({len(gains)} seed(s), same init/data/steps): "
              f"val CE {_mean_std(gains, sign='+')} nats/byte (positive = KD better), perplexity "
              f"{statistics.fmean(ppl_gain):+.3f}; per seed: " + ", ".join(f"{g:+.4f}" for g in gains))
  cache = results.get("teacher_cache")
  if cache:
    rows.append(f"Offline teacher: top-{cache['k']} cache of {cache['bytes'] / 2**20:.1f} MiB "
                f"({cache['bytes_per_token']:.1f} bytes/token, {cache['value_dtype']} logits), built in "
                f"{cache['build_seconds']:.1f} s" + (" (reused)" if cache["reused"] else ""))
  return "\n".join(rows)


def _monitor(config, teacher: TrainedModel, train_tokens, eval_tokens, mesh) -> Optional[Callable]:
  """`graphdef -> TeacherHackingMonitor` on the first `eval.monitor_batches` windows of each split,
  or None when `student.train.monitor_every` is 0."""
  if not config.student.train.get("monitor_every"):
    return None
  windows = lambda tokens: lm_pipeline.eval_batches(  # noqa: E731
      tokens, seq_len=config.data.seq_len, batch_size=config.eval.batch_size, max_batches=config.eval.monitor_batches)
  return lambda graphdef: TeacherHackingMonitor(
      student_forward=step_lib.lm_forward(graphdef), teacher_forward=step_lib.lm_forward(teacher.graphdef),
      teacher_params=teacher.params, train_batches=windows(train_tokens), eval_batches=windows(eval_tokens), mesh=mesh)


def _with_reference(teacher: TrainedModel, reference: TrainedModel) -> tuple[TrainedModel, Callable]:
  """AdaSPEC's step teacher: the target and the reference together, one forward giving both logits."""
  target, ref = step_lib.lm_forward(teacher.graphdef), step_lib.lm_forward(reference.graphdef)

  def forward(params, batch):
    return {"logits": target(params["teacher"], batch)["logits"],
            "reference_logits": ref(params["reference"], batch)["logits"]}

  pair = dataclasses.replace(teacher, params={"teacher": teacher.params, "reference": reference.params})
  return pair, forward


def _batch_source(config, strategy, teacher: TrainedModel, eval_tokens, mesh) -> Optional[Callable]:
  """`(graphdef, seed) -> batch hook` for the distilled student, or None for plain data batches.

  DistiLLM-2's strategy takes paired teacher / student continuations; `adaptive_off_policy`
  (DistiLLM) mixes in student samples by its validation-driven threshold; an active `on_policy`
  section samples with fixed probabilities (GKD, sequence-level KD).
  """
  sampling = OnPolicyConfig.from_config(config.get("on_policy"))
  seq_len = config.data.seq_len
  if isinstance(strategy, DistiLLM2Distillation):
    return lambda graphdef, seed: ContrastiveBatches(
        dataclasses.replace(sampling, seed=seed), seq_len=seq_len, student_graphdef=graphdef,
        teacher_graphdef=teacher.graphdef, mesh=mesh)
  if config.get("adaptive_off_policy") is not None:
    adaptive = AdaptiveOffPolicyConfig(**config.adaptive_off_policy.to_dict())
    return lambda graphdef, seed: AdaptiveOffPolicyBatches(
        adaptive, dataclasses.replace(sampling, seed=seed), seq_len=seq_len, student_graphdef=graphdef, mesh=mesh,
        validation_loss=_validation_loss(strategy, graphdef, teacher, eval_tokens, config, mesh))
  if not sampling.active:
    return None
  if not strategy.uses_teacher:
    raise ValueError("on_policy sampling needs a strategy that runs the teacher on the batch (the samples are "
                     "new text); the teacher_cache method only knows the cached windows")
  return lambda graphdef, seed: OnPolicyBatches(
      dataclasses.replace(sampling, seed=seed), seq_len=seq_len, student_graphdef=graphdef,
      teacher_graphdef=teacher.graphdef, mesh=mesh)


def _validation_loss(strategy, graphdef, teacher: TrainedModel, eval_tokens, config, mesh) -> Callable:
  """`(params, teacher_params) -> the strategy's divergence per kept token` on the first
  `adaptive_off_policy.eval_batches` validation batches (DistiLLM's θ follows it)."""
  student, teacher_forward = step_lib.lm_forward(graphdef), step_lib.lm_forward(teacher.graphdef)

  @jax.jit
  def kd_sums(params, teacher_params, batch):
    return strategy(student(params, batch), teacher_forward(teacher_params, batch), batch, 0)[1]["kd"]

  batches = [sharding_lib.shard_batch(b, mesh) for b in lm_pipeline.eval_batches(
      eval_tokens, seq_len=config.data.seq_len, batch_size=config.eval.batch_size,
      max_batches=config.adaptive_off_policy.eval_batches)]

  def loss(params, teacher_params) -> float:
    sums = [kd_sums(params, teacher_params, b) for b in batches]
    return float(sum(s for s, _ in sums)) / max(float(sum(c for _, c in sums)), 1.0)

  return loss


def _teacher_cache(strategy, config, teacher: TrainedModel, train_tokens, vocab, mesh, workdir, log):
  """Builds (or reuses) the offline teacher cache for `strategy`; returns its reader and facts."""
  directory = os.path.join(workdir, f"teacher_cache_k{strategy.k}_t{strategy.temperature:g}")
  value_dtype = config.distill.get("value_dtype", "float16")
  built = teacher_cache.build_teacher_cache(
      directory, tokens=train_tokens, seq_len=config.data.seq_len, k=strategy.k, temperature=strategy.temperature,
      forward=step_lib.lm_forward(teacher.graphdef), params=teacher.params, vocab_size=vocab,
      batch_size=config.teacher.train.batch_size, value_dtype=value_dtype,
      place=lambda batch: sharding_lib.shard_batch(batch, mesh), log=log)
  facts = {"bytes": built["bytes"], "build_seconds": built["seconds"], "reused": built["reused"],
           "k": strategy.k, "value_dtype": value_dtype, "bytes_per_token": built["bytes"] / len(train_tokens)}
  return teacher_cache.CachedTeacher(directory), facts


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs the whole experiment; returns (and writes to workdir/results.json) the results."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  rules = [tuple(r) for r in config.sharding_rules]
  for cfg in (config.teacher.train, config.student.train):
    sharding_lib.check_batch_size(cfg.batch_size, mesh)
  data_cfg = config.data
  data_dir = data_cfg.data_dir or text_sources.default_data_dir()
  train_tokens = text_sources.load_split_tokens(data_cfg.name, data_cfg.train_split, data_dir=data_dir)
  eval_tokens = text_sources.load_split_tokens(data_cfg.name, data_cfg.eval_split, data_dir=data_dir)
  log(f"data: {data_cfg.name} train {len(train_tokens):,} bytes, {data_cfg.eval_split} {len(eval_tokens):,} bytes; "
      f"mesh {dict(mesh.shape)}")
  vocab = ByteTokenizer.vocab_size
  teacher_cfg = _model_config(config.teacher.model, vocab_size=vocab, seq_len=data_cfg.seq_len)
  student_cfg = _model_config(config.student.model, vocab_size=vocab, seq_len=data_cfg.seq_len)
  common = dict(train_tokens=train_tokens, data_cfg=data_cfg, mesh=mesh, rules=rules, workdir=workdir, log=log)
  evaluate = lambda m, t: evaluate_lm(m, t, eval_tokens, data_cfg=data_cfg, eval_cfg=config.eval, mesh=mesh)

  ce_only = strategies.LogitDistillation(divergence=None)
  teacher = train_lm(name="teacher", model_cfg=teacher_cfg, train_cfg=config.teacher.train,
                     seed=config.teacher.seed, strategy=ce_only, teacher=None, **common)
  results: dict[str, Any] = {"teacher": dict(evaluate(teacher, None), num_params=teacher.num_params,
                                             train_seconds=teacher.train_seconds)}
  log(f"[teacher] validation CE {results['teacher']['ce']:.4f} nats/byte")
  sample_cfg = config.eval.sample
  # The same held-out prompt for every model: the start of the validation split.
  prompt = eval_tokens[:sample_cfg.prompt_tokens]
  sample = lambda model: sample_text(model, prompt, new_tokens=sample_cfg.new_tokens,  # noqa: E731
                                     temperature=sample_cfg.temperature, seed=config.seed)
  if sample_cfg.new_tokens:
    results["sample_prompt"] = ByteTokenizer().decode(prompt)
    results["teacher"]["sample"] = sample(teacher)
  kd = strategies.strategy_from_config(config.distill, vocab_size=vocab, num_steps=config.student.train.steps)
  features, sources = {}, {"student_kd": _batch_source(config, kd, teacher, eval_tokens, mesh)}
  monitor = _monitor(config, teacher, train_tokens, eval_tokens, mesh)
  if isinstance(kd, strategies.CachedTeacherDistillation):
    features["student_kd"], results["teacher_cache"] = _teacher_cache(kd, config, teacher, train_tokens, vocab,
                                                                      mesh, workdir, log)
  for name, strategy in (("student_ce", ce_only), ("student_kd", kd)):
    results[name] = []
    for seed in range(config.seed, config.seed + config.num_seeds):
      run_teacher, teacher_forward = teacher if strategy.uses_teacher else None, None
      if name == "student_kd" and isinstance(kd, strategies.AdaSPECDistillation):
        reference = train_lm(name=f"reference_seed{seed}", model_cfg=student_cfg, train_cfg=config.student.train,
                             seed=seed, strategy=strategies.LogitDistillation(losses.forward_kl, kd_weight=1.0),
                             teacher=teacher, **common)
        results.setdefault("reference", []).append(dict(evaluate(reference, teacher), seed=seed))
        run_teacher, teacher_forward = _with_reference(teacher, reference)
      trained = train_lm(name=f"{name}_seed{seed}", model_cfg=student_cfg, train_cfg=config.student.train,
                         seed=seed, strategy=strategy, teacher=run_teacher, window_features=features.get(name),
                         batch_source=sources.get(name), monitor=monitor, teacher_forward=teacher_forward, **common)
      metrics = dict(evaluate(trained, teacher), num_params=trained.num_params, train_seconds=trained.train_seconds,
                     seed=seed)
      if trained.monitor is not None:
        metrics["monitor"] = trained.monitor
      if sample_cfg.new_tokens and seed == config.seed:
        metrics["sample"] = sample(trained)
      log(f"[{name} seed {seed}] validation CE {metrics['ce']:.4f} nats/byte")
      results[name].append(metrics)
  table = format_table(results)
  log("\n" + table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"results": results, "config": config.to_dict()}, f, indent=1, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  results["table"] = table
  return results
