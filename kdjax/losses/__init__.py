"""Pure distillation losses on logits, optax style (per-position values, caller reduces)."""

from kdjax.losses.common import align_vocab, mask_vocab, masked_mean, masked_sum_count, safe_mean
from kdjax.losses.divergences import (
    ab_divergence,
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from kdjax.losses.logits import (
    cross_entropy,
    deit_hard_distillation,
    deit_soft_distillation,
    dist,
    dkd,
    hinton_kd,
    standardize_logits,
)
from kdjax.losses.sparse import teacher_topk, topk_divergence

__all__ = [
    "ab_divergence", "adaptive_kl", "align_vocab", "cross_entropy", "deit_hard_distillation",
    "deit_soft_distillation", "dist", "dkd", "forward_kl", "generalized_jsd", "hinton_kd",
    "mask_vocab", "masked_mean", "masked_sum_count", "reverse_kl", "safe_mean", "skew_kl",
    "skew_reverse_kl", "standardize_logits", "teacher_topk", "topk_divergence", "total_variation",
]
