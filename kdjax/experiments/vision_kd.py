"""Distil an image classifier into a smaller one, against the no-teacher baseline.

The experiment (a config's `experiment = 'vision_kd'`):
  1. trains the teacher with cross-entropy (or `teacher.ensemble` teachers with their own seeds,
     whose averaged probabilities are the target: MEAL V2 / SSLD), or restores them from the
     workdir when a previous run finished them;
  2. for each seed, trains the student twice with the same initialisation, data order and step
     count: (a) cross-entropy only, (b) with `config.distill` (`kdjax.distill.representation`:
     KD, DKD, DIST, DeiT's distillation head, FitNet, AT, RKD, PKT, SP, CC, NST, ND, CRD, ...);
  3. reports test accuracy of everything (and the student's agreement with the teacher) as one
     table with the KD gain.

Every run checkpoints into its own directory and resumes from it (including BatchNorm statistics,
the strategy's heads and CRD's memory), so a killed experiment restarted with the same command
loses nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from kdjax.data import image_pipeline, image_sources
from kdjax.distill import exits, representation
from kdjax.losses import features as feature_losses
from kdjax.experiments import reporting
from kdjax.models import quantize as quantize_lib
from kdjax.models.vision import registry
from kdjax.train import loop, sharding as sharding_lib, state as state_lib, step as step_lib
from kdjax.train.checkpoint import RunCheckpoints


@dataclasses.dataclass
class Classifier:
  """A trained model as pure state: `nnx.merge(graphdef, params, model_state)` rebuilds it."""
  name: str
  graphdef: Any
  params: Any
  model_state: Any
  num_params: int
  train_seconds: float
  # The strategy's average of the student's weights (EMA self-distillation), evaluated beside it.
  ema: Optional["Classifier"] = None

  @property
  def variables(self):
    return (self.params, self.model_state)


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then 'cosine' decay to 0 or RepDistiller's 'step' decay (×0.1 at the
  `decay_at` fractions of the run: 150/180/210 of 240 epochs)."""
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.steps - cfg.warmup_steps, 1))
  elif cfg.schedule == "step":
    decay = optax.piecewise_constant_schedule(
        cfg.learning_rate, {int(f * cfg.steps) - cfg.warmup_steps: 0.1 for f in cfg.decay_at})
  else:
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; choose 'cosine' or 'step'")
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum and weight decay on every parameter (PyTorch's SGD, as the reference recipes)."""
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(learning_rate_schedule(cfg), momentum=cfg.momentum, nesterov=cfg.get("nesterov", False)))


def _make_model(model_cfg, num_classes: int, input_shape, seed: int, quantize=None) -> Callable[[], nnx.Module]:
  """The model's constructor; with `quantize = (QuantSpec, calibration images)` its Conv / Linear layers
  are fake-quantised (`kdjax.models.quantize`: the QAT student)."""
  overrides = dict(model_cfg.get("overrides") or {})

  def make():
    model = registry.vision_model(model_cfg.name, num_classes=num_classes, rngs=nnx.Rngs(seed),
                                  input_shape=input_shape, **overrides)
    return model if quantize is None else quantize_lib.quantize_model(model, *quantize)
  return make


@dataclasses.dataclass
class _Data:
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  info: image_sources.ImageSetInfo


def load_data(config) -> _Data:
  d = config.data
  data_dir = d.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  train = image_sources.load_image_split(d.name, d.train_split, data_dir=data_dir)
  test = image_sources.load_image_split(d.name, d.eval_split, data_dir=data_dir)
  return _Data(*train, *test, image_sources.dataset_info(d.name))


