"""Vision models (`kdjax.models.vision`): sizes, shapes, BatchNorm modes, capture, DeiT's inference rule,
training, and (torch_ref) forward parity with a PyTorch restatement of the reference architectures.

Parameter counts are compared with published values: for the CIFAR-100 models those quoted in the
teacher / student tables of the CRD-benchmark papers that use RepDistiller's code (1% tolerance, the
published values having 2-3 digits), for DeiT the counts of the DeiT / timm model cards. Big models are
only built abstractly (`nnx.eval_shape`), never run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax.models import capture
from kdjax.models.vision import VISION_MODELS, activation_shapes, count_params, vision_model


@functools.lru_cache(maxsize=None)
def _abstract(name, num_classes, input_shape, overrides):
  return nnx.eval_shape(lambda: vision_model(name, num_classes=num_classes, rngs=nnx.Rngs(0),
                                             input_shape=input_shape, **dict(overrides)))


def abstract(name, *, num_classes, input_shape=(32, 32, 3), **overrides):
  """The model built abstractly (shapes only), cached: the count and the names tests share builds."""
  return _abstract(name, num_classes, tuple(input_shape), tuple(sorted(overrides.items())))


PUBLISHED_PARAMS = {  # name: (millions, num_classes, input_shape)
    "resnet8x4": (1.23, 100, (32, 32, 3)),
    "resnet32x4": (7.43, 100, (32, 32, 3)),
    "resnet20": (0.28, 100, (32, 32, 3)),
    "resnet56": (0.86, 100, (32, 32, 3)),
    "resnet110": (1.73, 100, (32, 32, 3)),
    "resnet50": (23.71, 100, (32, 32, 3)),
    "wrn_40_2": (2.26, 100, (32, 32, 3)),
    "wrn_16_2": (0.70, 100, (32, 32, 3)),
    "wrn_40_1": (0.57, 100, (32, 32, 3)),
    "mobilenetv2": (0.81, 100, (32, 32, 3)),
    "vgg13": (9.46, 100, (32, 32, 3)),
    "vgg8": (3.96, 100, (32, 32, 3)),
    "deit_tiny": (5.72, 1000, (224, 224, 3)),
    "deit_tiny_distilled": (5.91, 1000, (224, 224, 3)),
    "deit_small": (22.05, 1000, (224, 224, 3)),
    "deit_small_distilled": (22.44, 1000, (224, 224, 3)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_counts_match_published(name):
  millions, classes, shape = PUBLISHED_PARAMS[name]
  n = count_params(abstract(name, num_classes=classes, input_shape=shape))
  assert abs(n / (millions * 1e6) - 1) < 0.01, (name, n)


def test_resnet20_count_equals_layer_arithmetic():
  """A closed form of RepDistiller's resnet20: 3x3 stem, 3 stages of 3 basic blocks, 1x1 projections where
  the width changes, BN (scale + bias) after every conv, a linear head."""
  def conv(i, o, k=3):
    return k * k * i * o

  def bn(c):
    return 2 * c

  def block(i, o):
    projection = conv(i, o, 1) + bn(o) if i != o else 0
    return conv(i, o) + bn(o) + conv(o, o) + bn(o) + projection

  total = conv(3, 16) + bn(16)
  for i, o in ((16, 16), (16, 32), (32, 64)):
    total += block(i, o) + 2 * block(o, o)
  total += 64 * 100 + 100
  assert count_params(abstract("resnet20", num_classes=100)) == total


# Per-example activation shapes derived from each architecture's strides (not from a run).
def _cnn(stem, stages, pooled):
  out = {"stem": stem}
  for i, s in enumerate(stages, start=1):
    out[f"stage{i}_preact"] = out[f"stage{i}"] = s
  return {**out, "pre_logits": (pooled,)}


EXPECTED_SHAPES = {
    ("resnet8", (32, 32, 3)): _cnn((32, 32, 16), [(32, 32, 16), (16, 16, 32), (8, 8, 64)], 64),
    ("resnet8", (28, 28, 1)): _cnn((28, 28, 16), [(28, 28, 16), (14, 14, 32), (7, 7, 64)], 64),
    ("resnet8x4", (32, 32, 3)): _cnn((32, 32, 32), [(32, 32, 64), (16, 16, 128), (8, 8, 256)], 256),
    ("resnet50", (32, 32, 3)): _cnn((32, 32, 64), [(32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)], 2048),
    ("wrn_16_2", (32, 32, 3)): _cnn((32, 32, 16), [(32, 32, 32), (16, 16, 64), (8, 8, 128)], 128),
    ("wrn_16_2", (28, 28, 1)): _cnn((28, 28, 16), [(28, 28, 32), (14, 14, 64), (7, 7, 128)], 128),
    # W = 0.5: stages of int(24/2), int(32/2), int(96/2), int(320/2) channels, total strides 2, 4, 8, 16.
    ("mobilenetv2", (32, 32, 3)): _cnn((16, 16, 16), [(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], 1280),
    ("mobilenetv2", (28, 28, 1)): _cnn((14, 14, 16), [(14, 14, 12), (7, 7, 16), (4, 4, 48), (2, 2, 160)], 1280),
    ("vgg8", (32, 32, 3)): _cnn((32, 32, 64), [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], 512),
    ("vgg8", (28, 28, 1)): _cnn((28, 28, 64), [(14, 14, 128), (7, 7, 256), (3, 3, 512), (3, 3, 512)], 512),
    ("vgg8", (64, 64, 3)): _cnn((64, 64, 64), [(32, 32, 128), (16, 16, 256), (8, 8, 512), (4, 4, 512)], 512),
}


@pytest.mark.parametrize("name,shape", sorted(EXPECTED_SHAPES))
def test_cnn_activation_and_logit_shapes(name, shape):
  model = abstract(name, num_classes=10, input_shape=shape)
  shapes = activation_shapes(model, shape)
  assert shapes == EXPECTED_SHAPES[name, shape]
  assert list(shapes) == model.activation_names(), "names are listed in the order the forward records them"
  logits = nnx.eval_shape(lambda m: m(jnp.zeros((3, *shape))), model)
  assert logits.shape == (3, 10)


@pytest.mark.parametrize("name,tokens", [("vit", 49 + 1), ("deit", 49 + 2)])
def test_vit_activation_shapes_on_digits(name, tokens):
  model = abstract(name, num_classes=10, input_shape=(28, 28, 1), depth=2)
  shapes = activation_shapes(model, (28, 28, 1))
  assert list(shapes) == model.activation_names()
  assert shapes["patch_embed"] == (49, 64)
  for i in range(2):
    assert shapes[f"block{i}"] == (tokens, 64)
    assert shapes[f"block{i}/attention_probs"] == (4, tokens, tokens)
    for kind in ("queries", "keys", "values"):
      assert shapes[f"block{i}/{kind}"] == (tokens, 4, 16)
  assert shapes["pre_logits"] == (64,) and shapes["class_logits"] == (10,)
  assert ("distill_logits" in shapes) == (name == "deit")


def test_every_registered_model_reports_its_activations():
  """Catches a model whose activation_names() and records disagree."""
  for name in VISION_MODELS:
    classes, shape = (1000, (224, 224, 3)) if name.startswith("deit_") else (100, (32, 32, 3))
    model = abstract(name, num_classes=classes, input_shape=shape)
    assert list(activation_shapes(model, shape)) == model.activation_names(), name


def test_requesting_an_activation_the_model_never_records_is_an_error():
  with pytest.raises(ValueError, match="never recorded"):
    activation_shapes(abstract("vit", num_classes=5, input_shape=(8, 8, 1), depth=1), (8, 8, 1), ["distill_logits"])


# Concrete models for the tests that run: the abstract model's variables filled from NumPy. Drawing them with
# JAX would compile one initialiser per parameter shape (seconds per model on a loaded CPU); the values are
# random but not degenerate (BN scales and statistics away from 1 / 0), so every layer matters.
def random_model(name, input_shape, *, num_classes=10, seed=0, **overrides):
  graphdef, state = nnx.split(abstract(name, num_classes=num_classes, input_shape=input_shape, **overrides))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    kind, shape = path[-1].key, leaf.shape
    if kind == "kernel":  # HWIO or [in, out]: fan-in scaling keeps activations O(1) at any depth
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif kind in ("scale", "var"):
      value = 1.0 + 0.3 * rng.uniform(-1, 1, size=shape)
    else:  # biases, BN means, tokens, position embeddings
      value = 0.2 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def jit_forward(model):
  """`forward(x, train=False) -> (logits, every recorded activation, BatchNorm state after the call)`, one
  compilation per mode; the model's current parameters and statistics are read at each call."""
  graphdef = nnx.graphdef(model)

  @functools.partial(jax.jit, static_argnames="train")
  def run(state, x, train):
    m = nnx.merge(graphdef, state, copy=True)
    with capture.capture() as acts:
      logits = m(x, train=train)
    return logits, dict(acts), nnx.state(m, nnx.BatchStat)

  return lambda x, train=False: run(nnx.state(model), x, train)


