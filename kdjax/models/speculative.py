"""Speculative sampling with a draft model, and the acceptance metrics DistillSpec distils for.

    gen, stats = make_speculative_generate(target_gd, draft_gd, gamma=4, config=config)(
        target_params, draft_params, prompts, prompt_lengths, rng)
    stats.tokens_per_call  # kept tokens per target forward pass, at most gamma + 1

Speculative sampling (Leviathan et al. 2023, "Fast inference from Transformers via speculative
decoding"; Chen et al. 2023, "Accelerating large language model decoding with speculative
sampling"). Each round the cheap draft ``q`` proposes ``γ`` tokens ``y_1 .. y_γ`` one at a time;
the target ``p`` scores the row's last token and all proposals in ONE forward pass, giving
``p_1 .. p_{γ+1}``. Proposal ``y_i`` is accepted with probability ``min(1, p_i(y_i) / q_i(y_i))``
until the first rejection; at a rejection of ``y_i`` a token is drawn from the residual
``norm(max(0, p_i − q_i))``, and if all ``γ`` are accepted a bonus token is drawn from
``p_{γ+1}``. Every kept token is then distributed exactly as under the target alone:

    P(emit v) = q(v) · min(1, p(v) / q(v)) + (1 − Σ_u min(p(u), q(u))) · residual(v)
              = min(p(v), q(v)) + max(0, p(v) − q(v)) = p(v).

A round keeps between 1 and ``γ + 1`` tokens for one target call. The per-token acceptance
probability is ``α = Σ_v min(p_v, q_v) = 1 − TVD(p, q)``; if it were the same ``α`` at every
position, the expected number of tokens per target call would be ``(1 − α^{γ+1}) / (1 − α)``.
DistillSpec (Zhou et al. 2024, "DistillSpec: improving speculative decoding via knowledge
distillation") distils the draft toward the target to raise ``α`` and reports both numbers;
:func:`acceptance_rate` and :func:`expected_tokens_per_call` compute them.

Both distributions are the sampler's, ``softmax(top_p(top_k(z / T)))`` from
:func:`kdjax.models.sampling.sampling_log_probs`, for target and draft alike; greedy decoding is
the point mass at the argmax, so a draft token is accepted iff it is the target's argmax and the
output equals target-only greedy decoding.

Caches and positions
--------------------
Prompts are right-padded with per-row lengths as in :mod:`kdjax.models.sampling`, and every row
moves at its own pace: with ``n`` tokens kept, the row's last token sits at ``pos = L + n − 1``
and both caches hold the row's true tokens at positions ``0 .. pos − 1``. The target feeds
``[last, y_1 .. y_γ]`` at ``pos .. pos + γ``; after ``a`` acceptances the slots up to
``pos + a`` hold kept tokens and the rest are stale, which needs no rollback: a query attends
only to slots at or before its own position and every slot is rewritten before any later query
reaches it. The draft only produced ``y_γ`` and never fed it, which leaves a gap when all ``γ``
are accepted, so each round's first draft call feeds the last two tokens ``[s_{pos−1}, s_pos]``:
it fills that gap and otherwise rewrites a slot with what it already holds.

Proposals past ``max_new_tokens`` can never be kept, but a row near its end still feeds them.
Their positions are clipped to one scratch slot at the end of the cache, which no kept token's
query can see, so the caches hold ``P + N`` positions (one more than
:func:`~kdjax.models.sampling.generate`'s ``P + N − 1``) whatever ``γ`` is.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.models import sampling
from kdjax.models.decoder import DecoderLM, KVCache
from kdjax.models.sampling import Generation, SamplingConfig


# ----------------------------------------------------------------------------------------------
# Acceptance metrics.


def acceptance_rate(target_logits: jax.Array, draft_logits: jax.Array, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0,
                    where: Optional[jax.Array] = None) -> jax.Array:
  """Per-position acceptance probability ``α = Σ_v min(p_v, q_v) = 1 − TVD(p, q)``.

  ``p`` and ``q`` are the sampling distributions of the target and the draft,
  ``softmax(top_p(top_k(z / T)))`` with the same filters for both, so ``α`` is the probability
  that speculative sampling accepts a draft token at that position (Leviathan et al. 2023's
  ``β``, whose mean over positions is their ``α``; DistillSpec's evaluation metric). ``T = 0``
  is greedy decoding: ``α`` is 1 where the two argmaxes agree and 0 elsewhere. The sum of minima
  is computed directly rather than as ``1 − TVD`` so that small ``α`` keep their relative
  precision.

  Args:
    target_logits: ``[..., V]`` logits of the target ``p``.
    draft_logits: ``[..., V]`` logits of the draft ``q``.
    temperature: ``T >= 0``, applied to both.
    top_k: keep each model's ``k`` likeliest tokens; 0 keeps all.
    top_p: each model's nucleus mass; 1 keeps all.
    where: optional boolean ``[...]``; masked positions give 0 whatever their logits hold.

  Returns:
    float32 ``[...]`` in ``[0, 1]``; average it with the caller's mask for DistillSpec's
    ``E[α]``.
  """
  target_logits, draft_logits = jnp.asarray(target_logits), jnp.asarray(draft_logits)
  t, d = target_logits.shape, draft_logits.shape
  if t != d:
    raise ValueError(f"target logits {t} and draft logits {d} must have the same shape "
                     "(the same positions and vocabulary).")
  if where is not None and jnp.shape(where) != t[:-1]:
    raise ValueError(f"`where` has shape {jnp.shape(where)}, expected the position shape {t[:-1]}.")
  # max_new_tokens is irrelevant here; the config validates and carries the filters.
  config = SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p)
  if where is not None:
    # Garbage (NaN, all -inf) in masked rows must not reach the filters.
    keep = jnp.asarray(where)[..., None]
    target_logits = jnp.where(keep, target_logits, 0.0)
    draft_logits = jnp.where(keep, draft_logits, 0.0)
  p = jnp.exp(sampling.sampling_log_probs(target_logits, config))
  q = jnp.exp(sampling.sampling_log_probs(draft_logits, config))
  alpha = jnp.sum(jnp.minimum(p, q), axis=-1)
  return alpha if where is None else jnp.where(where, alpha, 0.0)


def expected_tokens_per_call(alpha, gamma: int):
  """Expected tokens per target call ``(1 − α^{γ+1}) / (1 − α)``; ``γ + 1`` in the limit ``α → 1``.

  Leviathan et al. 2023, the expected tokens per run of their Algorithm 1: with every draft token
  accepted independently with probability ``α``, a round keeps the accepted run (geometric,
  capped at ``γ``) plus one residual or bonus token. It is evaluated as the geometric sum
  ``Σ_{i=0}^{γ} α^i``, which equals the closed form, needs no special case at ``α = 1`` and has
  no cancellation near it.

  Args:
    alpha: acceptance rate(s) in ``[0, 1]``, any shape.
    gamma: number of draft tokens per round, an int ``>= 1``.

  Returns:
    float32 of ``alpha``'s shape, in ``[1, γ + 1]``.
  """
  _check_gamma(gamma)
  alpha = jnp.asarray(alpha, jnp.float32)
  return jnp.sum(alpha[..., None] ** jnp.arange(gamma + 1, dtype=jnp.float32), axis=-1)


def _check_gamma(gamma) -> None:
  if not sampling._is_int(gamma) or gamma < 1:
    raise ValueError(f"gamma (draft tokens per target call) must be an int >= 1, got {gamma!r}.")


# ----------------------------------------------------------------------------------------------
# One verification: the accept / reject step.


def accept_draft(key: jax.Array, target_log_probs: jax.Array, draft_log_probs: jax.Array,
                 draft_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Verifies ``γ`` draft tokens per row: speculative sampling's accept / reject step.

  Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2.

  Proposal ``y_i`` is accepted iff ``u_i < min(1, p_i(y_i) / q_i(y_i))`` with ``u_i ~ U[0, 1)``,
  and ``a`` is the length of the accepted run before the first rejection. The next token is
  drawn from ``norm(max(0, p_{a+1} − q_{a+1}))``: the residual at the rejected position, or, when
  ``a = γ``, ``p_{γ+1}`` itself (the residual against an empty draft, ``q_{γ+1} = 0``). If the
  residual has no mass, ``p_{a+1} = q_{a+1}`` and a rejection had probability 0; it then falls
  back to ``p_{a+1}`` so that rounding cannot produce an undefined draw. With point masses
  (greedy decoding) a proposal is accepted iff it is the target's argmax, and the next token is
  that argmax.

  Args:
    key: PRNG key for the uniforms and the residual draw.
    target_log_probs: ``[B, γ + 1, V]``: ``log p_i`` for the distributions of proposals
      ``1 .. γ`` and of the bonus token.
    draft_log_probs: ``[B, γ, V]``: ``log q_i`` that each proposal was drawn from.
    draft_tokens: int ``[B, γ]``: the proposals ``y_i ~ q_i``.

  Returns:
    ``(int32 accepted run a [B] in [0, γ], int32 next token [B])``; row ``b`` emits
    ``y_1 .. y_a`` followed by the next token, and each emitted token is distributed as ``p``.
  """
  batch, gamma = draft_tokens.shape
  if (target_log_probs.shape[:2] != (batch, gamma + 1)
      or draft_log_probs.shape[:2] != (batch, gamma)):
    raise ValueError(
        f"for {gamma} draft tokens per row expected target log-probs [{batch}, {gamma + 1}, V] and "
        f"draft log-probs [{batch}, {gamma}, V], got {target_log_probs.shape} and "
        f"{draft_log_probs.shape}.")
  u_key, next_key = jax.random.split(key)
  pick = lambda lp: jnp.take_along_axis(lp, draft_tokens[..., None], axis=-1)[..., 0]  # noqa: E731
  # min(1, p/q) in log space: p = 0 gives exp(-inf) = 0, never a 0/0.
  ratio = jnp.exp(jnp.minimum(pick(target_log_probs[:, :gamma]) - pick(draft_log_probs), 0.0))
  accepted = jax.random.uniform(u_key, (batch, gamma)) < ratio
  run = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)

  at_run = lambda x: jnp.take_along_axis(x, run[:, None, None], axis=1)[:, 0]  # noqa: E731
  p = jnp.exp(at_run(target_log_probs))
  no_draft = jnp.full_like(draft_log_probs[:, :1], -jnp.inf)
  q = jnp.exp(at_run(jnp.concatenate([draft_log_probs, no_draft], axis=1)))
  residual = jnp.maximum(p - q, 0.0)
  has_mass = jnp.any(residual > 0, axis=-1, keepdims=True)
  log_next = jnp.log(jnp.where(has_mass, residual, p))
  next_token = jax.random.categorical(next_key, log_next, axis=-1).astype(jnp.int32)
  return run, next_token


