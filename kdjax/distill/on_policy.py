"""On-policy and sequence-level batches: the student (or the teacher) writes the continuations.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models") trains the student on
its own samples, which the teacher then scores token by token: with probability λ a batch's
continuations are sampled from the current student, otherwise they are the data's. Sequence-level
KD (Kim & Rush 2016) is the same with the teacher writing them (`teacher_fraction`). Either way the
strategy is unchanged (GKD's is `LogitDistillation` with the generalized JSD(β) at α = 1); only
the batch differs, so this is a batch source for the loop, not a trainer:

    source = OnPolicyBatches(config, seq_len=L, student_graphdef=..., teacher_graphdef=..., mesh=...)
    batch = source(state, batch, teacher_params, step)      # inside `kdjax.train.loop.fit`

A window of the data, `L + 1` tokens, is split into a prompt (its first P tokens) and a
continuation. Data batches keep the data's continuation; sampled batches replace it with
`L − P + 1` tokens drawn from the model (`kdjax.models.sampling`, KV-cached, sharded like the
step), cut at EOS if the sampler has one. In both the loss covers the continuation only (the mask
is 0 on prompt targets), so the objectives of data and sampled batches are comparable.

Which source a step uses, and the sampling key, depend only on (seed, step): a resumed run makes
the same choices and draws the same samples as an uninterrupted one (given the same parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import config_args
from kdjax.models import sampling
from kdjax.train import sharding as sharding_lib

SOURCES = ("data", "student", "teacher")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
  """Where a batch's continuations come from and how they are sampled.

  Attributes:
    student_fraction: λ, the probability that a batch is the student's own samples (GKD).
    teacher_fraction: the probability that it is the teacher's samples (sequence-level KD).
    prompt_len: P, tokens of each window kept as the prompt.
    temperature, top_k, top_p: the sampler's (GKD samples at T ≈ 0.9 and scores at T = 1).
    seed: of the per-step choice and sampling keys.
  """

  student_fraction: float = 0.0
  teacher_fraction: float = 0.0
  prompt_len: int = 16
  temperature: float = 0.9
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    for name in ("student_fraction", "teacher_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
    if self.student_fraction + self.teacher_fraction > 1.0:
      raise ValueError(f"student_fraction + teacher_fraction must be at most 1, got "
                       f"{self.student_fraction} + {self.teacher_fraction}")
    if self.prompt_len < 1:
      raise ValueError(f"prompt_len must be at least 1, got {self.prompt_len}")

  @property
  def active(self) -> bool:
    return self.student_fraction > 0 or self.teacher_fraction > 0

  @classmethod
  def from_config(cls, config: Optional[ml_collections.ConfigDict]) -> "OnPolicyConfig":
    return config_args.from_section(cls, config, "on_policy")

  def source(self, step: int) -> str:
    """'data', 'student' or 'teacher' for this step (a function of (seed, step) only)."""
    u = np.random.default_rng([self.seed, step]).random()
    if u < self.student_fraction:
      return "student"
    return "teacher" if u < self.student_fraction + self.teacher_fraction else "data"


class OnPolicyBatches:
  """The loop's batch hook: `(state, batch, teacher_params, step) -> batch` (see the module docstring)."""

  def __init__(self, config: OnPolicyConfig, *, seq_len: int, student_graphdef, teacher_graphdef, mesh: Mesh,
               eos_id: Optional[int] = None):
    if not config.prompt_len < seq_len:
      raise ValueError(f"prompt_len {config.prompt_len} must be shorter than the window's {seq_len} inputs")
    self.config = config
    self.seq_len = seq_len
    sampler = sampling.SamplingConfig(max_new_tokens=seq_len - config.prompt_len + 1,
                                      temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                      eos_id=eos_id)
    self.mesh = mesh
    batch_sharding = sharding_lib.batch_sharding(mesh)
    self._batch_sharding = batch_sharding
    self._generate = {name: sampling.make_generate(graphdef, sampler, batch_sharding=batch_sharding)
                      for name, graphdef in (("student", student_graphdef), ("teacher", teacher_graphdef))
                      if graphdef is not None}
    self.counts = {name: 0 for name in SOURCES}

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    """The step's batch on the mesh, from the host batch `batch` of data windows."""
    source = self.config.source(step)
    if source == "teacher" and "teacher" not in self._generate:
      raise ValueError("teacher_fraction > 0 needs the teacher's graphdef")
    self.counts[source] += 1
    prompt_len = self.config.prompt_len
    if source == "data":
      # The prompt's own targets are not part of the objective (as for sampled batches).
      keep = (np.arange(self.seq_len) >= prompt_len - 1).astype(np.float32)
      return sharding_lib.shard_batch(dict(batch, mask=np.asarray(batch["mask"]) * keep), self.mesh)
    params = state.params if source == "student" else teacher_params
    # This process's rows, assembled into the global prompts (a multi-process run samples them all).
    prompts = sharding_lib.shard_rows(np.asarray(batch["inputs"])[:, :prompt_len], self.mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
    generation = self._generate[source](params, prompts, None, key)
    out = sampling.completion_batch(prompts, None, generation)
    # Pinned to the step's batch sharding whatever the batch ops propagated.
    return jax.device_put(out, self._batch_sharding)
