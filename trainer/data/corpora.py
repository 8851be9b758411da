"""Text sources: the documents of a data source, one string each.

Two generated corpora make every machine with Python able to train without downloading anything:
``builtin:python-docs`` (English prose: the language reference topics and the standard library's docstrings)
and ``builtin:python-code`` (the standard library's own source files). Everything else is read through fsspec
(local paths, globs, ``s3://``, ``gs://``, ...): plain text files are one document each, JSONL files one
document per line.

All orders are deterministic (sorted paths), so a corpus tokenized twice on the same Python gives the same
shards; the loader's checkpointed position relies on that.
"""

from __future__ import annotations

import ast
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec

BUILTIN_DOCS = "builtin:python-docs"
BUILTIN_CODE = "builtin:python-code"
BUILTIN_CORPORA = (BUILTIN_DOCS, BUILTIN_CODE)
# Test suites and tools are either huge, full of fixtures that are not representative code (lib2to3's Python 2
# grammar tests), or not part of the standard library at all (installed packages).
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"})
MIN_DOCSTRING_CHARS = 200
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


class DataError(ValueError):
    """A data problem a person can fix: the message names the file (and line) and the fix."""


@dataclass
class CorpusStats:
    """What an iteration produced; filled in while iterating (``skipped_files``: unreadable or not UTF-8)."""

    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0


def corpus_version(path: str) -> str | None:
    """What a generated corpus depends on (the Python installation), for cache keys; None for ordinary paths."""
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
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
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


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _expand(path: str) -> list[fsspec.core.OpenFile]:
    """The files a source path names: a file, a glob, or every file under a folder (sorted; no hidden files)."""
    fs, root = fsspec.core.url_to_fs(path)
    if not any(ch in path for ch in "*?[") and fs.isdir(root):
        if fs.exists(f"{root.rstrip('/')}/manifest.json"):
            raise DataError(f"{path} is a pretokenized shard set (it has manifest.json), not text: set the "
                            f"source's format to tokens (or auto), or point it at the text files")
        names = [p for p in sorted(fs.find(root))
                 if not any(part.startswith((".", "_")) for part in p[len(root.rstrip("/")):].split("/"))]
        files = [fsspec.core.OpenFile(fs, p, mode="rb", compression=_compression(p)) for p in names]
    else:
        files = fsspec.open_files(path, mode="rb", compression="infer")
        files = sorted(files, key=lambda f: f.path)
        if len(files) == 1 and not files[0].fs.exists(files[0].path):
            files = []  # open_files returns a plain path whether or not it exists
    if not files:
        raise DataError(f"{path} matches no files: check the source's path (a file, folder, glob or URL)")
    return files


def _compression(path: str) -> str | None:
    from fsspec.utils import infer_compression

    return infer_compression(path)


def _file_format(name: str, declared: str) -> str:
    if declared in ("text", "jsonl"):
        return declared
    stem = name
    for suffix in COMPRESSION_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    if stem.endswith(".parquet"):
        raise DataError(f"{name}: Parquet sources are not supported yet: convert the file to JSONL "
                        f"(one {{\"text\": ...}} object per line)")
    return "jsonl" if stem.endswith(JSONL_SUFFIXES) else "text"


def _read_text_file(file: fsspec.core.OpenFile, name: str) -> str:
    with file as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (invalid byte at offset {exc.start}): convert the file to UTF-8 "
                        f"or remove it from the source") from None


def _read_jsonl_file(file: fsspec.core.OpenFile, name: str, text_field: str) -> Iterator[str]:
    with file as handle:
        lines = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
        lineno = 0
        try:
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{name}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}): fix or "
                                    f"remove the line (JSONL holds one JSON object per line)") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{name}:{lineno}: no field {text_field!r} in this record: set the source's "
                                    f"textField to the field that holds the document text")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{name}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string: "
                                    f"set the source's textField to the field that holds the document text")
                yield text
        except UnicodeDecodeError:
            raise DataError(f"{name}:{lineno + 1}: not UTF-8 text: convert the file to UTF-8") from None


def _file_documents(path: str, declared: str, text_field: str) -> Iterator[str]:
    for file in _expand(path):
        name = file.full_name if _is_url(path) else file.path
        if _file_format(file.path, declared) == "jsonl":
            yield from _read_jsonl_file(file, name, text_field)
        else:
            yield _read_text_file(file, name)


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
    elif path.startswith("builtin:"):
        raise DataError(f"unknown generated corpus {path!r}: use one of {', '.join(BUILTIN_CORPORA)}")
    elif source.format == "tokens":
        raise DataError(f"{path} is a pretokenized shard set (format: tokens), it holds no text to read")
    else:
        documents = _file_documents(path, source.format, source.text_field)
    return _capped(documents, max_bytes, stats)
