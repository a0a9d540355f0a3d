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
from kdjax.data import difference_sampling, domain_mixture, lm_pipeline, teacher_cache, text_sources
from kdjax.data.tokenizers import ByteTokenizer
from kdjax.distill import strategies
from kdjax.distill.aligndistil import AlignDistilDistillation
from kdjax.distill.minillm import MiniLLMBatches, MiniLLMDistillation
from kdjax.distill.semantic_revision import MGSRDistillation, RevisedRolloutBatches, RevisionConfig
from kdjax.distill.verified_traces import VerifiedTraceBatches, VerifiedTraceConfig, VerifiedTraceDistillation
from kdjax.distill.distillm import (AdaptiveOffPolicyBatches, AdaptiveOffPolicyConfig, ContrastiveBatches,
                                   DistiLLM2Distillation)
from kdjax.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from kdjax.evaluate.teacher_hacking import TeacherHackingMonitor
from kdjax.evaluate.word_checker import WordChecker
from kdjax.models import sampling
from kdjax.models.decoder import DecoderConfig, DecoderLM, count_params
from kdjax.experiments import reporting
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
  source_history: Optional[list] = None  # the batch hook's history, when it keeps one (DDK's weights)


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to `final_lr_fraction` of the peak at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, end_value=cfg.learning_rate * cfg.final_lr_fraction)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW on `learning_rate_schedule` with global-norm clipping."""
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(learning_rate_schedule(cfg), b2=0.98, weight_decay=cfg.weight_decay))


def _model_config(cfg: ml_collections.ConfigDict, *, vocab_size: int, seq_len: int) -> DecoderConfig:
  return DecoderConfig(vocab_size=vocab_size, max_len=seq_len, **cfg.to_dict())


def train_lm(*, name: str, model_cfg: DecoderConfig, train_cfg: ml_collections.ConfigDict, seed: int,
             strategy, teacher: Optional[TrainedModel], train_tokens: np.ndarray, data_cfg, mesh,
             rules, workdir: str, log: Callable[[str], None], window_features=None,
             batch_source: Optional[Callable] = None, monitor: Optional[Callable] = None,
             teacher_forward: Optional[Callable] = None, init_params=None) -> TrainedModel:
  """Trains (or resumes, or restores a finished) model in `workdir/name`.

  `window_features` adds per-window batch fields (an offline teacher cache's top-k);
  `batch_source(graphdef, seed)` makes the loop's batch hook (on-policy samples, DistiLLM's replay);
  `monitor(graphdef)` the loop's monitor (teacher hacking), whose `summary()` the result keeps;
  `teacher_forward` replaces the teacher's plain forward (AdaSPEC's teacher + reference pair);
  `init_params` start the model instead of its random initialisation (a warm start: a previous
  stage, an `init_from` checkpoint). Resume order: a checkpoint in `workdir/name`, else
  `init_params`, else `seed`'s initialisation.
  """
  graphdef, params = state_lib.create_sharded_model(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(seed)), mesh, rules)
  if init_params is not None:
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    if shapes(init_params) != shapes(params):
      raise ValueError(f"[{name}] the initial parameters do not fit the model {model_cfg}")
    # A copy in the same shardings: the step donates its state, and the source stays in use.
    params = jax.tree_util.tree_map(lambda init, p: jax.device_put(jax.numpy.array(init), p.sharding), init_params, params)
  prepare = None if batch_source is None else batch_source(graphdef, seed)
  watch = None if monitor is None else monitor(graphdef)
  optimizer = make_optimizer(train_cfg)
  state = state_lib.create_train_state(params, optimizer, seed, mesh, strategy=strategy)
  batches = iter(lm_pipeline.make_lm_dataset(
      train_tokens, seq_len=data_cfg.seq_len, batch_size=train_cfg.batch_size, seed=seed, shuffle=True,
      num_epochs=None, shard_index=jax.process_index(), shard_count=jax.process_count(),
      window_features=window_features))
  # keep_best ranks checkpoints by a validation metric of the monitor: runs without one keep the newest only.
  checkpoints = RunCheckpoints(os.path.join(workdir, name), keep=train_cfg.get("keep_checkpoints", 2),
                               keep_best=train_cfg.get("keep_best", 0) if watch is not None else 0,
                               best_metric=train_cfg.get("best_metric"), best_mode=train_cfg.get("best_mode", "min"))
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
        monitor_every=train_cfg.get("monitor_every", 0), learning_rate=learning_rate_schedule(train_cfg),
        logdir=os.path.join(checkpoints.directory, "tensorboard") if train_cfg.get("tensorboard", True) else None,
        hparams=dict(seed=seed, model=dataclasses.asdict(model_cfg), train=train_cfg, data=data_cfg,
                     strategy=repr(strategy)),
        profile_start=train_cfg.get("profile_start", 0), profile_steps=train_cfg.get("profile_steps", 0),
        profile_dir=os.path.join(checkpoints.directory, "profile"))
    if prepare is not None:
      log(f"[{name}] batch sources this run: {prepare.counts}")
  checkpoints.close()
  facts = _run_facts(os.path.join(workdir, name), time.perf_counter() - t0,
                     monitor=None if watch is None or not watch.history else watch.summary(),
                     source_history=getattr(prepare, "history", None) or None)
  return TrainedModel(graphdef, state.params, num_params, facts["train_seconds"], facts["monitor"],
                      facts["source_history"])


def _run_facts(directory: str, seconds: float, **latest: Optional[Any]) -> dict:
  """The run's training seconds over all its invocations and the latest of each fact in
  `latest` (a monitor summary, a batch source's history such as DDK's weights), kept in
  `directory/run_facts.json`, so a finished run restored later reports them."""
  path = os.path.join(directory, "run_facts.json")
  facts = {"train_seconds": 0.0, **{key: None for key in latest}}
  if os.path.exists(path):
    with open(path) as f:
      facts.update(json.load(f))
  facts["train_seconds"] += seconds
  facts.update({key: value for key, value in latest.items() if value is not None})
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


def restore_model(config: ml_collections.ConfigDict, workdir: str, name: str, role: Optional[str] = None) -> TrainedModel:
  """A finished model of a run of this experiment (`teacher`, `student_ce_seed0`, `student_kd_seed1`, ...)
  restored from its checkpoint in `workdir` (for analyses after the run, e.g. speculative decoding);
  `role` ('teacher' or 'student': whose model config) defaults to what the name says."""
  role = role or ("teacher" if name.startswith("teacher") else "student")
  model_cfg = _model_config(config[role].model, vocab_size=ByteTokenizer.vocab_size, seq_len=config.data.seq_len)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  graphdef, params = state_lib.create_sharded_model(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(0)), mesh,
                                                    sharding_lib.rules_from_config(config, role))
  checkpoints = RunCheckpoints(os.path.join(workdir, name))
  try:
    if checkpoints.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint of {name!r} in {workdir}")
    params = checkpoints.restore_params(params)
  finally:
    checkpoints.close()
  return TrainedModel(graphdef, params, count_params(nnx.merge(graphdef, params)), 0.0)


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


def _batch_source(config, strategy, teacher: TrainedModel, exp: "_Experiment") -> Optional[Callable]:
  """`(graphdef, seed) -> batch hook` for the distilled student, or None for plain data batches.

  MiniLLM samples the teacher-mixed policy (with the data windows for its pre-training term);
  DistiLLM-2's strategy takes paired teacher / student continuations; `adaptive_off_policy`
  (DistiLLM) mixes in student samples by its validation-driven threshold; MGSR with a
  `revision` section gets teacher-corrected student rollouts (SCRG); verified-trace strategies get the teacher's checked continuations; `ddk` draws the rows' domains by DDK's gap-driven weights; an active `on_policy` section samples with fixed
  probabilities (GKD, sequence-level KD).
  """
  sampling = OnPolicyConfig.from_config(config.get("on_policy"))
  seq_len, mesh = config.data.seq_len, exp.mesh
  if isinstance(strategy, VerifiedTraceDistillation):
    traces = VerifiedTraceConfig.from_config(config.get("verified_traces"))
    checker = exp.word_checker(config)
    return lambda graphdef, seed: VerifiedTraceBatches(
        dataclasses.replace(traces, seed=seed), seq_len=seq_len, teacher_graphdef=teacher.graphdef,
        teacher_params=teacher.params, mesh=mesh, checker=checker)
  if isinstance(strategy, MGSRDistillation) and config.get("revision") is not None:
    revision = RevisionConfig.from_config(config.revision)
    return lambda graphdef, seed: RevisedRolloutBatches(
        dataclasses.replace(revision, seed=seed), seq_len=seq_len, student_graphdef=graphdef,
        teacher_graphdef=teacher.graphdef, mesh=mesh)
  if isinstance(strategy, MiniLLMDistillation):
    return lambda graphdef, seed: MiniLLMBatches(
        dataclasses.replace(sampling, seed=seed), teacher_mix=strategy.teacher_mix, seq_len=seq_len,
        student_graphdef=graphdef, teacher_graphdef=teacher.graphdef, mesh=mesh, data_rows=strategy.pt_weight > 0)
  if isinstance(strategy, DistiLLM2Distillation):
    return lambda graphdef, seed: ContrastiveBatches(
        dataclasses.replace(sampling, seed=seed), seq_len=seq_len, student_graphdef=graphdef,
        teacher_graphdef=teacher.graphdef, mesh=mesh)
  if config.get("adaptive_off_policy") is not None:
    adaptive = AdaptiveOffPolicyConfig(**config.adaptive_off_policy.to_dict())
    return lambda graphdef, seed: AdaptiveOffPolicyBatches(
        adaptive, dataclasses.replace(sampling, seed=seed), seq_len=seq_len, student_graphdef=graphdef, mesh=mesh,
        validation_loss=_validation_loss(strategy, graphdef, teacher, exp.eval_tokens, config, mesh))
  if config.get("ddk") is not None:
    ddk = domain_mixture.DDKConfig.from_config(config.ddk)
    mixture = domain_mixture.DomainMixture.load(config.data.name, config.data.train_split, data_dir=exp.data_dir,
                                                holdout_fraction=ddk.holdout_fraction)
    return lambda graphdef, seed: domain_mixture.DDKBatches(
        dataclasses.replace(ddk, seed=seed), mixture, seq_len=seq_len, batch_size=config.student.train.batch_size,
        student_graphdef=graphdef, teacher_graphdef=teacher.graphdef, mesh=mesh)
  if not sampling.active:
    return None
  if not strategy.uses_teacher:
    raise ValueError("on_policy sampling needs a strategy that runs the teacher on the batch (the samples are "
                     "new text); the teacher_cache method only knows the cached windows")
  return lambda graphdef, seed: OnPolicyBatches(
      dataclasses.replace(sampling, seed=seed), seq_len=seq_len, student_graphdef=graphdef,
      teacher_graphdef=teacher.graphdef, mesh=mesh)


def _refined_corpus(config, exp: "_Experiment", seed: int) -> np.ndarray:
  """MiniPLM's refined training corpus (`config.difference_sampling`): the `fraction` of
  `chunk_len`-byte chunks with the largest mean log p_teacher − log p_reference, the reference
  being the CE-only student of the experiment's first seed (one corpus for all seeds); with
  `random=True` the same number of chunks drawn at random by `seed` (the control). The kept
  chunk indices are saved in the workdir, so a resumed run does not score again."""
  section = dict(config.difference_sampling)
  unknown = sorted(set(section) - {"chunk_len", "fraction", "random"})
  if unknown:
    raise ValueError(f"unknown difference_sampling keys {unknown}; known: ['chunk_len', 'fraction', 'random']")
  chunk_len, fraction = int(section.get("chunk_len", 1024)), float(section.get("fraction", 0.5))
  tokens = exp.train_tokens(config.data)
  if section.get("random"):
    keep = difference_sampling.random_chunks(len(tokens) // chunk_len, fraction, seed=seed)
  else:
    path = os.path.join(exp.workdir, f"difference_sampling_c{chunk_len}_f{fraction:g}.npy")
    if os.path.exists(path):
      keep = np.load(path)
    else:
      reference = exp.ce_students[exp.config.seed]
      scores = difference_sampling.score_chunks(
          tokens, chunk_len=chunk_len, seq_len=config.data.seq_len,
          teacher_forward=step_lib.lm_forward(exp.teacher.graphdef), teacher_params=exp.teacher.params,
          reference_forward=step_lib.lm_forward(reference.graphdef), reference_params=reference.params,
          batch_size=config.eval.batch_size, place=lambda batch: sharding_lib.shard_batch(batch, exp.mesh))
      keep = difference_sampling.select_chunks(scores, fraction)
      np.save(path, keep)
  return difference_sampling.refined_tokens(tokens, chunk_len, keep)


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


@dataclasses.dataclass
class _Experiment:
  """What every training run of one experiment shares (built once by `run`)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  rules: dict  # role ('teacher', 'student') -> its sharding_lib.ShardingRules
  log: Callable[[str], None]
  data_dir: str
  eval_tokens: np.ndarray
  student_cfg: DecoderConfig
  teacher: Optional[TrainedModel] = None
  finetuned_teacher: Optional[TrainedModel] = None
  ce_students: dict = dataclasses.field(default_factory=dict)  # seed -> the CE-only student
  _cache: dict = dataclasses.field(default_factory=dict)  # loaded token arrays and word checkers

  def train_tokens(self, data_cfg) -> np.ndarray:
    """The training bytes of a data section (split and genres), loaded once per selection."""
    genres = data_cfg.get("train_genres")
    key = (data_cfg.name, data_cfg.train_split, None if genres is None else tuple(genres))
    if key not in self._cache:
      self._cache[key] = text_sources.load_split_tokens(data_cfg.name, data_cfg.train_split, data_dir=self.data_dir,
                                                         genres=None if genres is None else list(genres))
    return self._cache[key]

  def word_checker(self, cfg: ml_collections.ConfigDict) -> WordChecker:
    """The spelling checker of `cfg.verified_traces` over the training split's words (built once)."""
    key = ("checker", cfg.data.name, cfg.data.train_split)
    if key not in self._cache:
      self._cache[key] = VerifiedTraceConfig.from_config(cfg.get("verified_traces")).checker(
          text_sources.load_split_tokens(cfg.data.name, cfg.data.train_split, data_dir=self.data_dir))
    return self._cache[key]

  def train(self, name: str, cfg: ml_collections.ConfigDict, role: str, **kwargs) -> TrainedModel:
    model_cfg = self.student_cfg if role == "student" else _model_config(
        cfg.teacher.model, vocab_size=ByteTokenizer.vocab_size, seq_len=cfg.data.seq_len)
    if kwargs.get("train_tokens") is None:
      kwargs["train_tokens"] = self.train_tokens(cfg.data)
    return train_lm(name=name, model_cfg=model_cfg, train_cfg=cfg[role].train, data_cfg=cfg.data, mesh=self.mesh,
                    rules=self.rules[role], workdir=self.workdir, log=self.log, **kwargs)


