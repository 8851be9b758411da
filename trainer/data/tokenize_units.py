"""The work of ``stagerun tokenize``, cut into units before anything is read (see :mod:`.tokenize`).

The input files in order, small files packed together and big ones split (uncompressed JSONL by byte ranges at line
starts, Parquet by row groups) into pieces of about ``unit_bytes``. A unit's key hashes what it reads (each file's
URL, size and fingerprint, the range) and what it makes (the tokenizer's fingerprint, the text field, the shard
size, the record size limit when it is not the default, and for chat and preference units the content kind and
the chat template), so a unit's output is only ever reused for exactly the same work.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .readers import DataError, InputFile, parquet_row_groups

UNIT_KEY_VERSION = 1
MIN_UNIT_BYTES = 2**20
MAX_UNIT_BYTES = 256 * 2**20
UNITS_PER_RUN = 256  # auto unit size: about this many units, a power of two between the bounds
# Hostile-input bounds of `stagerun tokenize` (commands.py repeats them as the options' defaults).
DEFAULT_MAX_RECORD_BYTES = 64 * 2**20
DEFAULT_MAX_EXPANSION = 100.0


@dataclass(frozen=True)
class Piece:
    """Part of one input file: all of it, a byte range of lines (JSONL) or a range of row groups (Parquet)."""

    file: InputFile
    bytes: int
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, int] | None = None

    def identity(self) -> list:
        f = self.file
        return [
            f.url,
            f.format,
            f.compression,
            f.size,
            f.fingerprint,
            self.start,
            self.end,
            list(self.row_groups) if self.row_groups else None,
            *([f.problem] if f.problem is not None else []),
        ]


@dataclass(frozen=True)
class Unit:
    key: str
    pieces: tuple[Piece, ...]
    bytes: int

    @property
    def prefix(self) -> str:
        return f"shard-{self.key[:16]}-"


def auto_unit_bytes(total_bytes: int) -> int:
    """About UNITS_PER_RUN units, rounded down to a power of two (so a small change of the inputs keeps it)."""
    target = max(1, total_bytes // UNITS_PER_RUN)
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, 2 ** int(math.log2(target)))))


def _pieces(file: InputFile, unit_bytes: int) -> list[Piece]:
    size = file.size or 0
    if file.splittable and size >= 2 * unit_bytes:
        count = size // unit_bytes  # pieces of at least unit_bytes: each is a unit of its own
        edges = [size * i // count for i in range(count + 1)]
        return [Piece(file, b - a, start=a, end=b) for a, b in zip(edges, edges[1:])]
    if file.format == "parquet" and size >= 2 * unit_bytes and not file.streaming and file.problem is None:
        try:
            groups = parquet_row_groups(file)
        except (DataError, PermissionError, FileNotFoundError):
            return [Piece(file, size)]  # read whole: the reader reports the problem (or skips the file)
        pieces, first, run = [], 0, 0
        for i, (_, group_bytes) in enumerate(groups):
            run += group_bytes
            if run >= unit_bytes or i == len(groups) - 1:
                pieces.append(Piece(file, run, row_groups=(first, i + 1)))
                first, run = i + 1, 0
        if pieces:
            scale = size / max(1, sum(p.bytes for p in pieces))
            return [Piece(p.file, int(p.bytes * scale), row_groups=p.row_groups) for p in pieces]
    return [Piece(file, size)]


def plan_units(
    files: Sequence[InputFile],
    *,
    unit_bytes: int,
    tokenizer_sha: str,
    text_field: str,
    shard_tokens: int,
    max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES,
    content: str = "text",
    chat_template: dict | None = None,
) -> list[Unit]:
    """The units of work, in document order: small files packed together, big ones split.

    ``chat_template``: what identifies the chat format of a chat or preference unit (its name, the sha256 of its
    Jinja template, its special tokens)."""
    common: dict = {
        "v": UNIT_KEY_VERSION,
        "tokenizerSha256": tokenizer_sha,
        "textField": text_field,
        "shardTokens": shard_tokens,
    }
    if content != "text":  # text units keep the keys they always had (a rerun of an older run resumes)
        common.update(content=content, chatTemplate=chat_template)
    if max_record_bytes != DEFAULT_MAX_RECORD_BYTES:  # which records are skipped depends on it
        common["maxRecordBytes"] = max_record_bytes
    units: list[Unit] = []
    current: list[Piece] = []

    def flush() -> None:
        if current:
            identity = json.dumps({**common, "pieces": [p.identity() for p in current]}, sort_keys=True)
            key = hashlib.sha256(identity.encode()).hexdigest()
            units.append(Unit(key, tuple(current), sum(p.bytes for p in current)))
            current.clear()

    for file in files:
        for piece in _pieces(file, unit_bytes):
            if piece.bytes >= unit_bytes:
                flush()
                current.append(piece)
                flush()
            else:
                current.append(piece)
                if sum(p.bytes for p in current) >= unit_bytes:
                    flush()
    flush()
    return units


def template_identity(fmt) -> dict:
    """What identifies a chat format (core.chat_template.ChatFormat) in unit keys and manifests: its name, the sha256
    of its Jinja template (every prefix and suffix is in it) and its special tokens."""
    return {
        "format": fmt.name,
        "jinjaSha256": hashlib.sha256(fmt.jinja().encode("utf-8")).hexdigest(),
        "specialTokens": list(fmt.special_tokens),
    }


def plan_sha(units: Sequence[Unit], inputs: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(map(str, inputs)), [u.key for u in units]]).encode()).hexdigest()
