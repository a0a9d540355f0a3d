"""Exit branches: small classifiers on a student's intermediate activations, as pure functions.

    feature, logits = apply_branch(spec, params, activation, where=mask)

A branch is OFA-KD's CNN projector (Hao et al., NeurIPS 2023; Hao840/OFAKD `distillers/ofa.py`),
which is also the "bottleneck + FC" of Be Your Own Teacher (Zhang et al., ICCV 2019; its reference
ResNet's `scala{i}` + `fc{i}`):

    x → SepConv ×n → global average pool → feature [B, W] → linear → logits [B, K]

with SepConv(c → c′) = dw3×3/2 → 1×1 → BN → ReLU → dw3×3 → 1×1 (c → c′) → BN → ReLU (dw: depthwise,
/2: stride 2). The n blocks halve the map until it is the size of the student's deepest stage (the
reference's `4 − stage` blocks on a four-stage net), doubling the channels and ending at the width W
(the larger of the student's and teacher's final feature widths in OFA, the student's own in BYOT);
with n = 0 a 1×1 convolution maps the channels to W instead. Token activations `[T, D]` (a ViT block)
have their prefix tokens (class / distillation) dropped and their patch tokens laid out on the square
grid they came from, so the same stack applies: our choice for ViT students, lighter than the
reference's patch-merging + transformer-block projector.

BatchNorm here always uses the statistics of the kept examples of the batch: branches only run in
training (they are the strategy's parameters, never part of the deployed student), so no running
statistics are kept. Initialisation follows the reference's `init_weights`: convolutions N(0, 2/fan_out),
BN scale 1 and bias 0, the linear layer N(0, 0.02²) with bias 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax.losses import common
from kdjax.models.vision import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExitBranch:
  """The shape of one exit.

  Attributes:
    source: the student activation it reads (`model.activation_names()`).
    in_shape: that activation's shape without the batch axis: `(H, W, C)` or `(T, D)`.
    width: W, the channels after the last block (the pooled feature's width).
    num_classes: K.
    num_down: n, the number of stride-2 SepConv blocks.
    prefix_tokens: leading tokens dropped from a token activation before the grid layout.
  """

  source: str
  in_shape: tuple[int, ...]
  width: int
  num_classes: int
  num_down: int = 0
  prefix_tokens: int = 0

  def __post_init__(self):
    if len(self.in_shape) not in (2, 3):
      raise ValueError(f"exit on {self.source!r}: an exit reads a map (H, W, C) or tokens (T, D), got shape "
                       f"{self.in_shape}")
    if len(self.in_shape) == 2:
      patches = self.in_shape[0] - self.prefix_tokens
      side = math.isqrt(max(patches, 0))
      if patches <= 0 or side * side != patches:
        raise ValueError(f"exit on {self.source!r}: {self.in_shape[0]} tokens less {self.prefix_tokens} prefix "
                         "tokens do not form a square patch grid")
    layers.positive_ints(width=self.width, num_classes=self.num_classes)
    if self.num_down < 0:
      raise ValueError(f"exit on {self.source!r}: num_down must be >= 0, got {self.num_down}")

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels entering each SepConv block, then W: c, 2c, 4c, ..., W."""
    c = self.in_shape[-1]
    return tuple(c * 2**i for i in range(self.num_down)) + (self.width,)


def grid_size(shape: tuple[int, ...], prefix_tokens: int = 0) -> int:
  """The spatial side of an activation: H of a map, √(T − prefix) of tokens."""
  return shape[0] if len(shape) == 3 else math.isqrt(shape[0] - prefix_tokens)


def halvings(size: int, target: int) -> int:
  """How many stride-2, pad-1 3×3 convolutions (size → ⌈size / 2⌉) take `size` down to `target`."""
  if target < 1 or size < target:
    raise ValueError(f"cannot downsample a {size}-wide map to {target}")
  n = 0
  while size > target:
    size, n = -(-size // 2), n + 1
  if size != target:
    raise ValueError(f"halving a map never reaches {target} exactly (it goes to {size})")
  return n


def prefix_tokens_of(shape: tuple[int, ...]) -> int:
  """The tokens before a square patch grid: T − ⌊√T⌋² (1 for a ViT's class token, 2 with DeiT's
  distillation token); 0 for a map."""
  if len(shape) != 2:
    return 0
  return shape[0] - math.isqrt(shape[0]) ** 2


def _conv_kernel(key: Array, k: int, cin_per_group: int, cout: int) -> Array:
  return layers.CONV_INIT(key, (k, k, cin_per_group, cout), jnp.float32)


def _bn(c: int) -> dict:
  return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}


def init_branch(key: Array, spec: ExitBranch) -> dict:
  """Parameters `{'blocks': [...], 'proj'?: {...}, 'head': {kernel, bias}}` of one exit."""
  keys = iter(jax.random.split(key, 4 * spec.num_down + 3))
  blocks = []
  for cin, cout in zip(spec.channels[:-1], spec.channels[1:]):
    blocks.append({"dw1": _conv_kernel(next(keys), 3, 1, cin), "pw1": _conv_kernel(next(keys), 1, cin, cin),
                   "bn1": _bn(cin), "dw2": _conv_kernel(next(keys), 3, 1, cin),
                   "pw2": _conv_kernel(next(keys), 1, cin, cout), "bn2": _bn(cout)})
  params = {"blocks": blocks}
  if spec.num_down == 0:
    # nn.Conv2d(c, W, 1) with its default bias (U(±1/√fan_in): init_weights leaves conv biases alone).
    cin = spec.in_shape[-1]
    bound = 1.0 / math.sqrt(cin)
    params["proj"] = {"kernel": _conv_kernel(next(keys), 1, cin, spec.width),
                      "bias": jax.random.uniform(next(keys), (spec.width,), jnp.float32, -bound, bound)}
  params["head"] = {"kernel": 0.02 * jax.random.normal(next(keys), (spec.width, spec.num_classes), jnp.float32),
                    "bias": jnp.zeros((spec.num_classes,), jnp.float32)}
  return params


def _conv(x: Array, kernel: Array, *, stride: int = 1, depthwise: bool = False) -> Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1] if depthwise else 1)


