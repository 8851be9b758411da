"""Readers of text, JSONL and Parquet inputs, with the file and line (or row) of every record they reject.

Inputs are local paths, folders, globs or any fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ``memory://``);
``expand_inputs`` turns them into ``InputFile`` entries in a deterministic order (inputs in the order given, the
files of each sorted by path). How a file is read follows its format (``--format``, or by extension when auto):

- text: the whole file is one document (``.txt``, ``.md``, ``.py``, anything not named below);
- jsonl: one document per line, the string in ``text_field`` (``.jsonl``, ``.ndjson``, ``.json``);
- parquet: one document per row, the string (or UTF-8 binary) column ``text_field`` (``.parquet``, ``.pq``).

Compressed files (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4``) are decompressed on the fly.

A malformed record (an empty file, invalid UTF-8, a JSONL line that is not JSON or lacks the text field, a null
Parquet value, a Parquet file without the column) goes to a ``BadRecords`` policy: by default it raises a
``DataError`` naming the file and line (or row) and the fix; with ``skip=True`` it is skipped and counted (per
input, plus the first examples), so nothing is ever lost silently. Blank JSONL lines are not records; empty texts
(``""``) are valid records that make no document and are counted as ``empty``.

Big uncompressed JSONL files can be read in byte ranges (every line *starting* in [start, end) belongs to the
range), and Parquet files by row groups, so one huge file can be split over many workers. Line numbers in a range
that does not start at byte 0 are made absolute only when a message needs one (by counting the newlines before the
range once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import fsspec
from fsspec.utils import infer_compression

FORMATS = ("auto", "text", "jsonl", "parquet")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
READ_BLOCK = 8 * 2**20
MIN_READ = 64 * 2**10
PARQUET_BATCH_ROWS = 4096
MAX_EXAMPLES = 100
STREAMING_PROTOCOLS = frozenset({"http", "https"})
NO_TEXT_FIELD_FIX = "set textField (--text-field on the command line) to the field that holds the document text"


class DataError(ValueError):
    """A data problem a person can fix: the message names the file (and line) and the fix."""


def is_url(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


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
        except (FileNotFoundError, OSError):
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


def _open(file: InputFile):
    if file.streaming:
        return fsspec.open(file.url, mode="rb", compression=file.compression, block_size=0)
    return fsspec.open(file.url, mode="rb", compression=file.compression)


class _ParquetSource:
    """A Parquet file for pyarrow: opened through fsspec, or (streaming storage) read into memory first, since
    Parquet needs random access to its footer."""

    def __init__(self, file: InputFile):
        self.file = file
        self._open = None

    def __enter__(self):
        if self.file.streaming:
            import pyarrow as pa

            with _open(self.file) as handle:
                return pa.BufferReader(handle.read())
        self._open = _open(self.file)
        return self._open.__enter__()

    def __exit__(self, *exc):
        if self._open is not None:
            return self._open.__exit__(*exc)
        return False


# --- reading -----------------------------------------------------------------------------------------------------


def read_texts(
    file: InputFile,
    *,
    text_field: str = "text",
    bad: BadRecords | None = None,
    stats: InputStats | None = None,
    start: int = 0,
    end: int | None = None,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[str]:
    """The documents of one file (or of a byte range / row groups of it), non-empty strings in file order."""
    for _, text in _records(file, text_field, bad or BadRecords(), stats or InputStats(), start, end, row_groups):
        yield text


@dataclass(frozen=True)
class Record:
    text: str
    where: str  # "file", "file:line" (JSONL) or "file: row N" (Parquet, 0-based)


def read_records(
    file: InputFile, *, text_field: str = "text", bad: BadRecords | None = None, stats: InputStats | None = None
) -> Iterator[Record]:
    """Like ``read_texts`` for a whole file, each document with its provenance."""
    for locator, text in _records(file, text_field, bad or BadRecords(), stats or InputStats(), 0, None, None):
        if locator is None:
            where = file.shown
        elif file.format == "parquet":
            where = f"{file.shown}: row {locator}"
        else:
            where = f"{file.shown}:{locator}"
        yield Record(text, where)


def _records(
    file: InputFile,
    text_field: str,
    bad: BadRecords,
    stats: InputStats,
    start: int,
    end: int | None,
    row_groups: tuple[int, int] | None,
) -> Iterator[tuple[int | None, str]]:
    if file.size == 0 and start == 0:
        bad(
            stats,
            file.shown,
            "empty file (0 bytes)",
            "remove it from the inputs, or replace it with the complete file (an interrupted download?)",
            whole_file=True,
        )
        return
    if file.format == "jsonl":
        yield from _jsonl(file, text_field, bad, stats, start, end)
    elif file.format == "parquet":
        yield from _parquet(file, text_field, bad, stats, row_groups)
    else:
        yield from _text(file, bad, stats)


def _text(file: InputFile, bad: BadRecords, stats: InputStats) -> Iterator[tuple[None, str]]:
    with _open(file) as handle:
        data = handle.read()
    stats.bytes += file.size if file.size is not None else len(data)
    if not data:
        bad(stats, file.shown, "empty file (nothing after decompressing)", "remove it from the inputs", whole_file=True)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad(
            stats,
            file.shown,
            f"not UTF-8 text (invalid byte at offset {exc.start}, line {line})",
            "convert the file to UTF-8 or remove it from the source",
        )
        return
    stats.documents += 1
    yield None, text


class _LineNumbers:
    """Absolute line numbers for a byte range: the newlines before its first line are counted once, when first
    needed (``first``: the byte offset of the range's first line, set by ``_lines``)."""

    def __init__(self, file: InputFile, start: int):
        self.file = file
        self.first = start
        self._base = 0 if start == 0 else None

    def where(self, relative: int) -> str:
        if self._base is None:
            count = 0
            with _open(self.file) as handle:
                left = self.first
                while left > 0:
                    block = handle.read(min(READ_BLOCK, left))
                    if not block:
                        break
                    count += block.count(b"\n")
                    left -= len(block)
            self._base = count
        return f"{self.file.shown}:{self._base + relative}"


def _lines(handle, start: int, end: int | None, numbers: _LineNumbers | None = None) -> Iterator[bytes]:
    """Each line (without its newline) that starts in [start, end) of the file (end None: to the end)."""
    skip_first = start > 0
    if skip_first:
        handle.seek(start - 1)  # the line holding byte start - 1 belongs to the previous range
    position = start - 1 if skip_first else 0
    carry = b""
    while True:
        size = READ_BLOCK if end is None else max(MIN_READ, min(READ_BLOCK, end - position))
        block = handle.read(size)
        if not block:
            break
        parts = (carry + block).split(b"\n") if carry else block.split(b"\n")
        carry = parts.pop()
        for line in parts:
            if skip_first:
                skip_first = False
                if numbers is not None:
                    numbers.first = position + len(line) + 1
            else:
                if end is not None and position >= end:
                    return
                yield line
            position += len(line) + 1
    if carry and not skip_first and (end is None or position < end):
        yield carry


def _jsonl(
    file: InputFile, text_field: str, bad: BadRecords, stats: InputStats, start: int, end: int | None
) -> Iterator[tuple[int, str]]:
    lines = _LineNumbers(file, start)
    compressed = file.compression is not None
    with _open(file) as handle:
        for lineno, line in enumerate(_lines(handle, start, end, lines), start=1):
            if not compressed:
                stats.bytes += len(line) + 1
            if not line.strip():
                continue  # a blank line is no record
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                bad(
                    stats,
                    lines.where(lineno),
                    f"not UTF-8 text (invalid byte at column {exc.start + 1})",
                    "convert the file to UTF-8, or fix or remove the line",
                )
                continue
            except json.JSONDecodeError as exc:
                bad(
                    stats,
                    lines.where(lineno),
                    f"not valid JSON at column {exc.colno} ({exc.msg})",
                    "fix or remove the line (JSONL holds one JSON object per line)",
                )
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = f" (it has {', '.join(map(repr, list(record)[:8]))})" if isinstance(record, dict) else ""
                bad(stats, lines.where(lineno), f"no field {text_field!r} in this record{keys}", NO_TEXT_FIELD_FIX)
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad(
                    stats,
                    lines.where(lineno),
                    f"field {text_field!r} is {type(text).__name__}, not a string",
                    NO_TEXT_FIELD_FIX,
                )
                continue
            if not text:
                stats.empty += 1
                continue
            stats.documents += 1
            yield lineno, text
    if compressed:
        stats.bytes += file.size or 0


def _group_bytes(group) -> int:
    """A row group's bytes on storage (its column chunks, compressed)."""
    return sum(group.column(c).total_compressed_size for c in range(group.num_columns)) or group.total_byte_size


def parquet_row_groups(file: InputFile) -> list[tuple[int, int]]:
    """(rows, bytes on storage) of each row group of a Parquet file (read from its footer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _ParquetSource(file) as handle:
        try:
            metadata = pq.ParquetFile(handle).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(
                f"{file.shown}: not a Parquet file ({exc}): remove it from the inputs or set --format"
            ) from None
        groups = []
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            groups.append((group.num_rows, _group_bytes(group)))
    return groups


def _parquet(
    file: InputFile, text_field: str, bad: BadRecords, stats: InputStats, row_groups: tuple[int, int] | None
) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _ParquetSource(file) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            stats.bytes += (file.size or 0) if row_groups is None or row_groups[0] == 0 else 0
            bad(
                stats,
                file.shown,
                f"not a Parquet file ({exc})",
                "remove it from the inputs, or replace it with the complete file",
                whole_file=True,
            )
            return
        schema = parquet.schema_arrow
        metadata = parquet.metadata
        first, last = row_groups or (0, metadata.num_row_groups)
        sizes = [_group_bytes(metadata.row_group(g)) for g in range(metadata.num_row_groups)]
        total = sum(sizes) or 1
        # Bytes of the file per row group, in proportion, so that all groups together count the file's size.
        size = file.size or 0
        share = [size * s // total for s in sizes]
        if share:
            share[-1] = size - sum(share[:-1])
        if schema.get_field_index(text_field) < 0:
            stats.bytes += sum(share[first:last])
            columns = ", ".join(repr(n) for n in schema.names[:12])
            bad(stats, file.shown, f"no column {text_field!r} (it has {columns})", NO_TEXT_FIELD_FIX, whole_file=True)
            return
        kind = schema.field(text_field).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        is_text = (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind))
        )
        is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (is_text or is_binary):
            stats.bytes += sum(share[first:last])
            bad(
                stats,
                file.shown,
                f"column {text_field!r} holds {kind}, not strings",
                NO_TEXT_FIELD_FIX,
                whole_file=True,
            )
            return
        row = sum(metadata.row_group(g).num_rows for g in range(first))
        for group in range(first, last):
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        bad(
                            stats,
                            f"{file.shown}: row {row}",
                            f"{text_field!r} is null",
                            "fill in the text or drop the row",
                        )
                    else:
                        if is_binary:
                            try:
                                value = value.decode("utf-8")
                            except UnicodeDecodeError as exc:
                                bad(
                                    stats,
                                    f"{file.shown}: row {row}",
                                    f"not UTF-8 text (invalid byte at offset {exc.start})",
                                    "convert the column to UTF-8 or drop the row",
                                )
                                row += 1
                                continue
                        if value:
                            stats.documents += 1
                            yield row, value
                        else:
                            stats.empty += 1
                    row += 1
            stats.bytes += share[group]
