"""Classifier distillation: hard labels, a logit loss and feature / relation terms, one strategy.

    loss = w_ce·CE(student, labels) + w_kd·L_logit(student, teacher) + Σ_terms w·L_feature

`RepresentationDistillation` covers the methods of RepDistiller / mdistiller's tables with one
code path: no teacher (w_kd = 0, no terms), KD, DKD, DIST, DeiT's distillation head, and the
feature losses of `kdjax.losses.features` (FitNet, AT, RKD, PKT, SP, CC, NST, ND, CRD) on the
activations that the models record (`kdjax.models.capture`; the step's
`classifier_forward(features=strategy.feature_names('student'))` hands them over).

Learned pieces of a method (FitNet's regressor, the embedding heads of CC and CRD) are the
strategy's own parameters (`init_params`, trained with the student by the same optimizer); CRD's
memory banks and its NCE constant are the strategy's state, written from each batch's embeddings
(the call returns the new state). A batch holds `'images'`, `'targets'` (labels) `[B]`, `'mask'`
`[B]`, `'index'` (dataset indices, for CRD) and, with mixup, `'targets_b'` / `'mix'`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill import schedules
from kdjax.distill.strategies import _as_schedule, _check_keys, top1_match
from kdjax.losses import features as F
from kdjax.losses import transformer_relations as R

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]


def _kd(student, teacher, labels, *, temperature, where, **kwargs):
  del labels
  return losses.hinton_kd(student, teacher, temperature=temperature, where=where, **kwargs)


def _dkd(student, teacher, labels, *, temperature, where, **kwargs):
  return losses.dkd(student, teacher, labels, temperature=temperature, where=where, **kwargs)


def _dist(student, teacher, labels, *, temperature, where, **kwargs):
  del labels
  return losses.dist(student, teacher, temperature=temperature, where=where, **kwargs)


def _deit_hard(student, teacher, labels, *, temperature, where):
  del labels, temperature
  return losses.deit_hard_distillation(student, teacher, where=where)


def _deit_soft(student, teacher, labels, *, temperature, where):
  del labels
  return losses.deit_soft_distillation(student, teacher, temperature=temperature, where=where)


# Logit losses by config name: (student, teacher, labels, *, temperature, where, **kwargs) -> [B] or
# a scalar (DIST couples the batch). KD and DKD multiply by T² (their papers' recipes do).
LOGIT_LOSSES: Mapping[str, Callable[..., Array]] = {
    "kd": _kd, "dkd": _dkd, "dist": _dist, "deit_hard": _deit_hard, "deit_soft": _deit_soft,
}


def _nd(student, teacher, *, labels, class_means, **kwargs):
  return F.norm_direction(student, class_means, labels, teacher=teacher, **kwargs)


def _rkd(student, teacher, *, distance_weight: float = F.CIFAR100_WEIGHTS["rkd_distance"],
         angle_weight: float = F.CIFAR100_WEIGHTS["rkd_angle"], where=None):
  """RepDistiller's RKDLoss: 25·distance + 50·angle, used with an outer weight of 1."""
  return (distance_weight * F.rkd_distance(student, teacher, where=where)
          + angle_weight * F.rkd_angle(student, teacher, where=where))


def _trg(student, teacher, *, where=None, alpha: float = 1.0, beta: float = 1.0, num_neighbors: int = 8,
         sigma: float = 1.0):
  """TRG (Zhang et al. 2023) on CNN maps: α·contextual (each image's token self-similarity) +
  β·the batch's kNN token graph, one token per spatial position; the maps' widths may differ, and
  maps of different sizes are average-pooled onto the smaller grid (an integer ratio per side)."""
  if student.ndim == 4 and student.shape[1:3] != teacher.shape[1:3]:
    grid = tuple(min(a, b) for a, b in zip(student.shape[1:3], teacher.shape[1:3]))
    student, teacher = _resize_map(student, grid), _resize_map(teacher, grid)
  s, t = R.tokens_from_feature_map(student), R.tokens_from_feature_map(teacher)
  tokens = None if where is None else jnp.broadcast_to(jnp.asarray(where)[:, None], s.shape[:2])
  context = losses.masked_mean(R.contextual_loss(s, t, where=tokens), where)
  graph = R.token_relation_graph(s, t, num_neighbors=num_neighbors, sigma=sigma, where=tokens)
  return alpha * context + beta * graph


