"""Fused logit divergences: the whole divergence family streamed over vocabulary tiles.

`terms` defines each divergence as an elementwise term and its derivative; `tiled` is the pure-JAX
twin (scan over vocabulary tiles, custom VJP); `pallas` the Pallas kernel; `vocab_parallel` the
version for a vocabulary sharded over a mesh axis; `fused_linear` the lm-head variant that never
builds the `[tokens, vocab]` logits; `topk` the version for a sparse (top-k) teacher; `api` the
public functions and their dispatch.
"""

from kdjax.kernels.api import (IMPLEMENTATIONS, fused_divergence, fused_linear_cross_entropy, fused_linear_divergence,
                               fused_topk_divergence, resolve_implementation)
from kdjax.kernels.terms import NAMES
from kdjax.kernels.vocab_parallel import vocab_parallel_divergence

__all__ = [
    "IMPLEMENTATIONS", "NAMES", "fused_divergence", "fused_linear_cross_entropy", "fused_linear_divergence",
    "fused_topk_divergence", "resolve_implementation", "vocab_parallel_divergence",
]
