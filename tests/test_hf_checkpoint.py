"""Hugging Face checkpoint import / export of the decoder (`kdjax.models.hf_checkpoint`).

The `torch_ref` tests build tiny randomly initialised `transformers` models locally (nothing is
downloaded), save them with `save_pretrained` and compare their float32 logits with the loaded
decoder's at atol 1e-4, and load the decoder's own exports back into `transformers`. Weights are
perturbed away from `transformers`' init (unit norm scales, zero biases), which would hide a
misplaced norm or bias. The other tests need no torch: export -> import gives identical
parameters, and every unsupported field, missing tensor or wrong shape raises a ValueError that
names it.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from kdjax.models import DecoderConfig, hf_checkpoint, init_decoder

VOCAB = 100
LENGTH = 12
TOL = dict(rtol=1e-4, atol=1e-4)
HF_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
KD_SIZES = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, d_ff=48,
                max_len=32)
# One decoder per family that the exporter can write.
KD_FAMILIES = {
    "llama": dict(tie_embeddings=True, rope_theta=500.0, norm_eps=1e-5),
    "mistral": dict(head_dim=16),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=16, tie_embeddings=True),
}


def token_ids(seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(2, LENGTH))


@functools.partial(jax.jit, static_argnums=0)
def _pure_logits(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def kd_logits(model, ids):
  # Jitted through the pure form: eager NNX compiles op by op and takes much longer on CPU.
  return np.asarray(_pure_logits(*nnx.split(model), jnp.asarray(ids)))


def perturbed_decoder(config: DecoderConfig, seed=0):
  """A decoder whose every parameter, norm scales and biases included, is off its init."""
  graphdef, state = nnx.split(init_decoder(config, seed=seed))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def kd_config(family):
  return DecoderConfig(**KD_SIZES, **KD_FAMILIES[family])


def assert_same_params(a, b):
  flat_a = dict(nnx.to_flat_state(nnx.state(a)))
  flat_b = dict(nnx.to_flat_state(nnx.state(b)))
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path].get_value(), flat_b[path].get_value(),
                                  err_msg=str(path))


# --------------------------------------------------------------------------------------------
# Parity with transformers (torch_ref).


@pytest.fixture(scope="module")
def hf():
  """`(torch, transformers)`, or a skip where either is not installed."""
  torch = pytest.importorskip("torch")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Every model here is built locally.
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(2)
  return torch, transformers


def hf_model(hf, config_class, seed=0, **overrides):
  """A tiny float32 `transformers` model with weights drawn away from its init."""
  torch, transformers = hf
  torch.manual_seed(seed)
  config = getattr(transformers, config_class)(**{**HF_SIZES, **overrides})
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  model = model.float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # Tied embeddings appear once.
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  return model


def hf_logits(hf, model, ids):
  torch, _ = hf
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.float().numpy()


HF_CASES = {
    # name: (config class, config overrides, save_pretrained max_shard_size, load max_len)
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500.0), None, None),
    "llama_untied_head_dim": ("LlamaConfig", dict(head_dim=16, rms_norm_eps=1e-5), None, None),
    "mistral_window": ("MistralConfig", dict(sliding_window=16), None, 16),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True), None, None),
    "qwen2_sharded": ("Qwen2Config", dict(), "20KB", None),
    "qwen3": ("Qwen3Config", dict(head_dim=16), None, None),
    "qwen3_sharded_tied": ("Qwen3Config", dict(head_dim=8, tie_word_embeddings=True), "20KB", None),
}


@pytest.mark.torch_ref
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_load_matches_transformers_logits(hf, tmp_path, case):
  config_class, overrides, shard_size, max_len = HF_CASES[case]
  model = hf_model(hf, config_class, **overrides)
  kwargs = {} if shard_size is None else dict(max_shard_size=shard_size)
  model.save_pretrained(tmp_path, **kwargs)
  if shard_size is not None:  # The case must exercise the index, not one file.
    assert (tmp_path / hf_checkpoint.INDEX_NAME).exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

  loaded = hf_checkpoint.load_hf_decoder(tmp_path, max_len=max_len)

  assert loaded.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
  ids = token_ids()
  np.testing.assert_allclose(kd_logits(loaded, ids), hf_logits(hf, model, ids), **TOL)


@pytest.mark.torch_ref
def test_bfloat16_checkpoint_loads_its_rounded_weights(hf, tmp_path):
  torch, _ = hf
  model = hf_model(hf, "Qwen3Config", head_dim=16)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16))
  ids = token_ids()
  # float32 on both sides from the same bf16-rounded weights, so the rounding is not the
  # loader's. Taken before the cast below, which would also round torch's RoPE frequencies.
  expected = hf_logits(hf, model, ids)
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  loaded = hf_checkpoint.load_hf_decoder(tmp_path, param_dtype=jnp.float32)
  np.testing.assert_allclose(kd_logits(loaded, ids), expected, **TOL)


@pytest.mark.torch_ref
@pytest.mark.parametrize("family", sorted(KD_FAMILIES))
def test_export_loads_in_transformers_with_same_logits(hf, tmp_path, family):
  _, transformers = hf
  model = perturbed_decoder(kd_config(family))
  hf_checkpoint.save_hf_decoder(model, tmp_path, model_type=family)

  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager", output_loading_info=True)

  assert reloaded.config.model_type == family
  assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids = token_ids()
  np.testing.assert_allclose(hf_logits(hf, reloaded.eval(), ids), kd_logits(model, ids), **TOL)


# --------------------------------------------------------------------------------------------
# Round trips without torch.


@pytest.mark.parametrize("family", sorted(KD_FAMILIES))
def test_export_then_import_gives_identical_params(tmp_path, family):
  model = perturbed_decoder(kd_config(family))
  hf_checkpoint.save_hf_decoder(model, tmp_path, model_type=family)
  loaded = hf_checkpoint.load_hf_decoder(tmp_path)
  assert loaded.config == model.config
  assert_same_params(loaded, model)


def test_a_single_weights_file_can_be_named(tmp_path):
  model = perturbed_decoder(kd_config("qwen2"))
  hf_checkpoint.save_hf_decoder(model, tmp_path)
  assert_same_params(hf_checkpoint.load_hf_decoder(tmp_path / hf_checkpoint.WEIGHTS_NAME), model)


def test_bfloat16_params_round_trip_exactly(tmp_path):
  config = DecoderConfig(**KD_SIZES, param_dtype=jnp.bfloat16)
  model = perturbed_decoder(config)
  hf_checkpoint.save_hf_decoder(model, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  assert_same_params(hf_checkpoint.load_hf_decoder(tmp_path, param_dtype=jnp.bfloat16), model)


@pytest.mark.parametrize("family", sorted(KD_FAMILIES))
def test_config_round_trip(family):
  config = kd_config(family)
  hf_json = hf_checkpoint.config_to_hf(config, model_type=family)
  assert hf_json["model_type"] == family
  assert hf_checkpoint.config_from_hf(hf_json) == config


def test_model_type_is_inferred_from_the_config():
  for family, expected in (("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")):
    assert hf_checkpoint.config_to_hf(kd_config(family))["model_type"] == expected


def test_missing_fields_take_family_defaults():
  minimal = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4)
  llama = hf_checkpoint.config_from_hf({"model_type": "llama", **minimal})
  assert (llama.num_kv_heads, llama.head_dim, llama.max_len) == (4, 8, 2048)
  qwen3 = hf_checkpoint.config_from_hf({"model_type": "qwen3", **minimal})
  assert (qwen3.head_dim, qwen3.qk_norm, qwen3.max_len) == (128, True, 32768)
  assert hf_checkpoint.config_from_hf({"model_type": "qwen2", **minimal}).qkv_bias


def test_legacy_rope_theta_is_read():
  legacy = {**hf_checkpoint.config_to_hf(kd_config("llama")), "rope_scaling": None}
  del legacy["rope_parameters"]
  legacy["rope_theta"] = 1_000_000
  assert hf_checkpoint.config_from_hf(legacy).rope_theta == 1e6


# --------------------------------------------------------------------------------------------
# Errors that name the problem.


def hf_config(family="llama", **overrides):
  return {**hf_checkpoint.config_to_hf(kd_config(family), model_type=family), **overrides}


@pytest.mark.parametrize("overrides, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling.*'linear'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling.*'dynamic'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.*'llama3'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "per layer type"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True.*o_proj"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(model_type="gemma2"), "model_type 'gemma2'"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(hidden_size=None), "required fields.*hidden_size"),
])
def test_unsupported_config_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    hf_checkpoint.config_from_hf(hf_config(**overrides))


def test_sliding_window_must_cover_max_len():
  mistral = hf_config("mistral", sliding_window=16, max_position_embeddings=64)
  with pytest.raises(ValueError, match="sliding_window=16 is shorter than max_len=64"):
    hf_checkpoint.config_from_hf(mistral)
  assert hf_checkpoint.config_from_hf(mistral, max_len=16).max_len == 16
  # Qwen: only the layers from max_window_layers on slide, and only with use_sliding_window.
  qwen = hf_config("qwen2", sliding_window=16, max_window_layers=1)
  assert hf_checkpoint.config_from_hf(qwen).max_len == KD_SIZES["max_len"]
  with pytest.raises(ValueError, match="sliding_window=16"):
    hf_checkpoint.config_from_hf({**qwen, "use_sliding_window": True})
  assert hf_checkpoint.config_from_hf(
      {**qwen, "use_sliding_window": True, "max_window_layers": 2}).max_len == KD_SIZES["max_len"]


@pytest.fixture()
def exported(tmp_path):
  """An untied Llama-family export and its tensors, ready to be tampered with."""
  config = DecoderConfig(**KD_SIZES)
  hf_checkpoint.save_hf_decoder(init_decoder(config), tmp_path)
  return tmp_path, load_file(tmp_path / hf_checkpoint.WEIGHTS_NAME)


def rewrite(directory, tensors):
  save_file(tensors, directory / hf_checkpoint.WEIGHTS_NAME, metadata={"format": "pt"})


def test_missing_tensor_is_named(exported):
  directory, tensors = exported
  del tensors["model.layers.1.mlp.up_proj.weight"]
  del tensors["lm_head.weight"]
  rewrite(directory, tensors)
  with pytest.raises(ValueError, match=r"missing tensors: \['lm_head.weight', "
                                       r"'model.layers.1.mlp.up_proj.weight'\]"):
    hf_checkpoint.load_hf_decoder(directory)


def test_unexpected_tensor_is_named(exported):
  directory, tensors = exported
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # Ignored.
  rewrite(directory, tensors)
  with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.self_attn.o_proj"):
    hf_checkpoint.load_hf_decoder(directory)


def test_wrong_shape_is_named(exported):
  directory, tensors = exported
  # Transposed, as a checkpoint written with the decoder's own [in, out] layout would be.
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 16), np.float32)
  rewrite(directory, tensors)
  with pytest.raises(ValueError, match=r"k_proj.weight has shape \[32, 16\], the config implies "
                                       r"\[16, 32\]"):
    hf_checkpoint.load_hf_decoder(directory)


def test_tied_checkpoint_with_a_different_head_raises(tmp_path):
  model = perturbed_decoder(DecoderConfig(**KD_SIZES, tie_embeddings=True))
  hf_checkpoint.save_hf_decoder(model, tmp_path)
  tensors = load_file(tmp_path / hf_checkpoint.WEIGHTS_NAME)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  rewrite(tmp_path, tensors)  # A redundant but equal copy is accepted...
  assert_same_params(hf_checkpoint.load_hf_decoder(tmp_path), model)
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
  rewrite(tmp_path, tensors)  # ... a different one is not.
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    hf_checkpoint.load_hf_decoder(tmp_path)


@pytest.mark.parametrize("overrides, model_type, match", [
    (dict(norm="layernorm"), None, "norm='layernorm'"),
    (dict(logit_softcap=30.0), None, "logit_softcap"),
    (dict(qkv_bias=True), "llama", "qkv_bias=True does not fit model_type 'llama'"),
    (dict(), "qwen3", "qk_norm=False does not fit model_type 'qwen3'"),
    (dict(qkv_bias=True, qk_norm=True), None, "qkv_bias=True does not fit model_type 'qwen3'"),
])
def test_unexportable_model_raises(tmp_path, overrides, model_type, match):
  model = init_decoder(DecoderConfig(**KD_SIZES, **overrides))
  with pytest.raises(ValueError, match=match):
    hf_checkpoint.save_hf_decoder(model, tmp_path, model_type=model_type)
  assert not (tmp_path / hf_checkpoint.WEIGHTS_NAME).exists()
