"""Data: local TFDS builders (array_record), grain pipelines and tokenizers.

Typical use for the Shakespeare language-modelling job:

    tokens = load_split_tokens("kdjax_shakespeare", "train", data_dir=default_data_dir())
    train = make_lm_dataset(tokens, seq_len=256, batch_size=32, seed=0, shuffle=True,
                            num_epochs=None, shard_index=jax.process_index(),
                            shard_count=jax.process_count())
    for batch in eval_batches(val_tokens, seq_len=256, batch_size=32): ...
"""

from kdjax.data.bpe import BPETokenizer, train_bpe, train_on_split
from kdjax.data.lm_pipeline import eval_batches, make_lm_dataset, num_windows
from kdjax.data.shakespeare import KdjaxShakespeare
from kdjax.data.text_sources import SUPPORTED_NAMES, default_data_dir, load_split_tokens
from kdjax.data.tokenizers import ByteTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "KdjaxShakespeare",
    "SUPPORTED_NAMES",
    "default_data_dir",
    "eval_batches",
    "load_split_tokens",
    "make_lm_dataset",
    "num_windows",
    "train_bpe",
    "train_on_split",
]
