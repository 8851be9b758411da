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

Hostile input is bounded (``ReadLimits``): a record (a JSONL line, a text file, a Parquet value) over
``max_record_bytes`` is a malformed record, found without holding it (the line is read on to its end and dropped);
lines are scanned once, so a range never reads past its end looking for where its first line starts (a line of
gigabytes without a newline costs one pass, not one per range). A text with a lone UTF-16 surrogate (``"\\ud800"``,
which JSON allows and UTF-8 cannot encode) is a malformed record, and so is a file that cannot be read (no
permission, a symbolic link loop, a FIFO: see :mod:`.inputs`).
"""

from __future__ import annotations

import errno
import json
import re
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
    ReadLimits,
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
    "ChatRecord",
    "ReadLimits",
    "Record",
    "expand_inputs",
    "file_format",
    "parquet_row_groups",
    "read_chats",
    "read_records",
    "read_texts",
]

READ_BLOCK = 8 * 2**20
MIN_READ = 64 * 2**10
PARQUET_BATCH_ROWS = 4096
NO_TEXT_FIELD_FIX = "set textField (--text-field on the command line) to the field that holds the document text"
UNREADABLE_FIX = "fix it (its permissions, the link), or remove it from the inputs"
# Errors that say this file cannot be read whatever is retried; others (timeouts, resets) propagate as they are.
UNREADABLE = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
UNREADABLE_ERRNOS = frozenset({errno.ELOOP, errno.EIO, errno.ENXIO, errno.EACCES})
# A lone surrogate can only come from a \u escape (\ud800-\udfff) or the bytes UTF-8 would give one (json.loads
# reads bytes with "surrogatepass"): a cheap test of the line before the exact one of the text.
SURROGATE_IN_LINE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
SURROGATE = re.compile("[\ud800-\udfff]")


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
    limits: ReadLimits | None = None,
) -> Iterator[str]:
    """The documents of one file (or of a byte range / row groups of it), non-empty strings in file order."""
    reading = _Reading(file, text_field, bad or BadRecords(), stats or InputStats(), limits or ReadLimits())
    for _, text in _records(reading, start, end, row_groups):
        yield text


@dataclass(frozen=True)
class Record:
    text: str
    where: str  # "file", "file:line" (JSONL) or "file: row N" (Parquet, 0-based)


def read_records(
    file: InputFile,
    *,
    text_field: str = "text",
    bad: BadRecords | None = None,
    stats: InputStats | None = None,
    limits: ReadLimits | None = None,
) -> Iterator[Record]:
    """Like ``read_texts`` for a whole file, each document with its provenance."""
    reading = _Reading(file, text_field, bad or BadRecords(), stats or InputStats(), limits or ReadLimits())
    for locator, text in _records(reading, 0, None, None):
        if locator is None:
            where = file.shown
        elif file.format == "parquet":
            where = f"{file.shown}: row {locator}"
        else:
            where = f"{file.shown}:{locator}"
        yield Record(text, where)


@dataclass(frozen=True)
class _Reading:
    """One file being read, and how: what every reader function takes."""

    file: InputFile
    text_field: str
    policy: BadRecords
    stats: InputStats
    limits: ReadLimits

    def too_big(self, where: str, size: str) -> None:
        """A record over ``max_record_bytes``: malformed (an error, or skipped and counted)."""
        cap = self.limits.max_record_bytes
        self.bad(
            where,
            f"record of {size} bytes, over the {_size(cap)} limit",
            f"raise {self.limits.record_option} (now {cap}) if it really is one document, or split or remove it",
        )

    def bad(self, where: str, problem: str, fix: str, *, whole_file: bool = False) -> None:
        self.policy(self.stats, where, problem, fix, whole_file=whole_file)


def _size(count: int | None) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count is not None and count >= scale:
            return f"{count / scale:,.4g} {unit}"
    return f"{count} bytes" if count is not None else "unlimited"


def _unreadable(exc: OSError) -> bool:
    return isinstance(exc, UNREADABLE) or exc.errno in UNREADABLE_ERRNOS


def _records(
    r: _Reading, start: int, end: int | None, row_groups: tuple[int, int] | None
) -> Iterator[tuple[int | None, str]]:
    file, stats = r.file, r.stats
    if file.problem is not None:
        if start == 0 and (row_groups is None or row_groups[0] == 0):
            r.bad(file.shown, file.problem, UNREADABLE_FIX, whole_file=True)
        return
    if file.size == 0 and start == 0:
        r.bad(
            file.shown,
            "empty file (0 bytes)",
            "remove it from the inputs, or replace it with the complete file (an interrupted download?)",
            whole_file=True,
        )
        return
    try:
        if file.format == "jsonl":
            yield from _jsonl(r, start, end)
        elif file.format == "parquet":
            yield from _parquet(r, row_groups)
        else:
            yield from _text(r)
    except OSError as exc:
        if not _unreadable(exc):
            raise
        first = start == 0 and (row_groups is None or row_groups[0] == 0)
        if first:
            stats.bytes += file.size or 0
        if first or not r.policy.skip:  # a file split in ranges is skipped (and counted) once, by its first
            r.bad(file.shown, f"cannot be read ({exc.strerror or exc})", UNREADABLE_FIX, whole_file=True)


def _read_at_most(handle, count: int) -> bytes:
    """Up to ``count`` bytes (fewer only at the end of the file), whatever the stream returns per read."""
    parts, left = [], count
    while left > 0 and (block := handle.read(min(left, READ_BLOCK))):
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _text(r: _Reading) -> Iterator[tuple[None, str]]:
    file, stats, cap = r.file, r.stats, r.limits.max_record_bytes
    with open_input(file, r.limits) as handle:
        data = handle.read() if cap is None else _read_at_most(handle, cap + 1)
    stats.bytes += file.size if file.size is not None else len(data)
    if not data:
        r.bad(file.shown, "empty file (nothing after decompressing)", "remove it from the inputs", whole_file=True)
        return
    if cap is not None and len(data) > cap:
        r.too_big(file.shown, f"more than {cap}")  # the whole file is one document
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        r.bad(
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


class _Overlong:
    """Stands for a line longer than ``max_line`` in what ``_lines`` yields (the line itself is not kept)."""

    __slots__ = ("length", "offset")

    def __init__(self, offset: int, length: int | None = None):
        self.offset = offset  # where the line starts in the file
        self.length = length  # None until its end is found (set before the next line is yielded)


def _lines(
    handle, start: int, end: int | None, numbers: _LineNumbers | None = None, max_line: int | None = None
) -> Iterator[bytes | _Overlong]:
    """Each line (without its newline) that starts in [start, end) of the file (end None: to the end).

    Every byte is looked at once (no re-scanning of a growing line), and a range reads no further than its end
    while looking for where its first line starts, so a huge line costs one pass in all. A line longer than
    ``max_line`` is yielded as an ``_Overlong`` as soon as it is known to be, and then read on to its end and
    dropped (memory stays bounded).
    """
    seeking = start > 0  # the line holding byte start - 1 belongs to the previous range
    if seeking:
        handle.seek(start - 1)
    offset = start - 1 if seeking else 0  # file offset of the next byte read
    line_start = offset  # file offset of the current line's first byte
    pending = bytearray()  # the current line so far, when it spans blocks
    dropping: _Overlong | None = None  # the current line is overlong: read to its end, not kept
    while True:
        if end is None:
            size = READ_BLOCK
        elif offset < end:
            size = max(MIN_READ, min(READ_BLOCK, end - offset))
        elif dropping is not None:
            size = READ_BLOCK
        else:  # finishing the range's last line: grow the reads with it
            size = min(READ_BLOCK, max(MIN_READ, len(pending)))
        block = handle.read(size)
        if not block:
            break
        base, offset = offset, offset + len(block)
        i = 0
        if seeking:
            j = block.find(b"\n")
            if j < 0 or (end is not None and base + j >= end - 1):
                if j >= 0 or (end is not None and offset >= end - 1):
                    return  # no line starts in [start, end)
                continue
            seeking = False
            i = j + 1
            line_start = base + i
            if numbers is not None:
                numbers.first = line_start
        parts = (block[i:] if i else block).split(b"\n")  # this block only: each byte is split once
        tail = parts.pop()  # after the block's last newline: the start of a line that goes on
        position = base + i  # where the next part starts
        for part in parts:
            if end is not None and line_start >= end:
                return
            position += len(part) + 1
            if dropping is not None:
                dropping.length, dropping = position - 1 - line_start, None
            else:
                if pending:
                    pending += part
                    line, pending = bytes(pending), bytearray()
                else:
                    line = part
                yield line if max_line is None or len(line) <= max_line else _Overlong(line_start, len(line))
            line_start = position
        if end is not None and line_start >= end:
            return
        if dropping is None and tail:
            pending += tail
            if max_line is not None and len(pending) > max_line:
                pending, dropping = bytearray(), _Overlong(line_start)
                yield dropping
    if dropping is not None:
        dropping.length = offset - line_start
    elif pending and not seeking and (end is None or line_start < end):
        yield bytes(pending)


def _json_lines(r: _Reading, start: int, end: int | None) -> Iterator[tuple[int, bytes, Any, _LineNumbers]]:
    """Each JSONL line of the range that parses, as (line number, line, value, line numbers): blank lines skipped,
    overlong and unparsable ones given to the policy, the bytes read counted."""
    file, stats = r.file, r.stats
    lines = _LineNumbers(file, start)
    compressed = file.compression is not None
    cap = r.limits.max_record_bytes
    overlong: _Overlong | None = None  # the last overlong line: its bytes are counted once its end is known
    with open_input(file, r.limits) as handle:
        for lineno, line in enumerate(_lines(handle, start, end, lines, cap), start=1):
            if overlong is not None and not compressed:
                stats.bytes += (overlong.length or 0) + 1
            overlong = None
            if isinstance(line, _Overlong):
                overlong = line
                r.too_big(f"{lines.where(lineno)} (at byte {line.offset})", f"more than {cap}")
                continue
            if not compressed:
                stats.bytes += len(line) + 1
            if not line.strip():
                continue  # a blank line is no record
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                r.bad(
                    lines.where(lineno),
                    f"not UTF-8 text (invalid byte at column {exc.start + 1})",
                    "convert the file to UTF-8, or fix or remove the line",
                )
                continue
            except json.JSONDecodeError as exc:
                r.bad(
                    lines.where(lineno),
                    f"not valid JSON at column {exc.colno} ({exc.msg})",
                    "fix or remove the line (JSONL holds one JSON object per line)",
                )
                continue
            except (RecursionError, ValueError) as exc:  # nested thousands deep; an integer of 5,000 digits
                problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
                r.bad(lines.where(lineno), f"JSON that Python cannot read ({problem})", "fix or remove the line")
                continue
            yield lineno, line, record, lines
    if overlong is not None and not compressed:
        stats.bytes += (overlong.length or 0) + 1
    if compressed:
        stats.bytes += file.size or 0


def _lone_surrogate(field: str, text: str) -> str | None:
    """The problem of a text holding a lone surrogate, or None."""
    lone = SURROGATE.search(text)
    if lone is None:
        return None
    return (
        f"{field} holds a lone surrogate (\\u{ord(lone.group()):04x} at character {lone.start()}), which is no "
        f"character and cannot be encoded"
    )


SURROGATE_FIX = "fix the escapes (a surrogate needs its pair: \\ud83d\\ude00), or remove the line"


def _jsonl(r: _Reading, start: int, end: int | None) -> Iterator[tuple[int, str]]:
    stats, text_field = r.stats, r.text_field
    for lineno, line, record, lines in _json_lines(r, start, end):
        if not isinstance(record, dict) or text_field not in record:
            keys = f" (it has {', '.join(map(repr, list(record)[:8]))})" if isinstance(record, dict) else ""
            r.bad(lines.where(lineno), f"no field {text_field!r} in this record{keys}", NO_TEXT_FIELD_FIX)
            continue
        text = record[text_field]
        if not isinstance(text, str):
            r.bad(
                lines.where(lineno),
                f"field {text_field!r} is {type(text).__name__}, not a string",
                NO_TEXT_FIELD_FIX,
            )
            continue
        if SURROGATE_IN_LINE.search(line) and (problem := _lone_surrogate(f"field {text_field!r}", text)):
            r.bad(lines.where(lineno), problem, SURROGATE_FIX)
            continue
        if not text:
            stats.empty += 1
            continue
        stats.documents += 1
        yield lineno, text


# --- chat and preference records ---------------------------------------------------------------------------------

CHAT_CONTENTS = ("chat", "preference")
ROLES = ("system", "user", "assistant")
CHAT_FIX = (
    "each line of a chat file holds messages: [{role: system|user|assistant, content: text}, ...] with at least one "
    "assistant turn; fix or remove the line"
)
PREFERENCE_FIX = (
    "each line of a preference file holds prompt, chosen and rejected (each a string, or a list of {role, content} "
    "messages; chosen and rejected with an assistant turn), or chosen and rejected conversations that share the "
    "prompt as their first messages; fix or remove the line"
)
SPECIAL_FIX = (
    "the text would be read as that token (a turn or document end the conversation does not have): remove or "
    "reword it in the data, or remove the line"
)


@dataclass(frozen=True)
class ChatRecord:
    """A conversation (chat), or a preference pair: its prompt and the two responses, every message checked and
    reduced to {"role", "content"}."""

    messages: tuple[dict, ...]  # chat: the conversation; preference: the prompt
    chosen: tuple[dict, ...] = ()
    rejected: tuple[dict, ...] = ()


class _BadChat(Exception):
    """A malformed chat or preference record: which field and why (``problem``), and the fix when it is not the
    format's usual one."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def read_chats(
    file: InputFile,
    *,
    content: str,
    bad: BadRecords | None = None,
    stats: InputStats | None = None,
    start: int = 0,
    end: int | None = None,
    limits: ReadLimits | None = None,
    forbidden: re.Pattern | None = None,
) -> Iterator[ChatRecord]:
    """The conversations (``content`` "chat") or preference pairs ("preference") of one JSONL file or byte range.

    ``forbidden`` matches the tokenizer's special tokens: a message holding one is a malformed record, since the
    whole rendered conversation is tokenized with special tokens recognised (as transformers' apply_chat_template
    does). A pair counts as two documents (the prompt with each response)."""
    if content not in CHAT_CONTENTS:
        raise ValueError(f"content must be one of {CHAT_CONTENTS}, got {content!r}")
    reading = _Reading(file, "messages", bad or BadRecords(), stats or InputStats(), limits or ReadLimits())
    if file.problem is not None or file.size == 0:
        for _ in _records(reading, start, end, None):  # it only reports the file (skipped or an error)
            pass
        return
    fix = CHAT_FIX if content == "chat" else PREFERENCE_FIX
    try:
        for lineno, line, raw, lines in _json_lines(reading, start, end):
            try:
                record = _chat(raw) if content == "chat" else _preference(raw)
                _check_texts(record, line, forbidden)
            except _BadChat as exc:
                reading.bad(lines.where(lineno), exc.problem, exc.fix or fix)
                continue
            reading.stats.documents += 1 if content == "chat" else 2
            yield record
    except OSError as exc:
        if not _unreadable(exc):
            raise
        reading.bad(file.shown, f"cannot be read ({exc.strerror or exc})", UNREADABLE_FIX, whole_file=True)


