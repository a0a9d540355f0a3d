"""The BERT encoder (`kdjax.models.encoder`), its checkpoint import and the WordPiece tokenizer.

References are independent of the code under test: a float64 NumPy BERT written against the
Hugging Face tensor names (for tiny random checkpoints written here, no torch), a greedy
longest-match WordPiece over `vocab.txt` (for the tokenizer), and, under `torch_ref`,
sentence-transformers and `transformers.BertModel` on the real all-MiniLM-L6-v2 weights.
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from scipy.special import erf

from kdjax.models import capture, encoder_checkpoint
from kdjax.models.encoder import BertEncoder, EncoderConfig, sentence_embedding

TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=20, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
SHAKESPEARE = [
    "To be, or not to be, that is the question:",
    "Shall I compare thee to a summer's day?",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears;",
    "What's in a name? That which we call a rose by any other name would smell as sweet.",
    "The course of true love never did run smooth.",
    "Double, double toil and trouble; fire burn and cauldron bubble.",
]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pure_forward(graphdef, names, state, ids, mask, types):
  with capture.capture(names) as acts:
    hidden = nnx.merge(graphdef, state)(ids, mask, types)
  return hidden, acts


def forward(model, ids, mask, types=None, names=()):
  """`(hidden, activations)` as NumPy, jitted (eager NNX compiles op by op and is slow on CPU)."""
  graphdef, state = nnx.split(model)
  types = np.zeros_like(ids) if types is None else types
  hidden, acts = _pure_forward(graphdef, tuple(names), state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  return np.asarray(hidden), {k: np.asarray(v) for k, v in acts.items()}


def padded_batch(lengths, width, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
  mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


# --------------------------------------------------------------------------------------------
# A float64 NumPy BERT over Hugging Face tensor names.


def _layer_norm(x, weight, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * weight + bias


def _linear(t, prefix, x):
  return x @ t[prefix + ".weight"].T + t[prefix + ".bias"]


def numpy_bert(t, cfg, ids, mask, types):
  """All hidden states (embeddings first), the attention probabilities and the pooler output."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
  b, length = ids.shape
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:length]
       + t["embeddings.token_type_embeddings.weight"][types])
  x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
  states, probs = [x], []
  split = lambda y: y.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)  # noqa: E731 [B, N, L, D]
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (split(_linear(t, p + "attention.self." + n, x)) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = scores / scores.sum(-1, keepdims=True)
    probs.append(attn)
    ctx = (attn @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
    x = _layer_norm(x + _linear(t, p + "attention.output.dense", ctx), t[p + "attention.output.LayerNorm.weight"],
                    t[p + "attention.output.LayerNorm.bias"], eps)
    h = _linear(t, p + "intermediate.dense", x)
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    x = _layer_norm(x + _linear(t, p + "output.dense", h), t[p + "output.LayerNorm.weight"],
                    t[p + "output.LayerNorm.bias"], eps)
    states.append(x)
  pooled = np.tanh(_linear(t, "pooler.dense", x[:, 0])) if "pooler.dense.weight" in t else None
  return states, probs, pooled


def tiny_tensors(cfg, seed=0, pooler=True):
  """Every tensor of a BertModel checkpoint, named and shaped as transformers saves them."""
  rng = np.random.default_rng(seed)
  h, f = cfg["hidden_size"], cfg["intermediate_size"]
  shapes = {"embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
            "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
            "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], h),
            "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
      shapes.update({p + n + ".weight": (h, h), p + n + ".bias": (h,)})
    shapes.update({p + "intermediate.dense.weight": (f, h), p + "intermediate.dense.bias": (f,),
                   p + "output.dense.weight": (h, f), p + "output.dense.bias": (h,)})
    for n in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes.update({p + n + ".weight": (h,), p + n + ".bias": (h,)})
  if pooler:
    shapes.update({"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)})
  # Away from init (unit LayerNorm scales, zero biases), which would hide a misplaced parameter.
  tensors = {name: (rng.uniform(0.5, 1.5, shape) if name.endswith("LayerNorm.weight")
                    else rng.normal(0.0, 0.3, shape)).astype(np.float32) for name, shape in shapes.items()}
  tensors["embeddings.position_ids"] = np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None]
  return tensors


def write_checkpoint(directory, cfg, tensors):
  with open(directory / "config.json", "w") as f:
    json.dump({"model_type": "bert", "architectures": ["BertModel"], **cfg}, f)
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  return directory


# --------------------------------------------------------------------------------------------
# Model semantics.


def test_loaded_tiny_checkpoint_matches_numpy_reference(tmp_path):
  tensors = tiny_tensors(TINY)
  model, config = encoder_checkpoint.load_bert(write_checkpoint(tmp_path, TINY, tensors))
  assert config.pooler and config.layers == 2 and config.hidden == 16
  ids, mask = padded_batch([9, 4, 1], 9, TINY["vocab_size"])
  types = np.zeros_like(ids)
  types[0, 5:] = 1  # A second segment in one row.
  names = ["embeddings", "layer0/output", "layer1/attention_probs"]
  hidden, acts = forward(model, ids, mask, types, names)
  states, probs, pooled = numpy_bert(tensors, TINY, ids, mask, types)

  # Every position is compared, padded queries included: both sides compute them the same way.
  np.testing.assert_allclose(acts["embeddings"], states[0], atol=1e-5)
  np.testing.assert_allclose(acts["layer0/output"], states[1], atol=1e-4)
  np.testing.assert_allclose(hidden, states[2], atol=1e-4)
  np.testing.assert_allclose(acts["layer1/attention_probs"], probs[1], atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.pooled(jnp.asarray(hidden))), pooled, atol=1e-5)


def test_sentence_embedding_is_masked_mean_then_unit_norm():
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  mean = sentence_embedding(hidden, mask, normalize=False)
  unit = sentence_embedding(hidden, mask)
  for b, n in enumerate(mask.sum(1)):
    want = hidden[b, :n].astype(np.float64).mean(0) if n else np.zeros(4)
    np.testing.assert_allclose(mean[b], want, atol=1e-6)
    np.testing.assert_allclose(unit[b], want / max(np.linalg.norm(want), 1e-12), atol=1e-6)
  assert np.all(np.isfinite(unit)) and not np.any(unit[2])  # An empty row is zero, not NaN.
  with pytest.raises(ValueError, match="attention_mask"):
    sentence_embedding(hidden, mask[:, :4])


@pytest.fixture(scope="module")
def student():
  """A small randomly initialised encoder: the same class at a student's size."""
  config = EncoderConfig(vocab_size=40, hidden=24, layers=3, heads=3, intermediate=32, max_positions=16)
  return BertEncoder(config, rngs=nnx.Rngs(0))


def test_padding_never_changes_the_real_tokens(student):
  length, width, vocab = 5, 11, student.config.vocab_size
  ids, _ = padded_batch([width], width, vocab, seed=2)
  alone, _ = forward(student, ids[:, :length], np.ones((1, length), np.int32))
  mask = (np.arange(width) < length)[None].astype(np.int32)
  for seed in (3, 4):  # Different garbage after the sentence.
    garbage = ids.copy()
    garbage[:, length:] = np.random.default_rng(seed).integers(0, vocab, size=width - length)
    padded, _ = forward(student, garbage, mask)
    np.testing.assert_allclose(padded[:, :length], alone, atol=1e-5)
    np.testing.assert_allclose(sentence_embedding(padded, mask), sentence_embedding(alone, np.ones((1, length))),
                               atol=1e-5)


def test_activation_names_shapes_and_consistency(student):
  c = student.config
  ids, mask = padded_batch([7, 3], 7, c.vocab_size, seed=5)
  hidden, acts = forward(student, ids, mask, names=student.activation_names())
  assert len(set(student.activation_names())) == 1 + 5 * c.layers
  b, length, n, d = 2, 7, c.heads, c.head_dim
  assert acts["embeddings"].shape == (b, length, c.hidden)
  for i in range(c.layers):
    for part in ("queries", "keys", "values"):
      assert acts[f"layer{i}/{part}"].shape == (b, length, n, d)
    assert acts[f"layer{i}/output"].shape == (b, length, c.hidden)
    probs = acts[f"layer{i}/attention_probs"]
    assert probs.shape == (b, n, length, length)
    # The recorded probabilities are the softmax of the recorded queries and keys, over real keys only.
    q, k = acts[f"layer{i}/queries"].astype(np.float64), acts[f"layer{i}/keys"].astype(np.float64)
    logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
    logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(-1, keepdims=True), atol=1e-5)
    assert not np.any(probs[1, :, :, 3:])  # Exactly zero on padded keys.
  np.testing.assert_array_equal(acts[f"layer{c.layers - 1}/output"], hidden)
  with pytest.raises(ValueError, match="layer9/output"):
    forward(student, ids, mask, names=["layer9/output"])


def test_bad_inputs_and_configs_raise(student):
  ids = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="attention_mask"):
    student(ids, jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="token_type_ids"):
    student(ids, jnp.ones((2, 5)), jnp.zeros((2, 6), jnp.int32))
  with pytest.raises(ValueError, match="max_positions"):
    student(jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17)))
  with pytest.raises(ValueError, match="input_ids"):
    student(jnp.zeros((5,), jnp.int32), jnp.ones((5,)))
  with pytest.raises(ValueError, match="divisible"):
    EncoderConfig(vocab_size=10, hidden=10, layers=1, heads=3, intermediate=8)
  with pytest.raises(ValueError, match="activation"):
    EncoderConfig(vocab_size=10, hidden=12, layers=1, heads=3, intermediate=8, activation="swish")
  with pytest.raises(ValueError, match="pooler"):
    student.pooled(jnp.zeros((1, 2, 24)))


