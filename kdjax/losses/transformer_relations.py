"""Relation losses of transformer distillation: MiniLM, MiniLMv2, TRG (tokens) and Distiller's MI-α.

Three families, all pure array functions with the student first:

  * Self-attention relations inside a sequence (MiniLM, Wang et al. 2020; MiniLMv2, Wang et al. 2021):
    attention distributions, value-value and Q-Q / K-K / V-V relations, compared by
    KL(teacher ‖ student) row by row. They return one value per example `[B]`, the mean over heads and
    kept query tokens, as the papers' 1/(A_h·|x|) Σ_a Σ_t normalisation does.
  * Token graphs over a batch (TRG, Zhang, Liu & He 2023, "Knowledge distillation via token-level
    relationship graph"): a kNN graph of the sampled tokens of the whole batch, an InfoNCE between student
    and teacher tokens, and the within-image contextual term. The graph and the contrast couple the
    examples, so they return a scalar; the contextual term is per example.
  * Distiller's MI-α (He et al. 2021, "Distiller: a systematic study of model distillation methods in
    NLP"): Poole et al.'s (2019) interpolated lower bound on the mutual information between teacher and
    student representations, a scalar over the batch.

Masks: `where` is a boolean `[B, L]` token mask (`[B]` for MI-α). A dropped token is never a key (it gets
no probability mass and is never a neighbour), its query row gives 0, and its values are replaced by zeros
before any arithmetic, so NaN or huge padding cannot leak into values or gradients. Appending padded
tokens therefore leaves every loss unchanged. An example without kept tokens gives 0.

Layer choice is `layer_map`: which teacher layer each student layer learns from (TinyBERT's uniform map,
MiniLM's last layer, or a custom map). Activation names match `kdjax.models.capture`: queries / keys /
values `[B, L, heads, d_head]` and attention probabilities `[B, heads, L, L]`.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from kdjax.losses import common

Array = jax.Array

# The three relations MiniLMv2 distils, by their names in `kdjax.models.capture` (layer{i}/queries ...).
MINILMV2_RELATIONS = ("queries", "keys", "values")
LAYER_MAP_MODES = ("uniform", "last", "custom")


# ------------------------------------------------------------------------------------------------
# Shared plumbing.


def _cast(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(common.compute_dtype(x.dtype))


def _token_mask(where: Optional[Array], batch: int, length: int) -> Array:
  if where is None:
    return jnp.ones((batch, length), bool)
  if tuple(jnp.shape(where)) != (batch, length):
    raise ValueError(f"`where` has shape {jnp.shape(where)}, expected the token shape {(batch, length)}")
  return jnp.asarray(where, bool)


def _zero_dropped(x: Array, keep: Array) -> Array:
  """Zeros the tokens of `x` [B, L, ...] that `keep` [B, L] drops."""
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0.0)


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  # rsqrt of max(‖x‖², eps): a zero vector stays 0 with a finite gradient (sqrt has none at 0).
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _row_log_softmax(logits: Array, allowed: Array) -> Array:
  """log softmax over the last axis restricted to `allowed` entries (others get log 0 = −inf).

  A row with no allowed entry (a dropped query, an example without kept tokens) is computed on a
  placeholder row of zeros instead of all −inf, which would make NaN; callers drop such rows.
  """
  logits = jnp.where(allowed, logits, -jnp.inf)
  logits = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), logits, 0.0)
  return jax.nn.log_softmax(logits, axis=-1)


def _scaled_self_relation(x: Array, keep: Array) -> Array:
  """x xᵀ/√d per head: `[B, h, L, d]` -> `[B, h, L, L]`, dropped tokens zeroed first."""
  x = jnp.where(keep[:, None, :, None], x, 0.0)
  return jnp.einsum("bhqd,bhkd->bhqk", x, x) / math.sqrt(x.shape[-1])


def _relation_log_probs(x: Array, keep: Array) -> Array:
  """log softmax(x xᵀ/√d) over kept keys, `[B, h, L, d]` -> `[B, h, L, L]`."""
  return _row_log_softmax(_scaled_self_relation(x, keep), keep[:, None, None, :])


def _mean_row_kl(log_q: Array, log_p: Array, keep: Array) -> Array:
  """Per example: mean over heads and kept query rows of KL(p ‖ q) over keys; `[B, h, L, L]` -> `[B]`."""
  kl = jnp.where(keep[:, None, :], common.kl_from_log_probs(log_p, log_q), 0.0)
  count = kl.shape[1] * jnp.sum(keep, axis=-1)
  return jnp.sum(kl, axis=(1, 2)) / jnp.maximum(count, 1)


# ------------------------------------------------------------------------------------------------
# MiniLM and MiniLMv2: self-attention relations.


def _log_attention(probs: Array, keep: Array) -> Array:
  """log of attention probabilities on kept (query, key) pairs, renormalised over the kept keys.

  Renormalising makes "padded keys receive no mass" hold even for a model that did not mask them; for
  a model that did, it changes nothing. Zero probabilities give −inf with a zero gradient (the log is
  taken of a placeholder 1); NaN or negative values at kept pairs stay visible as NaN.
  """
  probs = _cast(probs)
  pair = keep[:, None, :, None] & keep[:, None, None, :]
  nonzero = pair & (probs != 0)
  log_w = jnp.where(nonzero, jnp.log(jnp.where(nonzero, probs, 1.0)), -jnp.inf)
  log_w = jnp.where(jnp.any(nonzero, axis=-1, keepdims=True), log_w, 0.0)
  return log_w - jax.nn.logsumexp(log_w, axis=-1, keepdims=True)


def attention_kl(student_probs: Array, teacher_probs: Array, *, where: Optional[Array] = None) -> Array:
  """MiniLM's attention transfer (Wang et al. 2020, "MiniLM: deep self-attention distillation").

      L_AT = 1/(A_h·|x|) Σ_a Σ_t KL(A^T_{a,t} ‖ A^S_{a,t}),

  the forward KL from the teacher's attention distribution of head a and query t to the student's,
  averaged over heads and kept queries. MiniLM distils the last layer (see `layer_map`) and needs the
  same number of heads in both models (MiniLMv2's `relation_kl` lifts that restriction).

  Args:
    student_probs: `[B, heads, L, L]` attention probabilities (rows sum to 1 over keys).
    teacher_probs: `[B, heads, L, L]`, same shape.
    where: optional boolean `[B, L]` token mask; dropped tokens are neither queries nor keys, and the
      kept keys' probabilities are renormalised to sum to 1.

  Returns:
    `[B]` float32, ≥ 0; 0 for an example without kept tokens.
  """
  s, t = jnp.shape(student_probs), jnp.shape(teacher_probs)
  if len(s) != 4 or s[-1] != s[-2]:
    raise ValueError(f"attention_kl expects [batch, heads, L, L] probabilities, got student {s}")
  if s != t:
    raise ValueError(f"student attention {s} and teacher attention {t} differ: MiniLM's attention transfer needs "
                     "the same heads and tokens (use relation_kl on queries/keys for different head counts)")
  keep = _token_mask(where, s[0], s[2])
  return _mean_row_kl(_log_attention(student_probs, keep), _log_attention(teacher_probs, keep), keep)


def value_relation(student_values: Array, teacher_values: Array, *, where: Optional[Array] = None) -> Array:
  """MiniLM's value-relation transfer: VR = softmax(V Vᵀ/√d_k) per head, KL(VR^T ‖ VR^S).

      L_VR = 1/(A_h·|x|) Σ_a Σ_t KL(VR^T_{a,t} ‖ VR^S_{a,t}),

  where d_k is each model's own head size (the student's may be narrower: the relation is L×L either
  way). MiniLM's total loss is L_AT + L_VR on the last layer.

  Args:
    student_values: `[B, L, heads, d_s]` values (the `layer{i}/values` activation).
    teacher_values: `[B, L, heads, d_t]`; batch, tokens and heads must equal the student's.
    where: optional boolean `[B, L]` token mask.

  Returns:
    `[B]` float32, ≥ 0.
  """
  s, t = jnp.shape(student_values), jnp.shape(teacher_values)
  if len(s) != 4 or len(t) != 4:
    raise ValueError(f"value_relation expects [batch, L, heads, d_head] values, got student {s}, teacher {t}")
  if s[:3] != t[:3]:
    raise ValueError(f"student values {s} and teacher values {t} differ in batch, tokens or heads: MiniLM's value "
                     "relation pairs heads one to one (use relation_kl to re-split into relation heads)")
  keep = _token_mask(where, s[0], s[1])
  to_heads = lambda v: jnp.swapaxes(_cast(v), 1, 2)
  return _relation_kl(to_heads(student_values), to_heads(teacher_values), keep)


def _relation_kl(student: Array, teacher: Array, keep: Array) -> Array:
  """Mean KL(teacher relation ‖ student relation) for `[B, h, L, d]` head-split vectors."""
  return _mean_row_kl(_relation_log_probs(student, keep), _relation_log_probs(teacher, keep), keep)


def _relation_heads(x: Array, num_heads: int, who: str) -> Array:
  """`[B, L, H, d]` or `[B, L, H·d]` -> `[B, r, L, H·d/r]`: concatenate the heads, split into r relation heads."""
  x = _cast(x)
  if x.ndim == 4:
    x = x.reshape(x.shape[0], x.shape[1], -1)
  elif x.ndim != 3:
    raise ValueError(f"{who} vectors must be [batch, L, heads, d_head] or [batch, L, width], got {x.shape}")
  batch, length, width = x.shape
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
    raise ValueError(f"{who} width {width} (heads × head size) must split into num_relation_heads={num_heads!r} "
                     "equal relation heads")
  return jnp.swapaxes(x.reshape(batch, length, num_heads, width // num_heads), 1, 2)


def relation_kl(student_x: Array, teacher_x: Array, *, num_relation_heads: int,
                where: Optional[Array] = None) -> Array:
  """MiniLMv2's multi-head self-attention relation (Wang et al. 2021) for Q-Q, K-K or V-V.

  The queries (or keys, or values) of all attention heads are concatenated to `[B, L, H·d]` and split
  again into r relation heads of width d_r = H·d / r, so teacher and student may have different head
  counts and widths (only r is shared). Per relation head a,

      R_a = softmax(X_a X_aᵀ / √d_r),   L = 1/(r·|x|) Σ_a Σ_t KL(R^T_{a,t} ‖ R^S_{a,t}),

  with each model's own d_r. With r equal to both models' head count this is MiniLM's value relation
  per attention head. MiniLMv2 sums the Q-Q, K-K and V-V terms (`minilmv2_loss`), taking the student's
  last layer and, for large teachers, an upper-middle teacher layer (`layer_map(mode="custom")`).

  Args:
    student_x: `[B, L, H_s, d_s]` (a `layer{i}/queries|keys|values` activation) or `[B, L, H_s·d_s]`.
    teacher_x: `[B, L, H_t, d_t]` or `[B, L, H_t·d_t]`.
    num_relation_heads: r; both widths must be divisible by it.
    where: optional boolean `[B, L]` token mask.

  Returns:
    `[B]` float32, ≥ 0.
  """
  student = _relation_heads(student_x, num_relation_heads, "student")
  teacher = _relation_heads(teacher_x, num_relation_heads, "teacher")
  if student.shape[:3] != teacher.shape[:3]:
    raise ValueError(f"student {jnp.shape(student_x)} and teacher {jnp.shape(teacher_x)} differ in batch or tokens")
  keep = _token_mask(where, student.shape[0], student.shape[2])
  return _relation_kl(student, teacher, keep)


def minilmv2_loss(student_qkv: Mapping[str, Array], teacher_qkv: Mapping[str, Array], *, num_relation_heads: int,
                  where: Optional[Array] = None) -> Array:
  """MiniLMv2's objective: the Q-Q, K-K and V-V relation KLs summed with weight 1 each.

  Args:
    student_qkv: `{'queries', 'keys', 'values'}` -> `[B, L, H_s, d_s]` of the chosen student layer.
    teacher_qkv: the same keys for the chosen teacher layer.
    num_relation_heads: r, shared by the three relations.
    where: optional boolean `[B, L]` token mask.

  Returns:
    `[B]` float32.
  """
  for who, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
    missing = [name for name in MINILMV2_RELATIONS if name not in qkv]
    if missing:
      raise ValueError(f"{who} activations lack {missing}: minilmv2_loss needs {list(MINILMV2_RELATIONS)}, "
                       f"got {sorted(qkv)}")
  return sum(relation_kl(student_qkv[name], teacher_qkv[name], num_relation_heads=num_relation_heads, where=where)
             for name in MINILMV2_RELATIONS)


def layer_map(num_student_layers: int, num_teacher_layers: int, mode: str = "uniform",
              custom: Optional[Union[Mapping[int, int], Sequence[tuple[int, int]]]] = None
              ) -> tuple[tuple[int, int], ...]:
  """Which teacher layer each distilled student layer learns from, as 0-based (student, teacher) pairs.

  Modes:
    * "uniform": TinyBERT's (Jiao et al. 2020) g(m) = m·N/M for student layers m = 1..M of a teacher
      with N layers, 1-based as in the paper, floored when M does not divide N; needs M ≤ N. Returned
      0-based: ((0, N/M − 1), …, (M − 1, N − 1)).
    * "last": MiniLM's single pair (last student layer, last teacher layer).
    * "custom": the pairs given in `custom` (a {student: teacher} mapping or a sequence of pairs),
      e.g. MiniLMv2's upper-middle teacher layer for large teachers: custom={M − 1: 20} for a 24-layer
      teacher.

  Returns:
    Pairs sorted by student layer; indices match `kdjax.models.capture` names `layer{i}/...`.
  """
  for name, value in (("num_student_layers", num_student_layers), ("num_teacher_layers", num_teacher_layers)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if mode not in LAYER_MAP_MODES:
    raise ValueError(f"unknown layer_map mode {mode!r}; known modes: {list(LAYER_MAP_MODES)}")
  if (custom is not None) != (mode == "custom"):
    raise ValueError("layer_map takes `custom` exactly when mode='custom'")
  m, n = num_student_layers, num_teacher_layers
  if mode == "last":
    return ((m - 1, n - 1),)
  if mode == "uniform":
    if m > n:
      raise ValueError(f"uniform layer map needs at most as many student layers ({m}) as teacher layers ({n})")
    return tuple((layer - 1, layer * n // m - 1) for layer in range(1, m + 1))
  pairs = list(custom.items()) if isinstance(custom, Mapping) else [tuple(pair) for pair in custom]
  if not pairs:
    raise ValueError("custom layer map is empty")
  for pair in pairs:
    if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
      raise ValueError(f"custom layer map entries must be (student, teacher) int pairs, got {pair!r}")
    if not (0 <= pair[0] < m and 0 <= pair[1] < n):
      raise ValueError(f"custom layer pair {pair} is out of range: student layers are 0..{m - 1}, "
                       f"teacher layers 0..{n - 1}")
  students = [pair[0] for pair in pairs]
  if len(set(students)) != len(students):
    raise ValueError(f"custom layer map names a student layer twice: {pairs}")
  return tuple(sorted(pairs))


# ------------------------------------------------------------------------------------------------
# TRG: token-level relationship graph.


def tokens_from_feature_map(features: Array, *, patch_size: int = 1) -> Array:
  """Cuts a CNN feature map `[B, H, W, C]` into tokens `[B, (H/p)·(W/p), p·p·C]` (TRG's CNN tokens).

  TRG tokenises the penultimate feature map into fixed-size patches; each token here is the flattened
  p×p×C patch (p = 1: one token per spatial position). A ViT's patch tokens need no cutting.
  """
  if jnp.ndim(features) != 4:
    raise ValueError(f"tokens_from_feature_map expects an NHWC feature map, got shape {jnp.shape(features)}")
  b, h, w, c = jnp.shape(features)
  bad_size = isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
  if bad_size or h % patch_size or w % patch_size:
    raise ValueError(f"feature map {jnp.shape(features)} does not tile into {patch_size}x{patch_size} patches")
  x = jnp.reshape(features, (b, h // patch_size, patch_size, w // patch_size, patch_size, c))
  return jnp.reshape(jnp.transpose(x, (0, 1, 3, 2, 4, 5)), (b, -1, patch_size * patch_size * c))


def sample_tokens(key: Array, *arrays: Array, num_tokens: int,
                  where: Optional[Array] = None) -> tuple[tuple[Array, ...], Array]:
  """Samples the same `num_tokens` token positions of every example from each `[B, L, ...]` array.

  TRG builds its graph from a random subset of each image's tokens (all B·L tokens would make the graph
  too large). Kept tokens are drawn first, uniformly without replacement; an example with fewer kept
  tokens than `num_tokens` is filled with dropped ones, marked False in the returned mask.

  Returns:
    (the arrays gathered to `[B, num_tokens, ...]`, boolean mask `[B, num_tokens]`).
  """
  if not arrays:
    raise ValueError("sample_tokens needs at least one array")
  batch, length = jnp.shape(arrays[0])[:2]
  for x in arrays:
    if tuple(jnp.shape(x)[:2]) != (batch, length):
      raise ValueError(f"arrays differ in [batch, tokens]: {[jnp.shape(a) for a in arrays]}")
  if not 1 <= num_tokens <= length:
    raise ValueError(f"num_tokens={num_tokens} must be in [1, {length}]")
  keep = _token_mask(where, batch, length)
  priority = jnp.where(keep, jax.random.uniform(key, (batch, length)), -1.0)
  _, index = jax.lax.top_k(priority, num_tokens)
  gather = lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)
  return tuple(gather(jnp.asarray(x)) for x in arrays), jnp.take_along_axis(keep, index, axis=1)


def _flat_tokens(x: Array, keep: Array) -> Array:
  """`[B, L, D]` -> `[B·L, D]` with dropped tokens zeroed."""
  x = _zero_dropped(_cast(x), keep)
  return x.reshape(-1, x.shape[-1])


def _check_tokens(student_h: Array, teacher_h: Array, where: Optional[Array], same_width: bool = False) -> Array:
  s, t = jnp.shape(student_h), jnp.shape(teacher_h)
  if len(s) != 3 or len(t) != 3 or s[:2] != t[:2]:
    raise ValueError(f"token features must be [batch, L, D] with the same batch and L; got student {s}, teacher {t}")
  if same_width and s[-1] != t[-1]:
    raise ValueError(f"student width {s[-1]} != teacher width {t[-1]}: project the student tokens first")
  return _token_mask(where, s[0], s[1])


def _knn_graph_log_probs(x: Array, keep: Array, num_neighbors: int, sigma: float) -> Array:
  """log softmax_j(A_ij) over the other kept nodes, A the Gaussian kNN adjacency of the node features x."""
  sq = jnp.sum(x * x, axis=-1)
  dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  others = keep[:, None] & keep[None, :] & ~jnp.eye(x.shape[0], dtype=bool)
  closeness = jnp.where(others, -jax.lax.stop_gradient(dist2), -jnp.inf)
  # Row j of `nearest` marks j's k nearest nodes (ties at the k-th distance are all kept; with fewer than
  # k other kept nodes, all of them). A_ij is nonzero when T_i ∈ kNN(T_j): the transpose.
  kth = jax.lax.top_k(closeness, num_neighbors)[0][:, -1:]
  nearest = others & (closeness >= kth)
  adjacency = jnp.where(nearest.T, jnp.exp(-dist2 / (2.0 * sigma)), 0.0)
  return _row_log_softmax(adjacency, others)


def token_relation_graph(student_h: Array, teacher_h: Array, *, num_neighbors: int = 8, sigma: float = 1.0,
                         normalize: bool = True, where: Optional[Array] = None) -> Array:
  """TRG's local preserving loss: match the teacher's kNN token graph over the batch.

  The nodes are the kept tokens of all examples (sampled beforehand with `sample_tokens`); each model
  builds its own kNN graph with the Gaussian adjacency of the paper (Zhang, Liu & He 2023, eq. for A):

      A(T_i, T_j) = exp(−‖T_i − T_j‖² / (2σ))  if T_i ∈ kNN(T_j) (Euclidean),  0 otherwise,
      L_local = mean_i KL( softmax_j A^T_ij ‖ softmax_j A^S_ij ).

  TRG trains on L_logit + α·L_inner (`contextual_loss`) + β·L_local (this) + γ·L_global (`token_contrast`).

  Readings chosen (the paper's text leaves them open):
    * The paper writes the sum as KL(softmax A^S ‖ softmax A^T); we take the teacher as the target,
      KL(teacher ‖ student), as every other loss here (and PyTorch's `kl_div(log q_S, p_T)`) does.
    * The softmax runs over all other kept nodes j ≠ i with the adjacency values as logits, as written:
      a non-neighbour's logit is 0, not −inf.
    * The sum over nodes is a mean over kept nodes, so the weight β does not depend on how many tokens
      are sampled.
    * `normalize=True` (default) L2-normalises the tokens first, so one σ fits both models whatever their
      feature scales (unnormalised CNN features have squared distances in the hundreds, where the kernel
      underflows to 0 and the loss carries no signal). The student's dimension may differ from the
      teacher's: each graph lives in its own model's space.

  Args:
    student_h: `[B, L, D_s]` tokens (ViT patch tokens, `tokens_from_feature_map`, or sampled ones).
    teacher_h: `[B, L, D_t]`.
    num_neighbors: k of the kNN graph, 1 ≤ k < B·L (8 is our default: we found no value of k stated).
    sigma: the Gaussian bandwidth σ.
    normalize: L2-normalise the tokens before the distances.
    where: optional boolean `[B, L]`; dropped tokens are not nodes.

  Returns:
    A float32 scalar ≥ 0; 0 when fewer than two tokens are kept.
  """
  keep = _check_tokens(student_h, teacher_h, where).reshape(-1)
  if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or not 1 <= num_neighbors < keep.size:
    raise ValueError(f"num_neighbors={num_neighbors!r} must be an int in [1, {keep.size - 1}] (B·L − 1 nodes)")
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  keep_bl = keep.reshape(jnp.shape(student_h)[:2])

  def graph(h):
    x = _flat_tokens(h, keep_bl)
    return _knn_graph_log_probs(_l2_normalize(x) if normalize else x, keep, num_neighbors, sigma)

  kl = common.kl_from_log_probs(graph(teacher_h), graph(student_h))
  has_pairs = jnp.sum(keep) >= 2
  return jnp.where(has_pairs, common.masked_mean(kl, keep), 0.0)


def token_contrast(student_h: Array, teacher_h: Array, *, temperature, where: Optional[Array] = None) -> Array:
  """TRG's global relationship loss: InfoNCE between each student token and all teacher tokens.

      L_global = −mean_i log( exp(sim(S_i, T_i)/τ_g) / Σ_j exp(sim(S_i, T_j)/τ_g) ),

  over the kept tokens i, j of the whole batch, sim the cosine similarity. The student tokens must
  already be projected to the teacher's width (a linear map the strategy owns). TRG anneals τ_g from
  high (coarse structure) to low (hard negatives) during training: pass the scheduled value.

  Returns:
    A float32 scalar; 0 when no token is kept.
  """
  keep_bl = _check_tokens(student_h, teacher_h, where, same_width=True)
  keep = keep_bl.reshape(-1)
  s = _l2_normalize(_flat_tokens(student_h, keep_bl))
  t = _l2_normalize(_flat_tokens(teacher_h, keep_bl))
  log_probs = _row_log_softmax(s @ t.T / temperature, keep[None, :])
  return common.masked_mean(-jnp.diagonal(log_probs), keep)


def contextual_loss(student_h: Array, teacher_h: Array, *, where: Optional[Array] = None) -> Array:
  """TRG's contextual (inner-instance) loss: the tokens' self-similarity inside each image.

      CS = softmax(F Fᵀ / √D) (rows over the image's kept tokens),   L_inner = MSE(CS^T, CS^S),

  with F an example's `[L, D]` tokens and D each model's own width, the mean squared difference taken
  over the n × n kept (query, key) pairs of each example.

  Args:
    student_h: `[B, L, D_s]`.
    teacher_h: `[B, L, D_t]`.
    where: optional boolean `[B, L]`.

  Returns:
    `[B]` float32, ≥ 0.
  """
  keep = _check_tokens(student_h, teacher_h, where)
  similarity = lambda h: jnp.exp(_relation_log_probs(_cast(h)[:, None], keep))[:, 0]
  pair = keep[:, :, None] & keep[:, None, :]
  squares = jnp.where(pair, (similarity(teacher_h) - similarity(student_h)) ** 2, 0.0)
  return jnp.sum(squares, axis=(1, 2)) / jnp.maximum(jnp.sum(pair, axis=(1, 2)), 1)


# ------------------------------------------------------------------------------------------------
# Distiller's MI-α.


def _leave_one_out_logsumexp(scores: Array, keep_columns: Array) -> Array:
  """log Σ_{k ≠ j, k kept} exp(s_ik) for every (i, j), exactly and in O(B²).

  Off the row's largest entry, exp(s_ij − lse_i) ≤ ½, so log(e^lse − e^s_ij) = lse + log1p(−exp(s_ij − lse))
  is well conditioned; at the largest entry the row's logsumexp without it is computed directly.
  """
  masked = jnp.where(keep_columns, scores, -jnp.inf)
  lse = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
  is_top = jnp.arange(scores.shape[-1]) == jnp.argmax(masked, axis=-1)[:, None]
  without_top = jnp.where(is_top, -jnp.inf, masked)
  share = jnp.exp(without_top - lse)  # 0 at the top entry, so log1p below never sees −1
  return jnp.where(is_top, jax.nn.logsumexp(without_top, axis=-1, keepdims=True), lse + jnp.log1p(-share))


def mi_alpha(student_h: Array, teacher_h: Array, *, alpha, critic_weight: Optional[Array] = None,
             log_baseline=1.0, where: Optional[Array] = None) -> Array:
  """Distiller's MI-α loss (He et al. 2021): −I_α, Poole et al.'s (2019) interpolated MI lower bound.

  With critic scores f_ij = f(x_j, y_i) between student representation x_j and teacher representation
  y_i of a batch of K examples (K ≥ 2 kept), the bound is

      m_ij = α · (1/(K−1)) Σ_{k≠j} exp(f_ik) + (1 − α) · a(y_i),
      I_α = 1 + mean_{i≠j} [ f_ii − log m_ij ] − mean_{i≠j} [ exp(f_ij) / m_ii ],

  the InfoNCE baseline taken leave-one-out so that the bound stays valid. Its ends are the two bounds
  it interpolates:
    * α = 1: mean_{i≠j} [ f_ii − log (1/(K−1)) Σ_{k≠j} e^{f_ik} ], InfoNCE with K − 1 candidates
      averaged over the held-out one (the marginal term is exactly 1); low variance, biased (≤ log(K−1)).
    * α = 0: 1 + mean_i [ f_ii − log a(y_i) ] − mean_{i≠j} e^{f_ij} / a(y_i), the TUBA bound; with the
      default log a = 1 (a = e) it is NWJ: mean_i f_ii − e^{−1} mean_{i≠j} e^{f_ij}; unbiased, high
      variance.
  Distiller's reference code (`mi_loss` in its textbrewer fork) passes its α to Poole's
  `interpolated_lower_bound` as the *logit* of this weight; here α is the weight itself, so their α = a
  corresponds to alpha = sigmoid(a) (their 0 is 0.5 here).

  The critic is a pure function of its parameters, which the strategy owns and trains jointly with the
  student (both maximise the bound): f_ij = y_i · x_j (dot product, equal widths: project the student
  first) or, with `critic_weight` W `[D_t, D_s]`, the bilinear f_ij = y_iᵀ W x_j. Representations of
  rank > 2 are flattened per example, as Distiller does with `[B, L, D]` hidden states.

  Args:
    student_h: `[B, D_s]` (or `[B, ...]`) student representations x.
    teacher_h: `[B, D_t]` (or `[B, ...]`) teacher representations y.
    alpha: the interpolation weight in [0, 1] (Python or traced).
    critic_weight: optional bilinear critic `[D_t, D_s]`.
    log_baseline: log a(y_i), a scalar or `[B]` (e.g. a small baseline network of the teacher features);
      only used where α < 1.
    where: optional boolean `[B]`; dropped examples are in no pair.

  Returns:
    The loss −I_α, a float32 scalar; 0 when fewer than two examples are kept.
  """
  s, t = _cast(student_h), _cast(teacher_h)
  if s.ndim < 2 or t.ndim < 2 or s.shape[0] != t.shape[0]:
    raise ValueError(f"mi_alpha needs [batch, ...] representations with one batch size; got student {s.shape}, "
                     f"teacher {t.shape}")
  batch = s.shape[0]
  if batch < 2:
    raise ValueError(f"mi_alpha needs at least 2 examples to form negative pairs, got batch {batch}")
  s, t = s.reshape(batch, -1), t.reshape(batch, -1)
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"mi_alpha needs alpha in [0, 1], got {alpha}")
  if where is not None and tuple(jnp.shape(where)) != (batch,):
    raise ValueError(f"`where` has shape {jnp.shape(where)}, expected ({batch},)")
  keep = jnp.ones((batch,), bool) if where is None else jnp.asarray(where, bool)
  # Dropped examples are zeroed before the critic, so that garbage in them cannot reach the gradient.
  s, t = jnp.where(keep[:, None], s, 0.0), jnp.where(keep[:, None], t, 0.0)
  if critic_weight is None:
    if s.shape[1] != t.shape[1]:
      raise ValueError(f"the dot-product critic needs equal widths, got student {s.shape[1]} and teacher "
                       f"{t.shape[1]}: project the student or pass critic_weight [D_t, D_s]")
    scores = t @ s.T
  else:
    if jnp.shape(critic_weight) != (t.shape[1], s.shape[1]):
      raise ValueError(f"critic_weight has shape {jnp.shape(critic_weight)}, expected [D_t, D_s] = "
                       f"{(t.shape[1], s.shape[1])}")
    scores = t @ _cast(critic_weight) @ s.T
  log_a = _cast(log_baseline)
  if log_a.shape not in ((), (batch,)):
    raise ValueError(f"log_baseline must be a scalar or [batch] = ({batch},), got shape {log_a.shape}")
  count = jnp.sum(keep, dtype=scores.dtype)
  usable = count >= 2
  # Below two kept examples the bound is undefined: compute on everything (finite) and return 0.
  keep = jnp.where(usable, keep, True)
  count = jnp.where(usable, count, batch)

  nce_baseline = _leave_one_out_logsumexp(scores, keep[None, :]) - jnp.log(count - 1.0)
  log_m = common.log_mixture(nce_baseline, jnp.broadcast_to(log_a, (batch,))[:, None], alpha)
  pairs = keep[:, None] & keep[None, :] & ~jnp.eye(batch, dtype=bool)
  log_num_pairs = jnp.log(count) + jnp.log(count - 1.0)
  joint = jnp.sum(jnp.where(pairs, jnp.diagonal(scores)[:, None] - log_m, 0.0)) / jnp.exp(log_num_pairs)
  marginal = jnp.exp(jax.nn.logsumexp(jnp.where(pairs, scores - jnp.diagonal(log_m)[:, None], -jnp.inf))
                     - log_num_pairs)
  return jnp.where(usable, -(1.0 + joint - marginal), 0.0)
