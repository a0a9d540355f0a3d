"""Autoregressive sampling from a :class:`~kdjax.models.decoder.DecoderLM` through a KV cache.

    config = SamplingConfig(max_new_tokens=64, temperature=0.8, top_p=0.95, eos_id=eos)
    gen = make_generate(graphdef, config)(params, prompts, prompt_lengths, rng)
    batch = completion_batch(prompts, prompt_lengths, gen)  # {'inputs', 'targets', 'mask'}

Prompts are right-padded with per-row lengths: row ``b``'s prompt is
``prompts[b, :prompt_lengths[b]]``, whatever follows it is ignored, and its completion starts at
position ``prompt_lengths[b]``. Prompt and completion therefore form one contiguous sequence from
position 0, which is what the training call ``model(inputs)`` sees: a teacher scoring
:func:`completion_batch` needs no padding mask and uses the positions the sampler used.

:func:`generate` is one traceable function: a prefill writes the whole prompt block into a cache
of ``P + N - 1`` positions (the last sampled token is never fed back), then a ``lax.while_loop``
feeds one token per row and step until every row has ``N`` tokens or has emitted EOS. All shapes
depend on ``(B, P, N)`` only, so calls with equal shapes compile once. A query attends to the cache
slots at or before its own position; those hold the row's prompt and the tokens it sampled, and the
prompt's padding is overwritten by the completion before any query can reach it, so the causal
mask is also the padding mask.

Each token is drawn from ``softmax(top_p(top_k(z / T)))`` with the key
``fold_in(rng, step)``; :func:`sample` returns its log-probability under that distribution, the
quantity on-policy distillation and speculative decoding need.

:func:`generate_mixture` decodes a student and a teacher in lockstep, each through its own cache,
and draws every token from the mixture ``α·π_teacher + (1 − α)·π_student`` of their filtered
distributions (MiniLLM's teacher-mixed sampling, :func:`mixture_sample`); its log-probabilities
are the mixture's, the denominator of MiniLLM's importance weights.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Sharding

from kdjax.losses.common import log_mixture
from kdjax.models.decoder import DecoderLM, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How completions are drawn. Hashable: it is a static argument of the jitted sampler.

  Attributes:
    max_new_tokens: ``N``, the most tokens generated per row and the width of every output.
    temperature: ``T >= 0``; ``T = 0`` means greedy decoding.
    top_k: keep the ``k`` most likely tokens; 0 keeps all.
    top_p: nucleus mass ``p`` in ``(0, 1]``; 1 keeps all.
    greedy: argmax decoding whatever the temperature.
    eos_id: a row stops after emitting this id, which still counts as a valid token; ``None``
      never stops early.
    pad_id: the id written where a row has stopped.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: Optional[int] = None
  pad_id: int = 0

  def __post_init__(self):
    if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
    if not np.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be finite and >= 0 (0 is greedy), got {self.temperature!r}.")
    _check_top_k(self.top_k)
    _check_top_p(self.top_p)
    if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
      raise ValueError(f"eos_id must be None or an int >= 0, got {self.eos_id!r}.")
    if not _is_int(self.pad_id) or self.pad_id < 0:
      raise ValueError(f"pad_id must be an int >= 0, got {self.pad_id!r}.")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


class Generation(NamedTuple):
  """Completions of a batch of prompts; column ``t`` is each row's ``t``-th new token.

  Attributes:
    tokens: int32 ``[B, N]``, ``pad_id`` after a row's EOS.
    logprobs: float32 ``[B, N]``: log-probability of each token under the distribution it was
      drawn from (0 for greedy decoding, a point mass), 0 where not valid.
    mask: bool ``[B, N]``: True up to and including a row's EOS.
  """

  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_top_k(k) -> None:
  if not _is_int(k) or k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {k!r}.")


def _check_top_p(p) -> None:
  if not 0 < p <= 1:
    raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {p!r}.")


# ----------------------------------------------------------------------------------------------
# Filters: logits in, logits out, so that softmax of the result is the sampling distribution.


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
  """``z / T``: ``softmax(z / T)`` is sharper than ``softmax(z)`` for ``T < 1``, flatter for ``T > 1``.

  ``T`` must be positive; ``T = 0`` (the argmax limit) is :func:`sample`'s greedy case.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0 here (T = 0 is greedy decoding), got {temperature!r}.")
  return logits.astype(jnp.float32) / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps ``z_i >= z_(k)``, the ``k``-th largest logit of its row; the rest become ``-inf``.

  ``softmax`` of the result is ``p_i ∝ exp(z_i) [z_i >= z_(k)]``, the distribution renormalised
  over the top ``k``. Ties with the ``k``-th value are all kept. ``k = 0`` or ``k >= V`` leaves the
  logits unchanged.

  Args:
    logits: ``[..., V]``.
    k: number of tokens to keep.
  """
  _check_top_k(k)
  if k == 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter (Holtzman et al. 2020): the smallest set of likeliest tokens with mass ``>= p``.

  With ``π = softmax(z)`` sorted so that ``π_(1) >= π_(2) >= ...``, token ``(j)`` is kept iff
  ``Σ_{i<j} π_(i) < p``: the mass before it has not yet reached ``p``. The top token (an empty sum)
  is always kept, and ``softmax`` of the result is ``π`` renormalised over the kept set. Ties with
  the last kept value are kept. ``-inf`` logits (from an earlier filter) have ``π = 0`` and stay
  ``-inf``. ``p = 1`` leaves the logits unchanged.

  Args:
    logits: ``[..., V]``.
    p: the mass to cover, in ``(0, 1]``.
  """
  _check_top_p(p)
  if p == 1:
    return logits
  descending = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """``top_p(top_k(z / T))`` in float32, the order of Hugging Face's samplers.

  ``softmax`` of the result is the distribution :func:`sample` draws from and ``log_softmax`` its
  log-probabilities. Top-p measures mass after temperature and top-k, so the nucleus of a
  sharpened distribution is smaller.
  """
  return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