# --------------------------------------------------------------------------------------------
# Checkpoint errors.


@pytest.mark.parametrize("damage, message", [
    ("drop", r"missing tensors: \['encoder.layer.1.output.dense.bias'\]"),
    ("reshape", r"encoder.layer.0.attention.self.key.weight has shape \[16, 15\], the config implies \[16, 16\]"),
    ("extra", r"unexpected tensors: \['cls.predictions.bias'\]"),
])
def test_load_names_the_bad_tensor(tmp_path, damage, message):
  tensors = tiny_tensors(TINY)
  if damage == "drop":
    del tensors["encoder.layer.1.output.dense.bias"]
  elif damage == "reshape":
    tensors["encoder.layer.0.attention.self.key.weight"] = tensors["encoder.layer.0.attention.self.key.weight"][:, :15]
  else:
    tensors["cls.predictions.bias"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=message):
    encoder_checkpoint.load_bert(write_checkpoint(tmp_path, TINY, tensors))


@pytest.mark.parametrize("override, message", [
    (dict(model_type="roberta"), "model_type='roberta'"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
    (dict(is_decoder=True), "is_decoder=True"),
])
def test_unsupported_configs_are_named(tmp_path, override, message):
  write_checkpoint(tmp_path, TINY, tiny_tensors(TINY, pooler=False))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **override}))
  with pytest.raises(ValueError, match=re.escape(message)):
    encoder_checkpoint.load_bert(tmp_path)


