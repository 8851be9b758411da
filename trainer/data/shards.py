"""Pretokenized shard sets opened for reading: :class:`TokenShards`, one virtual token array over a set's shards,
with its per-document index memory-mapped (``doc_index``) and, for a remote (fsspec URL) set, its tokens read in
place by byte range (``remote_io``); only the manifest and the index files of a remote set are copied to the node's
cache folder (``$STAGERUN_CACHE``, default ``~/.cache/stagerun``), once per node.

The on-disk format and its checks are in :mod:`.shard_format`; writing sets is :mod:`.shard_writer`; hashing is
:mod:`.shard_verify`. Their names are re-exported here, the data package's one entry point for shard sets.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
import numpy as np

from stagerun.core.storage import is_url

from . import shard_verify
from .corpora import DataError
from .doc_index import DocIndex, open_doc_index
from .remote_io import RemoteFiles, cache_from_env, cache_root, with_retries
from .shard_format import (
    DTYPES,
    FORMAT,
    FORMAT_V1,
    ID_MASK,
    LOSS_MASK_BIT,
    LOSS_MASKS,
    MANIFEST,
    REMAKE,
    dtype_for_vocab,
    expected_sizes,
    has_manifest,
    parse_manifest,
    read_manifest,
    size_error,
    split_loss_mask,
)
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
from .token_files import LocalTokens, RemoteTokens

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DTYPES",
    "ENCODE_BATCH_CHARS",
    "ENCODE_BATCH_DOCS",
    "FORMAT",
    "LOSS_MASK_BIT",
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
    "split_loss_mask",
    "with_eos",
    "write_shards",
]


class TokenShards:
    """A validated shard set, presented as one virtual token array (``read``, ``take``) with a document index."""

    def __init__(self, path: Path, source: str, manifest: dict, index: DocIndex, files: LocalTokens | RemoteTokens):
        self.path = path  # the local folder holding the manifest and index files (a remote set's cache copy)
        self.source = source  # what the caller opened
        self.manifest = manifest
        self.format: str = manifest["format"]
        # v1 sets keep the whole-epoch permutation they were always read in (a run on one resumes exactly); v2 sets
        # read in the block order (block_order.py; a run begun in the earlier v2 order, "bijection", keeps it).
        self.order = "permutation" if self.format == FORMAT_V1 else "blocks"
        self.dtype = DTYPES[manifest["dtype"]]
        self.eos_id: int = manifest["eosId"]
        self.vocab_size: int = manifest["vocabSize"]
        self.tokenizer_sha256: str = manifest["tokenizerSha256"]
        self.num_tokens: int = manifest["numTokens"]
        self.num_documents: int = manifest["numDocuments"]
        # What the set holds (shard_format): text, or chats / preference pairs whose stored values carry the loss
        # mask in bit LOSS_MASK_BIT (``take`` and ``read_ranges`` return them so; split_loss_mask takes them apart).
        self.content: str = manifest.get("content", "text")
        self.loss_mask_bit: int | None = LOSS_MASKS.get(manifest.get("lossMask", ""))
        self.num_loss_tokens: int = manifest.get("numLossTokens", self.num_tokens)
        self.num_pairs: int = manifest.get("numPairs", 0)
        self.chat_template: dict | None = manifest.get("chatTemplate")
        self.index = index
        self.files = files
        self._shard_starts = np.concatenate([[0], np.cumsum([s["numTokens"] for s in manifest["shards"]])]).astype(
            np.int64
        )
        # Every id of a uint16 set is below 65536: a vocabulary at least that large needs no check.
        self._check_ids = self.vocab_size < np.iinfo(self.dtype).max + 1

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None, verify: str | None = None
    ) -> TokenShards:
        """Open and validate a shard set (local folder or fsspec URL). ``verify``: ``sample`` | ``all`` | ``off``
        (default: ``$STAGERUN_DATA_VERIFY``, else ``sample``; see shard_verify)."""
        source = str(path)
        cache = Path(cache_dir) if cache_dir is not None else cache_root()
        mode = verify or shard_verify.mode_from_env()
        if is_url(source):
            return _open_remote(source, cache, mode)
        local = Path(source.removeprefix("file://"))
        manifest = read_manifest(local, shown=source)
        for i, shard in enumerate(manifest["shards"]):
            for key, (expected, what) in expected_sizes(manifest, i).items():
                file = local / shard[key]
                actual = file.stat().st_size if file.is_file() else None
                if actual != expected:
                    raise size_error(source, shard[key], actual, expected, what, i)
        index = open_doc_index(local, source, manifest, cache)
        files = LocalTokens(local, manifest, DTYPES[manifest["dtype"]])
        pairs = shard_verify.files_to_check(
            manifest, mode, shard_verify.worker_rank(), shard_verify.budget_from_env(), source
        )
        shard_verify.verify(source, manifest, pairs, files.chunks)
        return cls(local, source, manifest, index, files)

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def doc_ends(self) -> np.ndarray:
        """int64 [num_documents], global cumulative end offsets: O(documents) memory (small sets, tests, v1 order);
        the loader of a v2 set asks ``index.bounds`` for the documents it reads."""
        return np.asarray(self.index.ends, dtype=np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole set as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"read({start}, {stop}) is outside the {self.num_tokens} tokens of {self.source}")
        return self.take(np.arange(start, stop, dtype=np.int64))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Tokens at arbitrary global positions (int64); the loader gathers a step's sequences with one call.

        Every id is checked against the manifest's vocabSize: a corrupt shard stops with its name, not as an
        IndexError inside the model."""
        indices = np.asarray(indices, dtype=np.int64)
        flat = indices.reshape(-1)
        out = np.empty(flat.shape, dtype=np.int64)
        if len(flat) == 0:
            return out.reshape(indices.shape)
        shard = np.searchsorted(self._shard_starts, flat, side="right") - 1
        if self.num_shards == 1:
            groups = [(0, np.arange(len(flat)))]
        else:
            order = np.argsort(shard, kind="stable")
            cuts = np.flatnonzero(np.diff(shard[order])) + 1
            groups = [(int(shard[part[0]]), part) for part in np.split(order, cuts)]
        gathered = self.files.gather_many([(s, flat[where] - self._shard_starts[s]) for s, where in groups])
        for (s, where), values in zip(groups, gathered):
            if self._check_ids and len(values) and int(self._ids(values).max()) >= self.vocab_size:
                self._bad_id(s, values, flat[where])
            out[where] = values
        return out.reshape(indices.shape)

    def read_ranges(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """The tokens [starts[i], stops[i]) of the whole set (in the set's dtype), each range whole: one request batch
        for a remote set (the read-ahead of whole blocks); ids are checked as ``take`` checks them."""
        pieces, owner = [], []
        for i, (start, stop) in enumerate(zip(np.asarray(starts).tolist(), np.asarray(stops).tolist())):
            shard = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
            while start < stop:  # a range may cross shard boundaries
                base, end = int(self._shard_starts[shard]), int(self._shard_starts[shard + 1])
                piece_stop = min(stop, end)
                if piece_stop > start:
                    pieces.append((shard, start - base, piece_stop - base))
                    owner.append(i)
                start, shard = piece_stop, shard + 1
        values = self.files.spans(pieces)
        for (shard, first, _), part in zip(pieces, values):
            if self._check_ids and len(part) and int(self._ids(part).max()) >= self.vocab_size:
                self._bad_id(shard, part, first + int(self._shard_starts[shard]) + np.arange(len(part)))
        out: list[list[np.ndarray]] = [[] for _ in range(len(np.asarray(starts)))]
        for i, part in zip(owner, values):
            out[i].append(part)
        return [np.concatenate(parts) if parts else np.zeros(0, self.dtype) for parts in out]

    def _ids(self, values: np.ndarray) -> np.ndarray:
        """The token ids of stored values: without the loss mask bit, where the set has one."""
        return values & ID_MASK if self.loss_mask_bit is not None else values

    def _bad_id(self, shard: int, values: np.ndarray, positions: np.ndarray) -> None:
        ids = self._ids(values)
        j = int(np.flatnonzero(ids >= self.vocab_size)[0])
        name = self.manifest["shards"][shard]["tokens"]
        local = int(positions[j] - self._shard_starts[shard])
        raise DataError(
            f"{self.source}/{name}: token id {int(ids[j])} at token {local} is not below the set's vocabSize "
            f"{self.vocab_size}: the shard is corrupt or was written with another tokenizer; {REMAKE}"
        )


def _open_remote(url: str, cache: Path, mode: str) -> TokenShards:
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")

    def manifest_bytes() -> bytes | None:
        try:
            return fs.cat_file(f"{root}/{MANIFEST}")
        except FileNotFoundError:
            return None

    raw = with_retries(f"{url}/{MANIFEST}", manifest_bytes)
    if raw is None:
        raise DataError(
            f"{url}/{MANIFEST} not found: {url} is not a complete shard set; point the source at a folder written "
            f"by stagerun, or {REMAKE}"
        )
    manifest = parse_manifest(raw, f"{url}/{MANIFEST}")
    fs.invalidate_cache(root)
    listing = with_retries(url, lambda: fs.ls(root, detail=True))
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in listing}
    for i, shard in enumerate(manifest["shards"]):
        for key, (expected, what) in expected_sizes(manifest, i).items():
            if sizes.get(shard[key]) != expected:
                raise size_error(url, shard[key], sizes.get(shard[key]), expected, what, i)
    files = RemoteFiles(fs, root, url, sizes, cache_from_env())
    tokens = RemoteTokens(files, manifest, DTYPES[manifest["dtype"]])
    local = _cached_index(url, raw, manifest, files, cache, mode)
    index = open_doc_index(local, url, manifest, cache)
    pairs = [
        pair
        for pair in shard_verify.files_to_check(
            manifest, mode, shard_verify.worker_rank(), shard_verify.budget_from_env(), url
        )
        if pair[1] == "tokens"  # the index files were checked when they were downloaded or reused
    ]
    shard_verify.verify(url, manifest, pairs, tokens.chunks)
    return TokenShards(local, url, manifest, index, tokens)


