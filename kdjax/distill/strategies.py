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
from kdjax.distill import schedules

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

# Divergences a config may name (`kdjax.losses.DIVERGENCES`).
DIVERGENCES: Mapping[str, Callable[..., Array]] = losses.DIVERGENCES


def divergence_by_name(name: str) -> Callable[..., Array]:
  if name not in DIVERGENCES:
    raise ValueError(f"unknown divergence {name!r}; known: {sorted(DIVERGENCES)}")
  return DIVERGENCES[name]


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

  def __call__(self, student_out, teacher_out, batch, step):
    logits = student_out["logits"]
    mask = batch["mask"].astype(bool)
    ce = losses.cross_entropy(logits, batch["targets"], where=mask, label_smoothing=self.label_smoothing)
    ce_sum, count = losses.masked_sum_count(ce, mask)
    metrics: Metrics = {"ce": (ce_sum, count)}
    metrics["accuracy"] = losses.masked_sum_count(
        (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32), mask)
    if not self.uses_teacher:
      metrics["loss"] = (ce_sum, count)
      return losses.safe_mean(ce_sum, count), metrics

    alpha = _as_schedule(self.kd_weight)(step)
    temperature = _as_schedule(self.temperature)(step)
    teacher_logits = jax.lax.stop_gradient(teacher_out["logits"])
    kd = self.divergence(logits, teacher_logits, temperature=temperature, where=mask,
                         **dict(self.divergence_kwargs))
    kd_sum, _ = losses.masked_sum_count(kd, mask)
    total_sum = (1.0 - alpha) * ce_sum + alpha * kd_sum
    metrics["kd"] = (kd_sum, count)
    metrics["loss"] = (total_sum, count)
    metrics["teacher_agreement"] = losses.masked_sum_count(
        (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32), mask)
    one = jnp.ones((), jnp.float32)
    metrics["kd_weight"] = (jnp.asarray(alpha, jnp.float32), one)
    metrics["temperature"] = (jnp.asarray(temperature, jnp.float32), one)
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


def strategy_from_config(config: ml_collections.ConfigDict) -> LogitDistillation:
  """Builds a strategy from `config.distill` (None or an empty divergence means CE only).

  Keys: divergence (a name in DIVERGENCES or None), kd_weight, temperature (numbers or schedule
  configs, see `kdjax.distill.schedules`), divergence_kwargs (dict), label_smoothing, and
  implementation ('auto', 'pallas', 'tiled' or 'naive': how a divergence of the fused family is
  computed, see `kdjax.kernels.api`).
  """
  cfg = dict(config)
  known = {"divergence", "kd_weight", "temperature", "divergence_kwargs", "label_smoothing", "implementation"}
  unknown = set(cfg) - known
  if unknown:
    raise ValueError(f"unknown distill config keys {sorted(unknown)}; known: {sorted(known)}")
  name = cfg.get("divergence")
  if name:
    divergence_by_name(name)  # an unknown name fails with the list of known ones
  return LogitDistillation(
      divergence=divergence_with_implementation(name, cfg.get("implementation", "auto")) if name else None,
      kd_weight=schedules.make_schedule(cfg.get("kd_weight", 0.5)),
      temperature=schedules.make_schedule(cfg.get("temperature", 1.0)),
      divergence_kwargs=tuple(sorted(dict(cfg.get("divergence_kwargs") or {}).items())),
      label_smoothing=float(cfg.get("label_smoothing", 0.0)),
  )
