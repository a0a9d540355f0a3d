"""Decoder-only Transformer language model in Flax NNX.

Llama-style: pre-norm blocks, rotary positions (RoPE), grouped-query causal self-attention,
SwiGLU MLP, RMSNorm, optional tied embeddings and logit soft-capping. It is small enough to train
on a CPU as a byte-level teacher or student, and laid out so that Llama / Qwen checkpoints map onto
it one tensor at a time (RoPE uses the Hugging Face "rotate half" layout; key/value head ``j``
serves query heads ``j * G .. (j + 1) * G - 1`` as in ``repeat_kv``).

Incremental decoding
--------------------
``model(tokens)`` is the training call. For generation, ``model.init_cache(batch, length)`` gives
a :class:`KVCache` per layer and ``model.decode_step(tokens, cache, positions)`` runs any number of
new tokens at absolute ``positions``: their keys and values are written into the cache there, and
each token attends to every cache slot at or before its own position. The caller keeps the
invariant that those slots hold the row's real tokens; ``kdjax.models.sampling`` does so for
right-padded prompts with per-row lengths.

Logical axis names
------------------
Every parameter carries ``out_sharding`` metadata that names its axes logically. Nothing is placed
on devices when a parameter is created (``eager_sharding=False``), so the model runs unsharded with
no mesh set; a trainer maps the names onto a mesh with rules (in kdjax, the ``logical`` action of
``kdjax.train.sharding`` with a config's ``logical_axis_rules``), or with Flax's own, for example::

    with nnx.logical_axis_rules([("vocab", "model"), ("heads", "model"), ("kv_heads", "model"),
                                 ("mlp", "model"), ("embed", None), ("head_dim", None),
                                 ("norm", None)]):
        specs = nnx.get_partition_spec(nnx.state(model))

=============  ==========================================  ==========================================
name           what the axis indexes                       parameters
=============  ==========================================  ==========================================
``vocab``      token ids                                   ``embedding``, ``lm_head``
``embed``      the residual stream (``d_model``)           embedding, head and every projection
``heads``      query heads                                 ``q``, ``q_bias``, ``o``
``kv_heads``   key / value heads (GQA)                     ``k``, ``v``, ``k_bias``, ``v_bias``
``head_dim``   features within one head                    ``q``, ``k``, ``v``, ``o`` and biases
``mlp``        the MLP hidden width (``d_ff``)             ``gate``, ``up``, ``down``
``norm``       features a norm scales                      every norm ``scale`` / ``bias``
=============  ==========================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm")
NORMS = ("rmsnorm", "layernorm")


def check_float_dtypes(config, names=("dtype", "param_dtype")) -> None:
  """Raises ValueError unless each named field of a model config is a floating dtype."""
  for name in names:
    try:
      dtype = jnp.dtype(getattr(config, name))
    except TypeError as e:
      raise ValueError(f"{name} is not a dtype: {getattr(config, name)!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype, got {dtype}.")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of a :class:`DecoderLM`.

  Attributes:
    vocab_size: number of token ids (256 for bytes).
    num_layers: number of Transformer blocks.
    num_heads: number of query heads.
    d_model: width of the residual stream.
    d_ff: hidden width of the SwiGLU MLP.
    max_len: longest sequence the model accepts.
    num_kv_heads: key / value heads for grouped-query attention; ``None`` means ``num_heads``
      (plain multi-head attention), 1 means multi-query attention.
    rope_theta: RoPE base frequency.
    norm: ``"rmsnorm"`` (Llama) or ``"layernorm"`` (with a bias).
    tie_embeddings: use the transposed token embedding as the lm head.
    dtype: compute dtype of activations; logits are always float32.
    param_dtype: storage dtype of parameters.
    logit_softcap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma 2).
    head_dim: features per head; ``None`` means ``d_model // num_heads``. Qwen3 sets it apart.
    qkv_bias: add biases to the q / k / v projections (Qwen2).
    qk_norm: RMS-normalise each query and key head before RoPE (Qwen3).
    norm_eps: epsilon inside every norm (Llama uses 1e-5, Qwen 1e-6).

  ``num_kv_heads`` and ``head_dim`` are filled in at construction, so ``dataclasses.replace``
  carries the filled-in values over: pass them again as ``None`` when changing ``num_heads`` or
  ``d_model`` of a config that left them to their defaults.
  """

  vocab_size: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  max_len: int
  num_kv_heads: int | None = None
  rope_theta: float = 10_000.0
  norm: str = "rmsnorm"
  tie_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  logit_softcap: float | None = None
  head_dim: int | None = None
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if self.num_kv_heads is None:
      # Frozen dataclass: filling in the defaults is the one write we allow ourselves.
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0:
      raise ValueError(f"num_kv_heads must be a positive int, got {self.num_kv_heads!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
          f"({self.num_kv_heads}): each key/value head serves a whole group of query heads.")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(
            f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}), "
            "or head_dim must be given.")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(
          f"head_dim must be a positive even int (RoPE rotates feature pairs), got "
          f"{self.head_dim!r}.")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
    if self.logit_softcap is not None and not self.logit_softcap > 0:
      raise ValueError(f"logit_softcap must be None or positive, got {self.logit_softcap!r}.")
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}.")
    check_float_dtypes(self)