def _cached_index(url: str, raw: bytes, manifest: dict, files: RemoteFiles, cache: Path, mode: str) -> Path:
    """The node cache's copy of a remote set's manifest and index files, downloaded once per node (file lock)."""
    key = hashlib.sha256(url.encode() + b"\0" + raw).hexdigest()[:24]
    base = cache / "shards"
    base.mkdir(parents=True, exist_ok=True)
    local = base / key
    local_files = LocalTokens(local, manifest, np.dtype("<i8"))
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other ranks wait, then reuse this copy
        if (local / MANIFEST).is_file():
            try:
                _check_index_copy(url, manifest, local, local_files, mode)
                return local
            except DataError:
                shutil.rmtree(local, ignore_errors=True)  # a damaged cache is fetched again, never trusted
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=base))
        try:
            for i, shard in enumerate(manifest["shards"]):
                name = shard["index"]
                size = files.sizes[name]
                with open(tmp / name, "wb") as out:
                    for start in range(0, size, 64 << 20):
                        out.write(files.fetch([name], [start], [min(size, start + (64 << 20))])[0])
                if manifest["format"] == FORMAT and mode != "off":
                    shard_verify.check_file(
                        url, manifest, i, "index", LocalTokens(tmp, manifest, np.dtype("<i8")).chunks(name)
                    )
            (tmp / MANIFEST).write_bytes(raw)  # last: the cache entry is complete only now
            os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def _check_index_copy(url: str, manifest: dict, local: Path, files: LocalTokens, mode: str) -> None:
    for shard in manifest["shards"]:
        file = local / shard["index"]
        if not file.is_file() or file.stat().st_size != shard["numDocuments"] * 8:
            raise DataError(f"{local}: incomplete cache of {url}")
    pairs = shard_verify.files_to_check(manifest, mode, shard_verify.worker_rank(), shard_verify.budget_from_env(), url)
    shard_verify.verify(url, manifest, [p for p in pairs if p[1] == "index"], files.chunks)
