"""MGSR: multi-granularity semantic revision (Liu et al. 2024, arXiv 2407.10068).

"Multi-Granularity Semantic Revision for Large Language Model Distillation" revises the
distillation signal at three levels; the overall objective is L_SFT + L_DAC-KL + L_span on
batches whose continuations SCRG has revised. Here:

  * sequence level, SCRG (sequence correction and re-generation): `RevisedRolloutBatches`, a
    batch hook of `kdjax.train.loop.fit` like `kdjax.distill.on_policy.OnPolicyBatches`. The
    student writes a continuation; the teacher scores it; at the position where teacher and
    student disagree most (their "semantic cognitive difference", a per-token divergence, taken
    among the positions whose student token is not the teacher's) the token is replaced by the
    teacher's, and the student re-generates everything after it. One correction per row (the
    paper's default frequency; more corrections gained little there).
  * token level, DAC-KL, and span level, correlation consistency: `MGSRDistillation`, with the
    losses in `kdjax.losses.semantic_revision` and DAC-KL's clipping sub-network trained with the
    student (`init_params` / `params=`, see `kdjax.train.state.TrainState.strategy_params`).

Which source a step uses and every sampling key depend only on (seed, step), so a resumed run
draws exactly what an unbroken one does (given the same parameters).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kdjax import config_args, losses
from kdjax.distill import schedules, strategies
from kdjax.losses import semantic_revision as revision_losses
from kdjax.models import sampling
from kdjax.train import sharding as sharding_lib

Array = jax.Array

SOURCES = ("data", "revised")
DIFFERENCES = ("forward_kl", "teacher_nll")
DETECTIONS = ("argmax", "threshold")
CORRECTIONS = ("argmax", "sample")


# ----------------------------------------------------------------------------------------------
# Sequence level: SCRG.


@dataclasses.dataclass(frozen=True)
class RevisionConfig:
  """SCRG's batches: how often, how the error token is found and how it is corrected.

  Attributes:
    revision_fraction: the probability that a batch is a revised student rollout (else the
      data's continuation), like GKD's λ.
    prompt_len: P, tokens of each data window kept as the prompt.
    temperature, top_k, top_p: the student's sampler, for the rollout and the re-generation.
    difference: the per-token "semantic cognitive difference" d_t: 'forward_kl' is
      KL(p_teacher ‖ q_student) of the next-token distributions (needs one student forward pass
      besides the teacher's), 'teacher_nll' is −log p_teacher(y_t) of the student's token.
    detect: 'argmax' revises the candidate with the largest d_t (the paper's reading), 'threshold'
      the first candidate with d_t > threshold. Candidates are the valid continuation positions
      whose student token differs from the teacher's; a row without one is left as sampled.
    threshold: d_t's threshold (nats) of the 'threshold' detection.
    correction: the teacher's token: its 'argmax', or a 'sample' at the sampler's temperature /
      top-k / top-p.
    seed: of the per-step choice and keys.
  """

  revision_fraction: float = 0.5
  prompt_len: int = 16
  temperature: float = 0.9
  top_k: int = 0
  top_p: float = 1.0
  difference: str = "forward_kl"
  detect: str = "argmax"
  threshold: float = 1.0
  correction: str = "argmax"
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.revision_fraction <= 1.0:
      raise ValueError(f"revision_fraction must lie in [0, 1], got {self.revision_fraction!r}")
    if self.prompt_len < 1:
      raise ValueError(f"prompt_len must be at least 1, got {self.prompt_len}")
    for name, known in (("difference", DIFFERENCES), ("detect", DETECTIONS), ("correction", CORRECTIONS)):
      if getattr(self, name) not in known:
        raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {list(known)}")
    if not np.isfinite(self.threshold) or self.threshold < 0:
      raise ValueError(f"threshold must be finite and >= 0, got {self.threshold!r}")
    self.sampler(1)  # a bad temperature / top-k / top-p fails now

  @classmethod
  def from_config(cls, config: Optional[ml_collections.ConfigDict]) -> "RevisionConfig":
    return config_args.from_section(cls, config, "revision")

  def source(self, step: int) -> str:
    """'data' or 'revised' for this step (a function of (seed, step) only)."""
    return "revised" if np.random.default_rng([self.seed, step]).random() < self.revision_fraction else "data"

  def sampler(self, max_new_tokens: int, eos_id: Optional[int] = None, *, greedy: bool = False):
    return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, greedy=greedy, eos_id=eos_id)


def error_positions(difference: Array, candidates: Array, *, detect: str = "argmax", threshold: float = 0.0) -> Array:
  """Per row, the position SCRG corrects: int32 `[B]`, −1 where the row has none.

  Args:
    difference: `[B, L]` the per-token teacher–student difference d_t.
    candidates: boolean `[B, L]`, the positions that may be corrected.
    detect: 'argmax' (the candidate with the largest d_t; the first of ties) or 'threshold'
      (the first candidate with d_t > threshold).
    threshold: of the 'threshold' detection.
  """
  if detect not in DETECTIONS:
    raise ValueError(f"unknown detect {detect!r}; known: {list(DETECTIONS)}")
  if jnp.shape(difference) != jnp.shape(candidates) or jnp.ndim(difference) != 2:
    raise ValueError(f"difference {jnp.shape(difference)} and candidates {jnp.shape(candidates)} must both be [B, L]")
  if detect == "threshold":
    candidates = candidates & (difference > threshold)
    position = jnp.argmax(candidates, axis=-1)  # the first True
  else:
    position = jnp.argmax(jnp.where(candidates, difference, -jnp.inf), axis=-1)
  return jnp.where(jnp.any(candidates, axis=-1), position, -1).astype(jnp.int32)


def revise_rollouts(student_graphdef, regen_graphdef, teacher_graphdef, student_params, teacher_params,
                    prompts: Array, key: Array, *, config: RevisionConfig, seq_len: int, eos_id: Optional[int],
                    cache_sharding=None) -> dict[str, Array]:
  """SCRG on a batch of prompts (pure; jit it): rollout, detection, correction, re-generation.

  With L = seq_len and P = prompt width, `key` splits into (rollout, correction, re-generation)
  keys. The student samples N = L − P + 1 tokens after each prompt (`sampling.generate`), forming
  the window s = [prompt, y] of L + 1 tokens whose targets are s[1:] (`sampling.completion_batch`).
  One teacher forward pass over its inputs gives, at each target position t, the teacher's token
  ŷ_t and d_t; `error_positions` picks t* among the valid positions with y_t ≠ ŷ_t. The revised
  prefix is s[: t* + 1] followed by ŷ_{t*} (t* + 2 tokens), and one more sampling pass continues
  every row from its own prefix (right-padded prompts with per-row lengths); the rows then hold
  the student's rollout unchanged before t*, the teacher's token at t*, and the student's new
  continuation after it. A row without a candidate keeps its rollout. The mask covers the whole
  continuation (prompt targets are 0), so the teacher scores every token in the step.

  `regen_graphdef` is the student's structure with a max_len that admits the re-generation's
  cache of L + (L − P) − 1 positions (prefixes of up to L tokens, then up to L − P new ones);
  a RoPE decoder's max_len bounds only its cache and input length.

  Returns:
    `{'inputs', 'targets', 'mask'}` `[B, L]` (the training batch), `'position'` int32 `[B]` (t*,
    −1 where unrevised) and `'rollout_targets'` `[B, L]` (the targets before revision).
  """
  batch, width = prompts.shape
  if not width < seq_len:
    raise ValueError(f"prompt width {width} must be shorter than the window's {seq_len} inputs")
  regen_tokens = seq_len - width
  rollout_key, correction_key, regen_key = jax.random.split(key, 3)
  rollout = sampling.generate(student_graphdef, student_params, prompts, rollout_key,
                              config=config.sampler(seq_len - width + 1, eos_id), cache_sharding=cache_sharding)
  first = sampling.completion_batch(prompts, None, rollout)
  valid = first["mask"] > 0
  teacher_logits = nnx.merge(teacher_graphdef, teacher_params)(first["inputs"])
  if config.difference == "forward_kl":
    student_logits = nnx.merge(student_graphdef, student_params)(first["inputs"])
    difference = losses.forward_kl(student_logits, teacher_logits, where=valid)
  else:
    difference = losses.cross_entropy(teacher_logits, first["targets"], where=valid)
  teacher_tokens, _ = sampling.sample(correction_key, teacher_logits,
                                      config.sampler(1, greedy=config.correction == "argmax"))
  position = error_positions(difference, valid & (teacher_tokens != first["targets"]), detect=config.detect,
                             threshold=config.threshold)
  revised = position >= 0
  index = jnp.arange(seq_len + 1)[None]
  sequence = jnp.concatenate([first["inputs"][:, :1], first["targets"]], axis=1)  # s, [B, L + 1]
  fix = jnp.take_along_axis(teacher_tokens, jnp.maximum(position, 0)[:, None], axis=1)
  sequence = jnp.where(revised[:, None] & (index == position[:, None] + 1), fix, sequence)
  kept = jnp.where(revised, position + 2, seq_len + 1)[:, None]  # tokens of s kept from the revised prefix
  regen = sampling.generate(regen_graphdef, student_params, sequence[:, :seq_len], regen_key,
                            config=config.sampler(regen_tokens, eos_id),
                            prompt_lengths=jnp.minimum(kept[:, 0], seq_len), cache_sharding=cache_sharding)
  column = index - kept  # where s[t] falls in the re-generation
  fresh = column >= 0
  take = lambda x: jnp.take_along_axis(x, jnp.clip(column, 0, regen_tokens - 1), axis=1)  # noqa: E731
  tokens = jnp.where(fresh, take(regen.tokens), sequence)
  # Target t is s[t + 1]: valid as sampled before the cut, as re-generated after it, and nothing
  # follows a correction that is itself the end of the sequence.
  stopped = (fix == eos_id) if eos_id is not None else jnp.zeros_like(fix, bool)
  sampled_valid = jnp.concatenate([jnp.zeros((batch, 1), bool), valid], axis=1)  # per token of s
  mask = jnp.where(fresh, take(regen.mask) & ~stopped, sampled_valid)
  tokens = jnp.where(fresh & ~mask, 0, tokens)  # the sampler's pad_id after the end
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask[:, 1:].astype(jnp.float32),
          "position": position, "rollout_targets": first["targets"]}


def _widened(graphdef, params, max_len: int):
  """The model structure of `graphdef` with max_len at least `max_len` (RoPE: only checks change)."""
  model = nnx.merge(graphdef, params)
  if model.config.max_len >= max_len:
    return graphdef
  model.config = dataclasses.replace(model.config, max_len=max_len)
  return nnx.split(model, nnx.Param)[0]


class RevisedRolloutBatches:
  """The loop's batch hook `(state, batch, teacher_params, step) -> batch` for SCRG (module docstring).

  With probability `revision_fraction` a step's batch is `revise_rollouts` of the data windows'
  first P tokens, else the data with the prompt's targets masked out (so the objectives of both
  kinds cover continuations only). `counts` holds the batches of each source and the rows
  corrected; `last_revision` the latest revised batch's `position` and `rollout_targets` (device
  arrays, for inspection).
  """

  def __init__(self, config: RevisionConfig, *, seq_len: int, student_graphdef, teacher_graphdef, mesh: Mesh,
               eos_id: Optional[int] = None):
    if not config.prompt_len < seq_len:
      raise ValueError(f"prompt_len {config.prompt_len} must be shorter than the window's {seq_len} inputs")
    if teacher_graphdef is None:
      raise ValueError("SCRG needs the teacher's graphdef: the teacher finds and corrects the error tokens")
    self.config = config
    self.seq_len = seq_len
    self.mesh = mesh
    self.eos_id = eos_id
    self._graphdefs = (student_graphdef, teacher_graphdef)
    self._batch_sharding = sharding_lib.batch_sharding(mesh)
    self._revise = None  # built at the first revised batch, when the student's params exist
    self.counts = {"data": 0, "revised": 0, "corrected_rows": 0}
    self.last_revision: Optional[dict] = None

  def _build(self, student_params):
    student, teacher = self._graphdefs
    regen = _widened(student, student_params, 2 * self.seq_len - self.config.prompt_len - 1)
    fn = functools.partial(revise_rollouts, student, regen, teacher, config=self.config, seq_len=self.seq_len,
                           eos_id=self.eos_id, cache_sharding=self._batch_sharding)
    return jax.jit(fn, in_shardings=(None, None, self._batch_sharding, None), out_shardings=self._batch_sharding)

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    """The step's batch on the mesh, from the host batch `batch` of data windows."""
    source = self.config.source(step)
    self.counts[source] += 1
    prompt_len = self.config.prompt_len
    if source == "data":
      keep = (np.arange(self.seq_len) >= prompt_len - 1).astype(np.float32)
      return sharding_lib.shard_batch(dict(batch, mask=np.asarray(batch["mask"]) * keep), self.mesh)
    if self._revise is None:
      self._revise = self._build(state.params)
    prompts = sharding_lib.shard_rows(np.asarray(batch["inputs"])[:, :prompt_len], self.mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
    out = self._revise(state.params, teacher_params, prompts, key)
    self.last_revision = {"position": out.pop("position"), "rollout_targets": out.pop("rollout_targets")}
    self.counts["corrected_rows"] += int(jnp.sum(self.last_revision["position"] >= 0))
    return out


# ----------------------------------------------------------------------------------------------
# Token and span levels: the strategy.


def _check_clip_network(inputs: int, hidden: int, init_lower: float, init_upper: float) -> None:
  if not 0.0 <= init_lower < init_upper <= 1.0:
    raise ValueError(f"the clip bounds need 0 <= init_lower < init_upper <= 1, got {init_lower}, {init_upper}")
  if inputs < 1 or hidden < 1:
    raise ValueError(f"the clip network needs positive input and hidden sizes, got {inputs}, {hidden}")


def init_clip_network(key: Array, *, inputs: int, hidden: int, init_lower: float, init_upper: float) -> dict:
  """DAC-KL's sub-network: `inputs` → `hidden` (GELU) → 3 logits, float32.

  The three logits are a softmax split of the teacher's sorted mass into head, kept band and
  tail, so the lower quantile a = head and the upper b = head + band satisfy 0 ≤ a ≤ b ≤ 1 by
  construction. The output bias starts at log(a₀, b₀ − a₀, 1 − b₀) (each at least 1e-6) and the
  output kernel near zero (std 0.01/√hidden), so every position starts at the bounds (a₀, b₀)
  while every parameter already has a gradient.
  """
  _check_clip_network(inputs, hidden, init_lower, init_upper)
  k_hidden, k_out = jax.random.split(key)
  shares = np.maximum([init_lower, init_upper - init_lower, 1.0 - init_upper], 1e-6)
  return {
      "hidden": {"kernel": jax.random.normal(k_hidden, (inputs, hidden), jnp.float32) * inputs**-0.5,
                 "bias": jnp.zeros((hidden,), jnp.float32)},
      "out": {"kernel": jax.random.normal(k_out, (hidden, 3), jnp.float32) * (0.01 * hidden**-0.5),
              "bias": jnp.asarray(np.log(shares), jnp.float32)},
  }


def clip_bounds(params: dict, profile: Array) -> tuple[Array, Array]:
  """(lower, upper) quantiles `[...]` predicted from the teacher's profile `[..., inputs]`."""
  h = jax.nn.gelu(profile @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  shares = jax.nn.softmax(h @ params["out"]["kernel"] + params["out"]["bias"], axis=-1)
  return shares[..., 0], shares[..., 0] + shares[..., 1]


@dataclasses.dataclass(frozen=True)
class MGSRDistillation:
  """(1 − α)·CE + α·(DAC-KL + μ·(1 − kept mass) + λ_span·span), MGSR's token and span levels.

  Per kept position, the sub-network (`init_clip_network`) reads the teacher's profile
  (`kdjax.losses.semantic_revision.teacher_profile`: its top-k sorted probabilities and the rest)
  and predicts the quantile band [a, b] of the teacher's sorted mass that DAC-KL keeps
  (`kdjax.losses.semantic_revision.dac_kl`). Trained on DAC-KL alone the sub-network has a
  trivial optimum: a band so narrow that both clipped distributions are one class and the KL is
  0. The term μ·(1 − (b − a)), the teacher mass clipped away, prices that: a class is cut only
  where the clipped KL falls by more than μ times the mass given up, so μ sets how much of the
  teacher may be called redundant (a linear price rather than a hard minimum keeps a gradient at
  every band). The span term is `span_correlation` over the words of `batch['targets']`
  (`span_ids`), averaged over in-span pairs. The paper's objective is SFT + DAC-KL + span with
  unit weights, i.e. α = 0.5 here up to a factor 2.

  Attributes:
    kd_weight: α as a schedule (a float is a constant).
    temperature: T of DAC-KL, the profile and the span term, as a schedule.
    span_weight: λ_span (0 skips the span term).
    span_measure: 'hadamard' (the paper's), 'inner' or 'cosine'.
    span_max_distance: the largest distance paired within a span (1: adjacent positions).
    clip_inputs: k of the profile (the sub-network has k + 1 inputs).
    clip_hidden: the sub-network's hidden width.
    clip_init_lower, clip_init_upper: the bounds every position starts at.
    mass_penalty: μ.
    label_smoothing: of the hard-label term.
  """

  kd_weight: Any = 0.5
  temperature: Any = 1.0
  span_weight: float = 1.0
  span_measure: str = "hadamard"
  span_max_distance: int = 1
  clip_inputs: int = 16
  clip_hidden: int = 32
  clip_init_lower: float = 0.0
  clip_init_upper: float = 0.95
  mass_penalty: float = 1.0
  label_smoothing: float = 0.0

  uses_teacher = True
  uses_head = False

  def __post_init__(self):
    if self.span_measure not in revision_losses.CORRELATIONS:
      raise ValueError(f"unknown span_measure {self.span_measure!r}; known: {sorted(revision_losses.CORRELATIONS)}")
    if not self.span_max_distance >= 1:
      raise ValueError(f"span_max_distance must be at least 1, got {self.span_max_distance}")
    for name in ("span_weight", "mass_penalty"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
    _check_clip_network(self.clip_inputs, self.clip_hidden, self.clip_init_lower, self.clip_init_upper)

  def init_params(self, key: Array) -> dict:
    return init_clip_network(key, inputs=self.clip_inputs + 1, hidden=self.clip_hidden,
                             init_lower=self.clip_init_lower, init_upper=self.clip_init_upper)

  def __call__(self, student_out, teacher_out, batch, step, *, params):
    logits, teacher_logits, mask = strategies.logit_inputs(student_out, teacher_out, batch)
    ce = losses.cross_entropy(logits, batch["targets"], where=mask, label_smoothing=self.label_smoothing)
    metrics = {"accuracy": strategies.top1_match(logits, batch["targets"], mask),
               "teacher_agreement": strategies.top1_match(logits, jnp.argmax(teacher_logits, -1), mask)}
    t = strategies._as_schedule(self.temperature)(step)
    profile = revision_losses.teacher_profile(teacher_logits, k=self.clip_inputs, temperature=t, where=mask)
    lower, upper = clip_bounds(params, profile)
    divergence = revision_losses.dac_kl(logits, teacher_logits, lower=lower, upper=upper, temperature=t, where=mask)
    discarded = jnp.where(mask, 1.0 - (upper - lower), 0.0)
    loss, metrics = strategies._objective(ce, lambda _: divergence + self.mass_penalty * discarded, mask, step,
                                          self.kd_weight, self.temperature, metrics)
    metrics.update(kd=losses.masked_sum_count(divergence, mask), clip_lower=losses.masked_sum_count(lower, mask),
                   clip_upper=losses.masked_sum_count(upper, mask),
                   discarded_mass=losses.masked_sum_count(discarded, mask))
    if self.span_weight:
      spans = revision_losses.span_ids(batch["targets"], where=mask)
      sums, counts = revision_losses.span_correlation(logits, teacher_logits, spans, measure=self.span_measure,
                                                      max_distance=self.span_max_distance, temperature=t)
      span_sum, pairs = jnp.sum(sums), jnp.sum(counts)
      extra = strategies._as_schedule(self.kd_weight)(step) * self.span_weight * losses.safe_mean(span_sum, pairs)
      total, count = metrics["loss"]
      metrics.update(span=(span_sum, pairs), loss=(total + extra * count, count))
      loss = loss + extra
    return loss, metrics


def mgsr_strategy(cfg: dict, *, vocab_size, num_steps) -> MGSRDistillation:
  """`MGSRDistillation` from the mgsr method's keys (any other raises, naming the known ones).

  Keys: kd_weight, temperature (numbers or schedule configs, `kdjax.distill.schedules`),
  label_smoothing, span_weight, span_measure, span_max_distance, clip_inputs, clip_hidden,
  clip_init_lower, clip_init_upper, mass_penalty (see the class's attributes).
  """
  del num_steps
  known = {f.name for f in dataclasses.fields(MGSRDistillation)}
  strategies._check_keys(cfg, known, "mgsr")
  k = int(cfg.get("clip_inputs", 16))
  if vocab_size is not None and not 1 <= k <= vocab_size:
    raise ValueError(f"clip_inputs must lie in [1, {vocab_size}] (the vocabulary), got {k}")
  scalars = {name: float(cfg[name]) for name in ("span_weight", "clip_init_lower", "clip_init_upper", "mass_penalty",
                                                 "label_smoothing") if name in cfg}
  sizes = {name: int(cfg[name]) for name in ("span_max_distance", "clip_hidden") if name in cfg}
  return MGSRDistillation(kd_weight=schedules.make_schedule(cfg.get("kd_weight", 0.5)),
                          temperature=schedules.make_schedule(cfg.get("temperature", 1.0)),
                          span_measure=cfg.get("span_measure", "hadamard"), clip_inputs=k, **scalars, **sizes)
