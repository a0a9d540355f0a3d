"""Fake quantisation for QAT: quantiser values against NumPy level grids, the straight-through and
LSQ gradients, whole models against their float twins, and a 2-bit student that learns digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax.data import image_pipeline, image_sources
from kdjax.distill import representation
from kdjax.models import quantize as Q
from kdjax.models.vision import registry
from kdjax.train import sharding as sharding_lib, state as state_lib, step as step_lib


def _nearest_level(x, step, qmin, qmax):
  """The closest point of the grid step·{qmin, ..., qmax} to each value (argmin over the grid)."""
  grid = step * np.arange(qmin, qmax + 1, dtype=np.float64)
  x = np.asarray(x, np.float64)
  return grid[np.argmin(np.abs(x[..., None] - grid), axis=-1)]


def _rand(seed, *shape, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("qmin,qmax", [(-2, 1), (0, 3), (-128, 127), (0, 15)])
def test_fake_quantize_is_the_nearest_level_of_the_clipped_grid(qmin, qmax):
  x = _rand(0, 500, scale=3.0)
  step = 0.37
  np.testing.assert_allclose(Q.fake_quantize(jnp.asarray(x), step, qmin=qmin, qmax=qmax),
                             _nearest_level(x, step, qmin, qmax), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_are_quantised_per_output_channel(bits):
  w = _rand(1, 3, 3, 4, 6) * np.linspace(0.1, 5.0, 6, dtype=np.float32)  # HWIO, channels of different scales
  q = np.asarray(Q.quantize_weight(jnp.asarray(w), bits=bits))
  qmax = 2 ** (bits - 1) - 1
  for c in range(6):
    step = np.abs(w[..., c]).max() / qmax
    np.testing.assert_allclose(q[..., c], _nearest_level(w[..., c], step, -qmax, qmax), rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(q[..., c] / step))) <= 2 * qmax + 1
    assert np.abs(q[..., c]).max() == pytest.approx(np.abs(w[..., c]).max(), rel=1e-6)  # the channel max is a level
  if bits == 2:  # the narrow symmetric 2-bit range is ternary
    assert set(np.unique(np.sign(q).astype(int))) <= {-1, 0, 1}


def test_activation_ranges_are_unsigned_after_relu_and_signed_otherwise():
  x = jnp.asarray(_rand(2, 4, 50, scale=2.0))
  step = jnp.asarray(0.5)
  unsigned = np.asarray(Q.quantize_activation(x, step, jnp.asarray(0.0), bits=2))
  np.testing.assert_allclose(unsigned, _nearest_level(x, 0.5, 0, 3), atol=1e-6)
  signed = np.asarray(Q.quantize_activation(x, step, jnp.asarray(1.0), bits=2))
  np.testing.assert_allclose(signed, _nearest_level(x, 0.5, -2, 1), atol=1e-6)


def test_a_step_pushed_through_zero_acts_as_its_magnitude():
  """An SGD update can carry a small learned step below zero; the range must not flip (zeroing the layer)."""
  x = jnp.asarray(_rand(11, 4, 20))
  pos = Q.quantize_activation(x, jnp.asarray(0.3), jnp.asarray(1.0), bits=3)
  np.testing.assert_array_equal(Q.quantize_activation(x, jnp.asarray(-0.3), jnp.asarray(1.0), bits=3), pos)
  assert np.count_nonzero(np.asarray(pos)) > 40


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
  step, qmin, qmax = 0.25, -4, 3
  x = jnp.asarray(np.concatenate([_rand(3, 200, scale=1.5), [qmin * step, qmax * step]]).astype(np.float32))
  r = jnp.asarray(_rand(4, x.shape[0]))
  grad = jax.grad(lambda v: jnp.sum(Q.fake_quantize(v, step, qmin=qmin, qmax=qmax) * r))(x)
  u = np.asarray(x) / step
  inside = (u >= qmin) & (u <= qmax)
  assert inside.any() and (~inside).any()
  np.testing.assert_allclose(grad, np.where(inside, np.asarray(r), 0.0), rtol=1e-6)


def test_weight_gradient_passes_straight_through():
  """No weight is clipped by its channel's absmax step, the channel maxima included."""
  w = jnp.asarray(_rand(5, 3, 3, 2, 4))
  r = jnp.asarray(_rand(6, 3, 3, 2, 4))
  grad = jax.grad(lambda v: jnp.sum(Q.quantize_weight(v, bits=2) * r))(w)
  np.testing.assert_allclose(grad, r, rtol=1e-6)


