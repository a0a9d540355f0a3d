"""Distillation strategies: how student and teacher outputs become a loss.

A strategy is any callable

    strategy(student_out, teacher_out, batch, step) -> (loss, metrics)

where `student_out` / `teacher_out` are dicts of model outputs (at least `'logits'`
`[..., V]`), `batch` holds `'targets'` `[...]` and `'mask'` `[...]`, `step` is the traced
training step (for schedules), `loss` is the scalar to differentiate and `metrics` maps names
to `(sum, count)` pairs (see `kdjax.losses.masked_sum_count`) so that averages over devices,
hosts and logging windows stay unbiased. A strategy also says whether it needs a teacher
(`uses_teacher`), so the step skips the teacher's forward pass when it does not.

New methods add a strategy here (or next to their losses) and a config; the step and the
loop never change.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import kernels, losses
from kdjax.kernels import terms, topk
from kdjax.distill import schedules

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

# Divergences a config may name (`kdjax.losses.DIVERGENCES`).
DIVERGENCES: Mapping[str, Callable[..., Array]] = losses.DIVERGENCES


def divergence_by_name(name: str) -> Callable[..., Array]:
  if name not in DIVERGENCES:
    raise ValueError(f"unknown divergence {name!r}; known: {sorted(DIVERGENCES)}")
  return DIVERGENCES[name]


def logit_inputs(student_out, teacher_out, batch) -> tuple[Array, Optional[Array], Array]:
  """(student logits, the teacher's as a constant or None without a teacher, the boolean mask)."""
  teacher = None if teacher_out is None else jax.lax.stop_gradient(teacher_out["logits"])
  return student_out["logits"], teacher, batch["mask"].astype(bool)


def top1_match(logits: Array, ids: Array, mask: Array) -> tuple[Array, Array]:
  """(sum, count) of argmax(logits) == ids over kept positions: accuracy against labels, or
  top-1 agreement against the teacher's argmax."""
  return losses.masked_sum_count((jnp.argmax(logits, -1) == ids).astype(jnp.float32), mask)


@dataclasses.dataclass(frozen=True)
class LogitDistillation:
  """(1 − α)·CE(student, labels) + α·D(teacher ‖ student), averaged over kept tokens.

  With `divergence=None` this is plain cross-entropy training (the no-teacher baseline, or a
  teacher's own training) and no teacher is run.

  Attributes:
    divergence: a per-position loss from `kdjax.losses` taking `(student_logits,
      teacher_logits, *, temperature, where, **divergence_kwargs)`, or None.
    kd_weight: α as a schedule `step -> value` (a float is a constant).
    temperature: T as a schedule. Whether T² multiplies the divergence is the divergence's
      choice (`hinton_kd` does, `forward_kl` does not).
    divergence_kwargs: extra keyword arguments of the divergence (e.g. β of the JSD), as a
      tuple of pairs so the strategy stays hashable.
    label_smoothing: of the hard-label term.
  """

  divergence: Optional[Callable[..., Array]] = None
  kd_weight: Any = 0.5
  temperature: Any = 1.0
  divergence_kwargs: tuple[tuple[str, Any], ...] = ()
  label_smoothing: float = 0.0

  @property
  def uses_teacher(self) -> bool:
    return self.divergence is not None

  uses_head = False  # the step hands it logits (see `HeadDistillation` for hidden states + head)

  def __call__(self, student_out, teacher_out, batch, step):
    logits, teacher_logits, mask = logit_inputs(student_out, teacher_out if self.uses_teacher else None, batch)
    ce = losses.cross_entropy(logits, batch["targets"], where=mask, label_smoothing=self.label_smoothing)
    metrics: Metrics = {"accuracy": top1_match(logits, batch["targets"], mask)}
    divergence = None
    if self.uses_teacher:
      metrics["teacher_agreement"] = top1_match(logits, jnp.argmax(teacher_logits, -1), mask)
      divergence = lambda temperature: self.divergence(  # noqa: E731
          logits, teacher_logits, temperature=temperature, where=mask, **dict(self.divergence_kwargs))
    return _objective(ce, divergence, mask, step, self.kd_weight, self.temperature, metrics)


@dataclasses.dataclass(frozen=True)
class HeadDistillation:
  """`LogitDistillation`'s objective from hidden states and lm heads: the logits never exist.

  The model outputs are `{'features': h [..., H], 'head': W [H, V]}` (`kdjax.train.step.lm_forward`
  with `head=True`); the hard-label term is `kdjax.kernels.fused_linear_cross_entropy` and the
  divergence `kdjax.kernels.fused_linear_divergence`, both formed token chunk by token chunk. This is
  the strategy for a large vocabulary, where `[tokens, V]` float32 logits of two models do not fit.
  No accuracy or top-1 agreement is reported (they would need the logits).

  Attributes:
    divergence: a name of the fused family (`kdjax.kernels.NAMES`), or None for CE only.
    kd_weight: α as a schedule (a float is a constant).
    temperature: T as a schedule.
    divergence_kwargs: beta / alpha of the divergence, as a tuple of pairs.
    implementation: 'naive' materialises the logits (a reference); anything else streams them.
  """

  divergence: Optional[str] = None
  kd_weight: Any = 0.5
  temperature: Any = 1.0
  divergence_kwargs: tuple[tuple[str, Any], ...] = ()
  implementation: str = "auto"

  uses_head = True

  @property
  def uses_teacher(self) -> bool:
    return self.divergence is not None

  def __call__(self, student_out, teacher_out, batch, step):
    hidden, head = student_out["features"], student_out["head"]
    positions = hidden.shape[:-1]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    mask = batch["mask"].astype(bool)
    keep = mask.reshape(-1)
    ce = kernels.fused_linear_cross_entropy(flat(hidden), head, batch["targets"].reshape(-1), where=keep,
                                            implementation=self.implementation).reshape(positions)
    divergence = None
    if self.uses_teacher:
      teacher_hidden = jax.lax.stop_gradient(teacher_out["features"])
      teacher_head = jax.lax.stop_gradient(teacher_out["head"])
      divergence = lambda temperature: kernels.fused_linear_divergence(  # noqa: E731
          flat(hidden), head, flat(teacher_hidden), teacher_head, divergence=self.divergence,
          temperature=temperature, where=keep, implementation=self.implementation,
          **dict(self.divergence_kwargs)).reshape(positions)
    return _objective(ce, divergence, mask, step, self.kd_weight, self.temperature, {})


@dataclasses.dataclass(frozen=True)
class TAIDDistillation:
  """TAID (Shing et al. 2025): distil toward a target that moves from the student to the teacher.

  The divergence is `kdjax.losses.taid` at the interpolation t held in the train state
  (`strategy_state`); the objective is otherwise `LogitDistillation`'s, with α = 1 by default
  (the paper's pure distillation). After every step t moves, from the step's TAID loss L_n:

      δ_n = (L_{n−1} − L_n) / L_{n−1},      m_n = β·m_{n−1} + (1 − β)·δ_n,
      t_{n+1} = min(t_end, max(t_lin(n), t_n + α_t·σ(m_n)·(1 − t_n))),
      t_lin(n) = t_start + (t_end − t_start)·n / num_steps,

  so t never lags the linear schedule and runs ahead while the loss keeps falling. The first step
  only records L_0. With `adaptive=False`, t = t_lin. Defaults are the paper's: t_start 0.4,
  t_end 1, α_t 5e-4, β 0.99.

  Attributes:
    num_steps: the run's step count (the linear schedule's length).
    t_start, t_end: the interpolation's range, 0 ≤ t_start < t_end ≤ 1.
    alpha: α_t, the adaptive increment's scale.
    beta: momentum of the relative loss change.
    adaptive: False for the linear schedule alone.
    kd_weight, temperature, label_smoothing: as in `LogitDistillation`.
  """

  num_steps: int
  t_start: float = 0.4
  t_end: float = 1.0
  alpha: float = 5e-4
  beta: float = 0.99
  adaptive: bool = True
  kd_weight: Any = 1.0
  temperature: Any = 1.0
  label_smoothing: float = 0.0

  uses_teacher = True
  uses_head = False

  def __post_init__(self):
    if not 0.0 <= self.t_start < self.t_end <= 1.0:
      raise ValueError(f"TAID needs 0 <= t_start < t_end <= 1, got t_start={self.t_start}, t_end={self.t_end}")
    if not self.num_steps > 0:
      raise ValueError(f"TAID needs the run's positive num_steps, got {self.num_steps!r}")

  def init_state(self) -> dict:
    return {"t": self.t_start, "prev_loss": float("inf"), "momentum": 0.0}

  def __call__(self, student_out, teacher_out, batch, step, *, state):
    target = functools.partial(losses.taid, interpolation=state["t"])
    inner = LogitDistillation(target, kd_weight=self.kd_weight, temperature=self.temperature,
                              label_smoothing=self.label_smoothing)
    loss, metrics = inner(student_out, teacher_out, batch, step)
    metrics["taid_t"] = (state["t"], jnp.ones((), jnp.float32))
    return loss, metrics

  def update_state(self, state: dict, metrics: Metrics, step) -> dict:
    """The state after a step whose TAID loss is `metrics['kd']`; `step` is the step's index."""
    loss = losses.safe_mean(*metrics["kd"])
    prev, t = state["prev_loss"], state["t"]
    first = jnp.isinf(prev)
    change = (prev - loss) / (prev + 1e-15)
    momentum = jnp.where(first, state["momentum"], self.beta * state["momentum"] + (1.0 - self.beta) * change)
    linear = self.t_start + (self.t_end - self.t_start) * jnp.asarray(step, jnp.float32) / self.num_steps
    if self.adaptive:
      moved = jnp.minimum(self.t_end, jnp.maximum(linear, t + self.alpha * jax.nn.sigmoid(momentum) * (1.0 - t)))
    else:
      moved = linear
    return {"t": jnp.where(first, t, moved).astype(jnp.float32), "prev_loss": loss.astype(jnp.float32),
            "momentum": momentum.astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class CachedTeacherDistillation:
  """`LogitDistillation`'s objective against an offline teacher: its top-k from the batch.

  The batch carries, per token, the teacher's k largest logits, their ids, its log-normaliser
  and the log-mass outside the top-k at T (`kdjax.data.teacher_cache`); no teacher runs in the
  step. The divergence is `kdjax.kernels.fused_topk_divergence` over the support (`renormalize`)
  or the support plus one tail outcome (`bucket`, with the cached exact tail). Top-1 agreement
  compares the student's argmax with the teacher's first id.

  Attributes:
    divergence: a name of the fused family (`kdjax.kernels.NAMES`).
    k: the cache's top-k size.
    tail: 'bucket' or 'renormalize'.
    kd_weight: α as a schedule.
    temperature: T, a number: the cache's normaliser and tail are for one temperature.
    divergence_kwargs: beta / alpha of the divergence, as a tuple of pairs.
    label_smoothing: of the hard-label term.
    implementation: how the bucket tail streams over the vocabulary (`kdjax.kernels.api`).
  """

  divergence: str = "forward_kl"
  k: int = 16
  tail: str = "bucket"
  kd_weight: Any = 0.5
  temperature: float = 1.0
  divergence_kwargs: tuple[tuple[str, Any], ...] = ()
  label_smoothing: float = 0.0
  implementation: str = "auto"

  uses_teacher = False  # the teacher is in the batch, not run by the step
  uses_head = False

  def __call__(self, student_out, teacher_out, batch, step):
    del teacher_out
    logits = student_out["logits"]
    mask = batch["mask"].astype(bool)
    ce = losses.cross_entropy(logits, batch["targets"], where=mask, label_smoothing=self.label_smoothing)
    indices = batch["teacher_indices"].astype(jnp.int32)
    raw = batch["teacher_values"].astype(jnp.float32)
    metrics: Metrics = {
        "accuracy": top1_match(logits, batch["targets"], mask),
        "teacher_agreement": top1_match(logits, indices[..., 0], mask)}
    # bucket wants log p at T (exact from the cached normaliser); renormalize takes the logits.
    values = raw / self.temperature - batch["teacher_lse"][..., None] if self.tail == "bucket" else raw
    divergence = lambda temperature: kernels.fused_topk_divergence(  # noqa: E731
        logits, values, indices, divergence=self.divergence, tail=self.tail, temperature=temperature, where=mask,
        implementation=self.implementation, teacher_tail=batch["teacher_tail"] if self.tail == "bucket" else None,
        **dict(self.divergence_kwargs))
    return _objective(ce, divergence, mask, step, self.kd_weight, self.temperature, metrics)


def top_fraction_mask(scores: Array, mask: Array, fraction: float) -> Array:
  """The kept positions whose score is among the top `fraction` of all kept scores of the batch.

  The threshold is the ⌈fraction·n⌉-th largest of the n kept scores (ties at it are kept too), so
  at least one position survives whenever any is kept.
  """
  flat = jnp.where(mask, scores, -jnp.inf).reshape(-1)
  kept = jnp.sum(mask)
  rank = jnp.clip(jnp.ceil(fraction * kept).astype(jnp.int32), 1, flat.shape[0]) - 1
  threshold = jnp.sort(flat)[::-1][rank]
  return mask & (scores >= threshold)


@dataclasses.dataclass(frozen=True)
class AdaSPECDistillation:
  """AdaSPEC (selective KD for speculative-decoding drafts): train only on the tokens the draft can learn.

  A reference model is first distilled from the target with forward KL (the experiment trains it,
  `teacher_out['reference_logits']`); then per token Δ = KL(p ‖ q_draft) − KL(p ‖ q_ref) (no
  gradient) measures how far the draft lags what a model of its size reaches, and the draft is
  trained with the divergence on the `keep_fraction` of kept tokens with the largest Δ only:
  hard tokens even the reference cannot fit are left out, so capacity goes where it raises the
  acceptance rate. `selected` reports the fraction of tokens trained on.

  Attributes:
    divergence: the per-token loss on the selected tokens (forward KL in the paper).
    keep_fraction: the share of kept tokens trained on (0.4 in the paper).
    kd_weight: α of (1 − α)·CE + α·D, both over the selected tokens.
    temperature: T.
  """

  divergence: Callable[..., Array] = losses.forward_kl
  keep_fraction: float = 0.4
  kd_weight: Any = 1.0
  temperature: Any = 1.0

  uses_teacher = True
  uses_head = False

  def __call__(self, student_out, teacher_out, batch, step):
    logits, teacher_logits, mask = logit_inputs(student_out, teacher_out, batch)
    reference_logits = jax.lax.stop_gradient(teacher_out["reference_logits"])
    gap = jax.lax.stop_gradient(losses.forward_kl(logits, teacher_logits, where=mask)
                                - losses.forward_kl(reference_logits, teacher_logits, where=mask))
    selected = top_fraction_mask(gap, mask, self.keep_fraction)
    inner = LogitDistillation(self.divergence, kd_weight=self.kd_weight, temperature=self.temperature)
    loss, metrics = inner(student_out, teacher_out, dict(batch, mask=selected), step)
    metrics["selected"] = losses.masked_sum_count(selected.astype(jnp.float32), mask)
    return loss, metrics


def _objective(ce: Array, divergence: Optional[Callable[[Any], Array]], mask: Array, step, kd_weight,
               temperature, metrics: Metrics) -> tuple[Array, Metrics]:
  """(1 − α)·CE + α·D averaged over kept tokens, with the metrics of both strategies.

  Args:
    ce: per-position hard-label cross-entropy.
    divergence: `temperature -> per-position divergence`, or None for CE only.
    mask: boolean positions to keep.
    step: the training step (for the schedules).
    kd_weight: α (a schedule or a constant).
    temperature: T (a schedule or a constant).
    metrics: the caller's extra (sum, count) metrics, completed here.
  """
  ce_sum, count = losses.masked_sum_count(ce, mask)
  metrics = dict(metrics, ce=(ce_sum, count))
  if divergence is None:
    metrics["loss"] = (ce_sum, count)
    return losses.safe_mean(ce_sum, count), metrics
  alpha = _as_schedule(kd_weight)(step)
  t = _as_schedule(temperature)(step)
  kd_sum, _ = losses.masked_sum_count(divergence(t), mask)
  total_sum = (1.0 - alpha) * ce_sum + alpha * kd_sum
  one = jnp.ones((), jnp.float32)
  metrics.update(kd=(kd_sum, count), loss=(total_sum, count), kd_weight=(jnp.asarray(alpha, jnp.float32), one),
                 temperature=(jnp.asarray(t, jnp.float32), one))
  return losses.safe_mean(total_sum, count), metrics


def _as_schedule(value):
  return value if callable(value) else (lambda step: value)


def divergence_with_implementation(name: str, implementation: str = "auto") -> Callable[..., Array]:
  """The divergence `name`, computed by `kdjax.kernels.fused_divergence` when it belongs to the
  fused family (dispatching by `implementation`), else by its `kdjax.losses` function."""
  if name in kernels.NAMES:
    kernels.resolve_implementation(implementation, 0)  # rejects an unknown implementation now
    return functools.partial(kernels.fused_divergence, divergence=name, implementation=implementation)
  if implementation not in ("auto", "naive"):
    raise ValueError(f"divergence {name!r} has no fused implementation (fused: {sorted(kernels.NAMES)}); "
                     f"use implementation 'auto' or 'naive'")
  return divergence_by_name(name)


# From this vocabulary size on, `fused_head='auto'` streams the logits: two models' float32
# `[tokens, V]` logits, probabilities and gradients then dominate a step's memory (at V = 32k and
# 8k tokens of a batch, ~1 GiB per array).
FUSED_HEAD_MIN_VOCAB = 32768


def strategy_from_config(config: ml_collections.ConfigDict, *, vocab_size: Optional[int] = None,
                         num_steps: Optional[int] = None):
  """Builds a strategy from `config.distill`; `method` picks it ('logit' when absent).

  Methods and their keys (any other key raises, naming the known ones):
    logit: `LogitDistillation` / `HeadDistillation`, see `_logit_strategy`.
    taid: `TAIDDistillation`: kd_weight, temperature, label_smoothing, and taid = {t_start, t_end,
      alpha, beta, adaptive}.
    distillm2: `kdjax.distill.distillm.DistiLLM2Distillation`: alpha, beta, temperature.
    minillm: `kdjax.distill.minillm.MiniLLMDistillation`: gamma, length_normalize, temperature,
      teacher_mix, pt_weight, ratio_clip, importance (batches: samples of the teacher-mixed policy,
      and the data windows for the pre-training term).
    adaspec: `AdaSPECDistillation`: divergence, keep_fraction, kd_weight, temperature (the experiment
      first distils the reference model with forward KL).
    aligndistil: `kdjax.distill.aligndistil.AlignDistilDistillation` (token-adaptive logit
      extrapolation of the teacher away from a reference model): divergence, kd_weight,
      temperature, beta, beta_min, beta_max, adaptive, reweight.
    mgsr: `kdjax.distill.semantic_revision.MGSRDistillation` (DAC-KL with a learned clipping
      network + span correlation): kd_weight, temperature, label_smoothing, span_weight,
      span_measure, span_max_distance, clip_inputs, clip_hidden, clip_init_lower,
      clip_init_upper, mass_penalty (batches: the experiment's `revision` section, SCRG).
    verified_traces: `kdjax.distill.verified_traces.VerifiedTraceDistillation` (teacher traces a
      checker accepted, REDI's negatives): mode ('sft', 'redi', 'all'), alpha.
    teacher_cache: `CachedTeacherDistillation` (an offline top-k teacher): divergence,
      divergence_kwargs, kd_weight, temperature (a number), label_smoothing, implementation, tail,
      top_k, and value_dtype (the cache's, read by the experiment that builds it).

  Args:
    config: the `distill` section.
    vocab_size: the models' vocabulary (the logit method's fused_head='auto' decides by it).
    num_steps: the student's step count (TAID's linear schedule).
  """
  cfg = dict(config)
  method = cfg.pop("method", "logit")
  builders = {"logit": _logit_strategy, "taid": _taid_strategy, "teacher_cache": _cache_strategy,
              "distillm2": _distillm2_strategy, "minillm": _lazy("minillm", "minillm_strategy"), "adaspec": _adaspec_strategy,
              "aligndistil": _lazy("aligndistil", "aligndistil_strategy"),
              "verified_traces": _lazy("verified_traces", "verified_traces_strategy"),
              "mgsr": _lazy("semantic_revision", "mgsr_strategy")}
  if method not in builders:
    raise ValueError(f"unknown distill method {method!r}; known: {sorted(builders)}")
  return builders[method](cfg, vocab_size=vocab_size, num_steps=num_steps)


def _lazy(module: str, builder: str) -> Callable[..., Any]:
  """The builder `kdjax.distill.<module>.<builder>`, imported when called: those modules build on
  this one (and some on the sampler), so they cannot be imported here."""
  def build(cfg: dict, *, vocab_size, num_steps):
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(f"kdjax.distill.{module}"), builder)(
        cfg, vocab_size=vocab_size, num_steps=num_steps)
  return build


def _check_keys(cfg: dict, known: set[str], method: str) -> None:
  unknown = set(cfg) - known
  if unknown:
    raise ValueError(f"unknown distill config keys {sorted(unknown)} for method {method!r}; known: {sorted(known)}")


def _taid_strategy(cfg: dict, *, vocab_size, num_steps) -> TAIDDistillation:
  del vocab_size
  _check_keys(cfg, {"kd_weight", "temperature", "label_smoothing", "taid"}, "taid")
  taid = dict(cfg.get("taid") or {})
  _check_keys(taid, {"t_start", "t_end", "alpha", "beta", "adaptive"}, "taid (the taid section)")
  if num_steps is None:
    raise ValueError("the taid method needs the student's num_steps for its linear schedule")
  return TAIDDistillation(num_steps=num_steps, kd_weight=schedules.make_schedule(cfg.get("kd_weight", 1.0)),
                          temperature=schedules.make_schedule(cfg.get("temperature", 1.0)),
                          label_smoothing=float(cfg.get("label_smoothing", 0.0)), **taid)


def _adaspec_strategy(cfg: dict, *, vocab_size, num_steps) -> AdaSPECDistillation:
  del vocab_size, num_steps
  _check_keys(cfg, {"divergence", "keep_fraction", "kd_weight", "temperature"}, "adaspec")
  fraction = float(cfg.get("keep_fraction", 0.4))
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"AdaSPEC's keep_fraction must lie in (0, 1], got {fraction}")
  return AdaSPECDistillation(divergence=divergence_by_name(cfg.get("divergence", "forward_kl")), keep_fraction=fraction,
                             kd_weight=schedules.make_schedule(cfg.get("kd_weight", 1.0)),
                             temperature=schedules.make_schedule(cfg.get("temperature", 1.0)))


