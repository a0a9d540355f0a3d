"""The fused divergence when the vocabulary is sharded over a mesh axis (a vocab-parallel lm head).

Each device holds the columns `[k·V/n, (k+1)·V/n)` of both models' logits. The row statistics
combine exactly across shards (Megatron's vocab-parallel cross-entropy, extended to the whole
divergence family of `kdjax.kernels.terms`):

  1. each shard streams its columns for (max, Σ exp(x − max)) of both rows; the global
     log-normaliser is  M = pmax(max),  lse = M + log psum(Σ exp(x − max) · exp(max − M));
  2. each shard sums f and g over its columns with the global normalisers; psum gives D and G;
  3. the backward pass needs only those row scalars: each shard writes its own gradient columns.

Only `[N]`-sized vectors cross devices (two pmax and four psum of row vectors); no shard ever sees
another's logits. The result equals the unsharded `tiled_divergence`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from kdjax.kernels import tiled
from kdjax.kernels.terms import Divergence

Array = jax.Array


def combine_lse(m: Array, l: Array, axis: str) -> Array:
  """Global log-sum-exp from each shard's (max, Σ exp(x − max)) over mesh axis `axis`."""
  global_max = jax.lax.pmax(m, axis)
  shift = jnp.where(jnp.isfinite(global_max), global_max, 0.0)
  return global_max + jnp.log(jax.lax.psum(l * jnp.exp(m - shift), axis))


def vocab_parallel_divergence(div: Divergence, student_logits: Array, teacher_logits: Array, *, mesh: Mesh,
                              vocab_axis: str, row_axes: tuple[str, ...] = (), temperature=1.0,
                              where: Optional[Array] = None, tile: int = 2048,
                              softcap: Optional[float] = None) -> Array:
  """Per-row divergence of `[N, V]` logits whose vocabulary is split over `mesh` axis `vocab_axis`.

  Args:
    div: the family member (`kdjax.kernels.terms.divergence(name, ...)`).
    student_logits: `[N, V]`; V must be divisible by the size of `vocab_axis`.
    teacher_logits: `[N, V]`, laid out like the student's.
    mesh: the device mesh.
    vocab_axis: the mesh axis that splits the vocabulary.
    row_axes: mesh axes that split the rows (data parallelism), or () to replicate them.
    temperature: T (Python or traced scalar).
    where: optional boolean `[N]`.
    tile: vocabulary columns per step within a shard.
    softcap: optional logit soft-capping, as in `tiled_divergence`.

  Returns:
    float32 `[N]`, sharded over `row_axes`. Only the student receives a gradient.
  """
  n, v = student_logits.shape
  shards = mesh.shape[vocab_axis]
  if v % shards:
    raise ValueError(f"vocab {v} is not divisible by the {shards} devices of mesh axis {vocab_axis!r}")
  keep = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
  student = jnp.where(keep[:, None], student_logits, 0)
  teacher = jax.lax.stop_gradient(jnp.where(keep[:, None], teacher_logits, 0))
  rows = row_axes if row_axes else None
  layout = dict(logits=P(rows, vocab_axis), row=P(rows))
  fn = _make(div, mesh, vocab_axis, tuple(row_axes), tile, softcap, (layout["logits"], layout["row"]))
  return fn(student, teacher, jnp.asarray(temperature, jnp.float32), keep)


@functools.lru_cache(maxsize=64)
def _make(div: Divergence, mesh: Mesh, axis: str, row_axes: tuple[str, ...], tile: int, softcap, specs):
  """Builds the custom-VJP function for one (divergence, mesh, layout); cached so jit sees one object."""
  logits_spec, row_spec = specs

  def local_forward(s_raw, t_raw, temperature, keep):
    s = tiled.scale_logits(s_raw, temperature, softcap)
    t = tiled.scale_logits(t_raw, temperature, softcap)
    (ms, ls), (mt, lt) = tiled.partial_lse(s, t, tile=tile)
    lse_s, lse_t = combine_lse(ms, ls, axis), combine_lse(mt, lt, axis)
    d, g = tiled.term_sums(div, s, t, lse_s, lse_t, tile=tile)
    d, g = jax.lax.psum(d, axis), jax.lax.psum(g, axis)
    d = d * div.row_factor(keep, temperature)
    return d, g, lse_s, lse_t

  forward = jax.shard_map(local_forward, mesh=mesh, in_specs=(logits_spec, logits_spec, P(), row_spec),
                          out_specs=(row_spec,) * 4)

  def local_grad(s_raw, t_raw, temperature, lse_s, lse_t, g_sum, row_scale):
    return tiled.grad_into(div, s_raw, t_raw, temperature=temperature, softcap=softcap, lse_s=lse_s, lse_t=lse_t,
                           g_sum=g_sum, row_scale=row_scale, tile=tile)

  backward = jax.shard_map(local_grad, mesh=mesh,
                           in_specs=(logits_spec, logits_spec, P()) + (row_spec,) * 4, out_specs=logits_spec)

  @jax.custom_vjp
  def fn(student, teacher, temperature, keep):
    return forward(student, teacher, temperature, keep)[0]

  def fn_fwd(student, teacher, temperature, keep):
    d, g, lse_s, lse_t = forward(student, teacher, temperature, keep)
    return d, (student, teacher, temperature, keep, g, lse_s, lse_t)

  def fn_bwd(residuals, cotangent):
    student, teacher, temperature, keep, g_sum, lse_s, lse_t = residuals
    row_scale = div.grad_row_scale(keep, temperature, cotangent)
    return backward(student, teacher, temperature, lse_s, lse_t, g_sum, row_scale), None, None, None

  fn.defvjp(fn_fwd, fn_bwd)
  return fn
