"""Parity of kdjax's logit divergences with published PyTorch implementations.

References, pinned by the `torch-ref` extra of setup.cfg:
  * TRL 1.16.0 `GKDTrainer.generalized_jsd_loss` (module `trl.experimental.gkd.gkd_trainer`:
    GKD moved to `trl.experimental` in TRL 1.x) and the chunked divergence behind the stable
    `trl.DistillationTrainer` (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`,
    `trl.trainer.distillation_trainer._chunked_divergence_loss`);
  * DistiLLM's `distillm/losses.py`, restated independently in `tests/torch_reference.py`.

Inputs are random float32 logits `[2, 7, 33]` with uneven label masks (-100 entries); values
are compared at atol 1e-5 and student gradients (torch autograd against `jax.grad`) at
atol 1e-6. The module skips when torch is not installed, and the TRL tests skip when TRL is
not installed; nothing here needs a network or a GPU.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import torch_reference as ref  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
from kdjax import losses  # noqa: E402

SHAPE = (2, 7, 33)
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 2.0]
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Shared inputs and helpers.


def _make_batch(seed, shape=SHAPE, scale=3.0):
  """Student and teacher float32 logits and int64 labels with an uneven -100 mask.

  Row 0 masks a 2-token prompt, row 1 masks a 1-token prompt and 3 padding tokens, so the two
  rows keep 5 and 3 positions: a per-row mean and a per-token mean differ.
  """
  rng = np.random.default_rng(seed)
  student = (scale * rng.standard_normal(shape)).astype(np.float32)
  teacher = (scale * rng.standard_normal(shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int64)
  labels[0, :2] = -100
  labels[1, :1] = -100
  labels[1, -3:] = -100
  return student, teacher, labels


def _t(x):
  return torch.from_numpy(np.array(x))


def _np(x):
  if isinstance(x, torch.Tensor):
    return x.detach().cpu().numpy()
  return np.asarray(x)


def _kdjax_masked_mean(fn, student, teacher, where, **kwargs):
  """Token mean of a kdjax per-position loss: Σ_kept value / #kept."""
  return losses.masked_mean(fn(student, teacher, where=where, **kwargs), where)


def _kdjax_value_and_grad(fn, student, teacher, where, **kwargs):
  """(masked token mean, its gradient w.r.t. the student logits) from jax.grad."""
  teacher = jnp.asarray(teacher)
  where = jnp.asarray(where)

  def objective(s):
    return _kdjax_masked_mean(fn, s, teacher, where, **kwargs)

  value, grad = jax.value_and_grad(objective)(jnp.asarray(student))
  return _np(value), _np(grad)


def _torch_value_and_grad(objective, student):
  """(objective(student), its gradient w.r.t. the student logits) from torch autograd."""
  s = _t(student).requires_grad_(True)
  value = objective(s)
  (grad,) = torch.autograd.grad(value, s)
  return _np(value), _np(grad)


# --------------------------------------------------------------------------------------------
# TRL.


@pytest.fixture(scope="module")
def gkd_loss():
  """TRL's `GKDTrainer.generalized_jsd_loss` (a staticmethod)."""
  pytest.importorskip("trl")
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  # A plain import: with trl==1.16.0 installed, a moved module must fail, not skip.
  from trl.experimental.gkd.gkd_trainer import GKDTrainer

  return GKDTrainer.generalized_jsd_loss


