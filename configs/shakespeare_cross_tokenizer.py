r"""Cross-tokenizer KD on Shakespeare: a BPE-1024 teacher distilled into a byte-level student.

Launch:

  python -m kdjax.main --config=configs/shakespeare_cross_tokenizer.py:method=uld --workdir=workdir/xtok
  python -m kdjax.main --config=configs/shakespeare_cross_tokenizer.py:method=alm --workdir=workdir/xtok

The second run reuses the tokenizer, the teacher and the CE-only student of the first (same
workdir). Through the launcher (launch/run.py; `--target=processes|tpu|slurm` as in
configs/shakespeare_kd.py):

  python -m launch.run --config=configs/shakespeare_cross_tokenizer.py:method=uld --workdir=workdir/xtok --target=local
CPU smoke test (tests, seconds): `:runlocal,method=uld`.

Data: the `kdjax_shakespeare` corpus (see configs/shakespeare_kd.py); a byte-level BPE of 1024
tokens trained on the whole training split (2.36 bytes/token there: the text is indented verse).
The student reads windows of 128 bytes, the teacher the same bytes as at most 81 BPE tokens
(3 in 2000 training windows need more and are cut at a shared token boundary). Validation =
Julius Caesar + Twelfth Night, all 231,094 bytes, in nats per byte for every model. The distilled
student's directory is named by method and seed only: try another kd_weight or temperature in a
fresh workdir (copy `teacher/`, `student_ce_seed0/` and `bpe_*` into it to reuse them).

Measured (2-core CPU, one JAX device, default arguments, seed 0; benchmarks/results/cross_tokenizer.md):
  teacher (BPE 1024, 902k params, 600 steps)    1.5089 nats/byte
  student, CE only (bytes, 140k, 400 steps)     1.8882 nats/byte
  student, ULD (α 0.5, T 1)                     2.1332 nats/byte  (−0.245: worse than CE only)
  student, ALM (α 0.5, τ 100)                   1.8976 nats/byte  (−0.009: worse; seed 1 −0.012)
Wall-clock: 611 s for `method=uld` (trains the tokenizer, teacher, CE-only and ULD students), then
96 s for `method=alm` in the same workdir. Neither method beats the CE-only student at this scale.
"""

import ml_collections

from kdjax.config_args import parse_arg

METHODS = ("uld", "alm")
# ULD compares the probabilities at T = 1; ALM tempers chunk log-likelihoods by METHODS.md's τ = 100.
DEFAULT_TEMPERATURE = {"uld": 1.0, "alm": 100.0}


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, seed=0, method="uld", kd_weight=0.5)
  if arg.method not in METHODS:
    raise ValueError(f"unknown method {arg.method!r} for this config; known: {', '.join(METHODS)}")
  config = ml_collections.ConfigDict()
  config.experiment = "cross_tokenizer_kd"
  config.seed = arg.seed

  # max_train_bytes: use only the first bytes of the training split (0: all of it).
  config.data = dict(name="kdjax_shakespeare", data_dir="", eval_split="validation", max_train_bytes=0)
  # The whole validation split (max_bytes 0) in nats/byte; a prefix of it for quick runs.
  config.eval = dict(batch_size=64, max_bytes=0)
  # The teacher's byte-level BPE, trained on the first max_bytes of the training split (0: all).
  config.tokenizer = dict(vocab_size=1024, max_bytes=0, min_frequency=2)

  config.mesh = dict(data=-1)
  config.sharding_rules = [(".*", ())]

  train = dict(batch_size=32, learning_rate=3e-3, warmup_steps=100, final_lr_fraction=0.1, weight_decay=0.01,
               grad_clip=1.0, log_every=100, checkpoint_every=250)
  # seq_len: the teacher's input positions per window. 81 BPE tokens hold all but ~0.15% of the
  # 129-byte windows (the densest sampled needs 102); those are cut (kdjax.data.cross_tokenizer_pipeline).
  config.teacher = dict(
      seed=1234, seq_len=80,
      model=dict(num_layers=3, num_heads=4, d_model=128, d_ff=384),
      train=dict(train, steps=600),
  )
  # seq_len: bytes per student window (one token per byte).
  config.student = dict(
      seq_len=128,
      model=dict(num_layers=2, num_heads=4, d_model=64, d_ff=192),
      train=dict(train, steps=400),
  )
  # Loss = (1 - kd_weight) * mean CE over bytes + kd_weight * mean D over aligned units
  # (position pairs for ULD, chunks for ALM); kdjax.distill.cross_tokenizer.
  config.distill = dict(method=arg.method, kd_weight=arg.kd_weight, temperature=DEFAULT_TEMPERATURE[arg.method])

  if arg.runlocal:
    config.data.max_train_bytes = 200_000
    config.eval.update(batch_size=16, max_bytes=8_000)
    config.tokenizer.update(vocab_size=512, max_bytes=100_000)
    # A higher rate so that a few dozen steps learn the byte statistics.
    small = dict(batch_size=16, learning_rate=1e-2, warmup_steps=5, log_every=10, checkpoint_every=20)
    config.teacher.update(seq_len=32, model=dict(num_layers=1, num_heads=2, d_model=32, d_ff=64))
    config.teacher.train.update(small, steps=80)
    config.student.update(seq_len=48, model=dict(num_layers=1, num_heads=2, d_model=16, d_ff=32))
    config.student.train.update(small, steps=30)
  config.lock()
  return config
