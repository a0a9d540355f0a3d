"""BERT-style bidirectional Transformer encoder in Flax NNX, and sentence-transformers pooling.

The layout is BERT's (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers"),
post-LN throughout, so that ``transformers.BertModel`` checkpoints (for example
sentence-transformers/all-MiniLM-L6-v2, see :mod:`kdjax.models.encoder_checkpoint`) map onto it one
tensor at a time:

    e   = LN(word[ids] + position[0 .. L-1] + token_type[type_ids])
    a   = LN(h + o(attention(q(h), k(h), v(h); padding mask)))       for each layer
    h'  = LN(a + W_out gelu(W_in a + b_in) + b_out)

Attention is plain multi-head softmax attention, ``softmax(q k^T / sqrt(d_head))`` over the keys
whose ``attention_mask`` is 1; every position (padding included) is a query, as in BERT, so padded
rows carry values that pooling and losses must mask away. The same class at a smaller config is
the student (MiniLM / TinyBERT students are 2-6 layer BERTs).

Activations for distillation
----------------------------
Each call records, for :func:`kdjax.models.capture.capture` (layer indices 0-based):

=============================  ========================  =============================================
name                           shape                     value
=============================  ========================  =============================================
``embeddings``                 ``[B, L, H]``             the embedding sum after its LayerNorm
``layer{i}/queries``           ``[B, L, heads, d_head]`` the query projection (with bias, unscaled)
``layer{i}/keys``              ``[B, L, heads, d_head]`` the key projection
``layer{i}/values``            ``[B, L, heads, d_head]`` the value projection
``layer{i}/attention_probs``   ``[B, heads, L, L]``      softmax over keys; exactly 0 on padded keys
``layer{i}/output``            ``[B, L, H]``             the layer's output (after its last LayerNorm)
=============================  ========================  =============================================

The attention probabilities are formed by this einsum attention whether or not anyone records
them, so recording costs nothing extra. Parameters carry the decoder's logical axis names
(``vocab``, ``embed``, ``heads``, ``head_dim``, ``mlp``, ``norm``; position and token-type tables
have ``None`` for their row axis) for the ``logical`` sharding rules of ``kdjax.train.sharding``.

There is no dropout: the encoder is meant as a frozen teacher and a student trained by
distillation losses; ``train`` is accepted for the common model interface and changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import capture
from kdjax.models.decoder import Norm, _annotated, _param, check_float_dtypes, dense

# Hugging Face ``hidden_act`` names -> the function. "gelu" is BERT's exact erf form; the tanh
# approximation differs by up to ~1e-3 per unit and would break checkpoint parity.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and numerics of a :class:`BertEncoder`.

  Attributes:
    vocab_size: number of token ids (30522 for BERT's uncased WordPiece).
    hidden: width of the residual stream ``H``.
    layers: number of Transformer layers.
    heads: number of attention heads; ``d_head = hidden // heads``.
    intermediate: hidden width of the MLP.
    max_positions: longest sequence (size of the position table).
    type_vocab_size: number of token-type (segment) ids.
    layer_norm_eps: epsilon inside every LayerNorm (BERT uses 1e-12).
    activation: the MLP nonlinearity, a key of :data:`ACTIVATIONS`.
    pooler: add BERT's ``[CLS]`` pooler ``tanh(W h_0 + b)`` (see :meth:`BertEncoder.pooled`).
    initializer_range: standard deviation of the normal initialisation of every matrix (BERT 0.02).
    dtype: compute dtype of activations; LayerNorm statistics and softmax are always float32.
    param_dtype: storage dtype of parameters.
  """

  vocab_size: int
  hidden: int
  layers: int
  heads: int
  intermediate: int
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  pooler: bool = False
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions", "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if self.hidden % self.heads:
      raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}).")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}.")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}.")
    if not self.initializer_range > 0:
      raise ValueError(f"initializer_range must be positive, got {self.initializer_range!r}.")
    check_float_dtypes(self)

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


def _zeros(shape, axes, dtype) -> nnx.Param:
  return _annotated(jnp.zeros(tuple(shape), dtype), axes)


