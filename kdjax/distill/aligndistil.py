"""AlignDistil (Zhang et al. 2025, arXiv 2503.02832): distillation towards an extrapolated teacher.

The target of every token is softmax(z*), z* = z_ref + β_t·(z_teacher − z_base)
(`kdjax.losses.extrapolation`): the RLHF optimum for a DPO reward when the teacher is the DPO model
and the reference its starting point, and in a plain KD run (the teacher a larger model, the reference
the CE-only student of the same seed) a target pushed past the teacher along what the teacher knows
and a student of this size trained on the data alone does not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill import schedules, strategies
from kdjax.losses import extrapolation

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AlignDistilDistillation:
  """(1 − α)·CE(student, labels) + α·D(p* ‖ q), p* = softmax(z* / T) a constant, over kept tokens.

  Teacher outputs: 'logits' (the teacher / DPO model π_dpo), 'reference_logits' (π_ref, the anchor)
  and optionally 'contrast_logits' (a reverse-DPO model π_rdpo). Then

      z* = z_ref + β_t·(z_dpo − z_base),     z_base = z_rdpo if given, else z_ref,
      β_t = clip(β·TV(π_dpo, π_base)_t, β_min, β_max)   (adaptive),   β_t = β   (otherwise).

  With a contrast model and no reference the anchor is the teacher, z* = z_dpo + β_t·(z_dpo − z_rdpo),
  the form of the authors' code. Non-adaptive β = 1 is `LogitDistillation` with the same divergence,
  β = 0 distillation to the reference.

  The paper trains with reverse KL(q ‖ p*), pure distillation (α = 1), T = 1, and weights token t's
  divergence by its KL coefficient β_KL,t ∝ 1 / β_t (`reweight=True`, with the constant β_dpo = 1:
  fold it into α or the learning rate). The default divergence here is forward KL(p* ‖ q), whose
  student gradient is (q − p*)/T per position. `beta` reports the mean β_t over kept tokens.

  Attributes:
    divergence: a per-position loss of `kdjax.losses` (`(student_logits, teacher_logits, *, temperature,
      where)`).
    kd_weight: α as a schedule (a float is a constant).
    temperature: T as a schedule; it tempers p* and q, not the distance behind β_t (taken at T = 1).
    beta: the constant β, or with `adaptive` the scale of β_t per unit of total variation (the authors'
      r = 10 on the L1 distance is β = 20).
    beta_min, beta_max: the clip of the adaptive β_t.
    adaptive: False for one β at every token.
    reweight: multiply token t's divergence by 1 / β_t (needs β_t > 0: β_min > 0, or β > 0 when not adaptive).
  """

  divergence: Callable[..., Array] = losses.forward_kl
  kd_weight: Any = 1.0
  temperature: Any = 1.0
  beta: float = 4.0
  beta_min: float = 1.0
  beta_max: float = 2.0
  adaptive: bool = True
  reweight: bool = False

  uses_teacher = True
  uses_head = False

  def __post_init__(self):
    if not (0.0 <= self.beta < math.inf and 0.0 <= self.beta_min <= self.beta_max):
      raise ValueError(f"AlignDistil needs a finite beta >= 0 and 0 <= beta_min <= beta_max, got beta={self.beta}, "
                       f"beta_min={self.beta_min}, beta_max={self.beta_max}")
    if self.reweight and not (self.beta_min if self.adaptive else self.beta) > 0:
      raise ValueError("AlignDistil's reweight divides by beta_t: it needs beta_min > 0 (adaptive) or beta > 0")
    _check_numbers(self.kd_weight, self.temperature)

  def __call__(self, student_out, teacher_out, batch, step):
    logits, teacher_logits, mask = strategies.logit_inputs(student_out, teacher_out, batch)
    reference, contrast = teacher_out.get("reference_logits"), teacher_out.get("contrast_logits")
    if reference is None and contrast is None:
      raise ValueError("AlignDistil needs teacher_out['reference_logits'] (or 'contrast_logits'); got keys "
                       f"{sorted(teacher_out)}")
    anchor = teacher_logits if reference is None else jax.lax.stop_gradient(reference)
    contrast = None if contrast is None else jax.lax.stop_gradient(contrast)
    base = anchor if contrast is None else contrast
    if self.adaptive:
      beta = extrapolation.token_adaptive_beta(teacher_logits, base, beta=self.beta, beta_min=self.beta_min,
                                               beta_max=self.beta_max, where=mask)
    else:
      beta = jnp.full(mask.shape, self.beta, jnp.float32)
    target = jax.lax.stop_gradient(
        extrapolation.extrapolated_logits(anchor, teacher_logits, beta=beta, contrast_logits=contrast))
    ce = losses.cross_entropy(logits, batch["targets"], where=mask)
    metrics = {"accuracy": strategies.top1_match(logits, batch["targets"], mask),
               "teacher_agreement": strategies.top1_match(logits, jnp.argmax(teacher_logits, -1), mask),
               "beta": losses.masked_sum_count(beta, mask)}
    # Masked positions have β_t = 0; their weight is never used but must not be inf (0·inf is NaN).
    weight = jnp.where(mask, 1.0 / jnp.where(mask, beta, 1.0), 0.0) if self.reweight else 1.0

    def divergence(temperature):
      return weight * self.divergence(logits, target, temperature=temperature, where=mask)

    return strategies._objective(ce, divergence, mask, step, self.kd_weight, self.temperature, metrics)


def aligndistil_strategy(cfg: dict, *, vocab_size, num_steps) -> AlignDistilDistillation:
  """`AlignDistilDistillation` from the keys divergence (a name of `kdjax.losses.DIVERGENCES`), kd_weight and
  temperature (numbers or schedule configs), beta, beta_min, beta_max, adaptive, reweight."""
  del vocab_size, num_steps
  strategies._check_keys(cfg, {"divergence", "kd_weight", "temperature", "beta", "beta_min", "beta_max", "adaptive",
                               "reweight"}, "aligndistil")
  flags = {}
  for key in ("adaptive", "reweight"):
    value = cfg.get(key, key == "adaptive")
    # A command-line override arrives as a string.
    flags[key] = {"true": True, "false": False}.get(str(value).lower())
    if flags[key] is None:
      raise ValueError(f"AlignDistil's {key} must be True or False, got {value!r}")
  kd_weight, temperature = cfg.get("kd_weight", 1.0), cfg.get("temperature", 1.0)
  _check_numbers(kd_weight, temperature)  # before they become (opaque) schedules
  defaults = {f.name: f.default for f in dataclasses.fields(AlignDistilDistillation)}
  betas = {key: float(cfg.get(key, defaults[key])) for key in ("beta", "beta_min", "beta_max")}
  return AlignDistilDistillation(divergence=strategies.divergence_by_name(cfg.get("divergence", "forward_kl")),
                                 kd_weight=schedules.make_schedule(kd_weight),
                                 temperature=schedules.make_schedule(temperature), **betas, **flags)


def _check_numbers(kd_weight, temperature) -> None:
  """α in [0, 1] and T > 0 where they are numbers."""
  if isinstance(kd_weight, (int, float)) and not 0.0 <= kd_weight <= 1.0:
    raise ValueError(f"AlignDistil's kd_weight must lie in [0, 1], got {kd_weight}")
  if isinstance(temperature, (int, float)) and not temperature > 0.0:
    raise ValueError(f"AlignDistil's temperature must be positive, got {temperature}")