# ----------------------------------------------------------------------------------------------
# Generation.


class SpeculativeStats(NamedTuple):
  """What the target's calls achieved, per row.

  Attributes:
    calls: int32 ``[B]``: target calls (verification rounds) while the row was generating.
    accepted: int32 ``[B, N]``: ``accepted[b, c]`` is the number of draft tokens that call ``c``
      of row ``b`` accepted and kept (a proposal past EOS or ``max_new_tokens`` does not count);
      0 for ``c >= calls[b]``.
    kept: int32 ``[B]``: tokens kept per row, ``mask.sum(1)`` of the generation.
  """

  calls: jax.Array
  accepted: jax.Array
  kept: jax.Array

  @property
  def tokens_per_call(self) -> jax.Array:
    """Measured tokens per target call over the batch, ``Σ kept / Σ calls``, in ``[1, γ + 1]``."""
    return jnp.sum(self.kept) / jnp.maximum(jnp.sum(self.calls), 1)


class _RoundState(NamedTuple):
  round: jax.Array  # number of target calls so far; round r draws with fold_in(rng, r)
  target_cache: tuple[KVCache, ...]
  draft_cache: tuple[KVCache, ...]
  count: jax.Array  # [B] tokens kept
  last: jax.Array  # [B] the row's last token, at position length + count - 1
  before_last: jax.Array  # [B] the token before it
  done: jax.Array  # [B] EOS emitted or N tokens kept
  tokens: jax.Array  # [B, N]
  logprobs: jax.Array  # [B, N]
  calls: jax.Array  # [B]
  accepted: jax.Array  # [B, N]


