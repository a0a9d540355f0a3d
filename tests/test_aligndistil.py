"""AlignDistil: the extrapolated target and the token-adaptive β against a float64 NumPy restatement in
probability space, its limit cases (β = 1 is plain KD to the teacher, β = 0 KD to the reference), the
forward-KL student gradient q − p* in closed form, −inf / masked rows, config errors, and the strategy
inside the sharded distillation step with a reference model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import special

from kdjax import losses
from kdjax.distill import aligndistil, strategies
from kdjax.losses import extrapolation
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib

B, L, V = 4, 6, 7


def _logits(seed, scale=2.0):
  return np.random.default_rng(seed).normal(size=(B, L, V)) * scale


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = rng.random((B, L)) < 0.7
  mask[0, 0] = True
  return {"targets": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32), "mask": jnp.asarray(mask, jnp.float32)}


# ------------------------------------------------------------------------------------------------
# Float64 NumPy restatement, one distribution at a time, in probability space:
#   π* ∝ π_ref^(1 − β)·π_model^β,  or  π_ref·(π_model / π_contrast)^β;
#   β_t = min(β_max, max(β_min, β·½Σ|π_model − π_base|)).


def _np_beta(model, base, beta, beta_min, beta_max):
  out = np.zeros(model.shape[:-1])
  for index in np.ndindex(out.shape):
    tv = 0.5 * np.abs(special.softmax(model[index]) - special.softmax(base[index])).sum()
    out[index] = min(beta_max, max(beta_min, beta * tv))
  return out


def _np_target(reference, model, betas, contrast=None):
  out = np.zeros(reference.shape)
  for index in np.ndindex(betas.shape):
    log_ref, log_model = special.log_softmax(reference[index]), special.log_softmax(model[index])
    if contrast is None:
      log_p = (1.0 - betas[index]) * log_ref + betas[index] * log_model
    else:
      log_p = log_ref + betas[index] * (log_model - special.log_softmax(contrast[index]))
    out[index] = special.softmax(log_p)
  return out


def _np_loss(student, target_probs, targets, mask, *, kd_weight, temperature, divergence, weights):
  """(1 − α)·mean CE + α·mean w_t·D over kept positions; target_probs at T = 1, re-tempered here."""
  ce, kd = [], []
  for index in zip(*np.nonzero(mask)):
    ce.append(-special.log_softmax(student[index])[targets[index]])
    p = special.softmax(np.log(target_probs[index]) / temperature)
    q = special.softmax(student[index] / temperature)
    kl = np.sum(p * np.log(p / q)) if divergence == "forward_kl" else np.sum(q * np.log(q / p))
    kd.append(weights[index] * kl)
  return (1.0 - kd_weight) * np.mean(ce) + kd_weight * np.mean(kd)


def _teacher_out(zt, zr, zc=None):
  out = {"logits": jnp.asarray(zt, jnp.float32), "reference_logits": jnp.asarray(zr, jnp.float32)}
  if zc is not None:
    out["contrast_logits"] = jnp.asarray(zc, jnp.float32)
  return out


@pytest.mark.parametrize("contrast", [False, True])
@pytest.mark.parametrize("divergence,reweight", [("forward_kl", False), ("reverse_kl", True)])
def test_strategy_matches_numpy(contrast, divergence, reweight):
  # The teacher near the reference (and the contrast near the teacher) by a per-position spread, so the
  # total variations cover both clips and the interior.
  spread = np.random.default_rng(20).uniform(0.0, 1.2, (B, L, 1))
  zs, zr = _logits(0), _logits(2)
  zt = zr + spread * _logits(1)
  zc = zt - spread[::-1] * _logits(3)
  batch = _batch()
  mask = np.asarray(batch["mask"]) > 0
  cfg = dict(method="aligndistil", divergence=divergence, kd_weight=0.7, temperature=1.5, beta=6.0, beta_min=0.5,
             beta_max=2.5, adaptive=True, reweight=reweight)
  strategy = aligndistil.aligndistil_strategy({k: v for k, v in cfg.items() if k != "method"}, vocab_size=V,
                                              num_steps=10)
  base = zc if contrast else zr
  loss, metrics = strategy({"logits": jnp.asarray(zs, jnp.float32)}, _teacher_out(zt, zr, zc if contrast else None),
                           batch, 0)
  betas = _np_beta(zt, base, 6.0, 0.5, 2.5)
  kept = betas[mask]  # both clips and the interior are exercised
  assert (kept == 0.5).any() and (kept == 2.5).any() and ((kept > 0.5) & (kept < 2.5)).any()
  probs = _np_target(zr, zt, betas, zc if contrast else None)
  want = _np_loss(zs, probs, np.asarray(batch["targets"]), mask, kd_weight=0.7, temperature=1.5,
                  divergence=divergence, weights=1.0 / betas if reweight else np.ones_like(betas))
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["beta"][0] / metrics["beta"][1]), betas[mask].mean(), rtol=1e-5)
  assert float(metrics["beta"][1]) == mask.sum()


def test_forward_kl_gradient_is_q_minus_target():
  """∂loss/∂z_s = [(1 − α)(softmax(z_s) − onehot) + α·(q_T − p*_T)/T] / N at kept positions, else 0."""
  zs, zt, zr = _logits(4), _logits(5), _logits(6)
  batch = _batch(1)
  mask = np.asarray(batch["mask"]) > 0
  alpha, temperature = 0.6, 2.0
  strategy = aligndistil.AlignDistilDistillation(kd_weight=alpha, temperature=temperature, beta=5.0, beta_min=0.2,
                                                 beta_max=3.0)
  grad = jax.grad(lambda z: strategy({"logits": z}, _teacher_out(zt, zr), batch, 0)[0])(jnp.asarray(zs, jnp.float32))
  target = _np_target(zr, zt, _np_beta(zt, zr, 5.0, 0.2, 3.0))
  p = special.softmax(np.log(target) / temperature, axis=-1)
  q = special.softmax(zs / temperature, axis=-1)
  onehot = np.eye(V)[np.asarray(batch["targets"])]
  want = ((1 - alpha) * (special.softmax(zs, axis=-1) - onehot) + alpha * (q - p) / temperature) / mask.sum()
  want = np.where(mask[..., None], want, 0.0)
  np.testing.assert_allclose(np.asarray(grad), want, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_limit_cases_equal_plain_distillation(divergence):
  """Non-adaptive β = 1 is `LogitDistillation` to the teacher, β = 0 to the reference (loss and kd)."""
  zs, zt, zr = (jnp.asarray(_logits(s), jnp.float32) for s in (7, 8, 9))
  batch = _batch(2)
  plain = strategies.LogitDistillation(strategies.divergence_by_name(divergence), kd_weight=0.4, temperature=1.3)
  for beta, teacher in ((1.0, zt), (0.0, zr)):
    strategy = aligndistil.AlignDistilDistillation(strategies.divergence_by_name(divergence), kd_weight=0.4,
                                                   temperature=1.3, beta=beta, beta_min=0.0, adaptive=False)
    got, got_metrics = strategy({"logits": zs}, _teacher_out(zt, zr), batch, 0)
    want, want_metrics = plain({"logits": zs}, {"logits": teacher}, batch, 0)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(got_metrics["kd"][0]), float(want_metrics["kd"][0]), rtol=1e-5, atol=1e-6)
    assert float(got_metrics["beta"][0] / got_metrics["beta"][1]) == beta


def test_contrast_without_reference_anchors_at_the_teacher():
  zs, zt, zc = (jnp.asarray(_logits(s), jnp.float32) for s in (10, 11, 12))
  batch = _batch(3)
  strategy = aligndistil.AlignDistilDistillation(beta=1.5, adaptive=False)
  got, _ = strategy({"logits": zs}, {"logits": zt, "contrast_logits": zc}, batch, 0)
  want, _ = strategy({"logits": zs}, _teacher_out(zt, zt, zc), batch, 0)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  with pytest.raises(ValueError, match="reference_logits"):
    strategy({"logits": zs}, {"logits": zt}, batch, 0)


def test_extrapolated_logits_per_position_beta_and_neg_inf():
  zr, zm, zc = _logits(13), _logits(14), _logits(15)
  betas = np.random.default_rng(0).uniform(-0.5, 3.0, (B, L))
  for contrast in (None, zc):
    got = extrapolation.extrapolated_logits(zr, zm, beta=betas, contrast_logits=contrast)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)), _np_target(zr, zm, betas, contrast), atol=1e-6)
  # An id ruled out by the reference only: present at β = 1 (the reference has weight 0 there), absent
  # at β = 2 (weight −1: the formula's +inf); never NaN.
  zr = zr.copy()
  zr[..., 0] = -np.inf
  at_one = np.asarray(extrapolation.extrapolated_logits(zr, zm, beta=1.0))
  np.testing.assert_allclose(at_one, zm, rtol=1e-6)
  at_two = np.asarray(extrapolation.extrapolated_logits(zr, zm, beta=2.0))
  assert np.isneginf(at_two[..., 0]).all() and np.isfinite(at_two[..., 1:]).all()
  with pytest.raises(ValueError, match="one shape"):
    extrapolation.extrapolated_logits(zr, zm[..., :-1], beta=1.0)
  with pytest.raises(ValueError, match="one value per position"):
    extrapolation.extrapolated_logits(zr, zm, beta=np.ones((B,)))


def test_padded_ids_and_masked_garbage_stay_finite():
  """Ids that are −inf in every model equal a smaller vocabulary; NaN rows of masked positions (in every
  model) change nothing; values and gradients are finite."""
  pad = 3
  zs, zt, zr = (np.concatenate([_logits(s), np.full((B, L, pad), -np.inf)], -1) for s in (16, 17, 18))
  batch = _batch(4)
  masked = np.asarray(batch["mask"]) == 0
  for z in (zs, zt, zr):
    z[masked] = np.nan
  strategy = aligndistil.AlignDistilDistillation(beta=8.0, beta_min=0.5, beta_max=2.0, reweight=True)
  fn = lambda z, t, r: strategy({"logits": z}, _teacher_out(t, r), batch, 0)  # noqa: E731
  loss, metrics = fn(jnp.asarray(zs, jnp.float32), zt, zr)
  grad = jax.grad(lambda z: fn(z, zt, zr)[0])(jnp.asarray(zs, jnp.float32))
  assert np.isfinite(np.asarray(grad)).all() and np.all(np.asarray(grad)[..., V:] == 0)
  assert all(np.isfinite(float(s)) for s, _ in metrics.values())
  cut = lambda z: jnp.asarray(np.where(masked[..., None], 0.0, z[..., :V]), jnp.float32)  # noqa: E731
  want, _ = fn(cut(zs), cut(zt), cut(zr))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  betas = extrapolation.token_adaptive_beta(zt, zr, beta=8.0, beta_min=0.5, beta_max=2.0, where=~masked)
  assert np.isfinite(np.asarray(betas)).all() and np.all(np.asarray(betas)[masked] == 0)


def test_token_adaptive_beta_rejects_bad_ranges():
  z = _logits(19)
  for kwargs in (dict(beta=-1.0), dict(beta=1.0, beta_min=-0.1), dict(beta=1.0, beta_min=2.0, beta_max=1.0),
                 dict(beta=float("nan"))):
    with pytest.raises(ValueError, match="token_adaptive_beta"):
      extrapolation.token_adaptive_beta(z, z, **kwargs)


@pytest.mark.parametrize("cfg,match", [
    (dict(beta_scale=2.0), "unknown distill config keys"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("inf")), "finite beta"),
    (dict(beta_min=3.0, beta_max=2.0), "beta_min <= beta_max"),
    (dict(beta_min=0.0, reweight=True), "reweight"),
    (dict(beta=0.0, adaptive=False, reweight=True), "reweight"),
    (dict(kd_weight=1.5), "kd_weight"),
    (dict(temperature=0.0), "temperature"),
    (dict(divergence="kl"), "unknown divergence"),
    (dict(adaptive="maybe"), "adaptive must be True or False"),
])
def test_bad_config_raises(cfg, match):
  with pytest.raises(ValueError, match=match):
    aligndistil.aligndistil_strategy(cfg, vocab_size=V, num_steps=10)


def test_builder_keys_and_schedules():
  strategy = aligndistil.aligndistil_strategy(
      dict(ml_collections.ConfigDict(dict(divergence="reverse_kl", kd_weight=dict(kind="linear", init=0.0, end=1.0,
                                                                                  steps=10), adaptive="False",
                                          beta=2.0))), vocab_size=V, num_steps=10)
  assert strategy.divergence is losses.reverse_kl and not strategy.adaptive and strategy.beta == 2.0
  assert float(strategy.kd_weight(5)) == pytest.approx(0.5)
  hash(strategy)


def test_strategy_in_the_sharded_step_with_a_reference():
  """8 data-parallel devices, teacher + reference in one forward (as the experiment's `_with_reference`):
  the first step's loss is the strategy's on the same logits, and the loss falls on a fixed batch."""
  vocab, length, batch_size = 32, 8, 8
  mesh = sharding_lib.make_mesh({"data": 8})
  config = lambda d: DecoderConfig(vocab_size=vocab, num_layers=1, num_heads=2, d_model=d, d_ff=2 * d,  # noqa: E731
                                   max_len=length)
  s_graph, s_params = state_lib.create_sharded_model(lambda: DecoderLM(config(16), rngs=nnx.Rngs(0)), mesh)
  t_graph, t_params = state_lib.create_sharded_model(lambda: DecoderLM(config(24), rngs=nnx.Rngs(1)), mesh)
  r_graph, r_params = state_lib.create_sharded_model(lambda: DecoderLM(config(16), rngs=nnx.Rngs(2)), mesh)
  teacher, reference = step_lib.lm_forward(t_graph), step_lib.lm_forward(r_graph)

  def teacher_forward(params, batch):
    return {"logits": teacher(params["teacher"], batch)["logits"],
            "reference_logits": reference(params["reference"], batch)["logits"]}

  pair = {"teacher": t_params, "reference": r_params}
  strategy = aligndistil.AlignDistilDistillation(kd_weight=0.5, beta=8.0, beta_min=0.5, beta_max=3.0)
  optimizer = optax.adam(3e-2)
  state = state_lib.create_train_state(s_params, optimizer, seed=0, mesh=mesh)
  step = step_lib.make_distill_step(state=state, teacher_params=pair, mesh=mesh,
                                    student_forward=step_lib.lm_forward(s_graph), teacher_forward=teacher_forward,
                                    strategy=strategy, optimizer=optimizer)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch_size, length + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
           "mask": (rng.random((batch_size, length)) < 0.8).astype(np.float32)}
  s_out = {"logits": nnx.merge(s_graph, state.params)(batch["inputs"])}
  want, _ = strategy(s_out, teacher_forward(pair, batch), {k: jnp.asarray(v) for k, v in batch.items()}, 0)
  seen = []
  for _ in range(6):
    state, metrics = step(state, sharding_lib.shard_batch(batch, mesh), pair)
    seen.append(float(metrics["loss"][0] / metrics["loss"][1]))
    assert 0.5 <= float(metrics["beta"][0] / metrics["beta"][1]) <= 3.0
  np.testing.assert_allclose(seen[0], float(want), rtol=1e-5)
  assert np.isfinite(seen).all() and seen[-1] < 0.9 * seen[0], seen