def _batches(data: _Data, config, train_cfg, seed: int):
  """The training stream: augmented batches with the strategy's field names added."""
  def fields(batch):
    return dict(batch, targets=batch["labels"], mask=np.ones(batch["labels"].shape, np.float32))
  ds = image_pipeline.make_image_dataset(
      data.train_images, data.train_labels, batch_size=train_cfg.batch_size, seed=seed, mean=data.info.mean,
      std=data.info.std, crop_padding=config.data.crop_padding, flip=config.data.flip,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  return iter(ds.map(fields))


def _mixup_hook(alpha: float, seed: int, mesh):
  """Function matching's batch hook: one mixup per step, keyed by (seed, step), on the device
  batch, so teacher and student see the same mixed view and a resumed run mixes identically."""
  key = jax.random.PRNGKey(seed + 7919)

  @jax.jit
  def mix(batch, step):
    mixed = image_pipeline.mixup(batch, alpha, jax.random.fold_in(key, step))
    return dict(mixed, targets_b=mixed["labels_b"])

  return lambda state, batch, teacher_params, step: mix(sharding_lib.shard_batch(batch, mesh), step)


def ensemble_forward(members: list[Classifier], features=()) -> tuple[Any, Callable]:
  """(params, forward) of one teacher or an ensemble: the ensemble's logits are the log of its
  members' mean probabilities (MEAL V2 / SSLD's averaged soft targets), its features the first
  member's."""
  forwards = tuple(step_lib.classifier_forward(m.graphdef, features=features if i == 0 else ()) for i, m in
                   enumerate(members))
  if len(members) == 1:
    return members[0].variables, forwards[0]
  return [m.variables for m in members], _averaged_forward(forwards)


@functools.lru_cache(maxsize=None)
def _averaged_forward(forwards: tuple[Callable, ...]) -> Callable:
  # Cached on the members' forwards, so every evaluation of equal ensembles shares one program.
  def forward(params, batch):
    outs = [f(p, batch) for f, p in zip(forwards, params)]
    log_probs = jnp.stack([jax.nn.log_softmax(o["logits"].astype(jnp.float32), -1) for o in outs])
    return {"logits": jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(outs)), "features": outs[0]["features"]}
  return forward


def train_classifier(*, name: str, model_cfg, train_cfg, seed: int, strategy, teacher: Optional[list[Classifier]],
                     data: _Data, config, mesh, workdir: str, log: Callable[[str], None], quantize=None) -> Classifier:
  """Trains (or resumes, or restores a finished) classifier in `workdir/name`; `quantize` as `_make_model`'s."""
  make = _make_model(model_cfg, data.info.num_classes, data.info.image_shape, seed, quantize)
  graphdef, params, model_state = state_lib.create_sharded_model_with_state(
      make, mesh, sharding_lib.rules_from_config(config, "student" if teacher else "teacher"))
  optimizer = make_optimizer(train_cfg)
  state = state_lib.create_train_state(params, optimizer, seed, mesh, strategy=strategy, model_state=model_state)
  batches = _batches(data, config, train_cfg, seed)
  checkpoints = RunCheckpoints(os.path.join(workdir, name), keep=train_cfg.get("keep_checkpoints", 2))
  if checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(state)
    loop.restore_data_state(data_state, batches)
    log(f"[{name}] resumed from step {int(state.step)} in {checkpoints.directory}")
  num_params = registry.count_params(nnx.merge(graphdef, state.params, state.model_state))
  t0 = time.perf_counter()
  # A finished run restored here trains nothing, so it adds no training time.
  trains = int(state.step) < train_cfg.steps
  if trains:
    log(f"[{name}] {model_cfg.name}: {num_params:,} parameters, {train_cfg.steps} steps of {train_cfg.batch_size} images")
    teacher_params, teacher_forward = (None, None) if not teacher else ensemble_forward(
        teacher, strategy.feature_names("teacher"))
    student_forward = step_lib.classifier_forward(graphdef, train=True, features=strategy.feature_names("student"))
    if getattr(strategy, "reads_student_weights", False):  # an EMA teacher averages the student's own weights
      student_forward = exits.expose_weights(student_forward)
    step_fn = step_lib.make_distill_step(state=state, teacher_params=teacher_params, mesh=mesh,
                                         student_forward=student_forward, teacher_forward=teacher_forward,
                                         strategy=strategy, optimizer=optimizer)
    alpha = config.data.get("mixup_alpha", 0.0)
    state, _ = loop.fit(
        state=state, step_fn=step_fn, batches=batches, teacher_params=teacher_params, num_steps=train_cfg.steps,
        mesh=mesh, tokens_per_batch=train_cfg.batch_size, log_every=train_cfg.log_every, checkpoints=checkpoints,
        checkpoint_every=train_cfg.checkpoint_every, name=name, log=log,
        prepare_batch=_mixup_hook(alpha, seed, mesh) if alpha and teacher else None,
        learning_rate=learning_rate_schedule(train_cfg),
        logdir=os.path.join(checkpoints.directory, "tensorboard") if train_cfg.get("tensorboard", True) else None,
        hparams=dict(seed=seed, model=model_cfg, train=train_cfg, data=config.data, strategy=repr(strategy)))
  checkpoints.close()
  seconds = _add_train_seconds(os.path.join(workdir, name), time.perf_counter() - t0 if trains else 0.0)
  ema = None
  if getattr(strategy, "reads_student_weights", False):
    ema_params, ema_state = state.strategy_state["weights"]
    ema = Classifier(f"{name}_ema", graphdef, ema_params, state.model_state if ema_state is None else ema_state,
                     num_params, seconds)
  return Classifier(name, graphdef, state.params, state.model_state, num_params, seconds, ema)


