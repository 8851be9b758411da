"""Small fsspec helpers shared by checkpoints (and anything else that writes run artefacts).

Every function takes an ``fsspec`` filesystem plus a protocol-less path (what ``url_to_fs`` returns), so the
same code serves a local path, a PVC mount, ``memory://`` in tests and object stores (``s3://``, ``gs://``).
The one place where backends differ is atomic replacement: see :func:`write_bytes_atomic`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "resolve",
    "is_url",
    "is_local",
    "join",
    "to_url",
    "read_json",
    "write_bytes_atomic",
    "folder_bytes",
    "list_subdirs",
    "delete_folder_marker_first",
]


def resolve(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path without protocol)`` for a local path or any fsspec URL."""
    fs, path = url_to_fs(os.fspath(url), **(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a remote (or in-memory) fsspec location rather than a local file; ``file://`` is local."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *names: str) -> str:
    # fsspec paths are always "/"-separated, also for the local filesystem, so posix joining is right everywhere.
    return "/".join([base.rstrip("/"), *names])


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL a user (or another fsspec call) can open again: a plain path when local, else ``proto://path``."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    raw = fs.cat_file(path)  # FileNotFoundError propagates: callers decide whether a missing file is an error
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(
            f"{to_url(fs, path)} is not valid JSON ({e}); the file is damaged - delete it (or its folder) "
            "so the run falls back to an older checkpoint"
        ) from e


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either no file or the whole file, never a prefix.

    Local filesystems (incl. PVC mounts): temp file in the same folder, fsync, ``os.replace`` (atomic within one
    filesystem), then fsync the folder so the rename itself survives a power loss. Object stores: a single PUT
    is atomic by construction (the object appears only when the upload completes), so ``pipe_file`` suffices.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; the marker must be readable like the DCP files beside it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def folder_bytes(fs: AbstractFileSystem, path: str) -> int:
    """Sum of the sizes of all files under ``path`` (0 if it does not exist)."""
    try:
        files = fs.find(path, detail=True)
    except FileNotFoundError:
        return 0
    return sum(int(info.get("size") or 0) for info in files.values() if info.get("type") != "directory")


def list_subdirs(fs: AbstractFileSystem, path: str) -> list[str]:
    """Names (not paths) of the immediate sub-folders of ``path``; [] if ``path`` does not exist yet."""
    # Object-store listings are cached per filesystem instance; other ranks/processes write here, so drop it.
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def delete_folder_marker_first(fs: AbstractFileSystem, folder: str, marker: str) -> None:
    """Delete ``folder/marker`` first, then the folder.

    The marker is what makes a folder count as a valid checkpoint; removing it first means a deletion that is
    interrupted half-way leaves an uncommitted folder (ignored, cleaned up later), never a committed one with
    missing files.
    """
    marker_path = join(folder, marker)
    if fs.exists(marker_path):
        fs.rm_file(marker_path)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    fs.invalidate_cache(folder)
