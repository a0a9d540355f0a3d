"""DisWOT: rank candidate students for distillation without training them (Dong, Li & Wei, CVPR 2023,
"DisWOT: Student Architecture Search for Distillation WithOut Training").

On one batch, a candidate student at initialisation is compared with the teacher through their last
feature maps A ([B, H, W, C], the map the classifier pools); two distances, each between
Frobenius-normalised similarity matrices M̂ = M / ‖M‖_F:

  semantic   d_s = ‖ Ĝ_T − Ĝ_S ‖_F,   Ĝ = normalise(G Gᵀ),  G = [g_1; ...; g_K] ∈ R^{K × B·H·W},
             g_c = ReLU(Σ_k α_k^c A_k) the Grad-CAM map of class c (Selvaraju et al., ICCV 2017) over the
             batch, α_k^c(b) = (1/HW) Σ_ij ∂y_b^c/∂A_b,ijk; Ĝ is K × K (which classes look at the same
             places), so teacher and student may differ in width and resolution;
  relation   d_r = ‖ R̂_T − R̂_S ‖_F,   R̂ = normalise(F Fᵀ),  F = A flattened to [B, H·W·C]
             (the sample-relation matrix of similarity-preserving KD, Tung & Mori 2019);

and the DisWOT distance d_s + d_r: the paper searches for the student that minimises it; `score` is
its negative (higher = predicted to distil better). Each distance lies in [0, 2] (two unit-norm
matrices), is 0 for identical features and is unchanged when either model's map is scaled by any
positive factor (Grad-CAM maps are linear in A for a linear head, ReLU is positively homogeneous,
and the normalisation removes the factor).

Which reading: the paper's description (Grad-CAM semantic similarity of the last feature maps for
all classes, sample-relation similarity, L2-normalised correlation matrices compared by an L2
distance, their sum minimised). The authors' released ranking script differs in detail: its
semantic term is the ICKD loss between the *cross-entropy gradients of the classifier weights*
([K, C]: Grad-CAM's channel weights summed over the batch and weighted by the error; it needs equal
teacher and student widths), its relation term the SP loss (row-normalised Gram, squared, /B²), and
it re-draws every weight from N(0, 1) before scoring. Here the classes' Grad-CAM maps and the
paper's Frobenius normalisation are used, so any pair of widths can be compared.

Models: `kdjax.models.vision` convnets (global average pooling, then a linear `fc` head). The map A is
found by matching: the recorded activation (or ReLU of a recorded pre-activation) whose spatial mean
equals the pooled feature 'pre_logits'; when none does (MobileNetV2 pools an unrecorded 1×1 conv),
'pre_logits' itself is used as a 1 × 1 map, which is exact when the final map is 1 × 1 (MobileNetV2
and VGG on 8 × 8 digits) and the class-evidence vector otherwise. The result names the map used.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.losses import common
from kdjax.models import capture

Array = jax.Array
_EPS = 1e-12


def _float(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(common.compute_dtype(x.dtype))


def _keep(where: Optional[Array], rows: int, name: str) -> Optional[Array]:
  if where is None:
    return None
  if jnp.shape(where) != (rows,):
    raise ValueError(f"{name}: `where` must be a boolean [B] mask with B={rows}, got shape {jnp.shape(where)}")
  return jnp.asarray(where).astype(bool)


def normalized_gram(x: Array) -> Array:
  """M̂ = X Xᵀ / max(‖X Xᵀ‖_F, eps) for rows X `[N, D]` (an all-zero X gives the zero matrix)."""
  x = _float(x)
  if x.ndim != 2:
    raise ValueError(f"normalized_gram needs a [N, D] matrix, got shape {x.shape}")
  gram = x @ x.T
  return gram / jnp.maximum(jnp.sqrt(jnp.sum(gram * gram)), _EPS)


def gram_distance(a: Array, b: Array) -> Array:
  """‖normalised_gram(a) − normalised_gram(b)‖_F for `[N, D_a]`, `[N, D_b]` (same N, any widths), in [0, 2]."""
  if jnp.ndim(a) != 2 or jnp.ndim(b) != 2 or jnp.shape(a)[0] != jnp.shape(b)[0]:
    raise ValueError(f"gram_distance compares the rows of two [N, D] matrices with the same N; got shapes "
                     f"{jnp.shape(a)} and {jnp.shape(b)}")
  diff = normalized_gram(a) - normalized_gram(b)
  return jnp.sqrt(jnp.sum(diff * diff))


def relation_distance(student: Array, teacher: Array, *, where: Optional[Array] = None) -> Array:
  """d_r: distance of the sample-relation matrices of two `[B, ...]` feature arrays (flattened per example).

  `where` ([B] bool) drops examples from every pair: their rows are zeroed, so they add nothing to F Fᵀ;
  an all-masked batch gives 0.
  """
  s, t = jnp.shape(student), jnp.shape(teacher)
  if len(s) < 2 or len(t) < 2 or s[0] != t[0]:
    raise ValueError(f"relation_distance relates the examples of one batch: student {s} and teacher {t} need the "
                     "same leading batch axis and at least one feature axis")
  keep = _keep(where, s[0], "relation_distance")
  rows = lambda x: _float(x).reshape(s[0], -1) if keep is None else jnp.where(  # noqa: E731
      keep[:, None], _float(x).reshape(s[0], -1), 0.0)
  return gram_distance(rows(student), rows(teacher))


def grad_cam_maps(feature_map: Array, weights: Array) -> Array:
  """Grad-CAM maps `[K, B, H, W]`: g_c[b] = ReLU(Σ_k weights[b, c, k] · A[b, :, :, k]).

  Args:
    feature_map: A `[B, H, W, C]`.
    weights: α `[B, K, C]`, the spatially averaged gradients of each class score with respect to A.
  """
  a, w = jnp.shape(feature_map), jnp.shape(weights)
  if len(a) != 4 or len(w) != 3 or a[0] != w[0] or a[3] != w[2]:
    raise ValueError(f"grad_cam_maps needs a [B, H, W, C] map and [B, K, C] weights; got {a} and {w}")
  return jax.nn.relu(jnp.einsum("bhwc,bkc->kbhw", _float(feature_map), _float(weights)))


def semantic_distance(student_cams: Array, teacher_cams: Array, *, where: Optional[Array] = None) -> Array:
  """d_s: distance of the K × K inter-class similarities of two sets of Grad-CAM maps `[K, B, ...]`.

  The maps of each class are flattened over the batch and space, so resolutions may differ; `where`
  ([B] bool) removes examples from every class's map (all masked: 0).
  """
  s, t = jnp.shape(student_cams), jnp.shape(teacher_cams)
  if len(s) < 2 or len(t) < 2 or s[:2] != t[:2]:
    raise ValueError(f"semantic_distance needs [K, B, ...] Grad-CAM maps with the same classes K and batch B; "
                     f"got student {s} and teacher {t}")
  keep = _keep(where, s[1], "semantic_distance")

  def rows(cams):
    cams = _float(cams).reshape(s[0], s[1], -1)
    return (cams if keep is None else jnp.where(keep[None, :, None], cams, 0.0)).reshape(s[0], -1)
  return gram_distance(rows(student_cams), rows(teacher_cams))


ModelLike = Union[nnx.Module, tuple]


def _as_module(model: ModelLike) -> nnx.Module:
  """A private copy (scoring in train mode writes BatchNorm statistics) of a module or of
  `(graphdef, params)` / `(graphdef, (params, model_state))` / `(graphdef, params, model_state)`."""
  if isinstance(model, nnx.Module):
    return nnx.clone(model)
  if not isinstance(model, tuple) or len(model) not in (2, 3):
    raise ValueError(f"a model is an nnx.Module or (graphdef, variables); got {type(model).__name__}")
  graphdef, *states = model
  if len(states) == 1 and isinstance(states[0], tuple):
    states = list(states[0])
  return nnx.clone(nnx.merge(graphdef, *states))


def _pooled_map(acts: dict, order: list[str], pooled: np.ndarray) -> tuple[str, Array]:
  """The recorded map whose spatial mean is the pooled feature, latest recorded first, a map before
  ReLU of a pre-activation; else 'pre_logits' as a 1 × 1 map."""
  scale = float(np.max(np.abs(pooled))) + 1e-30
  for name in reversed([n for n in order if n in acts]):
    candidates = [(name, acts[name])]
    if name.endswith("_preact"):
      candidates.append((f"relu({name})", jax.nn.relu(acts[name])))
    for candidate, value in candidates:
      if jnp.ndim(value) != 4 or jnp.shape(value)[-1] != pooled.shape[-1]:
        continue
      if np.allclose(np.asarray(jnp.mean(value, axis=(1, 2))), pooled, rtol=1e-4, atol=1e-5 * scale):
        return candidate, value
  return "pre_logits", jnp.asarray(pooled)[:, None, None, :]


@jax.jit(static_argnums=(0, 3))
def _run(graphdef, state, images, train: bool):
  """logits, every recorded activation and α = ∂y/∂p per example [B, K, C] (p the pooled feature)."""
  module = nnx.merge(graphdef, state)
  with capture.capture(None) as acts:
    logits = module(images, train=train)
  head = module.fc
  alpha = jax.vmap(jax.jacrev(lambda p: head(p[None])[0]))(acts["pre_logits"])
  return logits, dict(acts), alpha


def last_map_and_cams(model: ModelLike, images: Array, *, train: bool) -> dict[str, Any]:
  """Runs a convnet on `images` and returns its pooled map A, the Grad-CAM maps of every class and the
  map's name: {'map': [B, H, W, C], 'cams': [K, B, H, W], 'map_name': str, 'logits': [B, K]}.

  `train` runs BatchNorm on the batch's statistics (networks at initialisation, whose running
  statistics are still 0 / 1); a trained teacher runs on its running statistics (`train=False`).
  α comes from the `fc` head by autodiff: α_k^c(b) = (1/HW) ∂y_b^c/∂p_bk with p = mean_ij A, exact for
  any head on the pooled feature.
  """
  module = _as_module(model)
  if not callable(getattr(module, "fc", None)):
    raise ValueError(f"DisWOT's Grad-CAM needs a pooled convnet with a `fc` head; {type(module).__name__} has none")
  if "pre_logits" not in module.activation_names():
    raise ValueError(f"{type(module).__name__} records no 'pre_logits' (the pooled feature) to find its last map by")
  graphdef, state = nnx.split(module)
  logits, acts, alpha = _run(graphdef, state, jnp.asarray(images, jnp.float32), bool(train))
  pooled = np.asarray(acts.pop("pre_logits"))
  name, feature_map = _pooled_map(acts, list(module.activation_names()), pooled)
  cams = grad_cam_maps(feature_map, alpha / (feature_map.shape[1] * feature_map.shape[2]))
  return {"map": feature_map, "cams": cams, "map_name": name, "logits": logits}


def diswot_score(teacher: ModelLike, student: ModelLike, images: Array, *, teacher_train: bool = False,
                 student_train: bool = True, where: Optional[Array] = None) -> dict[str, Any]:
  """DisWOT's semantic and relation distances of a (teacher, student) pair on one batch.

  Args:
    teacher: the teacher, an nnx.Module or (graphdef, variables) (trained, or at initialisation as in
      the paper's search).
    student: the candidate student, the same way (normally at initialisation).
    images: one batch `[B, H, W, C]`, normalised as in training.
    teacher_train / student_train: BatchNorm on batch statistics (True: untrained networks, as the
      authors' PyTorch modules in train mode) or on running statistics (False: a trained teacher).
    where: optional [B] bool mask of the examples to use.

  Returns:
    {'semantic': d_s, 'relation': d_r, 'distance': d_s + d_r, 'score': −(d_s + d_r) (floats),
     'teacher_map', 'student_map': the names of the maps used}.

  Raises:
    ValueError: the models' class counts differ, or a model is not a pooled convnet with a `fc` head.
  """
  t = last_map_and_cams(teacher, images, train=teacher_train)
  s = last_map_and_cams(student, images, train=student_train)
  if t["cams"].shape[0] != s["cams"].shape[0]:
    raise ValueError(f"teacher has {t['cams'].shape[0]} classes and student {s['cams'].shape[0]}: DisWOT compares "
                     "class maps one to one")
  semantic = float(semantic_distance(s["cams"], t["cams"], where=where))
  relation = float(relation_distance(s["map"], t["map"], where=where))
  return {"semantic": semantic, "relation": relation, "distance": semantic + relation,
          "score": -(semantic + relation), "teacher_map": t["map_name"], "student_map": s["map_name"]}
