"""Hugging Face checkpoints for the decoder LM: real teachers in, distilled students out.

``load_hf_decoder(directory)`` reads a ``transformers`` causal-LM checkpoint (``config.json`` and
one or many ``*.safetensors`` files) into a :class:`DecoderLM` with NumPy and JAX alone; torch is
not needed. ``save_hf_decoder(model, directory)`` writes the inverse, which
``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads with no missing or
unexpected weights.

Supported families
------------------
==============  ===================================================================================
``model_type``  what maps onto the decoder
==============  ===================================================================================
``llama``       GQA, ``head_dim``, ``rope_theta``, tied or untied embeddings; ``attention_bias``
                and ``mlp_bias`` must be false (the decoder has no o-projection or MLP biases).
``mistral``     as Llama; ``sliding_window`` must be ``null`` or at least the ``max_len`` the
                model is built for (within that length a sliding window changes nothing).
``qwen2``       as Llama plus the q / k / v biases Qwen2 always has; sliding-window layers only
                if the window covers ``max_len``.
``qwen3``       as Llama plus per-head q / k RMSNorm; ``attention_bias`` must be false.
==============  ===================================================================================

Fields read from ``config.json``: ``vocab_size``, ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``max_position_embeddings``, ``rms_norm_eps``, ``tie_word_embeddings``, ``hidden_act``,
``rope_theta`` / ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5),
``attention_bias``, ``mlp_bias``, ``sliding_window``, ``use_sliding_window``,
``max_window_layers``, ``layer_types`` and ``quantization_config``. Fields a ``config.json``
omits take the defaults of that family's ``transformers`` config class.

Anything the decoder cannot compute raises a ``ValueError`` that names the field and its value,
rather than loading a model that runs but computes something else: RoPE scaling other than
``default`` (linear, dynamic, YaRN, ``llama3``, LongRoPE), partial rotary factors, activations
other than SiLU, o-projection or MLP biases, sliding windows shorter than ``max_len``, quantized
weights and unknown ``model_type`` values (Gemma, Phi, ...).

Tensor layout
-------------
``torch.nn.Linear`` stores ``[out, in]`` with the heads flattened into one axis; the decoder
stores ``[in..., out...]`` with heads as their own axes, for example
``model.layers.{i}.self_attn.q_proj.weight [H * Dh, D]`` is ``blocks[i].attn.q [D, H, Dh]`` and
``o_proj.weight [D, H * Dh]`` is ``attn.o [H, Dh, D]``. Both sides use the rotate-half RoPE
layout and the same head order, so no feature permutation is needed. One table, ``_TENSORS``,
lists every tensor and its layout; loading and saving both read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from kdjax.models.decoder import DecoderConfig, DecoderLM

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------
# Families: what each model_type means for the decoder.


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one ``model_type`` reads its ``config.json``.

  Attributes:
    architecture: the ``architectures`` entry ``transformers`` instantiates.
    qkv_bias: the q / k / v projections always carry biases (Qwen2), whatever the config says.
    qk_norm: each query and key head is RMS-normalised before RoPE (Qwen3).
    attention_bias_field: the family reads ``attention_bias``, which adds biases to all four
      projections, o included (Llama, Qwen3); families without it ignore the field.
    mlp_bias_field: the family reads ``mlp_bias`` (Llama).
    window: how sliding windows are configured: ``None`` (never), ``"all"`` (Mistral: every layer
      when ``sliding_window`` is set) or ``"qwen"`` (``use_sliding_window`` plus ``layer_types`` or
      ``max_window_layers``).
    defaults: that family's ``transformers`` config-class defaults for keys a file may omit.
    export: keys written on export so that ``transformers`` builds exactly the decoder.
  """

  architecture: str
  qkv_bias: bool = False
  qk_norm: bool = False
  attention_bias_field: bool = True
  mlp_bias_field: bool = False
  window: str | None = None
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  export: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# Defaults shared by every family's config class in transformers 4.x and 5.x.
_COMMON_DEFAULTS = {
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10_000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
_QWEN_WINDOW_DEFAULTS = {
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
_QWEN_WINDOW_OFF = {"use_sliding_window": False, "sliding_window": None}

FAMILIES: Mapping[str, _Family] = {
    "llama": _Family(
        "LlamaForCausalLM", mlp_bias_field=True,
        defaults={"max_position_embeddings": 2048},
        export={"attention_bias": False, "mlp_bias": False}),
    "mistral": _Family(
        "MistralForCausalLM", attention_bias_field=False, window="all",
        defaults={"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
        export={"sliding_window": None}),
    "qwen2": _Family(
        "Qwen2ForCausalLM", qkv_bias=True, attention_bias_field=False, window="qwen",
        defaults={"max_position_embeddings": 32768, **_QWEN_WINDOW_DEFAULTS},
        export=_QWEN_WINDOW_OFF),
    "qwen3": _Family(
        "Qwen3ForCausalLM", qk_norm=True, window="qwen",
        # Qwen3Config's head_dim defaults to 128, not hidden_size // num_attention_heads.
        defaults={"max_position_embeddings": 32768, "head_dim": 128, **_QWEN_WINDOW_DEFAULTS},
        export={"attention_bias": False, **_QWEN_WINDOW_OFF}),
}

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_SILU = ("silu", "swish")  # transformers maps both names to torch.nn.SiLU.


def _family(model_type: Any) -> _Family:
  if model_type not in FAMILIES:
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}.")
  return FAMILIES[model_type]


def _field(hf: Mapping[str, Any], family: _Family, key: str) -> Any:
  if key in hf:
    return hf[key]
  return family.defaults.get(key, _COMMON_DEFAULTS.get(key))


def _read_config_json(config: Mapping[str, Any] | PathLike) -> dict:
  if isinstance(config, Mapping):
    return dict(config)
  path = pathlib.Path(config)
  if path.is_dir():
    path = path / CONFIG_NAME
  with open(path) as f:
    return json.load(f)


def _rope_theta(hf: Mapping[str, Any], family: _Family) -> float:
  """RoPE base of either config generation; raises on any scaling the decoder lacks."""
  # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` and `rope_scaling`. Files
  # in the wild carry either, and a converted file may carry both: every one must be plain.
  theta = _field(hf, family, "rope_theta")
  for key in ("rope_scaling", "rope_parameters"):
    params = hf.get(key)
    if params is None:
      continue
    if not isinstance(params, Mapping):
      raise ValueError(f"{key} must be a mapping or null, got {params!r}.")
    if any(isinstance(value, Mapping) for value in params.values()):
      raise ValueError(f"{key}={dict(params)} sets RoPE per layer type; the decoder has one RoPE.")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
      raise ValueError(
          f"{key} has rope_type {kind!r} ({dict(params)}); the decoder implements only plain "
          "RoPE (rope_type 'default'), so positions would be rotated wrongly.")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
      raise ValueError(f"{key}.partial_rotary_factor={partial!r} is not supported: the decoder "
                       "rotates every feature of a head.")
    theta = params.get("rope_theta", theta)
  partial = hf.get("partial_rotary_factor", 1.0)
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor={partial!r} is not supported: the decoder rotates "
                     "every feature of a head.")
  return float(theta)


def _sliding_window(hf: Mapping[str, Any], family: _Family, num_layers: int) -> int | None:
  """The sliding window some layer attends through, or ``None`` if every layer sees all keys."""
  if family.window is None:
    return None
  window = _field(hf, family, "sliding_window")
  if family.window == "qwen":
    if not _field(hf, family, "use_sliding_window"):
      return None  # Qwen configs drop sliding_window unless use_sliding_window is set.
    types = hf.get("layer_types")
    if types is None:
      first = _field(hf, family, "max_window_layers")
      types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
      raise ValueError(f"layer_types contains unsupported attention kinds {unknown}.")
    if "sliding_attention" not in types:
      return None
  return window


def config_from_hf(config: Mapping[str, Any] | PathLike, *, max_len: int | None = None,
                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> DecoderConfig:
  """The :class:`DecoderConfig` of a Hugging Face ``config.json``.

  Args:
    config: the parsed ``config.json``, its path, or the checkpoint directory holding it.
    max_len: longest sequence the model will run; ``None`` means ``max_position_embeddings``.
      A Mistral / Qwen sliding window must be at least this long.
    dtype: compute dtype of the decoder.
    param_dtype: storage dtype of its parameters.

  Returns:
    The decoder configuration that computes what the checkpoint's ``transformers`` model does.

  Raises:
    ValueError: the family or a field's value is one the decoder cannot represent (the message
      names the field and its value), or a required field is missing.
  """
  hf = _read_config_json(config)
  family = _family(hf.get("model_type"))
  missing = [key for key in _REQUIRED if hf.get(key) is None]
  if missing:
    raise ValueError(f"config.json lacks required fields {missing}.")
  if hf.get("quantization_config") is not None:
    raise ValueError(
        f"quantization_config={hf['quantization_config']!r}: quantized checkpoints are not "
        "supported; load a float checkpoint.")
  act = _field(hf, family, "hidden_act")
  if act not in _SILU:
    raise ValueError(f"hidden_act={act!r} is not supported: the decoder's MLP is SwiGLU (silu).")
  if family.attention_bias_field and _field(hf, family, "attention_bias"):
    raise ValueError(
        "attention_bias=True is not supported: it also biases o_proj, which the decoder lacks.")
  if family.mlp_bias_field and _field(hf, family, "mlp_bias"):
    raise ValueError("mlp_bias=True is not supported: the decoder's MLP has no biases.")
  theta = _rope_theta(hf, family)

  num_layers = hf["num_hidden_layers"]
  if max_len is None:
    max_len = _field(hf, family, "max_position_embeddings")
  window = _sliding_window(hf, family, num_layers)
  if window is not None and window < max_len:
    # A query attends to keys at distance < window, so sequences of <= window tokens see all.
    raise ValueError(
        f"sliding_window={window} is shorter than max_len={max_len}; the decoder attends to the "
        f"whole prefix, so pass max_len <= {window} to load this checkpoint.")

  heads = hf["num_attention_heads"]
  head_dim = _field(hf, family, "head_dim")
  return DecoderConfig(
      vocab_size=hf["vocab_size"],
      num_layers=num_layers,
      num_heads=heads,
      d_model=hf["hidden_size"],
      d_ff=hf["intermediate_size"],
      max_len=max_len,
      num_kv_heads=_field(hf, family, "num_key_value_heads") or heads,
      head_dim=head_dim if head_dim is not None else hf["hidden_size"] // heads,
      rope_theta=theta,
      norm="rmsnorm",
      tie_embeddings=bool(_field(hf, family, "tie_word_embeddings")),
      qkv_bias=family.qkv_bias,
      qk_norm=family.qk_norm,
      norm_eps=float(_field(hf, family, "rms_norm_eps")),
      dtype=dtype,
      param_dtype=param_dtype,
  )


def _infer_model_type(config: DecoderConfig) -> str:
  if config.qk_norm:
    return "qwen3"
  if config.qkv_bias:
    return "qwen2"
  return "llama"


def config_to_hf(config: DecoderConfig, *, model_type: str | None = None) -> dict:
  """The ``config.json`` contents of a decoder, the inverse of :func:`config_from_hf`.

  Args:
    config: the decoder's configuration.
    model_type: ``"llama"``, ``"mistral"``, ``"qwen2"`` or ``"qwen3"``; ``None`` picks ``qwen3``
      for ``qk_norm``, ``qwen2`` for ``qkv_bias`` and ``llama`` otherwise.

  Raises:
    ValueError: the decoder uses a feature the chosen family lacks (LayerNorm, logit soft-capping,
      q / k / v biases outside Qwen2, q / k norms outside Qwen3).
  """
  if config.norm != "rmsnorm":
    raise ValueError(f"norm={config.norm!r} has no Hugging Face counterpart here; use 'rmsnorm'.")
  if config.logit_softcap is not None:
    raise ValueError(f"logit_softcap={config.logit_softcap!r} is not part of these families.")
  model_type = model_type or _infer_model_type(config)
  family = _family(model_type)
  for name in ("qkv_bias", "qk_norm"):
    if getattr(config, name) != getattr(family, name):
      raise ValueError(
          f"{name}={getattr(config, name)} does not fit model_type {model_type!r}, which has "
          f"{name}={getattr(family, name)}; pass model_type={_infer_model_type(config)!r}.")
  theta = float(config.rope_theta)
  return {
      "architectures": [family.architecture],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.d_ff,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_len,
      "rms_norm_eps": config.norm_eps,
      "tie_word_embeddings": config.tie_embeddings,
      # Both generations: transformers 4.x reads rope_theta, 5.x rope_parameters.
      "rope_theta": theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "dtype": jnp.dtype(config.param_dtype).name,
      **family.export,
  }


# --------------------------------------------------------------------------------------------
# Tensors: one table of names and layouts, read by both directions.


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How an NNX parameter's values sit in its Hugging Face tensor.

  Attributes:
    split: ``None`` for vectors (norm scales, biases), which Hugging Face keeps flat. Otherwise
      the NNX axes before ``split`` form one matrix axis and the rest the other.
    transpose: the tensor is a ``torch.nn.Linear`` weight, stored ``[out, in]`` where the decoder
      keeps ``[in, out]``.
  """

  split: int | None
  transpose: bool = False

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.split is None:
      return (math.prod(shape),)
    rows, cols = math.prod(shape[:self.split]), math.prod(shape[self.split:])
    return (cols, rows) if self.transpose else (rows, cols)

  def to_nnx(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (tensor.T if self.transpose else tensor).reshape(shape)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    if self.split is None:
      return param.reshape(-1)
    matrix = param.reshape(math.prod(param.shape[:self.split]), -1)
    # safetensors writes the raw buffer, so a transposed view must be made contiguous.
    return np.ascontiguousarray(matrix.T if self.transpose else matrix)


_VECTOR = _Layout(None)
_LINEAR = _Layout(1, transpose=True)

# Hugging Face name -> (NNX path, layout). "{i}" is the layer index; the decoder's path then
# starts with ("blocks", i). Rows whose parameter a config lacks (biases, q/k norms, an untied
# head) are simply absent from that model.
_TENSORS: Mapping[str, tuple[tuple[str, ...], _Layout]] = {
    "model.embed_tokens.weight": (("embedding",), _Layout(1)),
    "model.norm.weight": (("final_norm", "scale"), _VECTOR),
    "lm_head.weight": (("lm_head",), _LINEAR),
    "model.layers.{i}.input_layernorm.weight": (("attn_norm", "scale"), _VECTOR),
    "model.layers.{i}.post_attention_layernorm.weight": (("mlp_norm", "scale"), _VECTOR),
    "model.layers.{i}.self_attn.q_proj.weight": (("attn", "q"), _LINEAR),
    "model.layers.{i}.self_attn.k_proj.weight": (("attn", "k"), _LINEAR),
    "model.layers.{i}.self_attn.v_proj.weight": (("attn", "v"), _LINEAR),
    "model.layers.{i}.self_attn.o_proj.weight": (("attn", "o"), _Layout(2, transpose=True)),
    "model.layers.{i}.self_attn.q_proj.bias": (("attn", "q_bias"), _VECTOR),
    "model.layers.{i}.self_attn.k_proj.bias": (("attn", "k_bias"), _VECTOR),
    "model.layers.{i}.self_attn.v_proj.bias": (("attn", "v_bias"), _VECTOR),
    "model.layers.{i}.self_attn.q_norm.weight": (("attn", "q_norm", "scale"), _VECTOR),
    "model.layers.{i}.self_attn.k_norm.weight": (("attn", "k_norm", "scale"), _VECTOR),
    "model.layers.{i}.mlp.gate_proj.weight": (("mlp", "gate"), _LINEAR),
    "model.layers.{i}.mlp.up_proj.weight": (("mlp", "up"), _LINEAR),
    "model.layers.{i}.mlp.down_proj.weight": (("mlp", "down"), _LINEAR),
}
_BY_PATH = {path: (name, layout) for name, (path, layout) in _TENSORS.items()}
# Some older exports store RoPE's inverse frequencies as buffers; the decoder derives them from
# rope_theta, so they carry nothing to load.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _hf_name(path: tuple) -> tuple[str, _Layout]:
  """The Hugging Face name and layout of the parameter at NNX ``path``."""
  if path and path[0] == "blocks":
    key, layer = tuple(path[2:]), path[1]
  else:
    key, layer = tuple(path), None
  if key not in _BY_PATH:
    raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart.")
  name, layout = _BY_PATH[key]
  return name.format(i=layer), layout


def _named_params(state: nnx.State):
  """Yields ``(Hugging Face name, NNX path, layout, variable)`` for every variable in ``state``."""
  for path, variable in nnx.to_flat_state(state):
    if not isinstance(variable, nnx.Param):
      # Anything stateful beyond parameters would be lost in a checkpoint: refuse it.
      raise ValueError(f"{'.'.join(map(str, path))} is a {type(variable).__name__}, not a Param.")
    name, layout = _hf_name(path)
    yield name, path, layout, variable


def _param_table(state: nnx.State) -> dict[str, tuple[tuple, _Layout, tuple[int, ...]]]:
  """Hugging Face name -> (NNX path, layout, NNX shape) for every parameter in ``state``."""
  return {name: (path, layout, tuple(variable.get_value().shape))
          for name, path, layout, variable in _named_params(state)}


# --------------------------------------------------------------------------------------------
# Loading.


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  index = directory / INDEX_NAME
  if index.exists():
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return [directory / name for name in sorted(set(weight_map.values()))]
  if (directory / WEIGHTS_NAME).exists():
    return [directory / WEIGHTS_NAME]
  # Unsharded files under other names; unrelated ones (adapters) then fail loudly as unexpected.
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors files in {directory}.")
  return files


def _read_headers(files: list[pathlib.Path]) -> dict[str, tuple[pathlib.Path, tuple[int, ...]]]:
  """Tensor name -> (file, shape), from the headers alone: no tensor data is read."""
  found = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        if name in found:
          raise ValueError(f"tensor {name} appears in both {found[name][0].name} and {file.name}.")
        found[name] = (file, tuple(f.get_slice(name).get_shape()))
  return found


def read_params(files, expected, param_dtype, *, extra=()) -> tuple[dict, dict]:
  """Reads the checkpoint tensors named in `expected` into NNX layout and dtype.

  Returns `({nnx path: array}, {name: array})`, the second holding the tensors named in `extra`
  that the model has no place for, read unchanged (e.g. a tied checkpoint's lm_head)."""
  values, others = {}, {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        if name in expected:
          nnx_path, layout, shape = expected[name]
          values[nnx_path] = jnp.asarray(layout.to_nnx(f.get_tensor(name), shape), param_dtype)
        elif name in extra:
          others[name] = jnp.asarray(f.get_tensor(name), param_dtype)
  return values, others


def shape_problems(expected, found) -> list[str]:
  """One line per tensor present in both tables whose checkpoint shape differs from what the
  model config implies (`expected`: name -> (path, layout, shape); `found`: name -> (file, shape))."""
  problems = []
  for name in sorted(set(expected) & set(found)):
    _, layout, shape = expected[name]
    want, got = layout.hf_shape(shape), found[name][1]
    if got != want:
      problems.append(f"{name} has shape {list(got)}, the config implies {list(want)}")
  return problems


def _check_names_and_shapes(expected, found, tied: bool) -> None:
  """Raises one ValueError listing every missing, unexpected and wrongly shaped tensor."""
  problems = []
  missing = sorted(set(expected) - set(found))
  if missing:
    problems.append(f"missing tensors: {missing}")
  unexpected = sorted(
      name for name in found
      if name not in expected and not name.endswith(_IGNORED_SUFFIXES)
      and not (tied and name == "lm_head.weight"))
  if unexpected:
    problems.append(f"unexpected tensors: {unexpected}")
  problems += shape_problems(expected, found)
  if tied and "lm_head.weight" in found:
    _, layout, shape = expected["model.embed_tokens.weight"]
    got, want = found["lm_head.weight"][1], layout.hf_shape(shape)
    if got != want:
      problems.append(f"lm_head.weight has shape {list(got)}, the tied embedding {list(want)}")
  if problems:
    raise ValueError("checkpoint does not match its config: " + "; ".join(problems) + ".")


def load_hf_decoder(path: PathLike, *, max_len: int | None = None, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> DecoderLM:
  """A :class:`DecoderLM` holding a Hugging Face checkpoint's weights.

  Parameters are created abstractly and filled tensor by tensor, so a large teacher is never
  also randomly initialised.

  Args:
    path: the checkpoint directory (``config.json`` with ``model.safetensors``, or shards listed
      in ``model.safetensors.index.json``), or one ``.safetensors`` file beside its config.json.
    max_len: longest sequence the model will run; ``None`` means ``max_position_embeddings``.
    dtype: compute dtype of the decoder.
    param_dtype: dtype the weights are cast to, whatever they were stored in.

  Returns:
    The decoder; its logits match the ``transformers`` model's up to float rounding.

  Raises:
    ValueError: the config is unsupported (see :func:`config_from_hf`), or tensors are missing,
      unexpected or of the wrong shape (all of them named at once), or a tied checkpoint also
      stores an ``lm_head.weight`` that differs from its embedding.
  """
  path = pathlib.Path(path)
  directory = path.parent if path.is_file() else path
  files = [path] if path.suffix == ".safetensors" else _weight_files(directory)
  config = config_from_hf(directory, max_len=max_len, dtype=dtype, param_dtype=param_dtype)

  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = _param_table(state)
  found = _read_headers(files)
  _check_names_and_shapes(expected, found, config.tie_embeddings)

  # A tied checkpoint's lm_head is read as it is, rounded like the embedding, to compare below.
  values, extra = read_params(files, expected, param_dtype, extra=("lm_head.weight",) if config.tie_embeddings else ())
  lm_head = extra.get("lm_head.weight")
  if lm_head is not None:
    # transformers would silently overwrite it with the embedding; a difference means the
    # checkpoint is not what its config says.
    if not bool(jnp.array_equal(lm_head, values[expected["model.embed_tokens.weight"][0]])):
      raise ValueError("tie_word_embeddings is true but lm_head.weight differs from "
                       "model.embed_tokens.weight.")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------
# Saving.


def save_hf_decoder(model: DecoderLM, directory: PathLike, *,
                    model_type: str | None = None) -> pathlib.Path:
  """Writes ``config.json`` and ``model.safetensors`` that ``transformers`` loads as ``model``.

  Tensors are stored in the model's parameter dtype; a tied embedding is stored once, as
  ``transformers`` itself does.

  Args:
    model: the decoder to export.
    directory: created if needed; existing files of the same names are overwritten.
    model_type: see :func:`config_to_hf`; ``None`` picks the family the config implies.

  Returns:
    ``directory`` as a path.

  Raises:
    ValueError: the model uses a feature the family cannot express (see :func:`config_to_hf`).
  """
  config_json = config_to_hf(model.config, model_type=model_type)
  tensors = {name: layout.to_hf(np.asarray(jax.device_get(variable.get_value())))
             for name, _, layout, variable in _named_params(nnx.state(model))}
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / CONFIG_NAME, "w") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)
    f.write("\n")
  # transformers refuses safetensors files whose metadata does not name a known format.
  save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
  return directory