def sample(key: jax.Array, logits: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row of ``logits[..., V]``.

  Greedy decoding (``config.is_greedy``) takes ``argmax z`` with log-probability 0, a point mass.
  Otherwise ``id ~ softmax(f)`` with ``f = filter_logits(z)`` and the log-probability is
  ``log_softmax(f)[id]``.

  Returns:
    ``(int32 ids [...], float32 log-probabilities [...])``.
  """
  if config.is_greedy:
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return ids, jnp.zeros(ids.shape, jnp.float32)
  filtered = filter_logits(logits, temperature=config.temperature, top_k=config.top_k,
                           top_p=config.top_p)
  ids = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), ids[..., None], axis=-1)
  return ids, logprobs[..., 0]


def sampling_log_probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Log-probabilities ``[..., V]`` of the whole distribution :func:`sample` draws an id from.

  ``log_softmax(filter_logits(z))``; for greedy decoding the point mass at ``argmax z`` (0 there,
  ``-inf`` elsewhere), so that a draw from it is the argmax. Speculative decoding needs the full
  vectors of both models, not just the log-probability of the drawn id.
  """
  if config.is_greedy:
    top = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=bool)
    return jnp.where(top, 0.0, -jnp.inf).astype(jnp.float32)
  filtered = filter_logits(logits, temperature=config.temperature, top_k=config.top_k,
                           top_p=config.top_p)
  return jax.nn.log_softmax(filtered, axis=-1)


def check_teacher_mix(teacher_mix) -> None:
  """Raises ValueError unless the mixture weight α is a (static) number in [0, 1]."""
  if isinstance(teacher_mix, bool) or not isinstance(teacher_mix, numbers.Real) or not 0.0 <= teacher_mix <= 1.0:
    raise ValueError(f"teacher_mix α must be a number in [0, 1], got {teacher_mix!r}.")