def test_missing_weights_package_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(encoder_checkpoint, "MINILM_PACKAGE", "kdjax_no_such_weights_package")
  with pytest.raises(ModuleNotFoundError, match=re.escape(encoder_checkpoint.MINILM_PIP)):
    encoder_checkpoint.minilm_l6_dir()


# --------------------------------------------------------------------------------------------
# The real model: tokenizer against vocab.txt, embeddings against sentence-transformers.


@pytest.fixture(scope="module")
def minilm_dir():
  pytest.importorskip(encoder_checkpoint.MINILM_PACKAGE, reason=encoder_checkpoint.MINILM_PIP)
  return encoder_checkpoint.minilm_l6_dir()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  from kdjax.data.wordpiece import WordPieceTokenizer
  return WordPieceTokenizer.from_dir(minilm_dir)


def reference_wordpiece(text, vocab):
  """BERT's basic tokenisation (ASCII text: lower-case, split on spaces and punctuation), then
  greedy longest-match-first WordPiece with '##' continuations."""
  ids = []
  for word in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()):
    start, pieces = 0, []
    while start < len(word):
      end = len(word)
      while end > start and (("##" if start else "") + word[start:end]) not in vocab:
        end -= 1
      if end == start:
        pieces = [vocab["[UNK]"]]
        break
      pieces.append(vocab[("##" if start else "") + word[start:end]])
      start = end
    ids += pieces
  return ids


