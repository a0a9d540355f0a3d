"""Flax NNX models: teachers and students for distillation."""

from kdjax.models.decoder import DecoderConfig, DecoderLM, count_params, init_decoder

__all__ = ["DecoderConfig", "DecoderLM", "count_params", "init_decoder"]