def _batch_norm(x: Array, p: dict, weights: Array) -> Array:
  """Normalises each channel with the mean / biased variance of the kept examples (BN in training mode)."""
  w = weights[:, None, None, None]
  n = jnp.maximum(jnp.sum(w) * x.shape[1] * x.shape[2], 1.0)
  mean = jnp.sum(w * x, axis=(0, 1, 2)) / n
  var = jnp.sum(w * jnp.square(x - mean), axis=(0, 1, 2)) / n
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _as_map(spec: ExitBranch, x: Array) -> Array:
  if x.ndim == 4:
    return x
  side = grid_size(spec.in_shape, spec.prefix_tokens)
  return x[:, spec.prefix_tokens:].reshape(x.shape[0], side, side, x.shape[-1])


def apply_branch(spec: ExitBranch, params: dict, x: Array, *, where: Optional[Array] = None) -> tuple[Array, Array]:
  """Runs one exit.

  Args:
    spec: its shape.
    params: `init_branch`'s tree.
    x: `[B, *spec.in_shape]` the student's activation.
    where: optional boolean `[B]` mask; masked examples take no part in the BatchNorm statistics.

  Returns:
    (feature `[B, W]` float32, logits `[B, K]` float32).
  """
  if tuple(x.shape[1:]) != tuple(spec.in_shape):
    raise ValueError(f"exit on {spec.source!r} was built for activations {spec.in_shape}, got {tuple(x.shape[1:])}")
  weights = jnp.ones(x.shape[:1], jnp.float32) if where is None else jnp.asarray(where).astype(jnp.float32)
  h = _as_map(spec, x.astype(common.compute_dtype(x.dtype)))
  for block in params["blocks"]:
    h = _conv(_conv(h, block["dw1"], stride=2, depthwise=True), block["pw1"])
    h = jax.nn.relu(_batch_norm(h, block["bn1"], weights))
    h = _conv(_conv(h, block["dw2"], depthwise=True), block["pw2"])
    h = jax.nn.relu(_batch_norm(h, block["bn2"], weights))
  if "proj" in params:
    h = _conv(h, params["proj"]["kernel"]) + params["proj"]["bias"]
  feature = jnp.mean(h, axis=(1, 2))
  return feature, feature @ params["head"]["kernel"] + params["head"]["bias"]