def mixture_sample(key: jax.Array, student_logits: jax.Array, teacher_logits: jax.Array, config: SamplingConfig,
                   teacher_mix: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row from ``p̃ = α·π_p + (1 − α)·π_q`` (MiniLLM's teacher-mixed sampling).

  ``π_q`` and ``π_p`` are the distributions :func:`sample` draws from for the student's and the
  teacher's logits (the same temperature and filters for both). A row takes the teacher's draw
  with probability α and the student's otherwise, which is a draw from the mixture; the
  student's draw uses ``key`` itself, so with α = 0 the ids are exactly :func:`sample`'s.

  Returns:
    ``(int32 ids [...], float32 log p̃(ids) [...], bool from_teacher [...])``.
  """
  student_ids, _ = sample(key, student_logits, config)
  teacher_ids, _ = sample(jax.random.fold_in(key, 1), teacher_logits, config)
  from_teacher = jax.random.uniform(jax.random.fold_in(key, 2), student_ids.shape) < teacher_mix
  ids = jnp.where(from_teacher, teacher_ids, student_ids)
  mixed = log_mixture(sampling_log_probs(teacher_logits, config), sampling_log_probs(student_logits, config),
                      teacher_mix)
  return ids, jnp.take_along_axis(mixed, ids[..., None], axis=-1)[..., 0], from_teacher


# ----------------------------------------------------------------------------------------------
# Generation.


class MixtureGeneration(NamedTuple):
  """:class:`Generation` of :func:`generate_mixture`, whose log-probabilities are the mixture's.

  Attributes:
    tokens, mask: as for :class:`Generation`.
    logprobs: float32 ``[B, N]``: ``log p̃(token)`` under the mixture it was drawn from, 0 where
      not valid.
    from_teacher: bool ``[B, N]``: the token is the teacher's draw (False where not valid).
  """

  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  from_teacher: jax.Array


class _DecodeState(NamedTuple):
  step: jax.Array  # the column of the next token to sample
  caches: tuple[tuple[KVCache, ...], ...]  # one per model
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  drawn_by: jax.Array  # [B, N] int32: the index of the model whose draw the token is
  done: jax.Array  # [B]: the row has emitted EOS


# `(key, logits per model [B, V] each) -> (ids [B], log-probabilities [B], index of the model drawn [B])`.
Draw = Any


def generate(graphdef: nnx.GraphDef, params: Any, prompts: jax.Array, rng: jax.Array, *,
             config: SamplingConfig, prompt_lengths: Optional[jax.Array] = None,
             cache_sharding: Optional[Sharding] = None) -> Generation:
  """Samples up to ``config.max_new_tokens`` tokens after each prompt (pure; jit it).

  Args:
    graphdef: the :class:`~kdjax.models.decoder.DecoderLM`'s static structure (``nnx.split``).
    params: its state.
    prompts: int ``[B, P]``, right-padded.
    rng: a PRNG key; step ``t`` samples with ``fold_in(rng, t)``.
    config: the sampler.
    prompt_lengths: int ``[B]`` in ``[1, P]``; ``None`` means every row is ``P`` long. Values
      outside are clipped into that range (see :func:`make_generate` for a checked entry).
    cache_sharding: a sharding for every cache buffer, e.g. the batch split over the data axes.

  Returns:
    A :class:`Generation` of width ``N = config.max_new_tokens``.

  Raises:
    ValueError: on bad shapes, ids outside the vocabulary, or ``P + N - 1 > max_len``.
  """
  def draw(key, logits):
    ids, logprobs = sample(key, logits[0], config)
    return ids, logprobs, jnp.zeros_like(ids)

  state = _decode((nnx.merge(graphdef, params),), prompts, rng, config=config, prompt_lengths=prompt_lengths,
                  cache_sharding=cache_sharding, draw=draw)
  return Generation(state.tokens, state.logprobs, state.mask)


def generate_mixture(student_graphdef: nnx.GraphDef, student_params: Any, teacher_graphdef: nnx.GraphDef,
                     teacher_params: Any, prompts: jax.Array, rng: jax.Array, *, config: SamplingConfig,
                     teacher_mix: float, prompt_lengths: Optional[jax.Array] = None,
                     cache_sharding: Optional[Sharding] = None) -> MixtureGeneration:
  """:func:`generate` with every token drawn from ``α·π_teacher + (1 − α)·π_student`` (pure; jit it).

  Both models read the same prompt and the same sampled tokens, each through its own KV cache;
  step ``t`` draws with :func:`mixture_sample` and the key ``fold_in(rng, t)``, so with α = 0
  the tokens are exactly :func:`generate`'s of the student with the same key. The models must
  share the vocabulary; the prompt and the completion must fit both ``max_len``.

  Args:
    student_graphdef, student_params: the student (its distribution weighs 1 − α).
    teacher_graphdef, teacher_params: the teacher (weight α).
    teacher_mix: α in [0, 1] (0.2 in MiniLLM).
    Others: as for :func:`generate`.

  Returns:
    A :class:`MixtureGeneration` of width ``N = config.max_new_tokens``.
  """
  check_teacher_mix(teacher_mix)
  models = (nnx.merge(student_graphdef, student_params), nnx.merge(teacher_graphdef, teacher_params))
  if models[0].config.vocab_size != models[1].config.vocab_size:
    raise ValueError(f"student vocab {models[0].config.vocab_size} != teacher vocab {models[1].config.vocab_size}: "
                     "a token-level mixture needs one vocabulary.")

  def draw(key, logits):
    ids, logprobs, from_teacher = mixture_sample(key, logits[0], logits[1], config, teacher_mix)
    return ids, logprobs, from_teacher.astype(jnp.int32)

  state = _decode(models, prompts, rng, config=config, prompt_lengths=prompt_lengths, cache_sharding=cache_sharding,
                  draw=draw)
  return MixtureGeneration(state.tokens, state.logprobs, state.mask, state.mask & (state.drawn_by == 1))


def _decode(models: tuple[DecoderLM, ...], prompts: jax.Array, rng: jax.Array, *, config: SamplingConfig,
            prompt_lengths: Optional[jax.Array], cache_sharding: Optional[Sharding], draw: Draw) -> _DecodeState:
  """The decoding loop of :func:`generate` for one or more models fed the same tokens in lockstep."""
  for model in models:
    batch, width = _check_prompts(prompts, model.config, config)
  lengths = _lengths(prompt_lengths, batch, width)
  n = config.max_new_tokens
  positions = jnp.broadcast_to(jnp.arange(width), prompts.shape)
  caches, first_logits = [], []
  for model in models:
    cache = model.init_cache(batch, width + n - 1)
    if cache_sharding is not None:
      cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    h, cache = model.cached_features(prompts, cache, positions)
    # Only each row's last prompt token predicts anything: the head runs on that one row alone.
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
    caches.append(cache)
    first_logits.append(model.logits(last)[:, 0])
  state = _DecodeState(
      step=jnp.zeros((), jnp.int32), caches=tuple(caches),
      tokens=jnp.full((batch, n), config.pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, n), jnp.float32),
      mask=jnp.zeros((batch, n), bool),
      drawn_by=jnp.zeros((batch, n), jnp.int32),
      done=jnp.zeros((batch,), bool))
  state = _record(state, tuple(first_logits), rng, config, draw)

  def keep_going(s: _DecodeState):
    return (s.step < n) & ~jnp.all(s.done)

  def decode(s: _DecodeState):
    previous = s.step - 1
    token = jax.lax.dynamic_slice_in_dim(s.tokens, previous, 1, axis=1)
    stepped = [model.decode_step(token, cache, (lengths + previous)[:, None]) for model, cache in zip(models, s.caches)]
    return _record(s._replace(caches=tuple(cache for _, cache in stepped)),
                   tuple(logits[:, 0] for logits, _ in stepped), rng, config, draw)

  return jax.lax.while_loop(keep_going, decode, state)


def _record(state: _DecodeState, logits: tuple[jax.Array, ...], rng: jax.Array, config: SamplingConfig,
            draw: Draw) -> _DecodeState:
  """Samples column ``state.step`` from each model's ``logits [B, V]`` for the rows still going."""
  ids, logprobs, drawn_by = draw(jax.random.fold_in(rng, state.step), logits)
  live = ~state.done
  ids = jnp.where(live, ids, config.pad_id)
  done = state.done if config.eos_id is None else state.done | (ids == config.eos_id)
  put = lambda buffer, column: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
      buffer, column.astype(buffer.dtype), state.step, axis=1)
  return state._replace(
      step=state.step + 1, tokens=put(state.tokens, ids),
      logprobs=put(state.logprobs, jnp.where(live, logprobs, 0.0)), mask=put(state.mask, live),
      drawn_by=put(state.drawn_by, drawn_by), done=done)


def _check_prompts(prompts, model_config, config: SamplingConfig) -> tuple[int, int]:
  if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise ValueError(f"prompts must be integer [batch, length], got {prompts.dtype} {prompts.shape}.")
  batch, width = prompts.shape
  if width == 0:
    raise ValueError("prompts must hold at least one token per row (e.g. BOS).")
  positions = width + config.max_new_tokens - 1
  if positions > model_config.max_len:
    raise ValueError(
        f"prompt width {width} + max_new_tokens {config.max_new_tokens} needs {positions} positions "
        f"(the last sampled token is never fed back), more than the model's max_len "
        f"{model_config.max_len}.")
  for name in ("eos_id", "pad_id"):
    value = getattr(config, name)
    if value is not None and value >= model_config.vocab_size:
      raise ValueError(f"{name} {value} is outside the vocabulary of {model_config.vocab_size} ids.")
  return batch, width


def _lengths(prompt_lengths, batch: int, width: int) -> jax.Array:
  if prompt_lengths is None:
    return jnp.full((batch,), width, jnp.int32)
  if jnp.shape(prompt_lengths) != (batch,):
    raise ValueError(f"prompt_lengths must have shape ({batch},), got {jnp.shape(prompt_lengths)}.")
  return jnp.clip(jnp.asarray(prompt_lengths, jnp.int32), 1, width)


def make_generate(graphdef: nnx.GraphDef, config: SamplingConfig, *,
                  batch_sharding: Optional[Sharding] = None):
  """Jits :func:`generate` for one model structure and sampler.

  With ``batch_sharding`` (e.g. ``kdjax.train.sharding.batch_sharding(mesh)``) prompts, lengths,
  the cache and the outputs are split along the batch like a training batch; parameters stay in
  the shardings they were created with. Prompt lengths given as host data (NumPy or a list) are
  checked against ``[1, P]`` before the call; device arrays are trusted (and clipped).

  Returns:
    ``fn(params, prompts, prompt_lengths, rng) -> Generation``; ``prompt_lengths`` may be None.
  """
  def pure(params, prompts, prompt_lengths, rng):
    return generate(graphdef, params, prompts, rng, config=config, prompt_lengths=prompt_lengths,
                    cache_sharding=batch_sharding)

  return _jit_sampler(pure, 1, batch_sharding)


def make_generate_mixture(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, config: SamplingConfig, *,
                          teacher_mix: float, batch_sharding: Optional[Sharding] = None):
  """Jits :func:`generate_mixture` for one pair of model structures, sampler and α, sharded as
  :func:`make_generate`.

  Returns:
    ``fn(student_params, teacher_params, prompts, prompt_lengths, rng) -> MixtureGeneration``.
  """
  check_teacher_mix(teacher_mix)

  def pure(student_params, teacher_params, prompts, prompt_lengths, rng):
    return generate_mixture(student_graphdef, student_params, teacher_graphdef, teacher_params, prompts, rng,
                            config=config, teacher_mix=teacher_mix, prompt_lengths=prompt_lengths,
                            cache_sharding=batch_sharding)

  return _jit_sampler(pure, 2, batch_sharding)


def _jit_sampler(pure, num_models: int, batch_sharding: Optional[Sharding]):
  """Jits ``pure(*params, prompts, prompt_lengths, rng)``; host-side prompt lengths are checked first."""
  # None leaves parameters and the key in the shardings they arrive with.
  jitted = jax.jit(pure, in_shardings=(None,) * num_models + (batch_sharding, batch_sharding, None),
                   out_shardings=batch_sharding)

  def run(*args):
    prompts, prompt_lengths = args[num_models:num_models + 2]
    if prompt_lengths is not None and not isinstance(prompt_lengths, jax.Array):
      check_prompt_lengths(prompt_lengths, np.shape(prompts)[1])
    return jitted(*args)

  return run


def check_prompt_lengths(prompt_lengths, width: int) -> None:
  """Raises ValueError unless every host-side prompt length lies in ``[1, width]``."""
  lengths = np.asarray(prompt_lengths)
  if not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"prompt_lengths must be integers, got {lengths.dtype}.")
  bad = (lengths < 1) | (lengths > width)
  if bad.any():
    raise ValueError(f"prompt_lengths must lie in [1, {width}] (the prompt width), got "
                     f"{lengths[bad].tolist()}.")