def speculative_generate(target_graphdef: nnx.GraphDef, target_params: Any,
                         draft_graphdef: nnx.GraphDef, draft_params: Any, prompts: jax.Array,
                         prompt_lengths: Optional[jax.Array], rng: jax.Array, *, gamma: int,
                         config: SamplingConfig) -> tuple[Generation, SpeculativeStats]:
  """Samples up to ``config.max_new_tokens`` tokens per prompt from the target, ``γ`` per draft.

  Pure and traceable (jit it, or use :func:`make_speculative_generate`); all shapes depend on
  ``(B, P, N, γ)`` only. See the module docstring for the algorithm and the cache layout. The
  kept tokens are distributed exactly as :func:`~kdjax.models.sampling.generate`'s with the same
  config, and equal them in greedy mode, but the random streams differ: round ``r`` draws with
  ``fold_in(rng, r)``.

  Args:
    target_graphdef: the target :class:`~kdjax.models.decoder.DecoderLM`'s structure.
    target_params: its state.
    draft_graphdef: the draft's structure; same vocabulary as the target.
    draft_params: its state.
    prompts: int ``[B, P]``, right-padded.
    prompt_lengths: int ``[B]`` in ``[1, P]`` (clipped into it), or None for full rows.
    rng: a PRNG key.
    gamma: draft tokens proposed per target call, ``>= 1``.
    config: the sampler, applied identically to both models.

  Returns:
    ``(Generation, SpeculativeStats)``; ``Generation.logprobs`` are the target's
    log-probabilities of the kept tokens (0 in greedy mode), as
    :func:`~kdjax.models.sampling.generate` reports them.

  Raises:
    ValueError: on ``gamma < 1``, a vocabulary mismatch, bad prompt shapes or ids, or
      ``P + N > max_len`` of either model.
  """
  _check_gamma(gamma)
  target, draft = nnx.merge(target_graphdef, target_params), nnx.merge(draft_graphdef, draft_params)
  if target.config.vocab_size != draft.config.vocab_size:
    raise ValueError(
        f"vocab mismatch: the draft has {draft.config.vocab_size} ids, the target "
        f"{target.config.vocab_size}; speculative sampling compares their distributions id by id.")
  batch, width = _check_prompts(prompts, target, draft, config)
  lengths = sampling._lengths(prompt_lengths, batch, width)
  n = config.max_new_tokens
  scratch = width + n - 1  # the last cache slot; see "Caches and positions"
  clip = lambda positions: jnp.minimum(positions, scratch)  # noqa: E731

  prompt_positions = jnp.broadcast_to(jnp.arange(width), prompts.shape)
  # The prefill only fills the caches: the first round re-feeds each row's last prompt token.
  _, target_cache = target.cached_features(prompts, target.init_cache(batch, width + n),
                                           prompt_positions)
  _, draft_cache = draft.cached_features(prompts, draft.init_cache(batch, width + n),
                                         prompt_positions)
  take = lambda column: jnp.take_along_axis(prompts, column[:, None], axis=1)[:, 0]  # noqa: E731
  state = _RoundState(
      round=jnp.zeros((), jnp.int32), target_cache=target_cache, draft_cache=draft_cache,
      count=jnp.zeros((batch,), jnp.int32), last=take(lengths - 1).astype(jnp.int32),
      before_last=take(jnp.maximum(lengths - 2, 0)).astype(jnp.int32),
      done=jnp.zeros((batch,), bool),
      tokens=jnp.full((batch, n), config.pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, n), jnp.float32),
      calls=jnp.zeros((batch,), jnp.int32), accepted=jnp.zeros((batch, n), jnp.int32))

  def one_round(s: _RoundState) -> _RoundState:
    draft_key, accept_key = jax.random.split(jax.random.fold_in(rng, s.round))
    position = lengths + s.count - 1
    draft_tokens, draft_lp, draft_cache = _propose(
        draft, s.draft_cache, s.before_last, s.last, position, draft_key, gamma=gamma,
        config=config, clip=clip)
    fed = jnp.concatenate([s.last[:, None], draft_tokens], axis=1)  # [B, γ + 1]
    logits, target_cache = target.decode_step(
        fed, s.target_cache, clip(position[:, None] + jnp.arange(gamma + 1)))
    target_lp = sampling.sampling_log_probs(logits, config)
    run, next_token = accept_draft(accept_key, target_lp, draft_lp, draft_tokens)

    live = ~s.done
    proposals = jnp.concatenate([draft_tokens, next_token[:, None]], axis=1)
    emitted = jnp.where(jnp.arange(gamma + 1) < run[:, None], proposals, next_token[:, None])
    kept, hit_eos = _kept(emitted, run, s.count, live, config)
    emitted_lp = jnp.take_along_axis(target_lp, emitted[..., None], axis=-1)[..., 0]
    return s._replace(
        round=s.round + 1, target_cache=target_cache, draft_cache=draft_cache,
        count=s.count + kept, last=next_token,
        before_last=jnp.take_along_axis(fed, run[:, None], axis=1)[:, 0],
        done=s.done | hit_eos | (s.count + kept >= n),
        tokens=_write(s.tokens, emitted, s.count, kept),
        logprobs=_write(s.logprobs, emitted_lp, s.count, kept),
        calls=s.calls + live,
        accepted=_write(s.accepted, jnp.minimum(run, kept)[:, None], s.calls, live))

  # Every round keeps at least one token per live row, so this ends within N rounds.
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), one_round, state)
  mask = jnp.arange(n) < state.count[:, None]
  return (Generation(state.tokens, state.logprobs, mask),
          SpeculativeStats(state.calls, state.accepted, state.count))


