"""Text sources: the documents of a data source, one string each.

Two generated corpora make every machine with Python able to train without downloading anything:
``builtin:python-docs`` (English prose: the language reference topics and the standard library's docstrings)
and ``builtin:python-code`` (the standard library's own source files). Everything else is read through fsspec
(local paths, globs, ``s3://``, ``gs://``, ...) by the readers of ``readers.py``: plain text files are one
document each, JSONL files one document per line, Parquet files one per row.

Two more generated corpora hold conversations and preference pairs (``builtin:chat-arithmetic``,
``builtin:preference-arithmetic``: :mod:`.chat_corpora`); they are tokenized as chat / preference data. As text
(what a tokenizer is trained on) a chat or preference source gives each record's message contents.

All orders are deterministic (sorted paths), so a corpus tokenized twice on the same Python gives the same
shards; the loader's checkpointed position relies on that.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .chat_corpora import (
    BUILTIN_CHAT_CORPORA,
    BUILTIN_RECORDS,
    BUILTIN_SEED,
    CHAT_CORPUS_VERSION,
    chat_records,
    preference_records,
)
from .readers import (
    CHAT_CONTENTS,
    COMPRESSION_SUFFIXES,
    JSONL_SUFFIXES,
    BadRecords,
    ChatRecord,
    DataError,
    expand_inputs,
    read_chats,
    read_texts,
)

__all__ = [
    "BUILTIN_CHAT_CORPORA",
    "BUILTIN_CODE",
    "BUILTIN_CORPORA",
    "BUILTIN_DOCS",
    "COMPRESSION_SUFFIXES",
    "JSONL_SUFFIXES",
    "CorpusStats",
    "DataError",
    "corpus_version",
    "iter_documents",
    "source_content",
    "stdlib_source_files",
]

BUILTIN_DOCS = "builtin:python-docs"
BUILTIN_CODE = "builtin:python-code"
BUILTIN_CORPORA = (BUILTIN_DOCS, BUILTIN_CODE, *BUILTIN_CHAT_CORPORA)
# Test suites and tools are either huge, full of fixtures that are not representative code (lib2to3's Python 2
# grammar tests), or not part of the standard library at all (installed packages).
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"})
MIN_DOCSTRING_CHARS = 200


@dataclass
class CorpusStats:
    """What an iteration produced; filled in while iterating (``skipped_files``: unreadable or not UTF-8)."""

    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0


def corpus_version(path: str) -> str | None:
    """What a generated corpus depends on (the Python installation, or the chat generator's version and size), for
    cache keys; None for ordinary paths."""
    if path in BUILTIN_CHAT_CORPORA:
        return f"chat-corpora-v{CHAT_CORPUS_VERSION}-{BUILTIN_RECORDS}-{BUILTIN_SEED}"
    if path in BUILTIN_CORPORA:
        return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return None


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted (relative posix path) order, without SKIP_DIRS."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (which may hold gigabytes of wheels).
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _read_utf8(path: Path, stats: CorpusStats) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        stats.skipped_files += 1
        return None


def _docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings in source order (the file is parsed, never imported)."""
    tree = ast.parse(source)
    stack: list[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
        children = [
            c
            for c in ast.iter_child_nodes(node)
            if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        stack.extend(reversed(children))  # reversed: pop() then visits them in source order


def _python_docs(stats: CorpusStats) -> Iterator[str]:
    from pydoc_data.topics import topics  # the text of the language reference that `help()` shows

    for key in sorted(topics):
        yield topics[key]
    for path in stdlib_source_files():
        source = _read_utf8(path, stats)
        if source is None:
            continue
        try:
            docs = list(_docstrings(source))
        except (SyntaxError, ValueError):
            stats.skipped_files += 1  # a stdlib file this Python cannot parse (e.g. a template): not prose
            continue
        yield from (doc for doc in docs if len(doc) >= MIN_DOCSTRING_CHARS)


def _python_code(stats: CorpusStats) -> Iterator[str]:
    for path in stdlib_source_files():
        source = _read_utf8(path, stats)
        if source is not None:
            yield source


def _capped(documents: Iterable[str], max_bytes: int | None, stats: CorpusStats) -> Iterator[str]:
    """Documents until ``max_bytes`` UTF-8 bytes; the last one is cut (at a character boundary) to fit."""
    for doc in documents:
        if not doc:
            continue  # an empty document would only add a lone EOS token
        size = len(doc.encode("utf-8"))
        if max_bytes is not None and stats.bytes + size > max_bytes:
            room = max_bytes - stats.bytes
            doc = doc.encode("utf-8")[:room].decode("utf-8", errors="ignore")
            if doc:
                stats.documents += 1
                stats.bytes += len(doc.encode("utf-8"))
                yield doc
            return
        stats.documents += 1
        stats.bytes += size
        yield doc
        if max_bytes is not None and stats.bytes >= max_bytes:
            return


def _file_documents(path: str, declared: str, text_field: str) -> Iterator[str]:
    """The documents of the files a source names, read by the same readers as ``stagerun tokenize`` (so the same
    malformed inputs give the same errors, naming file and line)."""
    bad = BadRecords()  # a run's sources are strict: a malformed record is an error
    for file in expand_inputs([path], declared, what="the source's path"):
        yield from read_texts(file, text_field=text_field, bad=bad)


def source_content(source, where: str = "the source") -> str:
    """What a SourceSpec holds: "text", "chat" or "preference" (its format, or what its built-in corpus holds).

    A built-in chat corpus declared with the other chat format is an error naming ``where``."""
    builtin = BUILTIN_CHAT_CORPORA.get(source.path)
    if builtin is not None and source.format in CHAT_CONTENTS and source.format != builtin:
        raise DataError(
            f"{where}.format: {source.format}, but {source.path} holds {builtin} records: set format: {builtin}"
        )
    if builtin is not None:
        return builtin
    return source.format if source.format in CHAT_CONTENTS else "text"


def _record_texts(record: ChatRecord) -> Iterator[str]:
    for turns in (record.messages, record.chosen, record.rejected):
        yield from (m["content"] for m in turns)


def _contents(value: str | list[dict]) -> list[str]:
    return [value] if isinstance(value, str) else [m["content"] for m in value]


def _chat_texts(source, content: str) -> Iterator[str]:
    """Each record's message contents (a pair's prompt and both responses), one text per record."""
    if source.path in BUILTIN_CHAT_CORPORA:
        keys = ("messages",) if content == "chat" else ("prompt", "chosen", "rejected")
        make = chat_records if content == "chat" else preference_records
        for raw in make(BUILTIN_RECORDS, BUILTIN_SEED):
            yield "\n".join(text for key in keys for text in _contents(raw[key]))
        return
    bad = BadRecords()  # strict, like every source of a run
    for file in expand_inputs([source.path], "jsonl", what="the source's path"):
        for record in read_chats(file, content=content, bad=bad):
            yield "\n".join(_record_texts(record))


def iter_documents(source, max_bytes: int | None = None, stats: CorpusStats | None = None) -> Iterator[str]:
    """The documents of ``source`` (a SourceSpec), in a deterministic order, at most ``max_bytes`` UTF-8 bytes.

    ``stats`` (optional) is updated while iterating: documents and bytes yielded, files skipped.
    """
    stats = stats if stats is not None else CorpusStats()
    path = source.path
    if path == BUILTIN_DOCS:
        documents = _python_docs(stats)
    elif path == BUILTIN_CODE:
        documents = _python_code(stats)
    elif (content := source_content(source)) != "text":
        documents = _chat_texts(source, content)
    elif path.startswith("builtin:"):
        raise DataError(f"unknown generated corpus {path!r}: use one of {', '.join(BUILTIN_CORPORA)}")
    elif source.format == "tokens":
        raise DataError(f"{path} is a pretokenized shard set (format: tokens), it holds no text to read")
    else:
        documents = _file_documents(path, source.format, source.text_field)
    return _capped(documents, max_bytes, stats)
