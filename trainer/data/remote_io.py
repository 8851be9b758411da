"""Reading remote shard files in place: ranged reads with retries on transient errors, the counters the trainer's
metrics export, and the optional node-local chunk cache.

Only the byte ranges the batches need are fetched: a step's ranges, of all its sequences and shards, are coalesced
per file (``coalesce``: touching ranges always, the smallest gaps too while the bytes fetched stay within
``1 + OVERFETCH`` times the bytes needed) and fetched in one concurrent ``cat_ranges`` call. With short shuffled
documents a step is thousands of small ranges, and the number of requests, not the bytes, sets the throughput: which
is why the block order reads whole blocks a window ahead where it can (``readahead.py``). With the cache on
(``spec.data.cache``), reads go through aligned chunks kept on a node-local folder shared by the node's ranks,
bounded in size and evicted least recently used first.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .corpora import DataError

ATTEMPTS = int(os.environ.get("STAGERUN_DATA_READ_ATTEMPTS", "6"))
BACKOFF_SECONDS = 0.2  # then x2 per attempt, at most MAX_BACKOFF_SECONDS
MAX_BACKOFF_SECONDS = 10.0
CHUNK_BYTES = 4 << 20
OVERFETCH = 0.2  # the bytes a merge of ranges may add, as a share of the bytes needed (issue 15: <= 1.2x)
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
TRANSIENT_CODES = ("SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500")
# A connection dropped in the middle of a response body (aiohttp's and urllib3's names for it): not an OSError.
TRANSIENT_NAMES = ("ClientPayloadError", "ContentLengthError", "IncompleteRead", "ServerDisconnected")


@dataclass
class ReadStats:
    """Counters of this process's remote shard reads (exported as ``stagerun_data_*`` metrics)."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    cache_hit_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


STATS = ReadStats()


def is_transient(exc: BaseException) -> bool:
    """Whether a failed read may succeed when tried again (network, timeouts, throttling, 5xx)."""
    if isinstance(exc, PERMANENT) or isinstance(exc, DataError):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    if any(name in text for name in TRANSIENT_NAMES):
        return True
    return any(code in text for code in TRANSIENT_CODES) or "Timeout" in text or "Connection" in text


def with_retries(url: str, read: Callable[[], object], sleep: Callable[[float], None] = time.sleep):
    """``read()``, tried again with backoff on transient errors; a permanent one stops with ``url`` and a fix."""
    for attempt in range(ATTEMPTS):
        try:
            return read()
        except BaseException as exc:
            if not is_transient(exc):
                raise permanent_error(url, exc) from None
            if attempt == ATTEMPTS - 1:
                raise exhausted_error(url, exc) from None
            STATS.add(retries=1)
            sleep(backoff(attempt))
    raise AssertionError("unreachable")


def backoff(attempt: int) -> float:
    return min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2**attempt)


def permanent_error(url: str, exc: BaseException) -> BaseException:
    if isinstance(exc, FileNotFoundError):
        return DataError(
            f"{url}: not found (it is listed in the shard set's manifest): the set was changed or deleted while in "
            f"use; restore it, or re-create it and start a new run"
        )
    return exc


def exhausted_error(url: str, exc: BaseException) -> DataError:
    return DataError(
        f"{url}: reading failed {ATTEMPTS} times ({type(exc).__name__}: {exc}): check the storage endpoint and "
        f"credentials; the run resumes from its last checkpoint once it is reachable"
    )