def _propose(draft: DecoderLM, cache, before_last, last, position, key, *, gamma: int,
             config: SamplingConfig, clip):
  """The draft's ``γ`` proposals ``[B, γ]``, their ``log q [B, γ, V]`` and the updated cache."""
  keys = jax.random.split(key, gamma)

  def draw(key, logits):
    log_q = sampling.sampling_log_probs(logits, config)
    return jax.random.categorical(key, log_q, axis=-1).astype(jnp.int32), log_q

  # Two tokens: the one before `last` was never fed to the draft if the previous round accepted
  # all of its proposals (see the module docstring); otherwise this rewrites an unchanged slot.
  logits, cache = draft.decode_step(
      jnp.stack([before_last, last], axis=1), cache,
      clip(jnp.stack([jnp.maximum(position - 1, 0), position], axis=1)))
  first, first_lp = draw(keys[0], logits[:, 1])

  def step(carry, key):
    cache, token, position = carry
    logits, cache = draft.decode_step(token[:, None], cache, clip(position)[:, None])
    token, log_q = draw(key, logits[:, 0])
    return (cache, token, position + 1), (token, log_q)

  (cache, _, _), (rest, rest_lp) = jax.lax.scan(step, (cache, first, position + 1), keys[1:])
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  log_q = jnp.concatenate([first_lp[:, None], rest_lp.swapaxes(0, 1)], axis=1)
  return tokens, log_q, cache


