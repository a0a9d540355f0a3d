"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with DeiT's distillation token (Touvron et al.,
"Training data-efficient image transformers & distillation through attention", ICML 2021).

``x`` ``[B, H, W, C]`` is cut into ``p x p`` patches, each linearly embedded (a ``p x p`` stride-``p``
convolution), giving ``N = (H / p)(W / p)`` tokens; a learned class token (and, for DeiT, a learned
distillation token) is prepended and a learned position embedding added. ``depth`` pre-LN blocks follow,
``x = x + MHSA(LN(x))``, ``x = x + MLP(LN(x))`` with a GELU MLP of hidden width ``mlp_ratio * dim``, then a
final LayerNorm. The class head reads the class token, the distillation head the distillation token.

DeiT trains the class head on the labels and the distillation head on the teacher (hard or soft) and
predicts with the *mean of the two heads' logits*; the model's call returns that mean when the
distillation token exists, the class head's logits otherwise. A distillation strategy reads the two heads
separately from the capture names ``class_logits`` and ``distill_logits``.

Initialisation follows timm / DeiT: linear weights, the tokens and the position embedding ``N(0, 0.02^2)``
(timm's ``trunc_normal_(std=.02)`` cuts at +-2 in absolute value, 100 standard deviations, so it is a plain
normal), biases 0, LayerNorm scale 1 and ``eps = 1e-6``, and PyTorch's default convolution init for the
patch embedding (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` weights and bias). No dropout or stochastic depth.

Activations: ``patch_embed`` ``[B, N, dim]`` (before the tokens and position embedding); per block ``i``
(0-based) ``block{i}/queries``, ``/keys``, ``/values`` ``[B, T, heads, head_dim]`` (projected, queries
unscaled), ``block{i}/attention_probs`` ``[B, heads, T, T]`` (softmax over the last axis, keys) and
``block{i}`` ``[B, T, dim]`` the block's output; ``pre_logits`` ``[B, dim]`` the class token after the final
norm; ``class_logits`` and ``distill_logits`` ``[B, num_classes]``. ``T = N + 1`` (+1 with the distillation
token); token 0 is the class token, token 1 the distillation token.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision import layers

_LINEAR_INIT = jax.nn.initializers.normal(0.02)
_LN_EPS = 1e-6


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, kernel_init=_LINEAR_INIT, bias_init=jax.nn.initializers.zeros, rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention, ``softmax(q k^T / sqrt(d)) v``, recording its internals under ``name``.

  Args:
    dim: token width.
    num_heads: heads; ``dim`` must divide evenly.
    name: prefix of the recorded activations (``block{i}``).
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, dim: int, num_heads: int, *, name: str, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.name = name
    self.qkv = _linear(dim, 3 * dim, rngs)
    self.proj = _linear(dim, dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * h, d // h), 3, axis=2)
    for kind, value in (("queries", q), ("keys", k), ("values", v)):
      capture.record(f"{self.name}/{kind}", value)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // h) ** -0.5
    probs = capture.record(f"{self.name}/attention_probs", jax.nn.softmax(scores.astype(jnp.float32), axis=-1))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return self.proj(out.reshape(b, t, d))


class EncoderBlock(nnx.Module):
  """Pre-LN Transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``.

  Args:
    dim: token width.
    num_heads: attention heads.
    mlp_ratio: hidden width of the MLP over ``dim``.
    name: the block's capture name (``block{i}``).
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, name: str, rngs: nnx.Rngs):
    hidden = int(dim * mlp_ratio)
    self.name = name
    self.norm1 = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
    self.attn = SelfAttention(dim, num_heads, name=name, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
    self.fc1 = _linear(dim, hidden, rngs)
    self.fc2 = _linear(hidden, dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    # Exact (erf) GELU: PyTorch's nn.GELU default, which timm's ViT uses.
    x = x + self.fc2(nnx.gelu(self.fc1(self.norm2(x)), approximate=False))
    return capture.record(self.name, x)


class ViT(nnx.Module):
  """ViT, or DeiT with ``distillation_token=True``.

  Args:
    image_size: ``(H, W)`` the model is built for (the position embedding has one row per patch).
    in_channels: channels of the input images.
    patch_size: side ``p`` of the square patches; must divide ``H`` and ``W``.
    dim: token width.
    depth: number of blocks.
    num_heads: attention heads; must divide ``dim``.
    mlp_ratio: MLP hidden width over ``dim``.
    distillation_token: add DeiT's distillation token and head.
    num_classes: number of logits.
    rngs: random streams; ``params`` is used.
  """

  # The registry passes the input's (H, W): a ViT's parameters depend on the image size.
  needs_image_size = True

  def __init__(self, *, image_size: Sequence[int] = (32, 32), in_channels: int = 3, patch_size: int = 4,
               dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
               distillation_token: bool = False, num_classes: int, rngs: nnx.Rngs):
    image_size = tuple(image_size)
    if len(image_size) != 2:
      raise ValueError(f"image_size must be (H, W), got {image_size!r}")
    layers.positive_ints(image_size=image_size, in_channels=in_channels, patch_size=patch_size, dim=dim,
                         depth=depth, num_heads=num_heads, num_classes=num_classes)
    if image_size[0] % patch_size or image_size[1] % patch_size:
      raise ValueError(f"patch_size {patch_size} must divide the image size {image_size}")
    if dim % num_heads:
      raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
    if not mlp_ratio > 0:
      raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
    self.image_size, self.in_channels, self.depth = image_size, in_channels, depth
    fan_in = patch_size * patch_size * in_channels
    torch_conv = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    bound = fan_in**-0.5
    self.patch_embed = nnx.Conv(
        in_channels, dim, (patch_size, patch_size), strides=patch_size, padding="VALID", kernel_init=torch_conv,
        bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound),
        rngs=rngs)
    num_tokens = 2 if distillation_token else 1
    num_patches = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    self.tokens = nnx.Param(_LINEAR_INIT(rngs.params(), (1, num_tokens, dim)))
    self.pos_embed = nnx.Param(_LINEAR_INIT(rngs.params(), (1, num_tokens + num_patches, dim)))
    self.blocks = nnx.List([EncoderBlock(dim, num_heads, mlp_ratio, name=f"block{i}", rngs=rngs)
                            for i in range(depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
    self.head = _linear(dim, num_classes, rngs)
    self.head_dist = _linear(dim, num_classes, rngs) if distillation_token else None

  @property
  def has_distillation_token(self) -> bool:
    return self.head_dist is not None

  def activation_names(self) -> list[str]:
    names = ["patch_embed"]
    for i in range(self.depth):
      names += [f"block{i}/{kind}" for kind in ("queries", "keys", "values", "attention_probs")] + [f"block{i}"]
    return names + ["pre_logits", "class_logits"] + (["distill_logits"] if self.has_distillation_token else [])

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Logits ``[B, num_classes]``: the mean of both heads with a distillation token. ``train`` is unused
    (no dropout), kept for the common model interface."""
    del train
    expected = (*self.image_size, self.in_channels)
    if jnp.ndim(images) != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be [B, {', '.join(map(str, expected))}] for this ViT, got {jnp.shape(images)}")
    b = images.shape[0]
    patches = self.patch_embed(images)
    patches = capture.record("patch_embed", patches.reshape(b, -1, patches.shape[-1]))
    tokens = jnp.broadcast_to(self.tokens[...], (b, *self.tokens.shape[1:])).astype(patches.dtype)
    x = jnp.concatenate([tokens, patches], axis=1) + self.pos_embed[...]
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    logits = capture.record("class_logits", self.head(capture.record("pre_logits", x[:, 0])))
    if self.head_dist is None:
      return logits
    distill_logits = capture.record("distill_logits", self.head_dist(x[:, 1]))
    return (logits + distill_logits) / 2
