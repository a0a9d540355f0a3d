"""Sequence-level KD on verified teacher traces: rejection sampling (SFT on accepted) and REDI.

The teacher writes the continuation of every prompt of a batch (sequence-level KD, Kim & Rush
2016) and a checker labels each trace: accepted (positive) or rejected (negative). Here the
checker is `kdjax.evaluate.word_checker.WordChecker`, a spelling check against the training text.

  * Rejection-sampling SFT ("Not All Correct Answers Are Equal: Why Your Distillation Source
    Matters"): cross-entropy on the accepted traces only.
  * REDI (Xu et al. 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher
    Data for LLM Reasoning", arXiv 2505.24850): after an SFT stage on positives, a
    reference-free, REINFORCE-like objective that also pushes the rejected traces down,

        L = −log π(y⁺ | x) / |y⁺|  +  α · log π(y⁻ | x) / |y⁻|,

    each sequence log-likelihood normalised by its length, with α < 1 (0.8 in the paper) because
    an equally weighted negative term lets the likelihood of everything collapse. This follows the
    authors' code (`loss_type='reinforce'` in their TRL fork, `reinforce_chosen_coef=1`,
    `reinforce_rejected_coef=0.8`, no negative re-weighting). The paper averages over (positive,
    negative) pairs of one prompt; our rows are unpaired, so each term is a mean over its own rows:

        L = mean_{b ∈ P} (−ℓ_b) + α · mean_{b ∈ N} ℓ_b,     ℓ_b = Σ_t log π(y_{b,t} | ·) / |y_b|,

    which equals the paired loss when |P| = |N| and keeps the paper's 1 : α balance of the two
    gradients whatever the acceptance rate (per-row weights would let a mostly rejected batch be
    dominated by the negative term, the instability α < 1 exists to avoid). A mean over no rows is
    0, so a batch without accepted traces has a finite loss.
  * 'all': plain sequence-level KD, cross-entropy on every trace (the unfiltered baseline).

The batch hook `VerifiedTraceBatches` samples the traces (through
`kdjax.distill.on_policy.OnPolicyBatches` with `teacher_fraction=1`, so keys depend on (seed, step)
only) and adds `trace_ok` float32 `[B]` (1 accepted, 0 rejected); the loss covers continuation
tokens only. The strategy has `uses_teacher = False`: the traces come from the teacher already, and
the step runs no teacher forward pass. Its hook therefore holds the teacher's parameters itself,
since the loop hands it none for such a strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import config_args, losses
from kdjax.distill import strategies
from kdjax.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from kdjax.evaluate.word_checker import WordChecker
from kdjax.train import sharding as sharding_lib

Array = jax.Array
MODES = ("sft", "redi", "all")


@dataclasses.dataclass(frozen=True)
class VerifiedTraceConfig:
  """How the teacher's traces are sampled and checked.

  Attributes:
    prompt_len: P, tokens of each data window kept as the prompt; the teacher writes the rest.
    temperature, top_k, top_p: the teacher's sampler.
    seed: of the sampling keys (`fold_in(PRNGKey(seed), step)`).
    min_count: a word is in the checker's list iff it occurs this often in the training text.
    min_words: the fewest complete words of an accepted trace (`WordChecker`).
  """

  prompt_len: int = 16
  temperature: float = 0.9
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  min_count: int = 1
  min_words: int = 1

  def __post_init__(self):
    if self.prompt_len < 1:
      raise ValueError(f"prompt_len must be at least 1, got {self.prompt_len}")

  @classmethod
  def from_config(cls, config: Optional[ml_collections.ConfigDict]) -> "VerifiedTraceConfig":
    return config_args.from_section(cls, config, "verified_traces")

  def checker(self, train_tokens) -> WordChecker:
    """The spelling checker of the training bytes with this config's thresholds."""
    return WordChecker.from_tokens(train_tokens, min_count=self.min_count, min_words=self.min_words)