@pytest.fixture(scope="module")
def trl_chunked():
  """The chunked (never materialised) divergence of TRL's stable DistillationTrainer."""
  pytest.importorskip("trl")
  from trl.kernels import chunked_divergence
  from trl.trainer.distillation_trainer import _chunked_divergence_loss

  return chunked_divergence, _chunked_divergence_loss


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_trl_gkd_per_token_values(gkd_loss, beta, temperature):
  """TRL's element-wise JSD (reduction='none', no labels) summed over the vocabulary equals
  kdjax's per-position `generalized_jsd`, endpoints included (β=0: KL(p‖q), β=1: KL(q‖p))
  and without any T² factor on either side."""
  student, teacher, _ = _make_batch(0)
  elementwise = gkd_loss(_t(student), _t(teacher), labels=None, beta=beta,
                         temperature=temperature, reduction="none")
  assert tuple(elementwise.shape) == SHAPE
  trl_per_token = _np(elementwise.sum(dim=-1))
  ours = losses.generalized_jsd(student, teacher, beta=beta, temperature=temperature)
  assert ours.shape == SHAPE[:-1]
  np.testing.assert_allclose(_np(ours), trl_per_token, **VALUE_TOL)


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_trl_gkd_batchmean_with_labels_is_token_mean(gkd_loss, beta, temperature):
  """With labels, TRL's 'batchmean' is Σ over kept tokens and vocabulary / #kept tokens, i.e.
  kdjax's `masked_mean(generalized_jsd(..., where=mask), mask)`; its 'sum' is the plain sum of
  the per-token values; with `num_items_in_batch=N` it is that sum / N, which is kdjax's
  `masked_sum_count` total over a global count N (gradient accumulation)."""
  student, teacher, labels = _make_batch(1)
  where = labels != -100
  per_token = losses.generalized_jsd(student, teacher, beta=beta, temperature=temperature,
                                     where=where)
  total, count = losses.masked_sum_count(per_token, where)
  kwargs = dict(labels=_t(labels), beta=beta, temperature=temperature)

  batchmean = gkd_loss(_t(student), _t(teacher), reduction="batchmean", **kwargs)
  np.testing.assert_allclose(_np(losses.masked_mean(per_token, where)), _np(batchmean), **VALUE_TOL)

  summed = gkd_loss(_t(student), _t(teacher), reduction="sum", **kwargs)
  np.testing.assert_allclose(_np(total), _np(summed), **VALUE_TOL)

  global_count = int(count) + 5  # as if other micro-batches held 5 more kept tokens
  accumulated = gkd_loss(_t(student), _t(teacher), num_items_in_batch=global_count, **kwargs)
  np.testing.assert_allclose(_np(total) / global_count, _np(accumulated), **VALUE_TOL)


@pytest.mark.torch_ref
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_gkd_batchmean_without_labels_divides_by_sequences(gkd_loss, beta):
  """Without labels, TRL's 'batchmean' divides the total by the batch size B (number of
  sequences, `jsd.size(0)`), not by the B·L tokens, and 'mean' divides by B·L·V (every logit
  entry): neither is a token mean. Documented so kdjax strategies never copy it."""
  student, teacher, _ = _make_batch(2)
  per_token = _np(losses.generalized_jsd(student, teacher, beta=beta))
  batchmean = gkd_loss(_t(student), _t(teacher), beta=beta, reduction="batchmean")
  np.testing.assert_allclose(per_token.sum() / SHAPE[0], _np(batchmean), **VALUE_TOL)
  mean = gkd_loss(_t(student), _t(teacher), beta=beta, reduction="mean")
  np.testing.assert_allclose(per_token.sum() / np.prod(SHAPE), _np(mean), rtol=1e-5, atol=1e-7)


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_trl_gkd_student_gradients(gkd_loss, beta, temperature):
  """d(batchmean loss)/d(student logits): torch autograd through TRL equals jax.grad through
  kdjax's masked token mean (masked positions get exactly zero gradient on both sides)."""
  student, teacher, labels = _make_batch(3)
  where = labels != -100
  trl_value, trl_grad = _torch_value_and_grad(
      lambda s: gkd_loss(s, _t(teacher), labels=_t(labels), beta=beta, temperature=temperature),
      student)
  value, grad = _kdjax_value_and_grad(losses.generalized_jsd, student, teacher, where,
                                      beta=beta, temperature=temperature)
  np.testing.assert_allclose(value, trl_value, **VALUE_TOL)
  np.testing.assert_allclose(grad, trl_grad, **GRAD_TOL)
  assert np.all(grad[~where] == 0.0)