def _mi_alpha(student, teacher, *, where=None, alpha: float = 0.5):
  """Distiller's MI-α (−I_α, a dot-product critic) on flattened features of one width."""
  return R.mi_alpha(_flat(student), _flat(teacher), alpha=alpha, where=where)


# Feature losses by config name: (student, teacher, *, where, **kwargs) -> [B] (per example) or a
# scalar (a relation over the batch). `nd` also gets the labels and the teacher's class centres.
FEATURE_LOSSES: Mapping[str, Callable[..., Array]] = {
    "fitnet": F.fitnet_hint, "at": F.attention_transfer, "rkd": _rkd, "rkd_distance": F.rkd_distance,
    "rkd_angle": F.rkd_angle, "pkt": F.pkt, "sp": F.similarity_preserving, "cc": F.correlation_congruence,
    "nst": F.nst, "nd": _nd, "hidden": F.hidden_state_loss, "trg": _trg, "mi_alpha": _mi_alpha,
}
# CRD is a term too, but with state (memory banks) and its own inputs: see `CRDSpec`.
HEADS = ("none", "linear", "regressor", "embed")


@dataclasses.dataclass(frozen=True)
class FeatureTerm:
  """One weighted feature loss over pairs of activations (summed over the pairs, as RepDistiller
  sums AT over its stages).

  Attributes:
    loss: a name in FEATURE_LOSSES.
    student: the student's activation names (`model.activation_names()`).
    teacher: the teacher's, one per student name.
    weight: the term's weight w.
    student_head / teacher_head: 'none', 'linear' (a learned map of the channel axis onto the
      other model's width, a 1×1 convolution on maps), 'regressor' (RepDistiller's FitNet `ConvReg`:
      that map, then batch normalisation with learned scale and shift, then ReLU) or 'embed'
      (linear to `embed_dim` then L2 normalisation: the embedding heads of CC and CRD).
    shapes: ((student shape, teacher shape), ...) per pair, without the batch axis (the heads'
      sizes); filled by the builder from the models' `activation_shapes`.
    embed_dim: the width of 'embed' heads.
    kwargs: the loss's own options as (key, value) pairs.
  """

  loss: str
  student: tuple[str, ...]
  teacher: tuple[str, ...]
  weight: float
  student_head: str = "none"
  teacher_head: str = "none"
  shapes: tuple = ()
  embed_dim: int = 128
  kwargs: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class CRDSpec:
  """Contrastive representation distillation (Tian et al., ICLR 2020) as a term of the strategy.

  Embeddings: linear heads on the student's and teacher's `student` / `teacher` activations
  (flattened), to `embed_dim`, L2-normalised; two memory banks of `num_data` rows; `num_negatives`
  negatives per example of other classes, drawn from the step's key; `log_z` fixed on the first
  step (objective 'nce'). `negatives` groups the training split's indices by label.
  """

  student: str
  teacher: str
  student_dim: int
  teacher_dim: int
  num_data: int
  weight: float = F.CIFAR100_WEIGHTS["crd"]
  embed_dim: int = 128
  num_negatives: int = 4096
  temperature: float = 0.07
  momentum: float = 0.5
  objective: str = "nce"
  seed: int = 0
  # The training split's indices grouped by class (`features.crd_negative_table`), built once.
  negatives: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)


