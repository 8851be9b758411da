"""The shard set format ``stagerun-tokens/v1``: its constants, and reading a set's manifest and files with checks.

A shard set is a folder::

    manifest.json        {"format": "stagerun-tokens/v1", "dtype": "uint16"|"uint32", "eosId", "vocabSize",
                          "tokenizerSha256", "numTokens", "numDocuments", "shards": [{"tokens", "index",
                          "numTokens", "numDocuments"}, ...]}   (may carry more keys, e.g. "source", "tokenize")
    shard-00000.bin      raw tokens (np.memmap-able, little-endian); every document is followed by EOS
    shard-00000.idx      int64 cumulative document *end* offsets within the shard (the EOS belongs to its document)

Shard files may have any name inside the folder (``stagerun tokenize`` names them after its work units); the
manifest lists them in order. Documents never straddle shards. The manifest is written last (``write_shards``
assembles a local set in a temporary folder renamed into place; ``stagerun tokenize`` commits unit by unit and
assembles the manifest once every unit is done), so a folder without a manifest is never a complete set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import numpy as np

from .corpora import DataError

__all__ = ["DTYPES", "FORMAT", "MANIFEST", "REMAKE", "dtype_for_vocab", "has_manifest", "open_shard", "read_manifest"]

FORMAT = "stagerun-tokens/v1"
MANIFEST = "manifest.json"
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
REMAKE = "re-create the shard set (delete the folder and tokenize the source again)"


def has_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (local folder or fsspec URL) holds a complete shard set's manifest."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(f"{root.rstrip('/')}/{MANIFEST}")


def dtype_for_vocab(size: int) -> str:
    return "uint16" if size <= 2**16 else "uint32"


def read_manifest(folder: Path, *, shown: str | None = None) -> dict:
    """The manifest of a shard set folder, checked for the fields and types format v1 requires."""
    where = f"{shown or folder}/{MANIFEST}"
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{where} not found: {shown or folder} is not a complete shard set (a set whose writing was "
            f"interrupted has no manifest); point the source at a folder written by stagerun, or {REMAKE}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc}): {REMAKE}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: expected a JSON object: {REMAKE}")
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{where}: format is {manifest.get('format')!r}, expected {FORMAT!r}: this reader only "
            f"knows {FORMAT}; {REMAKE}"
        )
    if manifest.get("dtype") not in DTYPES:
        raise DataError(f"{where}: dtype {manifest.get('dtype')!r} is not one of {', '.join(DTYPES)}: {REMAKE}")
    for key in ("eosId", "vocabSize", "numTokens", "numDocuments"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 0:
            raise DataError(f"{where}: {key} must be a non-negative integer, got {manifest.get(key)!r}: {REMAKE}")
    if not isinstance(manifest.get("tokenizerSha256"), str):
        raise DataError(f"{where}: tokenizerSha256 is missing: {REMAKE}")
    if manifest["dtype"] == "uint16" and manifest["vocabSize"] > 2**16:
        raise DataError(f"{where}: vocabSize {manifest['vocabSize']} does not fit dtype uint16: {REMAKE}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise DataError(f"{where}: shards must be a list of objects: {REMAKE}")
    for i, shard in enumerate(shards):
        for key in ("tokens", "index"):
            name = shard.get(key)
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise DataError(f"{where}: shards[{i}].{key} must be a file name inside the folder, got {name!r}")
        for key in ("numTokens", "numDocuments"):
            if not isinstance(shard.get(key), int) or shard[key] < 0:
                raise DataError(f"{where}: shards[{i}].{key} must be a non-negative integer: {REMAKE}")
    for key in ("numTokens", "numDocuments"):
        total = sum(s[key] for s in shards)
        if total != manifest[key]:
            raise DataError(f"{where}: {key} is {manifest[key]} but its shards add up to {total}: {REMAKE}")
    return manifest


def open_shard(folder: Path, shown: str, manifest: dict, i: int, shard: dict) -> tuple[np.ndarray, np.ndarray]:
    dtype = DTYPES[manifest["dtype"]]
    tokens_path, index_path = folder / shard["tokens"], folder / shard["index"]
    n_tokens, n_docs = shard["numTokens"], shard["numDocuments"]
    for path, expected, what in (
        (tokens_path, n_tokens * dtype.itemsize, f"{n_tokens} {manifest['dtype']} tokens"),
        (index_path, n_docs * 8, f"{n_docs} int64 document ends"),
    ):
        if not path.is_file():
            raise DataError(f"{shown}/{path.name}: missing (listed in {MANIFEST} shards[{i}]): {REMAKE}")
        actual = path.stat().st_size
        if actual != expected:
            raise DataError(
                f"{shown}/{path.name}: {actual} bytes, expected {expected} ({what}, as {MANIFEST} "
                f"shards[{i}] says); the file is truncated or from another set: {REMAKE}"
            )
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    ends = np.fromfile(index_path, dtype="<i8")
    if n_docs:
        steps = np.diff(ends, prepend=0)
        bad = np.flatnonzero(steps <= 0)
        if len(bad):
            raise DataError(
                f"{shown}/{index_path.name}: document end offsets must increase, entry {int(bad[0])} is "
                f"{int(ends[bad[0]])} after {int(ends[bad[0] - 1]) if bad[0] else 0}: {REMAKE}"
            )
        if ends[-1] != n_tokens:
            raise DataError(
                f"{shown}/{index_path.name}: the last document ends at {int(ends[-1])}, but the shard "
                f"holds {n_tokens} tokens: {REMAKE}"
            )
    elif n_tokens:
        raise DataError(f"{shown}/{index_path.name}: {n_tokens} tokens but no documents: {REMAKE}")
    return tokens, ends
