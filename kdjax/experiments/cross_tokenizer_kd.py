"""Distil a BPE teacher into a byte-level student across tokenizers (ULD or ALM), against CE only.

The experiment (a config's `experiment = 'cross_tokenizer_kd'`):
  1. trains a byte-level BPE on the training split (`kdjax.data.bpe`), or loads it from the
     workdir;
  2. trains the teacher on the BPE ids with cross-entropy (`lm_kd.train_lm`), or restores it;
  3. trains the byte-level student twice with the same initialisation, batches and step count:
     (a) cross-entropy only, (b) with `config.distill.method` ('uld' or 'alm',
     `kdjax.distill.cross_tokenizer`), the teacher running inside the step on the BPE ids of
     the same bytes (`kdjax.data.cross_tokenizer_pipeline`);
  4. evaluates all three on the held-out split in nats per byte and prints one table.

Nats per byte make the two tokenisations comparable: each model's total next-token NLL over
the split divided by the number of bytes its predicted tokens cover (for the byte student the
token count; for the teacher the bytes of its target tokens, i.e. all but the first token's).
Each model reads the split in windows of its own sequence length, so the teacher sees about
`bytes/token` times more bytes of context per window than the student: it is the teacher.

Every run checkpoints into its own directory and resumes from it; a uld run and an alm run in
one workdir share the tokenizer, the teacher and the CE-only student.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from kdjax.data import bpe, cross_tokenizer_pipeline as pipeline, text_sources
from kdjax.data.tokenizers import ByteTokenizer
from kdjax.distill import cross_tokenizer, strategies
from kdjax.experiments import lm_kd
from kdjax.models.decoder import DecoderConfig, DecoderLM, count_params
from kdjax.train import loop, sharding as sharding_lib, state as state_lib, step as step_lib
from kdjax.train.checkpoint import RunCheckpoints

# How many training windows `run` tokenises up front to report how often the teacher's length cuts one.
_TRUNCATION_SAMPLE = 2000


def load_or_train_tokenizer(cfg: ml_collections.ConfigDict, *, data_cfg, data_dir: str, workdir: str,
                            log: Callable[[str], None]) -> bpe.BPETokenizer:
  """The teacher's BPE from `workdir`, trained there on the training split the first time.

  The directory names the vocabulary size and training bytes, so a changed config trains anew.
  """
  directory = os.path.join(workdir, f"bpe_v{cfg.vocab_size}_b{cfg.max_bytes}")
  if os.path.exists(os.path.join(directory, bpe.TOKENIZER_FILE)):
    return bpe.BPETokenizer.load(directory)
  t0 = time.perf_counter()
  tokenizer = bpe.train_on_split(data_cfg.name, "train", data_dir=data_dir, vocab_size=cfg.vocab_size,
                                 max_bytes=cfg.max_bytes or None, min_frequency=cfg.min_frequency)
  tokenizer.save(directory)
  log(f"[tokenizer] trained a {tokenizer.vocab_size}-token BPE in {time.perf_counter() - t0:.1f} s -> {directory}")
  return tokenizer


def _prefix(data: np.ndarray, max_bytes: int) -> np.ndarray:
  """The first `max_bytes` bytes (all for 0), without a character cut at the end."""
  if not max_bytes:
    return data
  data = data[:max_bytes]
  return data[:pipeline.complete_characters(data)]


def _model_config(section: ml_collections.ConfigDict, vocab_size: int) -> DecoderConfig:
  return DecoderConfig(vocab_size=vocab_size, max_len=section.seq_len, **section.model.to_dict())


def teacher_forward(graphdef) -> step_lib.Forward:
  """`lm_forward` of the teacher on its own ids, `batch['teacher_inputs']`."""
  forward = step_lib.lm_forward(graphdef)
  return lambda params, batch: forward(params, {"inputs": batch["teacher_inputs"]})


def train_student(*, name: str, model_cfg: DecoderConfig, train_cfg: ml_collections.ConfigDict, seed: int,
                  strategy, teacher: lm_kd.TrainedModel | None, dataset, mesh, rules, workdir: str,
                  log: Callable[[str], None]) -> lm_kd.TrainedModel:
  """`lm_kd.train_lm` for batches of `dataset` and a teacher that reads its own tokenisation.

  Trains (or resumes, or restores a finished) student in `workdir/name`; `dataset` is a grain
  `MapDataset` of cross-tokenizer batches, whose iterator position is checkpointed with the state.
  """
  graphdef, params = state_lib.create_sharded_model(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(seed)), mesh, rules)
  optimizer = lm_kd.make_optimizer(train_cfg)
  state = state_lib.create_train_state(params, optimizer, seed, mesh, strategy=strategy)
  batches = iter(dataset)
  checkpoints = RunCheckpoints(os.path.join(workdir, name), keep=train_cfg.get("keep_checkpoints", 2))
  if checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(state)
    loop.restore_data_state(data_state, batches)
    log(f"[{name}] resumed from step {int(state.step)} in {checkpoints.directory}")
  num_params = count_params(nnx.merge(graphdef, state.params))
  teacher_params = teacher.params if strategy.uses_teacher else None
  t0 = time.perf_counter()
  if int(state.step) < train_cfg.steps:
    log(f"[{name}] {num_params:,} parameters, {train_cfg.steps} steps of "
        f"{train_cfg.batch_size}x{model_cfg.max_len} tokens")
    step_fn = step_lib.make_distill_step(
        state=state, teacher_params=teacher_params, mesh=mesh, student_forward=step_lib.lm_forward(graphdef),
        teacher_forward=teacher_forward(teacher.graphdef) if strategy.uses_teacher else None,
        strategy=strategy, optimizer=optimizer)
    state, _ = loop.fit(
        state=state, step_fn=step_fn, batches=batches, teacher_params=teacher_params, num_steps=train_cfg.steps,
        mesh=mesh, tokens_per_batch=train_cfg.batch_size * model_cfg.max_len, log_every=train_cfg.log_every,
        checkpoints=checkpoints, checkpoint_every=train_cfg.checkpoint_every, name=name, log=log)
  checkpoints.close()
  return lm_kd.TrainedModel(graphdef, state.params, num_params, time.perf_counter() - t0)


def nats_per_byte(metrics: dict[str, float], token_ends: np.ndarray) -> float:
  """Total nats over the bytes of the predicted tokens, from `lm_kd.evaluate_lm`'s metrics.

  `evaluate_lm` scores tokens 1..n of the split in order (token 0 has no prediction), n =
  `eval_tokens`, so they cover the bytes from the end of token 0 to the end of token n.
  """
  count = int(metrics["eval_tokens"])
  return metrics["ce"] * count / float(token_ends[count] - token_ends[0])


def _evaluate(model: lm_kd.TrainedModel, ids: np.ndarray, token_ends: np.ndarray, *, seq_len: int, batch_size: int,
              mesh) -> dict[str, float]:
  """Held-out CE of one model on its own ids of the whole (possibly shortened) split, per byte."""
  metrics = lm_kd.evaluate_lm(model, None, ids, data_cfg=ml_collections.ConfigDict({"seq_len": seq_len}),
                              eval_cfg=ml_collections.ConfigDict({"batch_size": batch_size, "max_batches": 0}),
                              mesh=mesh)
  per_byte = nats_per_byte(metrics, token_ends)
  return dict(ce_per_token=metrics["ce"], eval_tokens=metrics["eval_tokens"], nats_per_byte=per_byte,
              bits_per_byte=per_byte / np.log(2), num_params=model.num_params, train_seconds=model.train_seconds)


def format_table(results: dict) -> str:
  """One row per model in nats/byte, and the distilled student's gain over the CE-only one."""
  method = results["method"]
  baseline = results["student_ce"]["nats_per_byte"]
  rows = ["| model | tokenizer | params | train steps | val nats/byte | bits/byte | gain over CE-only |",
          "|---|---|---|---|---|---|---|"]
  for name in ("teacher", "student_ce", f"student_{method}"):
    r = results[name]
    gain = f"{baseline - r['nats_per_byte']:+.4f}" if name == f"student_{method}" else "-"
    rows.append(f"| {name} | {r['tokenizer']} | {r['num_params']:,} | {r['steps']} | "
                f"{r['nats_per_byte']:.4f} | {r['bits_per_byte']:.4f} | {gain} |")
  gain = baseline - results[f"student_{method}"]["nats_per_byte"]
  rows.append("")
  rows.append(f"{method.upper()} vs the CE-only byte student (same init, batches and steps, seed {results['seed']}): "
              f"{gain:+.4f} nats/byte ({'better' if gain > 0 else 'not better'}); held-out "
              f"{results['eval_bytes']:,} bytes.")
  return "\n".join(rows)


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs the whole experiment; returns (and writes to workdir/results_{method}_seed{seed}.json) the results."""
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  rules = [tuple(r) for r in config.sharding_rules]
  for section in (config.teacher, config.student):
    sharding_lib.check_batch_size(section.train.batch_size, mesh)
  data_cfg = config.data
  data_dir = data_cfg.data_dir or text_sources.default_data_dir()
  train_bytes = _prefix(text_sources.load_split_tokens(data_cfg.name, "train", data_dir=data_dir),
                        data_cfg.max_train_bytes)
  eval_bytes = _prefix(text_sources.load_split_tokens(data_cfg.name, data_cfg.eval_split, data_dir=data_dir),
                       config.eval.max_bytes)
  tokenizer = load_or_train_tokenizer(config.tokenizer, data_cfg=data_cfg, data_dir=data_dir, workdir=workdir, log=log)
  teacher_train_ids = tokenizer.encode(train_bytes.tobytes())
  eval_ids, eval_offsets = tokenizer.encode_with_offsets(eval_bytes.tobytes())
  log(f"data: {data_cfg.name} train {len(train_bytes):,} bytes = {len(teacher_train_ids):,} BPE tokens "
      f"({len(train_bytes) / len(teacher_train_ids):.2f} bytes/token), {data_cfg.eval_split} {len(eval_bytes):,} "
      f"bytes; mesh {dict(mesh.shape)}")

  ce_only = strategies.LogitDistillation(divergence=None)
  teacher = lm_kd.train_lm(
      name="teacher", model_cfg=_model_config(config.teacher, tokenizer.vocab_size), train_cfg=config.teacher.train,
      seed=config.teacher.seed, strategy=ce_only, teacher=None, train_tokens=teacher_train_ids,
      data_cfg=ml_collections.ConfigDict({"seq_len": config.teacher.seq_len}), mesh=mesh, rules=rules,
      workdir=workdir, log=log)
  evaluate = lambda model, ids, ends, section: _evaluate(  # noqa: E731
      model, ids, ends, seq_len=section.seq_len, batch_size=config.eval.batch_size, mesh=mesh)
  method = config.distill.method
  results: dict[str, Any] = {"method": method, "seed": config.seed, "eval_bytes": len(eval_bytes)}
  results["teacher"] = dict(evaluate(teacher, eval_ids, eval_offsets[:, 1], config.teacher),
                            tokenizer=f"BPE {tokenizer.vocab_size}", steps=config.teacher.train.steps)
  log(f"[teacher] validation {results['teacher']['nats_per_byte']:.4f} nats/byte "
      f"({results['teacher']['ce_per_token']:.4f} nats/token)")

  window_bytes = config.student.seq_len + 1  # one byte per student token, and the last target
  cut, looked = pipeline.count_truncated(train_bytes, window_bytes=window_bytes, teacher_tokenizer=tokenizer,
                                         teacher_length=config.teacher.seq_len, max_windows=_TRUNCATION_SAMPLE)
  results["truncated_windows"] = cut / max(looked, 1)
  log(f"[data] {cut} of the first {looked} training windows need more than {config.teacher.seq_len + 1} teacher "
      "tokens and are cut at a shared token boundary")
  dataset = pipeline.make_cross_tokenizer_dataset(
      train_bytes, window_bytes=window_bytes, student_tokenizer=ByteTokenizer(), teacher_tokenizer=tokenizer,
      student_length=config.student.seq_len, teacher_length=config.teacher.seq_len,
      batch_size=config.student.train.batch_size, seed=config.seed, shuffle=True, num_epochs=None,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  student_cfg = _model_config(config.student, ByteTokenizer.vocab_size)
  byte_ends = np.arange(1, len(eval_bytes) + 1)
  kd = cross_tokenizer.strategy_from_config(config.distill)
  for name, strategy in (("student_ce", ce_only), (f"student_{method}", kd)):
    trained = train_student(name=f"{name}_seed{config.seed}", model_cfg=student_cfg, train_cfg=config.student.train,
                            seed=config.seed, strategy=strategy, teacher=teacher, dataset=dataset, mesh=mesh,
                            rules=rules, workdir=workdir, log=log)
    results[name] = dict(evaluate(trained, eval_bytes, byte_ends, config.student), tokenizer="bytes",
                         steps=config.student.train.steps)
    log(f"[{name}] validation {results[name]['nats_per_byte']:.4f} nats/byte")
  results["wall_seconds"] = time.perf_counter() - t_start
  table = format_table(results)
  log("\n" + table + f"\nwall-clock {results['wall_seconds']:.0f} s")
  stem = os.path.join(workdir, f"results_{method}_seed{config.seed}")
  with open(stem + ".json", "w") as f:
    json.dump({"results": results, "config": config.to_dict()}, f, indent=1, default=str)
  with open(stem + ".md", "w") as f:
    f.write(table + "\n")
  results["table"] = table
  return results
