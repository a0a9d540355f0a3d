"""Parity of kdjax's logit divergences with published PyTorch implementations.

References, pinned by the `torch-ref` extra of setup.cfg:
  * TRL 1.16.0 `GKDTrainer.generalized_jsd_loss` (module `trl.experimental.gkd.gkd_trainer`:
    GKD moved to `trl.experimental` in TRL 1.x) and the chunked divergence behind the stable
    `trl.DistillationTrainer` (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`,
    `trl.trainer.distillation_trainer._chunked_divergence_loss`);
  * DistiLLM's `distillm/losses.py`, restated independently in `tests/torch_reference.py`;
  * Liger-Kernel 0.8.5's chunked fused-linear JSD loss
    (`liger_kernel.chunked_loss.jsd_loss.LigerFusedLinearJSDLoss`, run with `compiled=False`:
    pure torch on CPU; liger-kernel is installed with --no-deps, without Triton), which takes
    hidden states and lm-heads and adds a hard-label CE to the JSD.

Inputs are random float32 logits `[2, 7, 33]` with uneven label masks (-100 entries); values
are compared at atol 1e-5 and student gradients (torch autograd against `jax.grad`) at
atol 1e-6. The Liger tests use hidden states `[2, 7, 16]` (teacher `[2, 7, 24]`) and lm-heads
`[33, 16]` (teacher `[33, 24]`) with the same masks, form the logits h·Wᵀ in JAX, and compare
gradients w.r.t. the student hidden states and lm-head at rtol 1e-5 with an absolute floor of
1e-5 × their largest entry. The module skips when torch is not installed, and the TRL and
Liger tests skip when TRL or liger-kernel is not installed; nothing here needs a network or a
GPU.
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


# --------------------------------------------------------------------------------------------
# Liger-Kernel: the chunked fused-linear JSD loss (pure torch, run uncompiled on CPU).
#
# `LigerFusedLinearJSDLoss(weight_hard_loss=w_h, weight_soft_loss=w_s, beta=β, temperature=T)`
# takes hidden states and lm-heads, never logits. Read from its source (liger-kernel 0.8.5,
# `chunked_loss/jsd_loss.py` and `chunked_loss/fused_linear_distillation.py`), it computes
#
#   z_s = h_s · W_sᵀ,  z_t = h_t · W_tᵀ          (teacher under no_grad; no bias here)
#   K   = #{i : y_i ≠ −100}, clamped to ≥ 1      (over the FULL label tensor, not per chunk)
#   hard = (1/K) Σ_{i kept} −log softmax(z_s,i)[y_i]                 (at T = 1, not tempered)
#   soft = (1/K) Σ_{i kept} JSD_β(p_i, q_i),  p = softmax(z_t / T),  q = softmax(z_s / T)
#   loss = w_h · hard + w_s · soft                                    (no T² factor anywhere)
#
#   JSD_β(p, q) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m),  m = β·p + (1 − β)·q  (mixture in log space)
#   β = 0: F.kl_div(log q, log p) = KL(p ‖ q), forward KL;  β = 1: KL(q ‖ p), reverse KL
#
# Each chunk of `chunk_size` tokens divides its sums by the global K before the chunks are
# added, so the loss is a token mean over the whole batch whatever the chunking, and the CE is
# skipped (not computed) when w_h = 0. Its student gradients are computed inside the forward
# (torch.func per chunk) and returned by `backward`; the teacher gets none. In kdjax terms:
#
#   loss = w_h · masked_mean(cross_entropy(z_s, y, where=m), m)
#        + w_s · masked_mean(generalized_jsd(z_s, z_t, beta=β, temperature=T, where=m), m)
#
# with m = (y ≠ −100); kdjax's `safe_mean` divides by max(count, 1) as Liger's clamp does.

LIGER_TOKENS = (2, 7)  # flattened to the [14] token axis Liger takes
LIGER_HIDDEN, LIGER_TEACHER_HIDDEN, LIGER_VOCAB = 16, 24, SHAPE[-1]
# torch.chunk(14 tokens, 14 // 4 = 3 chunks) makes chunks of 5, 5 and 4 tokens: the first two
# straddle the boundary between the two sequences and hold different numbers of kept tokens.
LIGER_CHUNK_SIZE = 4
LIGER_WEIGHTS = [(0.3, 0.7), (0.0, 1.0)]  # (weight_hard_loss, weight_soft_loss)


def _make_hidden_batch(seed, teacher_vocab=LIGER_VOCAB):
  """Student/teacher float32 hidden states `[2, 7, H]` and lm-heads `[V, H]`, int64 labels.

  The lm-heads are scaled so that the logits have a standard deviation of about 3, like
  `_make_batch`'s, and the labels carry the same uneven mask (5 and 3 kept positions).
  """
  rng = np.random.default_rng(seed)

  def normal(shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  h, ht = LIGER_HIDDEN, LIGER_TEACHER_HIDDEN
  return dict(
      student_input=normal(LIGER_TOKENS + (h,)),
      student_weight=normal((LIGER_VOCAB, h), 3.0 / np.sqrt(h)),
      teacher_input=normal(LIGER_TOKENS + (ht,)),
      teacher_weight=normal((teacher_vocab, ht), 3.0 / np.sqrt(ht)),
      labels=_make_batch(seed, shape=LIGER_TOKENS + (LIGER_VOCAB,))[2],
  )


@pytest.fixture(scope="module")
def liger_jsd():
  """Liger-Kernel's `LigerFusedLinearJSDLoss` class (constructed per test: β, T and the
  weights are constructor arguments)."""
  pytest.importorskip("liger_kernel")
  # A plain import: with liger-kernel installed, a moved module must fail, not skip.
  from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

  return LigerFusedLinearJSDLoss


def _liger_value_and_grads(liger_cls, batch, **kwargs):
  """Liger's loss (a tuple (loss, soft, hard) with `return_soft_hard_loss=True`) on the
  flattened batch, and its gradients w.r.t. the student hidden states (reshaped back to
  `[2, 7, H]`) and the student lm-head, from `loss.backward()`."""
  loss_fn = liger_cls(compiled=False, **kwargs)
  student_input = _t(batch["student_input"]).reshape(-1, LIGER_HIDDEN).requires_grad_(True)
  student_weight = _t(batch["student_weight"]).requires_grad_(True)
  teacher_input = _t(batch["teacher_input"]).reshape(-1, LIGER_TEACHER_HIDDEN).requires_grad_(True)
  out = loss_fn(student_input, student_weight, teacher_input, _t(batch["teacher_weight"]),
                _t(batch["labels"]).reshape(-1))
  loss = out[0] if isinstance(out, tuple) else out
  loss.backward()
  assert teacher_input.grad is None  # Liger never differentiates through the teacher
  values = tuple(_np(v) for v in out) if isinstance(out, tuple) else _np(out)
  grad_input = _np(student_input.grad).reshape(batch["student_input"].shape)
  return values, grad_input, _np(student_weight.grad)


def _kdjax_fused_value_and_grads(soft_fn, batch, *, weight_hard, weight_soft, **soft_kwargs):
  """kdjax's composition of Liger's loss (formula above) on logits h·Wᵀ formed in JAX; returns
  ((loss, soft, hard), d loss/d student hidden states, d loss/d student lm-head)."""
  labels = jnp.asarray(batch["labels"])
  where = labels != -100
  teacher_logits = jnp.asarray(batch["teacher_input"]) @ jnp.asarray(batch["teacher_weight"]).T

  def objective(student_input, student_weight):
    student_logits = student_input @ student_weight.T
    # Liger's hard loss is the CE of the untempered logits; only the soft term sees T.
    hard = losses.masked_mean(losses.cross_entropy(student_logits, labels, where=where), where)
    soft = losses.masked_mean(
        soft_fn(student_logits, teacher_logits, where=where, **soft_kwargs), where)
    return weight_hard * hard + weight_soft * soft, (soft, hard)

  (value, (soft, hard)), (grad_input, grad_weight) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True)(jnp.asarray(batch["student_input"]),
                                               jnp.asarray(batch["student_weight"]))
  return (_np(value), _np(soft), _np(hard)), _np(grad_input), _np(grad_weight)


def _assert_grads_close(ours, reference):
  """rtol 1e-5, with an absolute floor of 1e-5 × the largest reference entry (hidden-state and
  lm-head gradients sum over tokens and vocabulary, so tiny entries carry absolute error)."""
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.torch_ref
@pytest.mark.parametrize("weights", LIGER_WEIGHTS, ids=["hard0.3_soft0.7", "soft_only"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_liger_fused_linear_jsd(liger_jsd, beta, temperature, weights):
  """Liger's chunked loss over 3 uneven chunks (hard CE + soft JSD(β) at T, both divided by
  the batch's kept-token count) equals kdjax's `cross_entropy` / `generalized_jsd` masked
  token means weighted alike, endpoints included; so do the gradients w.r.t. the student
  hidden states and lm-head (torch autograd through Liger against jax.grad through h·Wᵀ).
  With w_h = 0 Liger skips the CE altogether and the soft term alone must match."""
  weight_hard, weight_soft = weights
  batch = _make_hidden_batch(20)
  liger_value, liger_grad_input, liger_grad_weight = _liger_value_and_grads(
      liger_jsd, batch, weight_hard_loss=weight_hard, weight_soft_loss=weight_soft, beta=beta,
      temperature=temperature, chunk_size=LIGER_CHUNK_SIZE)
  (value, _, _), grad_input, grad_weight = _kdjax_fused_value_and_grads(
      losses.generalized_jsd, batch, weight_hard=weight_hard, weight_soft=weight_soft, beta=beta,
      temperature=temperature)
  np.testing.assert_allclose(value, liger_value, **VALUE_TOL)
  _assert_grads_close(grad_input, liger_grad_input)
  _assert_grads_close(grad_weight, liger_grad_weight)
  # Masked tokens get no gradient on either side.
  where = batch["labels"] != -100
  assert np.all(grad_input[~where] == 0.0) and np.all(liger_grad_input[~where] == 0.0)


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_liger_soft_and_hard_parts(liger_jsd, temperature):
  """With `return_soft_hard_loss=True` and the default chunk size (one chunk), Liger's two
  parts are kdjax's masked token means: the soft part is `generalized_jsd` at T (no T²), the
  hard part is `cross_entropy` at T = 1 whatever the temperature (Liger computes its CE before
  dividing the logits by T), and the loss is their weighted sum."""
  batch = _make_hidden_batch(21)
  (liger_loss, liger_soft, liger_hard), liger_grad_input, liger_grad_weight = (
      _liger_value_and_grads(liger_jsd, batch, weight_hard_loss=0.3, weight_soft_loss=0.7,
                             beta=0.5, temperature=temperature, return_soft_hard_loss=True))
  (loss, soft, hard), grad_input, grad_weight = _kdjax_fused_value_and_grads(
      losses.generalized_jsd, batch, weight_hard=0.3, weight_soft=0.7, beta=0.5,
      temperature=temperature)
  np.testing.assert_allclose(soft, liger_soft, **VALUE_TOL)
  np.testing.assert_allclose(hard, liger_hard, **VALUE_TOL)
  np.testing.assert_allclose(loss, liger_loss, **VALUE_TOL)
  _assert_grads_close(grad_input, liger_grad_input)
  _assert_grads_close(grad_weight, liger_grad_weight)


@pytest.mark.torch_ref
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_liger_endpoints_are_forward_and_reverse_kl(liger_jsd, temperature):
  """Liger special-cases the endpoints as TRL does: β = 0 is `F.kl_div(log q, log p)`, i.e.
  forward KL(p_teacher ‖ q_student), kdjax's `forward_kl`; β = 1 is reverse KL(q ‖ p), kdjax's
  `reverse_kl`. Values and student gradients, soft term only, over 3 chunks."""
  batch = _make_hidden_batch(22)
  for beta, kl_fn in ((0.0, losses.forward_kl), (1.0, losses.reverse_kl)):
    liger_value, liger_grad_input, liger_grad_weight = _liger_value_and_grads(
        liger_jsd, batch, weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
        temperature=temperature, chunk_size=LIGER_CHUNK_SIZE)
    (value, _, _), grad_input, grad_weight = _kdjax_fused_value_and_grads(
        kl_fn, batch, weight_hard=0.0, weight_soft=1.0, temperature=temperature)
    np.testing.assert_allclose(value, liger_value, **VALUE_TOL)
    _assert_grads_close(grad_input, liger_grad_input)
    _assert_grads_close(grad_weight, liger_grad_weight)


@pytest.mark.torch_ref
def test_liger_all_masked_is_zero(liger_jsd):
  """Every label −100: Liger clamps its token count to 1 and kdjax's `masked_mean` divides by
  max(count, 1), so both losses and all their student gradients are exactly 0."""
  batch = _make_hidden_batch(23)
  batch["labels"] = np.full_like(batch["labels"], -100)
  liger_value, liger_grad_input, liger_grad_weight = _liger_value_and_grads(
      liger_jsd, batch, weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.5,
      chunk_size=LIGER_CHUNK_SIZE)
  (value, _, _), grad_input, grad_weight = _kdjax_fused_value_and_grads(
      losses.generalized_jsd, batch, weight_hard=0.3, weight_soft=0.7, beta=0.5)
  assert float(liger_value) == 0.0 and float(value) == 0.0
  for grad in (liger_grad_input, liger_grad_weight, grad_input, grad_weight):
    assert np.all(grad == 0.0)


@pytest.mark.torch_ref
def test_liger_zero_pads_a_larger_teacher_vocab(liger_jsd):
  """A teacher lm-head with more rows than the student's (a padded teacher vocabulary): Liger
  appends zero logits to the student, so the student puts probability mass on the padded ids
  (the practice kdjax's `check_pair` rejects, pointing to `align_vocab`). Documented, not
  copied: kdjax reproduces it only when handed the same zero-padded student logits, which is
  what this checks (values and student gradients)."""
  extra = 7
  batch = _make_hidden_batch(24, teacher_vocab=LIGER_VOCAB + extra)
  liger_value, liger_grad_input, liger_grad_weight = _liger_value_and_grads(
      liger_jsd, batch, weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5,
      chunk_size=LIGER_CHUNK_SIZE)

  def zero_padded(fn):
    def padded(student_logits, teacher_logits, **kwargs):
      zeros = jnp.zeros(student_logits.shape[:-1] + (extra,), student_logits.dtype)
      return fn(jnp.concatenate([student_logits, zeros], axis=-1), teacher_logits, **kwargs)
    return padded

  (value, _, _), grad_input, grad_weight = _kdjax_fused_value_and_grads(
      zero_padded(losses.generalized_jsd), batch, weight_hard=0.0, weight_soft=1.0, beta=0.5)
  np.testing.assert_allclose(value, liger_value, **VALUE_TOL)
  _assert_grads_close(grad_input, liger_grad_input)
  _assert_grads_close(grad_weight, liger_grad_weight)
  with pytest.raises(ValueError, match="vocab mismatch"):
    losses.generalized_jsd(np.zeros((3, LIGER_VOCAB), np.float32),
                           np.zeros((3, LIGER_VOCAB + extra), np.float32))