class EncoderLayer(nnx.Module):
  """One post-LN BERT layer: ``a = LN(x + attn(x))``, then ``LN(a + mlp(a))``.

  Args:
    config: model configuration.
    index: the layer's 0-based position, used in its activation names.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, config: EncoderConfig, index: int, *, rngs: nnx.Rngs):
    c = config
    h, n, d, f, std = c.hidden, c.heads, c.head_dim, c.intermediate, c.initializer_range
    self.config = c
    self.index = index
    self.q = _param(rngs, (h, n, d), ("embed", "heads", "head_dim"), std, c.param_dtype)
    self.k = _param(rngs, (h, n, d), ("embed", "heads", "head_dim"), std, c.param_dtype)
    self.v = _param(rngs, (h, n, d), ("embed", "heads", "head_dim"), std, c.param_dtype)
    self.q_bias = _zeros((n, d), ("heads", "head_dim"), c.param_dtype)
    self.k_bias = _zeros((n, d), ("heads", "head_dim"), c.param_dtype)
    self.v_bias = _zeros((n, d), ("heads", "head_dim"), c.param_dtype)
    self.o = _param(rngs, (n, d, h), ("heads", "head_dim", "embed"), std, c.param_dtype)
    self.o_bias = _zeros((h,), ("embed",), c.param_dtype)
    self.attn_norm = Norm(h, kind="layernorm", eps=c.layer_norm_eps, param_dtype=c.param_dtype)
    self.mlp_in = _param(rngs, (h, f), ("embed", "mlp"), std, c.param_dtype)
    self.mlp_in_bias = _zeros((f,), ("mlp",), c.param_dtype)
    self.mlp_out = _param(rngs, (f, h), ("mlp", "embed"), std, c.param_dtype)
    self.mlp_out_bias = _zeros((h,), ("embed",), c.param_dtype)
    self.mlp_norm = Norm(h, kind="layernorm", eps=c.layer_norm_eps, param_dtype=c.param_dtype)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """The layer's output ``[B, L, H]`` for input ``x [B, L, H]`` and boolean ``key_mask [B, L]``."""
    c = self.config
    w = lambda p: p[...].astype(c.dtype)  # noqa: E731
    name = f"layer{self.index}"
    q = capture.record(f"{name}/queries", dense(x, w(self.q)) + w(self.q_bias))
    k = capture.record(f"{name}/keys", dense(x, w(self.k)) + w(self.k_bias))
    v = capture.record(f"{name}/values", dense(x, w(self.v)) + w(self.v_bias))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * c.head_dim**-0.5
    # finfo.min rather than -inf: a row whose keys are all padding then gets uniform weights
    # instead of NaN (BERT's additive mask does the same), and masked keys get exactly 0.
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = capture.record(f"{name}/attention_probs", jax.nn.softmax(scores, axis=-1))
    attended = jnp.einsum("bnqk,bknd->bqnd", probs.astype(c.dtype), v)
    x = self.attn_norm(x + dense(attended, w(self.o), contract=2) + w(self.o_bias))
    hidden = ACTIVATIONS[c.activation](dense(x, w(self.mlp_in)) + w(self.mlp_in_bias))
    x = self.mlp_norm(x + dense(hidden, w(self.mlp_out)) + w(self.mlp_out_bias))
    return capture.record(f"{name}/output", x)