@pytest.mark.torch_ref
def test_trl_gkd_endpoints_are_special_cases(gkd_loss):
  """TRL special-cases the endpoints: β=0 returns forward KL(p‖q) and β=1 reverse KL(q‖p),
  although the interior formula tends to 0 at both ends (TRL's loss is discontinuous there).
  kdjax matches TRL for a Python β of exactly 0 or 1 and keeps the interior formula for a
  traced β (documented in `generalized_jsd`)."""
  student, teacher, labels = _make_batch(4)
  where = labels != -100
  s, t, lab = _t(student), _t(teacher), _t(labels)
  fkl = _np(_kdjax_masked_mean(losses.forward_kl, student, teacher, where))
  rkl = _np(_kdjax_masked_mean(losses.reverse_kl, student, teacher, where))
  np.testing.assert_allclose(fkl, _np(gkd_loss(s, t, labels=lab, beta=0.0)), **VALUE_TOL)
  np.testing.assert_allclose(rkl, _np(gkd_loss(s, t, labels=lab, beta=1.0)), **VALUE_TOL)
  np.testing.assert_allclose(
      fkl, _np(_kdjax_masked_mean(losses.generalized_jsd, student, teacher, where, beta=0.0)),
      **VALUE_TOL)
  np.testing.assert_allclose(
      rkl, _np(_kdjax_masked_mean(losses.generalized_jsd, student, teacher, where, beta=1.0)),
      **VALUE_TOL)

  # Just inside the interval both implementations follow the interior formula, which is ~β·KL.
  eps = 1e-6
  near_zero = float(_np(gkd_loss(s, t, labels=lab, beta=eps)))
  near_one = float(_np(gkd_loss(s, t, labels=lab, beta=1.0 - eps)))
  assert near_zero < 1e-4 * fkl and near_one < 1e-4 * rkl
  ours_near_zero = _kdjax_masked_mean(losses.generalized_jsd, student, teacher, where, beta=eps)
  np.testing.assert_allclose(_np(ours_near_zero), near_zero, rtol=1e-3, atol=1e-7)

  # A traced β never takes the special case.
  traced = jax.jit(lambda b: _kdjax_masked_mean(losses.generalized_jsd, student, teacher, where,
                                                beta=b))
  assert abs(float(traced(0.0))) < 1e-6 and abs(float(traced(1.0))) < 1e-6


@pytest.mark.torch_ref
def test_trl_gkd_vocab_padding(gkd_loss):
  """Padded vocabulary ids marked by −inf logits in both models: TRL's loss is NaN
  (F.kl_div computes 0·(−inf − (−inf))), kdjax's equals TRL's on the vocabulary with the
  padded ids sliced off, with finite gradients that are 0 on the padded ids."""
  student, teacher, labels = _make_batch(5)
  where = labels != -100
  pad = np.full(SHAPE[:-1] + (7,), -np.inf, np.float32)
  student_padded = np.concatenate([student, pad], axis=-1)
  teacher_padded = np.concatenate([teacher, pad], axis=-1)
  padded_trl = gkd_loss(_t(student_padded), _t(teacher_padded), labels=_t(labels), beta=0.5)
  assert np.isnan(_np(padded_trl))
  for beta in (0.0, 0.5, 1.0):
    trl_value, trl_grad = _torch_value_and_grad(
        lambda s: gkd_loss(s, _t(teacher), labels=_t(labels), beta=beta), student)
    value, grad = _kdjax_value_and_grad(losses.generalized_jsd, student_padded, teacher_padded,
                                        where, beta=beta)
    np.testing.assert_allclose(value, trl_value, **VALUE_TOL)
    np.testing.assert_allclose(grad[..., :SHAPE[-1]], trl_grad, **GRAD_TOL)
    assert np.all(grad[..., SHAPE[-1]:] == 0.0)


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_trl_chunked_divergence(trl_chunked, monkeypatch, beta, temperature):
  """TRL's stable DistillationTrainer path (`_chunked_divergence_loss` over hidden states and
  lm-heads, via `ChunkedDivergenceFunction`), with identity lm-heads so that hidden states
  are the logits, and tiles shrunk to 5 tokens × 8 vocabulary entries so its online softmax
  runs over several tiles. Its per-token divergence equals kdjax's `generalized_jsd` (same
  endpoint convention and mixture), its loss (Σ kept / #kept) the masked token mean, and its
  gradient w.r.t. the student hidden states (= logits) kdjax's jax.grad."""
  chunked_divergence, chunked_loss = trl_chunked
  monkeypatch.setattr(chunked_divergence, "TOKEN_CHUNK_SIZE", 5)
  monkeypatch.setattr(chunked_divergence, "VOCAB_CHUNK_SIZE", 8)
  student, teacher, labels = _make_batch(6)
  where = labels != -100
  eye = torch.eye(SHAPE[-1])
  flat = (-1, SHAPE[-1])

  per_token, _ = chunked_divergence.ChunkedDivergenceFunction.apply(
      _t(student).reshape(flat), eye, None, _t(teacher).reshape(flat), eye, None, beta,
      temperature)
  ours = losses.generalized_jsd(student, teacher, beta=beta, temperature=temperature)
  np.testing.assert_allclose(_np(ours).reshape(-1), _np(per_token), **VALUE_TOL)

  def trl_objective(s):
    loss, _, n_valid = chunked_loss(s, _t(teacher), eye, eye, _t(where.astype(np.int64)), beta,
                                    temperature=temperature)
    assert int(n_valid) == int(where.sum())
    return loss

  trl_value, trl_grad = _torch_value_and_grad(trl_objective, student)
  value, grad = _kdjax_value_and_grad(losses.generalized_jsd, student, teacher, where, beta=beta,
                                      temperature=temperature)
  np.testing.assert_allclose(value, trl_value, **VALUE_TOL)
  np.testing.assert_allclose(grad, trl_grad, **GRAD_TOL)