def test_wordpiece_matches_vocab_txt(minilm_dir, tokenizer):
  lines = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
  vocab = {token: index for index, token in enumerate(lines)}
  assert tokenizer.vocab_size == len(lines)
  assert (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id) == tuple(
      vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"))
  texts = SHAKESPEARE + ["The KING zyxquorble 42!"]  # Upper case and a word spelt in pieces.
  batch = tokenizer.encode_batch(texts, max_len=40)
  for row, text in enumerate(texts):
    want = [vocab["[CLS]"]] + reference_wordpiece(text, vocab) + [vocab["[SEP]"]]
    n = len(want)
    np.testing.assert_array_equal(batch["input_ids"][row, :n], want, err_msg=text)
    assert np.all(batch["input_ids"][row, n:] == vocab["[PAD]"])
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(40) < n)
  assert not batch["token_type_ids"].any()
  assert all(v.dtype == np.int32 and v.shape == (len(texts), 40) for v in batch.values())
  assert batch["input_ids"][-1, 1] == vocab["the"] and batch["input_ids"][-1, 2] == vocab["king"]


def test_wordpiece_truncates_inside_cls_sep(tokenizer):
  batch = tokenizer.encode_batch([SHAKESPEARE[0], b"To be"], max_len=5)
  full = tokenizer.encode_batch([SHAKESPEARE[0]], max_len=40)["input_ids"][0]
  np.testing.assert_array_equal(batch["input_ids"][0], list(full[:4]) + [tokenizer.sep_id])
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
  with pytest.raises(ValueError, match="max_len"):
    tokenizer.encode_batch(["a"], max_len=1)
  with pytest.raises(ValueError, match="not one string"):
    tokenizer.encode_batch("To be", max_len=8)


@pytest.mark.torch_ref
def test_minilm_matches_sentence_transformers_and_bert_model(minilm_dir, tokenizer):
  torch = pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(2)
  reference = st.SentenceTransformer(str(minilm_dir), device="cpu")
  want = reference.encode(SHAKESPEARE, batch_size=len(SHAKESPEARE), convert_to_numpy=True)

  model, config = encoder_checkpoint.load_bert(minilm_dir)
  assert (config.layers, config.hidden, config.heads) == (6, 384, 12)
  batch = tokenizer.encode_batch(SHAKESPEARE, max_len=32)
  names = ["embeddings", "layer3/output", "layer3/attention_probs"]
  hidden, acts = forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], names)
  got = np.asarray(sentence_embedding(hidden, batch["attention_mask"]))
  # Same ids as sentence-transformers' own tokenisation (it pads to the longest row).
  theirs = reference.preprocess(SHAKESPEARE)["input_ids"].numpy()
  np.testing.assert_array_equal(batch["input_ids"][:, :theirs.shape[1]], theirs)
  assert not batch["attention_mask"][:, theirs.shape[1]:].any()

  cosine = np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
  print(f"MiniLM-L6 vs sentence-transformers: max abs diff {np.abs(got - want).max():.2e}, "
        f"min cosine 1 - {1 - cosine.min():.2e}")
  assert np.abs(got - want).max() < 1e-4
  assert cosine.min() > 0.9999

  bert = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
  with torch.no_grad():
    out = bert(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()},
               output_hidden_states=True, output_attentions=True)
  valid = batch["attention_mask"].astype(bool)  # Padded rows are meaningless on both sides.
  layer3 = out.hidden_states[4].numpy()  # hidden_states[0] is the embeddings, [i + 1] layer i.
  print(f"layer3/output max abs diff {np.abs(acts['layer3/output'] - layer3)[valid].max():.2e}")
  np.testing.assert_allclose(acts["embeddings"][valid], out.hidden_states[0].numpy()[valid], atol=1e-5)
  np.testing.assert_allclose(acts["layer3/output"][valid], layer3[valid], atol=1e-4)
  np.testing.assert_allclose(hidden[valid], out.last_hidden_state.numpy()[valid], atol=1e-4)
  probs, their_probs = acts["layer3/attention_probs"], out.attentions[3].numpy()
  rows = np.broadcast_to(valid[:, None, :, None], probs.shape)  # Real queries, every key.
  np.testing.assert_allclose(probs[rows], their_probs[rows], atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.pooled(jnp.asarray(hidden))), out.pooler_output.numpy(), atol=1e-4)
