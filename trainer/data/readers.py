"""Readers of text, JSONL and Parquet inputs, with the file and line (or row) of every record they reject.

Which files the inputs name, and in which format each is read, is :mod:`.inputs` (its names are re-exported here).

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .inputs import (
    COMPRESSION_SUFFIXES,
    FORMATS,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    BadRecords,
    DataError,
    InputFile,
    InputStats,
    expand_inputs,
    file_format,
    open_input,
)

__all__ = [
    "COMPRESSION_SUFFIXES",
    "FORMATS",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "BadRecords",
    "DataError",
    "InputFile",
    "InputStats",
    "Record",
    "expand_inputs",
    "file_format",
    "parquet_row_groups",
    "read_records",
    "read_texts",
]

READ_BLOCK = 8 * 2**20
MIN_READ = 64 * 2**10
PARQUET_BATCH_ROWS = 4096
NO_TEXT_FIELD_FIX = "set textField (--text-field on the command line) to the field that holds the document text"


class _ParquetSource:
    """A Parquet file for pyarrow: opened through fsspec, or (streaming storage) read into memory first, since
    Parquet needs random access to its footer."""

    def __init__(self, file: InputFile):
        self.file = file
        self._open: Any = None  # the fsspec OpenFile, when the file is read through it

    def __enter__(self):
        if self.file.streaming:
            import pyarrow as pa

            with open_input(self.file) as handle:
                return pa.BufferReader(handle.read())
        self._open = open_input(self.file)
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
    with open_input(file) as handle:
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
            with open_input(self.file) as handle:
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
    with open_input(file) as handle:
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
