"""Running a launch's commands here: one after another, or all at once as the processes of one job."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Sequence

from launch.targets import Command


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_one(command: Command) -> int:
  return subprocess.run(command.argv, env={**os.environ, **dict(command.env)}, check=False).returncode


def run_together(commands: Sequence[Command]) -> int:
  """Starts all commands at once and waits for all; the first failure stops the others."""
  started = []
  try:
    for command in commands:
      log = None if command.log is None else open(command.log, "w")
      proc = subprocess.Popen(command.argv, env={**os.environ, **dict(command.env)}, stdout=log,
                              stderr=None if log is None else subprocess.STDOUT)
      started.append((proc, log, command))
    while True:
      codes = [proc.poll() for proc, _, _ in started]
      for i, code in enumerate(codes):
        if code not in (None, 0):
          where = started[i][2].log or "the output above"
          print(f"launch: process {i} exited with {code} (see {where}); stopping the others", file=sys.stderr)
          return code
      if all(code == 0 for code in codes):
        return 0
      time.sleep(0.2)
  finally:
    for proc, log, _ in started:
      if proc.poll() is None:
        proc.terminate()
        try:
          proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
      if log is not None:
        log.close()


def require(tool: str) -> None:
  if shutil.which(tool) is None:
    raise ValueError(f"{tool} is not on PATH: run this target where {tool} is installed (or pass --dry_run)")
