"""Logit-extrapolation targets of AlignDistil (Zhang et al. 2025, arXiv 2503.02832, ACL 2025).

AlignDistil's Theorem 1: the token-level RLHF objective max_π E_π[r] − β_KL·KL(π ‖ π_ref) with the DPO
reward r = β_dpo·log(π_dpo / π_ref) has the optimum

    π* ∝ π_ref · exp(r / β_KL) = π_ref^(1 − β) · π_dpo^β,      β = β_dpo / β_KL,

so RLHF is distillation towards softmax(z*), z* = z_ref + β·(z_dpo − z_ref) (log-probabilities and
logits differ by a per-row constant, which the softmax drops). β > 1 extrapolates past the DPO model
away from the reference. The contrastive reward r = β_dpo·log(π_dpo / π_rdpo) of a normal and a reverse
DPO model (trained on swapped preferences) gives z* = z_ref + β·(z_dpo − z_rdpo).

Reading chosen for the token-adaptive β (the paper's section on token adaptive logit extrapolation,
taken from the authors' code, `songmzhang/AlignDistil`, `aligndistil_offpolicy_trainer.py`,
`reward_boost_type='aligndistil'`): the *KL coefficient* is made per token and inversely proportional
to the distance of the two models, β_KL,t = β_dpo / (r·‖π_dpo − π_rdpo‖₁ + ε), so the *extrapolation
weight* β_t = β_dpo / β_KL,t = r·‖π_dpo − π_rdpo‖₁ + ε grows with that distance (r = 10, ε = 1e-3 in
their scripts, no upper cap). `token_adaptive_beta` states it with the total variation TV = ½‖·‖₁ and
a clip to [β_min, β_max] in place of ε: β_t = clip(β·TV_t, β_min, β_max), so the authors' r is β = 2r.
Their per-token loss weight β_KL,t ∝ 1 / β_t is left to the caller
(`kdjax.distill.aligndistil.AlignDistilDistillation.reweight`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common, divergences

Array = jax.Array


def extrapolated_logits(reference_logits: Array, model_logits: Array, *, beta,
                        contrast_logits: Optional[Array] = None) -> Array:
  """z* = z_ref + β·(z_model − z_base), z_base = z_contrast if given, else z_ref.

  Without a contrast model this is (1 − β)·z_ref + β·z_model, the logits of π_ref^(1 − β)·π_model^β:
  β = 0 is the reference, β = 1 the model, β > 1 extrapolates past it. With one it is
  z_ref + β·(z_model − z_contrast), AlignDistil's contrastive-reward target (module docstring); the
  authors' code anchors that target at the DPO model instead of π_ref (pass the model's logits as
  `reference_logits` for it).

  An id that is −inf in a model with a nonzero coefficient is −inf (absent) in the target. Where the
  coefficient is positive that is exact; where it is negative (1 − β or −β) the formula would give +inf,
  and an id some model rules out is never forced to certainty instead.

  Args:
    reference_logits: `[..., V]` z_ref, the anchor.
    model_logits: `[..., V]` z_model (the aligned / teacher model).
    beta: β, a scalar or a `[...]` array of one value per position.
    contrast_logits: optional `[..., V]` z_contrast (the reverse-DPO model).

  Returns:
    `[..., V]` logits in the compute dtype (float32 or wider).
  """
  arrays = {"reference": reference_logits, "model": model_logits}
  if contrast_logits is not None:
    arrays["contrast"] = contrast_logits
  shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"extrapolated_logits needs logits of one shape, got {shapes}")
  shape = shapes["reference"]
  if not shape:
    raise ValueError("logits need a vocabulary axis; got a scalar")
  dtype = common.compute_dtype(jnp.result_type(*arrays.values()))
  beta = jnp.asarray(beta, dtype)
  if beta.ndim:
    if beta.shape != shape[:-1]:
      raise ValueError(f"beta has shape {beta.shape}: give a scalar or one value per position {shape[:-1]}")
    beta = beta[..., None]
  if contrast_logits is None:
    weighted = ((reference_logits, 1.0 - beta), (model_logits, beta))
  else:
    weighted = ((reference_logits, jnp.ones((), dtype)), (model_logits, beta), (contrast_logits, -beta))
  total, absent = jnp.zeros((), dtype), jnp.zeros((), bool)
  for logits, weight in weighted:
    logits = jnp.asarray(logits).astype(dtype)
    missing = jnp.isneginf(logits)
    # 0·(−inf) is NaN: absent ids contribute nothing here and are put back to −inf below.
    total = total + weight * jnp.where(missing, 0.0, logits)
    absent = absent | (missing & (weight != 0))
  return jnp.where(absent, -jnp.inf, total)


def token_adaptive_beta(model_logits: Array, base_logits: Array, *, beta, beta_min=0.0, beta_max=jnp.inf,
                        where: Optional[Array] = None) -> Array:
  """AlignDistil's per-token extrapolation weight β_t = clip(β·TV_t, β_min, β_max).

  TV_t = ½ Σ_v |π_model − π_base| (in [0, 1], at temperature 1) measures how much the two models that
  define the reward disagree at token t. The paper's per-token KL coefficient is inversely proportional
  to it, which makes the extrapolation weight proportional (module docstring): tokens where the reward
  models agree get a target near the anchor, tokens where they disagree a target moved further along
  their logit difference. The authors' r on the L1 norm is β = 2r here; β_min plays their ε.

  No gradient flows through β_t: it is a coefficient of the target, not a loss.

  Args:
    model_logits: `[..., V]` the aligned / teacher model.
    base_logits: `[..., V]` the model it is contrasted with (the reverse-DPO model, else the reference).
    beta: β ≥ 0, the scale per unit of total variation.
    beta_min: lower clip, ≥ 0.
    beta_max: upper clip, ≥ beta_min (may be inf).
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 values in [β_min, β_max], 0 at masked positions.
  """
  numbers = {name: value for name, value in (("beta", beta), ("beta_min", beta_min), ("beta_max", beta_max))
             if isinstance(value, (int, float))}
  if any(not value >= 0 for value in numbers.values()):  # `not >=` also rejects NaN
    raise ValueError(f"token_adaptive_beta needs beta, beta_min, beta_max >= 0, got {numbers}")
  if len(numbers) == 3 and not beta_min <= beta_max:
    raise ValueError(f"token_adaptive_beta needs beta_min <= beta_max, got {beta_min} > {beta_max}")
  distance = divergences.total_variation(model_logits, base_logits, where=where)
  values = jnp.clip(beta * distance, beta_min, beta_max)
  return jax.lax.stop_gradient(common.finish(values, where))
