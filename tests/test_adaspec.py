"""AdaSPEC: the top-fraction token selection against NumPy, and the strategy trains on exactly the
tokens where the draft lags the reference most."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import losses
from kdjax.distill import strategies


def test_top_fraction_mask_against_numpy():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(4, 7))
  mask = rng.random((4, 7)) < 0.7
  for fraction in (0.1, 0.4, 1.0):
    got = np.asarray(strategies.top_fraction_mask(jnp.asarray(scores), jnp.asarray(mask), fraction))
    kept = np.sort(scores[mask])[::-1]
    want = mask & (scores >= kept[math.ceil(fraction * kept.size) - 1])
    np.testing.assert_array_equal(got, want)
    assert got.sum() == math.ceil(fraction * mask.sum())
  assert np.asarray(strategies.top_fraction_mask(jnp.asarray(scores), jnp.zeros((4, 7), bool), 0.4)).sum() == 0


def test_strategy_trains_on_the_largest_gaps():
  rng = np.random.default_rng(1)
  zs, zt, zr = (jnp.asarray(rng.normal(size=(3, 5, 6)) * 2, jnp.float32) for _ in range(3))
  batch = {"targets": jnp.asarray(rng.integers(0, 6, (3, 5))), "mask": jnp.asarray(rng.random((3, 5)) < 0.8,
                                                                                   jnp.float32)}
  strategy = strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="adaspec", keep_fraction=0.4)))
  loss, metrics = strategy({"logits": zs}, {"logits": zt, "reference_logits": zr}, batch, 0)
  mask = np.asarray(batch["mask"]) > 0
  gap = np.asarray(losses.forward_kl(zs, zt) - losses.forward_kl(zr, zt))
  kept = np.sort(gap[mask])[::-1]
  selected = mask & (gap >= kept[math.ceil(0.4 * kept.size) - 1])
  want = np.asarray(losses.forward_kl(zs, zt))[selected].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(metrics["selected"][0]) == selected.sum() and float(metrics["selected"][1]) == mask.sum()
  with pytest.raises(ValueError, match="keep_fraction"):
    strategies.strategy_from_config(ml_collections.ConfigDict(dict(method="adaspec", keep_fraction=0.0)))