def _unit(x: Array) -> Array:
  """x / max(‖x‖, 1e-12) along the last axis (torch's F.normalize, as the reference heads); the
  clamp sits inside the square root, so a zero vector has a finite gradient."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _flat(x: Array) -> Array:
  return jnp.reshape(x, (x.shape[0], -1))


def _init_linear(key: Array, din: int, dout: int, *, norm: bool = False) -> dict:
  # PyTorch nn.Linear's default init (uniform ±1/√fan_in), as the reference heads use; a
  # regressor's batch norm starts as the identity (scale 1, shift 0).
  bound = 1.0 / math.sqrt(din)
  kw, kb = jax.random.split(key)
  params = {"kernel": jax.random.uniform(kw, (din, dout), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (dout,), jnp.float32, -bound, bound)}
  if norm:
    params.update(scale=jnp.ones((dout,), jnp.float32), shift=jnp.zeros((dout,), jnp.float32))
  return params


def _batch_norm(x: Array, params: dict, eps: float = 1e-5) -> Array:
  """Batch normalisation over every axis but the channels, with the batch's own statistics: a
  strategy head only ever runs in training, so running averages would never be read."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["shift"]


def _head_width(head: str, own_shape: tuple, other_shape: tuple, embed_dim: int) -> Optional[tuple[int, int]]:
  """(in, out) widths of a head, or None for 'none'. 'linear' maps the last axis (channels of a
  map, or a vector) onto the other model's; 'embed' flattens and maps to `embed_dim`."""
  if head == "none":
    return None
  if head in ("linear", "regressor"):
    return own_shape[-1], other_shape[-1]
  return math.prod(own_shape), embed_dim


def _resize_map(x: Array, target: tuple[int, int]) -> Array:
  """A map `[B, H, W, C]` brought to the spatial size `target` (the other model's) by an integer
  factor per axis: average pooling where the map is larger, nearest-neighbour repetition where it
  is smaller. RepDistiller's ConvReg learns these as a strided convolution and a transposed one;
  after a head's learned 1×1 map, fixed resampling keeps the head a channel map."""
  out = x
  for axis, (size, goal) in enumerate(zip(x.shape[1:3], target), start=1):
    big, small = max(size, goal), min(size, goal)
    if big % small:
      raise ValueError(f"cannot resample a {x.shape[1:3]} feature map onto {target}: one map's side must be an "
                       "integer multiple of the other's")
    factor = big // small
    if size > goal:
      shape = out.shape[:axis] + (goal, factor) + out.shape[axis + 1:]
      out = out.reshape(shape).mean(axis=axis + 1)
    elif size < goal:
      out = jnp.repeat(out, factor, axis=axis)
  return out


def _apply_head(head: str, params: Optional[dict], x: Array, other_shape: tuple) -> Array:
  if head == "none":
    return x
  if head == "embed":
    return _unit(_flat(x) @ params["kernel"] + params["bias"])
  x = x @ params["kernel"] + params["bias"]
  if head == "regressor":
    x = jax.nn.relu(_batch_norm(x, params))
  if x.ndim == 4 and x.shape[1:3] != tuple(other_shape[:2]):
    x = _resize_map(x, tuple(other_shape[:2]))
  return x


