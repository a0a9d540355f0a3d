"""The teacher-hacking monitor: its two measurements against direct computation, and the onset rule."""

from __future__ import annotations

import types

import numpy as np
from flax import nnx

from kdjax import losses
from kdjax.data import lm_pipeline
from kdjax.evaluate.teacher_hacking import TeacherHackingMonitor
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import sharding as sharding_lib
from kdjax.train import step as step_lib

VOCAB, SEQ = 16, 8


def test_measurements_and_onset():
  mesh = sharding_lib.make_mesh({"data": 8})
  s_graph, s_params = nnx.split(DecoderLM(DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=8,
                                                        d_ff=16, max_len=SEQ), rngs=nnx.Rngs(0)), nnx.Param)
  t_graph, t_params = nnx.split(DecoderLM(DecoderConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=16,
                                                        d_ff=32, max_len=SEQ), rngs=nnx.Rngs(1)), nnx.Param)
  rng = np.random.default_rng(0)
  train, held_out = (rng.integers(0, VOCAB, 200).astype(np.int32) for _ in range(2))
  batches = lambda tokens: list(lm_pipeline.eval_batches(tokens, seq_len=SEQ, batch_size=8))  # noqa: E731
  monitor = TeacherHackingMonitor(student_forward=step_lib.lm_forward(s_graph),
                                  teacher_forward=step_lib.lm_forward(t_graph), teacher_params=t_params,
                                  train_batches=batches(train), eval_batches=batches(held_out), mesh=mesh)
  values = monitor(types.SimpleNamespace(params=s_params), 5)

  def mean(tokens, fn):
    total = count = 0.0
    for b in batches(tokens):
      mask = b["mask"] > 0
      s, c = losses.masked_sum_count(fn(b, mask), mask)
      total, count = total + float(s), count + float(c)
    return total / count

  student, teacher = nnx.merge(s_graph, s_params), nnx.merge(t_graph, t_params)
  kl = mean(train, lambda b, m: losses.forward_kl(student(b["inputs"]), teacher(b["inputs"]), where=m))
  ce = mean(held_out, lambda b, m: losses.cross_entropy(student(b["inputs"]), b["targets"], where=m))
  np.testing.assert_allclose([values["proxy_kl_train"], values["golden_ce_val"]], [kl, ce], rtol=1e-5)

  monitor.history = [{"step": 1, "proxy_kl_train": 1.0, "golden_ce_val": 3.0},
                     {"step": 2, "proxy_kl_train": 0.8, "golden_ce_val": 2.9},
                     {"step": 3, "proxy_kl_train": 0.7, "golden_ce_val": 2.95},
                     {"step": 4, "proxy_kl_train": 0.6, "golden_ce_val": 3.1}]
  summary = monitor.summary()
  assert summary["hacking_onset"] == 3 and summary["best_golden_step"] == 2
  monitor.history = monitor.history[:2]
  assert monitor.hacking_onset() is None
