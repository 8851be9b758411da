"""Data: text corpora, the byte-level BPE tokenizer, pretokenized shard sets and the packing/mixing loader.

    prepared = prepare_data(run, run_dir)                      # once, before the workers start
    loader = PackedMixLoader({n: TokenShards.open(d) for n, d in prepared.shard_dirs.items()}, run.data_seed)
    micro_batches = loader.next_step(phase_index=..., weights=..., seq_len=..., global_sequences=...,
                                     dp_rank=..., dp_size=..., micro_batch_size=...)

Pretokenizing at scale (parallel, resumable, remote inputs and outputs) is ``tokenize.tokenize`` (the ``stagerun
tokenize`` command); the readers of text / JSONL / Parquet are in ``readers``.

numpy only: nothing here imports torch, so the data tools run anywhere.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# Names load on first use (PEP 562): the `stagerun` command registers the data subcommands in every invocation,
# and a base install (the operator's image: no numpy, no tokenizers) must still run `stagerun operator`.
_EXPORTS = {
    "corpora": ("BUILTIN_CORPORA", "CorpusStats", "iter_documents"),
    "loader": ("MicroBatch", "PackedMixLoader"),
    "prepare": ("PreparedData", "is_shard_source", "prepare_data"),
    "readers": ("BadRecords", "DataError", "InputFile", "InputStats", "expand_inputs", "read_records", "read_texts"),
    "shards": ("FORMAT", "TokenShards", "write_shards"),
    "tokenizer": (
        "EOS_TOKEN",
        "PAD_TOKEN",
        "eos_id",
        "load_tokenizer",
        "tokenizer_sha256",
        "train_from_inputs",
        "train_tokenizer",
        "vocab_size",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's cpuset, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    # ruff: noqa: F401
    from .corpora import BUILTIN_CORPORA, CorpusStats, iter_documents
    from .loader import MicroBatch, PackedMixLoader
    from .prepare import PreparedData, is_shard_source, prepare_data
    from .readers import BadRecords, DataError, InputFile, InputStats, expand_inputs, read_records, read_texts
    from .shards import FORMAT, TokenShards, write_shards
    from .tokenizer import (
        EOS_TOKEN,
        PAD_TOKEN,
        eos_id,
        load_tokenizer,
        tokenizer_sha256,
        train_from_inputs,
        train_tokenizer,
        vocab_size,
    )
