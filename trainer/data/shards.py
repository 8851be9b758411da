"""Pretokenized shard sets opened for reading: :class:`TokenShards`, one virtual token array over a set's shards,
with a remote (fsspec URL) set first copied to a local cache folder.

The on-disk format ``stagerun-tokens/v1`` and its checks are in :mod:`.shard_format`; writing sets is
:mod:`.shard_writer`. Their names are re-exported here, the data package's one entry point for shard sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
import numpy as np

from stagerun.core.storage import is_url

from .corpora import DataError
from .shard_format import DTYPES, FORMAT, MANIFEST, REMAKE, dtype_for_vocab, has_manifest, open_shard, read_manifest
from .shard_writer import (
    DEFAULT_SHARD_TOKENS,
    ENCODE_BATCH_CHARS,
    ENCODE_BATCH_DOCS,
    _ShardWriter,
    batches,
    encode_ids,
    manifest_head,
    with_eos,
    write_shards,
)

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DTYPES",
    "ENCODE_BATCH_CHARS",
    "ENCODE_BATCH_DOCS",
    "FORMAT",
    "MANIFEST",
    "REMAKE",
    "TokenShards",
    "_ShardWriter",
    "batches",
    "dtype_for_vocab",
    "encode_ids",
    "has_manifest",
    "manifest_head",
    "read_manifest",
    "with_eos",
    "write_shards",
]


class TokenShards:
    """A validated shard set, presented as one virtual token array (``read``) with global document ends."""

    def __init__(self, path: Path, manifest: dict, tokens: list[np.ndarray], doc_ends: np.ndarray, source: str):
        self.path = path
        self.source = source  # what the caller opened (a URL may have been copied to ``path``)
        self.manifest = manifest
        self.dtype = DTYPES[manifest["dtype"]]
        self.eos_id: int = manifest["eosId"]
        self.vocab_size: int = manifest["vocabSize"]
        self.tokenizer_sha256: str = manifest["tokenizerSha256"]
        self.num_tokens: int = manifest["numTokens"]
        self.num_documents: int = manifest["numDocuments"]
        self.doc_ends = doc_ends  # int64 [num_documents], global cumulative end offsets
        self._tokens = tokens
        sizes = [len(t) for t in tokens]
        self._shard_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> TokenShards:
        """Open and validate a shard set; an fsspec URL is first copied to a local cache folder."""
        source = str(path)
        local = _fetch(source, cache_dir) if is_url(source) else Path(source.removeprefix("file://"))
        manifest = read_manifest(local, shown=source)
        tokens, ends = [], []
        offset = 0
        for i, shard in enumerate(manifest["shards"]):
            shard_tokens, shard_ends = open_shard(local, source, manifest, i, shard)
            tokens.append(shard_tokens)
            ends.append(shard_ends + offset)
            offset += shard["numTokens"]
        doc_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        return cls(local, manifest, tokens, doc_ends.astype(np.int64, copy=False), source)

    @property
    def num_shards(self) -> int:
        return len(self._tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole set as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"read({start}, {stop}) is outside the {self.num_tokens} tokens of {self.source}")
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        parts = []
        while start < stop:
            base = int(self._shard_starts[first])
            end = min(stop, int(self._shard_starts[first + 1]))
            parts.append(self._tokens[first][start - base : end - base])
            start, first = end, first + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Tokens at arbitrary global positions (int64); the loader gathers a packed sequence with one call."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(self._tokens) == 1:
            return self._tokens[0][indices].astype(np.int64)
        out = np.empty(indices.shape, dtype=np.int64)
        shard = np.searchsorted(self._shard_starts, indices, side="right") - 1
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._tokens[s][indices[mask] - self._shard_starts[s]]
        return out


def _fetch(url: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Copy a remote shard set to a local cache folder (once; keyed by URL and manifest) and return it."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        manifest_bytes = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        raise DataError(
            f"{url}/{MANIFEST} not found: {url} is not a complete shard set; point the source at a "
            f"folder written by stagerun, or {REMAKE}"
        ) from None
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{url}/{MANIFEST}: not valid JSON ({exc}): {REMAKE}") from None
    base = Path(cache_dir or os.environ.get("STAGERUN_CACHE", str(Path.home() / ".cache" / "stagerun"))) / "shards"
    key = hashlib.sha256(url.encode() + b"\0" + manifest_bytes).hexdigest()[:24]
    local = base / key
    if (local / MANIFEST).is_file():
        return local
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=base))
    try:
        shards = manifest.get("shards") if isinstance(manifest, dict) else None
        for shard in shards if isinstance(shards, list) else []:
            for name in (shard.get("tokens"), shard.get("index")) if isinstance(shard, dict) else ():
                if isinstance(name, str) and "/" not in name:
                    try:
                        fs.get_file(f"{root}/{name}", str(tmp / name))
                    except FileNotFoundError:
                        pass  # validation names the missing file
        (tmp / MANIFEST).write_bytes(manifest_bytes)  # last: the cache entry is complete only now
        try:
            os.replace(tmp, local)
        except OSError:
            pass  # another process on this node finished the same copy first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local
