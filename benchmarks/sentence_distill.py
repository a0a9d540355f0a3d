"""Sentence-embedding distillation of all-MiniLM-L6-v2 into a 3-layer student: `results/sentence_distill.md`.

Every method runs through the experiment `kdjax.experiments.sentence_kd` (`configs/minilm_sentence_kd.py`)
in one workdir, so per seed the baseline (embedding cosine only) is trained once and shared, and every
method starts from the same student (the teacher's embeddings and bottom 3 layers), data order and step
count. Rows: the untrained student, the baseline, MiniLM (+ last-layer attention KL and value relation)
and MiniLMv2 (+ Q-Q / K-K / V-V relations, 12 relation heads), scored on 1000 held-out lines of Julius
Caesar and Twelfth Night against the teacher's embeddings.

  python benchmarks/sentence_distill.py                                    # 3 seeds (~15 min, 2 CPU cores)
  python benchmarks/sentence_distill.py --methods=minilm --seeds=1 --steps=50
  python benchmarks/sentence_distill.py --runlocal --output=/tmp/x.md     # seconds-long version
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import minilm_sentence_kd  # noqa: E402
from kdjax.experiments import sentence_kd  # noqa: E402

# 3 × (baseline + 2 methods) runs of this many steps (the config's default) took 17 minutes of the
# 2-core machine with other jobs on its cores.
DEFAULT_STEPS = 80


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]}, {len(names)} logical cores" if names else platform.processor()
  except OSError:
    return platform.processor() or "unknown CPU"


def _load() -> str:
  try:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "?"


def merge(per_method: dict[str, dict]) -> dict:
  """One results dict with the rows of every method's experiment (their baselines are the same runs)."""
  first = next(iter(per_method.values()))
  merged = {k: first[k] for k in ("teacher", "student_init", sentence_kd.BASELINE, "eval_lines")}
  merged["runs"] = ["student_init", sentence_kd.BASELINE] + [m for m in per_method if m != sentence_kd.BASELINE]
  merged["labels"] = {r: first["labels"][r] for r in ("student_init", sentence_kd.BASELINE)}
  for method, results in per_method.items():
    merged[method] = results[method]
    merged["labels"][method] = results["labels"][method]
  return merged


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="minilm,minilmv2")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
  parser.add_argument("--layers", type=int, default=3)
  parser.add_argument("--runlocal", action="store_true")
  parser.add_argument("--workdir", default="workdir/sentence_distill")
  parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "sentence_distill.md"))
  args = parser.parse_args()
  methods = [m for m in args.methods.split(",") if m]
  load_before, began = _load(), time.perf_counter()
  per_method, config = {}, None
  for method in methods:
    arg = f"method={method},num_seeds={args.seeds},steps={args.steps},layers={args.layers}"
    config = minilm_sentence_kd.get_config(arg + (",runlocal" if args.runlocal else ""))
    per_method[method] = sentence_kd.run(config, os.path.join(args.workdir), log=print)
  seconds = time.perf_counter() - began
  merged = merge(per_method)
  table = sentence_kd.format_table(merged)
  train = config.student.train
  lines = [
      "# Sentence-embedding distillation: all-MiniLM-L6-v2 → 3-layer student on Shakespeare lines",
      "",
      f"`benchmarks/sentence_distill.py` (`--methods={args.methods} --seeds={args.seeds} --steps={args.steps} "
      f"--layers={args.layers}{' --runlocal' if args.runlocal else ''}`), experiment "
      "`kdjax/experiments/sentence_kd.py`, config `configs/minilm_sentence_kd.py`.",
      "",
      f"Teacher: sentence-transformers/all-MiniLM-L6-v2 ({merged['teacher']['num_params']:,} parameters, "
      f"6 layers × 384, 12 heads; frozen). Student: {config.student.layers} layers × {config.student.hidden}, "
      f"{config.student.heads} heads, initialised from the teacher's embeddings and layers "
      f"{tuple(range(config.student.layers))} (`student.init={config.student.init}`), word embeddings frozen. "
      f"Training: {train.steps} AdamW steps (lr {train.learning_rate:g}, {train.warmup_steps} warm-up, cosine decay, "
      f"weight decay {train.weight_decay:g}, clip {train.clip_norm:g}) of {train.batch_size} lines × "
      f"{config.data.max_len} WordPiece tokens from the 38 training works (lines of ≥ {config.data.min_words} "
      "words, de-duplicated); per seed every run starts from the same student and sees the same batches.",
      "",
      f"Evaluation: {merged['eval_lines']} held-out lines ({config.data.eval_split}: Julius Caesar, Twelfth "
      "Night; none occurs in training), each model's mean-pooled, L2-normalised embedding against the "
      "teacher's: mean cosine; nearest-neighbour recall@k (share of the teacher's k nearest held-out "
      "lines that the student also ranks in its k nearest, self excluded); Spearman ρ of the cosine "
      "similarities of all pairs. Mean ± standard deviation over seeds "
      f"{config.seed}..{config.seed + config.num_seeds - 1}.",
      "",
      table,
      "",
      f"Wall-clock of the whole benchmark: {seconds / 60:.1f} min (including loading, tokenising and "
      "evaluation; runs already finished in the workdir are restored, not retrained). "
      f"Machine: {_cpu()}, JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
      f"Python {platform.python_version()}; load average (1/5/15 min) {load_before} at the start and "
      f"{_load()} at the end (other jobs shared the cores, so times are indicative). "
      f"Date: {datetime.date.today().isoformat()}.",
  ]
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
