"""Strategies for distilling across tokenizers: ULD over aligned positions, ALM over chunks.

Student and teacher read the same text through different tokenizers (e.g. bytes and a BPE), so
their logits share neither a vocabulary nor positions. Both strategies here take the student's
own next-token cross-entropy on its labels and add one cross-tokenizer term:

    loss = (1 − α) · mean_{student tokens} CE + α · mean_{aligned units} D,

where each mean is over its own kept units (bytes for the CE, position pairs for ULD, chunks for
ALM, as each paper normalises), since the two terms count different things. The metrics are
`(sum, count)` pairs as in `kdjax.distill.strategies.LogitDistillation`: `ce` per student
token, `kd` per aligned unit, and `loss` per batch (a mean of two means has no common count).

The alignments are host-computed index arrays in the batch
(`kdjax.data.cross_tokenizer_pipeline`): ULD reads the `pair_*` fields (a
`kdjax.losses.PositionAlignment`), ALM the `chunk_*` fields (a `kdjax.losses.ChunkAlignment`).
The teacher's forward pass must read `batch['teacher_inputs']`; its outputs are
`{'logits': [B, L_t, V_t]}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.data import cross_tokenizer_pipeline as pipeline
from kdjax.distill import schedules

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]


def _scheduled(value, step):
  return value(step) if callable(value) else value


def _objective(ce: Array, mask: Array, kd: Callable[[Any], tuple[Array, Array]], step, kd_weight, temperature,
               metrics: Metrics) -> tuple[Array, Metrics]:
  """(1 − α)·mean CE + α·mean D, each averaged over its own kept units.

  Args:
    ce: `[B, L_s]` student cross-entropy per position.
    mask: `[B, L_s]` boolean student positions to keep.
    kd: `temperature -> (values, where)`, the cross-tokenizer term per aligned unit.
    step: the training step (for the schedules).
    kd_weight: α, a schedule or a constant.
    temperature: T (ULD) or τ (ALM), a schedule or a constant.
    metrics: the caller's extra (sum, count) metrics, completed here.
  """
  alpha = jnp.asarray(_scheduled(kd_weight, step), jnp.float32)
  t = jnp.asarray(_scheduled(temperature, step), jnp.float32)
  ce_sum, ce_count = losses.masked_sum_count(ce, mask)
  values, where = kd(t)
  kd_sum, kd_count = losses.masked_sum_count(values, where)
  loss = (1.0 - alpha) * losses.safe_mean(ce_sum, ce_count) + alpha * losses.safe_mean(kd_sum, kd_count)
  one = jnp.ones((), jnp.float32)
  metrics = dict(metrics, ce=(ce_sum, ce_count), kd=(kd_sum, kd_count), loss=(loss, one), kd_weight=(alpha, one),
                 temperature=(t, one))
  return loss, metrics


def _student_terms(student_out, batch) -> tuple[Array, Array, Array, Metrics]:
  """The student's logits, CE on its own labels, mask, and accuracy: shared by both strategies."""
  logits = student_out["logits"]
  mask = batch["mask"].astype(bool)
  ce = losses.cross_entropy(logits, batch["targets"], where=mask)
  accuracy = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return logits, ce, mask, {"accuracy": losses.masked_sum_count(accuracy, mask)}


@dataclasses.dataclass(frozen=True)
class ULDDistillation:
  """(1 − α)·CE + α·ULD over the positions where both models have read the same text.

  ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs") is the L1 distance between the two next-token distributions
  sorted in descending order, at temperature T:

    ULD(i, j) = Σ_k | sort↓(softmax(z_t[j] / T))_k − sort↓(softmax(z_s[i] / T))_k |,

  for the pairs (i, j) of `batch['pair_*']`: student position i and teacher position j whose
  tokens end at the same byte (`kdjax.losses.align_positions`), so both predict the same
  continuation. The paper pairs the k-th answer tokens instead; pairing by text is TRL GOLD's
  refinement. No T² factor; the paper adds λ·ULD to the CE, here the weights are (1 − α, α).

  Attributes:
    kd_weight: α as a schedule `step -> value` (a float is a constant).
    temperature: T as a schedule.
  """

  kd_weight: Any = 0.5
  temperature: Any = 1.0

  uses_teacher = True
  uses_head = False

  def __call__(self, student_out, teacher_out, batch, step):
    logits, ce, mask, metrics = _student_terms(student_out, batch)
    teacher_logits = jax.lax.stop_gradient(teacher_out["logits"])
    pairs = pipeline.alignment_from_batch(losses.PositionAlignment, batch, pipeline.PAIR_PREFIX)
    student_pairs, teacher_pairs, where = losses.gather_position_pairs(logits, teacher_logits, pairs)
    where = where.astype(bool)

    def kd(temperature):
      return losses.uld(student_pairs, teacher_pairs, temperature=temperature, where=where), where

    return _objective(ce, mask, kd, step, self.kd_weight, self.temperature, metrics)