def _images(key, b, shape):
  return jax.random.normal(jax.random.key(key), (b, *shape), jnp.float32)


@pytest.fixture(scope="module")
def resnet8():
  model = random_model("resnet8", (8, 8, 1))
  return model, jit_forward(model)


def test_batchnorm_train_uses_and_updates_batch_statistics_eval_uses_running_ones(resnet8):
  model, forward = resnet8
  x = _images(0, 6, (8, 8, 1)) * 3.0 + 1.0
  y = x.at[2:].set(_images(1, 4, (8, 8, 1)))  # same first two examples, different rest of the batch
  before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  eval_x, _, eval_stats = forward(x, train=False)
  eval_y, _, _ = forward(y, train=False)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(eval_stats), before)
  # Eval mode normalises with the running statistics: an example's logits ignore the rest of the batch.
  np.testing.assert_allclose(eval_x[:2], eval_y[:2], rtol=1e-5, atol=1e-6)
  train_x, acts, train_stats = forward(x, train=True)
  train_y, _, _ = forward(y, train=True)
  assert not np.allclose(train_x[:2], train_y[:2], atol=1e-3), "train mode normalises with the batch's statistics"
  after = nnx.to_pure_dict(train_stats)
  # Flax decay 0.9 == PyTorch momentum 0.1: running <- 0.9 running + 0.1 batch statistic.
  conv_out = np.asarray(model.stem(x), np.float64)
  np.testing.assert_allclose(after["stem_norm"]["mean"], 0.9 * before["stem_norm"]["mean"]
                             + 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(after["stem_norm"]["var"], 0.9 * before["stem_norm"]["var"]
                             + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
  assert acts["stem"].shape == (6, 8, 8, 16)
  nnx.update(model, train_stats)  # the model object takes the new statistics only when asked to
  np.testing.assert_allclose(nnx.state(model, nnx.BatchStat)["stem_norm"]["mean"][...], after["stem_norm"]["mean"])


def test_jit_of_the_module_equals_the_pure_forward(resnet8):
  model, forward = resnet8
  x = _images(5, 6, (8, 8, 1))
  logits, acts, _ = forward(x)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), logits, rtol=1e-5, atol=1e-6)
  assert sorted(acts) == sorted(model.activation_names())  # a jitted dict's keys come back sorted