def _add_train_seconds(directory: str, seconds: float) -> float:
  """The run's training seconds summed over its invocations (kept in `directory/run_facts.json`)."""
  path = os.path.join(directory, "run_facts.json")
  total = seconds
  if os.path.exists(path):
    with open(path) as f:
      total += json.load(f)["train_seconds"]
  with open(path, "w") as f:
    json.dump({"train_seconds": total}, f)
  return total


def evaluate(members: list[Classifier], teacher: Optional[list[Classifier]], data: _Data, *, batch_size: int,
             mesh) -> dict:
  """Test accuracy and CE of a model (or an ensemble's averaged probabilities); with a teacher also
  the KL to it and top-1 agreement."""
  params, forward = ensemble_forward(members)
  teacher_params, teacher_forward = (None, None) if not teacher else ensemble_forward(teacher)
  eval_step = step_lib.make_eval_step(params=params, teacher_params=teacher_params, mesh=mesh,
                                      student_forward=forward, teacher_forward=teacher_forward)
  totals = None
  for batch in image_pipeline.eval_batches(data.test_images, data.test_labels, batch_size=batch_size,
                                           mean=data.info.mean, std=data.info.std):
    batch = dict(batch, targets=batch["labels"])
    totals = step_lib.sum_metrics(totals, eval_step(params, sharding_lib.shard_batch(batch, mesh), teacher_params))
  return step_lib.mean_metrics(totals)


def teacher_class_means(teacher: list[Classifier], data: _Data, *, batch_size: int, mesh) -> jax.Array:
  """The first teacher's mean 'pre_logits' feature per class over the training split (ND's targets)."""
  forward = jax.jit(step_lib.classifier_forward(teacher[0].graphdef, features=("pre_logits",)))
  sums, counts = 0.0, 0.0
  for batch in image_pipeline.eval_batches(data.train_images, data.train_labels, batch_size=batch_size,
                                           mean=data.info.mean, std=data.info.std):
    feats = forward(teacher[0].variables, sharding_lib.shard_batch(batch, mesh))["features"]["pre_logits"]
    s, c = feature_losses.class_sums(feats, jnp.asarray(batch["labels"]), data.info.num_classes,
                                     where=jnp.asarray(batch["mask"]) > 0)
    sums, counts = sums + s, counts + c
  return sums / jnp.maximum(counts, 1.0)[:, None]


