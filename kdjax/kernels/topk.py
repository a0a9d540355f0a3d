"""The fused divergence against a sparse top-k teacher, as an offline teacher cache stores it.

The teacher is k (value, id) pairs per token, S its support; the student has full logits z
`[N, V]`, s = c(z)/T with c the optional soft cap. The two tail policies of
`kdjax.losses.topk_divergence`, for any divergence D = Σ_o f(log p_o, log q_o) of the family
(`kdjax.kernels.terms`), over the outcomes o:

* ``renormalize``: o ∈ S, log q = log_softmax(s_S), log p = log_softmax(values / T). Nothing
  streams over the vocabulary: the student is gathered at S and the work is `[N, k]`, so every
  implementation is this one computation (the gather's transpose scatters the gradient into V).
* ``bucket``: o ∈ S ∪ {tail}, log q_v = s_v − lse, log q_tail = lse_tail − lse with
  lse = log Σ_v exp(s_v) and lse_tail = log Σ_{v∉S} exp(s_v); log p = values (the teacher's
  log-probabilities at T) and log p_tail = log max(1 − Σ_S p, k·ε_f32), the float32 floor of
  `kdjax.losses.sparse`, or the exact tail an offline cache stored (`teacher_tail`). The two
  log-normalisers are the only work over V: one stream of the student's row
  (`kdjax.kernels.tiled.support_lse`, or its Pallas kernel), the tail masked per tile rather
  than taken as a difference. Its VJP, by ∂lse/∂s_v = q_v and
  ∂lse_tail/∂s_v = [v∉S]·exp(s_v − lse_tail), is one more stream; the `[N, k + 1]` outcome
  divergence is differentiated by its term derivative g = ∂f/∂log q. With k = V no tail
  outcome exists and ``bucket`` is ``renormalize`` with values taken as log-probabilities.

No `[N, V]` probability array exists in either pass. The teacher's values enter as given (a
cache stores the teacher's final, already capped outputs); the soft cap applies to the student.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.kernels import tiled
from kdjax.kernels.fused_linear import check_ids
from kdjax.kernels.terms import Divergence

Array = jax.Array

TAILS = ("renormalize", "bucket")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _outcome_divergence(div: Divergence, log_p: Array, log_q: Array) -> Array:
  """Σ_o f(log p_o, log q_o) per row of `[N, O]` outcome log-probabilities."""
  return jnp.sum(div.value_terms(log_p, log_q), axis=-1)


def _outcome_fwd(div, log_p, log_q):
  return _outcome_divergence(div, log_p, log_q), (log_p, log_q)


def _outcome_bwd(div, residuals, cotangent):
  # The term's own derivative: autodiff of f through its `where` guards would give 0 · inf = NaN
  # for outcomes of zero mass.
  log_p, log_q = residuals
  return jnp.zeros_like(log_p), cotangent[:, None] * div.grad_terms(log_p, log_q)


_outcome_divergence.defvjp(_outcome_fwd, _outcome_bwd)


def _naive_support_lse(logits, indices, temperature, softcap):
  s = tiled.scale_logits(logits, temperature, softcap)
  in_support = jnp.put_along_axis(jnp.zeros(s.shape, bool), indices, True, axis=-1, inplace=False)
  return jax.nn.logsumexp(s, axis=-1), jax.nn.logsumexp(jnp.where(in_support, -jnp.inf, s), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _support_lse(implementation: str, logits: Array, indices: Array, temperature: Array, softcap: Optional[float],
                 tile: int) -> tuple[Array, Array]:
  """(lse, lse_tail) `[N]` of s = c(z)/T, streamed by the twin ('tiled') or the kernel ('pallas')."""
  if implementation == "pallas":
    from kdjax.kernels import pallas  # imports Pallas only when the kernel is asked for

    return pallas.pallas_support_lse(logits, indices, temperature=temperature, softcap=softcap, block_vocab=tile)
  return tiled.support_lse(tiled.scale_logits(logits, temperature, softcap), indices, tile=tile)


def _support_lse_fwd(implementation, logits, indices, temperature, softcap, tile):
  lse, lse_tail = _support_lse(implementation, logits, indices, temperature, softcap, tile)
  return (lse, lse_tail), (logits, indices, temperature, lse, lse_tail)


def _support_lse_bwd(implementation, softcap, tile, residuals, cotangents):
  logits, indices, temperature, lse, lse_tail = residuals
  ct_lse, ct_tail = cotangents
  kwargs = dict(temperature=temperature, softcap=softcap, lse=lse, lse_tail=lse_tail, ct_lse=ct_lse, ct_tail=ct_tail)
  if implementation == "pallas":
    from kdjax.kernels import pallas

    grad = pallas.pallas_support_lse_grad(logits, indices, block_vocab=tile, **kwargs)
  else:
    grad = tiled.support_lse_grad(logits, indices, tile=tile, **kwargs)
  return grad, None, None  # the ids and T get no gradient


_support_lse.defvjp(_support_lse_fwd, _support_lse_bwd)


def check_topk(student_logits: Array, values: Array, indices: Array, where: Optional[Array], tail: str) -> None:
  """Raises a ValueError naming the problem when a top-k teacher does not fit the student `[N, V]`."""
  if tail not in TAILS:
    raise ValueError(f"unknown tail policy {tail!r}: use one of {TAILS}")
  z, v, i = (jnp.shape(x) for x in (student_logits, values, indices))
  if len(z) != 2 or v != i or len(v) != 2 or v[0] != z[0]:
    raise ValueError(f"expected student logits [N, V] with teacher values and indices [N, k]; got {z}, {v} and {i}")
  if v[1] > z[1]:
    raise ValueError(f"top-k size {v[1]} exceeds the student vocab {z[1]}")
  if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
    raise ValueError(f"teacher indices must be integer ids, got dtype {jnp.result_type(indices)}")
  if where is not None and jnp.shape(where) != z[:1]:
    raise ValueError(f"`where` has shape {jnp.shape(where)}, expected ({z[0]},)")
  check_ids(indices, where, z[1], "teacher top-k indices")


def topk_divergence(div: Divergence, student_logits: Array, teacher_values: Array, teacher_indices: Array, *,
                    tail: str = "renormalize", temperature=1.0, where: Optional[Array] = None,
                    implementation: str = "tiled", tile: int = 2048, softcap: Optional[float] = None,
                    teacher_tail: Optional[Array] = None) -> Array:
  """Per-row divergence between a sparse top-k teacher and the full student (module docstring).

  Args:
    div: the family member (`kdjax.kernels.terms.divergence(name, ...)`).
    student_logits: z `[N, V]`, any float dtype (computed in float32; the gradient has its dtype).
    teacher_values: `[N, k]`: logits (or T = 1 log-probabilities) for ``renormalize``, divided by
      T here; log softmax(z_t / T) at the loss's temperature for ``bucket``.
    teacher_indices: integer `[N, k]` distinct vocabulary ids in [0, V) (checked when concrete).
    tail: ``renormalize`` or ``bucket``.
    temperature: T, a Python or traced scalar (no gradient).
    where: optional boolean `[N]`; dropped rows give 0 and a zero gradient, whatever they hold.
    implementation: how ``bucket`` streams the student's log-normalisers: 'tiled', 'pallas' or
      'naive' (whole-row log-sum-exps, differentiated by autodiff).
    tile: vocabulary columns per step of the stream.
    softcap: if set, the student's logits become softcap·tanh(z / softcap) first.
    teacher_tail: optional `[N]` log of the teacher's mass outside S at T, for ``bucket`` (an
      offline cache computes it from the full logits): then no float32 floor is needed.

  Returns:
    float32 `[N]`, with Hinton's T² for `hinton_kd`. Only the student receives a gradient.
  """
  check_topk(student_logits, teacher_values, teacher_indices, where, tail)
  n, vocab = jnp.shape(student_logits)
  k = jnp.shape(teacher_values)[1]
  keep = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
  # Dropped rows are zeroed (ids too) before any arithmetic: garbage there must reach nothing.
  z = jnp.where(keep[:, None], student_logits, 0)
  indices = jnp.where(keep[:, None], teacher_indices, 0).astype(jnp.int32)
  values = jax.lax.stop_gradient(jnp.where(keep[:, None], teacher_values, 0).astype(jnp.float32))
  temperature = jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32))
  s_support = tiled.scale_logits(jnp.take_along_axis(z, indices, axis=1), temperature, softcap)

  if tail == "renormalize" or k == vocab:
    log_q = jax.nn.log_softmax(s_support, axis=-1)
    log_p = jax.nn.log_softmax(values / temperature, axis=-1) if tail == "renormalize" else values
  else:
    if implementation == "naive":
      lse, lse_tail = _naive_support_lse(z, indices, temperature, softcap)
    else:
      lse, lse_tail = _support_lse(implementation, z, indices, temperature, softcap, tile)
    log_q = jnp.concatenate([s_support - lse[:, None], (lse_tail - lse)[:, None]], axis=-1)
    if teacher_tail is None:
      p_tail = 1.0 - jnp.sum(jnp.exp(values), axis=-1)
      log_p_tail = jnp.log(jnp.clip(p_tail, k * jnp.finfo(jnp.float32).eps, 1.0))
    else:
      log_p_tail = jax.lax.stop_gradient(jnp.where(keep, teacher_tail, 0).astype(jnp.float32))
    log_p = jnp.concatenate([values, log_p_tail[:, None]], axis=-1)
  return _outcome_divergence(div, log_p, log_q) * div.row_factor(keep, temperature)