# ----------------------------------------------------------------------------------------------
# From samples to a distillation batch.


def completion_batch(prompts: jax.Array, prompt_lengths: Optional[jax.Array], generation: Generation,
                     *, pad_id: int = 0) -> dict[str, jax.Array]:
  """A language-modelling batch of prompt + completion whose loss covers the completion only.

  Row ``b``'s sequence is ``s_b = prompts[b, :n_b] ++ generation.tokens[b]`` laid out from
  position 0 and padded with ``pad_id`` to width ``P + N``. As in ``kdjax.data.lm_pipeline``,
  ``inputs = s[:, :-1]`` and ``targets = s[:, 1:]``; ``mask[b, j]`` is 1 iff target ``j`` is a
  valid completion token (``j + 1 - n_b`` in ``[0, N)`` and ``generation.mask`` there). That is
  the batch ``kdjax.distill.strategies.LogitDistillation`` and the distillation step expect, and
  ``logits[b, n_b - 1 + t]`` of ``model(inputs)`` scores completion token ``t``.

  Args:
    prompts: int ``[B, P]``, right-padded, as given to :func:`generate`.
    prompt_lengths: int ``[B]`` in ``[1, P]``, or None for full rows.
    generation: the completions.
    pad_id: the id after a row's sequence (it is never a kept target).

  Returns:
    ``{'inputs': int32 [B, P+N-1], 'targets': int32 [B, P+N-1], 'mask': float32 [B, P+N-1]}``.
  """
  in_prompt, take, valid = _completion_layout(prompts, prompt_lengths, generation)
  prompt_part = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, generation.tokens.shape[1])))
  sequence = jnp.where(in_prompt, prompt_part, jnp.where(valid, take(generation.tokens), pad_id))
  return {
      "inputs": sequence[:, :-1],
      "targets": sequence[:, 1:],
      "mask": valid[:, 1:].astype(jnp.float32),
  }


