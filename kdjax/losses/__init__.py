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
    taid,
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
from kdjax.losses.policy import reverse_kl_policy_gradient
from kdjax.losses.sparse import teacher_topk, topk_divergence
from kdjax.losses.tokens import (ChunkAlignment, PositionAlignment, align_chunks, align_positions, alm,
                                 chunk_log_likelihoods, gather_position_pairs, stack_alignments, uld)

# The divergences by the name a config gives them. An explicit table, so an unknown name fails with
# the list of known ones instead of whatever attribute happens to exist.
DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "adaptive_kl": adaptive_kl,
    "ab_divergence": ab_divergence,
    "hinton_kd": hinton_kd,
}

__all__ = [
    "ChunkAlignment", "DIVERGENCES", "PositionAlignment", "align_chunks", "align_positions", "alm",
    "chunk_log_likelihoods", "gather_position_pairs", "stack_alignments", "uld", "ab_divergence", "adaptive_kl", "align_vocab", "cross_entropy", "deit_hard_distillation",
    "deit_soft_distillation", "dist", "dkd", "forward_kl", "generalized_jsd", "hinton_kd",
    "mask_vocab", "masked_mean", "masked_sum_count", "reverse_kl", "reverse_kl_policy_gradient", "safe_mean", "skew_kl",
    "skew_reverse_kl", "standardize_logits", "taid", "teacher_topk", "topk_divergence", "total_variation",
]

# Feature, attention and relation losses (representation distillation).
from kdjax.losses.features import (CIFAR100_WEIGHTS, NegativeTable, attention_transfer, class_means,  # noqa: E402
                                   class_sums, correlation_congruence, crd_init_memory, crd_log_z, crd_loss,
                                   crd_negative_table, crd_sample_negatives, crd_update_memory, fitnet_hint,
                                   hidden_state_loss, norm_direction, nst, pkt, rkd_angle, rkd_distance,
                                   similarity_preserving, sinkhorn_distance, sinkhorn_plan)

__all__ += [
    "CIFAR100_WEIGHTS", "NegativeTable", "attention_transfer", "class_means", "class_sums", "correlation_congruence",
    "crd_init_memory", "crd_log_z", "crd_loss", "crd_negative_table", "crd_sample_negatives", "crd_update_memory",
    "fitnet_hint", "hidden_state_loss", "norm_direction", "nst", "pkt", "rkd_angle", "rkd_distance",
    "similarity_preserving", "sinkhorn_distance", "sinkhorn_plan",
]

# Transformer relations (MiniLM, MiniLMv2), token graphs (TRG) and Distiller's MI-α.
from kdjax.losses.transformer_relations import (LAYER_MAP_MODES, MINILMV2_RELATIONS, attention_kl,  # noqa: E402
                                                contextual_loss, layer_map, mi_alpha, minilmv2_loss, relation_kl,
                                                sample_tokens, token_contrast, token_relation_graph,
                                                tokens_from_feature_map, value_relation)

__all__ += [
    "LAYER_MAP_MODES", "MINILMV2_RELATIONS", "attention_kl", "contextual_loss", "layer_map", "mi_alpha",
    "minilmv2_loss", "relation_kl", "sample_tokens", "token_contrast", "token_relation_graph",
    "tokens_from_feature_map", "value_relation",
]