def _mean_std(values: list[float], scale: float = 100.0) -> str:
  mean = f"{scale * statistics.fmean(values):.2f}"
  return mean if len(values) < 2 else f"{mean} ± {scale * statistics.stdev(values):.2f}"


def format_table(results: dict) -> str:
  rows = ["| model | params | test accuracy (%) | top-1 agreement with teacher (%) | train s |", "|---|---|---|---|---|"]
  for t in results["teachers"]:
    rows.append(f"| teacher {t['name']} | {t['num_params']:,} | {100 * t['accuracy']:.2f} | - | {t['train_seconds']:.0f} |")
  if len(results["teachers"]) > 1:
    rows.append(f"| teacher ensemble | - | {100 * results['ensemble']['accuracy']:.2f} | - | - |")
  for g in results.get("generations", ()):
    rows.append(f"| born-again generation {g['generation']} (seed {g['seed']}) | {g['num_params']:,} | "
                f"{100 * g['accuracy']:.2f} | {100 * g['teacher_agreement']:.2f} | - |")
  for name in ("student_ce", "student_kd"):
    runs = results[name]
    rows.append(f"| {name} | {runs[0]['num_params']:,} | {_mean_std([r['accuracy'] for r in runs])} | "
                f"{_mean_std([r['teacher_agreement'] for r in runs])} | "
                f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} |")
    if "ema" in runs[0]:
      rows.append(f"| {name} (EMA of its weights) | {runs[0]['num_params']:,} | "
                  f"{_mean_std([r['ema']['accuracy'] for r in runs])} | "
                  f"{_mean_std([r['ema']['teacher_agreement'] for r in runs])} | - |")
  gains = [b["accuracy"] - a["accuracy"] for a, b in zip(results["student_ce"], results["student_kd"])]
  rows.append("")
  rows.append(f"KD gain over the no-teacher student ({len(gains)} seed(s), same init/data/steps): test accuracy "
              f"{'+' if statistics.fmean(gains) >= 0 else ''}{_mean_std(gains)} points; per seed: "
              + ", ".join(f"{100 * g:+.2f}" for g in gains))
  return "\n".join(rows)


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs the whole experiment; returns (and writes to workdir/results.json) the results."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  for cfg in (config.teacher.train, config.student.train):
    sharding_lib.check_batch_size(cfg.batch_size, mesh)
  data = load_data(config)
  info = data.info
  log(f"data: {config.data.name} train {len(data.train_labels):,} images, test {len(data.test_labels):,}, "
      f"{info.num_classes} classes, {info.image_shape}; mesh {dict(mesh.shape)}")
  # A `quantize` section makes both students low-bit (QAT), calibrated on the first training batch's
  # images; their CE-only run gets its own name, so float methods sharing the workdir keep theirs.
  spec = quantize_lib.QuantSpec.from_config(config.get("quantize"))
  quantize = None if spec is None else (spec, image_pipeline.normalize(
      data.train_images[:config.student.train.batch_size], info.mean, info.std))
  ce_name = "student_ce" if spec is None else f"student_ce_w{spec.bits_weights}a{spec.bits_activations}"
  if spec is not None:
    log(f"students quantised: {spec}")
  # Shapes of every activation of both models by tracing: a bad layer name or head fails here,
  # before anything trains.
  shapes = {role: registry.activation_shapes(nnx.eval_shape(_make_model(config[role].model, info.num_classes,
                                                                        info.image_shape, 0)), info.image_shape)
            for role in ("teacher", "student")}
  section = config.distill.to_dict()
  kind = section.pop("strategy", "representation")
  builders = {
      "representation": lambda class_means=None: representation.representation_strategy(
          section, student_shapes=shapes["student"], teacher_shapes=shapes["teacher"],
          num_steps=config.student.train.steps, class_means=class_means, train_labels=data.train_labels,
          num_classes=info.num_classes),
      "exits": lambda class_means=None: exits.exit_strategy(
          section, student_shapes=shapes["student"], teacher_shapes=shapes["teacher"], num_classes=info.num_classes),
      "ema": lambda class_means=None: exits.ema_strategy(
          section, make_student=_make_model(config.student.model, info.num_classes, info.image_shape, 0)),
  }
  if kind not in builders:
    raise ValueError(f"unknown distill strategy {kind!r}; known: {sorted(builders)}")
  build = builders[kind]
  # The section is checked now, before any training; ND's class centres come from the trained
  # teacher, so until then they are zeros of the right shape.
  strategy = build(jnp.zeros((info.num_classes, shapes["teacher"]["pre_logits"][-1]), jnp.float32))
  ce_only = representation.RepresentationDistillation()
  common = dict(data=data, config=config, mesh=mesh, workdir=workdir, log=log)
  teachers = [train_classifier(name="teacher" if i == 0 else f"teacher{i}", model_cfg=config.teacher.model,
                               train_cfg=config.teacher.train, seed=config.teacher.seed + i, strategy=ce_only,
                               teacher=None, **common)
              for i in range(config.teacher.get("ensemble", 1))]
  evaluate_with = lambda models, against: evaluate(models, against, data, batch_size=config.eval.batch_size,  # noqa: E731
                                                  mesh=mesh)
  results: dict[str, Any] = {"teachers": []}
  for t in teachers:
    results["teachers"].append(dict(evaluate_with([t], None), name=config.teacher.model.name,
                                    num_params=t.num_params, train_seconds=t.train_seconds))
    log(f"[{t.name}] test accuracy {100 * results['teachers'][-1]['accuracy']:.2f}%")
  if len(teachers) > 1:
    results["ensemble"] = evaluate_with(teachers, None)
  if any(term.loss == "nd" for term in getattr(strategy, "terms", ())):
    strategy = build(teacher_class_means(teachers, data, batch_size=config.eval.batch_size, mesh=mesh))
  for name in ("student_ce", "student_kd"):
    results[name] = []
    for seed in range(config.seed, config.seed + config.num_seeds):
      # Distilled runs are named by the config's method, so several methods can share one workdir
      # (and its teacher and CE-only students: benchmarks/vision_distill.py).
      run_name = f"{ce_name}_seed{seed}" if name == "student_ce" else f"student_{config.get('name', 'kd')}_seed{seed}"
      teacher = teachers
      # Born-again networks (Furlanello et al. 2018): generation k learns from generation k - 1, the
      # teacher being generation 0; the reported distilled student is the last generation.
      for generation in range(1, config.teacher.get("born_again", 1) if name == "student_kd" else 1):
        teacher = [train_classifier(name=f"{run_name}_gen{generation}", model_cfg=config.student.model,
                                    train_cfg=config.student.train, seed=seed, strategy=strategy, teacher=teacher,
                                    quantize=quantize, **common)]
        results.setdefault("generations", []).append(dict(
            evaluate_with(teacher, teachers), generation=generation, seed=seed, num_params=teacher[0].num_params))
      trained = train_classifier(name=run_name, model_cfg=config.student.model,
                                 train_cfg=config.student.train, seed=seed,
                                 strategy=ce_only if name == "student_ce" else strategy,
                                 teacher=None if name == "student_ce" else teacher, quantize=quantize, **common)
      metrics = dict(evaluate_with([trained], teachers), num_params=trained.num_params,
                     train_seconds=trained.train_seconds, seed=seed)
      log(f"[{name} seed {seed}] test accuracy {100 * metrics['accuracy']:.2f}%")
      if trained.ema is not None:
        metrics["ema"] = evaluate_with([trained.ema], teachers)
        log(f"[{name} seed {seed}] its weights' EMA: test accuracy {100 * metrics['ema']['accuracy']:.2f}%")
      results[name].append(metrics)
  table = format_table(results)
  log("\n" + table)
  name = config.get("name", "kd")
  reporting.write_results(workdir, results, config, table, stem="results" if name == "kd" else f"results_{name}")
  results["table"] = table
  return results
