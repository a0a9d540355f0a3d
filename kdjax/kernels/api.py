"""The public fused losses and their dispatch to the kernel, the tiled twin or the naive losses.

    fused_divergence(student_logits [..., V], teacher_logits [..., V], *, divergence, temperature,
                     where, implementation, **coefficients) -> [...]
    fused_linear_divergence(student_hidden [N, Hs], student_head [Hs, V], teacher_hidden [N, Ht],
                            teacher_head [Ht, V], *, ...) -> [N]   (logits formed chunk by chunk)

Both have the semantics of the functions of the same name in `kdjax.losses` (the student's
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
from kdjax.kernels import fused_linear, terms, tiled

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
