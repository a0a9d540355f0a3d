"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

The CIFAR variant RepDistiller / mdistiller take from "Knowledge Distillation via Route Constrained
Optimization" (Jin et al., ICCV 2019): a stride-2 3x3 stem of ``int(32 W)`` channels, the seven inverted-
residual groups ``(t, c, n, s)`` = ``(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1),
(T, 160, 3, 2), (T, 320, 1, 1)`` with ``c`` scaled to ``int(c W)``, a 1x1 convolution to 1280 channels
(``int(1280 W)`` only when ``W > 1``), global average pooling and a linear head. The total stride is 16,
so a 32x32 image ends at 2x2. ``mobilenetv2`` in the registry is RepDistiller's ``MobileNetV2`` entry,
``mobile_half``: ``T = 6``, ``W = 0.5``.

An inverted residual block is ``y = [x +] bn(pw_linear(relu(bn(dw3x3_stride(relu(bn(pw_expand(x))))))))``,
the skip only at stride 1 with equal widths, and no ReLU after the sum (the linear bottleneck). The
expansion convolution is kept even when ``t = 1``, as in the reference (it carries parameters).

Activations: ``stem``; ``stage1 .. stage4`` the outputs of groups 1-2, 3, 4-5 and 6-7 (RepDistiller's
``f1 .. f4``, at strides 2, 4, 8 and 16: 16x16 .. 2x2 maps for a 32x32 image); because a
linear bottleneck has no final ReLU, ``stage{i}_preact`` is the same array as ``stage{i}``, as the
reference's ``preact=True`` features are its plain ones. ``pre_logits`` is the pooled 1280-d feature.
"""

from __future__ import annotations

import jax
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision import layers

# (expansion or None for the network's T, channels before the width multiplier, blocks, first stride)
_GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1))
# The groups whose outputs close each recorded stage (RepDistiller's f1 .. f4).
_STAGE_ENDS = (1, 2, 4, 6)


class InvertedResidual(nnx.Module):
  """Expand 1x1, depthwise 3x3, project 1x1 (linear), with the skip at stride 1 and equal widths.

  Args:
    in_channels: channels of the input.
    out_channels: channels of the output.
    stride: stride of the depthwise convolution.
    expansion: the hidden width is ``expansion * in_channels``.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, *, rngs: nnx.Rngs):
    hidden = in_channels * expansion
    self.convs = nnx.List([
        layers.conv(in_channels, hidden, 1, rngs=rngs),
        layers.conv(hidden, hidden, 3, stride=stride, groups=hidden, rngs=rngs),
        layers.conv(hidden, out_channels, 1, rngs=rngs),
    ])
    self.norms = nnx.List([layers.batch_norm(c, rngs=rngs) for c in (hidden, hidden, out_channels)])
    self.residual = stride == 1 and in_channels == out_channels

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      h = norm(conv(h), use_running_average=not train)
      if i < 2:
        h = nnx.relu(h)
    return x + h if self.residual else h


class MobileNetV2(nnx.Module):
  """RepDistiller's CIFAR MobileNetV2.

  Args:
    expansion: ``T``, the expansion ratio of every group but the first.
    width_mult: ``W``, the channel multiplier.
    num_classes: number of logits.
    in_channels: channels of the input images.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, *, expansion: int = 6, width_mult: float = 0.5, num_classes: int, in_channels: int = 3,
               rngs: nnx.Rngs):
    layers.positive_ints(expansion=expansion, in_channels=in_channels)
    if not width_mult > 0:
      raise ValueError(f"width_mult must be positive, got {width_mult!r}")
    self.in_channels = in_channels
    channels = int(32 * width_mult)
    self.stem = layers.conv(in_channels, channels, 3, stride=2, rngs=rngs)
    self.stem_norm = layers.batch_norm(channels, rngs=rngs)
    groups = []
    for t, c, n, s in _GROUPS:
      out = int(c * width_mult)
      blocks = []
      for j in range(n):
        blocks.append(InvertedResidual(channels, out, s if j == 0 else 1, expansion if t is None else t, rngs=rngs))
        channels = out
      groups.append(nnx.List(blocks))
    self.groups = nnx.List(groups)
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.last_conv = layers.conv(channels, last, 1, rngs=rngs)
    self.last_norm = layers.batch_norm(last, rngs=rngs)
    self.fc = layers.head(last, num_classes, init="small_normal", rngs=rngs)

  def activation_names(self) -> list[str]:
    return layers.cnn_activation_names(len(_STAGE_ENDS))

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    layers.check_images(images, self.in_channels)
    x = capture.record("stem", nnx.relu(self.stem_norm(self.stem(images), use_running_average=not train)))
    for g, group in enumerate(self.groups):
      for block in group:
        x = block(x, train=train)
      if g in _STAGE_ENDS:
        stage = _STAGE_ENDS.index(g) + 1
        capture.record(f"stage{stage}_preact", x)
        capture.record(f"stage{stage}", x)
    x = nnx.relu(self.last_norm(self.last_conv(x), use_running_average=not train))
    return self.fc(capture.record("pre_logits", layers.global_avg_pool(x)))