class VerifiedTraceBatches:
  """The loop's batch hook: the teacher's continuations of the batch's prompts, checked.

  Args:
    config: sampling and checker settings.
    seq_len: L, the window's input length (P + the continuation's L − P + 1 tokens).
    teacher_graphdef: the teacher's structure.
    mesh: where batches go.
    checker: labels the traces.
    teacher_params: the teacher's parameters, used when the loop passes None (it does for a
      strategy with `uses_teacher = False`, like `VerifiedTraceDistillation`).
  """

  def __init__(self, config: VerifiedTraceConfig, *, seq_len: int, teacher_graphdef, mesh: Mesh,
               checker: WordChecker, teacher_params: Any = None):
    sampling = OnPolicyConfig(teacher_fraction=1.0, prompt_len=config.prompt_len, temperature=config.temperature,
                              top_k=config.top_k, top_p=config.top_p, seed=config.seed)
    self._sampler = OnPolicyBatches(sampling, seq_len=seq_len, student_graphdef=None,
                                    teacher_graphdef=teacher_graphdef, mesh=mesh)
    self.config = config
    self.checker = checker
    self.teacher_params = teacher_params
    self._batch_sharding = sharding_lib.batch_sharding(mesh)
    self.counts = {"accepted": 0, "rejected": 0}

  def get_state(self) -> dict:
    # Only the counts: the traces are a function of (seed, step, teacher) and need no state.
    return dict(self.counts)

  def set_state(self, state: dict) -> None:
    self.counts = {k: int(state[k]) for k in ("accepted", "rejected")}

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    """The step's batch on the mesh: `inputs`, `targets`, `mask` of prompt + trace, and `trace_ok`."""
    params = self.teacher_params if teacher_params is None else teacher_params
    if params is None:
      raise ValueError("VerifiedTraceBatches needs the teacher's parameters: pass teacher_params= to it")
    out = self._sampler(state, batch, params, step)
    # The continuation is target positions P − 1 onwards (`completion_batch`).
    start = self.config.prompt_len - 1
    targets, mask = (np.asarray(x)[:, start:] for x in jax.device_get((out["targets"], out["mask"])))
    verdict = self.checker.check(targets, mask.sum(axis=1).astype(np.int64))
    accepted = int(verdict.accepted.sum())
    self.counts["accepted"] += accepted
    self.counts["rejected"] += len(verdict.accepted) - accepted
    return dict(out, trace_ok=jax.device_put(verdict.accepted.astype(np.float32), self._batch_sharding))


def _row_sums(values: Array, mask: Array) -> tuple[Array, Array]:
  """(Σ_t values over kept positions, kept count) per row."""
  return jnp.sum(jnp.where(mask, values, 0.0), axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class VerifiedTraceDistillation:
  """SFT on accepted traces, REDI on accepted and rejected ones, or CE on all (module docstring).

  The batch carries `trace_ok` `[B]` (`VerifiedTraceBatches`). Metrics: `loss`; `ce`, the
  cross-entropy per token of accepted traces; `accepted`, the share of accepted rows;
  `negative_logp`, the log-likelihood per token of rejected traces; `no_positive`, 1 for a batch
  without accepted tokens (its positive part is then 0); and for REDI its two parts `redi_positive`
  (mean −ℓ over accepted rows) and `redi_negative` (mean ℓ over rejected rows).

  Attributes:
    mode: 'sft' (rejection sampling), 'redi' or 'all' (unfiltered sequence-level KD).
    alpha: REDI's weight of the negative term, in [0, 1] (0.8 in the paper; unused by the others).
  """

  mode: str = "redi"
  alpha: float = 0.8

  uses_teacher = False  # the teacher's traces are the batch
  uses_head = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown verified-trace mode {self.mode!r}; known: {MODES}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"REDI's alpha must lie in [0, 1] (the negative term weaker than the positive), "
                       f"got {self.alpha!r}")

  def __call__(self, student_out, teacher_out, batch, step):
    del teacher_out, step
    logits, mask = student_out["logits"], batch["mask"].astype(bool)
    ok = batch["trace_ok"]
    if ok.shape != mask.shape[:1]:
      raise ValueError(f"trace_ok must have one flag per row, shape {mask.shape[:1]}, got {ok.shape}")
    ok = (ok > 0)[:, None]
    positive, negative = mask & ok, mask & ~ok
    nll = losses.cross_entropy(logits, batch["targets"], where=mask)
    ce = losses.masked_sum_count(nll, positive)
    one = jnp.ones((), jnp.float32)
    rows = jnp.any(mask, axis=-1)
    metrics = {"ce": ce, "accepted": losses.masked_sum_count(ok[:, 0].astype(jnp.float32), rows),
               "negative_logp": losses.masked_sum_count(-nll, negative),
               "no_positive": ((ce[1] == 0).astype(jnp.float32), one)}
    if self.mode != "redi":
      total, count = ce if self.mode == "sft" else losses.masked_sum_count(nll, mask)
      metrics["loss"] = (total, count)
      return losses.safe_mean(total, count), metrics
    row_nll, length = _row_sums(nll, mask)
    logp = -row_nll / jnp.maximum(length, 1.0)  # ℓ_b, the length-normalised log-likelihood
    has_tokens = length > 0
    pos_rows, neg_rows = has_tokens & ok[:, 0], has_tokens & ~ok[:, 0]
    pos = losses.masked_sum_count(-logp, pos_rows)
    neg = losses.masked_sum_count(logp, neg_rows)
    loss = losses.safe_mean(*pos) + self.alpha * losses.safe_mean(*neg)
    metrics.update(loss=(loss, one), redi_positive=pos, redi_negative=neg)
    return loss, metrics


def verified_traces_strategy(cfg: dict, *, vocab_size, num_steps) -> VerifiedTraceDistillation:
  """`VerifiedTraceDistillation` from the keys mode ('sft', 'redi', 'all'; default 'redi') and alpha (0.8)."""
  del vocab_size, num_steps
  strategies._check_keys(cfg, {"mode", "alpha"}, "verified_traces")  # pylint: disable=protected-access
  return VerifiedTraceDistillation(mode=str(cfg.get("mode", "redi")), alpha=float(cfg.get("alpha", 0.8)))