# --------------------------------------------------------------------------------------------
# DistiLLM (independent restatement in tests/torch_reference.py).


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_distillm_skewed_forward_kl(alpha, temperature):
  """DistiLLM's `skewed_forward_kl(lam=α)` is the cross-entropy −Σ p·log(α·p + (1−α)·q)
  averaged over kept tokens. It equals kdjax's `skew_kl(alpha=α)` (the divergence
  KL(p ‖ α·p + (1−α)·q)) plus the teacher entropy H(p), per token and after the masked mean:

      distillm_skewed_forward_kl = masked_mean(skew_kl + H(p)).

  H(p) does not depend on the student, so the student gradients are equal exactly."""
  student, teacher, labels = _make_batch(7)
  where = labels != -100
  entropy = _np(ref.teacher_entropy(_t(teacher), temperature=temperature))

  ref_per_token = _np(ref.skewed_forward_kl(_t(student), _t(teacher), _t(labels), lam=alpha,
                                            temperature=temperature, per_position=True))
  ours = _np(losses.skew_kl(student, teacher, alpha=alpha, temperature=temperature))
  np.testing.assert_allclose(ours + entropy, ref_per_token, **VALUE_TOL)

  ref_value, ref_grad = _torch_value_and_grad(
      lambda s: ref.skewed_forward_kl(s, _t(teacher), _t(labels), lam=alpha,
                                      temperature=temperature), student)
  value, grad = _kdjax_value_and_grad(losses.skew_kl, student, teacher, where, alpha=alpha,
                                      temperature=temperature)
  mean_entropy = entropy[where].mean()
  np.testing.assert_allclose(value + mean_entropy, ref_value, **VALUE_TOL)
  np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_distillm_skewed_reverse_kl(alpha, temperature):
  """DistiLLM's `skewed_reverse_kl(lam=α)` is already a divergence,
  Σ q·(log q − log((1−α)·p + α·q)) = KL(q ‖ (1−α)·p + α·q), averaged over kept tokens: it
  equals kdjax's `skew_reverse_kl(alpha=α)` masked mean with no correction, values and
  student gradients (the student enters both sides of the KL; neither side detaches it)."""
  student, teacher, labels = _make_batch(8)
  where = labels != -100
  ref_per_token = _np(ref.skewed_reverse_kl(_t(student), _t(teacher), _t(labels), lam=alpha,
                                            temperature=temperature, per_position=True))
  ours = _np(losses.skew_reverse_kl(student, teacher, alpha=alpha, temperature=temperature))
  np.testing.assert_allclose(ours, ref_per_token, **VALUE_TOL)

  ref_value, ref_grad = _torch_value_and_grad(
      lambda s: ref.skewed_reverse_kl(s, _t(teacher), _t(labels), lam=alpha,
                                      temperature=temperature), student)
  value, grad = _kdjax_value_and_grad(losses.skew_reverse_kl, student, teacher, where,
                                      alpha=alpha, temperature=temperature)
  np.testing.assert_allclose(value, ref_value, **VALUE_TOL)
  np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