@pytest.fixture(scope="module")
def deit():
  model = random_model("deit", (8, 8, 1), num_classes=4, depth=2, patch_size=2)
  return model, jit_forward(model)(_images(4, 3, (8, 8, 1)))


def test_capture_gives_every_listed_name_with_its_documented_shape(resnet8, deit):
  wrn = random_model("wrn_16_1", (8, 8, 1), num_classes=5)
  runs = [(resnet8[0], resnet8[1](_images(1, 2, (8, 8, 1)))), (wrn, jit_forward(wrn)(_images(1, 2, (8, 8, 1)))),
          (deit[0], deit[1])]
  for model, (logits, acts, _) in runs:
    b = logits.shape[0]
    assert {k: v.shape for k, v in acts.items()} == {k: (b, *s) for k, s in activation_shapes(model, (8, 8, 1)).items()}
  wrn_acts = runs[1][1][1]
  # WRN's preact features are the stage output after the BatchNorm that reads it next (eval mode here).
  np.testing.assert_allclose(acts_bn(wrn.stages[1][0].norm1, wrn_acts["stage1"]), wrn_acts["stage1_preact"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(acts_bn(wrn.final_norm, wrn_acts["stage3"]), wrn_acts["stage3_preact"], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.maximum(wrn_acts["stage3_preact"], 0).mean(axis=(1, 2)), wrn_acts["pre_logits"],
                             rtol=1e-5, atol=1e-6)


def acts_bn(norm, x):
  """NumPy eval-mode BatchNorm, (x - mean) / sqrt(var + eps) * scale + bias."""
  x = np.asarray(x, np.float64)
  return (x - norm.mean[...]) / np.sqrt(np.asarray(norm.var[...], np.float64) + 1e-5) * norm.scale[...] + norm.bias[...]


def test_attention_probs_are_the_softmax_of_the_recorded_queries_and_keys(deit):
  _, (_, acts, _) = deit
  for i in range(2):
    q = np.asarray(acts[f"block{i}/queries"], np.float64)
    k = np.asarray(acts[f"block{i}/keys"], np.float64)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    ref = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(acts[f"block{i}/attention_probs"], ref / ref.sum(-1, keepdims=True), rtol=1e-4,
                               atol=1e-6)


def test_deit_predicts_with_the_mean_of_its_two_heads(deit):
  _, (logits, acts, _) = deit
  assert not np.allclose(acts["class_logits"], acts["distill_logits"], atol=1e-2), "two separate heads"
  np.testing.assert_allclose(logits, (acts["class_logits"] + acts["distill_logits"]) / 2, rtol=1e-5, atol=1e-6)
  vit = random_model("vit", (8, 8, 1), num_classes=4, depth=1, patch_size=2)
  logits, acts, _ = jit_forward(vit)(_images(4, 3, (8, 8, 1)))
  assert "distill_logits" not in acts
  np.testing.assert_array_equal(logits, acts["class_logits"])


def test_a_few_sgd_steps_lower_the_loss():
  """resnet8 on 8x8 images whose class sets the sign of a fixed pattern; BatchNorm in train mode, its
  statistics threaded through the step. `merge(..., copy=True)`: the statistics enter from outside the
  gradient trace, and BatchNorm may only write Variables created in its own trace."""
  model = random_model("resnet8", (8, 8, 1), num_classes=2, seed=6)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  labels = jnp.arange(32) % 2
  pattern = jax.random.normal(jax.random.key(7), (8, 8, 1))
  images = (2 * labels - 1)[:, None, None, None] * pattern + 0.5 * _images(8, 32, (8, 8, 1))
  opt = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, stats, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(images, train=True), labels).mean()
      return loss, nnx.state(m, nnx.BatchStat)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for _ in range(12):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_initialisation_follows_the_reference():
  from kdjax.models.vision import layers
  rngs = nnx.Rngs(9)
  kernel = np.asarray(layers.conv(256, 256, 3, rngs=rngs).kernel[...])
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 256)), rtol=0.01)  # Kaiming normal, fan-out
  depthwise = np.asarray(layers.conv(480, 480, 3, groups=480, rngs=rngs).kernel[...])
  assert depthwise.shape == (3, 3, 1, 480)
  np.testing.assert_allclose(depthwise.std(), np.sqrt(2 / (9 * 480)), rtol=0.05)  # torch's fan-out: k * k * out
  bound = 1 / np.sqrt(256)  # torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias
  torch_head = layers.head(256, 100, init="torch", rngs=rngs)
  w, b = np.asarray(torch_head.kernel[...]), np.asarray(torch_head.bias[...])
  assert np.abs(w).max() <= bound and np.abs(b).max() <= bound and np.abs(b).max() > bound / 2
  np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.03)
  assert not np.any(np.asarray(layers.head(256, 100, init="torch_zero_bias", rngs=rngs).bias[...]))
  small = layers.head(1280, 100, init="small_normal", rngs=rngs)
  np.testing.assert_allclose(np.asarray(small.kernel[...]).std(), 0.01, rtol=0.02)
  assert not np.any(np.asarray(small.bias[...]))
  norm = layers.batch_norm(8, rngs=rngs)
  assert (norm.momentum, norm.epsilon) == (0.9, 1e-5)
  with pytest.raises(ValueError, match="unknown head init"):
    layers.head(4, 4, init="xavier", rngs=rngs)


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match="known models.*resnet8x4"):
    vision_model("resnet9", num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not take \\['depth'\\]"):
    vision_model("resnet8", num_classes=10, rngs=nnx.Rngs(0), depth=20)
  with pytest.raises(ValueError, match="input_shape"):
    vision_model("resnet8", num_classes=10, rngs=nnx.Rngs(0), input_shape=(32, 32))
  with pytest.raises(ValueError, match="patch_size 4 must divide"):
    vision_model("vit", num_classes=10, rngs=nnx.Rngs(0), input_shape=(30, 30, 1))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    vision_model("vit", num_classes=10, rngs=nnx.Rngs(0), num_heads=5)
  with pytest.raises(ValueError, match="6n \\+ 4"):
    vision_model("wrn_16_1", num_classes=10, rngs=nnx.Rngs(0), depth=18)
  with pytest.raises(ValueError, match="positive int"):
    vision_model("vgg8", num_classes=0, rngs=nnx.Rngs(0))
  model = abstract("resnet8", num_classes=10, input_shape=(8, 8, 1))
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\].*\(2, 8, 8, 3\)"):
    model(jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="for this ViT"):
    abstract("vit", num_classes=10, input_shape=(8, 8, 1), depth=1)(jnp.zeros((2, 16, 16, 1)))


