"""DistiLLM's adaptive off-policy batches and DistiLLM-2's contrastive objective.

DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models")
trains with the skew KL / skew reverse KL (`kdjax.losses.skew_kl`, `skew_reverse_kl`, α = 0.1) on
a mixture of data and student-generated outputs (SGO), drawn adaptively:

  * each step draws u ~ U(0, 1); if u < θ the batch is SGO, else data;
  * an SGO batch is fresh samples of the current student (then pushed into a FIFO replay buffer
    of `buffer_size` sequences), or, with probability `reuse_fraction` once the buffer holds a
    batch, a batch drawn from that buffer: generation is the expensive part, and reused samples
    are only slightly off-policy;
  * θ starts at 0 and grows by `threshold_step` (up to `max_threshold`) whenever the validation
    loss, measured every `eval_every` steps, rose by at least `loss_eps` since the previous
    measurement: student samples are used more once training on the data alone stops helping.

DistiLLM-2 (Ko et al. 2025, "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs")
pairs, for the same prompts, a teacher response and a student response in one batch and
trains with (2 − β)·SKL on the teacher's text plus β·SRKL on the student's, the student's term of
the SRKL mixture detached (`DistiLLM2Distillation`).

Both batch sources are hooks of `kdjax.train.loop.fit` (`prepare_batch`), like
`kdjax.distill.on_policy.OnPolicyBatches`, whose sampler they use; the choices depend on
(seed, step) only, and the adaptive source's state (θ, the last validation loss, the buffer)
is checkpointed with the data iterator (`get_state` / `set_state`), so a resumed run continues
exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.distill import strategies
from kdjax.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from kdjax.losses import common
from kdjax.train import sharding as sharding_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveOffPolicyConfig:
  """DistiLLM's schedule of student-generated outputs (module docstring); defaults are the paper's."""

  buffer_size: int = 1000
  reuse_fraction: float = 0.5
  threshold_step: float = 0.1
  max_threshold: float = 1.0
  loss_eps: float = 0.1
  eval_every: int = 100
  eval_batches: int = 8

  def __post_init__(self):
    if min(self.buffer_size, self.eval_every, self.eval_batches) < 1:
      raise ValueError(f"buffer_size, eval_every and eval_batches must be positive, got {self.buffer_size}, "
                       f"{self.eval_every}, {self.eval_batches}")
    for name in ("reuse_fraction", "threshold_step", "max_threshold"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")


class AdaptiveOffPolicyBatches:
  """DistiLLM's batch hook: data, fresh student samples or replayed ones, by the adaptive θ.

  Args:
    config: the schedule.
    sampling: prompt length, sampler settings and seed (`OnPolicyConfig`; its fractions are unused).
    seq_len, student_graphdef, mesh: as for `OnPolicyBatches`.
    validation_loss: `(params, teacher_params) -> float`, the loss θ is driven by.
  """

  def __init__(self, config: AdaptiveOffPolicyConfig, sampling: OnPolicyConfig, *, seq_len: int, student_graphdef,
               mesh, validation_loss: Callable[[Any, Any], float]):
    self.config = config
    self.seed = sampling.seed
    self._sampler = OnPolicyBatches(dataclasses.replace(sampling, student_fraction=1.0, teacher_fraction=0.0),
                                    seq_len=seq_len, student_graphdef=student_graphdef, teacher_graphdef=None,
                                    mesh=mesh)
    self._data = OnPolicyBatches(dataclasses.replace(sampling, student_fraction=0.0, teacher_fraction=0.0),
                                 seq_len=seq_len, student_graphdef=None, teacher_graphdef=None, mesh=mesh)
    self.mesh = mesh
    self._validation_loss = validation_loss
    self.threshold, self.last_loss = 0.0, None
    self._buffer: dict[str, np.ndarray] = {}
    self.counts = {"data": 0, "student": 0, "replay": 0}

  def get_state(self) -> dict:
    return {"threshold": self.threshold, "last_loss": self.last_loss,
            "buffer": {k: v.tolist() for k, v in self._buffer.items()}}

  def set_state(self, state: dict) -> None:
    self.threshold, self.last_loss = float(state["threshold"]), state["last_loss"]
    self._buffer = {k: np.asarray(v, np.int32 if k != "mask" else np.float32) for k, v in state["buffer"].items()}

  def _update_threshold(self, state, teacher_params) -> None:
    loss = float(self._validation_loss(state.params, teacher_params))
    if self.last_loss is not None and loss - self.last_loss >= self.config.loss_eps:
      self.threshold = min(self.threshold + self.config.threshold_step, self.config.max_threshold)
    self.last_loss = loss

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    if step % self.config.eval_every == 0:
      self._update_threshold(state, teacher_params)
    rng = np.random.default_rng([self.seed, step, 1])
    rows = len(batch["inputs"])
    if rng.random() >= self.threshold:
      self.counts["data"] += 1
      return self._data(state, batch, teacher_params, step)
    held = len(self._buffer.get("inputs", ()))
    if held >= rows and rng.random() < self.config.reuse_fraction:
      self.counts["replay"] += 1
      pick = rng.choice(held, rows, replace=False)
      return sharding_lib.shard_batch({k: v[pick] for k, v in self._buffer.items()}, self.mesh)
    self.counts["student"] += 1
    fresh = self._sampler(state, batch, teacher_params, step)
    host = jax.device_get(fresh)
    # FIFO: the newest `buffer_size` sequences.
    self._buffer = {k: np.concatenate([self._buffer[k], host[k]])[-self.config.buffer_size:] if self._buffer
                    else np.asarray(host[k])[-self.config.buffer_size:] for k in host}
    return fresh


class ContrastiveBatches:
  """DistiLLM-2's batch hook: for the same prompts, the teacher's and the student's continuations.

  The batch has 2B rows: rows [0, B) the teacher's text, rows [B, 2B) the student's, and
  `is_student` float32 `[2B]` saying which. Both are sampled with the same key schedule.
  """

  def __init__(self, sampling: OnPolicyConfig, *, seq_len: int, student_graphdef, teacher_graphdef, mesh):
    self._source = {name: OnPolicyBatches(dataclasses.replace(sampling, student_fraction=float(name == "student"),
                                                              teacher_fraction=float(name == "teacher")),
                                          seq_len=seq_len, student_graphdef=student_graphdef,
                                          teacher_graphdef=teacher_graphdef, mesh=mesh)
                    for name in ("teacher", "student")}
    self.mesh = mesh
    self.counts = {"paired": 0}

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    self.counts["paired"] += 1
    parts = [jax.device_get(self._source[name](state, batch, teacher_params, step)) for name in ("teacher", "student")]
    rows = len(parts[0]["inputs"])
    joined = {k: np.concatenate([parts[0][k], parts[1][k]]) for k in parts[0]}
    joined["is_student"] = np.repeat(np.array([0.0, 1.0], np.float32), rows)
    return sharding_lib.shard_batch(joined, self.mesh)


def _detached_skew_reverse_kl(student_logits, teacher_logits, *, alpha, temperature, where):
  """KL(q ‖ (1 − α)p + α·sg(q)): DistiLLM-2's SRKL, the mixture's student term a constant."""
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  log_mix = common.log_mixture(jax.lax.stop_gradient(log_q), log_p, alpha)
  return common.finish(common.kl_from_log_probs(log_q, log_mix), where)


@dataclasses.dataclass(frozen=True)
class DistiLLM2Distillation:
  """(2 − β)·SKL(teacher text) + β·SRKL(student text), per kept token (DistiLLM-2).

  The batch comes from `ContrastiveBatches`. SKL = KL(p ‖ αp + (1 − α)q) on the teacher's rows,
  SRKL = KL(q ‖ (1 − α)p + α·sg(q)) on the student's; the loss is their weighted sum over all
  kept tokens divided by the kept-token count. `kd` is that weighted sum; `skl` and `srkl` are
  reported per token of their own rows.

  Attributes:
    alpha: the skew α (0.1 in the paper).
    beta: the weight β of the student-text term, in [0, 2].
    temperature: T.
  """

  alpha: float = 0.1
  beta: float = 1.0
  temperature: float = 1.0

  uses_teacher = True
  uses_head = False

  def __call__(self, student_out, teacher_out, batch, step):
    del step
    logits, teacher_logits, mask = strategies.logit_inputs(student_out, teacher_out, batch)
    student_rows = (batch["is_student"] > 0)[:, None] & mask
    teacher_rows = ~(batch["is_student"] > 0)[:, None] & mask
    skl = losses.skew_kl(logits, teacher_logits, alpha=self.alpha, temperature=self.temperature, where=teacher_rows)
    srkl = _detached_skew_reverse_kl(logits, teacher_logits, alpha=self.alpha, temperature=self.temperature,
                                     where=student_rows)
    skl_sum, skl_count = losses.masked_sum_count(skl, teacher_rows)
    srkl_sum, srkl_count = losses.masked_sum_count(srkl, student_rows)
    total = (2.0 - self.beta) * skl_sum + self.beta * srkl_sum
    count = skl_count + srkl_count
    ce = losses.cross_entropy(logits, batch["targets"], where=teacher_rows)
    metrics = {"loss": (total, count), "kd": (total, count), "skl": (skl_sum, skl_count),
               "srkl": (srkl_sum, srkl_count), "ce": losses.masked_sum_count(ce, teacher_rows),
               "teacher_agreement": strategies.top1_match(logits, jnp.argmax(teacher_logits, -1), mask)}
    return losses.safe_mean(total, count), metrics
