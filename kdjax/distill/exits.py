"""Exit-branch distillation (OFA-KD, Be Your Own Teacher) and distillation from the student's own EMA.

`ExitDistillation` puts exits (`kdjax.distill.exit_branches`) on chosen student activations and
distils each one, with the final logits, towards a target:

    loss = w_ce·CE(z) + w_kd·L(z, t) + Σ_i [w_exit_ce·CE(z_i) + w_exit·L(z_i, t) + λ·‖f_i − f‖²]

with z / f the student's final logits / pooled feature ('pre_logits'), z_i / f_i exit i's, and t
either the teacher's logits (`target='teacher'`: OFA-KD, Hao et al., NeurIPS 2023, where L is
`kdjax.losses.ofa.ofa_loss` and exits sit on every stage, the last included) or the student's own
final logits, held constant (`target='final'`: Be Your Own Teacher, Zhang et al., ICCV 2019, where L
is T²·KL(softmax(z/T) ‖ softmax(z_i/T)), the exits sit on stages 1..N−1 and the hint pulls each
exit's feature towards the deepest one; no external teacher runs). The exits' parameters are the
strategy's (`init_params`), trained with the student and dropped after training.

`EMADistillation` distils the student towards an exponential moving average of its own weights
(the teacher of Mean Teacher / BYOL / DINO, here with a KD loss), θ_ema ← m·θ_ema + (1 − m)·θ, kept
in the strategy's state; it runs the EMA model itself with the student's forward function (a field).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses
from kdjax.distill import exit_branches, schedules
from kdjax.distill.strategies import _as_schedule, _check_keys, top1_match
from kdjax.losses import features as F
from kdjax.losses.ofa import ofa_loss
from kdjax.train import step as step_lib

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

TARGETS = ("teacher", "final")
EXIT_LOSSES = ("ofa", "kd")


def _hard_ce(logits: Array, batch: Mapping[str, Array], mask: Array) -> Array:
  """Per-example CE against the labels; under mixup against both, weighted by the mix."""
  ce = losses.cross_entropy(logits, batch["targets"], where=mask)
  if "mix" in batch:
    mix = batch["mix"].astype(ce.dtype)
    ce = mix * ce + (1.0 - mix) * losses.cross_entropy(logits, batch["targets_b"], where=mask)
  return ce


@dataclasses.dataclass(frozen=True)
class ExitDistillation:
  """Exits distilled from the teacher (OFA-KD) or from the student's final exit (self-distillation).

  Attributes:
    branches: the exits, in the order of the student's layers.
    target: 'teacher' or 'final' (the student's own final logits, a constant).
    exit_loss: L, 'ofa' (`ofa_loss` with exponent γ) or 'kd' (T²·KL(target ‖ exit)).
    ce_weight: w_ce, of the final logits' CE.
    kd_weight: w_kd, of L(final logits, teacher) (a schedule `step -> value`); only with
      target 'teacher' (against itself the final exit's L would be its own entropy).
    exit_weight: w_exit, of each exit's L (OFA's `ofa_loss_weight`, BYOT's α).
    exit_ce_weight: of each exit's CE (BYOT's 1 − α; OFA has none).
    hint_weight: λ, of the mean squared error between each exit's feature and the student's
      'pre_logits' (held constant); needs W equal to that width.
    temperature: T of L.
    gamma: OFA's γ: one value for every term, or one per exit followed by the final logits' (the
      reference's per-stage `--ofa-eps` list).
  """

  branches: tuple[exit_branches.ExitBranch, ...]
  target: str = "teacher"
  exit_loss: str = "ofa"
  ce_weight: float = 1.0
  kd_weight: Any = 1.0
  exit_weight: float = 1.0
  exit_ce_weight: float = 0.0
  hint_weight: float = 0.0
  temperature: float = 1.0
  gamma: tuple[float, ...] = (1.0,)

  uses_head = False

  def __post_init__(self):
    if not self.branches:
      raise ValueError("exit distillation needs at least one exit")
    if self.target not in TARGETS:
      raise ValueError(f"unknown exit target {self.target!r}; choose one of {TARGETS}")
    if self.exit_loss not in EXIT_LOSSES:
      raise ValueError(f"unknown exit loss {self.exit_loss!r}; choose one of {EXIT_LOSSES}")
    if len(self.gamma) not in (1, len(self.branches) + 1):
      raise ValueError(f"gamma has {len(self.gamma)} values; give one, or one per exit ({len(self.branches)}) "
                       "and one for the final logits")
    if not all(g > 0 for g in self.gamma):
      raise ValueError(f"gamma values must be > 0, got {self.gamma}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")

  @property
  def uses_teacher(self) -> bool:
    return self.target == "teacher"

  def feature_names(self, role: str) -> tuple[str, ...]:
    if role == "teacher":
      return ()
    names = [b.source for b in self.branches] + (["pre_logits"] if self.hint_weight else [])
    return tuple(dict.fromkeys(names))

  def init_params(self, key: Array) -> dict:
    """{'exit{i}': the branch's parameters}."""
    return {f"exit{i}": exit_branches.init_branch(jax.random.fold_in(key, i), b) for i, b in enumerate(self.branches)}

  def _gamma(self, i: int) -> float:
    return self.gamma[0] if len(self.gamma) == 1 else self.gamma[i]

  def _distill(self, logits: Array, target: Array, labels: Array, mask: Array, i: int) -> Array:
    if self.exit_loss == "ofa":
      return ofa_loss(logits, target, labels, gamma=self._gamma(i), temperature=self.temperature, where=mask)
    return losses.hinton_kd(logits, target, temperature=self.temperature, where=mask)

  def __call__(self, student_out, teacher_out, batch, step, *, params):
    mask = batch["mask"].astype(bool)
    labels = batch["targets"]
    logits = student_out["logits"]
    feats = student_out.get("features", {})
    ce_sum, count = losses.masked_sum_count(_hard_ce(logits, batch, mask), mask)
    one = jnp.ones((), jnp.float32)
    metrics: Metrics = {"ce": (ce_sum, count), "accuracy": top1_match(logits, labels, mask)}
    total = self.ce_weight * losses.safe_mean(ce_sum, count)
    if self.uses_teacher:
      target = jax.lax.stop_gradient(teacher_out["logits"])
      metrics["teacher_agreement"] = top1_match(logits, jnp.argmax(target, -1), mask)
      kd = losses.masked_mean(self._distill(logits, target, labels, mask, len(self.branches)), mask)
      alpha = _as_schedule(self.kd_weight)(step)
      total = total + alpha * kd
      metrics["kd"] = (kd * count, count)
      metrics["kd_weight"] = (jnp.asarray(alpha, jnp.float32), one)
    else:
      target = jax.lax.stop_gradient(logits)
    deepest = jax.lax.stop_gradient(feats["pre_logits"]) if self.hint_weight else None
    for i, branch in enumerate(self.branches):
      name = f"exit_{branch.source}"
      feature, exit_logits = exit_branches.apply_branch(branch, params[f"exit{i}"], feats[branch.source], where=mask)
      metrics[f"{name}/accuracy"] = top1_match(exit_logits, labels, mask)
      distill = losses.masked_mean(self._distill(exit_logits, target, labels, mask, i), mask)
      total = total + self.exit_weight * distill
      metrics[f"{name}/distill"] = (distill * count, count)
      if self.exit_ce_weight:
        exit_ce = losses.masked_mean(_hard_ce(exit_logits, batch, mask), mask)
        total = total + self.exit_ce_weight * exit_ce
        metrics[f"{name}/ce"] = (exit_ce * count, count)
      if self.hint_weight:
        hint = losses.masked_mean(F.fitnet_hint(feature, deepest, where=mask), mask)
        total = total + self.hint_weight * hint
        metrics[f"{name}/hint"] = (hint * count, count)
    metrics["loss"] = (total * count, count)
    return total, metrics


def _stage_index(name: str) -> Optional[int]:
  match = re.fullmatch(r"stage(\d+)", name)
  return int(match.group(1)) if match else None


def deepest_stage(shapes: Mapping[str, tuple]) -> Optional[str]:
  """The last 'stage{i}' map a model records (None for a ViT, which has no stages)."""
  stages = [(i, n) for n in shapes if (i := _stage_index(n)) is not None and len(shapes[n]) == 3]
  return max(stages)[1] if stages else None


def default_exits(shapes: Mapping[str, tuple], *, include_last: bool) -> tuple[str, ...]:
  """'stage1'..'stageN' (OFA, `include_last`) or 'stage1'..'stage{N−1}' (self-distillation)."""
  last = deepest_stage(shapes)
  if last is None:
    raise ValueError(f"the student records no 'stage{{i}}' maps ({sorted(shapes)}): name the exits' activations")
  n = _stage_index(last)
  stop = n + 1 if include_last else n
  if stop <= 1:
    raise ValueError("a one-stage student has no intermediate stage to put an exit on")
  return tuple(f"stage{i}" for i in range(1, stop))


def exit_strategy(cfg: dict, *, student_shapes: Mapping[str, tuple], teacher_shapes: Optional[Mapping[str, tuple]],
                  num_classes: int) -> ExitDistillation:
  """`ExitDistillation` from a config's `distill` section.

  Keys: target ('teacher' | 'final'), exit_loss ('ofa' | 'kd'), exits (student activation names;
  default every stage with target 'teacher', stages 1..N−1 with 'final'), width (W; default the
  larger of the two models' 'pre_logits' widths, or the student's own with target 'final'),
  ce_weight, kd_weight (a number or a `kdjax.distill.schedules` config), exit_weight, exit_ce_weight,
  hint_weight, temperature, gamma (a number or a list).

  Each exit's number of SepConv blocks takes its map down to the size of the student's deepest stage
  (none for a ViT, whose blocks all share one grid).
  """
  _check_keys(cfg, {"target", "exit_loss", "exits", "width", "ce_weight", "kd_weight", "exit_weight",
                    "exit_ce_weight", "hint_weight", "temperature", "gamma"}, "exits")
  target = cfg.get("target", "teacher")

  def width_of(shapes, role):
    if shapes is None or "pre_logits" not in shapes:
      raise ValueError(f"the {role} records no 'pre_logits' feature, so the exits' width must be given (width)")
    return int(shapes["pre_logits"][-1])

  exits = cfg.get("exits") or default_exits(student_shapes, include_last=target == "teacher")
  exits = (exits,) if isinstance(exits, str) else tuple(exits)
  if "width" in cfg:
    width = int(cfg["width"])
  elif target == "teacher":
    width = max(width_of(student_shapes, "student"), width_of(teacher_shapes, "teacher"))
  else:
    width = width_of(student_shapes, "student")
  hint_weight = float(cfg.get("hint_weight", 0.0))
  if hint_weight and width != width_of(student_shapes, "student"):
    raise ValueError(f"the hint compares exit features of width {width} with the student's 'pre_logits' of width "
                     f"{width_of(student_shapes, 'student')}: they must be equal")
  last = deepest_stage(student_shapes)
  branches = []
  for name in exits:
    if name not in student_shapes:
      raise ValueError(f"the student records no activation {name!r}; it records {sorted(student_shapes)}")
    shape = tuple(student_shapes[name])
    prefix = exit_branches.prefix_tokens_of(shape)
    size = exit_branches.grid_size(shape, prefix)
    final = size if last is None else student_shapes[last][0]
    branches.append(exit_branches.ExitBranch(source=name, in_shape=shape, width=width, num_classes=num_classes,
                                             num_down=exit_branches.halvings(size, final), prefix_tokens=prefix))
  gamma = cfg.get("gamma", 1.0)
  return ExitDistillation(
      branches=tuple(branches), target=target, exit_loss=cfg.get("exit_loss", "ofa" if target == "teacher" else "kd"),
      ce_weight=float(cfg.get("ce_weight", 1.0)), kd_weight=schedules.make_schedule(cfg.get("kd_weight", 1.0)),
      exit_weight=float(cfg.get("exit_weight", 1.0)), exit_ce_weight=float(cfg.get("exit_ce_weight", 0.0)),
      hint_weight=hint_weight, temperature=float(cfg.get("temperature", 1.0)),
      gamma=tuple(float(g) for g in (gamma if isinstance(gamma, (list, tuple)) else (gamma,))))


def expose_weights(forward: Callable) -> Callable:
  """A student forward whose outputs also carry `'weights'`: (params, model_state) of this step (the
  state None for a model without BatchNorm), for strategies that read them (`reads_student_weights`)."""
  def wrapped(params, batch, model_state=None):
    out = dict(forward(params, batch) if model_state is None else forward(params, batch, model_state=model_state))
    out["weights"] = (params, model_state)
    return out
  return wrapped


@dataclasses.dataclass(frozen=True)
class EMADistillation:
  """w_ce·CE(z) + w_kd·T²·KL(softmax(z_ema/T) ‖ softmax(z/T)), the teacher being the student's EMA.

  The state holds θ_ema (parameters and BatchNorm statistics) and whether it has started: on the
  first step it is a copy of the student, then after each step
  θ_ema ← m·θ_ema + (1 − m)·θ, with θ the weights this step's gradient was taken at (the
  optimizer's update follows, so θ_ema trails the student by one step). The EMA model runs in eval
  mode on its averaged statistics.

  Attributes:
    forward: `(weights, batch) -> {'logits', ...}` of the student's architecture in eval mode
      (`kdjax.train.step.classifier_forward(graphdef)`), weights being `(params, model_state)`.
    template: the weights' abstract shapes (`nnx.State`s of `jax.ShapeDtypeStruct`), for `init_state`.
    momentum: m, a schedule `step -> value` in [0, 1].
    ce_weight / kd_weight (a schedule) / temperature: as `RepresentationDistillation`'s KD.
  """

  forward: Callable = dataclasses.field(compare=False, repr=False)
  template: Any = dataclasses.field(compare=False, repr=False)
  momentum: Any = 0.99
  ce_weight: float = 1.0
  kd_weight: Any = 1.0
  temperature: float = 4.0

  uses_teacher = False  # no external teacher: the step runs none
  uses_head = False
  reads_student_weights = True  # the student forward must be wrapped by `expose_weights`

  def feature_names(self, role: str) -> tuple[str, ...]:
    del role
    return ()

  def init_state(self) -> dict:
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self.template)
    return {"weights": zeros, "started": jnp.zeros((), jnp.float32)}

  def __call__(self, student_out, teacher_out, batch, step, *, state):
    del teacher_out
    if "weights" not in student_out:
      raise ValueError("EMADistillation reads the student's weights: wrap its forward with exits.expose_weights")
    mask = batch["mask"].astype(bool)
    labels = batch["targets"]
    logits = student_out["logits"]
    current = jax.lax.stop_gradient(student_out["weights"])
    started = state["started"] > 0
    ema = jax.tree_util.tree_map(lambda e, w: jnp.where(started, e, w), state["weights"], current)
    teacher_logits = jax.lax.stop_gradient(self.forward(ema, batch)["logits"])
    ce_sum, count = losses.masked_sum_count(_hard_ce(logits, batch, mask), mask)
    kd = losses.masked_mean(losses.hinton_kd(logits, teacher_logits, temperature=self.temperature, where=mask), mask)
    alpha = _as_schedule(self.kd_weight)(step)
    total = self.ce_weight * losses.safe_mean(ce_sum, count) + alpha * kd
    m = jnp.asarray(_as_schedule(self.momentum)(step), jnp.float32)
    new_ema = jax.tree_util.tree_map(lambda e, w: m * e + (1.0 - m) * w, ema, current)
    one = jnp.ones((), jnp.float32)
    metrics: Metrics = {
        "ce": (ce_sum, count), "accuracy": top1_match(logits, labels, mask), "kd": (kd * count, count),
        "kd_weight": (jnp.asarray(alpha, jnp.float32), one), "ema_momentum": (m, one),
        "ema_accuracy": top1_match(teacher_logits, labels, mask),
        "teacher_agreement": top1_match(logits, jnp.argmax(teacher_logits, -1), mask),
        "loss": (total * count, count)}
    return total, metrics, {"weights": new_ema, "started": jnp.ones((), jnp.float32)}


def ema_strategy(cfg: dict, *, make_student: Callable[[], nnx.Module]) -> EMADistillation:
  """`EMADistillation` from a config's `distill` section, for the student `make_student` builds.

  Keys: momentum (a number or a schedule config), ce_weight, kd_weight (a number or a schedule
  config), temperature.
  """
  _check_keys(cfg, {"momentum", "ce_weight", "kd_weight", "temperature"}, "ema")
  abstract = nnx.eval_shape(make_student)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  # The step hands a model without BatchNorm no model_state: its EMA weights are then (params, None).
  template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    (params, rest if jax.tree_util.tree_leaves(rest) else None))
  momentum = cfg.get("momentum", 0.99)
  if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
    raise ValueError(f"the EMA momentum must lie in [0, 1], got {momentum}")
  return EMADistillation(forward=step_lib.classifier_forward(graphdef), template=template,
                         momentum=schedules.make_schedule(momentum), ce_weight=float(cfg.get("ce_weight", 1.0)),
                         kd_weight=schedules.make_schedule(cfg.get("kd_weight", 1.0)),
                         temperature=float(cfg.get("temperature", 4.0)))