# Parity with a PyTorch restatement of RepDistiller's / timm's forward passes (tests/vision_torch_reference.py),
# in train mode (batch statistics; running statistics updated) and, for one model, eval mode.

TORCH_CASES = [
    ("resnet8", "resnet_forward", True),
    ("resnet8x4", "resnet_forward", False),  # a projection shortcut at stride 1 in stage 1
    ("wrn_16_1", "wrn_forward", True),  # identity shortcut of the raw input in stage 1
    ("wrn_16_2", "wrn_forward", True),  # projections of the activated input
    ("mobilenetv2", "mobilenetv2_forward", True),
    ("vgg8", "vgg_forward", True),
]


def _assert_close(jax_value, torch_value, name):
  ours, ref = np.asarray(jax_value, np.float64), torch_value.detach().numpy()
  scale = max(np.abs(ref).max(), 1e-3)
  # float32 against float64; small batch statistics (12 values per channel at MobileNetV2's 2x2 end) amplify
  # rounding, while an architecture mismatch gives O(1) differences.
  np.testing.assert_allclose(ours / scale, ref / scale, atol=2e-4, err_msg=name)


@pytest.mark.torch_ref
@pytest.mark.parametrize("name,forward,train", TORCH_CASES)
def test_cnn_forward_matches_pytorch_reference(name, forward, train):
  torch = pytest.importorskip("torch")
  import vision_torch_reference as ref
  model = random_model(name, (32, 32, 3), seed=10)
  x = _images(10, 3, (32, 32, 3))
  params = ref.to_torch(nnx.to_pure_dict(nnx.state(model)))
  logits, acts, stats = jit_forward(model)(x, train=train)
  with torch.no_grad():
    torch_x = torch.tensor(np.asarray(x), dtype=torch.float64).permute(0, 3, 1, 2)
    torch_logits, feats = getattr(ref, forward)(params, torch_x, train)
  _assert_close(logits, torch_logits, "logits")
  for key, value in feats.items():
    _assert_close(acts[key], ref.nhwc(value) if value.ndim == 4 else value, key)
  if train:  # running means follow PyTorch's momentum; PyTorch's running variance is the unbiased one
    first = lambda tree: tree["blocks"][0]["norms"][0] if name.startswith("vgg") else (  # noqa: E731
        tree["stages"][0][0]["norm1"] if name.startswith("wrn") else tree["stem_norm"])
    start, ours, theirs = first(nnx.to_pure_dict(nnx.state(model))), first(nnx.to_pure_dict(stats)), first(params)
    np.testing.assert_allclose(ours["mean"], theirs["mean"].numpy(), rtol=1e-4, atol=1e-5)
    n = 3 * (16 if name == "mobilenetv2" else 32) ** 2  # values per channel (B * H * W) at that norm
    batch_var = (ours["var"] - 0.9 * start["var"]) / 0.1
    np.testing.assert_allclose(0.9 * start["var"] + 0.1 * batch_var * n / (n - 1), theirs["var"].numpy(), rtol=1e-4)


@pytest.mark.torch_ref
def test_deit_forward_matches_pytorch_reference(deit):
  torch = pytest.importorskip("torch")
  import vision_torch_reference as ref
  model, (logits, acts, _) = deit
  with torch.no_grad():
    torch_x = torch.tensor(np.asarray(_images(4, 3, (8, 8, 1))), dtype=torch.float64).permute(0, 3, 1, 2)
    torch_logits, feats = ref.deit_forward(ref.to_torch(nnx.to_pure_dict(nnx.state(model))), torch_x, num_heads=4)
  _assert_close(logits, torch_logits, "logits")
  for key, value in feats.items():
    _assert_close(acts[key], value, key)
