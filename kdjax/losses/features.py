"""Feature, attention and relation distillation losses (representation KD).

Conventions (as the logit losses in `kdjax.losses`): pure array functions, student first and
teacher second, keyword-only options, float32 (or wider) arithmetic whatever the input dtype.

  * Feature maps are NHWC `[B, H, W, C]`; feature vectors are `[B, D]`. Losses that compare one
    example with its own teacher return one value per example (`[B]`, or `[...]` positions for
    `hidden_state_loss` and `sinkhorn_distance`) and leave the reduction to the caller
    (`kdjax.losses.masked_sum_count`); masked examples give exactly 0.
  * Relation losses (RKD, PKT, SP, CC, CRD) are defined over the batch and return a scalar. Their
    `where` drops rows: the value equals the loss of the batch with the masked rows removed, and an
    all-masked batch (or too few rows to form a pair) gives 0.
  * Masked rows are replaced by zeros before any arithmetic, so garbage (NaN) in padding rows cannot
    reach values or gradients. Norms are guarded: an all-zero vector (a dead ReLU channel, two
    identical examples) normalises to 0 with a zero gradient instead of NaN.
  * The teacher gets no special treatment: strategies pass teacher outputs that carry no gradient.
    Learned regressors / embedding heads (FitNet, CRD, CC) belong to the strategy.

`CIFAR100_WEIGHTS` holds the loss weight each method's reference code uses on CIFAR-100 (RepDistiller,
`scripts/run_cifar_distill.sh`, with the student's cross-entropy at weight 1 and no KD term), so a
config can quote the published recipe instead of retyping numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common

Array = jax.Array

# The weight β of each loss in the reference CIFAR-100 recipes (RepDistiller `train_student.py -b β`
# unless said otherwise). They are calibrated for exactly the normalisations implemented here.
CIFAR100_WEIGHTS = {
    "fitnet_hint": 100.0,
    "attention_transfer": 1000.0,
    # RKDLoss is used with -b 1 and weighs its two terms internally: 25·distance + 50·angle.
    "rkd_distance": 25.0,
    "rkd_angle": 50.0,
    "pkt": 30000.0,
    "similarity_preserving": 3000.0,
    # RepDistiller's Correlation module is the author-supplied estimator (`form="repdistiller"`).
    "correlation_congruence/repdistiller": 0.02,
    # Knowledge-Distillation-Zoo (AberHu) weighs the paper's Taylor-kernel form by 100 (its
    # CIFAR-10 script; there is no CIFAR-100 recipe for that form).
    "correlation_congruence/taylor": 100.0,
    "nst": 50.0,
    "crd": 0.8,
    # Wang et al. 2023's KD++ (resnet56 -> resnet20); their CIFAR scripts use 0.5-4.0 per pair.
    "norm_direction": 2.0,
}

_NORM_EPS = 1e-12  # torch.nn.functional.normalize's clamp, which every reference uses


# ----------------------------------------------------------------------------------------------
# Shared plumbing.


def _float(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(common.compute_dtype(x.dtype))


def _safe_norm(x: Array, axis=-1, keepdims: bool = False) -> Array:
  """Euclidean norm whose gradient at the zero vector is 0 (jnp.linalg.norm's is NaN there)."""
  squares = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def _normalize(x: Array, axis=-1, eps: float = _NORM_EPS) -> Array:
  """x / max(‖x‖, eps), torch's `F.normalize`: a zero vector stays 0, with a finite gradient."""
  return x / jnp.maximum(_safe_norm(x, axis, keepdims=True), eps)


def _check_where(where: Optional[Array], batch: int, name: str) -> None:
  if where is not None and tuple(jnp.shape(where)) != (batch,):
    raise ValueError(f"{name}: `where` must be a boolean [B] row mask with B={batch}, got shape {jnp.shape(where)}")


def _check_same_shape(name: str, student, teacher) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(f"{name}: student shape {jnp.shape(student)} != teacher shape {jnp.shape(teacher)}; "
                     "project the student first (the strategy's learned regressor)")


def _check_maps(name: str, student, teacher) -> None:
  s, t = jnp.shape(student), jnp.shape(teacher)
  if len(s) != 4 or len(t) != 4 or s[0] != t[0]:
    raise ValueError(f"{name} needs NHWC feature maps [B, H, W, C] with the same B; got student {s}, teacher {t}")


def _rows(name: str, student, teacher, where) -> tuple[Array, Array, Array]:
  """Flattens both to [B, D_s], [B, D_t], zeroes masked rows; returns them and the float row mask."""
  s, t = jnp.shape(student), jnp.shape(teacher)
  if len(s) < 2 or len(t) < 2 or s[0] != t[0]:
    raise ValueError(f"{name} relates the examples of one batch: student {s} and teacher {t} need the "
                     "same leading batch axis and at least one feature axis")
  _check_where(where, s[0], name)
  keep = jnp.ones((s[0],), jnp.float32) if where is None else jnp.asarray(where).astype(jnp.float32)
  flat = lambda x: jnp.where(keep[:, None] > 0, _float(x).reshape(s[0], -1), 0.0)
  return flat(student), flat(teacher), keep


def _zero_masked(x: Array, where: Optional[Array]) -> Array:
  """Casts and zeroes the masked examples (leading axis / axes of `where`)."""
  x = _float(x)
  if where is None:
    return x
  w = jnp.asarray(where).reshape(jnp.shape(where) + (1,) * (x.ndim - jnp.ndim(where)))
  return jnp.where(w, x, 0.0)


def _pool_to_match(name: str, student: Array, teacher: Array) -> tuple[Array, Array]:
  """Average-pools the larger spatial map down to the smaller one, axis by axis.

  RepDistiller (AT, NST) applies `adaptive_avg_pool2d` to the larger map; for an integer size ratio
  that is the mean over non-overlapping blocks, done here. A non-integer ratio would make adaptive
  pooling use overlapping, uneven windows, so it is refused.
  """
  def pool(x, axis, size):
    factor = x.shape[axis] // size
    shape = x.shape[:axis] + (size, factor) + x.shape[axis + 1:]
    return x.reshape(shape).mean(axis=axis + 1)

  for axis in (1, 2):
    big, small = max(student.shape[axis], teacher.shape[axis]), min(student.shape[axis], teacher.shape[axis])
    if big % small:
      raise ValueError(f"{name}: spatial sizes of student {student.shape} and teacher {teacher.shape} differ by a "
                       "non-integer factor; pool or resize one of them first")
    if student.shape[axis] > small:
      student = pool(student, axis, small)
    if teacher.shape[axis] > small:
      teacher = pool(teacher, axis, small)
  return student, teacher


def _huber(x: Array) -> Array:
  """Smooth-L1 with δ = 1 (torch `F.smooth_l1_loss`): ½x² for |x| < 1, |x| − ½ beyond."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _pair_mean(values: Array, keep: Array) -> Array:
  """Σ over kept (i, j) of values[i, j] / n², n the number of kept rows (0 when none)."""
  n = jnp.sum(keep)
  weights = keep[:, None] * keep[None, :]
  return jnp.sum(weights * values) / jnp.maximum(n * n, 1.0)


# ----------------------------------------------------------------------------------------------
# Per-example losses: FitNet, attention transfer, NST, hidden states, ND.


def fitnet_hint(student: Array, teacher: Array, *, where: Optional[Array] = None) -> Array:
  """FitNets hint loss (Romero et al., ICLR 2015): mean squared error per example.

    L_b = 1/|F| Σ_f (u_s(x_b)_f − h_t(x_b)_f)²,

  with u_s the student's guided layer passed through the strategy's learned regressor (a conv or
  linear layer owned by the strategy), so both arrays must have the same shape. The mean over the
  batch of these values is RepDistiller's `HintLoss` (`nn.MSELoss`); its CIFAR-100 weight is
  `CIFAR100_WEIGHTS["fitnet_hint"]` = 100.

  Args:
    student: `[B, ...]` projected student features.
    teacher: `[B, ...]` teacher hint features, same shape.
    where: optional boolean `[B]` mask of examples to keep.

  Returns:
    `[B]` float32 values, ≥ 0, 0 at masked examples.
  """
  _check_same_shape("fitnet_hint", student, teacher)
  if jnp.ndim(student) < 1:
    raise ValueError("fitnet_hint needs a batch axis")
  _check_where(where, jnp.shape(student)[0], "fitnet_hint")
  diff = _zero_masked(student, where) - _zero_masked(teacher, where)
  values = jnp.mean(jnp.reshape(diff * diff, (diff.shape[0], -1)), axis=-1)
  return common.finish(values, where)


def _attention_map(features: Array, p: float) -> Array:
  """Q = mean_c |a_c|^p over channels, flattened per example and L2-normalised: [B, H·W]."""
  energy = jnp.mean(jnp.abs(features) ** p, axis=-1)
  return _normalize(energy.reshape(energy.shape[0], -1))


def attention_transfer(student: Array, teacher: Array, *, p: float = 2.0, where: Optional[Array] = None) -> Array:
  """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017).

  The spatial attention map of a layer is Q = vec(mean_c |A_c|^p) (the paper's F^p_mean; the mean
  and the sum over channels agree after normalisation), and

    L_b = 1/(H·W) Σ_k ( Q_s,k/‖Q_s‖₂ − Q_t,k/‖Q_t‖₂ )².

  Reading: RepDistiller's / mdistiller's `at_loss`, the mean of the squared difference over positions,
  which its CIFAR-100 weight β = 1000 (`CIFAR100_WEIGHTS["attention_transfer"]`) is calibrated for;
  the paper writes β/2 · ‖·‖_p (not squared, summed over layer pairs). Channel counts may differ
  (the map averages them out). When the spatial sizes differ, the larger map is average-pooled
  down to the smaller one (RepDistiller's `adaptive_avg_pool2d`; integer ratios only).

  Args:
    student: `[B, H_s, W_s, C_s]` student activations (NHWC).
    teacher: `[B, H_t, W_t, C_t]` teacher activations.
    p: the exponent (> 0); the paper and reference use 2.
    where: optional boolean `[B]` mask of examples to keep.

  Returns:
    `[B]` float32 values in [0, 4/(H·W)], 0 at masked examples.
  """
  _check_maps("attention_transfer", student, teacher)
  if not p > 0:
    raise ValueError(f"attention_transfer needs p > 0, got {p}")
  _check_where(where, jnp.shape(student)[0], "attention_transfer")
  s, t = _pool_to_match("attention_transfer", _zero_masked(student, where), _zero_masked(teacher, where))
  values = jnp.mean((_attention_map(s, p) - _attention_map(t, p)) ** 2, axis=-1)
  return common.finish(values, where)


def nst(student: Array, teacher: Array, *, where: Optional[Array] = None) -> Array:
  """Neuron selectivity transfer (Huang & Wang 2017, "Like What You Like").

  Each channel of a layer is one sample of the layer's "neuron selectivity" distribution: its
  spatial activation vector f_i ∈ R^{H·W}, L2-normalised. NST matches the student's and teacher's
  channel distributions by the squared maximum mean discrepancy with the polynomial kernel
  k(x, y) = (xᵀy + c)^d, d = 2, c = 0 (the paper's best kernel):

    L_b = 1/C_t² Σ_ij k(t_i, t_j) + 1/C_s² Σ_ij k(s_i, s_j) − 2/(C_s·C_t) Σ_ij k(s_i, t_j),

  the biased (V-statistic) estimate ≥ 0, which is RepDistiller's `nst_loss` with `full_loss=True`
  (its CIFAR-100 weight, `CIFAR100_WEIGHTS["nst"]` = 50; the paper writes λ/2 · MMD²). Channel
  counts may differ; spatial sizes are matched by pooling the larger map as `attention_transfer` does.

  Args:
    student: `[B, H_s, W_s, C_s]` (NHWC).
    teacher: `[B, H_t, W_t, C_t]`.
    where: optional boolean `[B]` mask of examples to keep.

  Returns:
    `[B]` float32 values, ≥ 0 up to rounding, 0 at masked examples.
  """
  _check_maps("nst", student, teacher)
  _check_where(where, jnp.shape(student)[0], "nst")
  s, t = _pool_to_match("nst", _zero_masked(student, where), _zero_masked(teacher, where))
  # [B, H·W, C], each channel's spatial vector normalised.
  s = _normalize(s.reshape(s.shape[0], -1, s.shape[-1]), axis=1)
  t = _normalize(t.reshape(t.shape[0], -1, t.shape[-1]), axis=1)

  def mean_kernel(a, b):
    return jnp.mean(jnp.einsum("bpi,bpj->bij", a, b) ** 2, axis=(1, 2))

  values = mean_kernel(t, t) + mean_kernel(s, s) - 2.0 * mean_kernel(s, t)
  return common.finish(values, where)


def hidden_state_loss(student: Array, teacher: Array, *, kind: str = "cosine",
                      where: Optional[Array] = None) -> Array:
  """Per-position hidden-state matching of transformer distillation.

    kind="cosine":  1 − cos(h_s, h_t) = 1 − h_sᵀh_t / (max(‖h_s‖, ε)·max(‖h_t‖, ε))   (DistilBERT,
                    Sanh et al. 2019: `CosineEmbeddingLoss` with target 1 on the last hidden states)
    kind="mse":     1/D Σ_d (h_s,d − h_t,d)²   (TinyBERT, Jiao et al. 2020, with the student's
                    states already mapped to the teacher's width by the strategy's learned W_h)

  The mean over positions of either is the reference's `reduction="mean"` value. A zero vector (a
  padding embedding) has cosine 0 and a zero gradient, not NaN.

  Args:
    student: `[..., D]` student hidden states (projected to the teacher's width).
    teacher: `[..., D]` teacher hidden states, same shape.
    kind: "cosine" or "mse".
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 values (cosine in [0, 2], mse ≥ 0), 0 at masked positions.
  """
  _check_same_shape("hidden_state_loss", student, teacher)
  if jnp.ndim(student) < 1:
    raise ValueError("hidden_state_loss needs a feature axis")
  common.check_where(where, jnp.shape(student)[:-1])
  s, t = _zero_masked(student, where), _zero_masked(teacher, where)
  if kind == "cosine":
    values = 1.0 - jnp.sum(_normalize(s) * _normalize(t), axis=-1)
  elif kind == "mse":
    values = jnp.mean((s - t) ** 2, axis=-1)
  else:
    raise ValueError(f"hidden_state_loss: unknown kind {kind!r}; choose 'cosine' or 'mse'")
  return common.finish(values, where)


def class_sums(features: Array, labels: Array, num_classes: int, *,
               where: Optional[Array] = None) -> tuple[Array, Array]:
  """Per-class feature sums and example counts, `([K, D], [K])`, to accumulate over a dataset.

  Sums and counts add across batches and devices, so class means over a whole training set are
  Σ sums / Σ counts however the batches fall (see `class_means`).
  """
  f = _float(features)
  if f.ndim != 2:
    raise ValueError(f"class_sums needs features [B, D], got shape {f.shape}")
  if jnp.shape(labels) != (f.shape[0],):
    raise ValueError(f"labels shape {jnp.shape(labels)} must be [B] = ({f.shape[0]},) for features {f.shape}")
  _check_where(where, f.shape[0], "class_sums")
  onehot = jax.nn.one_hot(labels, num_classes, dtype=f.dtype)
  if where is not None:
    onehot = onehot * jnp.asarray(where)[:, None]
    f = jnp.where(jnp.asarray(where)[:, None], f, 0.0)
  return onehot.T @ f, jnp.sum(onehot, axis=0)


def class_means(features: Array, labels: Array, num_classes: int, *, where: Optional[Array] = None) -> Array:
  """Class centres c_k = mean of the features of class k, `[K, D]` (0 for a class with no example).

  ND (Wang et al. 2023) takes c_k from the teacher's penultimate features over the whole training
  set (their `emb_fea_distribution.py`, every training image, no filtering by correctness). For a
  dataset larger than one batch accumulate `class_sums` and divide at the end.
  """
  sums, counts = class_sums(features, labels, num_classes, where=where)
  return sums / jnp.maximum(counts, 1.0)[:, None]


def norm_direction(student: Array, teacher_class_means: Array, labels: Array, *, teacher: Array,
                   eps: float = _NORM_EPS, where: Optional[Array] = None) -> Array:
  """ND loss of Wang et al. (NeurIPS 2023), "Improving Knowledge Distillation via Regularizing
  Feature Norm and Direction" (the "++" of KD++, DKD++, ...).

  With e_y = c_y / ‖c_y‖ the unit direction of the teacher's class centre for the example's label:

    L_b = 1 − ⟨f_s, e_y⟩ / max(‖f_s‖, ‖f_t‖).

  When the student's norm is below the teacher's, the loss is 1 − (‖f_s‖/‖f_t‖)·cos(f_s, e_y): it
  rewards both a direction along the class centre and a larger norm (up to the teacher's); beyond
  the teacher's norm it is 1 − cos(f_s, e_y). This is the authors' `DirectNormLoss.project_center`
  (the gradient flows through the max, as in their code); the mean over the batch is their value, and
  their weight for KD++ resnet56→resnet20 on CIFAR-100 is `CIFAR100_WEIGHTS["norm_direction"]` = 2.
  Features are the embeddings before the classifier; student and teacher must have the same width
  (the authors add a linear map to the student otherwise).

  Args:
    student: `[B, D]` student embeddings f_s.
    teacher_class_means: `[K, D]` teacher class centres (see `class_means`).
    labels: `[B]` integer class labels.
    teacher: `[B, D]` teacher embeddings f_t of the same examples (only their norms are used).
    eps: guard of the denominators (a zero centre or zero features give a finite value).
    where: optional boolean `[B]` mask of examples to keep.

  Returns:
    `[B]` float32 values in [0, 2], 0 at masked examples.
  """
  _check_same_shape("norm_direction", student, teacher)
  if jnp.ndim(student) != 2 or jnp.ndim(teacher_class_means) != 2:
    raise ValueError(f"norm_direction needs student [B, D] and class means [K, D]; got {jnp.shape(student)} "
                     f"and {jnp.shape(teacher_class_means)}")
  if jnp.shape(teacher_class_means)[1] != jnp.shape(student)[1]:
    raise ValueError(f"norm_direction: class means width {jnp.shape(teacher_class_means)[1]} != feature width "
                     f"{jnp.shape(student)[1]}")
  if jnp.shape(labels) != jnp.shape(student)[:1]:
    raise ValueError(f"norm_direction: labels shape {jnp.shape(labels)} must be [B] for student {jnp.shape(student)}")
  _check_where(where, jnp.shape(student)[0], "norm_direction")
  s, t = _zero_masked(student, where), _zero_masked(teacher, where)
  direction = _normalize(_float(teacher_class_means), eps=eps)[labels]
  scale = jnp.maximum(jnp.maximum(_safe_norm(s), _safe_norm(t)), eps)
  values = 1.0 - jnp.sum(s * direction, axis=-1) / scale
  return common.finish(values, where)


# ----------------------------------------------------------------------------------------------
# Relation losses over the batch: RKD, PKT, SP, CC.


def _normalized_distances(x: Array, keep: Array, eps: float) -> Array:
  """ψ_D(i, j) = ‖x_i − x_j‖ / μ, μ the mean distance over distinct kept pairs; 0 on the diagonal."""
  squares = jnp.sum(x * x, axis=-1)
  # The Gram form (RKD's reference `pdist`) keeps memory at B² instead of B²·D; the clamp (also
  # the reference's) keeps sqrt's gradient finite for coincident points.
  d2 = squares[:, None] + squares[None, :] - 2.0 * x @ x.T
  off_diagonal = 1.0 - jnp.eye(x.shape[0], dtype=x.dtype)
  d = jnp.sqrt(jnp.maximum(d2, eps)) * off_diagonal
  pairs = off_diagonal * keep[:, None] * keep[None, :]
  mu = jnp.sum(pairs * d) / jnp.maximum(jnp.sum(pairs), 1.0)
  return d / jnp.where(mu > 0, mu, 1.0)


def rkd_distance(student: Array, teacher: Array, *, eps: float = 1e-12, where: Optional[Array] = None) -> Array:
  """Distance-wise relational KD (Park et al., CVPR 2019).

    ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ,   μ = 1/|χ²| Σ_{i≠j} ‖x_i − x_j‖₂,
    L = 1/n² Σ_{i,j} Huber_δ=1( ψ_D(s_i, s_j) − ψ_D(t_i, t_j) ),

  over the n kept rows, features flattened per example. μ is the mean over distinct pairs (the
  reference's `d[d > 0].mean()`), and the Huber mean runs over all n² ordered pairs, diagonal
  included (its terms are 0), exactly as RepDistiller's / mdistiller's `F.smooth_l1_loss` on the
  [n, n] matrices; multiply by n/(n−1) for the mean over distinct pairs. Invariant to scaling either
  model's features. CIFAR-100 weight: 25 (`CIFAR100_WEIGHTS["rkd_distance"]`).

  Args:
    student: `[B, ...]` student features (any width).
    teacher: `[B, ...]` teacher features.
    eps: clamp of squared distances before the square root (the reference's 1e-12).
    where: optional boolean `[B]` row mask; masked rows are dropped from every pair.

  Returns:
    A float32 scalar (0 with fewer than two kept rows).
  """
  s, t, keep = _rows("rkd_distance", student, teacher, where)
  diff = _normalized_distances(s, keep, eps) - _normalized_distances(t, keep, eps)
  return _pair_mean(_huber(diff), keep)


def _anchor_cosines(x: Array) -> Array:
  """cos ∠(x_j, x_i, x_k) = ⟨e_ij, e_ik⟩ with e_ij = (x_j − x_i)/‖x_j − x_i‖, as [i, j, k]."""
  e = _normalize(x[None, :, :] - x[:, None, :])
  return jnp.einsum("ijd,ikd->ijk", e, e)


def rkd_angle(student: Array, teacher: Array, *, where: Optional[Array] = None) -> Array:
  """Angle-wise relational KD (Park et al., CVPR 2019).

    ψ_A(x_i, x_j, x_k) = cos ∠x_j x_i x_k = ⟨ (x_j − x_i)/‖x_j − x_i‖, (x_k − x_i)/‖x_k − x_i‖ ⟩,
    L = 1/n³ Σ_{i,j,k} Huber_δ=1( ψ_A(s_i, s_j, s_k) − ψ_A(t_i, t_j, t_k) ),

  anchored at x_i, over all n³ ordered triplets of kept rows. Degenerate triplets (j = i or k = i)
  have a zero edge vector, which normalises to 0 (torch's `F.normalize`), so they contribute 0 on
  both sides; this is RepDistiller's / mdistiller's angle term, mean over the full [n, n, n] tensor.
  Invariant to scaling (and translating) either model's features. Memory is B²·D for the edge
  vectors. CIFAR-100 weight: 50 (`CIFAR100_WEIGHTS["rkd_angle"]`).

  Args:
    student: `[B, ...]` student features.
    teacher: `[B, ...]` teacher features.
    where: optional boolean `[B]` row mask; masked rows are dropped from every triplet.

  Returns:
    A float32 scalar (0 when no row is kept).
  """
  s, t, keep = _rows("rkd_angle", student, teacher, where)
  n = jnp.sum(keep)
  weights = keep[:, None, None] * keep[None, :, None] * keep[None, None, :]
  values = _huber(_anchor_cosines(s) - _anchor_cosines(t))
  return jnp.sum(weights * values) / jnp.maximum(n**3, 1.0)


def pkt(student: Array, teacher: Array, *, eps: float = 1e-7, where: Optional[Array] = None) -> Array:
  """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

  Each model's features define conditional probabilities over the batch from the cosine kernel
  K(a, b) = (cos(a, b) + 1)/2 ∈ [0, 1]:

    p_{j|i} = K(t_i, t_j) / Σ_k K(t_i, t_k),     q_{j|i} the same from the student,
    L = 1/n² Σ_{i,j} p_{j|i} · log( (p_{j|i} + ε) / (q_{j|i} + ε) ),

  a KL(teacher ‖ student) per anchor i, averaged as the reference does (the torch `mean` over the
  [n, n] matrix, i.e. the summed KL divided by n², diagonal j = i included). Rows are normalised by
  ‖x‖ + ε first, as the authors' code. Feature widths may differ. CIFAR-100 weight: 30000
  (`CIFAR100_WEIGHTS["pkt"]`).

  Args:
    student: `[B, ...]` student features.
    teacher: `[B, ...]` teacher features.
    eps: the reference's 1e-7 guard in the norms and the logarithm.
    where: optional boolean `[B]` row mask; masked rows are dropped from every pair.

  Returns:
    A float32 scalar, ≥ 0 up to the ε guard; 0 when no row is kept.
  """
  s, t, keep = _rows("pkt", student, teacher, where)
  pair_keep = keep[:, None] * keep[None, :]

  def conditional(x):
    x = x / (_safe_norm(x, keepdims=True) + eps)
    kernel = pair_keep * (x @ x.T + 1.0) / 2.0
    return kernel / jnp.maximum(jnp.sum(kernel, axis=-1, keepdims=True), eps)

  p, q = conditional(t), conditional(s)
  return _pair_mean(p * (jnp.log(p + eps) - jnp.log(q + eps)), keep)


def similarity_preserving(student: Array, teacher: Array, *, where: Optional[Array] = None) -> Array:
  """Similarity-preserving KD (Tung & Mori, ICCV 2019).

  With Q the features flattened per example ([n, D]), G̃ = Q Qᵀ and G = G̃ with each row
  L2-normalised (G_[i,:] = G̃_[i,:] / ‖G̃_[i,:]‖₂):

    L = 1/n² ‖G_t − G_s‖_F²,

  the paper's eq. (4) for one layer pair and RepDistiller's `similarity_loss`. Feature widths may
  differ (the Gram matrices are n × n). Invariant to scaling either model's features and to
  permuting the batch. CIFAR-100 weight: 3000 (`CIFAR100_WEIGHTS["similarity_preserving"]`).

  Args:
    student: `[B, ...]` student features (maps or vectors).
    teacher: `[B, ...]` teacher features.
    where: optional boolean `[B]` row mask; masked rows are dropped from the Gram matrices.

  Returns:
    A float32 scalar in [0, 4/n]; 0 when no row is kept.
  """
  s, t, keep = _rows("similarity_preserving", student, teacher, where)
  gram = lambda x: _normalize(x @ x.T)  # masked rows are zero, so they leave kept rows' norms alone
  return _pair_mean((gram(t) - gram(s)) ** 2, keep)


def correlation_congruence(student: Array, teacher: Array, *, gamma: float = 0.4, order: int = 2,
                           form: str = "taylor", where: Optional[Array] = None) -> Array:
  """Correlation congruence KD (Peng et al., ICCV 2019).

  form="taylor" (the paper): features are L2-normalised embeddings f (RepDistiller and
  Knowledge-Distillation-Zoo pass them through a linear embedding head owned by the strategy), and
  the correlation between examples is the Gaussian RBF kernel exp(−γ‖f_i − f_j‖²) expanded to
  order P. For unit vectors ‖f_i − f_j‖² = 2 − 2 f_iᵀf_j, so

    k(f_i, f_j) ≈ Σ_{p=0..P} e^{−2γ} (2γ)^p / p! · (f_iᵀf_j)^p,
    L = 1/n² Σ_{i,j} ( k(s_i, s_j) − k(t_i, t_j) )²,

  the paper's L_CC = ‖ψ(F_t) − ψ(F_s)‖² / n², as implemented in Knowledge-Distillation-Zoo (γ = 0.4,
  P = 2, weight 100 there: `CIFAR100_WEIGHTS["correlation_congruence/taylor"]`).

  form="repdistiller": RepDistiller's `Correlation` module (code the authors emailed), which is a
  different estimator on the embeddings' difference Δ_b = |f_s,b − f_t,b| (same width required):

    L = 1/(n−1) Σ_{b=1..n−1} Σ_d Δ_b,d · Δ_{b+1},d,

  over consecutive kept rows in batch order (so it depends on the batch order); its CIFAR-100 weight
  0.02 (`CIFAR100_WEIGHTS["correlation_congruence/repdistiller"]`) belongs to this form only.

  Args:
    student: `[B, D_s]` student embeddings (flattened if more axes).
    teacher: `[B, D_t]` teacher embeddings.
    gamma: γ of the RBF kernel (taylor form).
    order: P, the Taylor order (taylor form), ≥ 0.
    form: "taylor" or "repdistiller".
    where: optional boolean `[B]` row mask; masked rows are dropped.

  Returns:
    A float32 scalar; 0 when no row (taylor) or fewer than two rows (repdistiller) are kept.
  """
  s, t, keep = _rows("correlation_congruence", student, teacher, where)
  if form == "taylor":
    if order < 0 or int(order) != order:
      raise ValueError(f"correlation_congruence needs an integer order >= 0, got {order}")

    def correlation(x):
      unit = _normalize(x)
      cos = unit @ unit.T
      return sum(math.exp(-2 * gamma) * (2 * gamma)**p / math.factorial(p) * cos**p for p in range(int(order) + 1))

    return _pair_mean((correlation(s) - correlation(t)) ** 2, keep)
  if form == "repdistiller":
    if s.shape != t.shape:
      raise ValueError(f"correlation_congruence(form='repdistiller') needs equal widths, got student "
                       f"{jnp.shape(student)} and teacher {jnp.shape(teacher)}")
    # Bring the kept rows to the front in their batch order, so that "consecutive" skips masked rows.
    order_kept = jnp.argsort(1.0 - keep, stable=True)
    delta = jnp.abs(s - t)[order_kept]
    n = jnp.sum(keep)
    valid = (jnp.arange(s.shape[0] - 1) < n - 1).astype(s.dtype)
    products = jnp.sum(delta[:-1] * delta[1:], axis=-1)
    return jnp.sum(valid * products) / jnp.maximum(n - 1.0, 1.0)
  raise ValueError(f"correlation_congruence: unknown form {form!r}; choose 'taylor' or 'repdistiller'")


# ----------------------------------------------------------------------------------------------
# Contrastive representation distillation (CRD) with a memory bank held by the strategy.


def crd_init_memory(key: Array, num_data: int, dim: int) -> Array:
  """A CRD memory bank `[N, D]`, uniform in [−σ, σ] with σ = 1/√(D/3), as RepDistiller's
  `ContrastMemory` (rows are not normalised until first written). Draw one per model."""
  bound = 1.0 / math.sqrt(dim / 3.0)
  return jax.random.uniform(key, (num_data, dim), jnp.float32, -bound, bound)


class NegativeTable(NamedTuple):
  """The dataset indices grouped by class, for drawing negatives of other classes (`crd_negative_table`)."""
  order: Array  # [N] dataset indices sorted by class
  start: Array  # [K] offset of each class in `order`
  count: Array  # [K] number of examples of each class


def crd_negative_table(dataset_labels: Array, num_classes: int) -> NegativeTable:
  """Groups a training set's indices by label once, for `crd_sample_negatives`."""
  labels = jnp.asarray(dataset_labels).astype(jnp.int32)
  if labels.ndim != 1:
    raise ValueError(f"crd_negative_table needs dataset labels [N], got shape {labels.shape}")
  count = jnp.bincount(labels, length=num_classes).astype(jnp.int32)
  start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(count)[:-1]])
  return NegativeTable(jnp.argsort(labels, stable=True).astype(jnp.int32), start, count)


def crd_sample_negatives(key: Array, labels: Array, num_negatives: int, table: NegativeTable) -> Array:
  """Draws `[B, K]` dataset indices of examples whose class differs from each row's label.

  RepDistiller's CIFAR-100 sampler ("exact" mode) draws the K negatives of an example from the
  examples of the other classes. Here each draw is uniform over those N − N_y examples, with
  replacement: r ~ U{0, …, N − N_y − 1} skips the block of class y in the class-sorted order. The
  reference draws without replacement when K ≤ N − N_y; i.i.d. draws are NCE's textbook noise
  samples and keep this jit-able. A fixed key gives the same negatives.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  n = table.order.shape[0]
  others = n - table.count[labels]                                       # [B]
  r = jax.random.randint(key, labels.shape + (num_negatives,), 0, jnp.maximum(others, 1)[:, None])
  start = table.start[labels][:, None]
  position = jnp.where(r < start, r, r + table.count[labels][:, None])
  return table.order[position]


def _crd_scores(anchor: Array, memory: Array, indices: Array, negative_indices: Array, temperature) -> Array:
  """s_bk = ⟨memory[idx_bk], anchor_b⟩ / τ for idx_b = (positive, negatives…): [B, 1 + K]."""
  idx = jnp.concatenate([indices[:, None], negative_indices], axis=1)
  rows = jax.lax.stop_gradient(_float(memory))[idx]  # the bank is state, never differentiated
  return jnp.einsum("bkd,bd->bk", rows, _float(anchor)) / temperature


def _crd_check(student_emb, teacher_emb, memory_student, memory_teacher, indices, negative_indices, where):
  shapes = [jnp.shape(x) for x in (student_emb, teacher_emb, memory_student, memory_teacher)]
  if any(len(x) != 2 for x in shapes) or len({x[1] for x in shapes}) != 1 or shapes[0][0] != shapes[1][0]:
    raise ValueError(f"CRD needs embeddings [B, D] and memories [N, D] of one width D; got student {shapes[0]}, "
                     f"teacher {shapes[1]}, memories {shapes[2]} and {shapes[3]}")
  if shapes[2][0] != shapes[3][0]:
    raise ValueError(f"CRD memories must have the same rows, got {shapes[2]} and {shapes[3]}")
  b = shapes[0][0]
  if jnp.shape(indices) != (b,) or jnp.ndim(negative_indices) != 2 or jnp.shape(negative_indices)[0] != b:
    raise ValueError(f"CRD needs indices [B] and negative_indices [B, K] with B={b}; got {jnp.shape(indices)} and "
                     f"{jnp.shape(negative_indices)}")
  _check_where(where, b, "crd")


def crd_log_z(student_emb: Array, teacher_emb: Array, memory_student: Array, memory_teacher: Array,
              indices: Array, negative_indices: Array, *, temperature: float = 0.07,
              num_data: Optional[int] = None, where: Optional[Array] = None) -> Array:
  """log of the NCE normalisation constants Z of CRD, `[2]` = (student anchor, teacher anchor).

  The reference fixes Z once, on its first batch, to the Monte-Carlo estimate of the partition
  function over the N memory entries: Z = N · mean_{b,k} exp(s_bk), the mean over the positive and
  negative scores of the batch. Compute it here on the first batch, store it in the strategy's state
  and pass it to every `crd_loss` call. Computed in log space (logsumexp), with no gradient; masked
  rows (`where=False`) are left out of the mean. Same arguments as `crd_loss`.
  """
  _crd_check(student_emb, teacher_emb, memory_student, memory_teacher, indices, negative_indices, where)
  num_data = jnp.shape(memory_student)[0] if num_data is None else num_data
  keep = jnp.ones(jnp.shape(indices), bool) if where is None else jnp.asarray(where)

  def log_z(scores):
    scores = jnp.where(keep[:, None], scores, -jnp.inf)
    count = jnp.maximum(jnp.sum(keep) * scores.shape[1], 1)
    return jax.nn.logsumexp(scores) - jnp.log(count.astype(scores.dtype)) + math.log(num_data)

  s_scores = _crd_scores(student_emb, memory_teacher, indices, negative_indices, temperature)
  t_scores = _crd_scores(teacher_emb, memory_student, indices, negative_indices, temperature)
  return jax.lax.stop_gradient(jnp.stack([log_z(s_scores), log_z(t_scores)]))


def crd_loss(student_emb: Array, teacher_emb: Array, memory_student: Array, memory_teacher: Array,
             indices: Array, negative_indices: Array, *, temperature: float = 0.07, objective: str = "nce",
             log_z: Optional[Array] = None, num_data: Optional[int] = None,
             where: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

  Inputs are L2-normalised embeddings of the student's and teacher's penultimate features; each
  comes from a linear head (`Embed`: linear to 128 dims, then L2 normalisation) that the strategy
  owns and trains, the teacher's head included (only the teacher network is frozen). Two memory
  banks hold one embedding per training example (`memory_student` for student embeddings,
  `memory_teacher` for teacher embeddings); `indices` are the batch's dataset indices (the
  positives) and `negative_indices` K other examples per row (`crd_sample_negatives`).

  Two symmetric terms: the student embedding is the anchor against teacher-memory entries, and the
  teacher embedding against student-memory entries. With scores s_bk = ⟨m_k, v_b⟩/τ over
  k = (positive, negatives…):

    objective="nce" (the paper's eq. 18, RepDistiller's `ContrastLoss`): P_bk = exp(s_bk)/Z,
      Pn = 1/N, m = K,
        L_side = −1/n Σ_b [ log P_b0/(P_b0 + m·Pn + ε) + Σ_{k≥1} log m·Pn/(P_bk + m·Pn + ε) ],
      ε = 1e-7 as the reference; evaluated in log space, so large scores do not overflow.
    objective="softmax" (CMC's `NCESoftmaxLoss`, the InfoNCE form on the same memory):
        L_side = 1/n Σ_b ( logsumexp_k s_bk − s_b0 ),  no Z needed.

  The loss is L_student_anchor + L_teacher_anchor (RepDistiller's `s_loss + t_loss`); CIFAR-100
  recipe: τ = 0.07, K = 16384, momentum 0.5, weight 0.8 (`CIFAR100_WEIGHTS["crd"]`) next to the
  cross-entropy.

  What the strategy must do each step: compute the heads' embeddings, call this with the memories
  as they were *before* the step (the bank rows are read without gradient), then write the batch
  into both banks with `crd_update_memory(memory_student, student_emb, indices)` and
  `crd_update_memory(memory_teacher, teacher_emb, indices)`. For "nce", estimate `log_z` once with
  `crd_log_z` on the first batch and keep it.

  Args:
    student_emb: `[B, D]` unit student embeddings (gradient flows to the student and its head).
    teacher_emb: `[B, D]` unit teacher embeddings (gradient flows to the teacher's head).
    memory_student: `[N, D]` bank of student embeddings.
    memory_teacher: `[N, D]` bank of teacher embeddings.
    indices: `[B]` int dataset indices of the batch (the positives).
    negative_indices: `[B, K]` int dataset indices of the negatives.
    temperature: τ.
    objective: "nce" or "softmax".
    log_z: `[2]` log Z (student anchor, teacher anchor) from `crd_log_z`; required for "nce".
    num_data: N of the noise distribution, default the memory's rows.
    where: optional boolean `[B]` row mask; masked rows are dropped (and must not be written to memory).

  Returns:
    (loss, terms): the float32 scalar loss (0 when no row is kept) and a dict with the two sides,
    'student_anchor' and 'teacher_anchor'.
  """
  _crd_check(student_emb, teacher_emb, memory_student, memory_teacher, indices, negative_indices, where)
  num_data = jnp.shape(memory_student)[0] if num_data is None else num_data
  keep = jnp.ones(jnp.shape(indices), jnp.float32) if where is None else jnp.asarray(where).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(keep), 1.0)
  s_scores = _crd_scores(student_emb, memory_teacher, indices, negative_indices, temperature)
  t_scores = _crd_scores(teacher_emb, memory_student, indices, negative_indices, temperature)
  # Masked rows' scores are replaced before any log/exp, so padding garbage cannot reach the gradient.
  s_scores, t_scores = (jnp.where(keep[:, None] > 0, x, 0.0) for x in (s_scores, t_scores))

  if objective == "nce":
    if log_z is None:
      raise ValueError("crd_loss(objective='nce') needs log_z: estimate it once with crd_log_z on the first "
                       "batch and keep it in the strategy state (the reference fixes Z on its first call)")
    log_z = jax.lax.stop_gradient(_float(log_z))
    if log_z.shape != (2,):
      raise ValueError(f"log_z must have shape [2] (student anchor, teacher anchor), got {log_z.shape}")
    k = negative_indices.shape[1]
    log_noise = math.log(k / num_data)                # log(m·Pn)
    log_c = math.log(k / num_data + 1e-7)             # log(m·Pn + ε)

    def side(scores, lz):
      log_p = scores - lz
      log_denominator = jnp.logaddexp(log_p, log_c)
      positive = log_p[:, 0] - log_denominator[:, 0]
      negative = jnp.sum(log_noise - log_denominator[:, 1:], axis=-1)
      return -jnp.sum(keep * (positive + negative)) / n

    terms = {"student_anchor": side(s_scores, log_z[0]), "teacher_anchor": side(t_scores, log_z[1])}
  elif objective == "softmax":
    side = lambda scores: jnp.sum(keep * (jax.nn.logsumexp(scores, axis=-1) - scores[:, 0])) / n
    terms = {"student_anchor": side(s_scores), "teacher_anchor": side(t_scores)}
  else:
    raise ValueError(f"crd_loss: unknown objective {objective!r}; choose 'nce' or 'softmax'")
  return terms["student_anchor"] + terms["teacher_anchor"], terms


def crd_update_memory(memory: Array, embeddings: Array, indices: Array, *, momentum: float = 0.5,
                      where: Optional[Array] = None) -> Array:
  """Writes a batch into a CRD memory bank: m_i ← normalise(μ·m_i + (1 − μ)·v_i) at each index i.

  RepDistiller's `ContrastMemory` update (no gradient; μ = 0.5 in the CIFAR recipe). Masked rows
  leave the bank unchanged, even when their index collides with a kept row's. Indices within one
  batch must be distinct (they are dataset indices); for a repeated index the write that wins is
  unspecified.

  Args:
    memory: `[N, D]` the bank.
    embeddings: `[B, D]` this step's embeddings of the same model.
    indices: `[B]` their dataset indices.
    momentum: μ in [0, 1].
    where: optional boolean `[B]` mask of rows to write.

  Returns:
    The updated `[N, D]` bank (same dtype as `memory`).
  """
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"crd_update_memory needs momentum in [0, 1], got {momentum}")
  if jnp.ndim(memory) != 2 or jnp.shape(embeddings) != (jnp.shape(indices)[0], jnp.shape(memory)[1]):
    raise ValueError(f"crd_update_memory: memory [N, D], embeddings [B, D] and indices [B] expected; got "
                     f"{jnp.shape(memory)}, {jnp.shape(embeddings)}, {jnp.shape(indices)}")
  _check_where(where, jnp.shape(indices)[0], "crd_update_memory")
  memory = jnp.asarray(memory)
  indices = jnp.asarray(indices)
  rows = momentum * _float(memory[indices]) + (1.0 - momentum) * jax.lax.stop_gradient(_float(embeddings))
  rows = _normalize(rows).astype(memory.dtype)
  if where is not None:
    # An out-of-range index with mode="drop" skips the write without touching a real row.
    indices = jnp.where(jnp.asarray(where), indices, memory.shape[0])
  return memory.at[indices].set(rows, mode="drop")


# ----------------------------------------------------------------------------------------------
# Optimal transport between class distributions.


def sinkhorn_distance(student_logits: Array, teacher_logits: Array, cost: Array, *, temperature=1.0,
                      epsilon: float = 0.1, iterations: int = 50, where: Optional[Array] = None) -> Array:
  """Entropic optimal-transport cost between the student's and the teacher's class distributions.

  With q = softmax(z_s/T) (rows) and p = softmax(z_t/T) (columns) over the same V classes and a
  ground cost C `[V, V]` (C_ij = cost of moving mass from student class i to teacher class j), the
  entropic plan (Cuturi 2013)

    π* = argmin_{π ∈ U(q, p)} ⟨π, C⟩ − ε H(π),   U(q, p) = {π ≥ 0 : π1 = q, πᵀ1 = p},

  is found by Sinkhorn's iterations in log space (potentials f, g; stable for small ε):

    f_i ← ε log q_i − ε logsumexp_j((g_j − C_ij)/ε),   g_j ← ε log p_j − ε logsumexp_i((f_i − C_ij)/ε),
    π_ij = exp((f_i + g_j − C_ij)/ε),

  a fixed number of times (jit-able; the gradient flows through the unrolled iterations), and the
  value is the transport cost ⟨π, C⟩ (the "Sinkhorn distance", without the entropy term). The last
  update is g's, so πᵀ1 = p exactly and π1 → q as the iterations converge (more iterations are
  needed as ε shrinks). As ε → 0 the value tends to the exact OT cost; with the 0/1 cost
  C = 1 − I that is the total variation distance ½‖p − q‖₁.

  Relation to ULD (`kdjax.losses.uld`, Boizard et al. 2024): ULD's sorted L1 Σ_i |p_(i) − q_(i)| is
  twice the exact OT cost under the 0/1 cost after both vocabularies are relabelled by rank (the
  i-th most probable class of one model paired with the i-th of the other): it ignores which class
  is which, whereas this function transports between classes the two models share, at the given
  cost. No T² factor.

  Args:
    student_logits: `[..., V]` student logits (finite; slice padded ids off with `align_vocab`).
    teacher_logits: `[..., V]` teacher logits.
    cost: `[V, V]` non-negative ground cost.
    temperature: T, dividing both logit vectors.
    epsilon: ε > 0, the entropic regularisation (in units of the cost).
    iterations: number of Sinkhorn iterations (each updates f then g).
    where: optional boolean `[...]` mask of positions to keep.

  Returns:
    `[...]` float32 transport costs, 0 at masked positions. Memory is [..., V, V].
  """
  log_q, log_p, c = _sinkhorn_inputs(student_logits, teacher_logits, cost, temperature, epsilon, iterations, where)
  log_plan = _sinkhorn_log_plan(log_q, log_p, c, epsilon, iterations)
  return common.finish(jnp.sum(jnp.exp(log_plan) * c, axis=(-2, -1)), where)


def sinkhorn_plan(student_logits: Array, teacher_logits: Array, cost: Array, *, temperature=1.0,
                  epsilon: float = 0.1, iterations: int = 50) -> Array:
  """The entropic transport plan π `[..., V, V]` of `sinkhorn_distance` (rows: student classes q,
  columns: teacher classes p); for inspecting what is moved where."""
  log_q, log_p, c = _sinkhorn_inputs(student_logits, teacher_logits, cost, temperature, epsilon, iterations, None)
  return jnp.exp(_sinkhorn_log_plan(log_q, log_p, c, epsilon, iterations))


def _sinkhorn_inputs(student_logits, teacher_logits, cost, temperature, epsilon, iterations, where):
  log_q, log_p = common.paired_log_probs(student_logits, teacher_logits, temperature, where)
  v = log_q.shape[-1]
  if jnp.shape(cost) != (v, v):
    raise ValueError(f"sinkhorn_distance: cost must be [V, V] = ({v}, {v}) for logits {jnp.shape(student_logits)}, "
                     f"got {jnp.shape(cost)}")
  if not epsilon > 0 or iterations < 1:
    raise ValueError(f"sinkhorn_distance needs epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
  return log_q, log_p, _float(cost).astype(log_q.dtype)


def _sinkhorn_log_plan(log_q: Array, log_p: Array, c: Array, epsilon: float, iterations: int) -> Array:
  """log π after `iterations` log-domain Sinkhorn updates (f then g), from zero potentials."""
  def step(_, fg):
    f, g = fg
    f = epsilon * (log_q - jax.nn.logsumexp((g[..., None, :] - c) / epsilon, axis=-1))
    g = epsilon * (log_p - jax.nn.logsumexp((f[..., :, None] - c) / epsilon, axis=-2))
    return f, g

  f, g = jax.lax.fori_loop(0, int(iterations), step, (jnp.zeros_like(log_q), jnp.zeros_like(log_p)))
  return (f[..., :, None] + g[..., None, :] - c) / epsilon