def _distillm2_strategy(cfg: dict, *, vocab_size, num_steps):
  del vocab_size, num_steps
  _check_keys(cfg, {"alpha", "beta", "temperature"}, "distillm2")
  from kdjax.distill import distillm  # its batch source imports the sampler; only this method needs it

  beta = float(cfg.get("beta", 1.0))
  if not 0.0 <= beta <= 2.0:
    raise ValueError(f"DistiLLM-2's beta must lie in [0, 2], got {beta}")
  return distillm.DistiLLM2Distillation(alpha=float(cfg.get("alpha", 0.1)), beta=beta,
                                        temperature=float(cfg.get("temperature", 1.0)))


def _cache_strategy(cfg: dict, *, vocab_size, num_steps) -> CachedTeacherDistillation:
  del num_steps
  _check_keys(cfg, {"divergence", "divergence_kwargs", "kd_weight", "temperature", "label_smoothing",
                    "implementation", "tail", "top_k", "value_dtype"}, "teacher_cache")
  name = cfg.get("divergence", "forward_kl")
  if name not in kernels.NAMES:
    raise ValueError(f"a cached top-k teacher needs a divergence of the fused family {sorted(kernels.NAMES)}, "
                     f"got {name!r}")
  temperature = cfg.get("temperature", 1.0)
  if not isinstance(temperature, (int, float)):
    raise ValueError(f"a cached teacher is stored at one temperature: give a number, got {temperature!r}")
  k = int(cfg.get("top_k", 16))
  if vocab_size is not None and not 0 < k <= vocab_size:
    raise ValueError(f"top_k must lie in [1, {vocab_size}], got {k}")
  kernels.resolve_implementation(cfg.get("implementation", "auto"), 0)
  strategy = CachedTeacherDistillation(
      divergence=name, k=k, tail=cfg.get("tail", "bucket"),
      kd_weight=schedules.make_schedule(cfg.get("kd_weight", 0.5)),
      temperature=float(temperature), divergence_kwargs=tuple(sorted(dict(cfg.get("divergence_kwargs") or {}).items())),
      label_smoothing=float(cfg.get("label_smoothing", 0.0)), implementation=cfg.get("implementation", "auto"))
  if strategy.tail not in topk.TAILS:
    raise ValueError(f"unknown tail policy {strategy.tail!r}: use one of {topk.TAILS}")
  terms.divergence(name, **dict(strategy.divergence_kwargs))  # bad coefficients fail now
  return strategy


