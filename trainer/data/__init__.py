"""Data: text corpora, the byte-level BPE tokenizer, pretokenized shard sets and the packing/mixing loader.

    prepared = prepare_data(run, run_dir)                      # once, before the workers start
    loader = PackedMixLoader({n: TokenShards.open(d) for n, d in prepared.shard_dirs.items()}, run.data_seed)
    micro_batches = loader.next_step(phase_index=..., weights=..., seq_len=..., global_sequences=...,
                                     dp_rank=..., dp_size=..., micro_batch_size=...)

numpy only: nothing here imports torch, so the data tools run anywhere.
"""

from .corpora import BUILTIN_CORPORA, CorpusStats, DataError, iter_documents
from .loader import MicroBatch, PackedMixLoader
from .prepare import PreparedData, is_shard_source, prepare_data
from .shards import FORMAT, TokenShards, write_shards
from .tokenizer import EOS_TOKEN, PAD_TOKEN, eos_id, load_tokenizer, tokenizer_sha256, train_tokenizer, vocab_size

__all__ = [
    "BUILTIN_CORPORA", "EOS_TOKEN", "FORMAT", "PAD_TOKEN", "CorpusStats", "DataError", "MicroBatch",
    "PackedMixLoader", "PreparedData", "TokenShards", "eos_id", "is_shard_source", "iter_documents",
    "load_tokenizer", "prepare_data", "tokenizer_sha256", "train_tokenizer", "vocab_size", "write_shards",
]
