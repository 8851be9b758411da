"""The inputs of the data tools: which files a path, folder, glob or fsspec URL names, and how each is read.

Inputs are local paths, folders, globs or any fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ``memory://``);
``expand_inputs`` turns them into ``InputFile`` entries in a deterministic order (inputs in the order given, the
files of each sorted by path). How a file is read follows its format (``--format``, or by extension when auto):

- text: the whole file is one document (``.txt``, ``.md``, ``.py``, anything not named below);
- jsonl: one document per line, the string in ``text_field`` (``.jsonl``, ``.ndjson``, ``.json``);
- parquet: one document per row, the string (or UTF-8 binary) column ``text_field`` (``.parquet``, ``.pq``).

Compressed files (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4``) are decompressed on the fly, as a stream; with
``ReadLimits.max_expansion`` a file that decompresses to more than that many times the compressed bytes read so far
(a decompression bomb) stops with an error naming the file. The readers themselves, and the ``BadRecords`` policy
they apply, are described in :mod:`.readers`.

Local folders are walked following symbolic links (a file or folder reached twice is read once); what cannot be read
as a file (a link that loops back into a folder being read, a broken link, a FIFO, a folder that cannot be listed) is
kept as an ``InputFile`` with its ``problem``, which the readers report through the ``BadRecords`` policy like any
malformed input, instead of failing while listing or blocking on a FIFO.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from stagerun.core.storage import is_url

FORMATS = ("auto", "text", "jsonl", "parquet")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
MAX_EXAMPLES = 100
STREAMING_PROTOCOLS = frozenset({"http", "https"})
# Each compressed file may always decompress to this much, whatever its ratio (small, very repetitive files are fine).
EXPANSION_ALLOWANCE = 16 * 2**20
EXPANSION_READ = 2**20  # how much a whole-file read takes at a time, so that the expansion check runs as it goes
# The Python package each codec needs: fsspec knows a suffix only when its package is installed.
CODEC_PACKAGES = {".zst": "zstandard", ".lz4": "lz4"}


class DataError(ValueError):
    """A data problem a person can fix: the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class InputFile:
    """One file to read: where it is, how to read it, and what identifies its content."""

    url: str  # what fsspec opens: a local path or a full URL
    shown: str  # the name in messages
    format: str  # text | jsonl | parquet
    size: int | None  # bytes on storage (compressed size for compressed files); None: unknown (some HTTP servers)
    compression: str | None
    fingerprint: str  # changes when the content does (ETag, mtime, creation time)
    input_index: int = 0  # the input (pattern) it came from
    problem: str | None = None  # why it cannot be read as a file (a link loop, a FIFO): the readers report it

    @property
    def streaming(self) -> bool:
        """Whether the file is read front to back only (HTTP servers need not support range requests)."""
        return self.url.split("://", 1)[0] in STREAMING_PROTOCOLS

    @property
    def splittable(self) -> bool:
        """Whether byte ranges of the file can be read on their own (uncompressed JSONL, seekable storage)."""
        return self.format == "jsonl" and self.compression is None and not self.streaming and self.size is not None


