"""The tiled pure-JAX twin of the fused divergence kernel: scans over vocabulary tiles.

Same semantics as the Pallas kernel (`kdjax.kernels.pallas`) and the same three streams over
the vocabulary (see `kdjax.kernels.terms`): the online log-sum-exp of both rows, then Σ f and
Σ g with the normalisers known; the backward pass rebuilds each gradient tile from the logits and
four row scalars. Peak memory beyond the inputs and the gradient is a few `[N, tile]` arrays,
against the half-dozen `[N, V]` float32 arrays of the naive losses. It is the default off TPU and
GPU, and the reference the kernel is tested against.

A vocabulary that is not a multiple of the tile is covered by clamping the last tile's start to
`V − tile`; the columns it shares with the previous tile are masked out of the sums (and written
twice, with the same value, in the gradient), so nothing is padded or copied.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.kernels.terms import Divergence

Array = jax.Array


def scale_logits(logits: Array, temperature, softcap: Optional[float]) -> Array:
  """z → softcap·tanh(z / softcap) (if set), then / T, in float32."""
  z = logits.astype(jnp.float32)
  if softcap is not None:
    z = softcap * jnp.tanh(z / softcap)
  return z / temperature


def softcap_derivative(logits: Array, softcap: Optional[float]) -> Array | float:
  """d(softcap·tanh(z / softcap))/dz = 1 − tanh²(z / softcap), or 1 without a cap."""
  if softcap is None:
    return 1.0
  return 1.0 - jnp.square(jnp.tanh(logits.astype(jnp.float32) / softcap))


def online_lse_update(m: Array, l: Array, x: Array) -> tuple[Array, Array]:
  """One step of the streaming log-sum-exp over the last axis: (max, Σ exp(x − max)).

  A running max of −inf (nothing seen yet, or only −inf entries) is replaced by 0 as the shift,
  so no exp(−inf − (−inf)) appears.
  """
  new_m = jnp.maximum(m, jnp.max(x, axis=-1))
  shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
  return new_m, l * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[..., None]), axis=-1)


def _tiles(v: int, tile: int):
  """(number of tiles, take) where take(x, j) is tile j of `x[N, v]` and a mask of its fresh columns."""
  tile = min(tile, v)

  def take(x, j):
    start = jnp.minimum(j * tile, v - tile)
    fresh = start + jnp.arange(tile) >= j * tile  # columns no earlier tile covered
    return jax.lax.dynamic_slice_in_dim(x, start, tile, axis=1), fresh

  return -(-v // tile), take


def partial_lse(s: Array, t: Array, *, tile: int) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
  """Streaming log-sum-exp of both rows: ((max_s, Σ exp(s − max_s)), (max_t, Σ exp(t − max_t))).

  Returned as (max, sum) pairs rather than logs so that pairs from vocabulary shards combine
  exactly (`kdjax.kernels.vocab_parallel.combine_lse`).
  """
  n, v = s.shape
  num_tiles, take = _tiles(v, tile)

  def step(carry, j):
    (ms, ls), (mt, lt) = carry
    st, fresh = take(s, j)
    tt, _ = take(t, j)
    st, tt = jnp.where(fresh, st, -jnp.inf), jnp.where(fresh, tt, -jnp.inf)
    return (online_lse_update(ms, ls, st), online_lse_update(mt, lt, tt)), None

  # Carries built from the inputs (not jnp.zeros((n,))) inherit their sharding type inside shard_map.
  start = lambda x: (jnp.full_like(x[:, 0], -jnp.inf, jnp.float32), jnp.zeros_like(x[:, 0], jnp.float32))  # noqa: E731
  out, _ = jax.lax.scan(step, (start(s), start(t)), jnp.arange(num_tiles))
  return out


def term_sums(div: Divergence, s: Array, t: Array, lse_s: Array, lse_t: Array, *, tile: int) -> tuple[Array, Array]:
  """(Σ_v f, Σ_v g) per row (see `kdjax.kernels.terms`) given both rows' log-normalisers."""
  n, v = s.shape
  num_tiles, take = _tiles(v, tile)

  def step(carry, j):
    d, g = carry
    st, fresh = take(s, j)
    tt, _ = take(t, j)
    log_p, log_q = tt - lse_t[:, None], st - lse_s[:, None]
    d = d + jnp.sum(jnp.where(fresh, div.value_terms(log_p, log_q), 0.0), axis=-1)
    g = g + jnp.sum(jnp.where(fresh, div.grad_terms(log_p, log_q), 0.0), axis=-1)
    return (d, g), None

  zeros = jnp.zeros_like(s[:, 0] + t[:, 0], jnp.float32)
  out, _ = jax.lax.scan(step, (zeros, zeros), jnp.arange(num_tiles))
  return out


