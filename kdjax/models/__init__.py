"""Flax NNX models: teachers and students for distillation, their generation and checkpoints."""

from kdjax.models.decoder import DecoderConfig, DecoderLM, count_params, init_decoder
from kdjax.models.hf_checkpoint import config_from_hf, config_to_hf, load_hf_decoder, save_hf_decoder

__all__ = ["DecoderConfig", "DecoderLM", "config_from_hf", "config_to_hf", "count_params", "init_decoder",
           "load_hf_decoder", "save_hf_decoder"]