def _param(rngs: nnx.Rngs, shape, axes, stddev: float, dtype) -> nnx.Param:
  """A normally initialised parameter annotated with logical axes (see module docstring)."""
  # Drawn in its own shape (the same values as a flat draw reshaped): a flat draw, when the
  # parameter is created sharded over a trailing dimension, makes XLA build the whole array on
  # every device before splitting it.
  value = stddev * jax.random.normal(rngs.params(), tuple(shape), dtype)
  return _annotated(value, axes)


def _annotated(value: jax.Array, axes) -> nnx.Param:
  # eager_sharding=False keeps the names as metadata only: placing the value would need a mesh
  # whose axes carry these names, and the model must also run with no mesh at all.
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Norm(nnx.Module):
  """RMSNorm (or LayerNorm), computed in float32 and returned in the input's dtype.

  Args:
    dim: size of the normalised (last) axis.
    kind: ``"rmsnorm"`` or ``"layernorm"``.
    eps: added to the mean square before the inverse square root.
    param_dtype: storage dtype of the scale (and bias).
  """

  def __init__(self, dim: int, *, kind: str, eps: float, param_dtype):
    self.eps = eps
    self.scale = _annotated(jnp.ones((dim,), param_dtype), ("norm",))
    self.bias = _annotated(jnp.zeros((dim,), param_dtype), ("norm",)) if kind == "layernorm" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    # Mean squares of bf16 activations lose too many bits, so the statistics are float32.
    y = x.astype(jnp.float32)
    if self.bias is not None:
      y = y - jnp.mean(y, axis=-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """``x[..., *in] @ w[*in, *out]`` over the last ``contract`` axes of ``x``, as one 2-D matmul.

  On XLA:CPU the backward pass of a matmul over ``[B, L, D]`` contracts two axes for the weight
  gradient and pays for large transposes; flattening to ``[B * L, D]`` first made a SwiGLU MLP's
  forward+backward about 1.8x faster (d_model 256, batch 32 x 128 tokens).
  """
  lead = x.shape[:x.ndim - contract]
  k = math.prod(x.shape[x.ndim - contract:])
  y = x.reshape(-1, k) @ w.reshape(k, -1)
  return y.reshape(*lead, *w.shape[contract:])


def rope(x: jax.Array, theta: float, positions: Optional[jax.Array] = None) -> jax.Array:
  """Rotates ``x[B, L, N, head_dim]`` by its positions (rotate-half layout).

  Feature ``i`` of the first half is paired with feature ``i`` of the second half and rotated by
  ``pos * theta ** (-2i / head_dim)``, as in Hugging Face's Llama; the angles are float32 so long
  positions keep their precision in bf16 models.

  Args:
    x: queries or keys ``[B, L, N, head_dim]``.
    theta: base frequency.
    positions: integer ``[B, L]`` (or ``[1, L]``) absolute positions; ``None`` means ``0 .. L-1``.
  """
  length, dim = x.shape[1], x.shape[-1]
  if positions is None:
    positions = jnp.arange(length)[None]
  inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles)[:, :, None, :]  # [B, L, 1, dim/2]: broadcast over heads.
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention under a boolean mask.

  Args:
    q: queries ``[B, L, H, Dh]``, already scaled by ``Dh ** -0.5``.
    k: keys ``[B, S, K, Dh]`` with ``H % K == 0``.
    v: values ``[B, S, K, Dh]``.
    mask: ``[B, L, S]`` (or ``[1, L, S]``), True where query ``l`` may attend to key ``s``. Every
      query must see at least one key.

  Returns:
    ``[B, L, H, Dh]``; query head ``h`` attends with key/value head ``h // (H // K)``.
  """
  b, length, h, d = q.shape
  kv = k.shape[2]
  # Grouping the query heads, rather than repeating k and v per group, never materialises the
  # repeated keys and values. On CPU this einsum form, repeat-then-einsum and
  # jax.nn.dot_product_attention timed the same within noise for the model's forward+backward.
  q = q.reshape(b, length, kv, h // kv, d)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, length, h, d)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """:func:`attention` where position ``t`` of ``q`` sees positions ``0 .. t`` of ``k`` / ``v``."""
  length = q.shape[1]
  return attention(q, k, v, jnp.tril(jnp.ones((1, length, length), dtype=bool)))


class KVCache(NamedTuple):
  """Keys and values of one attention layer, for every position of a fixed-length buffer.

  Attributes:
    k: ``[B, S, num_kv_heads, head_dim]`` in the compute dtype, rotated by RoPE at their position.
    v: ``[B, S, num_kv_heads, head_dim]`` in the compute dtype.
  """

  k: jax.Array
  v: jax.Array


def _write_rows(buffer: jax.Array, update: jax.Array, positions: jax.Array) -> jax.Array:
  """``buffer[b, positions[b, l]] = update[b, l]``: each row writes at its own positions."""
  write = lambda buf, upd, pos: buf.at[pos].set(upd.astype(buf.dtype))  # noqa: E731
  return jax.vmap(write)(buffer, update, positions)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and grouped-query heads.

  Args:
    config: model configuration.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    d, h, kv, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    self.config = c
    self.q = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), d**-0.5, c.param_dtype)
    self.k = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), d**-0.5, c.param_dtype)
    self.v = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), d**-0.5, c.param_dtype)
    # Each block adds two branches to the residual stream; shrinking the output projections by
    # sqrt(2 * layers) keeps the stream's variance independent of depth at init (GPT-2).
    out_std = (h * hd) ** -0.5 / (2 * c.num_layers) ** 0.5
    self.o = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std, c.param_dtype)
    if c.qkv_bias:
      zeros = lambda n: jnp.zeros((n, hd), c.param_dtype)  # noqa: E731
      self.q_bias = _annotated(zeros(h), ("heads", "head_dim"))
      self.k_bias = _annotated(zeros(kv), ("kv_heads", "head_dim"))
      self.v_bias = _annotated(zeros(kv), ("kv_heads", "head_dim"))
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    if c.qk_norm:
      self.q_norm = Norm(hd, kind="rmsnorm", eps=c.norm_eps, param_dtype=c.param_dtype)
      self.k_norm = Norm(hd, kind="rmsnorm", eps=c.norm_eps, param_dtype=c.param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """Attends each position of ``x`` to itself and the positions before it.

    Args:
      x: ``[B, L, d_model]``.
      positions: integer ``[B, L]`` absolute positions of ``x`` (RoPE angles and causal order);
        ``None`` means ``0 .. L-1``.
      cache: ``None`` to attend within ``x`` only; otherwise ``x``'s keys and values are written
        into the cache at ``positions`` and each query attends to every slot at or before its own
        position.

    Returns:
      ``(out [B, L, d_model], updated cache or None)``.
    """
    c = self.config
    w = lambda p: p[...].astype(c.dtype)  # noqa: E731
    q, k, v = dense(x, w(self.q)), dense(x, w(self.k)), dense(x, w(self.v))
    if self.q_bias is not None:
      q, k, v = q + w(self.q_bias), k + w(self.k_bias), v + w(self.v_bias)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, c.rope_theta, positions) * jnp.asarray(c.head_dim**-0.5, c.dtype)
    k = rope(k, c.rope_theta, positions)
    if cache is None and positions is None:
      out = causal_attention(q, k, v)
    elif cache is None:
      out = attention(q, k, v, positions[:, :, None] >= positions[:, None, :])
    else:
      cache = KVCache(_write_rows(cache.k, k, positions), _write_rows(cache.v, v, positions))
      slots = jnp.arange(cache.k.shape[1])
      out = attention(q, cache.k, cache.v, positions[:, :, None] >= slots)
    return dense(out, w(self.o), contract=2), cache


class SwiGLU(nnx.Module):
  """Gated MLP: ``down(silu(gate(x)) * up(x))``.

  Args:
    config: model configuration.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    d, f = c.d_model, c.d_ff
    self.config = c
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5, c.param_dtype)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5, c.param_dtype)
    down_std = f**-0.5 / (2 * c.num_layers) ** 0.5
    self.down = _param(rngs, (f, d), ("mlp", "embed"), down_std, c.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.config.dtype
    gate = dense(x, self.gate[...].astype(dtype))
    up = dense(x, self.up[...].astype(dtype))
    return dense(jax.nn.silu(gate) * up, self.down[...].astype(dtype))


class Block(nnx.Module):
  """Pre-norm Transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  Args:
    config: model configuration.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.attn_norm = Norm(c.d_model, kind=c.norm, eps=c.norm_eps, param_dtype=c.param_dtype)
    self.attn = Attention(c, rngs=rngs)
    self.mlp_norm = Norm(c.d_model, kind=c.norm, eps=c.norm_eps, param_dtype=c.param_dtype)
    self.mlp = SwiGLU(c, rngs=rngs)

  def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """``(x [B, L, d_model], cache)`` after the block; see :meth:`Attention.__call__`."""
    attended, cache = self.attn(self.attn_norm(x), positions, cache)
    x = x + attended
    return x + self.mlp(self.mlp_norm(x)), cache


class DecoderLM(nnx.Module):
  """Decoder-only language model.

  ``model(tokens) == softcap(model.features(tokens) @ model.head_weights())``: the two halves are
  public so that a fused lm-head loss can consume the features without materialising the logits.

  Args:
    config: model configuration.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    # std d_model**-0.5 gives unit-scale logits at init whether or not the head is tied.
    self.embedding = _param(
        rngs, (c.vocab_size, c.d_model), ("vocab", "embed"), c.d_model**-0.5, c.param_dtype)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = Norm(c.d_model, kind=c.norm, eps=c.norm_eps, param_dtype=c.param_dtype)
    if c.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _param(
          rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), c.d_model**-0.5, c.param_dtype)

  def features(self, tokens: jax.Array) -> jax.Array:
    """Hidden states after the final norm.

    Args:
      tokens: int ``[B, L]`` with ``L <= max_len``.

    Returns:
      ``[B, L, d_model]`` in the compute dtype.
    """
    self._check_tokens(tokens)
    return self._trunk(tokens, None, None)[0]

  def cached_features(self, tokens: jax.Array, cache: tuple[KVCache, ...],
                      positions: jax.Array) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """:meth:`features` of new tokens at absolute positions, reading and extending a cache.

    Args:
      tokens: int ``[B, L]``: the new tokens (a whole prompt, or one token per decoding step).
      cache: one :class:`KVCache` per layer, from :meth:`init_cache`.
      positions: int ``[B, L]`` absolute positions of ``tokens``, each in ``[0, S)`` where ``S``
        is the cache length. Slots before a token's position must already hold that row's
        earlier tokens.

    Returns:
      ``(features [B, L, d_model], the cache with the new tokens written at their positions)``.
    """
    self._check_tokens(tokens)
    if positions.shape != tokens.shape:
      raise ValueError(f"positions shape {positions.shape} must equal tokens shape {tokens.shape}.")
    if len(cache) != len(self.blocks):
      raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}.")
    c = self.config
    expected = (tokens.shape[0], c.num_kv_heads, c.head_dim)  # all but the cache length
    for layer in cache:
      if layer.k.shape != layer.v.shape or layer.k.shape[:1] + layer.k.shape[2:] != expected:
        raise ValueError(
            f"cache layers must be [batch={tokens.shape[0]}, length, kv_heads={c.num_kv_heads}, "
            f"head_dim={c.head_dim}], got k {layer.k.shape} and v {layer.v.shape}.")
    return self._trunk(tokens, positions, cache)

  def init_cache(self, batch: int, length: int) -> tuple[KVCache, ...]:
    """An empty (all-zero) cache of ``length <= max_len`` positions for ``batch`` rows."""
    if not 0 < length <= self.config.max_len:
      raise ValueError(f"cache length {length} must lie in [1, max_len={self.config.max_len}].")
    c = self.config
    zeros = lambda: jnp.zeros((batch, length, c.num_kv_heads, c.head_dim), c.dtype)  # noqa: E731
    return tuple(KVCache(zeros(), zeros()) for _ in self.blocks)

  def _check_tokens(self, tokens: jax.Array) -> None:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}.")
    if tokens.shape[1] > self.config.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.config.max_len}.")

  def _trunk(self, tokens, positions, cache):
    x = jnp.take(self.embedding[...].astype(self.config.dtype), tokens, axis=0)
    layers = [None] * len(self.blocks) if cache is None else list(cache)
    for i, block in enumerate(self.blocks):
      x, layers[i] = block(x, positions, layers[i])
    return self.final_norm(x), None if cache is None else tuple(layers)

  def head_weights(self) -> jax.Array:
    """The lm-head matrix ``[d_model, vocab_size]`` in the parameter dtype.

    With tied embeddings this is the embedding transposed, so gradients through it reach the
    embedding.
    """
    if self.lm_head is None:
      return self.embedding[...].T
    return self.lm_head[...]

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 logits ``[..., vocab_size]`` of features ``h[..., d_model]`` (head, then soft-cap)."""
    # Losses downstream work in float32, so the head accumulates and returns float32 directly.
    logits = jnp.einsum(
        "...d,dv->...v", h, self.head_weights().astype(h.dtype),
        preferred_element_type=jnp.float32)
    cap = self.config.logit_softcap
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    return logits

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: int ``[B, L]`` with ``L <= max_len``.

    Returns:
      float32 ``[B, L, vocab_size]``; position ``t`` sees tokens ``0 .. t`` only.
    """
    return self.logits(self.features(tokens))

  def decode_step(self, tokens: jax.Array, cache: tuple[KVCache, ...],
                  positions: jax.Array) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """:meth:`__call__` for new tokens at absolute positions, through a cache.

    Arguments as in :meth:`cached_features`; returns ``(float32 logits [B, L, vocab_size],
    updated cache)``. With ``tokens`` the row's whole sequence so far at ``positions`` ``0 .. L-1``
    and an empty cache, the logits equal ``model(tokens)``.
    """
    h, cache = self.cached_features(tokens, cache, positions)
    return self.logits(h), cache


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters; a tied embedding counts once."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def init_decoder(config: DecoderConfig, seed: int = 0) -> DecoderLM:
  """A freshly initialised :class:`DecoderLM` whose parameters come from ``seed``."""
  return DecoderLM(config, rngs=nnx.Rngs(seed))
