"""Post-activation ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

One class covers the two layouts of RepDistiller / mdistiller:

* the CIFAR ResNets (``models/resnet.py``): a 3x3 stem of ``widths[0]`` channels and three stages of
  ``n = (depth - 2) / 6`` basic blocks of ``widths[1:]`` channels at strides 1, 2, 2. ``resnet8 .. resnet110``
  use ``[16, 16, 32, 64]``; ``resnet8x4`` / ``resnet32x4`` use ``[32, 64, 128, 256]``, so their first stage
  already changes width (a projection shortcut at stride 1).
* the CIFAR variant of the ImageNet ResNets (``models/resnetv2.py``: ResNet18/34/50): a 3x3 stem of 64
  channels, four stages of widths 64, 128, 256, 512 at strides 1, 2, 2, 2, basic or bottleneck blocks.

A block computes ``y = relu(F(x) + s(x))`` with ``s`` the identity, or ``bn(conv1x1_stride(x))`` when the
shape changes; ``F`` is ``bn(conv3x3(relu(bn(conv3x3_stride(x)))))`` (basic) or the bottleneck
``bn(conv1x1(relu(bn(conv3x3_stride(relu(bn(conv1x1(x))))))))`` whose output has 4x its inner width.

Activations: ``stem`` (``relu(bn(conv(x)))``), ``stage{i}_preact`` (the last block's ``F(x) + s(x)``,
the features before the final ReLU that OFD-style methods read), ``stage{i}`` (after that ReLU) and
``pre_logits`` (the global average of the last stage).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision import layers


class ResidualBlock(nnx.Module):
  """A basic or bottleneck post-activation block; returns ``(relu(preact), preact)``.

  Args:
    in_channels: channels of the input.
    planes: inner width; the output has ``planes`` (basic) or ``4 * planes`` (bottleneck) channels.
    stride: stride of the 3x3 convolution (and of the projection shortcut).
    bottleneck: use the 1x1-3x3-1x1 bottleneck instead of two 3x3 convolutions.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, in_channels: int, planes: int, stride: int, *, bottleneck: bool, rngs: nnx.Rngs):
    out_channels = planes * (4 if bottleneck else 1)
    if bottleneck:
      shapes = [(in_channels, planes, 1, 1), (planes, planes, 3, stride), (planes, out_channels, 1, 1)]
    else:
      shapes = [(in_channels, planes, 3, stride), (planes, out_channels, 3, 1)]
    self.convs = nnx.List([layers.conv(i, o, k, stride=s, rngs=rngs) for i, o, k, s in shapes])
    self.norms = nnx.List([layers.batch_norm(o, rngs=rngs) for _, o, _, _ in shapes])
    if stride != 1 or in_channels != out_channels:
      self.shortcut = layers.conv(in_channels, out_channels, 1, stride=stride, rngs=rngs)
      self.shortcut_norm = layers.batch_norm(out_channels, rngs=rngs)
    else:
      self.shortcut = self.shortcut_norm = None
    self.out_channels = out_channels

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    h = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      h = norm(conv(h), use_running_average=not train)
      if i < len(self.convs) - 1:
        h = nnx.relu(h)
    skip = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x), use_running_average=not train)
    preact = h + skip
    return nnx.relu(preact), preact


class ResNet(nnx.Module):
  """A stem, stages of residual blocks, global average pooling and a linear head.

  Stage ``i`` (0-based) has ``blocks_per_stage[i]`` blocks of inner width ``stage_widths[i]``; its first
  block has stride 1 for the first stage and 2 after.

  Args:
    stem_width: channels of the 3x3 stem convolution.
    stage_widths: inner width of each stage.
    blocks_per_stage: number of blocks in each stage.
    bottleneck: bottleneck blocks (ResNet50) instead of basic ones.
    num_classes: number of logits.
    in_channels: channels of the input images.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, *, stem_width: int, stage_widths: Sequence[int], blocks_per_stage: Sequence[int],
               bottleneck: bool = False, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs):
    layers.positive_ints(stem_width=stem_width, stage_widths=tuple(stage_widths),
                         blocks_per_stage=tuple(blocks_per_stage), in_channels=in_channels)
    if len(stage_widths) != len(blocks_per_stage):
      raise ValueError(f"stage_widths {tuple(stage_widths)} and blocks_per_stage {tuple(blocks_per_stage)} "
                       "must have one entry per stage")
    self.in_channels = in_channels
    self.stem = layers.conv(in_channels, stem_width, 3, rngs=rngs)
    self.stem_norm = layers.batch_norm(stem_width, rngs=rngs)
    stages, channels = [], stem_width
    for i, (width, count) in enumerate(zip(stage_widths, blocks_per_stage)):
      blocks = []
      for j in range(count):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(ResidualBlock(channels, width, stride, bottleneck=bottleneck, rngs=rngs))
        channels = blocks[-1].out_channels
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.fc = layers.head(channels, num_classes, init="torch", rngs=rngs)

  def activation_names(self) -> list[str]:
    return layers.cnn_activation_names(len(self.stages))

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    layers.check_images(images, self.in_channels)
    x = capture.record("stem", nnx.relu(self.stem_norm(self.stem(images), use_running_average=not train)))
    for i, stage in enumerate(self.stages, start=1):
      for block in stage:
        x, preact = block(x, train=train)
      capture.record(f"stage{i}_preact", preact)
      capture.record(f"stage{i}", x)
    return self.fc(capture.record("pre_logits", layers.global_avg_pool(x)))


def cifar_resnet_arch(depth: int, widths: Sequence[int]) -> dict:
  """The :class:`ResNet` arguments of RepDistiller's ``ResNet(depth, num_filters, 'basicblock')``."""
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n + 2 (8, 14, 20, ...), got {depth!r}")
  if len(widths) != 4:
    raise ValueError(f"widths are [stem, stage1, stage2, stage3], got {tuple(widths)}")
  n = (depth - 2) // 6
  return dict(stem_width=widths[0], stage_widths=tuple(widths[1:]), blocks_per_stage=(n, n, n))
