"""Training machinery: mesh and sharding rules, train state, the pure distillation step, the loop,
and orbax checkpoints."""

from kdjax.train.checkpoint import RunCheckpoints
from kdjax.train.loop import fit
from kdjax.train.sharding import make_mesh, shard_batch, tree_shardings
from kdjax.train.state import TrainState, create_sharded_model, create_train_state
from kdjax.train.step import distill_step, lm_forward, make_distill_step, make_eval_step

__all__ = [
    "RunCheckpoints", "TrainState", "create_sharded_model", "create_train_state", "distill_step", "fit",
    "lm_forward", "make_distill_step", "make_eval_step", "make_mesh", "shard_batch", "tree_shardings",
]