class RemoteFiles:
    """Byte ranges of the files of one remote folder, fetched with retries (through ``ChunkCache`` when given)."""

    def __init__(self, fs, root: str, url: str, sizes: dict[str, int], cache: ChunkCache | None = None):
        self.fs, self.root, self.url, self.sizes, self.cache = fs, root.rstrip("/"), url.rstrip("/"), sizes, cache

    def read(self, name: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        return self.read_many([(name, starts, ends)])[0]

    def read_many(self, parts: Sequence[tuple[str, Sequence[int], Sequence[int]]]) -> list[list[bytes]]:
        """For each (file, starts, ends) of ``parts``, the bytes of its ranges; all files' ranges coalesced per file
        and fetched in one request batch (through the chunk cache when there is one: it reads whole chunks)."""
        if self.cache is not None:
            return [self.cache.read(self, name, starts, ends) for name, starts, ends in parts]
        names: list[str] = []
        first: list[int] = []
        last: list[int] = []
        plans = []
        for name, starts, ends in parts:
            merged_starts, merged_ends, owner = coalesce(starts, ends)
            plans.append((len(names), merged_starts, owner))
            names += [name] * len(merged_starts)
            first += merged_starts.tolist()
            last += merged_ends.tolist()
        data = self.fetch(names, first, last) if names else []
        out = []
        for (base, merged_starts, owner), (_, starts, ends) in zip(plans, parts):
            out.append(
                [
                    data[base + m][s - at : e - at]
                    for m, at, s, e in zip(owner.tolist(), merged_starts[owner].tolist(), starts, ends)
                ]
            )
        return out

    def fetch(self, names: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        """The ranges [starts[i], ends[i]) of files ``names[i]``: one concurrent request batch, failures retried."""
        out: list[bytes | None] = [None] * len(names)
        todo = list(range(len(names)))
        attempt = 0
        while todo:
            paths = [f"{self.root}/{names[i]}" for i in todo]
            first, last = [starts[i] for i in todo], [ends[i] for i in todo]
            results = with_retries(
                f"{self.url}/{names[todo[0]]}",
                functools.partial(self.fs.cat_ranges, paths, first, last, on_error="return"),
            )
            failed = []
            for i, result in zip(todo, results):
                if isinstance(result, BaseException):
                    if not is_transient(result):
                        raise permanent_error(f"{self.url}/{names[i]}", result)
                    if attempt >= ATTEMPTS - 1:
                        raise exhausted_error(f"{self.url}/{names[i]}", result)
                    failed.append(i)
                    continue
                if len(result) != ends[i] - starts[i]:
                    raise DataError(
                        f"{self.url}/{names[i]}: bytes {starts[i]}-{ends[i]} returned {len(result)} bytes: the file is "
                        f"shorter than the manifest says (changed while in use?); re-create the shard set"
                    )
                out[i] = result
            STATS.add(requests=len(todo), bytes_fetched=sum(len(out[i] or b"") for i in todo))
            if failed:
                STATS.add(retries=len(failed))
                time.sleep(backoff(attempt))
                attempt += 1
            todo = failed
        return out  # type: ignore[return-value]


def coalesce(
    starts: Sequence[int], ends: Sequence[int], overfetch: float = OVERFETCH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fewer, larger ranges covering the ranges [starts[i], ends[i]) of one file: (merged starts, merged ends, the
    merged range holding each input range).

    Overlapping and touching ranges always merge (that fetches nothing extra); then the gaps between the remaining
    ones, smallest first, while the gap bytes fetched stay within ``overfetch`` x the bytes the ranges cover. Each
    merge saves one request, so taking the cheapest gaps first saves the most requests the budget allows."""
    s = np.asarray(starts, dtype=np.int64).reshape(-1)
    e = np.asarray(ends, dtype=np.int64).reshape(-1)
    if len(s) == 0:
        return s, e, np.zeros(0, dtype=np.int64)
    order = np.argsort(s, kind="stable")
    s_sorted, e_reach = s[order], np.maximum.accumulate(e[order])
    # A new group starts where a range begins after every earlier range has ended.
    new = np.concatenate([[True], s_sorted[1:] > e_reach[:-1]])
    heads = np.flatnonzero(new)
    group_starts = s_sorted[heads]
    group_ends = e_reach[np.concatenate([heads[1:] - 1, [len(s_sorted) - 1]])]
    gaps = group_starts[1:] - group_ends[:-1]
    budget = overfetch * float((group_ends - group_starts).sum())
    join = np.zeros(len(gaps), dtype=bool)
    cheapest = np.argsort(gaps, kind="stable")
    join[cheapest[: int(np.searchsorted(np.cumsum(gaps[cheapest]), budget, side="right"))]] = True
    keep = np.concatenate([[True], ~join])  # a group that opens a merged range
    merged_of_group = np.cumsum(keep) - 1
    merged_starts = group_starts[keep]
    merged_ends = group_ends[np.concatenate([np.flatnonzero(keep)[1:] - 1, [len(group_starts) - 1]])]
    owner = np.empty(len(s), dtype=np.int64)
    owner[order] = merged_of_group[np.cumsum(new) - 1]
    return merged_starts, merged_ends, owner


class ChunkCache:
    """Aligned chunks of remote files on a node-local folder shared by the node's ranks; LRU-bounded in bytes."""

    def __init__(self, folder: str | os.PathLike[str], limit_bytes: int, chunk_bytes: int = CHUNK_BYTES):
        self.folder, self.limit, self.chunk = Path(folder), int(limit_bytes), int(chunk_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._written = 0  # bytes this process added since its last eviction pass

    def read(self, files: RemoteFiles, name: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        size = files.sizes[name]
        wanted = sorted(
            {c for s, e in zip(starts, ends) for c in range(s // self.chunk, (max(e, s + 1) - 1) // self.chunk + 1)}
        )
        chunks: dict[int, bytes] = {}
        missing = []
        for c in wanted:
            path = self._path(files, name, c)
            try:
                chunks[c] = path.read_bytes()
                os.utime(path)  # recently used: evicted last
                STATS.add(cache_hit_bytes=len(chunks[c]))
            except FileNotFoundError:
                missing.append(c)
        if missing:
            fetched = files.fetch(
                [name] * len(missing),
                [c * self.chunk for c in missing],
                [min(size, (c + 1) * self.chunk) for c in missing],
            )
            for c, data in zip(missing, fetched):
                chunks[c] = data
                self._store(self._path(files, name, c), data)
        return [_slice(chunks, self.chunk, s, e) for s, e in zip(starts, ends)]

    def _path(self, files: RemoteFiles, name: str, chunk: int) -> Path:
        key = hashlib.sha256(f"{files.url}/{name}\0{files.sizes[name]}".encode()).hexdigest()[:24]
        return self.folder / f"{key}-{chunk:08d}"

    def _store(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)  # atomic: another rank sees the whole chunk or none
        self._written += len(data)
        # Each of the node's ranks evicts after adding 1/16 of the limit between them: the folder outgrows the limit
        # by at most ~1/16 (what the operator's 7/8 of the volume leaves room for, with the chunks being written).
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        if self._written >= max(self.chunk, self.limit // (16 * local_ranks)):
            self.evict()

    def evict(self) -> None:
        """Delete the least recently used chunks until the folder holds at most the limit."""
        self._written = 0
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue  # another rank evicted it
            entries.append((stat.st_mtime_ns, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            Path(path).unlink(missing_ok=True)
            total -= size


def _slice(chunks: dict[int, bytes], chunk: int, start: int, end: int) -> bytes:
    parts = []
    position = start
    while position < end:
        c = position // chunk
        base = c * chunk
        stop = min(end, base + chunk)
        parts.append(chunks[c][position - base : stop - base])
        position = stop
    return b"".join(parts)


def cache_from_env() -> ChunkCache | None:
    """The node-local chunk cache the pod asks for: ``STAGERUN_DATA_CACHE_BYTES`` > 0 turns it on, in
    ``STAGERUN_DATA_CACHE_DIR`` (default ``$STAGERUN_CACHE/chunks``)."""
    limit = int(os.environ.get("STAGERUN_DATA_CACHE_BYTES", "0") or 0)
    if limit <= 0:
        return None
    folder = os.environ.get("STAGERUN_DATA_CACHE_DIR") or str(cache_root() / "chunks")
    return ChunkCache(folder, limit)


def cache_root() -> Path:
    return Path(os.environ.get("STAGERUN_CACHE", str(Path.home() / ".cache" / "stagerun")))
