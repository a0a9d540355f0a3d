"""Fake quantisation for quantisation-aware training (QAT) of a model whose code stays as it is.

    model = vision_model("resnet8", num_classes=10, rngs=nnx.Rngs(0), input_shape=(8, 8, 1))
    model = quantize_model(model, QuantSpec(bits_weights=2, bits_activations=2), sample_images)

After `quantize_model` every `nnx.Conv` and `nnx.Linear` of the model computes with

* weights quantised per output channel, symmetric, to `bits_weights` bits: for channel c (the kernel's
  last axis: HWIO convolutions, `[in, out]` linear layers, depthwise kernels alike)
      s_c = max|W_c| / Q_w,   Q_w = 2^(b-1) - 1,   W_q = s_c · clip(round(W / s_c), -Q_w, Q_w)
  (the narrow symmetric range: 2 bits are the ternary {-s, 0, s}); s_c is a constant of the forward
  (stop-gradient), so the straight-through estimator passes ∂L/∂W_q to W unchanged;
* inputs (the activations) quantised per tensor with a learned step size, LSQ (Esser et al., "Learned
  Step Size Quantization", ICLR 2020):
      v = x / s,   x_q = s · round(clip(v, Q_n, Q_p))
  with [Q_n, Q_p] = [0, 2^b - 1] for a layer whose input was non-negative at calibration (after a
  ReLU) and [-2^(b-1), 2^(b-1) - 1] otherwise; s is an `nnx.Param` trained with the model, its
  gradient scaled by g = 1 / sqrt(N · Q_p) (N the input's elements per example), initialised on the
  calibration batch to the paper's 2·mean|x| / sqrt(Q_p), or to max|x| / Q_p where that is finer
  (8 bits: LSQ's range would reach past the largest input).

Both use the clipped straight-through estimator: written as `clip(v) + stop_gradient(round(clip(v)) - clip(v))`
(the `x + stop_gradient(q(x) - x)` form on the clipped value), so ∂x_q/∂x = 1 inside
[Q_n·s, Q_p·s] and 0 outside, and ∂x_q/∂s = round(v) - v inside, Q_n or Q_p outside (LSQ's eq. 3).

The first and the last quantised layers of the forward pass (the stem sees raw pixels, the head
makes the logits) use `first_last_bits` (8 by default, as LSQ keeps them; 0 keeps them in float).
BatchNorm is not folded into the weights (it stays a float affine map after the quantised
convolution, as in LSQ's training graphs); attention's score and value products (einsums inside
ViT blocks) are not quantised, their projections are.

How it attaches without changing the model's code: each Conv / Linear instance gets a subclass of
its own class (`Quantized<Name>`) whose `__call__` quantises the input and then runs the original
`__call__` with its `conv_general_dilated` / `dot_general` replaced by one that quantises the kernel.
Parameter paths stay the same (checkpoint import, sharding rules and capture names are unaffected);
the step sizes are new `quant_step` parameters, the signedness of each layer a `QuantFlag`
variable (non-parameter state, carried with BatchNorm statistics). Qwix 0.1.8 (Google's JAX
quantisation library) was tried first: its QAT works on NNX models here for weight-only
quantisation at any width and for int8 × int8, but convolutions with sub-8-bit activations fail
on XLA:CPU (sub-byte integer operands are rejected by the HLO verifier, int4 weights × int8
activations by a dtype check), so a 2-bit student could not be trained with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
# Bit widths accepted: 0 (keep float) or 2..16 (1-bit symmetric weights would have no nonzero level).
MIN_BITS, MAX_BITS = 2, 16
QUANTIZABLE = (nnx.Conv, nnx.Linear)


class QuantFlag(nnx.Variable):
  """A layer's fixed quantisation facts (1.0 = its input is signed): non-parameter state."""


