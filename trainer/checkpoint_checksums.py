"""Checksums of checkpoint files: computed while DCP writes them, recorded in the commit marker, verified on load.

Why: a flipped bit in a committed ``.distcp`` would otherwise load without a word and train on garbage (issue 19).

Saving: every rank hashes (sha256) the bytes of the files *it* writes as they stream out (:class:`ChecksumWriter`
wraps the write stream), so nothing is read back and the cost scales with the rank's own shard. The digests are
gathered to rank 0 at the commit (:func:`gather_digests`), which adds ``meta.json`` (hashed from the bytes it
writes) and puts the whole table in the ``COMMITTED`` marker: ``files: {name: {sha256, bytes}}``.

Loading: the files are split among the ranks by size (:func:`verify_files`), each rank streams and hashes its
share, and the verdicts are all-gathered, so every rank decides the same way and a checkpoint of N files costs
one read of each file on some rank, in parallel. That is a second read of what DCP then loads (DCP reads byte
ranges, not whole files, so the loading read cannot check a whole-file digest); on local disks the verified files
usually stay in the page cache. Sizes are compared first, from a listing: a truncated file is named at once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from fsspec import AbstractFileSystem

from stagerun.core import storage

from .checkpoint_ranks import dist_on, rank, world
from .compat import FsspecWriter

__all__ = ["ALGORITHM", "ChecksumError", "ChecksumWriter", "digest_of", "gather_digests", "verify_files"]

ALGORITHM = "sha256"
_READ_CHUNK = 8 << 20
_METADATA = ".metadata"


class ChecksumError(Exception):
    """A committed checkpoint's files do not match the digests in its marker (damaged, truncated or missing)."""

    def __init__(self, folder_url: str, problems: list[str], *, transient: bool = False) -> None:
        # transient: a file could not be read (storage or network trouble): the checkpoint may well be intact
        self.folder_url, self.problems, self.transient = folder_url, problems, transient
        what = "could not be verified" if transient else "is damaged"
        super().__init__(f"checkpoint {folder_url} {what}: {'; '.join(problems)}")


def digest_of(data: bytes) -> dict[str, Any]:
    return {ALGORITHM: hashlib.new(ALGORITHM, data).hexdigest(), "bytes": len(data)}


class _HashingStream:
    """A write stream that hashes what passes through it; everything else is the wrapped stream's."""

    def __init__(self, raw: Any) -> None:
        self._raw, self._hash, self.size = raw, hashlib.new(ALGORITHM), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)  # releases the GIL for large buffers: an async save's thread does not stall training
        self.size += view.nbytes
        return self._raw.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self._raw, name)


class ChecksumWriter(FsspecWriter):
    """DCP's fsspec writer, recording ``{file name: {sha256, bytes}}`` of every file this rank writes."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.digests: dict[str, dict[str, Any]] = {}
        lock = threading.Lock()  # DCP may write with several threads
        fs = self.fs
        plain = fs.create_stream

        @contextmanager
        def create_stream(path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
            if "w" not in mode:
                with plain(path, mode) as reading:
                    yield reading
                return
            with plain(path, mode) as raw:
                hashing = _HashingStream(raw)
                yield hashing
            name = os.path.basename(os.fspath(path))
            if name.startswith(_METADATA):  # written as .metadata.tmp, then renamed: recorded under its final name
                name = _METADATA
            with lock:
                self.digests[name] = {ALGORITHM: hashing.hexdigest(), "bytes": hashing.size}

        fs.create_stream = create_stream  # type: ignore[method-assign]


def gather_digests(own: dict[str, dict[str, Any]], group: dist.ProcessGroup | None) -> dict[str, dict[str, Any]]:
    """Every rank's digests, merged, on rank 0 (collective; {} elsewhere)."""
    if not dist_on():
        return dict(own)
    out: list[Any] | None = [None] * dist.get_world_size(group) if rank() == 0 else None
    dist.gather_object(own, out, dst=0, group=group)
    merged: dict[str, dict[str, Any]] = {}
    for part in out or []:
        merged.update(part or {})
    return merged


def _hash_file(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    h, size = hashlib.new(ALGORITHM), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _share(files: dict[str, dict[str, Any]], ranks: int) -> list[list[str]]:
    """Files per rank, largest first to the least loaded rank: each rank reads about the same number of bytes."""
    loads, shares = [0] * ranks, [list[str]() for _ in range(ranks)]
    for name in sorted(files, key=lambda n: (-int(files[n].get("bytes", 0)), n)):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += int(files[name].get("bytes", 0))
    return shares


def _check_share(fs: AbstractFileSystem, folder: str, files: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    problems = []
    for name in names:
        path, want = storage.join(folder, name), files[name]
        try:
            size = fs.size(path)
            if size != want["bytes"]:
                problems.append(f"{name} has {size} bytes, the commit recorded {want['bytes']} (truncated?)")
                continue
            digest, _ = _hash_file(fs, path)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if digest != want[ALGORITHM]:
            recorded = want[ALGORITHM]
            problems.append(
                f"{name} does not match its {ALGORITHM} (recorded {recorded[:12]}..., read {digest[:12]}...)"
            )
    return problems


def verify_files(fs: AbstractFileSystem, folder: str, files: dict[str, dict[str, Any]]) -> None:
    """Check ``files`` (a marker's table) under ``folder`` (collective); raise ChecksumError on every rank when
    any file is missing, of another size or another digest."""
    names = _share(files, world())[rank()]
    fs.invalidate_cache(folder)
    unreadable = False
    try:
        mine = _check_share(fs, folder, files, names)
    except Exception as e:  # noqa: BLE001 - a read error must reach every rank, not leave them in the gather
        mine, unreadable = [f"reading {', '.join(names)} failed: {type(e).__name__}: {e}"], True
    verdicts = [(mine, unreadable)]
    if dist_on():
        everyone: list[Any] = [None] * world()
        dist.all_gather_object(everyone, (mine, unreadable))
        verdicts = everyone
    problems = sorted(p for part, _ in verdicts for p in part)
    if problems:
        transient = any(flag for _, flag in verdicts) and not any(part for part, flag in verdicts if not flag)
        raise ChecksumError(storage.to_url(fs, folder), problems, transient=transient)