def test_step_gradient_is_lsq_equation_three_times_the_gradient_scale():
  x = jnp.asarray(_rand(7, 8, 30, scale=2.0))
  bits, signed = 3, jnp.asarray(1.0)
  step = jnp.asarray(0.4)
  grad = jax.grad(lambda s: jnp.sum(Q.quantize_activation(x, s, signed, bits=bits)))(step)
  qn, qp = -4.0, 3.0
  v = np.asarray(x, np.float64) / 0.4
  per = np.where(v < qn, qn, np.where(v > qp, qp, np.round(v) - v))
  want = per.sum() / np.sqrt(30 * qp)
  assert float(grad) == pytest.approx(want, rel=1e-4)


def test_initial_step_is_lsq_clipped_to_the_batch_max():
  x = np.abs(_rand(8, 16, 40))
  for bits in (2, 8):
    qp = 2.0 ** bits - 1
    want = min(2 * x.mean() / np.sqrt(qp), x.max() / qp)
    got = Q.lsq_initial_step(jnp.asarray(x), jnp.asarray(0.0), bits=bits)
    assert float(got) == pytest.approx(want, rel=1e-5)


class _Tiny(nnx.Module):
  """conv1×1 → ReLU → conv1×1 → ReLU → mean → linear: each layer a matmul that NumPy can repeat."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (1, 1), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (1, 1), rngs=rngs)
    self.fc = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x, *, train=False):
    del train
    return self.fc(jnp.mean(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))), axis=(1, 2)))


def test_quantised_model_equals_a_numpy_forward_with_first_last_layers_at_their_own_width():
  x = _rand(9, 5, 4, 4, 3)
  model = _Tiny(nnx.Rngs(0))
  params = {name: (np.asarray(getattr(model, name).kernel[...], np.float64), np.asarray(getattr(model, name).bias[...]))
            for name in ("conv1", "conv2", "fc")}
  Q.quantize_model(model, Q.QuantSpec(bits_weights=2, bits_activations=3, first_last_bits=6), x)

  def q_weight(w, bits):
    qmax = 2 ** (bits - 1) - 1
    step = np.abs(w).reshape(-1, w.shape[-1]).max(0) / qmax
    return np.stack([_nearest_level(w[..., c], step[c], -qmax, qmax) for c in range(w.shape[-1])], -1)

  def q_input(v, calib, bits):
    signed = calib.min() < 0
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    step = min(2 * np.abs(calib).mean() / np.sqrt(qmax), np.abs(calib).max() / qmax)
    return _nearest_level(v, step, qmin, qmax)

  def layer(v, name, w_bits=None, a_bits=None, calib=None):
    w, b = params[name]
    if w_bits:
      v, w = q_input(v, calib, a_bits), q_weight(w.reshape(-1, w.shape[-1]), w_bits)
    return v @ w.reshape(-1, w.shape[-1]) + b

  x64 = x.astype(np.float64)
  # Calibration inputs are the float model's (the quantisers are off while it runs).
  h1f = np.maximum(layer(x64, "conv1"), 0)
  h2f = np.maximum(layer(h1f, "conv2"), 0).mean(axis=(1, 2))
  h1 = np.maximum(layer(x64, "conv1", 6, 6, x64), 0)
  h2 = np.maximum(layer(h1, "conv2", 2, 3, h1f), 0).mean(axis=(1, 2))
  want = layer(h2, "fc", 6, 6, h2f)
  np.testing.assert_allclose(model(jnp.asarray(x)), want, rtol=2e-4, atol=2e-5)
  assert float(model.conv1.quant_signed[...]) == 1.0 and float(model.conv2.quant_signed[...]) == 0.0


def _resnet(size=8, seed=0):
  return registry.vision_model("resnet8", num_classes=10, rngs=nnx.Rngs(seed), input_shape=(size, size, 1))


def _train_mode_logits(model, x):
  """The model's logits with BatchNorm on batch statistics (calibrated as it is used), jitted."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s: nnx.merge(graphdef, s)(x, train=True))(state)