def _check_bits(name: str, bits: int) -> None:
  if not isinstance(bits, int) or isinstance(bits, bool) or not (bits == 0 or MIN_BITS <= bits <= MAX_BITS):
    raise ValueError(f"{name} must be 0 (float) or an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Bit widths of a quantised model (0 = that part stays float).

  Attributes:
    bits_weights: weight bits of every Conv / Linear layer but the first and last.
    bits_activations: input bits of those layers.
    first_last_bits: weight and input bits of the first and the last layer of the forward pass.
  """

  bits_weights: int = 8
  bits_activations: int = 8
  first_last_bits: int = 8

  def __post_init__(self):
    for name in ("bits_weights", "bits_activations", "first_last_bits"):
      _check_bits(name, getattr(self, name))

  @property
  def enabled(self) -> bool:
    return bool(self.bits_weights or self.bits_activations)

  @classmethod
  def from_config(cls, section: Optional[Mapping[str, Any]]) -> Optional["QuantSpec"]:
    """The spec of a config's `quantize` section (keys bits_weights, bits_activations,
    first_last_bits), or None when the section is missing or quantises nothing."""
    if not section:
      return None
    section = dict(section)
    unknown = sorted(set(section) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown quantize keys {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
    spec = cls(**section)
    return spec if spec.enabled else None


def _round_ste(v: Array) -> Array:
  return v + jax.lax.stop_gradient(jnp.round(v) - v)


def _scale_grad(x: Array, g) -> Array:
  """x in the forward, g·∂L/∂x in the backward (LSQ's gradient scale of the step size)."""
  return x * g + jax.lax.stop_gradient(x - x * g)


def fake_quantize(x: Array, step: Array, *, qmin, qmax, grad_scale=1.0) -> Array:
  """`step · round(clip(x / step, qmin, qmax))` with the clipped straight-through estimator.

  Args:
    x: values to quantise.
    step: the step size s, broadcastable to `x` (a scalar, or one per channel), > 0.
    qmin, qmax: the integer range [Q_n, Q_p] (numbers or arrays broadcastable to `x`).
    grad_scale: the factor on ∂L/∂s (LSQ's g); the forward does not depend on it.

  Returns:
    The quantised values, dtype of `x`. Gradients: ∂/∂x = 1 where qmin ≤ x/s ≤ qmax and 0 elsewhere;
    ∂/∂s = g·(round(x/s) - x/s) inside and g·qmin or g·qmax where clipped (LSQ, eq. 3).
  """
  step = _scale_grad(step, grad_scale)
  v = x / step
  inside = (v >= qmin) & (v <= qmax)
  # `where` rather than a bare clip: a value on the boundary (each weight channel's largest) keeps
  # gradient 1, where min/max would share it between the two branches.
  v = jnp.where(inside, v, jnp.clip(v, qmin, qmax))
  return (_round_ste(v) * step).astype(x.dtype)


def symmetric_max(bits: int) -> int:
  """Q_w = 2^(b-1) - 1, the largest level of the narrow symmetric range."""
  return 2 ** (bits - 1) - 1


def quantize_weight(kernel: Array, *, bits: int) -> Array:
  """Per-output-channel (last axis) symmetric fake quantisation with s_c = max|W_c| / Q_w."""
  qmax = symmetric_max(bits)
  absmax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
  # An all-zero channel gets a tiny step: its weights quantise to 0 instead of 0/0.
  step = jax.lax.stop_gradient(jnp.maximum(absmax, jnp.finfo(kernel.dtype).tiny) / qmax)
  return fake_quantize(kernel, step, qmin=-qmax, qmax=qmax)


def activation_range(signed: Array, bits: int) -> tuple[Array, Array]:
  """[Q_n, Q_p]: [-2^(b-1), 2^(b-1) - 1] when `signed` is 1, [0, 2^b - 1] when it is 0."""
  half = 2.0 ** (bits - 1)
  return -signed * half, half - 1.0 + (1.0 - signed) * half


def quantize_activation(x: Array, step: Array, signed: Array, *, bits: int) -> Array:
  """Per-tensor LSQ fake quantisation of a layer input `[B, ...]` with learned step `s` and its signedness.

  The step used is max(|s|, 1e-8): an SGD update with momentum can carry a small step through zero
  (seen on the head's input at lr 0.05), and a negative step would flip the range and zero the
  layer's input for good; for s > 0 this is LSQ unchanged.
  """
  qmin, qmax = activation_range(signed, bits)
  per_example = math.prod(x.shape[1:])
  step = jnp.maximum(jnp.abs(step), 1e-8)
  return fake_quantize(x, step, qmin=qmin, qmax=qmax, grad_scale=jax.lax.rsqrt(per_example * qmax))


def lsq_initial_step(x: Array, signed: Array, *, bits: int) -> Array:
  """min(2·mean|x| / sqrt(Q_p), max|x| / Q_p), kept positive for an all-zero input.

  The first term is LSQ's initial step; its range Q_p·s = 2·sqrt(Q_p)·mean|x| clips the tail at
  low bit widths (the point of it) but grows past the largest input from about 6 bits on, where the
  second term keeps the range at the calibration batch's max|x| and the step finer.
  """
  _, qmax = activation_range(signed, bits)
  absx = jnp.abs(x)
  return jnp.maximum(jnp.minimum(2.0 * jnp.mean(absx) * jax.lax.rsqrt(qmax), jnp.max(absx) / qmax), 1e-8)


# The open calibration scope: the list every quantised layer appends (layer, input) to.
_CALIBRATION: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("kdjax_quant_calibration", default=None)


@functools.lru_cache(maxsize=None)
def _with_quantized_kernel(op, bits: int):
  """`op(lhs, rhs, ...)` with its kernel `rhs` fake-quantised; cached so every model built with the
  same widths holds the same function (it is a static attribute of the graph definition)."""
  def quantized_op(lhs, rhs, *args, **kwargs):
    return op(lhs, quantize_weight(rhs, bits=bits), *args, **kwargs)
  return quantized_op


def _quantized_call(base: type):
  """The `__call__` of a quantised `base` layer: quantise the input, then run `base.__call__`, whose
  kernel op (set by `quantize_model`) quantises the weights."""

  def __call__(self, inputs, *args, **kwargs):
    scope = _CALIBRATION.get()
    if scope is not None:
      scope.append((self, inputs))
    elif self.quant_bits_activations:
      inputs = quantize_activation(inputs, self.quant_step[...], self.quant_signed[...],
                                   bits=self.quant_bits_activations)
    return base.__call__(self, inputs, *args, **kwargs)
  return __call__


@functools.lru_cache(maxsize=None)
def _quantized_class(base: type) -> type:
  # A direct subclass with no new slots, so `__class__` assignment keeps the object's layout.
  return type(f"Quantized{base.__name__}", (base,),
              {"__call__": _quantized_call(base), "__module__": __name__, "quantized_base": base,
               "quant_bits_activations": 0})


@contextlib.contextmanager
def _calibrating():
  records: list = []
  token = _CALIBRATION.set(records)
  try:
    yield records
  finally:
    _CALIBRATION.reset(token)


def quantize_model(model: nnx.Module, spec: QuantSpec, sample_inputs: Array, **call_kwargs) -> nnx.Module:
  """Makes `model`'s Conv and Linear layers fake-quantised, in place, and returns it.

  One calibration call `model(sample_inputs, train=True, **call_kwargs)` (BatchNorm on batch
  statistics, as training sees the layers; the running statistics are restored afterwards) finds
  the layers' order (first and last get `spec.first_last_bits`), whether each input is signed, and
  the LSQ initial steps. It may run under `jax.jit` / `nnx.eval_shape` (the facts become traced
  values of the new variables).

  Args:
    model: an NNX module called as `model(x, *, train)` (the `kdjax.models.vision` models).
    spec: the bit widths.
    sample_inputs: a representative batch, normalised as training batches are.
    **call_kwargs: further keyword arguments of the calibration call.

  Raises:
    ValueError: the model has no Conv / Linear layer, or was quantised already.
  """
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, QUANTIZABLE)]
  if not layers:
    raise ValueError(f"{type(model).__name__} has no nnx.Conv or nnx.Linear layer to quantise")
  if any(hasattr(type(m), "quantized_base") for m in layers):
    raise ValueError(f"{type(model).__name__} is already quantised")
  for layer in layers:
    layer.__class__ = _quantized_class(type(layer))
  stats = nnx.state(model, nnx.BatchStat)
  saved = nnx.to_pure_dict(stats)  # the arrays, not the variables the calibration call writes to
  with _calibrating() as records:
    model(sample_inputs, train=True, **call_kwargs)
  nnx.replace_by_pure_dict(stats, saved)
  nnx.update(model, stats)
  first_input: dict[int, Array] = {}
  order: list = []
  for layer, x in records:
    if id(layer) not in first_input:
      first_input[id(layer)] = x
      order.append(layer)
  ends = {id(order[0]), id(order[-1])} if order else set()
  for layer in order:
    end = id(layer) in ends
    w_bits = spec.first_last_bits if end else spec.bits_weights
    a_bits = spec.first_last_bits if end else spec.bits_activations
    if w_bits:
      name = "conv_general_dilated" if isinstance(layer, nnx.Conv) else "dot_general"
      setattr(layer, name, _with_quantized_kernel(getattr(layer, name), w_bits))
    if a_bits:
      x = first_input[id(layer)]
      signed = (jnp.min(x) < 0).astype(jnp.float32)
      layer.quant_bits_activations = a_bits
      layer.quant_signed = QuantFlag(signed)
      layer.quant_step = nnx.Param(lsq_initial_step(x.astype(jnp.float32), signed, bits=a_bits))
  return model
