"""The public fused losses and their dispatch to the kernel, the tiled twin or the naive losses.

    fused_divergence(student_logits [..., V], teacher_logits [..., V], *, divergence, temperature,
                     where, implementation, **coefficients) -> [...]
    fused_linear_divergence(student_hidden [N, Hs], student_head [Hs, V], teacher_hidden [N, Ht],
                            teacher_head [Ht, V], *, ...) -> [N]   (logits formed chunk by chunk)
    fused_linear_cross_entropy(hidden [N, H], head [H, V], labels [N], *, ...) -> [N]   (likewise)
    fused_topk_divergence(student_logits [..., V], teacher_values [..., k], teacher_indices [..., k],
                          *, divergence, tail, ...) -> [...]   (a sparse teacher, e.g. an offline cache)

All have the semantics of the functions of the same name in `kdjax.losses` (the student's
gradient included; the teacher is a constant, as in a distillation step). `implementation`:

  * 'pallas': the Pallas kernel (`kdjax.kernels.pallas`; interpreted on CPU, which is slow);
  * 'tiled': the pure-JAX twin, a scan over vocabulary tiles (`kdjax.kernels.tiled`);
  * 'naive': the `kdjax.losses` function on whole `[N, V]` arrays;
  * 'auto': the kernel on GPU and TPU; on CPU the twin once the logits reach `TILED_MIN_ELEMENTS`
    (where the naive losses' `[N, V]` temporaries start to cost more than the scan), else naive.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.losses import common
from kdjax.kernels import fused_linear, terms, tiled, topk

Array = jax.Array

IMPLEMENTATIONS = ("auto", "pallas", "tiled", "naive")
# 2^22 float32 logits (16 MiB per array): below it XLA's fused naive losses are as fast on a CPU.
TILED_MIN_ELEMENTS = 1 << 22

def resolve_implementation(implementation: str, num_elements: int) -> str:
  """The implementation 'auto' stands for on this backend at this size (others pass through)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; known: {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if jax.default_backend() in ("gpu", "tpu"):
    return "pallas"
  return "tiled" if num_elements >= TILED_MIN_ELEMENTS else "naive"


def fused_divergence(student_logits: Array, teacher_logits: Array, *, divergence: str = "forward_kl",
                     temperature=1.0, where: Optional[Array] = None, implementation: str = "auto",
                     softcap: Optional[float] = None, tile: int = 2048, **coefficients) -> Array:
  """A divergence of the family between student and teacher logits, per position.

  Args:
    student_logits: `[..., V]`, any float dtype (computed in float32).
    teacher_logits: `[..., V]`.
    divergence: a name of `kdjax.kernels.terms.NAMES` (forward_kl, reverse_kl, generalized_jsd,
      total_variation, skew_kl, skew_reverse_kl, hinton_kd).
    temperature: T.
    where: optional boolean `[...]` mask of positions to keep.
    implementation: see the module docstring.
    softcap: if set, both models' logits become softcap·tanh(z / softcap) first (Gemma 2).
    tile: vocabulary columns per step of the twin and the kernel.
    **coefficients: beta (generalized_jsd) or alpha (skew_kl, skew_reverse_kl).

  Returns:
    float32 `[...]`; masked positions are 0 with zero gradient.
  """
  div = terms.divergence(divergence, **coefficients)
  common.check_pair(student_logits, teacher_logits)
  positions = jnp.shape(student_logits)[:-1]
  common.check_where(where, positions)
  vocab = jnp.shape(student_logits)[-1]
  chosen = resolve_implementation(implementation, math.prod(positions) * vocab)
  if chosen == "naive":
    def cap(z):
      # Dropped rows are zeroed before the cap: tanh' of a garbage (NaN) logit would turn their
      # zero cotangent into NaN.
      z = common.sanitize(z, where)
      return z if softcap is None else softcap * jnp.tanh(z / softcap)
    teacher = jax.lax.stop_gradient(cap(teacher_logits))
    return losses.DIVERGENCES[div.name](cap(student_logits), teacher, temperature=temperature, where=where,
                            **({"beta": div.coefficient} if div.name == "generalized_jsd" else
                               {"alpha": div.coefficient} if div.name.startswith("skew") else {}))
  flat = lambda x: jnp.reshape(x, (-1, vocab))  # noqa: E731
  keep = None if where is None else jnp.reshape(where, (-1,))
  if chosen == "tiled":
    values = tiled.tiled_divergence(div, flat(student_logits), flat(teacher_logits), temperature=temperature,
                                    where=keep, tile=tile, softcap=softcap)
  else:
    from kdjax.kernels import pallas  # imports Pallas only when the kernel is asked for

    values = pallas.pallas_divergence(div, flat(student_logits), flat(teacher_logits), temperature=temperature,
                                      where=keep, block_vocab=tile, softcap=softcap)
  return values.reshape(positions)


def fused_linear_divergence(student_hidden: Array, student_head: Array, teacher_hidden: Array, teacher_head: Array,
                            *, divergence: str = "forward_kl", temperature=1.0, where: Optional[Array] = None,
                            implementation: str = "auto", softcap: Optional[float] = None, token_chunk: int = 256,
                            tile: int = 4096, **coefficients) -> Array:
  """The divergence between z_s = h_s·W_s and z_t = h_t·W_t per token, from hidden states and heads.

  With any implementation but 'naive' the logits are formed `token_chunk` tokens at a time and
  never exist whole (`kdjax.kernels.fused_linear`: matmuls through XLA, the divergence streamed by
  the tiled twin's functions; there is no Pallas lm-head kernel yet, so 'pallas' means the same).
  'auto' materialises the logits only when they are small (under `TILED_MIN_ELEMENTS`).

  Args:
    student_hidden: h_s `[N, Hs]`.
    student_head: W_s `[Hs, V]`.
    teacher_hidden: h_t `[N, Ht]`.
    teacher_head: W_t `[Ht, V]`.
    divergence, temperature, where, softcap, **coefficients: as in `fused_divergence`.
    implementation: 'naive' materialises the logits; any other value streams them (see above).
    token_chunk: tokens per chunk of the streamed version.
    tile: vocabulary columns per step.

  Returns:
    float32 `[N]`; gradients reach `student_hidden` and `student_head` (the teacher is constant).
  """
  div = terms.divergence(divergence, **coefficients)
  n, vocab = jnp.shape(student_hidden)[0], jnp.shape(student_head)[-1]
  if resolve_implementation(implementation, n * vocab) == "naive":
    dot = lambda h, w: jnp.matmul(h, w, preferred_element_type=jnp.float32)  # noqa: E731
    return fused_divergence(dot(student_hidden, student_head), dot(teacher_hidden, teacher_head),
                            divergence=divergence, temperature=temperature, where=where, implementation="naive",
                            softcap=softcap, **coefficients)
  return fused_linear.fused_linear_divergence(div, student_hidden, student_head, teacher_hidden, teacher_head,
                                              temperature=temperature, where=where, token_chunk=token_chunk,
                                              vocab_tile=tile, softcap=softcap)


def fused_linear_cross_entropy(hidden: Array, head: Array, labels: Array, *, where: Optional[Array] = None,
                               implementation: str = "auto", softcap: Optional[float] = None, token_chunk: int = 256,
                               tile: int = 4096) -> Array:
  """The hard-label cross-entropy −log softmax(h·W)[y] per token, from hidden states and a head.

  Equals `kdjax.losses.cross_entropy(hidden @ head, labels, where=where)` (the logits soft-capped
  first if `softcap` is set). Implementations as in `fused_linear_divergence`: 'naive' materialises
  the logits, any other value streams them (`kdjax.kernels.fused_linear.fused_linear_cross_entropy`,
  which also rejects concrete out-of-range labels of kept tokens), and 'auto' streams once the
  logits reach `TILED_MIN_ELEMENTS` off GPU and TPU.

  Args:
    hidden: h `[N, H]`.
    head: W `[H, V]`.
    labels: integer `[N]` ids in [0, V).
    where: optional boolean `[N]` mask of tokens to keep.
    implementation: 'naive' materialises the logits; any other value streams them.
    softcap: if set, the logits become softcap·tanh(z / softcap) first.
    token_chunk: tokens per chunk of the streamed version.
    tile: vocabulary columns per step.

  Returns:
    float32 `[N]`; gradients reach `hidden` and `head`.
  """
  n, vocab = jnp.shape(hidden)[0], jnp.shape(head)[-1]
  if resolve_implementation(implementation, n * vocab) == "naive":
    # Dropped rows are zeroed before the cap, as in `fused_divergence`: tanh' of a garbage (NaN)
    # logit would turn their zero cotangent into NaN.
    logits = common.sanitize(jnp.matmul(hidden, head, preferred_element_type=jnp.float32), where)
    if softcap is not None:
      logits = softcap * jnp.tanh(logits / softcap)
    return losses.cross_entropy(logits, labels, where=where)
  return fused_linear.fused_linear_cross_entropy(hidden, head, labels, where=where, token_chunk=token_chunk,
                                                 vocab_tile=tile, softcap=softcap)


def fused_topk_divergence(student_logits: Array, teacher_values: Array, teacher_indices: Array, *,
                          divergence: str = "forward_kl", tail: str = "renormalize", temperature=1.0,
                          where: Optional[Array] = None, implementation: str = "auto", softcap: Optional[float] = None,
                          tile: int = 2048, teacher_tail: Optional[Array] = None, **coefficients) -> Array:
  """A divergence of the family between a sparse top-k teacher and the full student, per position.

  Generalises `kdjax.losses.topk_divergence` (forward and reverse KL) to the whole family, with the
  same tail policies and the same value for those two (`kdjax.kernels.topk` has the mathematics).
  ``renormalize`` works on the `[..., k]` support alone, the same computation for every
  implementation; ``bucket`` streams the student's whole-vocabulary and tail log-normalisers with
  the chosen implementation ('auto' as in `fused_divergence`, by the student's `[..., V]` size).

  Args:
    student_logits: `[..., V]`, any float dtype.
    teacher_values: `[..., k]`: logits for ``renormalize``; log softmax(z_t / T) for ``bucket``
      (`kdjax.losses.teacher_topk` makes both).
    teacher_indices: integer `[..., k]` distinct ids in [0, V).
    divergence, temperature, where, implementation, **coefficients: as in `fused_divergence`.
    tail: ``renormalize`` or ``bucket``.
    softcap: if set, the student's logits become softcap·tanh(z / softcap) first (the teacher's
      values are taken as stored).
    tile: vocabulary columns per step of the stream.
    teacher_tail: optional `[...]` log of the teacher's mass outside its top-k at T (``bucket``;
      `kdjax.data.teacher_cache` stores it), replacing the floored 1 − Σ p.

  Returns:
    float32 `[...]`; masked positions are 0 with zero gradient.
  """
  div = terms.divergence(divergence, **coefficients)
  positions = jnp.shape(student_logits)[:-1]
  if teacher_tail is not None and jnp.shape(teacher_tail) != positions:
    raise ValueError(f"teacher_tail has shape {jnp.shape(teacher_tail)}, expected the positions {positions}")
  common.check_where(where, positions)
  for name, x in (("values", teacher_values), ("indices", teacher_indices)):
    if jnp.shape(x)[:-1] != positions:
      raise ValueError(f"teacher top-k {name} {jnp.shape(x)} do not match the student's positions {positions}")
  vocab, k = jnp.shape(student_logits)[-1], jnp.shape(teacher_values)[-1]
  chosen = resolve_implementation(implementation, math.prod(positions) * vocab)
  flat = lambda x, width: jnp.reshape(x, (-1, width))  # noqa: E731
  values = topk.topk_divergence(div, flat(student_logits, vocab), flat(teacher_values, k),
                                flat(teacher_indices, jnp.shape(teacher_indices)[-1]), tail=tail,
                                temperature=temperature, where=None if where is None else jnp.reshape(where, (-1,)),
                                implementation=chosen, tile=tile, softcap=softcap,
                                teacher_tail=None if teacher_tail is None else jnp.reshape(teacher_tail, (-1,)))
  return values.reshape(positions)