def test_an_8_bit_model_is_close_to_its_float_twin_and_error_shrinks_with_bits():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 8, 8, 1))
  ref = _train_mode_logits(_resnet(), x)
  errors = {}
  for bits in (8, 16):
    y = _train_mode_logits(Q.quantize_model(_resnet(), Q.QuantSpec(bits, bits, bits), x), x)
    errors[bits] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  assert errors[16] < 1e-3 < errors[8] < 0.05, errors


def test_zero_bits_keep_the_layers_float():
  x = _rand(10, 5, 4, 4, 3)
  ref = _Tiny(nnx.Rngs(1))(jnp.asarray(x))
  same = Q.quantize_model(_Tiny(nnx.Rngs(1)), Q.QuantSpec(0, 0, 0), x)(jnp.asarray(x))
  np.testing.assert_array_equal(same, ref)


def test_calibration_leaves_batch_statistics_and_bad_specs_are_named():
  model = _resnet()
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  Q.quantize_model(model, Q.QuantSpec(4, 4), np.ones((4, 8, 8, 1), np.float32))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  with pytest.raises(ValueError, match="already quantised"):
    Q.quantize_model(model, Q.QuantSpec(4, 4), np.ones((4, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="bits_weights"):
    Q.QuantSpec(bits_weights=1)
  with pytest.raises(ValueError, match="unknown quantize keys"):
    Q.QuantSpec.from_config({"bits": 4})
  assert Q.QuantSpec.from_config({"bits_weights": 0, "bits_activations": 0}) is None


def test_a_2_bit_student_learns_digits(tmp_path_factory):
  """W2A2 (first and last layers at 8 bits) ResNet-8 trained by the distill step on real digits,
  built sharded under jit: far above chance and above its own untrained accuracy."""
  data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
  train_x, train_y = image_sources.load_image_split("digits", "train", data_dir=data_dir)
  test_x, test_y = image_sources.load_image_split("digits", "test", data_dir=data_dir)
  info = image_sources.dataset_info("digits")
  norm = lambda images: image_pipeline.normalize(images, info.mean, info.std)  # noqa: E731
  mesh = sharding_lib.make_mesh({"data": -1})
  spec = Q.QuantSpec(bits_weights=2, bits_activations=2)
  make = lambda: Q.quantize_model(registry.vision_model("resnet8", num_classes=10, rngs=nnx.Rngs(0),  # noqa: E731
                                                        input_shape=info.image_shape), spec, norm(train_x[:64]))
  graphdef, params, model_state = state_lib.create_sharded_model_with_state(make, mesh)
  assert "quant_step" in params["stem"] and "quant_signed" in model_state["stages"][0][0]["convs"][0]
  strategy = representation.RepresentationDistillation()
  optimizer = optax.sgd(optax.cosine_decay_schedule(0.05, 100), momentum=0.9)
  state = state_lib.create_train_state(params, optimizer, 0, mesh, strategy=strategy, model_state=model_state)
  step = step_lib.make_distill_step(state=state, teacher_params=None, mesh=mesh,
                                    student_forward=step_lib.classifier_forward(graphdef, train=True),
                                    teacher_forward=None, strategy=strategy, optimizer=optimizer)
  evaluate = jax.jit(lambda p, s, images: step_lib.classifier_forward(graphdef)((p, s), {"images": images})["logits"])
  def accuracy(st):
    return float(np.mean(np.argmax(evaluate(st.params, st.model_state, norm(test_x)), -1) == test_y))
  untrained = accuracy(state)
  rng = np.random.default_rng(0)
  first_step = float(state.params["stem"]["quant_step"][...])
  for _ in range(100):
    idx = rng.choice(len(train_y), 64, replace=False)
    batch = {"images": norm(train_x[idx]), "targets": train_y[idx], "mask": np.ones(64, np.float32)}
    state, _ = step(state, sharding_lib.shard_batch(batch, mesh), None)
  trained = accuracy(state)
  print(f"2-bit ResNet-8 test accuracy: untrained {untrained:.3f}, after 100 steps {trained:.3f}")
  assert trained > 0.6 and trained > untrained + 0.3, (untrained, trained)
  assert float(state.params["stem"]["quant_step"][...]) != first_step  # the LSQ steps are trained
