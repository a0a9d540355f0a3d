"""DDK: re-weight the training mixture over domains by the student–teacher gap on each.

Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models"
(arXiv 2407.16154, NeurIPS 2024). The loss stays the usual CE + γ·KL(p_T ‖ q_S) (the paper's
γ = 0.2, T = 1); what changes is which text a batch holds. Every K steps the student's and the
teacher's cross-entropy are measured on a held-out set of each domain i, their perplexities
ℓ_S[i] = exp(CE_S[i]) and ℓ_T[i] = exp(CE_T[i]) give the discrepancy g[i] = ℓ_S[i] / ℓ_T[i] (≥ 1
where the student lags), and the domain sampling probabilities r follow the paper's
"factor smooth updating" (Eq. 2):

    ψ[i]    = r_t[i] · exp(g[i] / τ)
    r_t+1   = (1 − u) · ψ / Σ_j ψ[j] + u / N          (the paper: τ = 1, u = 1 − α = 0.5)

so r keeps the history of past gaps (the factor r_t in ψ) and never falls below the floor u / N.
Starting from the uniform r, the first update (at step 0) is the paper's Eq. 1,
r_0 = softmax(g / τ), plus that floor (Eq. 1 has none: a random-init student's ratios, tens
apart, would put every row in one domain). `smoothing` s adds a plain interpolation with the old
weights on top, r ← s·r_t + (1 − s)·r_t+1; s = 0 (the default) is the paper, s = 1 freezes r.

Domains here are the genres of Shakespeare's works (`kdjax.data.shakespeare.GENRES`). Each
domain's held-out set is the last `holdout_fraction` of every one of its works (so every work is
represented), cut from the training split and never trained on.

Batches (`DDKBatches`, the loop's batch hook) ignore the data iterator's windows: each of the B
rows picks a domain with probability r and a window of L + 1 tokens at a uniformly random offset
in that domain's training part. The paper samples without replacement and restarts a domain once
it is exhausted; drawing with replacement from (seed, step) instead makes a resumed run draw
exactly what an unbroken one does without checkpointing any position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import config_args, losses
from kdjax.data import lm_pipeline, shakespeare, text_sources
from kdjax.train import sharding as sharding_lib
from kdjax.train import step as step_lib


class DomainMixture:
  """Per-domain token arrays: a training part and a held-out tail (DDK's validation set).

  Attributes:
    names: the domains, in a fixed order (the order of every weight vector).
    train: per domain, the 1-D training ids (its works' heads, concatenated in corpus order).
    heldout: per domain, the 1-D held-out ids (its works' tails, concatenated in corpus order).
  """

  def __init__(self, names: Sequence[str], train: Sequence[np.ndarray], heldout: Sequence[np.ndarray]):
    if not len(names) == len(train) == len(heldout) or not names:
      raise ValueError(f"need one training and one held-out array per domain; got {len(names)} names, "
                       f"{len(train)} training and {len(heldout)} held-out arrays")
    if len(set(names)) != len(names):
      raise ValueError(f"domain names must be unique; got {list(names)}")
    self.names = tuple(names)
    self.train = tuple(np.asarray(t) for t in train)
    self.heldout = tuple(np.asarray(h) for h in heldout)
    for name, part in zip(self.names, self.train + self.heldout):
      if part.ndim != 1 or not np.issubdtype(part.dtype, np.integer):
        raise ValueError(f"domain {name!r}: tokens must be a 1-D integer array; got {part.dtype} {part.shape}")

  @classmethod
  def from_works(cls, works: Sequence[tuple[str, np.ndarray]], *, domain_of: Mapping[str, str] = shakespeare.GENRES,
                 holdout_fraction: float = 0.05, domains: Optional[Sequence[str]] = None) -> "DomainMixture":
    """Groups `(title, ids)` works by `domain_of[title]`, holding out the last
    ⌈holdout_fraction · len⌉ ids of every work.

    Args:
      works: e.g. `kdjax.data.text_sources.load_split_works(...)`.
      domain_of: title -> domain (default: the Shakespeare genres).
      holdout_fraction: the share of each work held out, in (0, 1).
      domains: the domains to keep, in this order; None keeps every domain of `works`, sorted.

    Raises:
      ValueError: for a fraction outside (0, 1), a work without a domain, an unknown domain in
        `domains`, or a work too short to split.
    """
    if not 0.0 < holdout_fraction < 1.0:
      raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction!r}")
    missing = [title for title, _ in works if title not in domain_of]
    if missing:
      raise ValueError(f"works without a domain: {missing}")
    present = sorted({domain_of[title] for title, _ in works})
    if domains is None:
      domains = present
    unknown = [d for d in domains if d not in present]
    if unknown:
      raise ValueError(f"unknown domains {unknown}; the works have {present}")
    train, heldout = {d: [] for d in domains}, {d: [] for d in domains}
    for title, ids in works:
      domain = domain_of[title]
      if domain not in train:
        continue
      ids = np.asarray(ids)
      held = math.ceil(holdout_fraction * len(ids))
      if held >= len(ids):
        raise ValueError(f"work {title!r} has {len(ids)} ids: too few to hold out {holdout_fraction:g} of them")
      train[domain].append(ids[:len(ids) - held])
      heldout[domain].append(ids[len(ids) - held:])
    return cls(list(domains), [np.concatenate(train[d]) for d in domains],
               [np.concatenate(heldout[d]) for d in domains])

  @classmethod
  def load(cls, name: str, split: str, *, data_dir: str, holdout_fraction: float = 0.05,
           domains: Optional[Sequence[str]] = None) -> "DomainMixture":
    """`from_works` on a split of `kdjax_shakespeare` (genres as domains)."""
    works = text_sources.load_split_works(name, split, data_dir=data_dir, genres=domains)
    return cls.from_works(works, holdout_fraction=holdout_fraction, domains=domains)

  @property
  def num_domains(self) -> int:
    return len(self.names)

  def train_tokens(self) -> np.ndarray:
    """Every domain's training part, concatenated: a baseline's corpus without the held-out tails."""
    return np.concatenate(self.train)

  def sizes(self) -> dict[str, tuple[int, int]]:
    """domain -> (training ids, held-out ids)."""
    return {n: (len(t), len(h)) for n, t, h in zip(self.names, self.train, self.heldout)}


def discrepancy(student_loss, teacher_loss) -> np.ndarray:
  """DDK's per-domain gap g = ℓ_S / ℓ_T = exp(CE_S − CE_T): the ratio of the perplexities."""
  return np.exp(np.asarray(student_loss, np.float64) - np.asarray(teacher_loss, np.float64))


def ddk_update(weights, student_loss, teacher_loss, *, smoothing: float = 0.0, temperature: float = 1.0,
               uniform_mix: float = 0.5) -> np.ndarray:
  """One DDK update of the domain sampling probabilities (module docstring, the paper's Eq. 2).

      r' = s · r + (1 − s) · [(1 − u) · softmax(log r + g / τ) + u / N],   g = exp(CE_S − CE_T)

  Args:
    weights: r, the current probabilities `[N]` (non-negative, summing to 1).
    student_loss, teacher_loss: per-domain mean cross-entropy `[N]` (nats per token) on the
      held-out sets.
    smoothing: s in [0, 1], the weight kept on the old r (0: the paper; 1: r unchanged).
    temperature: τ > 0 dividing the gaps (1: the paper; large τ ignores them).
    uniform_mix: u in [0, 1], the share mixed with the uniform distribution: every weight
      stays ≥ u / N (the paper's 1 − α = 0.5).

  Returns:
    The new probabilities, float64 `[N]`, summing to 1.

  Raises:
    ValueError: on mismatched shapes, weights that are not a distribution, non-finite losses or
      settings out of range.
  """
  r = np.asarray(weights, np.float64)
  student_loss, teacher_loss = np.asarray(student_loss, np.float64), np.asarray(teacher_loss, np.float64)
  if r.ndim != 1 or student_loss.shape != r.shape or teacher_loss.shape != r.shape:
    raise ValueError(f"weights, student_loss and teacher_loss must have one shape [N]; got {r.shape}, "
                     f"{student_loss.shape}, {teacher_loss.shape}")
  if np.any(r < 0) or not math.isclose(r.sum(), 1.0, abs_tol=1e-6):
    raise ValueError(f"weights must be non-negative and sum to 1; got {r.tolist()}")
  if not (np.all(np.isfinite(student_loss)) and np.all(np.isfinite(teacher_loss))):
    raise ValueError(f"losses must be finite; got student {student_loss.tolist()}, teacher {teacher_loss.tolist()}")
  _check_unit("smoothing", smoothing)
  _check_unit("uniform_mix", uniform_mix)
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}")
  with np.errstate(divide="ignore"):  # a zero weight stays zero: log 0 = −inf
    logits = np.log(r) + discrepancy(student_loss, teacher_loss) / temperature
  target = np.exp(logits - logits.max())
  target = (1.0 - uniform_mix) * target / target.sum() + uniform_mix / len(r)
  return smoothing * r + (1.0 - smoothing) * target


def _check_unit(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class DDKConfig:
  """The `ddk` config section.

  Attributes:
    update_every: K, steps between updates of the weights (the first at step 0). The paper uses
      K = 1000 of ~30k steps and finds 50 too jumpy.
    smoothing: s, the weight kept on the old probabilities (`ddk_update`; 0 is the paper).
    temperature: τ dividing the perplexity ratios before the softmax (1 is the paper).
    uniform_mix: u, the share of the uniform distribution; every weight stays ≥ u / N (0.5 is
      the paper's α = 0.5).
    eval_batches: held-out batches per domain for each measurement (0: the whole tail).
    holdout_fraction: the share of every work held out as its domain's validation set (used by
      the experiment when it builds the `DomainMixture`).
    seed: of the rows' domains and offsets (one per student seed).
  """

  update_every: int = 50
  smoothing: float = 0.0
  temperature: float = 1.0
  uniform_mix: float = 0.5
  eval_batches: int = 8
  holdout_fraction: float = 0.05
  seed: int = 0

  def __post_init__(self):
    if self.update_every < 1:
      raise ValueError(f"update_every must be at least 1, got {self.update_every!r}")
    _check_unit("smoothing", self.smoothing)
    _check_unit("uniform_mix", self.uniform_mix)
    if not self.temperature > 0:
      raise ValueError(f"temperature must be positive, got {self.temperature!r}")
    if self.eval_batches < 0:
      raise ValueError(f"eval_batches must be non-negative, got {self.eval_batches!r}")
    if not 0.0 < self.holdout_fraction < 1.0:
      raise ValueError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction!r}")

  @classmethod
  def from_config(cls, config: Optional[ml_collections.ConfigDict]) -> "DDKConfig":
    return config_args.from_section(cls, config, "ddk")


def _ce_sums(graphdef):
  """A jitted `(params, batch) -> (Σ CE, count)` over the batch's unmasked targets."""
  forward = step_lib.lm_forward(graphdef)

  @jax.jit
  def sums(params, batch):
    mask = batch["mask"] > 0
    ce = losses.cross_entropy(forward(params, batch)["logits"], batch["targets"], where=mask)
    return losses.masked_sum_count(ce, mask)

  return sums


def _heldout_batches(mixture: DomainMixture, *, seq_len: int, batch_size: int, mesh: Mesh,
                     max_batches: Optional[int]) -> list[list[dict]]:
  """Per domain, its held-out tail as evaluation batches on the mesh (every target once, padding masked)."""
  return [[sharding_lib.shard_batch(b, mesh) for b in lm_pipeline.eval_batches(
      held, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)] for held in mixture.heldout]


def _mean_losses(sums, params, heldout: list[list[dict]]) -> np.ndarray:
  """Mean CE per domain (nats per token) over its held-out batches."""
  out = []
  for batches in heldout:
    pairs = [sums(params, b) for b in batches]
    out.append(float(sum(s for s, _ in pairs)) / max(float(sum(c for _, c in pairs)), 1.0))
  return np.asarray(out)


def domain_losses(graphdef, params, mixture: DomainMixture, *, seq_len: int, batch_size: int, mesh: Mesh,
                  max_batches: Optional[int] = None) -> dict[str, float]:
  """A model's mean CE (nats per token) on each domain's held-out tail: DDK's measurement, for
  reporting any model (the teacher, a CE-only or a DDK student) per domain."""
  heldout = _heldout_batches(mixture, seq_len=seq_len, batch_size=batch_size, mesh=mesh, max_batches=max_batches)
  return dict(zip(mixture.names, _mean_losses(_ce_sums(graphdef), params, heldout).tolist()))


class DDKBatches:
  """The loop's batch hook `(state, host_batch, teacher_params, step) -> device batch` for DDK.

  Every `update_every` steps it measures the student (`state.params`) and the teacher on each
  domain's held-out tail and updates `weights` with `ddk_update`; every step it returns B rows
  drawn by `draw(step)`, with `domain` (int32 `[B]`, an index into `mixture.names`) beside
  `inputs`, `targets` and `mask`.

  Attributes:
    weights: the current domain probabilities, float64 `[N]` (uniform before the first update).
    history: one entry per update: step, weights, gaps g, student and teacher CE per domain.
    counts: rows drawn per domain in this process's run (logged by the experiment).

  Args:
    config: the `ddk` settings.
    mixture: the domains' training parts and held-out tails.
    seq_len: L, inputs per row.
    batch_size: B, rows per batch on this process (also the rows of each held-out batch).
    student_graphdef, teacher_graphdef: of the models (`kdjax.train.step.lm_forward` runs them).
    mesh: where batches go.

  Raises:
    ValueError: if a domain's training part holds no window of L + 1 ids or its tail no target.
  """

  def __init__(self, config: DDKConfig, mixture: DomainMixture, *, seq_len: int, batch_size: int,
               student_graphdef, teacher_graphdef, mesh: Mesh):
    for name, train, held in zip(mixture.names, mixture.train, mixture.heldout):
      if len(train) < seq_len + 1:
        raise ValueError(f"domain {name!r} has {len(train)} training ids: fewer than one window of {seq_len + 1}")
      if len(held) < 2:
        raise ValueError(f"domain {name!r} has {len(held)} held-out ids: no target to measure")
    self.config, self.mixture, self.mesh = config, mixture, mesh
    self.seq_len, self.batch_size = seq_len, batch_size
    self._last_start = np.array([len(t) - seq_len - 1 for t in mixture.train])
    self._heldout = _heldout_batches(mixture, seq_len=seq_len, batch_size=batch_size, mesh=mesh,
                                     max_batches=config.eval_batches or None)
    self._student_sums, self._teacher_sums = _ce_sums(student_graphdef), _ce_sums(teacher_graphdef)
    self._teacher_loss: Optional[np.ndarray] = None  # the teacher is frozen: measured once per process
    self.weights = np.full(mixture.num_domains, 1.0 / mixture.num_domains)
    self.history: list[dict[str, Any]] = []
    self.counts = {name: 0 for name in mixture.names}

  def get_state(self) -> dict:
    return {"weights": self.weights.tolist(), "history": self.history}

  def set_state(self, state: dict) -> None:
    weights = np.asarray(state["weights"], np.float64)
    if weights.shape != self.weights.shape:
      raise ValueError(f"a checkpoint of {weights.size} domain weights cannot resume {self.weights.size} domains")
    self.weights, self.history = weights, [dict(h) for h in state["history"]]

  def update(self, params, teacher_params, step: int) -> None:
    """Measures both models on the held-out tails and moves the weights (DDK's interval update)."""
    if self._teacher_loss is None:
      self._teacher_loss = _mean_losses(self._teacher_sums, teacher_params, self._heldout)
    student_loss = _mean_losses(self._student_sums, params, self._heldout)
    c = self.config
    self.weights = ddk_update(self.weights, student_loss, self._teacher_loss, smoothing=c.smoothing,
                              temperature=c.temperature, uniform_mix=c.uniform_mix)
    self.history.append({"step": int(step), "weights": self.weights.tolist(),
                         "gap": discrepancy(student_loss, self._teacher_loss).tolist(),
                         "student_ce": student_loss.tolist(), "teacher_ce": self._teacher_loss.tolist()})

  def draw(self, step: int) -> dict[str, np.ndarray]:
    """The host batch of `step` under the current weights (a function of (seed, step, weights))."""
    rng = np.random.default_rng([self.config.seed, step, jax.process_index()])
    domain = rng.choice(self.mixture.num_domains, size=self.batch_size, p=self.weights)
    start = rng.integers(0, self._last_start[domain] + 1)
    span = np.arange(self.seq_len + 1)
    rows = np.stack([self.mixture.train[d][s + span] for d, s in zip(domain, start)]).astype(np.int32)
    return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:]),
            "mask": np.ones((self.batch_size, self.seq_len), np.float32), "domain": domain.astype(np.int32)}

  def __call__(self, state, batch: dict, teacher_params: Any, step: int) -> dict:
    """The step's batch on the mesh; the iterator's host `batch` is not used."""
    del batch
    if step % self.config.update_every == 0:
      self.update(state.params, teacher_params, step)
    host = self.draw(step)
    for d, n in zip(*np.unique(host["domain"], return_counts=True)):
      self.counts[self.mixture.names[d]] += int(n)
    return sharding_lib.shard_batch(host, self.mesh)
