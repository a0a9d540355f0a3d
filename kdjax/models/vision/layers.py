"""Layers shared by the convnets, initialised as the PyTorch reference code initialises them.

The CIFAR models of RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020)
and mdistiller (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022) are the models most
distillation papers report on, so the layers here reproduce them rather than Flax's defaults:

* Convolutions pad ``k // 2`` on *both* sides, as ``nn.Conv2d(padding=k // 2)``. Flax's ``'SAME'`` pads a
  stride-2 3x3 convolution of an even input by (0, 1), which samples a grid shifted by one pixel.
* Convolution kernels are drawn from ``N(0, 2 / (k * k * out_channels))``: Kaiming normal, fan-out mode.
  This is both ``kaiming_normal_(mode='fan_out')`` (ResNets) and ``normal_(0, sqrt(2 / n))`` with
  ``n = k * k * out_channels`` (WRN, VGG, MobileNetV2), depthwise kernels included (PyTorch's fan-out of a
  grouped kernel ``[out, in / groups, k, k]`` is also ``k * k * out``). The JAX kernel layout is HWIO, whose
  fan-out is the same product.
* BatchNorm uses PyTorch's ``momentum=0.1`` (Flax's decay 0.9: ``running = 0.9 running + 0.1 batch``) and
  ``eps=1e-5``, scale 1 and bias 0. One difference stays: PyTorch stores the *unbiased* batch variance
  (times ``n / (n - 1)``) in its running variance, Flax the biased one; with ``n = B * H * W`` values per
  channel the two differ by a factor ``1 + 1 / (n - 1)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# N(0, 2 / fan_out) with fan_out = kh * kw * out_channels for an HWIO kernel (untruncated, like torch).
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Linear heads whose reference draws N(0, 0.01^2) weights and zero biases (VGG, MobileNetV2).
SMALL_NORMAL_INIT = jax.nn.initializers.normal(0.01)
# PyTorch's default Linear weight init, kaiming_uniform_(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
# a uniform law of variance 1 / (3 fan_in).
TORCH_LINEAR_INIT = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

HEAD_INITS = ("torch", "torch_zero_bias", "small_normal")


def conv(in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, groups: int = 1,
         bias: bool = False, rngs: nnx.Rngs) -> nnx.Conv:
  """A square convolution with PyTorch's symmetric ``k // 2`` padding and Kaiming fan-out init."""
  pad = kernel // 2
  return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  feature_group_count=groups, use_bias=bias, kernel_init=CONV_INIT, rngs=rngs)


def batch_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, i.e. Flax decay 0.9; eps 1e-5)."""
  return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def head(in_features: int, num_classes: int, *, init: str, rngs: nnx.Rngs) -> nnx.Linear:
  """The classifier layer, initialised as the reference model of each family does.

  Args:
    in_features: width of the pooled feature.
    num_classes: number of logits.
    init: ``"torch"`` (PyTorch's default ``nn.Linear``: weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
      the ResNets), ``"torch_zero_bias"`` (the same weight, bias 0: WRN) or ``"small_normal"`` (weight
      ``N(0, 0.01^2)``, bias 0: VGG and MobileNetV2).
    rngs: random streams; ``params`` is used.
  """
  if init not in HEAD_INITS:
    raise ValueError(f"unknown head init {init!r}; expected one of {HEAD_INITS}")
  if not isinstance(num_classes, int) or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  weight_init = SMALL_NORMAL_INIT if init == "small_normal" else TORCH_LINEAR_INIT
  bias_init = _torch_bias_init(in_features) if init == "torch" else jax.nn.initializers.zeros
  return nnx.Linear(in_features, num_classes, kernel_init=weight_init, bias_init=bias_init, rngs=rngs)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """``[B, H, W, C] -> [B, C]``.

  The references pool with a fixed window (``AvgPool2d(8)`` for the ResNets and WRN, ``AvgPool2d(2)`` for
  MobileNetV2) that covers the whole final map at 32x32 inputs; a global mean is the same there and keeps
  the models usable at other input sizes (28x28 or 8x8 digits).
  """
  return jnp.mean(x, axis=(1, 2))


def max_pool2(x: jax.Array) -> jax.Array:
  """``MaxPool2d(2, 2)``: 2x2 windows, stride 2, an odd last row / column dropped."""
  return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def check_images(images: jax.Array, in_channels: int) -> None:
  """Raises a ValueError unless ``images`` is ``[B, H, W, in_channels]``."""
  shape = jnp.shape(images)
  if len(shape) != 4 or shape[-1] != in_channels:
    raise ValueError(f"images must be NHWC [B, H, W, {in_channels}], got shape {shape}")


def cnn_activation_names(num_stages: int, *, preact_first: bool = True) -> list[str]:
  """``stem, stage1(_preact), ..., pre_logits`` in the order a forward pass records them.

  A post-activation block forms its pre-ReLU sum before the ReLU (``preact_first``); a pre-activation
  network (WRN) normalises a stage's output only when the next stage reads it, after recording the stage.
  """
  names = ["stem"]
  for i in range(1, num_stages + 1):
    pair = [f"stage{i}_preact", f"stage{i}"]
    names += pair if preact_first else pair[::-1]
  return names + ["pre_logits"]


def positive_ints(**values: int | Sequence[int]) -> None:
  """Raises a ValueError naming the first argument that is not a positive int (or sequence of them)."""
  for name, value in values.items():
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
      raise ValueError(f"{name} must be a positive int (or a non-empty sequence of them), got {value!r}")