def token_log_probs(ce: Array) -> Array:
  """`[..., L]` next-token CE → `[..., L + 1]` log p(token i | tokens < i), 0 for token 0.

  Position i − 1 predicts token i, so the log-probabilities of the text's tokens are −CE
  shifted right by one; token 0 has no prediction (no BOS) and the alignment leaves it unscored.
  """
  pad = [(0, 0)] * (ce.ndim - 1) + [(1, 0)]
  return jnp.pad(-ce, pad)


@dataclasses.dataclass(frozen=True)
class ALMDistillation:
  """(1 − α)·CE + α·ALM over chunks of text covered by whole tokens on both sides.

  ALM (Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation via Approximate
  Likelihood Matching") compares the likelihoods both models give to the same chunk c of text
  (`kdjax.losses.align_chunks`, fields `batch['chunk_*']`):

    log p(c) = Σ_{tokens in c} log p(token | prefix),
    ALM(c) = BCE( exp(log p_T(c) / τ), exp(log p_S(c) / τ) ),   τ = 100 by default,

  see `kdjax.losses.alm`. The student's token log-probabilities are its own −CE (shifted, see
  `token_log_probs`), so the term reuses the CE's logits; the teacher's come from its logits on
  `batch['teacher_targets']`. Chunks that contain a token without a prediction (token 0 of either
  side) are left out by the alignment.

  Attributes:
    kd_weight: α as a schedule (a float is a constant).
    temperature: τ as a schedule.
  """

  kd_weight: Any = 0.5
  temperature: Any = 100.0

  uses_teacher = True
  uses_head = False

  def __call__(self, student_out, teacher_out, batch, step):
    _, ce, mask, metrics = _student_terms(student_out, batch)
    teacher_logits = jax.lax.stop_gradient(teacher_out["logits"])
    teacher_ce = losses.cross_entropy(teacher_logits, batch["teacher_targets"],
                                      where=batch["teacher_mask"].astype(bool))
    chunks = pipeline.alignment_from_batch(losses.ChunkAlignment, batch, pipeline.CHUNK_PREFIX)
    chunks = chunks._replace(where=chunks.where.astype(bool))

    def kd(temperature):
      values = losses.alm(token_log_probs(ce), token_log_probs(teacher_ce), chunks, temperature=temperature)
      return values, chunks.where

    return _objective(ce, mask, kd, step, self.kd_weight, self.temperature, metrics)


METHODS = {"uld": (ULDDistillation, 1.0), "alm": (ALMDistillation, 100.0)}


def strategy_from_config(config: ml_collections.ConfigDict | dict, *, method: Optional[str] = None):
  """`ULDDistillation` or `ALMDistillation` from a `distill` section.

  Keys: method ('uld' or 'alm'), kd_weight and temperature (numbers or schedule configs, see
  `kdjax.distill.schedules`; the temperature defaults to 1 for ULD and to the paper's 100 for
  ALM). Any other key raises, naming the known ones.
  """
  cfg = dict(config)
  method = cfg.pop("method", method)
  if method not in METHODS:
    raise ValueError(f"unknown cross-tokenizer method {method!r}; known: {sorted(METHODS)}")
  unknown = set(cfg) - {"kd_weight", "temperature"}
  if unknown:
    raise ValueError(f"unknown distill config keys {sorted(unknown)} for method {method!r}; "
                     "known: ['kd_weight', 'method', 'temperature']")
  kind, default_temperature = METHODS[method]
  return kind(kd_weight=schedules.make_schedule(cfg.get("kd_weight", 0.5)),
              temperature=schedules.make_schedule(cfg.get("temperature", default_temperature)))
