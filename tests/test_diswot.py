"""DisWOT's training-free teacher-student similarity: NumPy references and the properties its
normalisation promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.evaluate import diswot
from kdjax.models import capture
from kdjax.models.vision import registry

SHAPE = (8, 8, 1)


def _np_normalized_gram(x):
  """Pairwise dot products one pair at a time, normalised by sqrt(trace(G Gᵀ)) (= the Frobenius norm)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  n = len(x)
  g = np.array([[np.dot(x[i], x[j]) for j in range(n)] for i in range(n)])
  norm = np.sqrt(np.trace(g @ g.T))
  return g / norm if norm > 0 else g


def _np_distance(a, b):
  return np.linalg.norm(_np_normalized_gram(a) - _np_normalized_gram(b), "fro")


def _np_grad_cam(feature_map, weights):
  a, w = np.asarray(feature_map, np.float64), np.asarray(weights, np.float64)
  b, h, wd, c = a.shape
  out = np.zeros((w.shape[1], b, h, wd))
  for k in range(w.shape[1]):
    for i in range(b):
      out[k, i] = np.maximum(sum(w[i, k, ch] * a[i, :, :, ch] for ch in range(c)), 0.0)
  return out


def _np_semantic(cams_s, cams_t):
  return _np_distance(np.asarray(cams_s).reshape(len(cams_s), -1), np.asarray(cams_t).reshape(len(cams_t), -1))


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_gram_distances_match_numpy():
  s, t = _rand(0, 12, 3, 3, 5), _rand(1, 12, 2, 2, 7)
  np.testing.assert_allclose(diswot.normalized_gram(s.reshape(12, -1)), _np_normalized_gram(s), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(diswot.relation_distance(s, t), _np_distance(s, t), rtol=1e-5)
  cams_s, cams_t = np.abs(_rand(2, 4, 12, 3, 3)), np.abs(_rand(3, 4, 12, 2, 2))
  np.testing.assert_allclose(diswot.semantic_distance(cams_s, cams_t), _np_semantic(cams_s, cams_t), rtol=1e-5)


def test_grad_cam_maps_match_numpy():
  a, w = _rand(4, 3, 4, 4, 6), _rand(5, 3, 5, 6)
  np.testing.assert_allclose(diswot.grad_cam_maps(a, w), _np_grad_cam(a, w), rtol=1e-5, atol=1e-6)


def test_masked_examples_are_dropped_from_every_pair():
  """A mask equals scoring the kept sub-batch (the reference slices, the function zeroes rows)."""
  s, t = _rand(6, 10, 2, 2, 3), _rand(7, 10, 4)
  keep = np.arange(10) % 3 != 0
  np.testing.assert_allclose(diswot.relation_distance(s, t, where=keep), _np_distance(s[keep], t[keep]), rtol=1e-5)
  cams_s, cams_t = np.abs(_rand(8, 3, 10, 2, 2)), np.abs(_rand(9, 3, 10, 1, 1))
  np.testing.assert_allclose(diswot.semantic_distance(cams_s, cams_t, where=keep),
                             _np_semantic(cams_s[:, keep], cams_t[:, keep]), rtol=1e-5)
  none = np.zeros(10, bool)
  assert float(diswot.relation_distance(s, t, where=none)) == 0.0
  assert float(diswot.semantic_distance(cams_s, cams_t, where=none)) == 0.0


def test_identical_features_are_maximally_similar_and_distances_are_bounded():
  s, t = _rand(10, 16, 2, 2, 8), _rand(11, 16, 3, 3, 4)
  assert float(diswot.relation_distance(s, s)) == pytest.approx(0.0, abs=1e-6)
  d = float(diswot.relation_distance(s, t))
  assert 0.0 < d <= 2.0
  cams = np.abs(_rand(12, 5, 16, 2, 2))
  assert float(diswot.semantic_distance(cams, cams)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("factor", [1e-3, 0.5, 7.0])
def test_distances_do_not_change_when_a_model_scales_its_features(factor):
  """Frobenius normalisation removes any positive factor, and Grad-CAM maps scale with the map (the
  weights are gradients of a linear head, ReLU is positively homogeneous)."""
  s, t = _rand(13, 16, 2, 2, 8), _rand(14, 16, 2, 2, 4)
  np.testing.assert_allclose(diswot.relation_distance(factor * s, t), diswot.relation_distance(s, t), rtol=1e-4)
  ws, wt = _rand(15, 16, 10, 8), _rand(16, 16, 10, 4)
  base = diswot.semantic_distance(diswot.grad_cam_maps(s, ws), diswot.grad_cam_maps(t, wt))
  scaled = diswot.semantic_distance(diswot.grad_cam_maps(factor * s, ws), diswot.grad_cam_maps(t, factor * wt))
  np.testing.assert_allclose(scaled, base, rtol=1e-4)


def test_relation_is_invariant_to_permuting_the_batch():
  s, t = _rand(17, 9, 6), _rand(18, 9, 2, 2, 3)
  perm = np.random.default_rng(0).permutation(9)
  np.testing.assert_allclose(diswot.relation_distance(s[perm], t[perm]), diswot.relation_distance(s, t), rtol=1e-5)


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
    diswot.gram_distance(np.ones((4, 3)), np.ones((5, 3)))
  with pytest.raises(ValueError, match="same leading batch"):
    diswot.relation_distance(np.ones((4, 3)), np.ones((5, 3)))
  with pytest.raises(ValueError, match="same classes"):
    diswot.semantic_distance(np.ones((3, 4, 2)), np.ones((4, 4, 2)))
  with pytest.raises(ValueError, match="B=4"):
    diswot.relation_distance(np.ones((4, 3)), np.ones((4, 3)), where=np.ones(3, bool))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    diswot.grad_cam_maps(np.ones((2, 3, 3, 4)), np.ones((2, 10, 5)))


def _model(name, seed=0, num_classes=10):
  return registry.vision_model(name, num_classes=num_classes, rngs=nnx.Rngs(seed), input_shape=SHAPE)


def _images(seed=0, b=24):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, *SHAPE))