def _kept(emitted, run, count, live, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """How many of a round's ``run + 1`` emitted tokens a row keeps, and whether one was EOS."""
  kept = jnp.minimum(run + 1, config.max_new_tokens - count)
  kept = jnp.where(live, kept, 0)
  if config.eos_id is None:
    return kept, jnp.zeros_like(live)
  eos = (emitted == config.eos_id) & (jnp.arange(emitted.shape[1]) < kept[:, None])
  hit = jnp.any(eos, axis=1)
  return jnp.where(hit, jnp.argmax(eos, axis=1) + 1, kept), hit


def _write(buffer: jax.Array, values: jax.Array, start: jax.Array, count: jax.Array) -> jax.Array:
  """``buffer[b, start[b] + j] = values[b, j]`` for ``j < count[b]``; other writes are dropped."""
  j = jnp.arange(values.shape[1])
  columns = jnp.where(j < count[:, None], start[:, None] + j, buffer.shape[1])
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, columns].set(values.astype(buffer.dtype), mode="drop")


def _check_prompts(prompts, target: DecoderLM, draft: DecoderLM,
                   config: SamplingConfig) -> tuple[int, int]:
  for model in (target, draft):
    batch, width = sampling._check_prompts(prompts, model.config, config)
    if width + config.max_new_tokens > model.config.max_len:
      raise ValueError(
          f"prompt width {width} + max_new_tokens {config.max_new_tokens} needs "
          f"{width + config.max_new_tokens} cache positions for speculative decoding (one scratch "
          f"slot for proposals past the end), more than a model's max_len {model.config.max_len}.")
  return batch, width


