"""MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models"): teacher-mixed
rollouts, the reverse-KL policy gradient on them and the pre-training loss, in one batch.

Each step of the paper minimises

    L = L_RL + λ·L_PT,

L_RL the sequence-level reverse KL(q ‖ p) of continuations of the prompts, optimised by the policy
gradient of `kdjax.losses.reverse_kl_policy_gradient` (single-step decomposition, length
normalisation) on rollouts drawn token by token from p̃ = α·p + (1 − α)·q (α = 0.2) and corrected
by the importance ratio q / p̃; and L_PT the language-modelling loss (cross-entropy) on
pre-training text, which keeps the student's language modelling from drifting while it chases the
teacher's reward. Here the data windows are the pre-training text:

    source = MiniLLMBatches(sampling, teacher_mix=0.2, seq_len=L, student_graphdef=..., teacher_graphdef=...,
                            mesh=mesh)
    batch = source(state, batch, teacher_params, step)      # inside `kdjax.train.loop.fit`

turns a host batch of B windows into 2B rows: rows [0, B) continue each window's first P tokens
with L − P + 1 tokens drawn from p̃ (`kdjax.models.sampling.generate_mixture`, both models
KV-cached in lockstep), with the sampler's log p̃ of every token (`sample_logprobs`); rows [B, 2B)
are the windows themselves. `row_kind` (0 = sample, 1 = data) tells `MiniLLMDistillation` which
term a row enters: the policy gradient on the samples' continuation tokens, CE on every token of
the data rows. The sampling key depends only on (seed, step), so a resumed run draws what an
uninterrupted one does (given the same parameters); the hook keeps no other state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kdjax import losses
from kdjax.distill import strategies
from kdjax.distill.on_policy import OnPolicyConfig
from kdjax.losses import policy
from kdjax.models import sampling
from kdjax.train import sharding as sharding_lib

SAMPLE, DATA = 0, 1  # values of the per-row `row_kind`


class MiniLLMBatches:
  """The loop's batch hook: `(state, batch, teacher_params, step) -> 2B rows` (module docstring).

  Args:
    config: prompt length, sampler settings (temperature, top-k, top-p) and seed; the fractions
      are unused (every step samples).
    teacher_mix: α of the sampling mixture (0 samples the student alone).
    seq_len: the windows' length L.
    student_graphdef, teacher_graphdef: the models' structures (one vocabulary).
    mesh: where the batch goes.
    eos_id: stops a sampled row early (None: never).
    data_rows: False leaves the data rows out (B rows, all samples: no L_PT).
  """

  def __init__(self, config: OnPolicyConfig, *, teacher_mix: float, seq_len: int, student_graphdef, teacher_graphdef,
               mesh: Mesh, eos_id: Optional[int] = None, data_rows: bool = True):
    if not config.prompt_len < seq_len:
      raise ValueError(f"prompt_len {config.prompt_len} must be shorter than the window's {seq_len} inputs")
    sampler = sampling.SamplingConfig(max_new_tokens=seq_len - config.prompt_len + 1, temperature=config.temperature,
                                      top_k=config.top_k, top_p=config.top_p, eos_id=eos_id)
    self.config = config
    self.mesh = mesh
    self.data_rows = data_rows
    self._batch_sharding = sharding_lib.batch_sharding(mesh)
    self._generate = sampling.make_generate_mixture(student_graphdef, teacher_graphdef, sampler,
                                                    teacher_mix=teacher_mix, batch_sharding=self._batch_sharding)
    self.counts = {"sampled_tokens": 0, "teacher_tokens": 0}

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    """The step's batch on the mesh, from the host batch `batch` of data windows."""
    prompts = sharding_lib.shard_rows(np.asarray(batch["inputs"])[:, :self.config.prompt_len], self.mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
    generation = self._generate(state.params, teacher_params, prompts, None, key)
    samples = sampling.completion_batch(prompts, None, generation)
    samples["sample_logprobs"] = sampling.completion_log_probs(prompts, None, generation)
    samples, mask, from_teacher = jax.device_get((samples, generation.mask, generation.from_teacher))
    self.counts["sampled_tokens"] += int(mask.sum())
    self.counts["teacher_tokens"] += int(from_teacher.sum())
    parts = [samples]
    if self.data_rows:
      data = {k: np.asarray(batch[k]) for k in ("inputs", "targets", "mask")}
      parts.append(dict(data, sample_logprobs=np.zeros(data["mask"].shape, np.float32)))
    joined = {k: np.concatenate([part[k] for part in parts]) for k in samples}
    rows = len(mask)
    joined["row_kind"] = np.repeat(np.array([SAMPLE, DATA][:len(parts)], np.int32), rows)
    return sharding_lib.shard_batch(joined, self.mesh)


@dataclasses.dataclass(frozen=True)
class MiniLLMDistillation:
  """MiniLLM's loss: the reverse-KL policy gradient on sampled rows + λ·CE on data rows.

  L = (Σ surrogate over the sample rows' continuation tokens) / (their count)
      + pt_weight · (Σ CE over the data rows' tokens) / (their count),

  the surrogate `kdjax.losses.reverse_kl_policy_gradient`'s, importance-weighted by the batch's
  `sample_logprobs` (how each token was drawn, `MiniLLMBatches`). Rows are told apart by
  `row_kind`; a batch without it is all samples (e.g. `kdjax.distill.on_policy.OnPolicyBatches`
  with `student_fraction=1`), and a batch without `sample_logprobs` holds the student's own
  samples (weights 1). With the defaults (α = 0, no CE term) this is the on-policy strategy of
  before: the paper's method is `teacher_mix=0.2, pt_weight=1`.

  Metrics: `loss` (the value per step, count 1: its two means have different counts), `pg` (the
  surrogate), `kd` (the per-token reverse KL), `reward` (r_t), `importance_weight` (the weights
  used), all per sample continuation token; `ce` per data token (per sample token when the
  batch has no data rows); `teacher_agreement` over every kept token.

  Attributes:
    gamma: discount of future rewards.
    length_normalize: MiniLLM's normalisation of the future return by its length.
    temperature: T of both distributions in the surrogate.
    teacher_mix: α of the rollouts' mixture: the batch hook samples with it (the loss reads the
      sampler's log-probabilities from the batch).
    pt_weight: λ of the pre-training CE on the data rows.
    ratio_clip: truncation of the importance weights (>= 1), or None.
    importance: 'token' (the paper's per-token ratio) or 'sequence' (exact prefix products).
  """

  gamma: float = 1.0
  length_normalize: bool = True
  temperature: float = 1.0
  teacher_mix: float = 0.0
  pt_weight: float = 0.0
  ratio_clip: Optional[float] = None
  importance: str = "token"

  uses_teacher = True
  uses_head = False

  def __post_init__(self):
    if not 0.0 <= self.gamma <= 1.0:
      raise ValueError(f"MiniLLM's gamma must lie in [0, 1], got {self.gamma}")
    if not self.temperature > 0:
      raise ValueError(f"MiniLLM's temperature must be positive, got {self.temperature}")
    if not self.pt_weight >= 0:
      raise ValueError(f"MiniLLM's pt_weight must be >= 0, got {self.pt_weight}")
    policy.check_importance(self.teacher_mix, self.importance, self.ratio_clip)

  def __call__(self, student_out, teacher_out, batch, step):
    del step
    logits, teacher_logits, mask = strategies.logit_inputs(student_out, teacher_out, batch)
    self._check_batch(batch)
    kind = batch.get("row_kind")
    sample_rows = mask if kind is None else mask & (kind == SAMPLE)[:, None]
    # Without data rows the CE is still reported, on the samples, and stays out of the loss.
    ce_rows = sample_rows if kind is None else mask & (kind == DATA)[:, None]
    surrogate, parts = losses.reverse_kl_policy_gradient(
        logits, teacher_logits, batch["targets"], where=sample_rows, gamma=self.gamma,
        length_normalize=self.length_normalize, temperature=self.temperature,
        sample_log_probs=batch.get("sample_logprobs"), importance=self.importance, ratio_clip=self.ratio_clip)
    pg = losses.masked_sum_count(surrogate, sample_rows)
    ce = losses.masked_sum_count(losses.cross_entropy(logits, batch["targets"], where=ce_rows), ce_rows)
    loss = losses.safe_mean(*pg)
    if kind is not None:
      loss = loss + self.pt_weight * losses.safe_mean(*ce)
    metrics: strategies.Metrics = {
        "loss": (loss, jnp.ones((), jnp.float32)), "pg": pg, "ce": ce,
        "kd": losses.masked_sum_count(parts["single_step"], sample_rows),
        "reward": losses.masked_sum_count(parts["reward"], sample_rows),
        "importance_weight": losses.masked_sum_count(parts["weight"], sample_rows),
        "teacher_agreement": strategies.top1_match(logits, jnp.argmax(teacher_logits, -1), mask)}
    return loss, metrics

  def _check_batch(self, batch) -> None:
    """Fails on a batch that cannot carry what the configuration asks for (the keys are static)."""
    if self.teacher_mix > 0 and "sample_logprobs" not in batch:
      raise ValueError(f"teacher_mix={self.teacher_mix} needs the sampler's log-probabilities in the batch "
                       "('sample_logprobs', from MiniLLMBatches); this batch's tokens would be taken as the "
                       "student's own samples")
    if self.pt_weight > 0 and "row_kind" not in batch:
      raise ValueError(f"pt_weight={self.pt_weight} needs data rows marked by 'row_kind' (MiniLLMBatches)")


def minillm_strategy(cfg: dict, *, vocab_size, num_steps) -> MiniLLMDistillation:
  """`MiniLLMDistillation` from the `distill` section's keys: gamma, length_normalize, temperature
  (as before), teacher_mix, pt_weight, ratio_clip, importance (defaults: the on-policy strategy)."""
  del vocab_size, num_steps
  known = {f.name for f in dataclasses.fields(MiniLLMDistillation)}
  strategies._check_keys(cfg, known, "minillm")
  clip = cfg.get("ratio_clip")
  return MiniLLMDistillation(
      gamma=float(cfg.get("gamma", 1.0)), length_normalize=bool(cfg.get("length_normalize", True)),
      temperature=float(cfg.get("temperature", 1.0)), teacher_mix=float(cfg.get("teacher_mix", 0.0)),
      pt_weight=float(cfg.get("pt_weight", 0.0)), ratio_clip=None if clip is None else float(clip),
      importance=str(cfg.get("importance", "token")))
