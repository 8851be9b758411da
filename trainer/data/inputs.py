"""The inputs of the data tools: which files a path, folder, glob or fsspec URL names, and how each is read.

Inputs are local paths, folders, globs or any fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ``memory://``);
``expand_inputs`` turns them into ``InputFile`` entries in a deterministic order (inputs in the order given, the
files of each sorted by path). How a file is read follows its format (``--format``, or by extension when auto):

- text: the whole file is one document (``.txt``, ``.md``, ``.py``, anything not named below);
- jsonl: one document per line, the string in ``text_field`` (``.jsonl``, ``.ndjson``, ``.json``);
- parquet: one document per row, the string (or UTF-8 binary) column ``text_field`` (``.parquet``, ``.pq``).

Compressed files (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4``) are decompressed on the fly. The readers
themselves, and the ``BadRecords`` policy they apply, are described in :mod:`.readers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
from fsspec.utils import infer_compression

from stagerun.core.storage import is_url

FORMATS = ("auto", "text", "jsonl", "parquet")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
MAX_EXAMPLES = 100
STREAMING_PROTOCOLS = frozenset({"http", "https"})


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


def _list(pattern: str, what: str) -> list[tuple[str, dict]]:
    fs, root = fsspec.core.url_to_fs(pattern)
    if any(ch in pattern for ch in "*?["):
        found = fs.glob(root, detail=True)
        entries = [(p, info) for p, info in sorted(found.items()) if info.get("type", "file") != "directory"]
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
                )
            )
    return files


def open_input(file: InputFile) -> Any:
    """The file opened for binary reading (decompressed on the fly); streaming storage is read front to back."""
    if file.streaming:
        return fsspec.open(file.url, mode="rb", compression=file.compression, block_size=0)
    return fsspec.open(file.url, mode="rb", compression=file.compression)
