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

`fused_linear_cross_entropy` is the hard-label term on the same machinery (one model; per row the
streamed log-sum-exp and the label's logit, and softmax − onehot(y) as the logit gradient): the
chunk loop, the VJP and its uniform-cotangent path are shared, each loss supplying its per-chunk
statistics and logit gradient (`_DivergenceRows`, `_CrossEntropyRows`).

Ragged N is covered like the vocabulary in `kdjax.kernels.tiled`: the last chunk's start is
clamped to N − chunk, its rows shared with the previous chunk are rewritten with the same values,
and they are left out of the head gradient's sum.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.kernels.terms import Divergence
from kdjax.kernels.tiled import grad_into, online_lse_update, row_statistics, scale_logits, softcap_derivative

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


def _chunk_logits(hidden: Array, head: Array, keep: Array, start, size: int) -> tuple[Array, Array]:
  """(rows [start, start + size) of `hidden` with dropped ones zeroed, their logits `[size, V]` float32).

  `keep` is the chunk's own `[size]` mask. The logits are float32 whatever the inputs' dtype (the
  matmul accumulates in float32).
  """
  # Dropped rows are zeroed before the matmul: garbage (NaN) there must reach neither the sums nor,
  # through 0 · NaN, the head's gradient.
  h = jnp.where(keep[:, None], _take(hidden, start, size), 0)
  return h, jnp.einsum("ch,hv->cv", h, head, preferred_element_type=jnp.float32)


def _logsumexp(z: Array, *, tile: int) -> Array:
  """log Σ_v exp(z_v) per row of `z` `[size, V]`, streaming over vocabulary tiles."""
  num_tiles, size, span = _spans(z.shape[1], tile)

  def step(k, carry):
    start, fresh_columns = span(k)
    # Columns a clamped last tile shares with the previous one must not count twice.
    x = jnp.where(fresh_columns, jax.lax.dynamic_slice_in_dim(z, start, size, axis=1), -jnp.inf)
    return online_lse_update(*carry, x)

  m, total = jax.lax.fori_loop(0, num_tiles, step, (jnp.full(z.shape[:1], -jnp.inf), jnp.zeros(z.shape[:1])))
  return m + jnp.log(total)


@dataclasses.dataclass(frozen=True)
class _DivergenceRows:
  """The divergence family's per-row loss D(z, z_t) for the shared sweep and VJP below.

  A row loss tells the chunk loop what, besides the differentiated hidden states and head, makes
  up a chunk (`extra`: here the teacher's logits, from operands (h_t, W_t, T)), the chunk's values
  and the row statistics its gradient needs (`statistics`, `num_stats` of them), the per-row factor
  of the gradient for a cotangent (`row_scale`), and the logit gradient itself (`logit_grad`).
  """

  div: Divergence
  softcap: Optional[float]
  num_stats = 3  # (G, lse_s, lse_t)

  def extra(self, operands, keep, start, size):
    hidden_t, head_t, _ = operands
    return _chunk_logits(hidden_t, head_t, keep, start, size)[1]

  def statistics(self, z, z_t, keep, operands, *, tile):
    temperature = operands[2]
    d, g_sum, lse_s, lse_t = row_statistics(self.div, scale_logits(z, temperature, self.softcap),
                                            scale_logits(z_t, temperature, self.softcap), tile=tile)
    return d * self.div.row_factor(keep, temperature), (g_sum, lse_s, lse_t)

  def row_scale(self, keep, operands, cotangent):
    return self.div.grad_row_scale(keep, operands[2], cotangent)

  def logit_grad(self, z, z_t, stats, row_scale, operands, *, tile):
    """row_scale · ∂D/∂z `[size, V]` float32: (g − q·G)/T · softcap'(z) (× T² for Hinton's form)."""
    g_sum, lse_s, lse_t = stats
    return grad_into(self.div, z, z_t, temperature=operands[2], softcap=self.softcap, lse_s=lse_s, lse_t=lse_t,
                     g_sum=g_sum, row_scale=row_scale, tile=tile)


@dataclasses.dataclass(frozen=True)
class _CrossEntropyRows:
  """The hard-label cross-entropy CE = lse(c(z)) − c(z)_y per row (c the optional soft cap).

  Operands: (labels,). A label outside [0, V) gives NaN (as the naive loss does for y ≥ V); its
  gradient then has no label term.
  """

  softcap: Optional[float]
  num_stats = 1  # (lse,)

  def extra(self, operands, keep, start, size):
    del keep
    return _take(operands[0], start, size)

  def statistics(self, z, labels, keep, operands, *, tile):
    del operands
    capped = scale_logits(z, 1.0, self.softcap)
    lse = _logsumexp(capped, tile=tile)
    num_vocab = z.shape[1]
    label_logit = jnp.take_along_axis(capped, jnp.clip(labels, 0, num_vocab - 1)[:, None], axis=1)[:, 0]
    ce = jnp.where((labels >= 0) & (labels < num_vocab), lse - label_logit, jnp.nan)
    return jnp.where(keep, ce, 0.0), (lse,)

  def row_scale(self, keep, operands, cotangent):
    del operands
    return jnp.where(keep, cotangent, 0.0)

  def logit_grad(self, z, labels, stats, row_scale, operands, *, tile):
    """row_scale · ∂CE/∂z `[size, V]` float32: (softmax(c(z)) − onehot(y)) · c'(z)."""
    del operands, tile  # elementwise on the chunk: XLA fuses it into the one output buffer
    (lse,) = stats
    onehot = jnp.arange(z.shape[1]) == labels[:, None]
    probs = jnp.exp(scale_logits(z, 1.0, self.softcap) - lse[:, None])
    return (probs - onehot) * softcap_derivative(z, self.softcap) * row_scale[:, None]


def _add_head_product(grad_head: Array, h: Array, fresh: Array, dlogits: Array, *, tile: int) -> Array:
  """grad_head + Σ_i h_iᵀ ⊗ dlogits_i `[H, V]` over the chunk's fresh rows, one vocabulary tile at a time.

  Adding the whole product at once would materialise it beside the accumulator (XLA's CPU dot does
  not accumulate into its output): a second `[H, V]` float32 buffer, the largest of the pass.
  """
  h = jnp.where(fresh[:, None], h, 0)
  num_tiles, size, span = _spans(grad_head.shape[1], tile)

  def step(k, grad_head):
    start, fresh_columns = span(k)
    product = jnp.einsum("ch,cv->hv", h, jax.lax.dynamic_slice_in_dim(dlogits, start, size, axis=1),
                         preferred_element_type=jnp.float32)
    # A clamped last tile must not add the columns it shares with the previous one twice.
    total = jax.lax.dynamic_slice_in_dim(grad_head, start, size, axis=1) + jnp.where(fresh_columns, product, 0.0)
    return jax.lax.dynamic_update_slice_in_dim(grad_head, total, start, axis=1)

  return jax.lax.fori_loop(0, num_tiles, step, grad_head)


def _chunk_inputs(loss, hidden, head, operands, keep, start, size):
  """(keep, zeroed hidden states, logits, the row loss's extra) of rows [start, start + size)."""
  keep = _take(keep, start, size)
  h, z = _chunk_logits(hidden, head, keep, start, size)
  return keep, h, z, loss.extra(operands, keep, start, size)


def _sweep(loss, hidden, head, operands, keep, chunk, tile, with_grads):
  """One pass over token chunks: the values `[N]` and, with `with_grads`, the residuals of the VJP.

  Returns:
    values, or (values, the row loss's statistics each `[N]`, unit-cotangent ∂/∂h `[N, H]` float32,
    unit-cotangent ∂/∂W `[H, V]` float32).
  """
  n, num_vocab = hidden.shape[0], head.shape[1]
  num_chunks, size, rows = _spans(n, chunk)
  dtype = jnp.result_type(hidden, head)  # the naive logits' dtype, as autodiff would give

  def step(j, carry):
    start, fresh = rows(j)
    keep_c, h, z, extra = _chunk_inputs(loss, hidden, head, operands, keep, start, size)
    values, stats = loss.statistics(z, extra, keep_c, operands, tile=tile)
    values = _put(carry[0], values, start)
    if not with_grads:
      return (values,)
    _, stat_buffers, grad_hidden, grad_head = carry
    dlogits = loss.logit_grad(z, extra, stats, loss.row_scale(keep_c, operands, 1.0), operands,
                              tile=tile).astype(dtype)
    stat_buffers = tuple(_put(b, x, start) for b, x in zip(stat_buffers, stats))
    grad_hidden = _put(grad_hidden, jnp.einsum("cv,hv->ch", dlogits, head, preferred_element_type=jnp.float32),
                       start)
    return values, stat_buffers, grad_hidden, _add_head_product(grad_head, h, fresh, dlogits, tile=tile)

  carry = (jnp.zeros((n,), jnp.float32),)
  if with_grads:
    carry += (tuple(jnp.zeros((n,), jnp.float32) for _ in range(loss.num_stats)),
              jnp.zeros(hidden.shape, jnp.float32), jnp.zeros((head.shape[0], num_vocab), jnp.float32))
  out = jax.lax.fori_loop(0, num_chunks, step, carry)
  return out if with_grads else out[0]


def _add_head_grad(grad_head, loss, hidden, head, operands, keep, stats, row_scale, chunk, tile, *, run):
  """grad_head + Σ_i row_scale_i · h_iᵀ ⊗ ∂L_i/∂z_i, rebuilding each chunk's logits (the general path).

  The chunk loop runs only where the traced `run` is true (its trip count is 0 otherwise).
  """
  num_chunks, size, rows = _spans(hidden.shape[0], chunk)
  dtype = jnp.result_type(hidden, head)

  def step(j, grad_head):
    start, fresh = rows(j)
    _, h, z, extra = _chunk_inputs(loss, hidden, head, operands, keep, start, size)
    dlogits = loss.logit_grad(z, extra, tuple(_take(x, start, size) for x in stats), _take(row_scale, start, size),
                              operands, tile=tile).astype(dtype)
    return _add_head_product(grad_head, h, fresh, dlogits, tile=tile)

  return jax.lax.fori_loop(0, jnp.where(run, num_chunks, 0), step, grad_head)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _fused(loss, hidden, head, operands, keep, chunk, tile):
  # Used when nothing is differentiated: values only, no gradient work.
  return _sweep(loss, hidden, head, operands, keep, chunk, tile, with_grads=False)


def _fused_fwd(loss, hidden, head, operands, keep, chunk, tile):
  values, stats, grad_hidden, grad_head = _sweep(loss, hidden, head, operands, keep, chunk, tile, with_grads=True)
  return values, (hidden, head, operands, keep, stats, grad_hidden, grad_head)


def _fused_bwd(loss, chunk, tile, residuals, cotangent):
  hidden, head, operands, keep, stats, unit_grad_hidden, unit_grad_head = residuals
  # Dropped rows have zero unit gradients; the where keeps a non-finite cotangent there from making 0 · inf.
  kept_ct = jnp.where(keep, cotangent, 0.0)
  grad_hidden = (unit_grad_hidden * kept_ct[:, None]).astype(hidden.dtype)

  any_kept = jnp.any(keep)
  ct_max = jnp.max(jnp.where(keep, cotangent, -jnp.inf))
  uniform = (ct_max == jnp.min(jnp.where(keep, cotangent, jnp.inf))) | ~any_kept
  row_scale = loss.row_scale(keep, operands, kept_ct)
  # Not a lax.cond: its result would get a buffer of its own, a second [H, V] float32 array. Here
  # one buffer goes through: the unit gradient scaled in place, or zeroed and rebuilt by a chunk
  # loop whose trip count is 0 on the uniform path.
  grad_head = jnp.where(uniform, unit_grad_head * jnp.where(any_kept, ct_max, 0.0), 0.0)
  grad_head = _add_head_grad(grad_head, loss, hidden, head, operands, keep, stats, row_scale, chunk, tile,
                             run=~uniform)
  # The other operands (the teacher, T; the labels) are constants, and the mask gets no gradient.
  return grad_hidden, grad_head.astype(head.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _checked_mask(n: int, where: Optional[Array], token_chunk: int, vocab_tile: int) -> Array:
  """The boolean `[n]` mask of kept rows, after checking the chunk sizes and `where`'s shape."""
  if token_chunk < 1 or vocab_tile < 1:
    raise ValueError(f"token_chunk and vocab_tile must be positive, got {token_chunk}, {vocab_tile}")
  keep = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
  if keep.shape != (n,):
    raise ValueError(f"`where` has shape {keep.shape}, expected ({n},)")
  return keep


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
  keep = _checked_mask(n, where, token_chunk, vocab_tile)
  operands = (jax.lax.stop_gradient(teacher_hidden), jax.lax.stop_gradient(teacher_head),
              jnp.asarray(temperature, jnp.float32))
  return _fused(_DivergenceRows(div, softcap), student_hidden, student_head, operands, keep, token_chunk, vocab_tile)


def check_ids(ids: Array, where: Optional[Array], num_vocab: int, what: str) -> None:
  """Raises if a concrete id of a kept row lies outside [0, V); traced ids are not checked.

  `ids` is `[N]` or `[N, k]` and `where` an optional `[N]` mask; `what` names the ids in the message.
  """
  if isinstance(ids, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
    return
  ids = np.asarray(ids)
  # Dropped rows may carry any id (an ignore index such as −100): only kept rows are checked.
  bad = (ids < 0) | (ids >= num_vocab)
  if where is not None:
    bad &= np.asarray(where, bool).reshape(bad.shape[:1] + (1,) * (bad.ndim - 1))
  if bad.any():
    positions = np.argwhere(bad)
    raise ValueError(f"{what} of kept tokens must lie in [0, {num_vocab}); {len(positions)} do not, e.g. "
                     f"{ids[tuple(positions[:5].T)].tolist()} at {[tuple(p) for p in positions[:5].tolist()]}")


def fused_linear_cross_entropy(hidden: Array, head: Array, labels: Array, *, where: Optional[Array] = None,
                               token_chunk: int = 256, vocab_tile: int = 4096,
                               softcap: Optional[float] = None) -> Array:
  """Hard-label cross-entropy −log softmax(h·W)[y] per token, without materialising the `[N, V]` logits.

  Equals `kdjax.losses.cross_entropy(c(hidden @ head), labels, where=where)` with c(z) =
  softcap·tanh(z / softcap) if `softcap` is set (else the identity). Per chunk of tokens,

      CE_i = lse_v c(z_i,v) − c(z_i,y_i),      ∂CE_i/∂z_i = (softmax(c(z_i)) − onehot(y_i)) · c'(z_i),

  with the log-sum-exp streamed over vocabulary tiles and the label's logit gathered. The gradients
  for `hidden` and `head` follow as in `fused_linear_divergence` (module docstring): the unit-
  cotangent ones are formed in the forward pass, and a cotangent uniform over the kept rows (a
  masked mean or sum) reuses the head gradient; any other one rebuilds it chunk by chunk (one logit
  matmul and one head product per chunk).

  Args:
    hidden: h `[N, H]`, any float dtype.
    head: W `[H, V]`.
    labels: integer `[N]` ids in [0, V) on kept rows; dropped rows may hold anything.
    where: optional boolean `[N]`; dropped rows give 0 and a zero gradient.
    token_chunk: tokens per chunk.
    vocab_tile: vocabulary columns per step of the log-sum-exp and the head product.
    softcap: if set, the logits become softcap·tanh(z / softcap) first.

  Returns:
    float32 `[N]`. Gradients flow to `hidden` and `head`.

  Raises:
    ValueError: on mismatched shapes, non-integer labels, a non-positive chunk size, or concrete
      labels of kept rows outside [0, V). Traced labels (under jit) cannot be checked: an
      out-of-range one gives NaN for its row (like the naive loss for y ≥ V; the naive loss wraps
      negative ids instead), which reaches any sum or mean of the values, while the gradients stay
      finite and lack that row's −onehot(y) term.
  """
  shapes = [jnp.shape(x) for x in (hidden, head, labels)]
  if len(shapes[0]) != 2 or len(shapes[1]) != 2 or shapes[1][0] != shapes[0][1] or shapes[2] != shapes[0][:1]:
    raise ValueError(f"expected hidden [N, H], head [H, V] and labels [N]; got {shapes[0]}, {shapes[1]} and "
                     f"{shapes[2]}")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels must be integer ids, got dtype {jnp.result_type(labels)}")
  keep = _checked_mask(shapes[0][0], where, token_chunk, vocab_tile)
  check_ids(labels, where, shapes[1][1], "labels")
  return _fused(_CrossEntropyRows(softcap), hidden, head, (jnp.asarray(labels, jnp.int32),), keep, token_chunk,
                vocab_tile)
