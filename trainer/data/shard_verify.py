"""Integrity of shard sets (format v2 records a sha256 per shard file): which files to hash when, and the check.

``STAGERUN_DATA_VERIFY`` says how much a worker checks when it opens a set: ``sample`` (the default) hashes shards
in an order seeded by its rank until ``STAGERUN_DATA_VERIFY_BYTES`` (default 1 GiB) are read, at least one shard,
so the ranks of a gang check different shards and a set no larger than the budget is checked whole by every rank;
``all`` hashes everything; ``off`` nothing. A cache that is reused (the run folder's tokenized sources) is always
checked whole, and the index files of a remote set are hashed as they are downloaded. Token ids are range-checked
on every read whatever the setting (``TokenShards.take``).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from .corpora import DataError
from .shard_format import FORMAT, HASH_KEYS, MANIFEST, REMAKE

DEFAULT_BUDGET = 1 << 30
MODES = ("sample", "all", "off")


def mode_from_env() -> str:
    mode = os.environ.get("STAGERUN_DATA_VERIFY", "sample") or "sample"
    if mode not in MODES:
        raise DataError(f"STAGERUN_DATA_VERIFY={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def budget_from_env() -> int:
    raw = os.environ.get("STAGERUN_DATA_VERIFY_BYTES", "")
    try:
        return int(raw) if raw else DEFAULT_BUDGET
    except ValueError:
        raise DataError(f"STAGERUN_DATA_VERIFY_BYTES={raw!r}: expected a number of bytes") from None


def sha256_of(blocks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block)
    return digest.hexdigest()


def check_file(shown: str, manifest: dict, i: int, key: str, blocks: Iterator[bytes]) -> None:
    """Raise a DataError naming the file when its bytes do not match the manifest's sha256."""
    shard = manifest["shards"][i]
    if sha256_of(blocks) != shard[HASH_KEYS[key]]:
        raise DataError(
            f"{shown}/{shard[key]}: does not match its sha256 in {MANIFEST} (shards[{i}].{HASH_KEYS[key]}): the file "
            f"was changed or corrupted after the set was written; restore it from the original, or {REMAKE}"
        )


def files_to_check(manifest: dict, mode: str, rank: int, budget: int, source: str) -> list[tuple[int, str]]:
    """(shard, "tokens" | "index") pairs to hash: everything, nothing, or a rank-seeded sample within the budget."""
    if mode == "off" or manifest["format"] != FORMAT:
        return []  # a v1 set records no hashes
    shards = manifest["shards"]
    every = [(i, key) for i in range(len(shards)) for key in ("tokens", "index")]
    if mode == "all":
        return every
    itemsize = 2 if manifest["dtype"] == "uint16" else 4
    size = {"tokens": lambda s: s["numTokens"] * itemsize, "index": lambda s: s["numDocuments"] * 8}
    order = np.random.default_rng([rank, zlib.crc32(source.encode())]).permutation(len(shards))
    chosen: list[tuple[int, str]] = []
    used = 0
    for i in order.tolist():
        cost = sum(size[key](shards[i]) for key in ("tokens", "index"))
        if chosen and used + cost > budget:
            break
        chosen += [(i, "tokens"), (i, "index")]
        used += cost
    return chosen


def verify(shown: str, manifest: dict, pairs: list[tuple[int, str]], blocks: Callable[[str], Iterator[bytes]]) -> None:
    for i, key in pairs:
        check_file(shown, manifest, i, key, blocks(manifest["shards"][i][key]))


def worker_rank() -> int:
    """This process's rank in the gang (torchrun's RANK), 0 outside one."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def upgrade_manifest(folder: str | os.PathLike[str]) -> dict:
    """Turn a stagerun-tokens/v1 set into v2 in place (``stagerun tokenize --upgrade``: shard_upgrade.py)."""
    from .shard_upgrade import upgrade_set

    return upgrade_set(folder)[0]
