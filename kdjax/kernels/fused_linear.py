"""The divergence family fused with both models' lm-heads: logits are formed chunk by chunk, never whole.

With hidden states h_s `[N, Hs]`, h_t `[N, Ht]` and heads W_s `[Hs, V]`, W_t `[Ht, V]`, the
logits z_s = h_s·W_s and z_t = h_t·W_t are `[N, V]` float32 arrays: 4 GiB each for 8192 tokens of
a 128256-token vocabulary, and autodiff of the naive loss keeps several of them alive. Here the
tokens are taken `token_chunk` rows at a time: a chunk's logits `[chunk, V]` for both models and
the student's logit gradient are the only vocabulary-wide intermediates besides the head's
gradient `[Hs, V]`, and everything on them is `kdjax.kernels.tiled`'s vocabulary-tiled code.

Gradients. Per row i, with dlogits_i = ∂D_i/∂z_s,i = (g − q·G)/T · softcap'(z_s) (× T² for
Hinton's form; see `kdjax.kernels.terms`) and the cotangent ct of the per-row output,

    ∂L/∂h_s,i = ct_i · dlogits_i · W_sᵀ,        ∂L/∂W_s = Σ_i ct_i · h_s,iᵀ ⊗ dlogits_i.

The first is linear in ct_i row by row, so the forward pass stores it unscaled (`[N, Hs]`, as
small as the hidden states) and the backward pass multiplies each row by ct_i. The second mixes
rows and cannot be factored for an arbitrary ct, which the forward pass cannot know (the output
is per token). But the cotangent of a masked mean or sum (the losses' reduction) is one constant c
on every kept row. So the forward pass of the VJP computes, chunk by chunk as Liger-Kernel does,
the head gradient for a unit cotangent on every kept row, while the logits are at hand; the
backward pass checks at run time whether ct is uniform over the kept rows and then only scales it
by c. Any other cotangent (per-token weights, a sum of several uses) takes the general path,
which rebuilds each chunk's logits of both models and forms Σ_i ct_i h_s,iᵀ ⊗
dlogits_i: the student's logit matmul, the head product (its forward-pass twin was computed for
nothing) and, because g depends on p, the teacher's logit matmul, i.e. 2·chunk·V·(2Hs + Ht) more
FLOPs per chunk against the forward pass's 2·chunk·V·(3Hs + Ht); the hidden-state gradient needs
no recomputation. The primal function (used when nothing is differentiated, e.g. evaluation)
computes values only.

Ragged N is covered like the vocabulary in `kdjax.kernels.tiled`: the last chunk's start is
clamped to N − chunk, its rows shared with the previous chunk are rewritten with the same values,
and they are left out of the head gradient's sum.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.kernels.terms import Divergence
from kdjax.kernels.tiled import grad_into, row_statistics, scale_logits

Array = jax.Array


def _spans(n: int, size: int):
  """(count, size, span) covering range(n) with spans of `size` = min(size, n) indices.

  span(j) = (start, fresh): the start of span j, clamped so that the last span ends at n, and a
  `[size]` mask of the indices no earlier span covered.
  """
  size = min(size, n)

  def span(j):
    start = jnp.minimum(j * size, n - size)
    return start, start + jnp.arange(size) >= j * size

  return -(-n // size), size, span


def _take(x: Array, start, size: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _put(buffer: Array, x: Array, start) -> Array:
  return jax.lax.dynamic_update_slice_in_dim(buffer, x.astype(buffer.dtype), start, axis=0)


def _chunk_inputs(hidden_s, head_s, hidden_t, head_t, keep, start, size):
  """(keep, student hidden states, student logits, teacher logits) of rows [start, start + size).

  The logits are float32 `[size, V]` whatever the inputs' dtype (the matmul accumulates in float32).
  """
  keep = _take(keep, start, size)
  # Dropped rows are zeroed before the matmul: garbage (NaN) there must reach neither the sums nor,
  # through 0 · NaN, the head's gradient.
  h_s = jnp.where(keep[:, None], _take(hidden_s, start, size), 0)
  h_t = jnp.where(keep[:, None], _take(hidden_t, start, size), 0)
  logits = functools.partial(jnp.einsum, "ch,hv->cv", preferred_element_type=jnp.float32)
  return keep, h_s, logits(h_s, head_s), logits(h_t, head_t)


def _logit_grad(div, z_s, z_t, stats, row_scale, *, temperature, tile, softcap, dtype):
  """row_scale · ∂D/∂z_s `[size, V]` in `dtype` (the naive logits' dtype, as autodiff would give)."""
  g_sum, lse_s, lse_t = stats
  return grad_into(div, z_s, z_t, temperature=temperature, softcap=softcap, lse_s=lse_s, lse_t=lse_t, g_sum=g_sum,
                   row_scale=row_scale, tile=tile).astype(dtype)


def _add_head_product(grad_head: Array, h_s: Array, fresh: Array, dlogits: Array, *, tile: int) -> Array:
  """grad_head + Σ_i h_s,iᵀ ⊗ dlogits_i `[Hs, V]` over the chunk's fresh rows, one vocabulary tile at a time.

  Adding the whole product at once would materialise it beside the accumulator (XLA's CPU dot does
  not accumulate into its output): a second `[Hs, V]` float32 buffer, the largest of the pass.
  """
  h_s = jnp.where(fresh[:, None], h_s, 0)
  num_tiles, size, span = _spans(grad_head.shape[1], tile)

  def step(k, grad_head):
    start, fresh_columns = span(k)
    product = jnp.einsum("ch,cv->hv", h_s, jax.lax.dynamic_slice_in_dim(dlogits, start, size, axis=1),
                         preferred_element_type=jnp.float32)
    # A clamped last tile must not add the columns it shares with the previous one twice.
    total = jax.lax.dynamic_slice_in_dim(grad_head, start, size, axis=1) + jnp.where(fresh_columns, product, 0.0)
    return jax.lax.dynamic_update_slice_in_dim(grad_head, total, start, axis=1)

  return jax.lax.fori_loop(0, num_tiles, step, grad_head)


def _sweep(div, hidden_s, head_s, hidden_t, head_t, temperature, keep, chunk, tile, softcap, with_grads):
  """One pass over token chunks: the values `[N]` and, with `with_grads`, the residuals of the VJP.

  Returns:
    values, or (values, (G, lse_s, lse_t) each `[N]`, unit-cotangent ∂/∂h_s `[N, Hs]` float32,
    unit-cotangent ∂/∂W_s `[Hs, V]` float32).
  """
  n, num_vocab = hidden_s.shape[0], head_s.shape[1]
  num_chunks, size, rows = _spans(n, chunk)
  dtype = jnp.result_type(hidden_s, head_s)

  def step(j, carry):
    start, fresh = rows(j)
    keep_c, h_s, z_s, z_t = _chunk_inputs(hidden_s, head_s, hidden_t, head_t, keep, start, size)
    d, g_sum, lse_s, lse_t = row_statistics(div, scale_logits(z_s, temperature, softcap),
                                            scale_logits(z_t, temperature, softcap), tile=tile)
    values = _put(carry[0], d * div.row_factor(keep_c, temperature), start)
    if not with_grads:
      return (values,)
    _, stat_buffers, grad_hidden, grad_head = carry
    stats = (g_sum, lse_s, lse_t)
    dlogits = _logit_grad(div, z_s, z_t, stats, div.grad_row_scale(keep_c, temperature, 1.0),
                          temperature=temperature, tile=tile, softcap=softcap, dtype=dtype)
    stat_buffers = tuple(_put(b, x, start) for b, x in zip(stat_buffers, stats))
    grad_hidden = _put(grad_hidden, jnp.einsum("cv,hv->ch", dlogits, head_s, preferred_element_type=jnp.float32),
                       start)
    return values, stat_buffers, grad_hidden, _add_head_product(grad_head, h_s, fresh, dlogits, tile=tile)

  carry = (jnp.zeros((n,), jnp.float32),)
  if with_grads:
    carry += (tuple(jnp.zeros((n,), jnp.float32) for _ in range(3)),
              jnp.zeros(hidden_s.shape, jnp.float32), jnp.zeros((head_s.shape[0], num_vocab), jnp.float32))
  out = jax.lax.fori_loop(0, num_chunks, step, carry)
  return out if with_grads else out[0]


def _add_head_grad(grad_head, div, hidden_s, head_s, hidden_t, head_t, temperature, keep, stats, row_scale, chunk,
                   tile, softcap, *, run):
  """grad_head + Σ_i row_scale_i · h_s,iᵀ ⊗ ∂D_i/∂z_s,i, rebuilding each chunk's logits (the general path).

  The chunk loop runs only where the traced `run` is true (its trip count is 0 otherwise).
  """
  n = hidden_s.shape[0]
  num_chunks, size, rows = _spans(n, chunk)
  dtype = jnp.result_type(hidden_s, head_s)

  def step(j, grad_head):
    start, fresh = rows(j)
    _, h_s, z_s, z_t = _chunk_inputs(hidden_s, head_s, hidden_t, head_t, keep, start, size)
    dlogits = _logit_grad(div, z_s, z_t, tuple(_take(x, start, size) for x in stats), _take(row_scale, start, size),
                          temperature=temperature, tile=tile, softcap=softcap, dtype=dtype)
    return _add_head_product(grad_head, h_s, fresh, dlogits, tile=tile)

  return jax.lax.fori_loop(0, jnp.where(run, num_chunks, 0), step, grad_head)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9))