def test_a_student_identical_to_the_teacher_scores_best():
  teacher = _model("resnet8", seed=3)
  same = diswot.diswot_score(teacher, teacher, _images(), teacher_train=True, student_train=True)
  assert same["distance"] == pytest.approx(0.0, abs=1e-5) and same["score"] == pytest.approx(0.0, abs=1e-5)
  other = diswot.diswot_score(teacher, _model("resnet8", seed=4), _images(), teacher_train=True)
  assert other["distance"] > 1e-3 and other["score"] < same["score"]
  graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
  as_parts = diswot.diswot_score(teacher, (graphdef, params, rest), _images(), teacher_train=True)
  assert as_parts["distance"] == pytest.approx(0.0, abs=1e-5)


def test_model_grad_cam_equals_the_head_weights_on_the_pooled_map():
  """For a global-average-pooled map and a linear head, α_k^c = W[k, c] / HW: the reference reads
  the map from a capture and the kernel from the model, with no autodiff."""
  model = _model("resnet8", seed=1)
  images = _images(1, b=6)
  out = diswot.last_map_and_cams(model, images, train=False)
  assert out["map_name"] == "stage3"
  with capture.capture(["stage3"]) as acts:
    model(images, train=False)
  a = np.asarray(acts["stage3"])
  kernel = np.asarray(model.fc.kernel[...])  # [C, K]
  weights = np.broadcast_to(kernel.T / (a.shape[1] * a.shape[2]), (a.shape[0], *kernel.T.shape))
  np.testing.assert_allclose(out["cams"], _np_grad_cam(a, weights), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out["map"], a, rtol=1e-6)


def test_scaling_a_models_head_leaves_the_score_unchanged():
  teacher, student = _model("resnet8", seed=5), _model("wrn_16_1", seed=6)
  base = diswot.diswot_score(teacher, student, _images(2), teacher_train=True)
  assert base["student_map"] == "relu(stage3_preact)"  # WRN pools relu(bn(stage3))
  teacher.fc.kernel[...] = 3.0 * teacher.fc.kernel[...]
  scaled = diswot.diswot_score(teacher, student, _images(2), teacher_train=True)
  assert scaled["semantic"] == pytest.approx(base["semantic"], rel=1e-4)
  assert scaled["relation"] == pytest.approx(base["relation"], rel=1e-5)


class _UnrecordedMap(nnx.Module):
  """A convnet whose last map is never recorded, only its pooled feature."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 6, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(6, 10, rngs=rngs)

  def activation_names(self):
    return ["pre_logits"]

  def __call__(self, x, *, train=False):
    del train
    return self.fc(capture.record("pre_logits", jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2))))


def test_an_unrecorded_map_falls_back_to_the_pooled_feature():
  out = diswot.last_map_and_cams(_UnrecordedMap(nnx.Rngs(0)), _images(3, b=5), train=False)
  assert out["map_name"] == "pre_logits" and out["map"].shape == (5, 1, 1, 6) and out["cams"].shape == (10, 5, 1, 1)


def test_models_that_cannot_be_compared_are_named():
  with pytest.raises(ValueError, match="10 classes and student 7"):
    diswot.diswot_score(_model("resnet8"), _model("resnet8", num_classes=7), _images())

  class NoHead(nnx.Module):
    def __call__(self, x, *, train=False):
      return x
  with pytest.raises(ValueError, match="`fc` head"):
    diswot.last_map_and_cams(NoHead(), _images(), train=False)