STAGE_KEYS = ("name", "steps", "teacher")


def stages(config: ml_collections.ConfigDict) -> list[dict]:
  """The distilled student's training stages (ERNIE-Tiny-style progressive distillation, or a
  CE-only warm start before an on-policy method).

  `config.stages` is a list of dicts, each with `steps`, an optional `name`, `teacher`
  ('teacher', or 'finetuned': the teacher fine-tuned by `config.finetuned_teacher`), and
  overrides of config sections for that stage (see `stage_config`). Each stage starts from the
  previous stage's parameters with a fresh optimizer and learning-rate schedule; the steps must
  sum to `student.train.steps`, so the student trains as long as its CE-only baseline. Without
  `stages`, one stage of `student.train.steps` steps.
  """
  given = [dict(stage) for stage in (config.get("stages") or ())]
  if not given:
    return [{"name": "kd", "steps": config.student.train.steps}]
  for i, stage in enumerate(given):
    unknown = sorted(set(stage) - set(STAGE_KEYS) - set(config))
    if unknown:
      raise ValueError(f"stage {i} has unknown keys {unknown}: a stage takes {list(STAGE_KEYS)} and overrides of "
                       f"the config's sections {sorted(set(config) - {'stages', 'experiment', 'seed', 'num_seeds'})}")
    if int(stage.get("steps", 0)) < 1:
      raise ValueError(f"stage {i} needs a positive 'steps', got {stage.get('steps')!r}")
    if stage.get("teacher", "teacher") not in ("teacher", "finetuned"):
      raise ValueError(f"stage {i}: teacher must be 'teacher' or 'finetuned', got {stage['teacher']!r}")
    if stage.get("teacher") == "finetuned" and not config.get("finetuned_teacher"):
      raise ValueError(f"stage {i} uses the finetuned teacher: give the config a finetuned_teacher section")
  total = sum(int(stage["steps"]) for stage in given)
  if total != config.student.train.steps:
    raise ValueError(f"the stages' steps sum to {total} but student.train.steps is {config.student.train.steps}: "
                     "the distilled student must train as long as its CE-only baseline")
  return given


