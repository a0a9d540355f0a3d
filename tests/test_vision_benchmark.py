"""The vision results table's script (`benchmarks/vision_distill.py`) in its seconds-long runlocal form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runlocal_benchmark_writes_the_results_table(tmp_path, child_env):
  output = tmp_path / "vision_distill.md"
  # XLA's default optimisation: these convolutions are execution-bound, and the tests' fast-compile
  # flag made the script 53 s where it takes 45 (the LLM script is compile-bound: it keeps the flag).
  env = child_env(TFDS_DATA_DIR=str(tmp_path / "tfds"), XLA_FLAGS="")
  cmd = [sys.executable, "benchmarks/vision_distill.py", "--runlocal", "--seeds=1", "--datasets=digits", "--pairs=1",
         "--methods=kd,crd", f"--workdir={tmp_path / 'work'}", f"--output={output}"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = output.read_text()
  rows = [line for line in report.splitlines() if line.startswith("| ")]
  for name in ("teacher", "no teacher (CE)", "KD", "CRD"):
    assert any(line.startswith(f"| {name} |") for line in rows), (name, report)
  # Both methods share one teacher and one CE-only student per seed, trained once in one workdir (one
  # seed: each seed is the same programs again, and the test below checks the several-seed cells).
  pair_dir = tmp_path / "work" / "digits" / "resnet32-resnet8"
  runs = sorted(p.name for p in pair_dir.iterdir() if p.is_dir())
  assert runs == ["student_ce_seed0", "student_crd_seed0", "student_kd_seed0", "teacher"], runs
  stored = json.loads((pair_dir / "benchmark.json").read_text())
  assert stored["kd"]["student_ce"] == stored["crd"]["student_ce"]  # restored, not retrained: same numbers


def test_seed_cells_give_the_mean_and_the_sample_std():
  """Several seeds: 'mean ± std' in percent, std with n − 1 (the test above runs one seed)."""
  from benchmarks import vision_distill  # noqa: PLC0415 (a script; pytest puts the repo root on the path)
  accuracies = [0.91, 0.935, 0.92]
  mean, std = 100 * np.mean(accuracies), 100 * np.std(accuracies, ddof=1)
  assert vision_distill._mean_std(accuracies) == f"{mean:.2f} ± {std:.2f}"
  assert vision_distill._mean_std([0.5]) == "50.00"