def row_statistics(div: Divergence, s: Array, t: Array, *, tile: int) -> tuple[Array, Array, Array, Array]:
  """(D, G, lse_s, lse_t) per row of tempered logits `s`, `t` `[N, V]`, streaming over tiles."""
  (ms, ls), (mt, lt) = partial_lse(s, t, tile=tile)
  lse_s, lse_t = ms + jnp.log(ls), mt + jnp.log(lt)
  d, g = term_sums(div, s, t, lse_s, lse_t, tile=tile)
  return d, g, lse_s, lse_t


def grad_into(div: Divergence, student: Array, teacher: Array, *, temperature, softcap: Optional[float],
              lse_s: Array, lse_t: Array, g_sum: Array, row_scale: Array, tile: int) -> Array:
  """The student's logit gradient `[N, V]`, tile by tile: row_scale · (g − q·G) · softcap'(z_s)."""
  n, v = student.shape
  num_tiles, take = _tiles(v, tile)
  tile = min(tile, v)

  def step(j, grad):
    raw, _ = take(student, j)
    t, _ = take(teacher, j)
    s = scale_logits(raw, temperature, softcap)
    t = scale_logits(t, temperature, softcap)
    tile_grad = student_grad_tile(div, s, t, lse_s, lse_t, g_sum) * softcap_derivative(raw, softcap)
    # A clamped last tile rewrites columns of the previous one with the same values.
    start = jnp.minimum(j * tile, v - tile)
    return jax.lax.dynamic_update_slice_in_dim(grad, (tile_grad * row_scale[:, None]).astype(grad.dtype), start,
                                               axis=1)

  return jax.lax.fori_loop(0, num_tiles, step, jnp.zeros_like(student))


