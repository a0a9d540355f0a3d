"""Counter-based random numbers on the host: a pure function of integer keys.

Data decisions that must survive a restart (a train/test split, the crop of example `i` in epoch
`e`) are drawn as `hash(seed, stream, epoch, index)` instead of from a stateful generator: a
resumed run recomputes exactly the numbers an unbroken run would have used, with no generator
state to checkpoint, and the values do not depend on the NumPy version (only integer arithmetic).

The hash chains SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014): `h <- mix(h ^ mix(k + golden))` for each key `k`, where `mix` is
`z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31`.
It passes BigCrush as a generator, which is ample for crops, flips and splits.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
  z = (z ^ (z >> np.uint64(30))) * _M1
  z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def hash64(*keys) -> np.ndarray:
  """Returns 64 random bits per element of the broadcast keys.

  Args:
    *keys: Non-negative integers or integer arrays (broadcast together); their order matters.

  Returns:
    A `np.uint64` array of the broadcast shape.

  Raises:
    ValueError: without keys, or for a negative key (it would alias a large positive one).
  """
  if not keys:
    raise ValueError("hash64 needs at least one key")
  arrays = [np.asarray(k) for k in keys]
  for a in arrays:
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"hash64 keys must be integers; got dtype {a.dtype}")
    if a.size and a.min() < 0:
      raise ValueError(f"hash64 keys must be non-negative; got minimum {a.min()}")
  # Wrap-around is the point of the multiplications: silence NumPy's overflow warnings.
  with np.errstate(over="ignore"):
    h = np.zeros(np.broadcast_shapes(*(a.shape for a in arrays)), np.uint64)
    for a in arrays:
      h = _mix(h ^ _mix(a.astype(np.uint64) + _GOLDEN))
  return h


def uniform(*keys) -> np.ndarray:
  """Float64 in [0, 1) from the top 53 bits of `hash64(*keys)`."""
  return (hash64(*keys) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def randint(high: int, *keys) -> np.ndarray:
  """Integers uniform in [0, high) (bias below 2**-40 for any high < 2**13), as int64."""
  if high < 1:
    raise ValueError(f"randint needs high >= 1; got {high}")
  return np.minimum(np.floor(uniform(*keys) * high).astype(np.int64), high - 1)
