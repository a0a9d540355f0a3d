r"""One entry for every place a kdjax job runs.

  python -m launch.run --config=configs/shakespeare_kd.py:runlocal --workdir=workdir/x \
      --target=local|processes|tpu|slurm [target flags] [--sweep] [--dry_run] [-- entry-point flags]

  local       the entry point here; `--cpu_devices=8` simulates 8 CPU devices.
  processes   `--num_processes=N` local processes joined by jax.distributed (coordinator on localhost,
              `--coordinator_port`, default a free port); with `--cpu_devices=D`, D devices each.
  tpu         `--tpu_name=NAME [--zone=Z] [--project=P]`: copies the committed tree to every worker
              of the TPU VM, builds its venv (`--notpu_setup` skips both) and runs on all workers.
  slurm       `--slurm_nodes=N --slurm_gpus_per_node=G [--partition=X] [--slurm_process_per=gpu|node]
              [--slurm_time=HH:MM:SS]`: writes `<workdir>/launch.sbatch` and submits it with sbatch.

`--module` picks the entry point (default `kdjax.main`; `launch.smoke` checks a set-up in seconds).
`--sweep` expands the config module's `get_sweep()` into one run per entry, each in
`<workdir>/<override string>` (`launch/sweep.py`). `--dry_run` prints every command (and sbatch
script) without running anything. Flags after `--` go to the entry point of every run (e.g.
`-- --config.distill.divergence=reverse_kl`). Run it from the repository root.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from absl import app, flags

from launch import execute, sweep as sweep_lib, targets

_CONFIG = flags.DEFINE_string("config", None, "Config file of the entry point, path[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (a sweep's runs go in subdirectories).")
_TARGET = flags.DEFINE_enum("target", "local", targets.TARGETS, "Where to run.")
_MODULE = flags.DEFINE_string("module", "kdjax.main", "Entry-point module, run as `python -m MODULE`.")
_SWEEP = flags.DEFINE_bool("sweep", False, "One run per entry of the config module's get_sweep().")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands (and scripts) instead of running them.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "local / processes: simulated CPU devices per process "
                                    "(0: leave JAX's platform alone).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "processes: how many.")
_PORT = flags.DEFINE_integer("coordinator_port", 0, "processes / slurm: the coordinator's port (0: a free port "
                             "here, one derived from the job id on SLURM).")
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "tpu: the TPU VM's name.")
_ZONE = flags.DEFINE_string("zone", None, "tpu: its zone (default: gcloud's).")
_PROJECT = flags.DEFINE_string("project", None, "tpu: its project (default: gcloud's).")
_TPU_SETUP = flags.DEFINE_bool("tpu_setup", True, "tpu: copy the tree and build the venv on every worker first.")
_SLURM_NODES = flags.DEFINE_integer("slurm_nodes", 1, "slurm: nodes.")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", 1, "slurm: GPUs per node.")
_PARTITION = flags.DEFINE_string("partition", None, "slurm: partition (default: the cluster's).")
_SLURM_PER = flags.DEFINE_enum("slurm_process_per", "gpu", ("gpu", "node"), "slurm: one process per GPU or per node.")
_SLURM_TIME = flags.DEFINE_string("slurm_time", None, "slurm: time limit, e.g. 02:00:00.")

# Flags that only mean something for one target: given with another, they are a mistake.
_TARGET_FLAGS = {
    "processes": ("num_processes",),
    "tpu": ("tpu_name", "zone", "project", "tpu_setup"),
    "slurm": ("slurm_nodes", "slurm_gpus_per_node", "partition", "slurm_process_per", "slurm_time"),
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_target_flags(target: str, present: Sequence[str]) -> None:
  """Raises ValueError for a flag given that belongs to another target."""
  for owner, names in _TARGET_FLAGS.items():
    wrong = [f"--{n}" for n in names if n in present and owner != target]
    if wrong:
      raise ValueError(f"{', '.join(wrong)} apply to --target={owner} only (this launch: --target={target})")
  if target in ("tpu", "slurm") and "cpu_devices" in present:
    raise ValueError("--cpu_devices applies to --target=local / processes only")


def _config_path(spec: str, relative_to: str | None = None) -> str:
  """`path[:arg]` with the path made absolute, or relative to `relative_to` (which must contain it)."""
  path, arg = sweep_lib.split_config(spec)
  path = os.path.abspath(path)
  if relative_to is not None:
    if os.path.commonpath([path, relative_to]) != relative_to:
      raise ValueError(f"config {path} lies outside the repository {relative_to}, which is all the workers get")
    path = os.path.relpath(path, relative_to)
  return f"{path}:{arg}" if arg else path


def _tpu(runs: Sequence[sweep_lib.Run], tpu: targets.TPU, *, dry_run: bool, module: str) -> int:
  # The workers hold a copy of the repository: the config is named by its path inside it.
  runs = [dataclasses.replace(run, config=_config_path(run.config, relative_to=_REPO)) for run in runs]
  commands = targets.tpu_commands(runs, tpu, module=module, repo=_REPO)
  if dry_run:
    print("\n".join(c.shell() for c in commands))
    return 0
  execute.require("gcloud")
  return next((code for code in map(execute.run_one, commands) if code), 0)


def _slurm(runs: Sequence[sweep_lib.Run], slurm: targets.Slurm, *, dry_run: bool, module: str) -> int:
  if not dry_run:
    execute.require("sbatch")
  for run in runs:
    # The job starts in another shell, maybe on another node: absolute paths.
    run = dataclasses.replace(run, config=_config_path(run.config), workdir=os.path.abspath(run.workdir))
    script = targets.slurm_script(run, slurm, module=module, python=sys.executable, repo=_REPO)
    path = targets.slurm_script_path(run)
    submit = targets.Command(("sbatch", path))
    if dry_run:
      print(f"# {path}\n{script}{submit.shell()}")
      continue
    os.makedirs(run.workdir, exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
    if code := execute.run_one(submit):
      return code
  return 0


def _here(runs: Sequence[sweep_lib.Run], *, together: bool, dry_run: bool, module: str, cpu_devices: int,
          num_processes: int, port: int) -> int:
  """local (`together=False`) or processes: the runs one after another on this machine."""
  for run in runs:
    if together:
      commands = targets.process_commands(run, module=module, python=sys.executable, num_processes=num_processes,
                                          port=port or execute.free_port(), cpu_devices=cpu_devices)
    else:
      commands = targets.local_commands(run, module=module, python=sys.executable, cpu_devices=cpu_devices)
    if dry_run:
      # As a shell would run them: the processes in the background, then wait for all.
      lines = [c.shell() + " &" * together for c in commands] + ["wait"] * together
      print("\n".join([f"# run {run.name}"] * bool(run.name) + lines))
      continue
    os.makedirs(run.workdir, exist_ok=True)
    if code := (execute.run_together(commands) if together else execute.run_one(commands[0])):
      return code
  return 0


def main(argv):
  passthrough = argv[1:]
  try:
    present = [name for name in flags.FLAGS if flags.FLAGS[name].present]
    check_target_flags(_TARGET.value, present)
    target = _TARGET.value
    runs = sweep_lib.plan(_CONFIG.value, _WORKDIR.value, sweep=_SWEEP.value, extra_flags=passthrough)
    common = dict(dry_run=_DRY_RUN.value, module=_MODULE.value)
    if target == "tpu":
      tpu = targets.TPU(name=_TPU_NAME.value or "", zone=_ZONE.value, project=_PROJECT.value, setup=_TPU_SETUP.value)
      code = _tpu(runs, tpu, **common)
    elif target == "slurm":
      slurm = targets.Slurm(nodes=_SLURM_NODES.value, gpus_per_node=_SLURM_GPUS.value, partition=_PARTITION.value,
                            process_per=_SLURM_PER.value, time=_SLURM_TIME.value, port=_PORT.value)
      code = _slurm(runs, slurm, **common)
    else:
      code = _here(runs, together=target == "processes", cpu_devices=_CPU_DEVICES.value,
                   num_processes=_NUM_PROCESSES.value, port=_PORT.value, **common)
  except ValueError as e:
    raise SystemExit(f"launch.run: error: {e}") from None
  sys.exit(code)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