@pytest.mark.torch_ref
def test_distillm_plain_kl_and_tvd():
  """DistiLLM's `forward_kl` is the cross-entropy −Σ p·log q = kdjax `forward_kl` + H(p);
  its `reverse_kl` is KL(q‖p) = kdjax `reverse_kl`; its `tv_distance` is ½Σ|p−q| = kdjax
  `total_variation`. Values per token and masked means; student gradients equal."""
  student, teacher, labels = _make_batch(9)
  where = labels != -100
  s, t, lab = _t(student), _t(teacher), _t(labels)
  entropy = _np(ref.teacher_entropy(t))
  cases = [
      (ref.forward_kl, losses.forward_kl, entropy),
      (ref.reverse_kl, losses.reverse_kl, 0.0),
      (ref.tv_distance, losses.total_variation, 0.0),
  ]
  for ref_fn, our_fn, offset in cases:
    np.testing.assert_allclose(_np(our_fn(student, teacher)) + offset,
                               _np(ref_fn(s, t, lab, per_position=True)), **VALUE_TOL)
    ref_value, ref_grad = _torch_value_and_grad(lambda x: ref_fn(x, t, lab), student)
    value, grad = _kdjax_value_and_grad(our_fn, student, teacher, where)
    np.testing.assert_allclose(value + np.mean(np.broadcast_to(offset, where.shape)[where]),
                               ref_value, **VALUE_TOL)
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


@pytest.mark.torch_ref
@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_distillm_js_distance_is_generalized_jsd(lam):
  """DistiLLM's `js_distance(lam=λ)`, λ·KL(q‖m) + (1−λ)·KL(p‖m) with m = (1−λ)·p + λ·q, is
  GKD's generalized JSD with teacher weight β = 1 − λ (DistiLLM's default λ = 0.9 is β = 0.1)."""
  student, teacher, labels = _make_batch(10)
  where = labels != -100
  beta = 1.0 - lam
  ref_value, ref_grad = _torch_value_and_grad(
      lambda s: ref.js_distance(s, _t(teacher), _t(labels), lam=lam), student)
  value, grad = _kdjax_value_and_grad(losses.generalized_jsd, student, teacher, where, beta=beta)
  np.testing.assert_allclose(value, ref_value, **VALUE_TOL)
  np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL)


@pytest.mark.torch_ref
def test_distillm_vocab_padding():
  """Padded vocabulary ids with −inf logits in both models. DistiLLM drops them from the
  vocabulary sums (its `inf_mask`), so its values are finite and equal kdjax's; but its
  mixtures are logged in probability space and masked after the product, so 0·log 0 puts
  NaN in the student gradient of every loss with a log of a zero probability (skewed forward
  and reverse KL, reverse KL, JSD). kdjax's gradients stay finite: they equal DistiLLM's on the
  vocabulary with the padded ids sliced off, and are 0 on the padded ids."""
  student, teacher, labels = _make_batch(11)
  where = labels != -100
  real = SHAPE[-1]
  pad = np.full(SHAPE[:-1] + (7,), -np.inf, np.float32)
  student_padded = np.concatenate([student, pad], axis=-1)
  teacher_padded = np.concatenate([teacher, pad], axis=-1)
  lab = _t(labels)
  cases = [
      (ref.skewed_forward_kl, losses.skew_kl, dict(lam=0.1), dict(alpha=0.1), True),
      (ref.skewed_reverse_kl, losses.skew_reverse_kl, dict(lam=0.1), dict(alpha=0.1), False),
  ]
  for ref_fn, our_fn, ref_kwargs, our_kwargs, cross_entropy_form in cases:
    padded_value, padded_grad = _torch_value_and_grad(
        lambda x: ref_fn(x, _t(teacher_padded), lab, **ref_kwargs), student_padded)
    assert np.isfinite(padded_value) and np.isnan(padded_grad).any()
    ref_value, ref_grad = _torch_value_and_grad(
        lambda x: ref_fn(x, _t(teacher), lab, **ref_kwargs), student)
    np.testing.assert_allclose(padded_value, ref_value, **VALUE_TOL)

    value, grad = _kdjax_value_and_grad(our_fn, student_padded, teacher_padded, where,
                                        **our_kwargs)
    if cross_entropy_form:
      value = value + _np(ref.teacher_entropy(_t(teacher)))[where].mean()
    np.testing.assert_allclose(value, ref_value, **VALUE_TOL)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[..., :real], ref_grad, **GRAD_TOL)
    assert np.all(grad[..., real:] == 0.0)
