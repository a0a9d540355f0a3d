"""Vision models by name, and what a distillation method needs to know about them without running them.

    model = vision_model("resnet8x4", num_classes=100, rngs=nnx.Rngs(0))
    activation_shapes(model, (32, 32, 3))["stage3"]    # (8, 8, 256)

Names follow RepDistiller's ``model_dict`` (lower case; ``resnet18/34/50`` are its ``resnetv2.py``
ResNet18/34/50 and ``mobilenetv2`` its ``MobileNetV2`` = ``mobile_half``, T=6, W=0.5), plus the ViT / DeiT
family: ``vit`` / ``deit`` are small models for CPU runs on digits or CIFAR (patch 4, dim 64, depth 4,
4 heads; ``deit`` has the distillation token), ``deit_tiny`` / ``deit_small`` the published DeiT-Ti / -S
(patch 16, dim 192 / 384, depth 12, 3 / 6 heads), ``_distilled`` with the distillation token.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision.mobilenet import MobileNetV2
from kdjax.models.vision.resnet import ResNet, cifar_resnet_arch
from kdjax.models.vision.vgg import VGG, VGG_BLOCKS
from kdjax.models.vision.vit import ViT
from kdjax.models.vision.wrn import WideResNet

_CIFAR_WIDTHS = (16, 16, 32, 64)
_CIFAR_X4_WIDTHS = (32, 64, 128, 256)
_V2_WIDTHS = dict(stem_width=64, stage_widths=(64, 128, 256, 512))
_SMALL_VIT = dict(patch_size=4, dim=64, depth=4, num_heads=4)
_DEIT_TINY = dict(patch_size=16, dim=192, depth=12, num_heads=3)
_DEIT_SMALL = dict(patch_size=16, dim=384, depth=12, num_heads=6)

VISION_MODELS: dict[str, Callable[..., nnx.Module]] = {
    **{f"resnet{d}": functools.partial(ResNet, **cifar_resnet_arch(d, _CIFAR_WIDTHS))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": functools.partial(ResNet, **cifar_resnet_arch(d, _CIFAR_X4_WIDTHS)) for d in (8, 32)},
    "resnet18": functools.partial(ResNet, **_V2_WIDTHS, blocks_per_stage=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, **_V2_WIDTHS, blocks_per_stage=(3, 4, 6, 3)),
    "resnet50": functools.partial(ResNet, **_V2_WIDTHS, blocks_per_stage=(3, 4, 6, 3), bottleneck=True),
    **{f"wrn_{d}_{k}": functools.partial(WideResNet, depth=d, widen_factor=k) for d in (16, 40) for k in (1, 2)},
    "mobilenetv2": functools.partial(MobileNetV2, expansion=6, width_mult=0.5),
    **{name: functools.partial(VGG, blocks=blocks) for name, blocks in VGG_BLOCKS.items()},
    "vit": functools.partial(ViT, **_SMALL_VIT),
    "deit": functools.partial(ViT, **_SMALL_VIT, distillation_token=True),
    "deit_tiny": functools.partial(ViT, **_DEIT_TINY),
    "deit_tiny_distilled": functools.partial(ViT, **_DEIT_TINY, distillation_token=True),
    "deit_small": functools.partial(ViT, **_DEIT_SMALL),
    "deit_small_distilled": functools.partial(ViT, **_DEIT_SMALL, distillation_token=True),
}

# Filled in by vision_model from input_shape and its own arguments, so not overridable.
_SUPPLIED = frozenset({"num_classes", "in_channels", "image_size", "rngs"})


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
    raise ValueError(f"input_shape must be (H, W, C) of positive ints, got {input_shape!r}")
  return shape


def vision_model(name: str, *, num_classes: int, rngs: nnx.Rngs, input_shape: Sequence[int] = (32, 32, 3),
                 **overrides: Any) -> nnx.Module:
  """Builds the registered model ``name``.

  Args:
    name: a key of :data:`VISION_MODELS`.
    num_classes: number of logits.
    rngs: random streams; ``params`` is used.
    input_shape: ``(H, W, C)`` of one image: ``C`` sets the input channels of every model; a ViT is also
      built for exactly ``(H, W)``. Convnets take any size afterwards (their pooling is global).
    **overrides: constructor arguments replacing the registered ones (e.g. ``depth=2`` for a ViT,
      ``width_mult=1.0`` for MobileNetV2).

  Returns:
    An NNX module with ``__call__(images [B, H, W, C], *, train=False) -> logits [B, num_classes]`` and
    ``activation_names()``.

  Raises:
    ValueError: an unknown name, an override the model does not take, or a bad input shape.
  """
  if name not in VISION_MODELS:
    raise ValueError(f"unknown vision model {name!r}; known models: {sorted(VISION_MODELS)}")
  h, w, c = _check_input_shape(input_shape)
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  builder = VISION_MODELS[name]
  # The constructor's own signature: an nnx.Module class's call signature is its metaclass's (*args, **kwargs).
  accepted = set(inspect.signature(builder.func.__init__).parameters) - _SUPPLIED - {"self"}
  unknown = sorted(set(overrides) - accepted)
  if unknown:
    raise ValueError(f"{name!r} does not take {unknown}; its overridable arguments are {sorted(accepted)}")
  kwargs = dict(num_classes=num_classes, in_channels=c, rngs=rngs, **overrides)
  if getattr(builder.func, "needs_image_size", False):
    kwargs["image_size"] = (h, w)
  return builder(**kwargs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable scalars (``nnx.Param``; BatchNorm running statistics excluded, as PyTorch's
  ``sum(p.numel() for p in model.parameters())``). Works on an abstract model from ``nnx.eval_shape``."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def activation_shapes(model: nnx.Module, input_shape: Sequence[int],
                      names: Optional[Sequence[str]] = None) -> dict[str, tuple[int, ...]]:
  """Per-example shapes of the recorded activations, found by tracing (``jax.eval_shape``), not running.

  Args:
    model: a model that records with :func:`kdjax.models.capture.record` (concrete, or abstract from
      ``nnx.eval_shape``).
    input_shape: ``(H, W, C)`` of one image.
    names: the activations wanted; ``None`` for all, in the order the forward pass records them.

  Returns:
    ``{name: shape without the batch axis}``, e.g. ``(8, 8, 64)`` for a stage map, ``(64,)`` for
    ``pre_logits``, ``(heads, T, T)`` for attention probabilities.
  """
  input_shape = _check_input_shape(input_shape)
  graphdef, state = nnx.split(model)
  order: list[str] = []

  def forward(state, images):
    with capture.capture(names) as acts:
      nnx.merge(graphdef, state)(images, train=False)
    # A returned dict comes back with sorted keys (pytree order); the trace notes the recording order.
    order.extend(acts)
    return dict(acts)

  out = jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return {name: tuple(out[name].shape[1:]) for name in order}
