"""The fused divergence as Pallas kernels: one forward and one backward `pallas_call`.

Same semantics and the same three streams over the vocabulary as the tiled twin
(`kdjax.kernels.tiled`; `kdjax.kernels.terms` has the mathematics):

  forward, grid (row blocks,): each program holds `block_rows` whole rows and walks them in a
    `fori_loop` over `block_vocab`-column slices of its refs, twice:
      1. the online log-sum-exp of both rows (`online_lse_update`);
      2. Σ_v f and Σ_v g with the normalisers known;
    then writes four float32 row scalars: D, G, lse_s, lse_t. Nothing accumulates across a grid
    axis, so row blocks are independent.
  backward, grid (row blocks, vocabulary blocks): each program writes one gradient tile
    row_scale · (g − q·G) · softcap'(z_s) from its two logit tiles and the row scalars; the tiles
    are independent.

Ragged shapes are padded in the wrapper: rows to a multiple of `block_rows` (zeros, dropped by the
mask) and columns to a multiple of `block_vocab`. The forward kernel sets the padded columns to −inf
in both models after the soft cap and the temperature (a −inf pad would not survive the cap:
softcap·tanh(−inf) = −softcap), and the family's 0·log 0 convention drops them from every sum;
their gradient columns are computed and sliced away. The pad costs one copy of each input, made
in the same fused op as the row mask's `jnp.where` (which the twin pays for as well); an aligned
shape is not padded.

The temperature is a `(1, 1)` float32 input, not a compile-time constant, so a traced T (a
schedule) does not recompile the kernels. Hinton's T² and the row mask are applied outside them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kdjax.kernels.terms import Divergence
from kdjax.kernels.tiled import online_lse_update, scale_logits, softcap_derivative, student_grad_tile

Array = jax.Array


class _Layout(NamedTuple):
  """Static facts of one call: the true vocabulary and the blocks over the padded arrays."""

  vocab: int
  block_rows: int
  block_vocab: int
  interpret: bool


def _compiler_params(layout: _Layout, grid_rank: int):
  """Backend options for a grid of `grid_rank` axes; None when interpreted.

  GPU: Triton (JAX's default there is Mosaic GPU, which does not lower this kernel: it wants
  warpgroup-sized copies rather than per-program loads). TPU: every grid axis parallel, since the
  programs are independent, so megacore chips may split them.
  """
  if layout.interpret:
    return None
  backend = jax.default_backend()
  if backend == "gpu":
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams()
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return None


def _forward_kernel(temperature_ref, student_ref, teacher_ref, d_ref, g_ref, lse_s_ref, lse_t_ref, *,
                    div: Divergence, softcap: Optional[float], vocab: int, block_vocab: int):
  """Writes (D, G, lse_s, lse_t) `[block_rows, 1]` of one row block; refs hold whole padded rows."""
  rows, padded_vocab = student_ref.shape
  temperature = temperature_ref[...]  # (1, 1): broadcasts against every tile

  def tile(j):
    """Tempered (and capped) logits of vocabulary block j; padded columns −inf in both models."""
    cols = pl.ds(pl.multiple_of(j * block_vocab, block_vocab), block_vocab)
    s = scale_logits(student_ref[:, cols], temperature, softcap)
    t = scale_logits(teacher_ref[:, cols], temperature, softcap)
    if padded_vocab != vocab:
      real = j * block_vocab + jax.lax.broadcasted_iota(jnp.int32, (rows, block_vocab), 1) < vocab
      s, t = jnp.where(real, s, -jnp.inf), jnp.where(real, t, -jnp.inf)
    return s, t

  def lse_step(j, carry):
    (ms, ls), (mt, lt) = carry
    s, t = tile(j)
    return online_lse_update(ms, ls, s), online_lse_update(mt, lt, t)

  def sum_step(j, carry):
    d, g = carry
    s, t = tile(j)
    log_p, log_q = t - lse_t[:, None], s - lse_s[:, None]
    return d + jnp.sum(div.value_terms(log_p, log_q), axis=-1), g + jnp.sum(div.grad_terms(log_p, log_q), axis=-1)

  num_blocks = padded_vocab // block_vocab
  empty = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  (ms, ls), (mt, lt) = jax.lax.fori_loop(0, num_blocks, lse_step, (empty, empty))
  lse_s, lse_t = ms + jnp.log(ls), mt + jnp.log(lt)
  zeros = jnp.zeros((rows,), jnp.float32)
  d, g = jax.lax.fori_loop(0, num_blocks, sum_step, (zeros, zeros))
  d_ref[...], g_ref[...] = d[:, None], g[:, None]
  lse_s_ref[...], lse_t_ref[...] = lse_s[:, None], lse_t[:, None]


def _backward_kernel(temperature_ref, student_ref, teacher_ref, lse_s_ref, lse_t_ref, g_ref, scale_ref, grad_ref,
                     *, div: Divergence, softcap: Optional[float]):
  """Writes one `[block_rows, block_vocab]` tile of the student's logit gradient."""
  temperature = temperature_ref[...]
  raw = student_ref[...]
  s = scale_logits(raw, temperature, softcap)
  t = scale_logits(teacher_ref[...], temperature, softcap)
  tile = student_grad_tile(div, s, t, lse_s_ref[:, 0], lse_t_ref[:, 0], g_ref[:, 0])
  grad_ref[...] = (tile * softcap_derivative(raw, softcap) * scale_ref[...]).astype(grad_ref.dtype)


