"""Float64 NumPy restatements of `kdjax.losses.features`, written from the papers and reference code.

Nothing here imports kdjax or JAX. Each function takes the rows that are kept (masking is tested by
dropping rows, not by re-implementing masks) and evaluates the formula with explicit loops over
examples, pairs, triplets or channels, so that a vectorisation slip in the library and a slip here
are unlikely to coincide.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x):
  return np.asarray(x, np.float64)


def _unit(v, eps=1e-12):
  return v / max(np.sqrt(np.sum(v * v)), eps)


def _huber(x):
  return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def _block_mean(x, h, w):
  """Average-pools one [H, W, C] map to [h, w, C] by explicit block loops."""
  fh, fw = x.shape[0] // h, x.shape[1] // w
  out = np.zeros((h, w, x.shape[2]))
  for i in range(h):
    for j in range(w):
      out[i, j] = x[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(axis=(0, 1))
  return out


def _matched(s, t):
  h, w = min(s.shape[0], t.shape[0]), min(s.shape[1], t.shape[1])
  return _block_mean(s, h, w), _block_mean(t, h, w)


def fitnet_hint(s, t):
  s, t = _f64(s), _f64(t)
  return np.array([np.mean((s[b] - t[b]) ** 2) for b in range(len(s))])


def attention_transfer(s, t, p=2.0):
  out = []
  for sb, tb in zip(_f64(s), _f64(t)):
    sb, tb = _matched(sb, tb)
    # The sum over channels (the paper's F_sum^p): the normalisation removes the 1/C of the mean.
    qs = _unit(np.sum(np.abs(sb) ** p, axis=-1).ravel())
    qt = _unit(np.sum(np.abs(tb) ** p, axis=-1).ravel())
    out.append(np.sum((qs - qt) ** 2) / qs.size)
  return np.array(out)


def nst(s, t):
  out = []
  for sb, tb in zip(_f64(s), _f64(t)):
    sb, tb = _matched(sb, tb)
    fs = [_unit(sb[..., c].ravel()) for c in range(sb.shape[-1])]
    ft = [_unit(tb[..., c].ravel()) for c in range(tb.shape[-1])]
    k = lambda a, b: np.mean([[float(x @ y) ** 2 for y in b] for x in a])
    out.append(k(ft, ft) + k(fs, fs) - 2.0 * k(fs, ft))
  return np.array(out)


def hidden_state_loss(s, t, kind):
  s, t = _f64(s).reshape(-1, np.shape(s)[-1]), _f64(t).reshape(-1, np.shape(t)[-1])
  out = []
  for a, b in zip(s, t):
    if kind == "cosine":
      na, nb = np.linalg.norm(a), np.linalg.norm(b)
      out.append(1.0 - (a @ b) / (max(na, 1e-12) * max(nb, 1e-12)))
    else:
      out.append(np.mean((a - b) ** 2))
  return np.array(out)


def class_means(features, labels, num_classes):
  features = _f64(features)
  means = np.zeros((num_classes, features.shape[1]))
  for k in range(num_classes):
    rows = [f for f, y in zip(features, labels) if y == k]
    if rows:
      means[k] = np.mean(rows, axis=0)
  return means


def norm_direction(s, means, labels, t):
  s, t, means = _f64(s), _f64(t), _f64(means)
  out = []
  for sb, tb, y in zip(s, t, labels):
    e = means[y] / np.linalg.norm(means[y])
    out.append(1.0 - float(sb @ e) / max(np.linalg.norm(sb), np.linalg.norm(tb)))
  return np.array(out)


def _distances(x):
  n = len(x)
  d = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      if i != j:
        d[i, j] = np.linalg.norm(x[i] - x[j])
  mu = d.sum() / (n * (n - 1))
  return d / mu


def rkd_distance(s, t):
  s, t = _f64(s).reshape(len(s), -1), _f64(t).reshape(len(t), -1)
  n = len(s)
  if n < 2:
    return 0.0
  ds, dt = _distances(s), _distances(t)
  return sum(_huber(ds[i, j] - dt[i, j]) for i in range(n) for j in range(n)) / n**2


def _angle(x, i, j, k):
  if j == i or k == i:
    return 0.0
  a, b = x[j] - x[i], x[k] - x[i]
  return float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def rkd_angle(s, t):
  s, t = _f64(s).reshape(len(s), -1), _f64(t).reshape(len(t), -1)
  n = len(s)
  total = 0.0
  for i in range(n):
    for j in range(n):
      for k in range(n):
        total += _huber(_angle(s, i, j, k) - _angle(t, i, j, k))
  return total / max(n, 1) ** 3


def pkt(s, t, eps=1e-7):
  s, t = _f64(s).reshape(len(s), -1), _f64(t).reshape(len(t), -1)
  n = len(s)

  def conditional(x):
    x = [v / (np.linalg.norm(v) + eps) for v in x]
    k = np.array([[(float(a @ b) + 1.0) / 2.0 for b in x] for a in x])
    return np.array([row / row.sum() for row in k])

  p, q = conditional(t), conditional(s)
  total = sum(p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(n) for j in range(n))
  return total / max(n, 1) ** 2


def similarity_preserving(s, t):
  s, t = _f64(s).reshape(len(s), -1), _f64(t).reshape(len(t), -1)
  n = len(s)

  def gram(x):
    g = np.array([[float(a @ b) for b in x] for a in x])
    return np.array([_unit(row) for row in g])

  return float(np.sum((gram(t) - gram(s)) ** 2)) / max(n, 1) ** 2


def correlation_congruence_taylor(s, t, gamma, order):
  s, t = _f64(s).reshape(len(s), -1), _f64(t).reshape(len(t), -1)
  n = len(s)

  def corr(x):
    x = [_unit(v) for v in x]
    out = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        # exp(−γ‖a − b‖²) = e^{−2γ} e^{2γ aᵀb} for unit vectors; truncated power series of the second factor.
        c = float(x[i] @ x[j])
        out[i, j] = math.exp(-2 * gamma) * sum((2 * gamma * c) ** p / math.factorial(p) for p in range(order + 1))
    return out

  return float(np.sum((corr(s) - corr(t)) ** 2)) / max(n, 1) ** 2


def rbf_congruence(s, t, gamma):
  """The untruncated Gaussian-kernel congruence on unit vectors (the Taylor form's limit)."""
  s, t = _f64(s).reshape(len(s), -1), _f64(t).reshape(len(t), -1)
  n = len(s)
  k = lambda x: np.array([[math.exp(-gamma * np.sum((_unit(a) - _unit(b)) ** 2)) for b in x] for a in x])
  return float(np.sum((k(s) - k(t)) ** 2)) / n**2


def correlation_congruence_repdistiller(s, t):
  delta = np.abs(_f64(s) - _f64(t))
  n = len(delta)
  if n < 2:
    return 0.0
  return sum(float(np.sum(delta[b] * delta[b + 1])) for b in range(n - 1)) / (n - 1)


def crd_scores(anchor, memory, idx, temperature):
  anchor, memory = _f64(anchor), _f64(memory)
  return np.array([[float(memory[k] @ anchor[b]) / temperature for k in idx[b]] for b in range(len(anchor))])


def crd_z(scores, num_data):
  return float(np.mean(np.exp(scores))) * num_data


def crd_nce_side(scores, z, num_data):
  """RepDistiller's ContrastLoss on exp(s)/Z, in the probability domain as the reference."""
  eps = 1e-7
  p = np.exp(scores) / z
  m = scores.shape[1] - 1
  pn = 1.0 / num_data
  total = 0.0
  for b in range(len(p)):
    total += math.log(p[b, 0] / (p[b, 0] + m * pn + eps))
    for k in range(1, m + 1):
      total += math.log(m * pn / (p[b, k] + m * pn + eps))
  return -total / len(p)


def crd_softmax_side(scores):
  return float(np.mean([np.log(np.sum(np.exp(row))) - row[0] for row in scores]))


def crd_update_memory(memory, embeddings, indices, momentum):
  memory = _f64(memory).copy()
  for e, i in zip(_f64(embeddings), indices):
    row = momentum * memory[i] + (1 - momentum) * e
    memory[i] = row / np.linalg.norm(row)
  return memory


def sinkhorn(q, p, cost, epsilon, iterations):
  """Scaling-form Sinkhorn (Cuturi 2013) in float64: u ← q / (K v), v ← p / (Kᵀ u); returns (⟨π, C⟩, π)."""
  q, p, cost = _f64(q), _f64(p), _f64(cost)
  kernel = np.exp(-cost / epsilon)
  u, v = np.ones_like(q), np.ones_like(p)
  for _ in range(iterations):
    u = q / (kernel @ v)
    v = p / (kernel.T @ u)
  plan = u[:, None] * kernel * v[None, :]
  return float(np.sum(plan * cost)), plan