@dataclasses.dataclass(frozen=True)
class RepresentationDistillation:
  """w_ce·CE + w_kd·L_logit + Σ w·L_feature (+ CRD) for classifiers.

  Attributes:
    logit_loss: a name in LOGIT_LOSSES, or None (no logit term).
    ce_weight: w_ce (0: the label-free recipes, function matching and SSLD).
    kd_weight: w_kd, a schedule `step -> value` (DKD warms it up linearly).
    temperature: T of the logit loss.
    logit_kwargs: the logit loss's options, (key, value) pairs.
    distill_head: the student activation the logit loss reads instead of its logits (DeiT's
      'distill_logits'); its CE is then on 'class_logits'.
    terms: the feature terms.
    crd: a CRD term, or None.
    class_means: the teacher's class centres `[K, D]` (the 'nd' term's direction targets).
  """

  logit_loss: Optional[str] = None
  ce_weight: float = 1.0
  kd_weight: Any = 1.0
  temperature: float = 4.0
  logit_kwargs: tuple[tuple[str, Any], ...] = ()
  distill_head: Optional[str] = None
  terms: tuple[FeatureTerm, ...] = ()
  crd: Optional[CRDSpec] = None
  class_means: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def __post_init__(self):
    if self.logit_loss is not None and self.logit_loss not in LOGIT_LOSSES:
      raise ValueError(f"unknown logit loss {self.logit_loss!r}; known: {sorted(LOGIT_LOSSES)}")
    for term in self.terms:
      if term.loss not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss {term.loss!r}; known: {sorted(FEATURE_LOSSES) + ['crd']}")
      if len(term.student) != len(term.teacher) or not term.student:
        raise ValueError(f"feature term {term.loss!r} pairs student layers {term.student} with teacher layers "
                         f"{term.teacher}: give one teacher layer per student layer")
      for head in (term.student_head, term.teacher_head):
        if head not in HEADS:
          raise ValueError(f"unknown head {head!r} for feature term {term.loss!r}; known: {HEADS}")
      if term.loss == "nd" and self.class_means is None:
        raise ValueError("the 'nd' term needs the teacher's class means (class_means)")
    if self.crd is not None and self.crd.objective not in ("nce", "softmax"):
      raise ValueError(f"unknown CRD objective {self.crd.objective!r}; choose 'nce' or 'softmax'")

  uses_head = False

  @property
  def uses_teacher(self) -> bool:
    return self.logit_loss is not None or bool(self.terms) or self.crd is not None

  def feature_names(self, role: str) -> tuple[str, ...]:
    """The activations this strategy reads from the 'student' or the 'teacher'."""
    names = [n for term in self.terms for n in getattr(term, role)]
    if self.crd is not None:
      names.append(getattr(self.crd, role))
    if role == "student" and self.distill_head is not None:
      names += [self.distill_head, "class_logits"]
    return tuple(dict.fromkeys(names))

  def init_params(self, key: Array) -> dict:
    """The learned heads: {'term{i}': {'student{j}' / 'teacher{j}': linear}, 'crd': {...}}."""
    params = {}
    for i, term in enumerate(self.terms):
      own = {}
      for j, (s_shape, t_shape) in enumerate(term.shapes):
        for role, head, mine, other in (("student", term.student_head, s_shape, t_shape),
                                        ("teacher", term.teacher_head, t_shape, s_shape)):
          width = _head_width(head, mine, other, term.embed_dim)
          if width is not None:
            own[f"{role}{j}"] = _init_linear(jax.random.fold_in(key, 1000 * i + 2 * j + (role == "teacher")), *width,
                                             norm=head == "regressor")
      if own:
        params[f"term{i}"] = own
    if self.crd is not None:
      ks, kt = jax.random.split(jax.random.fold_in(key, 10**6))
      params["crd"] = {"student": _init_linear(ks, self.crd.student_dim, self.crd.embed_dim),
                       "teacher": _init_linear(kt, self.crd.teacher_dim, self.crd.embed_dim)}
    return params

  def init_state(self) -> dict:
    """CRD's memory banks `[N, D]` and its NCE constant (set on the first step); {} without CRD."""
    if self.crd is None:
      return {}
    ks, kt = jax.random.split(jax.random.PRNGKey(self.crd.seed))
    return {"memory_student": F.crd_init_memory(ks, self.crd.num_data, self.crd.embed_dim),
            "memory_teacher": F.crd_init_memory(kt, self.crd.num_data, self.crd.embed_dim),
            "log_z": jnp.zeros((2,), jnp.float32), "log_z_set": jnp.zeros((), jnp.float32)}

  def __call__(self, student_out, teacher_out, batch, step, *, state=None, params=None):
    mask = batch["mask"].astype(bool)
    labels = batch["targets"]
    feats = student_out.get("features", {})
    logits = feats["class_logits"] if self.distill_head else student_out["logits"]
    ce = losses.cross_entropy(logits, labels, where=mask)
    if "mix" in batch:  # mixup: the view is a blend of two examples, so is its label
      mix = batch["mix"].astype(ce.dtype)
      ce = mix * ce + (1.0 - mix) * losses.cross_entropy(logits, batch["targets_b"], where=mask)
    ce_sum, count = losses.masked_sum_count(ce, mask)
    one = jnp.ones((), jnp.float32)
    metrics: Metrics = {"ce": (ce_sum, count), "accuracy": top1_match(student_out["logits"], labels, mask)}
    total = self.ce_weight * losses.safe_mean(ce_sum, count)
    teacher_logits = None
    if self.uses_teacher:
      teacher_logits = jax.lax.stop_gradient(teacher_out["logits"])
      metrics["teacher_agreement"] = top1_match(student_out["logits"], jnp.argmax(teacher_logits, -1), mask)
    if self.logit_loss is not None:
      distilled = feats[self.distill_head] if self.distill_head else student_out["logits"]
      value = LOGIT_LOSSES[self.logit_loss](distilled, teacher_logits, labels, temperature=self.temperature,
                                            where=mask, **dict(self.logit_kwargs))
      kd = _batch_mean(value, mask)
      alpha = _as_schedule(self.kd_weight)(step)
      total = total + alpha * kd
      metrics["kd"] = (kd * count, count)
      metrics["kd_weight"] = (jnp.asarray(alpha, jnp.float32), one)
    own = params or {}
    t_feats = {} if teacher_out is None else jax.lax.stop_gradient(teacher_out.get("features", {}))
    for i, term in enumerate(self.terms):
      heads = own.get(f"term{i}", {})
      value = 0.0
      for j, (s_name, t_name) in enumerate(zip(term.student, term.teacher)):
        s_shape, t_shape = term.shapes[j] if term.shapes else (feats[s_name].shape[1:], t_feats[t_name].shape[1:])
        s = _apply_head(term.student_head, heads.get(f"student{j}"), feats[s_name], t_shape)
        t = _apply_head(term.teacher_head, heads.get(f"teacher{j}"), t_feats[t_name], s_shape)
        extra = {"labels": labels, "class_means": self.class_means} if term.loss == "nd" else {}
        value = value + _batch_mean(FEATURE_LOSSES[term.loss](s, t, where=mask, **extra, **dict(term.kwargs)), mask)
      total = total + term.weight * value
      metrics[f"feature/{term.loss}"] = (value * count, count)
    new_state = state if state is not None else {}
    if self.crd is not None:
      crd_value, new_state = self._crd(feats, t_feats, own["crd"], state, batch, mask)
      total = total + self.crd.weight * crd_value
      metrics["feature/crd"] = (crd_value * count, count)
    metrics["loss"] = (total * count, count)
    return total, metrics, new_state

  def _crd(self, feats, t_feats, heads, state, batch, mask):
    spec = self.crd
    embed = lambda p, x: _unit(_flat(x) @ p["kernel"] + p["bias"])  # noqa: E731
    s_emb, t_emb = embed(heads["student"], feats[spec.student]), embed(heads["teacher"], t_feats[spec.teacher])
    negatives = F.crd_sample_negatives(jax.random.fold_in(batch["rng"], 7), batch["targets"], spec.num_negatives,
                                       spec.negatives)
    memories = (state["memory_student"], state["memory_teacher"])
    common = dict(temperature=spec.temperature, num_data=spec.num_data, where=mask)
    log_z = state["log_z"]
    if spec.objective == "nce":
      # The reference fixes Z on its first batch: estimate it then, keep it after.
      first = F.crd_log_z(s_emb, t_emb, *memories, batch["index"], negatives, **common)
      log_z = jnp.where(state["log_z_set"] > 0, log_z, first)
    value, _ = F.crd_loss(s_emb, t_emb, *memories, batch["index"], negatives, objective=spec.objective,
                          log_z=log_z if spec.objective == "nce" else None, **common)
    write = lambda memory, emb: F.crd_update_memory(memory, jax.lax.stop_gradient(emb), batch["index"],  # noqa: E731
                                                    momentum=spec.momentum, where=mask)
    new_state = {"memory_student": write(memories[0], s_emb), "memory_teacher": write(memories[1], t_emb),
                 "log_z": log_z, "log_z_set": jnp.ones((), jnp.float32)}
    return value, new_state