def _fused(div, hidden_s, head_s, hidden_t, head_t, temperature, keep, chunk, tile, softcap):
  # Used when nothing is differentiated: values only, no gradient work.
  return _sweep(div, hidden_s, head_s, hidden_t, head_t, temperature, keep, chunk, tile, softcap, with_grads=False)


def _fused_fwd(div, hidden_s, head_s, hidden_t, head_t, temperature, keep, chunk, tile, softcap):
  values, stats, grad_hidden, grad_head = _sweep(div, hidden_s, head_s, hidden_t, head_t, temperature, keep, chunk,
                                                 tile, softcap, with_grads=True)
  return values, (hidden_s, head_s, hidden_t, head_t, temperature, keep, stats, grad_hidden, grad_head)


def _fused_bwd(div, chunk, tile, softcap, residuals, cotangent):
  hidden_s, head_s, hidden_t, head_t, temperature, keep, stats, unit_grad_hidden, unit_grad_head = residuals
  # Dropped rows have zero unit gradients; the where keeps a non-finite cotangent there from making 0 · inf.
  kept_ct = jnp.where(keep, cotangent, 0.0)
  grad_hidden = (unit_grad_hidden * kept_ct[:, None]).astype(hidden_s.dtype)

  any_kept = jnp.any(keep)
  ct_max = jnp.max(jnp.where(keep, cotangent, -jnp.inf))
  uniform = (ct_max == jnp.min(jnp.where(keep, cotangent, jnp.inf))) | ~any_kept
  row_scale = div.grad_row_scale(keep, temperature, kept_ct)
  # Not a lax.cond: its result would get a buffer of its own, a second [Hs, V] float32 array. Here
  # one buffer goes through: the unit gradient scaled in place, or zeroed and rebuilt by a chunk
  # loop whose trip count is 0 on the uniform path.
  grad_head = jnp.where(uniform, unit_grad_head * jnp.where(any_kept, ct_max, 0.0), 0.0)
  grad_head = _add_head_grad(grad_head, div, hidden_s, head_s, hidden_t, head_t, temperature, keep, stats, row_scale,
                             chunk, tile, softcap, run=~uniform)
  # The teacher is a constant of the fused losses; T and the mask get no gradient either.
  return grad_hidden, grad_head.astype(head_s.dtype), None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_divergence(div: Divergence, student_hidden: Array, student_head: Array, teacher_hidden: Array,
                            teacher_head: Array, *, temperature=1.0, where: Optional[Array] = None,
                            token_chunk: int = 256, vocab_tile: int = 4096,
                            softcap: Optional[float] = None) -> Array:
  """Per-token divergence of z_s = h_s·W_s and z_t = h_t·W_t, without materialising either `[N, V]`.

  Equals `tiled_divergence(div, student_hidden @ student_head, teacher_hidden @ teacher_head, ...)`;
  the intermediates are a few `[token_chunk, V]` float32 blocks (both models' logits and the
  student's logit gradient) and, under differentiation, the float32 `[Hs, V]` head gradient held
  from the forward pass.

  Args:
    div: the family member (`kdjax.kernels.terms.divergence(name, ...)`).
    student_hidden: h_s `[N, Hs]`, any float dtype.
    student_head: W_s `[Hs, V]`.
    teacher_hidden: h_t `[N, Ht]`.
    teacher_head: W_t `[Ht, V]`.
    temperature: T, a Python or traced scalar.
    where: optional boolean `[N]`; dropped rows give 0 and a zero gradient.
    token_chunk: tokens per chunk: the memory of the `[token_chunk, V]` blocks against the size
      of each matmul.
    vocab_tile: vocabulary columns per step inside a chunk.
    softcap: if set, both models' logits become softcap·tanh(z / softcap) before T.

  Returns:
    float32 `[N]`. Gradients flow to `student_hidden` and `student_head` only; a cotangent that is
    uniform over the kept rows (a masked mean or sum) reuses the head gradient computed in the
    forward pass, any other one recomputes it (see the module docstring).

  Raises:
    ValueError: when the shapes do not pair up or a chunk size is not positive.
  """
  shapes = [jnp.shape(x) for x in (student_hidden, student_head, teacher_hidden, teacher_head)]
  if any(len(shape) != 2 for shape in shapes) or shapes[0][0] != shapes[2][0]:
    raise ValueError(f"hidden states must be [N, H] with one N and heads [H, V]; got student {shapes[0]} and "
                     f"{shapes[1]}, teacher {shapes[2]} and {shapes[3]}")
  (n, hs), (_, ht) = shapes[0], shapes[2]
  if shapes[1][0] != hs or shapes[3][0] != ht:
    raise ValueError(f"heads must be [H, V] matching the hidden sizes: student {shapes[1]} for H={hs}, "
                     f"teacher {shapes[3]} for H={ht}")
  if shapes[1][1] != shapes[3][1]:
    raise ValueError(f"vocab mismatch: student head {shapes[1]}, teacher head {shapes[3]} "
                     "(cut padded ids off both heads first)")
  if token_chunk < 1 or vocab_tile < 1:
    raise ValueError(f"token_chunk and vocab_tile must be positive, got {token_chunk}, {vocab_tile}")
  keep = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
  if keep.shape != (n,):
    raise ValueError(f"`where` has shape {keep.shape}, expected ({n},)")
  return _fused(div, student_hidden, student_head, jax.lax.stop_gradient(teacher_hidden),
                jax.lax.stop_gradient(teacher_head), jnp.asarray(temperature, jnp.float32), keep, token_chunk,
                vocab_tile, softcap)