def _logit_strategy(cfg: dict, *, vocab_size, num_steps) -> LogitDistillation | HeadDistillation:
  """`LogitDistillation` (or `HeadDistillation`) from the logit method's keys.

  Keys: divergence (a name in DIVERGENCES or None: CE only), kd_weight, temperature (numbers or
  schedule configs, see `kdjax.distill.schedules`), divergence_kwargs (dict), label_smoothing,
  implementation ('auto', 'pallas', 'tiled' or 'naive': how a divergence of the fused family is
  computed, see `kdjax.kernels.api`), and fused_head: True gives `HeadDistillation` (the models
  hand the step hidden states and their heads instead of logits), False `LogitDistillation`, and
  'auto' (the default) the former for a vocabulary of at least `FUSED_HEAD_MIN_VOCAB` when the
  loss allows it (a divergence of the fused family, no label smoothing).
  """
  del num_steps
  _check_keys(cfg, {"divergence", "kd_weight", "temperature", "divergence_kwargs", "label_smoothing",
                    "implementation", "fused_head"}, "logit")
  name = cfg.get("divergence")
  if name:
    divergence_by_name(name)  # an unknown name fails with the list of known ones
  implementation = cfg.get("implementation", "auto")
  common = dict(kd_weight=schedules.make_schedule(cfg.get("kd_weight", 0.5)),
                temperature=schedules.make_schedule(cfg.get("temperature", 1.0)),
                divergence_kwargs=tuple(sorted(dict(cfg.get("divergence_kwargs") or {}).items())))
  # A string too: a command-line override of the config's 'auto' arrives as 'True' / 'False'.
  fused_head = {"auto": "auto", "true": True, "false": False}.get(str(cfg.get("fused_head", "auto")).lower())
  if fused_head is None:
    raise ValueError(f"fused_head must be True, False or 'auto', got {cfg['fused_head']!r}")
  fusable = (not name or name in kernels.NAMES) and not cfg.get("label_smoothing")
  if fused_head == "auto":
    fused_head = fusable and vocab_size is not None and vocab_size >= FUSED_HEAD_MIN_VOCAB
  if fused_head:
    if name and name not in kernels.NAMES:
      raise ValueError(f"fused_head needs a divergence of the fused family {sorted(kernels.NAMES)}, got {name!r}")
    if cfg.get("label_smoothing"):
      raise ValueError("fused_head does not support label_smoothing (the fused cross-entropy is plain)")
    kernels.resolve_implementation(implementation, 0)
    return HeadDistillation(divergence=name or None, implementation=implementation, **common)
  return LogitDistillation(
      divergence=divergence_with_implementation(name, implementation) if name else None,
      label_smoothing=float(cfg.get("label_smoothing", 0.0)), **common)