class BertEncoder(nnx.Module):
  """Bidirectional BERT encoder: token ids and a padding mask in, hidden states out.

  Args:
    config: model configuration.
    rngs: random streams; ``params`` is used.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    std = c.initializer_range
    self.config = c
    self.word_embeddings = _param(rngs, (c.vocab_size, c.hidden), ("vocab", "embed"), std, c.param_dtype)
    self.position_embeddings = _param(rngs, (c.max_positions, c.hidden), (None, "embed"), std, c.param_dtype)
    self.token_type_embeddings = _param(rngs, (c.type_vocab_size, c.hidden), (None, "embed"), std, c.param_dtype)
    self.embeddings_norm = Norm(c.hidden, kind="layernorm", eps=c.layer_norm_eps, param_dtype=c.param_dtype)
    self.layers = nnx.List([EncoderLayer(c, i, rngs=rngs) for i in range(c.layers)])
    if c.pooler:
      self.pooler = _param(rngs, (c.hidden, c.hidden), ("embed", None), std, c.param_dtype)
      self.pooler_bias = _zeros((c.hidden,), ("embed",), c.param_dtype)
    else:
      self.pooler = self.pooler_bias = None

  def activation_names(self) -> list[str]:
    """Every name a call records, in the order it records them (see the module docstring)."""
    per_layer = ("queries", "keys", "values", "attention_probs", "output")
    return ["embeddings"] + [f"layer{i}/{part}" for i in range(self.config.layers) for part in per_layer]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: Optional[jax.Array] = None,
               *, train: bool = False) -> jax.Array:
    """Last-layer hidden states.

    Args:
      input_ids: int ``[B, L]`` with ``L <= max_positions``.
      attention_mask: ``[B, L]``, nonzero (or True) for real tokens and 0 for padding; padded
        positions are never attended to.
      token_type_ids: int ``[B, L]`` segment ids, or ``None`` for all zeros (single sentences).
      train: accepted for the common model interface; there is no dropout, so it changes nothing.

    Returns:
      ``[B, L, hidden]`` in the compute dtype. Rows at padded positions are computed but meaningless.

    Raises:
      ValueError: ``input_ids`` is not 2-D, is longer than ``max_positions``, or the mask / token
        types do not have its shape.
    """
    del train  # No dropout or batch statistics.
    c = self.config
    shape = jnp.shape(input_ids)
    if len(shape) != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {shape}.")
    if shape[1] > c.max_positions:
      raise ValueError(f"sequence length {shape[1]} exceeds max_positions {c.max_positions}.")
    if jnp.shape(attention_mask) != shape:
      raise ValueError(f"attention_mask has shape {jnp.shape(attention_mask)}, input_ids {shape}.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros(shape, jnp.int32)
    elif jnp.shape(token_type_ids) != shape:
      raise ValueError(f"token_type_ids has shape {jnp.shape(token_type_ids)}, input_ids {shape}.")
    w = lambda p: p[...].astype(c.dtype)  # noqa: E731
    x = (jnp.take(w(self.word_embeddings), input_ids, axis=0)
         + w(self.position_embeddings)[None, :shape[1]]
         + jnp.take(w(self.token_type_embeddings), token_type_ids, axis=0))
    x = capture.record("embeddings", self.embeddings_norm(x))
    key_mask = jnp.asarray(attention_mask) != 0
    for layer in self.layers:
      x = layer(x, key_mask)
    return x

  def embed(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: Optional[jax.Array] = None,
            *, normalize: bool = True) -> jax.Array:
    """Sentence embeddings ``[B, hidden]``: :func:`sentence_embedding` of the hidden states."""
    return sentence_embedding(self(input_ids, attention_mask, token_type_ids), attention_mask, normalize=normalize)

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """BERT's pooler output ``tanh(h[:, 0] W + b)`` ``[B, hidden]`` (the ``[CLS]`` position).

    Raises:
      ValueError: the config has ``pooler=False``.
    """
    if self.pooler is None:
      raise ValueError("this encoder has no pooler (EncoderConfig.pooler=False).")
    dtype = self.config.dtype
    return jnp.tanh(dense(hidden[:, 0], self.pooler[...].astype(dtype)) + self.pooler_bias[...].astype(dtype))


def sentence_embedding(hidden: jax.Array, attention_mask: jax.Array, *, normalize: bool = True,
                       eps: float = 1e-12) -> jax.Array:
  """Masked mean pooling, then L2 normalisation: sentence-transformers' Pooling + Normalize.

  ``u_b = sum_l m_bl h_bl / max(sum_l m_bl, 1e-9)`` and, with ``normalize``,
  ``u_b / max(||u_b||_2, eps)`` (``torch.nn.functional.normalize``), in float32.

  Args:
    hidden: ``[B, L, H]`` token states.
    attention_mask: ``[B, L]``, nonzero for real tokens.
    normalize: divide each embedding by its L2 norm (all-MiniLM-L6-v2's ``2_Normalize`` module).
    eps: floor of the norm.

  Returns:
    float32 ``[B, H]``. A row with no real token gives the zero vector (not NaN).

  Raises:
    ValueError: the mask is not ``hidden.shape[:2]``.
  """
  if jnp.ndim(hidden) != 3 or jnp.shape(attention_mask) != jnp.shape(hidden)[:2]:
    raise ValueError(f"hidden must be [B, L, H] and attention_mask [B, L]; got {jnp.shape(hidden)} and "
                     f"{jnp.shape(attention_mask)}.")
  mask = (jnp.asarray(attention_mask) != 0).astype(jnp.float32)
  total = jnp.einsum("blh,bl->bh", hidden.astype(jnp.float32), mask)
  mean = total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
  if not normalize:
    return mean
  # The floor sits inside the square root: the norm's gradient at a zero row (a sentence of
  # padding only) is then 0, not NaN.
  return mean * jax.lax.rsqrt(jnp.maximum(jnp.sum(mean * mean, axis=-1, keepdims=True), eps * eps))