def _messages(value: Any, field: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise _BadChat(f"{field} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _BadChat(f"{where} must be an object with role and content, got {type(message).__name__}")
        role, text = message.get("role"), message.get("content")
        if role not in ROLES:
            shown = repr(role)[:40] if role is not None else "missing"
            raise _BadChat(f"{where}.role is {shown}, expected one of {', '.join(ROLES)}")
        if not isinstance(text, str):
            shown = "missing" if "content" not in message else f"{type(text).__name__}, not a string"
            raise _BadChat(f"{where}.content is {shown}")
        out.append({"role": role, "content": text})
    return tuple(out)


def _has_assistant(messages: tuple[dict, ...]) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def _chat(raw: Any) -> ChatRecord:
    if not isinstance(raw, dict) or "messages" not in raw:
        keys = f" (it has {', '.join(map(repr, list(raw)[:8]))})" if isinstance(raw, dict) else ""
        raise _BadChat(f"no field 'messages' in this record{keys}")
    messages = _messages(raw["messages"], "messages")
    if not _has_assistant(messages):
        raise _BadChat("messages has no assistant turn, so nothing in it is trained on")
    return ChatRecord(messages)


def _turns(value: Any, field: str, role: str) -> tuple[dict, ...]:
    """A preference field: a string is one message of ``role``, a list is messages."""
    if isinstance(value, str):
        return ({"role": role, "content": value},)
    return _messages(value, field)


def _preference(raw: Any) -> ChatRecord:
    if not isinstance(raw, dict):
        raise _BadChat(f"expected an object with prompt, chosen and rejected, got {type(raw).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in raw]
    if missing:
        raise _BadChat(f"no field {missing[0]!r} in this record (it has {', '.join(map(repr, list(raw)[:8]))})")
    chosen = _turns(raw["chosen"], "chosen", "assistant")
    rejected = _turns(raw["rejected"], "rejected", "assistant")
    if "prompt" in raw:
        prompt = _turns(raw["prompt"], "prompt", "user")
    else:
        # TRL's implicit-prompt form: two whole conversations; the prompt is the messages they share.
        if not isinstance(raw["chosen"], list) or not isinstance(raw["rejected"], list):
            raise _BadChat("no field 'prompt' in this record, and chosen and rejected are not both conversations")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not _has_assistant(turns):
            raise _BadChat(f"{name} has no assistant turn, so the pair has no response to compare")
    return ChatRecord(prompt, chosen, rejected)


def _check_texts(record: ChatRecord, line: bytes, forbidden: re.Pattern | None) -> None:
    surrogates = SURROGATE_IN_LINE.search(line) is not None
    if not surrogates and forbidden is None:
        return
    parts = (("messages" if not record.chosen else "prompt", record.messages), ("chosen", record.chosen))
    for name, turns in (*parts, ("rejected", record.rejected)):
        for i, message in enumerate(turns):
            field = f"{name}[{i}].content"
            if surrogates and (problem := _lone_surrogate(field, message["content"])):
                raise _BadChat(problem, SURROGATE_FIX)
            if forbidden is not None and (hit := forbidden.search(message["content"])):
                raise _BadChat(
                    f"{field} holds {hit.group()!r}, a special token of the tokenizer (at character {hit.start()})",
                    SPECIAL_FIX,
                )


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


def _parquet(r: _Reading, row_groups: tuple[int, int] | None) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file, stats, text_field, cap = r.file, r.stats, r.text_field, r.limits.max_record_bytes
    with _ParquetSource(file) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            stats.bytes += (file.size or 0) if row_groups is None or row_groups[0] == 0 else 0
            r.bad(
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
            r.bad(file.shown, f"no column {text_field!r} (it has {columns})", NO_TEXT_FIELD_FIX, whole_file=True)
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
            r.bad(
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
                        r.bad(
                            f"{file.shown}: row {row}",
                            f"{text_field!r} is null",
                            "fill in the text or drop the row",
                        )
                    else:
                        if is_binary:
                            try:
                                value = value.decode("utf-8")
                            except UnicodeDecodeError as exc:
                                r.bad(
                                    f"{file.shown}: row {row}",
                                    f"not UTF-8 text (invalid byte at offset {exc.start})",
                                    "convert the column to UTF-8 or drop the row",
                                )
                                row += 1
                                continue
                        if cap is not None and len(value) * 4 > cap and len(value.encode("utf-8")) > cap:
                            r.too_big(f"{file.shown}: row {row}", f"{len(value.encode('utf-8')):,}")
                        elif value:
                            stats.documents += 1
                            yield row, value
                        else:
                            stats.empty += 1
                    row += 1
            stats.bytes += share[group]