def completion_log_probs(prompts: jax.Array, prompt_lengths: Optional[jax.Array],
                         generation: Generation) -> jax.Array:
  """``generation.logprobs`` laid out like :func:`completion_batch`'s targets: float32
  ``[B, P+N-1]``, entry ``j`` the sampler's log-probability of ``targets[:, j]`` where ``mask`` is 1,
  0 elsewhere (MiniLLM's importance weights divide by it)."""
  _, take, valid = _completion_layout(prompts, prompt_lengths, generation)
  return jnp.where(valid, take(generation.logprobs), 0.0)[:, 1:]


def _completion_layout(prompts, prompt_lengths, generation):
  """Where prompt + completion lie in a ``[B, P+N]`` sequence: (the prompt's positions,
  ``take(x)`` moving a ``[B, N]`` completion column to its position, the valid completion positions)."""
  batch, width = prompts.shape
  n = generation.tokens.shape[1]
  lengths = _lengths(prompt_lengths, batch, width)[:, None]
  position = jnp.arange(width + n)[None]
  column = position - lengths  # where position j falls in the completion
  in_completion = (column >= 0) & (column < n)
  take = lambda x: jnp.take_along_axis(x, jnp.clip(column, 0, n - 1), axis=1)  # noqa: E731
  return position < lengths, take, in_completion & take(generation.mask)