def stage_config(config: ml_collections.ConfigDict, stage: dict) -> ml_collections.ConfigDict:
  """`config` as one stage sees it: `distill` (and any non-section value) is replaced by the
  stage's, a None removes a section (e.g. `adaptive_off_policy` during a CE warm start), other
  sections are merged key by key, recursively (`data.train_genres`, `on_policy.student_fraction`,
  `student.train.learning_rate`). `student.train.steps` is the stage's, and its warm-up at most
  a quarter of them unless the stage sets it."""
  cfg = config.copy_and_resolve_references()
  cfg.unlock()

  def merge(section: ml_collections.ConfigDict, overrides: dict, path: str) -> None:
    for key, value in overrides.items():
      if key not in section:
        raise ValueError(f"a stage overrides unknown key {path}{key}; known: {sorted(section)}")
      if isinstance(section[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(section[key], value, f"{path}{key}.")
      else:
        section[key] = value

  for key, value in stage.items():
    if key in STAGE_KEYS:
      continue
    if value is None:
      del cfg[key]
    elif key == "distill" or not isinstance(cfg[key], ml_collections.ConfigDict):
      cfg[key] = value
    else:
      merge(cfg[key], dict(value), f"{key}.")
  steps = int(stage["steps"])
  if "warmup_steps" not in dict(dict(stage.get("student") or {}).get("train") or {}):
    cfg.student.train.warmup_steps = min(cfg.student.train.warmup_steps, steps // 4)
  cfg.student.train.steps = steps
  cfg.lock()
  return cfg


def _warm_start(config: ml_collections.ConfigDict, exp: _Experiment) -> Any:
  """The students' initial parameters from `student.init_from` (a run directory of a student of
  the same architecture, at its latest checkpoint), or None for a random initialisation."""
  directory = config.student.get("init_from")
  if not directory:
    return None
  template = state_lib.create_sharded_model(lambda: DecoderLM(exp.student_cfg, rngs=nnx.Rngs(0)), exp.mesh,
                                            exp.rules["student"])[1]
  checkpoints = RunCheckpoints(directory)
  try:
    return checkpoints.restore_params(template)
  except (ValueError, KeyError) as e:
    raise ValueError(f"student.init_from={directory!r} does not hold parameters of the student's architecture "
                     f"{config.student.model.to_dict()}: {e}") from e
  finally:
    checkpoints.close()


def _pass_rate(config, exp: _Experiment) -> Callable[[TrainedModel], dict]:
  """`model -> {'pass_rate', 'valid_word_rate'}`: the share of the model's continuations of
  held-out prompts (the first `verified_traces.prompt_len` bytes of the first evaluation batch's
  windows, sampled as the traces are) that the spelling checker accepts, and of their words."""
  traces = VerifiedTraceConfig.from_config(config.verified_traces)
  checker = exp.word_checker(config)
  windows = next(lm_pipeline.eval_batches(exp.eval_tokens, seq_len=config.data.seq_len,
                                          batch_size=config.eval.batch_size, max_batches=1))
  prompts = windows["inputs"][:, :traces.prompt_len]
  sampler = sampling.SamplingConfig(max_new_tokens=config.data.seq_len - traces.prompt_len + 1,
                                    temperature=traces.temperature, top_k=traces.top_k, top_p=traces.top_p)

  def rates(model: TrainedModel) -> dict:
    out = checker.pass_rate(model.graphdef, model.params, prompts, sampler, jax.random.PRNGKey(config.seed),
                            batch_sharding=sharding_lib.batch_sharding(exp.mesh))
    return {"pass_rate": out["pass_rate"], "valid_word_rate": out["valid_word_rate"]}

  return rates


def _check_teacher_checkpoint(config) -> None:
  """`teacher.checkpoint` (a finished teacher's run directory, used instead of training one) must
  hold a checkpoint of the config's teacher architecture."""
  directory = config.teacher.get("checkpoint")
  if not directory:
    return
  fix = ("point it at a teacher run directory such as WORKDIR/teacher of an earlier run, or leave it empty to "
         "train the teacher")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"teacher.checkpoint={directory!r} does not exist: {fix}")
  checkpoints = RunCheckpoints(directory)
  try:
    if checkpoints.latest_step() is None:
      raise FileNotFoundError(f"teacher.checkpoint={directory!r} holds no checkpoint: {fix}")
  finally:
    checkpoints.close()


def _finetuned_teacher(config, exp: _Experiment, ce_only) -> TrainedModel:
  """The teacher fine-tuned with cross-entropy on `finetuned_teacher.train_genres` (ERNIE-Tiny's
  fine-tuned teacher), starting from the trained teacher; `finetuned_teacher` also takes `steps`
  and `learning_rate` for its run (the rest of the teacher's training config is kept)."""
  section = dict(config.finetuned_teacher)
  unknown = sorted(set(section) - {"train_genres", "steps", "learning_rate"})
  if unknown:
    raise ValueError(f"unknown finetuned_teacher keys {unknown}; known: ['learning_rate', 'steps', 'train_genres']")
  cfg = config.copy_and_resolve_references()
  cfg.unlock()
  cfg.data.train_genres = section.get("train_genres")
  cfg.teacher.train.update(steps=int(section.get("steps", 300)),
                           learning_rate=float(section.get("learning_rate", cfg.teacher.train.learning_rate / 3)),
                           warmup_steps=min(cfg.teacher.train.warmup_steps, int(section.get("steps", 300)) // 4))
  cfg.lock()
  return exp.train("teacher_finetuned", cfg, "teacher", seed=config.teacher.seed, strategy=ce_only, teacher=None,
                   init_params=exp.teacher.params)


def _train_distilled_student(config, seed: int, exp: _Experiment, init_params, results: dict) -> TrainedModel:
  """The distilled student of one seed, stage after stage (see `stages`); the last stage's run
  is `student_kd_seed{seed}`, earlier ones `student_kd_seed{seed}_stage{i}_{name}`."""
  plan = stages(config)
  trained, seconds = None, 0.0
  for i, stage in enumerate(plan):
    cfg = stage_config(config, stage)
    last = i == len(plan) - 1
    name = f"student_kd_seed{seed}" if last else f"student_kd_seed{seed}_stage{i}_{stage.get('name', i)}"
    strategy = strategies.strategy_from_config(cfg.distill, vocab_size=ByteTokenizer.vocab_size,
                                               num_steps=cfg.student.train.steps)
    teacher = exp.finetuned_teacher if stage.get("teacher") == "finetuned" else exp.teacher
    run_teacher, teacher_forward, features = teacher if strategy.uses_teacher else None, None, None
    kwargs = {}
    if isinstance(strategy, AlignDistilDistillation):  # extrapolates the teacher away from the CE-only student
      run_teacher, teacher_forward = _with_reference(teacher, exp.ce_students[seed])
    if isinstance(strategy, strategies.AdaSPECDistillation):
      reference = exp.train(f"reference_seed{seed}", cfg, "student", seed=seed, teacher=teacher,
                            strategy=strategies.LogitDistillation(losses.forward_kl, kd_weight=1.0))
      results.setdefault("reference", []).append(dict(evaluate_lm(reference, teacher, exp.eval_tokens,
                                                                  data_cfg=cfg.data, eval_cfg=cfg.eval, mesh=exp.mesh),
                                                      seed=seed))
      run_teacher, teacher_forward = _with_reference(teacher, reference)
    if cfg.get("difference_sampling") is not None:
      kwargs["train_tokens"] = _refined_corpus(cfg, exp, seed)
    if isinstance(strategy, strategies.CachedTeacherDistillation):
      features, results["teacher_cache"] = _teacher_cache(strategy, cfg, teacher, exp.train_tokens(cfg.data),
                                                          ByteTokenizer.vocab_size, exp.mesh, exp.workdir, exp.log)
    trained_stage = exp.train(
        name, cfg, "student", seed=seed if i == 0 else seed + 10007 * i,  # a new data order per stage
        strategy=strategy, teacher=run_teacher, teacher_forward=teacher_forward, window_features=features,
        batch_source=_batch_source(cfg, strategy, teacher, exp),
        monitor=_monitor(cfg, teacher, exp.train_tokens(cfg.data), exp.eval_tokens, exp.mesh),
        init_params=init_params if trained is None else trained.params, **kwargs)
    trained, seconds = trained_stage, seconds + trained_stage.train_seconds
  return dataclasses.replace(trained, train_seconds=seconds)


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs the whole experiment; returns (and writes to workdir/results.json) the results."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  for cfg in (config.teacher.train, config.student.train):
    sharding_lib.check_batch_size(cfg.batch_size, mesh)
  # Each model's own rules (a tensor-sharded teacher, a data-parallel student), checked against its
  # abstract parameters now, so that a bad rule fails before anything is compiled or trained.
  rules = {role: sharding_lib.rules_from_config(config, role) for role in ("teacher", "student")}
  for role, role_rules in rules.items():
    model_cfg = _model_config(config[role].model, vocab_size=ByteTokenizer.vocab_size, seq_len=config.data.seq_len)
    state_lib.model_shardings(lambda c=model_cfg: DecoderLM(c, rngs=nnx.Rngs(0)), mesh, role_rules)
  data_cfg = config.data
  data_dir = data_cfg.data_dir or text_sources.default_data_dir()
  exp = _Experiment(config=config, workdir=workdir, mesh=mesh, rules=rules,
                    log=log, data_dir=data_dir,
                    eval_tokens=text_sources.load_split_tokens(data_cfg.name, data_cfg.eval_split, data_dir=data_dir),
                    student_cfg=_model_config(config.student.model, vocab_size=ByteTokenizer.vocab_size,
                                              seq_len=data_cfg.seq_len))
  plan = stages(config)  # a bad stage list, init_from or teacher checkpoint fails before any training
  init_params = _warm_start(config, exp)
  _check_teacher_checkpoint(config)
  train_tokens, eval_tokens = exp.train_tokens(data_cfg), exp.eval_tokens
  log(f"data: {data_cfg.name} train {len(train_tokens):,} bytes, {data_cfg.eval_split} {len(eval_tokens):,} bytes; "
      f"mesh {dict(mesh.shape)}" + (f"; {len(plan)} stages" if len(plan) > 1 else ""))
  pass_rate = _pass_rate(config, exp) if config.get("verified_traces") is not None else None

  def evaluate(model, against):
    results = evaluate_lm(model, against, eval_tokens, data_cfg=data_cfg, eval_cfg=config.eval, mesh=mesh)
    return results if pass_rate is None else dict(results, **pass_rate(model))

  ce_only = strategies.LogitDistillation(divergence=None)
  if config.teacher.get("checkpoint"):
    parent, name = os.path.split(os.path.abspath(config.teacher.checkpoint))
    teacher = exp.teacher = restore_model(config, parent, name, role="teacher")
    log(f"[teacher] restored from {config.teacher.checkpoint}")
  else:
    teacher = exp.teacher = exp.train("teacher", config, "teacher", seed=config.teacher.seed, strategy=ce_only,
                                      teacher=None)
  results: dict[str, Any] = {"teacher": dict(evaluate(teacher, None), num_params=teacher.num_params,
                                             train_seconds=teacher.train_seconds)}
  log(f"[teacher] validation CE {results['teacher']['ce']:.4f} nats/byte")
  if any(stage.get("teacher") == "finetuned" for stage in plan):
    exp.finetuned_teacher = _finetuned_teacher(config, exp, ce_only)
    results["finetuned_teacher"] = dict(evaluate(exp.finetuned_teacher, None),
                                        train_seconds=exp.finetuned_teacher.train_seconds)
    log(f"[teacher_finetuned] validation CE {results['finetuned_teacher']['ce']:.4f} nats/byte")
  sample_cfg = config.eval.sample
  # The same held-out prompt for every model: the start of the validation split.
  prompt = eval_tokens[:sample_cfg.prompt_tokens]
  sample = lambda model: sample_text(model, prompt, new_tokens=sample_cfg.new_tokens,  # noqa: E731
                                     temperature=sample_cfg.temperature, seed=config.seed)
  if sample_cfg.new_tokens:
    results["sample_prompt"] = ByteTokenizer().decode(prompt)
    results["teacher"]["sample"] = sample(teacher)
  seeds = range(config.seed, config.seed + config.num_seeds)
  for name in ("student_ce", "student_kd"):
    results[name] = []
    for seed in seeds:
      if name == "student_ce":
        trained = exp.ce_students[seed] = exp.train(f"student_ce_seed{seed}", config, "student", seed=seed,
                                                    strategy=ce_only, teacher=None, init_params=init_params)
      else:
        trained = _train_distilled_student(config, seed, exp, init_params, results)
      metrics = dict(evaluate(trained, teacher), num_params=trained.num_params, train_seconds=trained.train_seconds,
                     seed=seed)
      if trained.monitor is not None:
        metrics["monitor"] = trained.monitor
      if trained.source_history:
        metrics["source_history"] = trained.source_history
      if sample_cfg.new_tokens and seed == config.seed:
        metrics["sample"] = sample(trained)
      log(f"[{name} seed {seed}] validation CE {metrics['ce']:.4f} nats/byte")
      results[name].append(metrics)
  table = format_table(results)
  log("\n" + table)
  reporting.write_results(workdir, results, config, table)
  results["table"] = table
  return results
