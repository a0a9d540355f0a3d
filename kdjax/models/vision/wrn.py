"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), as in RepDistiller.

``WRN-d-k``: a 3x3 stem of 16 channels, three stages of ``n = (d - 4) / 6`` pre-activation blocks of widths
``16k, 32k, 64k`` at strides 1, 2, 2, then ``relu(bn(.))``, global average pooling and a linear head. Dropout
is off (RepDistiller's ``dropRate=0``).

A pre-activation block with ``a = relu(bn1(x))`` computes ``y = s + conv2(relu(bn2(conv1_stride(a))))``
where the shortcut ``s`` is ``x`` itself when the width is unchanged, and ``conv1x1_stride(a)`` (of the
*activated* input, as the reference) otherwise.

Activations follow RepDistiller's ``forward(is_feat=True, preact=...)``: ``stem`` is the stem convolution's
output (no norm or ReLU), ``stage{i}`` the residual sum a stage outputs (a pre-activation network has no
ReLU there), and ``stage{i}_preact`` the same map after the BatchNorm that next reads it (the first
``bn1`` of stage ``i + 1``; the final ``bn`` for the last stage): the features before the next ReLU, recorded
where the network computes them, so after ``stage{i}``. ``pre_logits`` is the pooled ``relu(bn(stage3))``.
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision import layers


class WideBlock(nnx.Module):
  """A pre-activation basic block.

  Args:
    in_channels: channels of the input.
    out_channels: channels of both convolutions.
    stride: stride of the first convolution and of the projection shortcut.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
    self.norm1 = layers.batch_norm(in_channels, rngs=rngs)
    self.conv1 = layers.conv(in_channels, out_channels, 3, stride=stride, rngs=rngs)
    self.norm2 = layers.batch_norm(out_channels, rngs=rngs)
    self.conv2 = layers.conv(out_channels, out_channels, 3, rngs=rngs)
    needs_projection = in_channels != out_channels or stride != 1
    self.shortcut = layers.conv(in_channels, out_channels, 1, stride=stride, rngs=rngs) if needs_projection else None

  def __call__(self, x: jax.Array, *, train: bool, preact_name: Optional[str] = None) -> jax.Array:
    """``preact_name``: record ``bn1(x)`` under this name (the previous stage's pre-ReLU features)."""
    normed = self.norm1(x, use_running_average=not train)
    if preact_name is not None:
      capture.record(preact_name, normed)
    a = nnx.relu(normed)
    h = self.conv2(nnx.relu(self.norm2(self.conv1(a), use_running_average=not train)))
    return h + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nnx.Module):
  """``WRN-depth-widen_factor`` for 32x32 inputs (any size works; pooling is global).

  Args:
    depth: 6n + 4 (16, 22, 28, 40, ...).
    widen_factor: ``k``; stage widths are ``16k, 32k, 64k``.
    num_classes: number of logits.
    in_channels: channels of the input images.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, *, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs):
    layers.positive_ints(depth=depth, widen_factor=widen_factor, in_channels=in_channels)
    if depth < 10 or (depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.in_channels = in_channels
    self.stem = layers.conv(in_channels, 16, 3, rngs=rngs)
    stages, channels = [], 16
    for i, width in enumerate(widths):
      stages.append(nnx.List([WideBlock(channels if j == 0 else width, width, 2 if i > 0 and j == 0 else 1, rngs=rngs)
                              for j in range(n)]))
      channels = width
    self.stages = nnx.List(stages)
    self.final_norm = layers.batch_norm(channels, rngs=rngs)
    self.fc = layers.head(channels, num_classes, init="torch_zero_bias", rngs=rngs)

  def activation_names(self) -> list[str]:
    return layers.cnn_activation_names(len(self.stages), preact_first=False)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    layers.check_images(images, self.in_channels)
    x = capture.record("stem", self.stem(images))
    for i, stage in enumerate(self.stages):
      for j, block in enumerate(stage):
        # The first block of stage i + 1 normalises stage i's output: that BN output is stage i's preact.
        x = block(x, train=train, preact_name=f"stage{i}_preact" if i > 0 and j == 0 else None)
      capture.record(f"stage{i + 1}", x)
    normed = capture.record(f"stage{len(self.stages)}_preact", self.final_norm(x, use_running_average=not train))
    return self.fc(capture.record("pre_logits", layers.global_avg_pool(nnx.relu(normed))))