def _batch_mean(value: Array, mask: Array) -> Array:
  """A per-example loss averaged over kept examples; a relation loss (a scalar) as it is."""
  if jnp.ndim(value) == 0:
    return value
  return losses.masked_mean(value, mask)


def representation_strategy(cfg: dict, *, student_shapes: Mapping[str, tuple], teacher_shapes: Mapping[str, tuple],
                            num_steps: int, class_means=None, train_labels=None,
                            num_classes: Optional[int] = None) -> RepresentationDistillation:
  """`RepresentationDistillation` from a config's `distill` section.

  Keys: ce_weight, logit_loss, kd_weight (a number or a schedule config of
  `kdjax.distill.schedules`, e.g. DKD's warm-up {kind: 'warmup_constant', value, warmup_steps}), temperature, logit_kwargs, distill_head, features (a
  list of dicts: loss, student, teacher (a name or a list), weight, student_head, teacher_head,
  embed_dim, kwargs) and crd (a dict: student, teacher, weight, embed_dim, num_negatives,
  temperature, momentum, objective).

  Args:
    cfg: the section as a dict (unknown keys raise).
    student_shapes / teacher_shapes: `{activation: shape without batch}` of each model.
    num_steps: the run's steps (for warm-up schedules).
    class_means: the teacher's class centres, for an 'nd' term.
    train_labels: the training split's labels, for CRD's negatives.
    num_classes: for CRD.
  """
  _check_keys(cfg, {"ce_weight", "logit_loss", "kd_weight", "temperature", "logit_kwargs",
                    "distill_head", "features", "crd"}, "representation")
  del num_steps

  def layers(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)

  def shape(shapes, name, role):
    if name not in shapes:
      raise ValueError(f"the {role} records no activation {name!r}; it records {sorted(shapes)}")
    return tuple(shapes[name])

  terms = []
  for raw in cfg.get("features") or ():
    raw = dict(raw)
    _check_keys(raw, {"loss", "student", "teacher", "weight", "student_head", "teacher_head", "embed_dim", "kwargs"},
                "representation (a features entry)")
    s_layers, t_layers = layers(raw["student"]), layers(raw.get("teacher", raw["student"]))
    loss = raw["loss"]
    weight = raw.get("weight", F.CIFAR100_WEIGHTS.get({"fitnet": "fitnet_hint", "at": "attention_transfer",
                                                        "sp": "similarity_preserving", "nd": "norm_direction",
                                                        "cc": "correlation_congruence/taylor"}.get(loss, loss), 1.0))
    terms.append(FeatureTerm(
        loss=loss, student=s_layers, teacher=t_layers, weight=float(weight),
        student_head=raw.get("student_head", "none"), teacher_head=raw.get("teacher_head", "none"),
        embed_dim=int(raw.get("embed_dim", 128)), kwargs=tuple(sorted(dict(raw.get("kwargs") or {}).items())),
        shapes=tuple((shape(student_shapes, s, "student"), shape(teacher_shapes, t, "teacher"))
                     for s, t in zip(s_layers, t_layers))))
  crd = None
  if cfg.get("crd"):
    raw = dict(cfg["crd"])
    _check_keys(raw, {"student", "teacher", "weight", "embed_dim", "num_negatives", "temperature", "momentum",
                      "objective"}, "representation (the crd section)")
    if train_labels is None or num_classes is None:
      raise ValueError("CRD needs the training split's labels and the class count")
    s_name, t_name = raw.get("student", "pre_logits"), raw.get("teacher", "pre_logits")
    crd = CRDSpec(student=s_name, teacher=t_name, student_dim=math.prod(shape(student_shapes, s_name, "student")),
                  teacher_dim=math.prod(shape(teacher_shapes, t_name, "teacher")), num_data=len(train_labels),
                  negatives=F.crd_negative_table(jnp.asarray(train_labels, jnp.int32), num_classes),
                  **{k: raw[k] for k in ("weight", "embed_dim", "num_negatives", "temperature", "momentum",
                                         "objective") if k in raw})
  return RepresentationDistillation(
      logit_loss=cfg.get("logit_loss"), ce_weight=float(cfg.get("ce_weight", 1.0)),
      kd_weight=schedules.make_schedule(cfg.get("kd_weight", 1.0)),
      temperature=float(cfg.get("temperature", 4.0)),
      logit_kwargs=tuple(sorted(dict(cfg.get("logit_kwargs") or {}).items())), distill_head=cfg.get("distill_head"),
      terms=tuple(terms), crd=crd, class_means=class_means)
