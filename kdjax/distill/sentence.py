"""Sentence-embedding distillation of BERT encoders: the embedding, MiniLM / MiniLMv2 relations, hidden states.

For a batch of sentences with student embedding e_s and teacher embedding e_t (each model's masked
mean of its last hidden states, L2-normalised: `kdjax.models.encoder.sentence_embedding`, the
all-MiniLM-L6-v2 pooling), the per-sentence loss is

    ℓ = w_emb·(1 − cos(e_s, e_t))                                    the embedding itself
      + w_mse·(1/D)·‖e_s − e_t‖²                                     sentence-transformers' MSE
      + w_at·L_AT + w_vr·L_VR                                        MiniLM (Wang et al. 2020)
      + w_rel·(L_QQ + L_KK + L_VV)                                   MiniLMv2 (Wang et al. 2021)
      + w_hid·Σ_(m, n) (1/|x|) Σ_t (1 − cos(W_m h^S_{m,t}, h^T_{n,t}))  hidden states over `layer_map` pairs

and the loss is its mean over the batch's sentences. Every relation term compares the teacher's
distribution with the student's as KL(teacher ‖ student), row by row, averaged over heads and the
sentence's real tokens (`kdjax.losses.transformer_relations`):

  * L_AT: the attention distributions of the student's last layer and the chosen teacher layer;
    L_VR: softmax(V Vᵀ/√d_k) of the same layers. MiniLM pairs heads one to one, so both need the
    same number of heads (not of widths: the relations are L×L).
  * L_QQ, L_KK, L_VV: MiniLMv2's multi-head self-attention relations: the queries (keys, values) of
    all heads concatenated and re-split into r relation heads, softmax(X_a X_aᵀ/√d_r); any head
    counts, as long as r divides both widths. MiniLMv2 takes the student's last layer and, for large
    teachers, an upper-middle teacher layer (`teacher_layer`); the default here is the last.
  * The hidden-state term is DistilBERT's cosine (Sanh et al. 2019) on TinyBERT's layer map (Jiao et
    al. 2020), summed over the pairs as TinyBERT sums its layers.

Widths: when the student is narrower than the teacher (D_s ≠ D_t) its embedding is mapped by a
learned linear layer before the normalisation, ê_s = normalise(W e_s + b) (sentence-transformers'
Dense module), and each hidden pair has its own W_m (TinyBERT's W_h). These are the strategy's own
parameters (`init_params`), trained with the student; `student_embedding` applies the map, and it is
the student's embedding wherever it is compared with the teacher's, evaluation included.

A batch holds `'input_ids'`, `'attention_mask'`, `'token_type_ids'` `[B, L]` and optionally `'mask'`
`[B]` (0 for padding sentences, which contribute nothing); `encoder_forward` gives both models'
outputs `{'embedding' [B, D], 'hidden' [B, L, D], 'features'}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses
from kdjax.distill.representation import _init_linear
from kdjax.losses import features as F
from kdjax.losses import transformer_relations as R
from kdjax.models import capture
from kdjax.models.encoder import EncoderConfig, sentence_embedding

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

# The builder's keys (`sentence_strategy`); anything else in a config section is an error.
CONFIG_KEYS = ("embedding_weight", "mse_weight", "attention_weight", "value_weight", "relation_weight",
               "relation_heads", "teacher_layer", "hidden_weight", "layer_map", "layer_map_custom")
_WEIGHTS = ("embedding_weight", "mse_weight", "attention_weight", "value_weight", "relation_weight", "hidden_weight")


def encoder_forward(graphdef, *, features=()):
  """A forward function `(params, batch) -> {'embedding', 'hidden', 'features'}` for a `BertEncoder`.

  `embedding` is the masked mean of the last hidden states, L2-normalised, `[B, D]` (the value of
  `sentence_embedding(hidden, attention_mask)`, normalised here with the clamp inside the square root so
  that a sentence without real tokens, whose mean is the zero vector, has a finite gradient: the norm's
  gradient at 0 is NaN); `hidden` the last hidden states `[B, L, D]` and `features` the activations
  named in `features` (`kdjax.models.capture`).
  """
  names = tuple(features)

  def forward(params, batch):
    model = nnx.merge(graphdef, params)
    with capture.capture(names) as acts:
      hidden = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    mean = sentence_embedding(hidden, batch["attention_mask"], normalize=False)
    return {"embedding": _unit(mean), "hidden": hidden, "features": dict(acts)}
  return forward


def _unit(x: Array) -> Array:
  # The clamp sits inside the square root, so a zero vector keeps a finite gradient.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _linear(params: Mapping[str, Array], x: Array) -> Array:
  return x @ params["kernel"] + params["bias"]


def _token_mean(values: Array, keep: Array) -> Array:
  """`[B, L]` -> `[B]`: the mean over each sentence's kept tokens (0 for a sentence without any)."""
  return jnp.sum(jnp.where(keep, values, 0.0), axis=-1) / jnp.maximum(jnp.sum(keep, axis=-1), 1)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class SentenceDistillation:
  """The weighted sum of the module docstring for one (student, teacher) pair of encoders.

  Attributes:
    student_width, teacher_width: the models' hidden sizes D_s, D_t (a learned map when they differ).
    student_heads, teacher_heads: their attention head counts (MiniLM's terms need them equal).
    embedding_weight: w_emb of 1 − cos(ê_s, e_t).
    mse_weight: w_mse of (1/D)‖ê_s − e_t‖² (both unit vectors, so it is (2 − 2 cos)/D).
    attention_weight: w_at of MiniLM's attention KL.
    value_weight: w_vr of MiniLM's value relation.
    relation_weight: w_rel of MiniLMv2's Q-Q + K-K + V-V relations.
    relation_heads: r, MiniLMv2's relation heads (must divide both widths when w_rel > 0).
    relation_layers: (student layer, teacher layer), 0-based, of the attention, value and MiniLMv2 terms.
    hidden_weight: w_hid of the hidden-state cosine.
    hidden_pairs: the (student layer, teacher layer) pairs of that term (`transformer_relations.layer_map`).
  """

  student_width: int
  teacher_width: int
  student_heads: int
  teacher_heads: int
  embedding_weight: float = 1.0
  mse_weight: float = 0.0
  attention_weight: float = 0.0
  value_weight: float = 0.0
  relation_weight: float = 0.0
  relation_heads: int = 12
  relation_layers: tuple[int, int] = (0, 0)
  hidden_weight: float = 0.0
  hidden_pairs: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    for name in ("student_width", "teacher_width", "student_heads", "teacher_heads"):
      _positive_int(name, getattr(self, name))
    for name in _WEIGHTS:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not any(getattr(self, name) > 0 for name in _WEIGHTS):
      raise ValueError(f"every weight is 0, so nothing would be distilled; set one of {list(_WEIGHTS)}")
    minilm = [name for name in ("attention_weight", "value_weight") if getattr(self, name) > 0]
    if minilm and self.student_heads != self.teacher_heads:
      raise ValueError(f"{minilm}: MiniLM's attention and value relations pair heads one to one, but the student has "
                       f"{self.student_heads} heads and the teacher {self.teacher_heads}; use relation_weight "
                       "(MiniLMv2's relation heads) instead")
    if self.relation_weight > 0:
      r = _positive_int("relation_heads", self.relation_heads)
      for who, width in (("student", self.student_width), ("teacher", self.teacher_width)):
        if width % r:
          raise ValueError(f"relation_heads={r} must divide the {who} width {width} (queries, keys and values of "
                           "all heads are re-split into r equal relation heads)")
    if len(self.relation_layers) != 2 or any(layer < 0 for layer in self.relation_layers):
      raise ValueError(f"relation_layers must be a (student, teacher) pair of 0-based layers, "
                       f"got {self.relation_layers}")
    if self.hidden_weight > 0 and not self.hidden_pairs:
      raise ValueError("hidden_weight > 0 needs hidden_pairs (transformer_relations.layer_map)")

  uses_head = False
  uses_teacher = True

  @property
  def projected(self) -> bool:
    """Whether the student's embedding and hidden states are mapped onto the teacher's width."""
    return self.student_width != self.teacher_width

  def _relation_names(self) -> dict[str, tuple[str, ...]]:
    """Per term with a positive weight, the activation part(s) it reads at `relation_layers`."""
    parts = {"attention_weight": ("attention_probs",), "value_weight": ("values",),
             "relation_weight": R.MINILMV2_RELATIONS}
    return {name: part for name, part in parts.items() if getattr(self, name) > 0}

  def feature_names(self, role: str) -> tuple[str, ...]:
    """The activations (`BertEncoder.activation_names()`) this strategy reads from 'student' or 'teacher'."""
    if role not in ("student", "teacher"):
      raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    side = 0 if role == "student" else 1
    layer = self.relation_layers[side]
    names = [f"layer{layer}/{part}" for parts in self._relation_names().values() for part in parts]
    if self.hidden_weight > 0:
      names += [f"layer{pair[side]}/output" for pair in self.hidden_pairs]
    return tuple(dict.fromkeys(names))

  def init_params(self, key: Array) -> dict:
    """The learned maps onto the teacher's width: `{'embedding', 'hidden{j}'}` linears, or {} when the
    widths agree. PyTorch `nn.Linear`'s initialisation (uniform ±1/√D_s)."""
    if not self.projected:
      return {}
    params = {"embedding": _init_linear(jax.random.fold_in(key, 0), self.student_width, self.teacher_width)}
    if self.hidden_weight > 0:
      for j in range(len(self.hidden_pairs)):
        params[f"hidden{j}"] = _init_linear(jax.random.fold_in(key, j + 1), self.student_width, self.teacher_width)
    return params

  def student_embedding(self, embedding: Array, params: Optional[Mapping[str, Any]] = None) -> Array:
    """ê_s: the student's embedding `[B, D_s]` as compared with the teacher's, `normalise(W e_s + b)` when
    the widths differ (`params` are this strategy's `init_params`), `e_s` itself otherwise."""
    embedding = jnp.asarray(embedding, jnp.float32)
    if not self.projected:
      return embedding
    if not params or "embedding" not in params:
      raise ValueError(f"the student (width {self.student_width}) needs its learned map onto the teacher's width "
                       f"{self.teacher_width}: pass the strategy's params (init_params)")
    return _unit(_linear(params["embedding"], embedding))

  def __call__(self, student_out, teacher_out, batch, step, params=None) -> tuple[Array, Metrics]:
    del step
    token_mask = jnp.asarray(batch["attention_mask"]) != 0
    examples = jnp.asarray(batch["mask"]) > 0 if "mask" in batch else jnp.ones(token_mask.shape[:1], bool)
    keep = token_mask & examples[:, None]
    e_s = self.student_embedding(student_out["embedding"], params)
    e_t = jnp.asarray(teacher_out["embedding"], jnp.float32)
    # 1 − cos is always measured (the monitored cosine); it enters the loss with its weight.
    terms = {"embedding": F.hidden_state_loss(e_s, e_t, kind="cosine", where=examples)}
    if self.mse_weight > 0:
      terms["mse"] = F.hidden_state_loss(e_s, e_t, kind="mse", where=examples)
    s_feats, t_feats = student_out["features"], teacher_out["features"]
    ls, lt = self.relation_layers
    if self.attention_weight > 0:
      terms["attention"] = R.attention_kl(s_feats[f"layer{ls}/attention_probs"], t_feats[f"layer{lt}/attention_probs"],
                                          where=keep)
    if self.value_weight > 0:
      terms["value"] = R.value_relation(s_feats[f"layer{ls}/values"], t_feats[f"layer{lt}/values"], where=keep)
    if self.relation_weight > 0:
      terms["relation"] = R.minilmv2_loss({p: s_feats[f"layer{ls}/{p}"] for p in R.MINILMV2_RELATIONS},
                                          {p: t_feats[f"layer{lt}/{p}"] for p in R.MINILMV2_RELATIONS},
                                          num_relation_heads=self.relation_heads, where=keep)
    if self.hidden_weight > 0:
      total = 0.0
      for j, (m, n) in enumerate(self.hidden_pairs):
        h_s = jnp.asarray(s_feats[f"layer{m}/output"], jnp.float32)
        if self.projected:
          h_s = _linear(params[f"hidden{j}"], h_s)
        total = total + _token_mean(F.hidden_state_loss(h_s, t_feats[f"layer{n}/output"], kind="cosine",
                                                        where=keep), keep)
      terms["hidden"] = total
    weights = {"embedding": self.embedding_weight, "mse": self.mse_weight, "attention": self.attention_weight,
               "value": self.value_weight, "relation": self.relation_weight, "hidden": self.hidden_weight}
    per_example = sum(weights[name] * value for name, value in terms.items())
    metrics = {"loss": losses.masked_sum_count(per_example, examples),
               "cosine": losses.masked_sum_count(1.0 - terms["embedding"], examples)}
    metrics.update({name: losses.masked_sum_count(value, examples) for name, value in terms.items()})
    return losses.safe_mean(*metrics["loss"]), metrics