def _row_statistics(div: Divergence, student: Array, teacher: Array, temperature: Array, layout: _Layout,
                    softcap: Optional[float]) -> tuple[Array, Array, Array, Array]:
  """(D, G, lse_s, lse_t) `[rows]` of padded logits: the forward `pallas_call`."""
  rows, padded_vocab = student.shape
  block_rows = layout.block_rows
  row_block = pl.BlockSpec((block_rows, padded_vocab), lambda i: (i, 0))
  row_scalar = pl.BlockSpec((block_rows, 1), lambda i: (i, 0))
  kernel = functools.partial(_forward_kernel, div=div, softcap=softcap, vocab=layout.vocab,
                             block_vocab=layout.block_vocab)
  outputs = pl.pallas_call(
      kernel,
      grid=(rows // block_rows,),
      in_specs=[pl.BlockSpec((1, 1), lambda i: (0, 0)), row_block, row_block],
      out_specs=[row_scalar] * 4,
      out_shape=[jax.ShapeDtypeStruct((rows, 1), jnp.float32)] * 4,
      interpret=layout.interpret,
      compiler_params=_compiler_params(layout, 1),
      name=f"{div.name}_forward",
  )(temperature.reshape(1, 1), student, teacher)
  return tuple(x[:, 0] for x in outputs)


def _student_grad(div: Divergence, student: Array, teacher: Array, temperature: Array, lse_s: Array,
                  lse_t: Array, g_sum: Array, row_scale: Array, layout: _Layout,
                  softcap: Optional[float]) -> Array:
  """The student's logit gradient `[rows, padded vocab]` in its dtype: the backward `pallas_call`."""
  rows, padded_vocab = student.shape
  block_rows, block_vocab = layout.block_rows, layout.block_vocab
  tile = pl.BlockSpec((block_rows, block_vocab), lambda i, j: (i, j))
  row_scalar = pl.BlockSpec((block_rows, 1), lambda i, j: (i, 0))
  return pl.pallas_call(
      functools.partial(_backward_kernel, div=div, softcap=softcap),
      grid=(rows // block_rows, padded_vocab // block_vocab),
      in_specs=[pl.BlockSpec((1, 1), lambda i, j: (0, 0)), tile, tile] + [row_scalar] * 4,
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(student.shape, student.dtype),
      interpret=layout.interpret,
      compiler_params=_compiler_params(layout, 2),
      name=f"{div.name}_backward",
  )(temperature.reshape(1, 1), student, teacher, *(x[:, None] for x in (lse_s, lse_t, g_sum, row_scale)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _pallas(div: Divergence, student: Array, teacher: Array, temperature: Array, keep: Array, layout: _Layout,
            softcap: Optional[float]) -> Array:
  return _pallas_fwd(div, student, teacher, temperature, keep, layout, softcap)[0]


def _pallas_fwd(div, student, teacher, temperature, keep, layout, softcap):
  d, g, lse_s, lse_t = _row_statistics(div, student, teacher, temperature, layout, softcap)
  return d * div.row_factor(keep, temperature), (student, teacher, temperature, keep, g, lse_s, lse_t)


def _pallas_bwd(div, layout, softcap, residuals, cotangent):
  student, teacher, temperature, keep, g_sum, lse_s, lse_t = residuals
  # dD/dz_s = (g − q·G) / T · (T² for Hinton's form) · softcap'(z_s), per row times the cotangent.
  row_scale = div.grad_row_scale(keep, temperature, cotangent)
  grad = _student_grad(div, student, teacher, temperature, lse_s, lse_t, g_sum, row_scale, layout, softcap)
  # The teacher is a constant of the fused losses; T and the mask get no gradient either.
  return grad, None, None, None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _fit_block(block: int, size: int) -> int:
  """The block, shrunk to the smallest power of two ≥ `size` when one block covers the axis.

  A power of two keeps the block legal where the block equals the (padded) axis: Triton wants
  power-of-two tiles, and on TPU a block equal to the whole axis needs no (8, 128) alignment.
  """
  if block < 1:
    raise ValueError(f"block sizes must be positive, got {block}")
  return min(block, pl.next_power_of_2(max(size, 1)))


def pallas_divergence(div: Divergence, student_logits: Array, teacher_logits: Array, *, temperature=1.0,
                      where: Optional[Array] = None, block_rows: int = 8, block_vocab: int = 2048,
                      softcap: Optional[float] = None, interpret: Optional[bool] = None) -> Array:
  """Per-row divergence of `[N, V]` logits by the Pallas kernels; same semantics as `tiled_divergence`.

  Args:
    div: the family member (`kdjax.kernels.terms.divergence(name, ...)`).
    student_logits: `[N, V]`, any float dtype (computed in float32; the gradient has this dtype).
    teacher_logits: `[N, V]`.
    temperature: T, a Python or traced scalar.
    where: optional boolean `[N]`; dropped rows give 0 and a zero gradient.
    block_rows: rows per program. On TPU a multiple of 8 (16 for bf16), on GPU a power of two.
    block_vocab: vocabulary columns per step of the forward loop and per backward tile. On TPU a
      multiple of 128, on GPU a power of two. Both blocks shrink to the next power of two above
      N or V when one block covers the axis.
    softcap: if set, both models' logits become softcap·tanh(z / softcap) before T.
    interpret: run the kernels in the Pallas interpreter; None means on a CPU backend only.

  Returns:
    float32 `[N]`. Only the student receives a gradient.
  """
  if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
    raise ValueError(f"pallas_divergence needs two [N, V] logit arrays of one shape, got "
                     f"{student_logits.shape} and {teacher_logits.shape}")
  n, v = student_logits.shape
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  block_rows, block_vocab = _fit_block(block_rows, n), _fit_block(block_vocab, v)
  # At least one row block, so that an empty batch still has a grid to run (and slices to [0]).
  rows, cols = max(-(-n // block_rows), 1) * block_rows, -(-v // block_vocab) * block_vocab
  keep = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
  # Dropped rows are zeroed before any arithmetic: garbage (NaN) there must not reach the sums.
  # Padded rows are zeros with a False keep; padded columns are masked inside the kernel.
  pad = lambda x: jnp.pad(jnp.where(keep[:, None], x, 0), ((0, rows - n), (0, cols - v)))  # noqa: E731
  values = _pallas(div, pad(student_logits), jax.lax.stop_gradient(pad(teacher_logits)),
                   jnp.asarray(temperature, jnp.float32), jnp.pad(keep, (0, rows - n)),
                   _Layout(v, block_rows, block_vocab, bool(interpret)), softcap)
  return values[:n]


# The sparse (top-k) teacher's `bucket` tail (`kdjax.kernels.topk`): the student's log-normalisers
# over the whole vocabulary and over the ids outside the teacher's support S, and their VJP. Same
# semantics as `kdjax.kernels.tiled.support_lse` / `support_lse_grad`.


def _in_support(indices_ref, ids: Array) -> Array:
  """`[rows, cols]` bool: which vocabulary `ids` are among each row's indices `[rows, k]`.

  A loop over the k support slots comparing against the tile: k compares per element, with no
  scatter (which neither Triton nor Mosaic lowers).
  """
  def body(slot, found):
    return found | (ids == indices_ref[:, pl.ds(slot, 1)])

  return jax.lax.fori_loop(0, indices_ref.shape[1], body, jnp.zeros(ids.shape, bool))


def _support_lse_kernel(temperature_ref, student_ref, indices_ref, lse_ref, tail_ref, *, softcap: Optional[float],
                        vocab: int, block_vocab: int):
  """Writes (lse, lse_tail) `[block_rows, 1]` of one row block; refs hold whole padded rows."""
  rows, padded_vocab = student_ref.shape
  temperature = temperature_ref[...]

  def step(j, carry):
    everything, tail = carry
    start = pl.multiple_of(j * block_vocab, block_vocab)
    s = scale_logits(student_ref[:, pl.ds(start, block_vocab)], temperature, softcap)
    ids = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_vocab), 1)
    if padded_vocab != vocab:
      s = jnp.where(ids < vocab, s, -jnp.inf)
    outside = jnp.where(_in_support(indices_ref, ids), -jnp.inf, s)
    return online_lse_update(*everything, s), online_lse_update(*tail, outside)

  empty = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  (m, l), (mt, lt) = jax.lax.fori_loop(0, padded_vocab // block_vocab, step, (empty, empty))
  lse_ref[...], tail_ref[...] = (m + jnp.log(l))[:, None], (mt + jnp.log(lt))[:, None]


def _support_grad_kernel(temperature_ref, student_ref, indices_ref, lse_ref, tail_ref, ct_lse_ref, ct_tail_ref,
                         grad_ref, *, softcap: Optional[float], block_vocab: int):
  """Writes one `[block_rows, block_vocab]` tile of the VJP of (lse, lse_tail) (see `support_lse_grad`)."""
  temperature = temperature_ref[...]
  raw = student_ref[...]
  s = scale_logits(raw, temperature, softcap)
  rows = raw.shape[0]
  ids = pl.program_id(1) * block_vocab + jax.lax.broadcasted_iota(jnp.int32, (rows, block_vocab), 1)
  tail = tail_ref[...]
  has_tail = jnp.isfinite(tail)
  outside = ~_in_support(indices_ref, ids) & has_tail
  tail_term = jnp.where(outside, ct_tail_ref[...] * jnp.exp(s - jnp.where(has_tail, tail, 0.0)), 0.0)
  tile = (ct_lse_ref[...] * jnp.exp(s - lse_ref[...]) + tail_term) * softcap_derivative(raw, softcap) / temperature
  grad_ref[...] = tile.astype(grad_ref.dtype)


def _support_layout(logits: Array, indices: Array, block_rows: int, block_vocab: int, interpret: Optional[bool]):
  """(padded logits, padded indices, layout): rows and columns padded to whole blocks, the k slots
  to a power of two (Triton's block shapes) with id −1, which matches no column."""
  n, v = logits.shape
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  block_rows, block_vocab = _fit_block(block_rows, n), _fit_block(block_vocab, v)
  rows, cols = max(-(-n // block_rows), 1) * block_rows, -(-v // block_vocab) * block_vocab
  slots = pl.next_power_of_2(max(indices.shape[1], 1))
  logits = jnp.pad(logits, ((0, rows - n), (0, cols - v)))
  indices = jnp.pad(indices.astype(jnp.int32), ((0, rows - n), (0, slots - indices.shape[1])), constant_values=-1)
  return logits, indices, _Layout(v, block_rows, block_vocab, bool(interpret))


def pallas_support_lse(logits: Array, indices: Array, *, temperature, softcap: Optional[float] = None,
                       block_rows: int = 8, block_vocab: int = 2048,
                       interpret: Optional[bool] = None) -> tuple[Array, Array]:
  """(lse, lse_tail) `[N]` of c(z)/T over all ids and over the ids outside each row's `indices` `[N, k]`."""
  n = logits.shape[0]
  logits, indices, layout = _support_layout(logits, indices, block_rows, block_vocab, interpret)
  rows, padded_vocab = logits.shape
  row_block = pl.BlockSpec((layout.block_rows, padded_vocab), lambda i: (i, 0))
  index_block = pl.BlockSpec((layout.block_rows, indices.shape[1]), lambda i: (i, 0))
  row_scalar = pl.BlockSpec((layout.block_rows, 1), lambda i: (i, 0))
  kernel = functools.partial(_support_lse_kernel, softcap=softcap, vocab=layout.vocab, block_vocab=layout.block_vocab)
  lse, tail = pl.pallas_call(
      kernel,
      grid=(rows // layout.block_rows,),
      in_specs=[pl.BlockSpec((1, 1), lambda i: (0, 0)), row_block, index_block],
      out_specs=[row_scalar] * 2,
      out_shape=[jax.ShapeDtypeStruct((rows, 1), jnp.float32)] * 2,
      interpret=layout.interpret,
      compiler_params=_compiler_params(layout, 1),
      name="support_lse_forward",
  )(jnp.asarray(temperature, jnp.float32).reshape(1, 1), logits, indices)
  return lse[:n, 0], tail[:n, 0]


def pallas_support_lse_grad(logits: Array, indices: Array, *, temperature, softcap: Optional[float], lse: Array,
                            lse_tail: Array, ct_lse: Array, ct_tail: Array, block_rows: int = 8,
                            block_vocab: int = 2048, interpret: Optional[bool] = None) -> Array:
  """The VJP of `pallas_support_lse` for cotangents (ct_lse, ct_tail) `[N]`: `[N, V]` in the logits' dtype."""
  n, v = logits.shape
  logits, indices, layout = _support_layout(logits, indices, block_rows, block_vocab, interpret)
  rows, padded_vocab = logits.shape
  block_rows, block_vocab = layout.block_rows, layout.block_vocab
  tile = pl.BlockSpec((block_rows, block_vocab), lambda i, j: (i, j))
  index_block = pl.BlockSpec((block_rows, indices.shape[1]), lambda i, j: (i, 0))
  row_scalar = pl.BlockSpec((block_rows, 1), lambda i, j: (i, 0))
  # Padded rows get lse 0 and zero cotangents: their (discarded) tiles stay finite.
  pad = lambda x: jnp.pad(x.astype(jnp.float32), (0, rows - n))[:, None]  # noqa: E731
  grad = pl.pallas_call(
      functools.partial(_support_grad_kernel, softcap=softcap, block_vocab=block_vocab),
      grid=(rows // block_rows, padded_vocab // block_vocab),
      in_specs=[pl.BlockSpec((1, 1), lambda i, j: (0, 0)), tile, index_block] + [row_scalar] * 4,
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      interpret=layout.interpret,
      compiler_params=_compiler_params(layout, 2),
      name="support_lse_backward",
  )(jnp.asarray(temperature, jnp.float32).reshape(1, 1), logits, indices, *(pad(x) for x in (lse, lse_tail, ct_lse,
                                                                                          ct_tail)))
  return grad[:n, :v]