@dataclass
class InputStats:
    """What reading produced, per input: filled in while reading (``bytes``: of the files on storage)."""

    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    empty: int = 0  # records whose text is "" (no document made)
    skipped_records: int = 0  # malformed records skipped (--skip-bad-records)
    skipped_files: int = 0  # whole files skipped: empty, unreadable, or without the text column

    def add(self, other: InputStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict:
        return {
            "numDocuments": self.documents,
            "numTokens": self.tokens,
            "bytes": self.bytes,
            "emptyDocuments": self.empty,
            "skippedRecords": self.skipped_records,
            "skippedFiles": self.skipped_files,
        }

    @classmethod
    def from_json(cls, data: dict) -> InputStats:
        return cls(
            documents=data["numDocuments"],
            tokens=data["numTokens"],
            bytes=data["bytes"],
            empty=data["emptyDocuments"],
            skipped_records=data["skippedRecords"],
            skipped_files=data["skippedFiles"],
        )


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one input may make a reader hold or decompress (None: unbounded), and the options that set
    them, named in the errors."""

    max_record_bytes: int | None = None  # a JSONL line, a whole text file, a Parquet value
    max_expansion: float | None = None  # decompressed bytes per compressed byte (after EXPANSION_ALLOWANCE)
    record_option: str = "--max-record-bytes"
    expansion_option: str = "--max-expansion"


@dataclass
class BadRecords:
    """The policy for malformed records: raise a DataError (default), or skip and count them.

    ``hint`` is appended to every error message (the command line adds how to skip instead).
    """

    skip: bool = False
    hint: str = ""
    examples: list[dict] = field(default_factory=list)

    def __call__(self, stats: InputStats, where: str, problem: str, fix: str, *, whole_file: bool = False) -> None:
        if not self.skip:
            raise DataError(f"{where}: {problem}: {fix}{self.hint}")
        if whole_file:
            stats.skipped_files += 1
        else:
            stats.skipped_records += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "problem": problem})


# --- finding the files -------------------------------------------------------------------------------------------


def _suffix_format(name: str) -> str:
    stem = name
    for suffix in COMPRESSION_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    if stem.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl" if stem.endswith(JSONL_SUFFIXES) else "text"


def file_format(name: str, declared: str = "auto") -> str:
    """The format a file is read in: the declared one, or (auto) the one its extension names."""
    if declared in ("text", "jsonl", "parquet"):
        return declared
    if declared != "auto":
        raise DataError(f"format {declared!r} is not one of {', '.join(FORMATS)}")
    return _suffix_format(name)


def _fingerprint(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            if isinstance(value, datetime):
                value = value.timestamp()
            return f"{key}={value}"
    return ""


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _local_entry(path: str) -> tuple[str, dict]:
    """What a local path is, following links: ("file", info), ("dir", info with "id") or ("problem", info with
    "problem"). Never opens it (a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            if exc.errno == errno.ELOOP:
                problem = "a symbolic link loop (it leads back to itself)"
            else:
                problem = f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        else:
            problem = f"cannot be read ({exc.strerror or exc})"
        return "problem", {"name": path, "size": 0, "problem": problem}
    if stat.S_ISDIR(st.st_mode):
        return "dir", {"name": path, "id": (st.st_dev, st.st_ino)}
    if stat.S_ISREG(st.st_mode):
        info = {"name": path, "size": st.st_size, "type": "file", "mtime": st.st_mtime, "id": (st.st_dev, st.st_ino)}
        return "file", info
    return "problem", {"name": path, "size": 0, "problem": "not a regular file (a FIFO, socket or device)"}


def _walk_local(base: str) -> list[tuple[str, dict]]:
    """Every file under a local folder (hidden names skipped), following symbolic links; a file or folder reached
    twice is listed once (first path in sorted order), a link back into a folder being walked is a problem entry."""
    seen: set[tuple[int, int]] = set()
    found: dict[str, dict] = {}

    def walk(folder: str, ancestors: frozenset) -> None:
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            found[folder] = {"size": 0, "problem": f"a folder that cannot be listed ({exc.strerror or exc})"}
            return
        for name in names:
            if name.startswith((".", "_")):
                continue
            path = f"{folder}/{name}"
            kind, info = _local_entry(path)
            if kind == "dir":
                if info["id"] in ancestors:
                    target = os.path.realpath(path)
                    found[path] = {
                        "size": 0,
                        "problem": f"a symbolic link to {target}, a folder that holds it (a loop)",
                    }
                elif info["id"] not in seen:
                    seen.add(info["id"])
                    walk(path, ancestors | {info["id"]})
            elif kind == "file":
                if info["id"] not in seen:
                    seen.add(info["id"])
                    found[path] = info
            else:
                found[path] = info

    top: tuple[int, int] = _local_entry(base)[1]["id"]  # base is a folder: _list checked
    seen.add(top)
    walk(base, frozenset({top}))
    return sorted(found.items())


def _list(pattern: str, what: str) -> list[tuple[str, dict]]:
    fs, root = fsspec.core.url_to_fs(pattern)
    local = isinstance(fs, LocalFileSystem)
    if any(ch in pattern for ch in "*?["):
        found = fs.glob(root, detail=True)
        if local:  # links followed: a link to a folder is a folder, a broken one a problem entry
            found = {path: info for path in found for kind, info in [_local_entry(path)] if kind != "dir"}
        entries = [(p, info) for p, info in sorted(found.items()) if info.get("type", "file") != "directory"]
    elif local and os.path.isdir(root):
        if os.path.exists(f"{root.rstrip('/')}/manifest.json"):
            raise DataError(
                f"{pattern} is a pretokenized shard set (it has manifest.json), not text: set the "
                f"source's format to tokens (or auto), or point it at the text files"
            )
        entries = _walk_local(root.rstrip("/") or "/")
    elif local and os.path.lexists(root):
        kind, info = _local_entry(root)
        entries = [] if kind == "dir" else [(root, info)]
    elif fs.isdir(root):
        base = root.rstrip("/")
        if fs.exists(f"{base}/manifest.json"):
            raise DataError(
                f"{pattern} is a pretokenized shard set (it has manifest.json), not text: set the "
                f"source's format to tokens (or auto), or point it at the text files"
            )
        found = fs.find(base, detail=True)
        entries = [
            (p, info)
            for p, info in sorted(found.items())
            if info.get("type", "file") != "directory" and not _hidden(p[len(base) :])
        ]
    else:
        try:
            info = fs.info(root)
        except FileNotFoundError:  # other OSErrors (timeouts, resets) propagate: `stagerun launch` retries them
            info = None
        entries = [(root, info)] if info is not None and info.get("type", "file") != "directory" else []
    if not entries:
        raise DataError(f"{pattern} matches no files: check {what} (a file, folder, glob or URL)")
    remote = is_url(pattern)
    return [(fs.unstrip_protocol(p) if remote else p, info) for p, info in entries]


def expand_inputs(patterns: Sequence[str], fmt: str = "auto", *, what: str = "the source's path") -> list[InputFile]:
    """The files the inputs name (each a file, folder, glob or URL), inputs in order, each one's files sorted.

    A folder means every file under it except hidden ones (names starting with "." or "_"). ``what`` names the
    setting in the error for an input that matches nothing.
    """
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    files: list[InputFile] = []
    seen: dict[str, str] = {}
    for index, pattern in enumerate(patterns):
        for url, info in _list(str(pattern), what):
            if url in seen:
                raise DataError(
                    f"{url} is named by two inputs ({seen[url]} and {pattern}): each file may be read "
                    f"once; narrow one of the inputs"
                )
            seen[url] = str(pattern)
            compression = infer_compression(url)
            for suffix, package in CODEC_PACKAGES.items():
                if compression is None and url.endswith(suffix):
                    raise DataError(
                        f"{url} is named as {suffix[1:]}-compressed, but the {package} package that reads it is "
                        f"not installed: pip install {package}, or decompress the file"
                    )
            kind = file_format(url, fmt)
            size = info.get("size")
            files.append(
                InputFile(
                    url=url,
                    shown=url,
                    format=kind,
                    size=None if size is None else int(size),
                    compression=None if kind == "parquet" else compression,
                    fingerprint=_fingerprint(info),
                    input_index=index,
                    problem=info.get("problem"),
                )
            )
    return files


def open_input(file: InputFile, limits: ReadLimits | None = None) -> Any:
    """The file opened for binary reading (decompressed on the fly, as a stream); streaming storage is read front
    to back. With ``limits.max_expansion``, decompression stops with a DataError past that ratio."""
    options = {"block_size": 0} if file.streaming else {}
    if file.compression is None or limits is None or limits.max_expansion is None:
        return fsspec.open(file.url, mode="rb", compression=file.compression, **options)
    return _BoundedOpen(file, limits, fsspec.open(file.url, mode="rb", **options))


class _Counted:
    """The compressed stream under a decompressor, counting the bytes the decompressor has taken from it."""

    def __init__(self, raw):
        self.raw = raw
        self.taken = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.taken += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _Bounded:
    """A decompressed stream that raises a DataError once it has given more than ``max_expansion`` times the
    compressed bytes read (plus EXPANSION_ALLOWANCE): a bomb is stopped early, whatever its size on storage."""

    def __init__(self, file: InputFile, limits: ReadLimits, counted: _Counted, inner):
        self.file, self.limits, self.counted, self.inner = file, limits, counted, inner
        self.ratio = limits.max_expansion or float("inf")
        self.given = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:  # the whole file, a piece at a time, so that the check runs as it grows
            parts = []
            while block := self.read(EXPANSION_READ):
                parts.append(block)
            return b"".join(parts)
        data = self.inner.read(size)
        self.given += len(data)
        ratio = self.ratio
        if self.given > ratio * self.counted.taken + EXPANSION_ALLOWANCE:
            given, taken = self.given / 2**20, self.counted.taken / 2**20
            raise DataError(
                f"{self.file.shown}: decompresses to more than {ratio:g} times its compressed size ({given:,.0f} "
                f"MiB from {taken:,.2f} MiB read so far), which is what a decompression bomb does: remove it from "
                f"the inputs, or raise {self.limits.expansion_option} (now {ratio:g}) if its content really is "
                f"that repetitive"
            )
        return data

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.inner.close()


class _BoundedOpen:
    """``open_input``'s context manager for a compressed file read under ``ReadLimits.max_expansion``."""

    def __init__(self, file: InputFile, limits: ReadLimits, opener):
        self.file, self.limits, self.opener = file, limits, opener
        self._bounded: _Bounded | None = None

    def __enter__(self) -> _Bounded:
        counted = _Counted(self.opener.__enter__())
        try:
            inner = compr[self.file.compression](counted, mode="rb")
        except BaseException:
            self.opener.__exit__(None, None, None)
            raise
        self._bounded = _Bounded(self.file, self.limits, counted, inner)
        return self._bounded

    def __exit__(self, *exc) -> None:
        try:
            if self._bounded is not None:
                self._bounded.close()
        finally:
            self.opener.__exit__(*exc)
