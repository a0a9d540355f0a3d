r"""A tiny distillation run that checks a multi-process set-up: do all hosts join and agree?

  python -m launch.smoke --config=launch/smoke_config.py --workdir=DIR [--distributed ...]

(normally started through `python -m launch.run --module=launch.smoke ...`, see
`launch/smoke_config.py`). A random teacher is distilled into a student on synthetic bytes for a few
steps through the library's own path: sharded model creation, `make_distill_step`, `loop.fit`.
Each process loads only its slice of every global batch (`sharding.process_batch_shard`, the grain
pipeline's shards) and `shard_batch` assembles the global batch from the slices. Process k writes
`DIR/smoke_process{k}.npz` (per-step loss / ce / kd and the final student parameters, gathered),
which must be the same for every process and, within float tolerance, for a one-process run on
the same global batches (`:data_shards=<process count>`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from kdjax import distributed
from kdjax.data import lm_pipeline
from kdjax.distill import strategies
from kdjax.models.decoder import DecoderConfig, DecoderLM
from kdjax.train import loop, sharding, state as state_lib, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Smoke config (launch/smoke_config.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where each process writes smoke_process<k>.npz.")
_START_DISTRIBUTED = distributed.define_flags()

VOCAB = 256
_PHRASE = b"Now is the winter of our discontent made glorious summer by this sun of York. "


def synthetic_tokens(num_tokens: int, noise: float, seed: int) -> np.ndarray:
  """A repeated phrase with a fraction `noise` of its bytes replaced uniformly: learnable, not trivial."""
  rng = np.random.default_rng(seed)
  tokens = np.resize(np.frombuffer(_PHRASE, np.uint8), num_tokens).astype(np.int32)
  flip = rng.random(num_tokens) < noise
  tokens[flip] = rng.integers(0, VOCAB, int(flip.sum()))
  return tokens


class ShardedBatches:
  """This process's rows of every global batch: pipeline shards `[k·S/n, (k+1)·S/n)` of `S`
  concatenated, for process shard `k` of `n`. The global batch is all `S` shards in order, whatever
  the process count, so runs on different process counts see the same data."""

  def __init__(self, tokens, *, seq_len: int, batch_size: int, seed: int, data_shards: int, process_shard):
    index, count = process_shard
    data_shards = data_shards or count
    if data_shards % count or batch_size % data_shards:
      raise ValueError(f"data_shards={data_shards} must be a multiple of the {count} process shards and divide "
                       f"the global batch {batch_size}")
    per = data_shards // count
    self._iters = [iter(lm_pipeline.make_lm_dataset(
        tokens, seq_len=seq_len, batch_size=batch_size // data_shards, seed=seed, shuffle=True, num_epochs=None,
        shard_index=j, shard_count=data_shards)) for j in range(index * per, (index + 1) * per)]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iters]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run(config, workdir: str) -> str:
  """Runs the smoke distillation; returns the path of this process's result file."""
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_batch_size(config.batch_size, mesh)
  rules = [tuple(r) for r in config.sharding_rules]
  data = config.data
  model = lambda cfg, seed: lambda: DecoderLM(  # noqa: E731
      DecoderConfig(vocab_size=VOCAB, max_len=data.seq_len, **cfg.to_dict()), rngs=nnx.Rngs(seed))
  teacher_def, teacher_params = state_lib.create_sharded_model(model(config.teacher, config.seed + 1), mesh, rules)
  graphdef, params = state_lib.create_sharded_model(model(config.student, config.seed), mesh, rules)
  strategy = strategies.strategy_from_config(config.distill, vocab_size=VOCAB, num_steps=config.steps)
  optimizer = optax.adamw(config.learning_rate)
  state = state_lib.create_train_state(params, optimizer, config.seed, mesh, strategy=strategy)
  step_fn = step_lib.make_distill_step(
      state=state, teacher_params=teacher_params, mesh=mesh, student_forward=step_lib.lm_forward(graphdef),
      teacher_forward=step_lib.lm_forward(teacher_def), strategy=strategy, optimizer=optimizer)
  shard = sharding.process_batch_shard(mesh)
  batches = ShardedBatches(synthetic_tokens(data.num_tokens, data.noise, config.seed), seq_len=data.seq_len,
                           batch_size=config.batch_size, seed=config.seed, data_shards=config.data_shards,
                           process_shard=shard)

  def place(state, host_batch, teacher_params, step):
    del state, teacher_params
    batch = sharding.shard_batch(host_batch, mesh)
    # Duplicated slices (every process loading everything) would train the same as the true batch:
    # the global row count is what tells them apart.
    if batch["inputs"].shape[0] != config.batch_size:
      raise RuntimeError(f"step {step}: the global batch has {batch['inputs'].shape[0]} rows, not "
                         f"{config.batch_size}: the processes' slices do not add up to it")
    return batch

  me = jax.process_index()
  state, history = loop.fit(state=state, step_fn=step_fn, batches=batches, teacher_params=teacher_params,
                            num_steps=config.steps, mesh=mesh, tokens_per_batch=config.batch_size * data.seq_len,
                            log_every=1, name=f"smoke p{me}/{jax.process_count()} shard {shard[0]}/{shard[1]}",
                            prepare_batch=place)
  # Parameters may be sharded over processes: gather them so every process writes the full values.
  gathered = multihost_utils.process_allgather(state.params, tiled=True)
  leaves = jax.tree_util.tree_leaves_with_path(gathered)
  out = {f"param/{sharding.path_to_str(path)}": np.asarray(leaf) for path, leaf in leaves}
  for key in ("loss", "ce", "kd"):
    out[key] = np.asarray([values[key] for _, values in history], np.float64)
  out["shard"] = np.asarray(shard)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, f"smoke_process{me}.npz")
  np.savez(path, **out)
  print(f"[smoke p{me}] {jax.device_count()} devices over {jax.process_count()} processes, mesh {dict(mesh.shape)}; "
        f"final loss {out['loss'][-1]:.6f}; wrote {path}")
  return path


def main(argv):
  del argv
  _START_DISTRIBUTED()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
