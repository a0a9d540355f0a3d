r"""A seconds-long distillation for checking a multi-process set-up (entry: `launch/smoke.py`).

Launch (two local processes of 4 simulated CPU devices each, about 20 s on 2 cores):

  python -m launch.run --module=launch.smoke --config=launch/smoke_config.py --workdir=/tmp/kdjax_smoke \
      --target=processes --num_processes=2 --cpu_devices=4

On a cluster, the same `--module=launch.smoke --config=launch/smoke_config.py` with `--target=tpu` or
`--target=slurm` checks that every host joins and that the hosts agree before a real job.
Arguments: `steps`, `seed`, `batch_size` (global), `data_shards` (0: one pipeline shard per process
shard; a one-process run with `data_shards=N` sees the very batches of an N-process run).
"""

import ml_collections

from kdjax.config_args import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, steps=4, seed=0, batch_size=16, data_shards=0)
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.steps = arg.steps
  config.batch_size = arg.batch_size
  config.data_shards = arg.data_shards
  # Synthetic bytes: a repeated phrase with 10% of the bytes replaced at random.
  config.data = dict(num_tokens=8192, seq_len=16, noise=0.1)
  config.mesh = dict(data=-1)
  config.sharding_rules = [(".*", ())]
  config.teacher = dict(num_layers=1, num_heads=2, d_model=32, d_ff=64)
  config.student = dict(num_layers=1, num_heads=2, d_model=16, d_ff=32)
  config.learning_rate = 1e-2
  config.distill = dict(divergence="forward_kl", kd_weight=0.5, temperature=1.0)
  config.lock()
  return config