def _layer(name: str, value, num_layers: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not -num_layers <= value < num_layers:
    raise ValueError(f"{name}={value!r} is not a layer of the {num_layers}-layer teacher (0..{num_layers - 1}, or "
                     "negative from the top)")
  return value % num_layers


def sentence_strategy(cfg: Optional[Mapping[str, Any]], *, student_config: EncoderConfig,
                      teacher_config: EncoderConfig) -> SentenceDistillation:
  """A `SentenceDistillation` from a config section (a dict or ConfigDict).

  Keys (all optional; an unknown key raises):
    embedding_weight (1.0), mse_weight, attention_weight, value_weight, relation_weight, hidden_weight (0.0):
      the weights of the module docstring.
    relation_heads: MiniLMv2's r (default: the teacher's head count, so that r = 12 relation heads of
      32 dimensions for all-MiniLM-L6-v2).
    teacher_layer: the teacher layer of the attention, value and MiniLMv2 terms (default −1, the last;
      the student's is always its last, as both papers do).
    layer_map ('uniform'), layer_map_custom (None or (): none; (student, teacher) pairs for 'custom'): the hidden
      term's pairs, `transformer_relations.layer_map`.

  Raises:
    ValueError: an unknown key, a teacher layer out of range, MiniLM's terms with different head counts,
      relation heads that do not divide both widths, or no positive weight.
  """
  cfg = dict(cfg or {})
  unknown = sorted(set(cfg) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f"unknown sentence distillation config keys {unknown}; known: {list(CONFIG_KEYS)}")
  s, t = student_config, teacher_config
  weights = {name: cfg.get(name, 1.0 if name == "embedding_weight" else 0.0) for name in _WEIGHTS}
  teacher_layer = _layer("teacher_layer", cfg.get("teacher_layer", -1), t.layers)
  hidden_pairs = ()
  if weights["hidden_weight"] > 0:
    custom = cfg.get("layer_map_custom") or None  # () in a config: no custom pairs
    hidden_pairs = R.layer_map(s.layers, t.layers, cfg.get("layer_map", "uniform"),
                               custom=None if custom is None else [tuple(pair) for pair in custom])
  return SentenceDistillation(student_width=s.hidden, teacher_width=t.hidden, student_heads=s.heads,
                              teacher_heads=t.heads, relation_heads=cfg.get("relation_heads", t.heads),
                              relation_layers=(s.layers - 1, teacher_layer), hidden_pairs=hidden_pairs, **weights)
