r"""The one entry point: `python -m kdjax.main --config=configs/x.py[:arg] --workdir=DIR`.

The config's `experiment` field picks the experiment function; `--config.key=value` flags
override locked config fields (an unknown key is an error, not a silently ignored typo).

Multi-process (one process per host or accelerator): `--distributed` or `KDJAX_DISTRIBUTED=1`,
with `--coordinator_address`, `--num_processes`, `--process_id` or their `JAX_*` variables where JAX
cannot detect them (`kdjax.distributed`); `launch/run.py` starts such runs locally, on TPU pods and
on SLURM clusters.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import distributed
from kdjax.experiments import cross_tokenizer_kd, lm_kd, sentence_kd, vision_kd

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, the cached teacher and results go.")
_START_DISTRIBUTED = distributed.define_flags()

# Experiments by the name a config gives in `experiment`.
EXPERIMENTS = {"lm_kd": lm_kd.run, "cross_tokenizer_kd": cross_tokenizer_kd.run, "vision_kd": vision_kd.run,
               "sentence_kd": sentence_kd.run}


def run(config, workdir: str):
  if config.experiment not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {config.experiment!r}; known: {sorted(EXPERIMENTS)}")
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise SystemExit(f"cannot create workdir {workdir}: {e}") from e
  if not os.access(workdir, os.W_OK):
    raise SystemExit(f"workdir {workdir} is not writable: pass --workdir=<a writable directory>")
  return EXPERIMENTS[config.experiment](config, workdir)


def main(argv):
  del argv
  # Orbax logs every checkpoint phase at INFO, and TFDS draws bars while it builds the local
  # corpus: the progress lines are ours.
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  # Before the config's experiment touches a device: jax.distributed must come first.
  _START_DISTRIBUTED()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