def student_grad_tile(div: Divergence, s: Array, t: Array, lse_s: Array, lse_t: Array, g_sum: Array) -> Array:
  """∂D/∂s on one tile: g − q·G (see `kdjax.kernels.terms`)."""
  log_p, log_q = t - lse_t[:, None], s - lse_s[:, None]
  return div.grad_terms(log_p, log_q) - jnp.exp(log_q) * g_sum[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _tiled(div: Divergence, student: Array, teacher: Array, temperature, keep: Array, tile: int,
           softcap: Optional[float]) -> Array:
  return _tiled_fwd(div, student, teacher, temperature, keep, tile, softcap)[0]


def _tiled_fwd(div, student, teacher, temperature, keep, tile, softcap):
  s, t = scale_logits(student, temperature, softcap), scale_logits(teacher, temperature, softcap)
  d, g, lse_s, lse_t = row_statistics(div, s, t, tile=tile)
  return d * div.row_factor(keep, temperature), (student, teacher, temperature, keep, g, lse_s, lse_t)


def _tiled_bwd(div, tile, softcap, residuals, cotangent):
  student, teacher, temperature, keep, g_sum, lse_s, lse_t = residuals
  # dD/dz_s = (g − q·G) / T · (T² for Hinton's form) · softcap'(z_s), per row times the cotangent.
  row_scale = div.grad_row_scale(keep, temperature, cotangent)
  grad = grad_into(div, student, teacher, temperature=temperature, softcap=softcap, lse_s=lse_s, lse_t=lse_t,
                   g_sum=g_sum, row_scale=row_scale, tile=tile)
  # The teacher is a constant of the fused losses; T and the mask get no gradient either.
  return grad, None, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_divergence(div: Divergence, student_logits: Array, teacher_logits: Array, *, temperature=1.0,
                     where: Optional[Array] = None, tile: int = 2048, softcap: Optional[float] = None) -> Array:
  """Per-row divergence of `[N, V]` logits, streaming over vocabulary tiles of `tile` columns.

  Args:
    div: the family member (`kdjax.kernels.terms.divergence(name, ...)`).
    student_logits: `[N, V]`, any float dtype (computed in float32).
    teacher_logits: `[N, V]`.
    temperature: T, a Python or traced scalar.
    where: optional boolean `[N]`; dropped rows give 0 and a zero gradient.
    tile: vocabulary columns per step.
    softcap: if set, both models' logits become softcap·tanh(z / softcap) before T.

  Returns:
    float32 `[N]`. Only the student receives a gradient.
  """
  keep = jnp.ones(student_logits.shape[:1], bool) if where is None else jnp.asarray(where, bool)
  # Dropped rows are zeroed before any arithmetic: garbage (NaN) there must not reach the sums.
  student = jnp.where(keep[:, None], student_logits, 0)
  teacher = jnp.where(keep[:, None], teacher_logits, 0)
  return _tiled(div, student, jax.lax.stop_gradient(teacher), jnp.asarray(temperature, jnp.float32), keep,
                tile, softcap)


# The sparse (top-k) teacher's `bucket` tail: the student's log-normalisers over the whole vocabulary
# and over the ids outside the teacher's support S (`kdjax.kernels.topk` composes the divergence).


def _support_mask(indices: Array, start, size: int) -> Array:
  """`[N, size]` bool: which columns [start, start + size) are among each row's `indices` `[N, k]`."""
  local = indices - start
  # Ids outside the tile are sent to column `size`, which the scatter drops.
  local = jnp.where((local >= 0) & (local < size), local, size)
  rows = jnp.arange(indices.shape[0])[:, None]
  return jnp.zeros((indices.shape[0], size), bool).at[rows, local].set(True, mode="drop")


def support_lse(s: Array, indices: Array, *, tile: int) -> tuple[Array, Array]:
  """(lse, lse_tail) per row of tempered logits `s` `[N, V]`: log Σ_v exp(s_v) and log Σ_{v∉S} exp(s_v).

  The tail is summed over its own ids (masked per tile), not taken as a difference of the two sums,
  which would lose every digit once the student puts nearly all its mass on S.
  """
  n, v = s.shape
  num_tiles, take = _tiles(v, tile)
  size = min(tile, v)

  def step(carry, j):
    everything, tail = carry
    x, fresh = take(s, j)
    x = jnp.where(fresh, x, -jnp.inf)
    outside = jnp.where(_support_mask(indices, jnp.minimum(j * size, v - size), size), -jnp.inf, x)
    return (online_lse_update(*everything, x), online_lse_update(*tail, outside)), None

  start = (jnp.full_like(s[:, 0], -jnp.inf, jnp.float32), jnp.zeros_like(s[:, 0], jnp.float32))
  ((m, l), (mt, lt)), _ = jax.lax.scan(step, (start, start), jnp.arange(num_tiles))
  return m + jnp.log(l), mt + jnp.log(lt)


def support_lse_grad(logits: Array, indices: Array, *, temperature, softcap: Optional[float], lse: Array,
                     lse_tail: Array, ct_lse: Array, ct_tail: Array, tile: int) -> Array:
  """The VJP of `support_lse` through the soft cap and T: `[N, V]` in the logits' dtype.

  ∂lse/∂s_v = q_v and ∂lse_tail/∂s_v = [v ∉ S] exp(s_v − lse_tail), so the gradient of
  a·lse + b·lse_tail for z is (a·q_v + b·[v ∉ S]·exp(s_v − lse_tail)) · softcap'(z_v) / T. A row
  whose tail is empty (lse_tail = −inf) gets no tail term.
  """
  n, v = logits.shape
  num_tiles, take = _tiles(v, tile)
  size = min(tile, v)
  has_tail = jnp.isfinite(lse_tail)
  tail_shift = jnp.where(has_tail, lse_tail, 0.0)[:, None]
  ct_tail = jnp.where(has_tail, ct_tail, 0.0)[:, None]

  def step(j, grad):
    raw, _ = take(logits, j)
    s = scale_logits(raw, temperature, softcap)
    start = jnp.minimum(j * size, v - size)
    outside = ~_support_mask(indices, start, size) & has_tail[:, None]
    tile_grad = ct_lse[:, None] * jnp.exp(s - lse[:, None]) + jnp.where(outside, ct_tail * jnp.exp(s - tail_shift), 0.0)
    tile_grad = tile_grad * softcap_derivative(raw, softcap) / temperature
    return jax.lax.dynamic_update_slice_in_dim(grad, tile_grad.astype(grad.dtype), start, axis=1)

  return jax.lax.fori_loop(0, num_tiles, step, jnp.zeros_like(logits))