def make_speculative_generate(target_graphdef: nnx.GraphDef, draft_graphdef: nnx.GraphDef, *,
                              gamma: int, config: SamplingConfig):
  """Jits :func:`speculative_generate` for one pair of model structures, ``γ`` and sampler.

  Prompt lengths given as host data (NumPy or a list) are checked against ``[1, P]`` before the
  call; device arrays are trusted (and clipped).

  Returns:
    ``fn(target_params, draft_params, prompts, prompt_lengths, rng) -> (Generation,
    SpeculativeStats)``; ``prompt_lengths`` may be None.
  """
  _check_gamma(gamma)

  @jax.jit
  def jitted(target_params, draft_params, prompts, prompt_lengths, rng):
    return speculative_generate(target_graphdef, target_params, draft_graphdef, draft_params,
                                prompts, prompt_lengths, rng, gamma=gamma, config=config)

  def run(target_params, draft_params, prompts, prompt_lengths, rng):
    if prompt_lengths is not None and not isinstance(prompt_lengths, jax.Array):
      sampling.check_prompt_lengths(prompt_lengths, np.shape(prompts)[1])
    return jitted(target_params, draft_params, prompts, prompt_lengths, rng)

  return run


# ----------------------------------------------------------------------------------------------
# Wall clock.


class SpeedupTiming(NamedTuple):
  """Seconds per call as ``(min, median)`` over repetitions, and their ratio.

  Attributes:
    speculative_s: speculative generation.
    target_s: target-only :func:`~kdjax.models.sampling.generate` on the same prompts.
    speedup: ``median(target_s) / median(speculative_s)``.
    tokens_per_call: measured tokens per target call of the speculative run.
  """

  speculative_s: tuple[float, float]
  target_s: tuple[float, float]
  speedup: float
  tokens_per_call: float


def benchmark_speedup(target_graphdef: nnx.GraphDef, target_params: Any,
                      draft_graphdef: nnx.GraphDef, draft_params: Any, prompts, prompt_lengths,
                      rng: jax.Array, *, gamma: int, config: SamplingConfig,
                      repeats: int = 5) -> SpeedupTiming:
  """Times speculative against target-only generation in this process, after one warm-up each.

  The two are timed alternately, so that drift in the machine's speed hits both alike. With a
  sampling config and an ``eos_id`` the two runs can stop at different lengths; greedy decoding
  or ``eos_id=None`` makes them do the same work. Compilation is excluded.

  Args:
    target_graphdef, target_params, draft_graphdef, draft_params, prompts, prompt_lengths, rng,
    gamma, config: as for :func:`speculative_generate` (the target-only run uses the target
      and the config alone).
    repeats: timed calls of each.

  Returns:
    A :class:`SpeedupTiming`.
  """
  if not sampling._is_int(repeats) or repeats < 1:
    raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
  speculative = make_speculative_generate(target_graphdef, draft_graphdef, gamma=gamma,
                                          config=config)
  plain = sampling.make_generate(target_graphdef, config)
  run_speculative = lambda: speculative(  # noqa: E731
      target_params, draft_params, prompts, prompt_lengths, rng)
  run_plain = lambda: plain(target_params, prompts, prompt_lengths, rng)  # noqa: E731
  _, stats = jax.block_until_ready(run_speculative())
  jax.block_until_ready(run_plain())

  def seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  times = [(seconds(run_speculative), seconds(run_plain)) for _ in range(repeats)]
  spec, base = ([t[i] for t in times] for i in (0, 1))
  spec_median, base_median = statistics.median(spec), statistics.median(base)
  return SpeedupTiming((min(spec), spec_median), (min(base), base_median),
                       base_median / spec_median, float(stats.tokens_per_call))
