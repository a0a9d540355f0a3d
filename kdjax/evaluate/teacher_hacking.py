"""Teacher hacking: watch the proxy the student optimises next to the metric that matters.

Tiapkin et al. (2025, "On Teacher Hacking in Language Model Distillation") show that a student
can keep getting closer to an imperfect teacher while getting worse on the true distribution.
The monitor measures, on fixed batches each time it is called,

  * the proxy: forward KL(p_teacher ‖ q_student) per token on training windows (the distance the
    distillation objective shrinks, whatever divergence the strategy uses), and
  * the golden metric: cross-entropy per token on held-out data (perplexity = exp of it),

and keeps their history. Over-optimisation shows as the proxy still falling while the golden
metric rises; `hacking_onset` names the first measurement where that happened.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import jax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.train import sharding as sharding_lib


class TeacherHackingMonitor:
  """`(state, step) -> {'proxy_kl_train', 'golden_ce_val'}`, with a history.

  Args:
    student_forward, teacher_forward: `(params, batch) -> {'logits'}`.
    teacher_params: the teacher's (the monitor needs it also for students trained without one).
    train_batches: host batches of training windows (the proxy's).
    eval_batches: host batches of held-out windows (the golden metric's).
    mesh: where the batches go.
  """

  def __init__(self, *, student_forward: Callable, teacher_forward: Callable, teacher_params: Any,
               train_batches: Iterable[dict], eval_batches: Iterable[dict], mesh: Mesh):
    self._teacher_params = teacher_params
    self._train = [sharding_lib.shard_batch(b, mesh) for b in train_batches]
    self._eval = [sharding_lib.shard_batch(b, mesh) for b in eval_batches]

    @jax.jit
    def sums(params, teacher_params, batch):
      mask = batch["mask"] > 0
      logits = student_forward(params, batch)["logits"]
      kl = losses.forward_kl(logits, teacher_forward(teacher_params, batch)["logits"], where=mask)
      ce = losses.cross_entropy(logits, batch["targets"], where=mask)
      return losses.masked_sum_count(kl, mask), losses.masked_sum_count(ce, mask)

    self._sums = sums
    self.history: list[dict[str, float]] = []

  def _mean(self, batches, index, params, teacher_params) -> float:
    pairs = [self._sums(params, teacher_params, b)[index] for b in batches]
    return float(sum(s for s, _ in pairs)) / max(float(sum(c for _, c in pairs)), 1.0)

  def __call__(self, state, step: int) -> dict[str, float]:
    values = {"proxy_kl_train": self._mean(self._train, 0, state.params, self._teacher_params),
              "golden_ce_val": self._mean(self._eval, 1, state.params, self._teacher_params)}
    self.history.append(dict(values, step=step))
    return values

  def hacking_onset(self) -> Optional[int]:
    """The first step at which the proxy fell while the golden metric rose, or None."""
    for before, after in zip(self.history, self.history[1:]):
      if after["proxy_kl_train"] < before["proxy_kl_train"] and after["golden_ce_val"] > before["golden_ce_val"]:
        return int(after["step"])
    return None

  def summary(self) -> dict[str, Any]:
    best = min(self.history, key=lambda h: h["golden_ce_val"]) if self.history else None
    return {"history": self.history, "hacking_onset": self.hacking_onset(),
            "best_golden_step": None if best is None else int(best["step"]),
            "best_golden_ce_val": math.nan if best is None else best["golden_ce_val"]}
