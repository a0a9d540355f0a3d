"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, ICLR 2015), as RepDistiller's ``models/vgg.py``.

Five blocks of 3x3 convolutions (with biases) + BatchNorm, ReLU between them; the fully connected layers
of the ImageNet VGG are gone: a global average pool feeds one linear head of 512 inputs. RepDistiller's
registry names ``vgg8 .. vgg19`` are the ``_bn`` variants, which these are.

Each block ends at its last BatchNorm (the reference drops the block's final ReLU so that the pre-ReLU
map is reachable) and the network applies that ReLU itself. Between blocks: 2x2 max pooling after blocks
0, 1 and 2; after block 3 only for 64x64 inputs (the reference's ``if h == 64``, for Tiny-ImageNet), so a
32x32 image meets blocks 3 and 4 at 4x4.

Activations: ``stem`` = ``relu(block0)``; ``stage{i}_preact`` = block ``i``'s output (after its last BN,
before the ReLU), ``stage{i}`` = its ReLU, for ``i = 1 .. 4``; ``pre_logits`` the pooled 512-d feature.

The class takes any number (>= 2) of blocks, so ``VGG(blocks=((16,), (32,), (64,)))`` is a small convnet.
No separate small family is registered: at 28x28 on a CPU (2 shared cores, a jitted SGD step on a batch
of 64) that net took ~80 ms, only ~2x faster than ``resnet8`` (~160 ms; ``resnet20`` ~420 ms), and at 8x8
``resnet8`` takes ~13 ms.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision import layers

# Channels of each convolution, block by block (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
VGG_BLOCKS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}



class ConvBlock(nnx.Module):
  """``conv-bn-relu-...-conv-bn``: the convolutions of one VGG block, without the final ReLU.

  Args:
    in_channels: channels of the input.
    widths: output channels of each convolution.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, in_channels: int, widths: Sequence[int], *, rngs: nnx.Rngs):
    ins = (in_channels, *widths[:-1])
    self.convs = nnx.List([layers.conv(i, o, 3, bias=True, rngs=rngs) for i, o in zip(ins, widths)])
    self.norms = nnx.List([layers.batch_norm(o, rngs=rngs) for o in widths])

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      if i:
        x = nnx.relu(x)
      x = norm(conv(x), use_running_average=not train)
    return x


class VGG(nnx.Module):
  """VGG-BN: blocks of 3x3 convolutions, max pooling between them, a linear head on the global average.

  Max pooling precedes blocks 1, 2 and 3, and block 4 only for 64x64 inputs (the reference's rule); later
  blocks are never preceded by pooling.

  Args:
    blocks: convolution widths of each block (five in ``VGG_BLOCKS``, at least two); the last block's final
      width is the pooled feature's.
    num_classes: number of logits.
    in_channels: channels of the input images.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, *, blocks: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3, rngs: nnx.Rngs):
    if len(blocks) < 2:
      raise ValueError(f"VGG needs a stem block and at least one stage block, got {len(blocks)}: {blocks!r}")
    for i, widths in enumerate(blocks):
      layers.positive_ints(**{f"blocks[{i}]": tuple(widths)})
    layers.positive_ints(in_channels=in_channels)
    self.in_channels = in_channels
    ins = (in_channels, *(widths[-1] for widths in blocks[:-1]))
    self.blocks = nnx.List([ConvBlock(i, tuple(widths), rngs=rngs) for i, widths in zip(ins, blocks)])
    self.fc = layers.head(blocks[-1][-1], num_classes, init="small_normal", rngs=rngs)

  def activation_names(self) -> list[str]:
    return layers.cnn_activation_names(len(self.blocks) - 1)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    layers.check_images(images, self.in_channels)
    x = capture.record("stem", nnx.relu(self.blocks[0](images, train=train)))
    for i in range(1, len(self.blocks)):
      if i < 4 or (i == 4 and images.shape[1] == 64):
        x = layers.max_pool2(x)
      x = capture.record(f"stage{i}_preact", self.blocks[i](x, train=train))
      x = capture.record(f"stage{i}", nnx.relu(x))
    return self.fc(capture.record("pre_logits", layers.global_avg_pool(x)))
