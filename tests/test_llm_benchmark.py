"""The LLM results table's script (`benchmarks/llm_distill.py`) in its seconds-long runlocal form."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runlocal_benchmark_writes_the_results_table(tmp_path, data_dir, child_env):
  output = tmp_path / "llm_distill.md"
  env = child_env(TFDS_DATA_DIR=data_dir)
  cmd = [sys.executable, "benchmarks/llm_distill.py", "--runlocal", "--seeds=1", "--methods=kd_forward_kl,redi",
         f"--workdir={tmp_path / 'work'}", f"--output={output}"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = output.read_text()
  rows = [line for line in report.splitlines() if line.startswith("| ")]
  for name in ("CE only (no teacher)", "kd_forward_kl", "redi"):
    assert any(line.startswith(f"| {name} |") for line in rows), (name, report)
  # The spec-decoding post-pass and the verified-trace pass rates are measured, not left empty.
  assert "## Speculative decoding" in report and "tokens per target call" in report
  assert "## Verified teacher traces" in report
  # Both methods compare against the very same CE-only baseline and teacher, trained once.
  assert os.path.realpath(tmp_path / "work" / "redi" / "teacher") == os.path.realpath(
      tmp_path / "work" / "kd_forward_kl" / "teacher")
