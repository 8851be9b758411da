"""Every document's place in a shard set's token space, memory-mapped: the loader asks for the bounds of the
documents it is about to read and never holds an array of all of them.

The index is the global cumulative document ends (int64, one per document). A one-shard set's index file is that
array already and is mapped in place. A set of a few documents is assembled in memory (at most
``IN_MEMORY_DOCUMENTS`` x 8 bytes). A larger set of several shards gets its global index built once per node into
the cache folder (under a file lock, so the local ranks of a node build it once and then share it through the page
cache), checking every entry while it is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .corpora import DataError
from .shard_format import REMAKE, check_ends

IN_MEMORY_DOCUMENTS = 1 << 20  # 8 MiB: below this the index is checked whole at open and held in memory
CHUNK = 1 << 20  # entries checked / copied at a time while building (8 MiB)


class DocIndex:
    """Global document ends of a set (``ends``: int64, memory-mapped or small) and their bounds by document id."""

    def __init__(self, ends: np.ndarray, manifest: dict, shown: str, *, checked: bool):
        self.ends = ends
        self.num_documents = len(ends)
        self._checked = checked  # every entry was checked at open or build: no per-read check needed
        self._shown = shown
        self._shards = manifest["shards"]
        self._doc_base = np.concatenate([[0], np.cumsum([s["numDocuments"] for s in self._shards], dtype=np.int64)])

    def bounds(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global start, length) of each document id in ``ids`` (int64 arrays)."""
        ends = np.asarray(self.ends[ids], dtype=np.int64)
        before = ids - 1
        starts = np.where(before >= 0, self.ends[np.maximum(before, 0)], 0).astype(np.int64)
        lengths = ends - starts
        if not self._checked:
            bad = np.flatnonzero(lengths <= 0)
            if len(bad):
                self._raise_at(int(ids[bad[0]]))
        return starts, lengths

    def _raise_at(self, doc: int) -> None:
        shard = int(np.searchsorted(self._doc_base, doc, side="right")) - 1
        entry = doc - int(self._doc_base[shard])
        raise DataError(
            f"{self._shown}/{self._shards[shard]['index']}: document end offsets must increase, entry {entry} does "
            f"not: {REMAKE}"
        )


def open_doc_index(folder: Path, shown: str, manifest: dict, cache_dir: Path) -> DocIndex:
    """The set's index; the index files' sizes must already be checked against the manifest."""
    shards = manifest["shards"]
    n_docs = manifest["numDocuments"]
    if n_docs == 0:
        return DocIndex(np.zeros(0, dtype=np.int64), manifest, shown, checked=True)
    if n_docs <= IN_MEMORY_DOCUMENTS or len(shards) == 1:
        small = n_docs <= IN_MEMORY_DOCUMENTS
        parts, offset = [], 0
        for shard in shards:
            ends = _map(folder / shard["index"], shard["numDocuments"])
            _check_last(ends, shard, shown)
            if small:
                check_ends(np.asarray(ends), 0, 0, shard["numTokens"], shown, shard["index"])
                parts.append(np.asarray(ends) + offset)
            else:
                parts.append(ends)  # one big shard: mapped in place, checked as it is read
            offset += shard["numTokens"]
        ends = np.concatenate(parts) if small else parts[0]
        return DocIndex(ends, manifest, shown, checked=small)
    return DocIndex(_built(folder, shown, manifest, cache_dir), manifest, shown, checked=True)


def _map(path: Path, count: int) -> np.ndarray:
    return np.memmap(path, dtype="<i8", mode="r", shape=(count,)) if count else np.zeros(0, dtype=np.int64)


def _check_last(ends: np.ndarray, shard: dict, shown: str) -> None:
    if shard["numDocuments"] and int(ends[-1]) != shard["numTokens"]:
        raise DataError(
            f"{shown}/{shard['index']}: the last document ends at {int(ends[-1])}, but the shard holds "
            f"{shard['numTokens']} tokens: {REMAKE}"
        )


def _built(folder: Path, shown: str, manifest: dict, cache_dir: Path) -> np.ndarray:
    """The global index file of a large multi-shard set in the node's cache, built once (and checked) if absent."""
    # The index files' change times are part of the key: a v1 set has no hashes to tell a rewritten file.
    stamps = [os.stat(folder / s["index"]).st_mtime_ns for s in manifest["shards"]]
    identity = f"{shown}\0{folder.resolve()}\0{stamps}\0".encode() + _identity(manifest)
    key = hashlib.sha256(identity).hexdigest()[:24]
    base = cache_dir / "index"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{key}.ends"
    size = manifest["numDocuments"] * 8
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other ranks wait here and then map what this one built
        if not (path.is_file() and path.stat().st_size == size):
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=base)
            try:
                with os.fdopen(fd, "wb") as out:
                    offset = 0
                    for shard in manifest["shards"]:
                        ends = _map(folder / shard["index"], shard["numDocuments"])
                        _check_last(ends, shard, shown)
                        for first in range(0, len(ends), CHUNK):
                            part = np.asarray(ends[first : first + CHUNK])
                            previous = int(ends[first - 1]) if first else 0
                            check_ends(part, first, previous, shard["numTokens"], shown, shard["index"])
                            out.write((part + offset).astype("<i8").tobytes())
                        offset += shard["numTokens"]
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return np.memmap(path, dtype="<i8", mode="r", shape=(manifest["numDocuments"],))


def _identity(manifest: dict) -> bytes:
    """What makes two sets' indexes the same: their shards' names, counts and (v2) index hashes."""
    return repr(
        [(s["index"], s["numDocuments"], s["numTokens"], s.get("indexSha256")) for s in manifest["shards"]]
    ).encode()
