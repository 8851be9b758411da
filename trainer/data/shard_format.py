"""The shard set format ``stagerun-tokens/v2`` (and v1, still read): its constants, and the manifest's checks.

A shard set is a folder::

    manifest.json        {"format": "stagerun-tokens/v2", "dtype": "uint16"|"uint32", "eosId", "vocabSize",
                          "tokenizerSha256", "numTokens", "numDocuments", "shards": [{"tokens", "index",
                          "numTokens", "numDocuments", "sha256", "indexSha256"}, ...]}
                         (may carry more keys, e.g. "source", "tokenize")
    shard-00000.bin      raw tokens (np.memmap-able, little-endian); every document is followed by EOS
    shard-00000.idx      int64 cumulative document *end* offsets within the shard (the EOS belongs to its document)

v2 adds a sha256 per shard file (``sha256`` of the tokens, ``indexSha256`` of the index; verified when a cache is
reused and, sampled, when a worker opens the set) and changes the loader's epoch order: documents of a v2 set are
shuffled by a seeded bijection (``order.py``), which needs no per-document array per process. A v1 set still opens,
keeps the order it always had (a whole-epoch permutation: memory grows with its documents) so a run started on it
resumes exactly, and has nothing to verify; ``upgrade_manifest`` (``stagerun shards upgrade``) turns it into v2.

Chat and preference sets (post-training) are v2 sets with dtype uint32 and more manifest keys: ``content``
("chat" | "preference"; absent: "text"), ``lossMask``: "bit31" (bit 31 of every stored token is 1 where the token
is a training target: an assistant turn's content and end-of-turn; ``split_loss_mask`` takes it apart),
``numLossTokens`` (set-wide and per shard), ``chatTemplate`` ({format, jinjaSha256}: what the chats were rendered
with) and, for preference sets, ``numPairs`` (set-wide and per shard): documents 2i and 2i+1 are the same prompt
with the chosen and the rejected response, and a pair never straddles shards. The hashes cover the stored values,
mask bits included.

Shard files may have any name inside the folder (``stagerun tokenize`` names them after its work units); the
manifest lists them in order. Documents never straddle shards. The manifest is written last, so a folder without a
manifest is never a complete set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import numpy as np

from .corpora import DataError

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_V1",
    "LOSS_MASK_BIT",
    "MANIFEST",
    "REMAKE",
    "check_ends",
    "dtype_for_vocab",
    "has_manifest",
    "parse_manifest",
    "read_manifest",
    "split_loss_mask",
]

FORMAT = "stagerun-tokens/v2"
FORMAT_V1 = "stagerun-tokens/v1"
FORMATS = (FORMAT_V1, FORMAT)
MANIFEST = "manifest.json"
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
REMAKE = "re-create the shard set (delete the folder and tokenize the source again)"
HASH_KEYS = {"tokens": "sha256", "index": "indexSha256"}
CONTENTS = ("text", "chat", "preference")
LOSS_MASK_BIT = 31
LOSS_MASKS = {"bit31": LOSS_MASK_BIT}
ID_MASK = (1 << LOSS_MASK_BIT) - 1


def split_loss_mask(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored values of a set with ``lossMask: bit31`` -> (token ids, whether each is a training target)."""
    values = np.asarray(values)
    return values & ID_MASK, (values >> LOSS_MASK_BIT).astype(bool)


def has_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (local folder or fsspec URL) holds a complete shard set's manifest."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(f"{root.rstrip('/')}/{MANIFEST}")


def dtype_for_vocab(size: int) -> str:
    return "uint16" if size <= 2**16 else "uint32"


def read_manifest(folder: Path, *, shown: str | None = None) -> dict:
    """The manifest of a local shard set folder, checked (``parse_manifest``)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{shown or folder}/{MANIFEST} not found: {shown or folder} is not a complete shard set (a set whose "
            f"writing was interrupted has no manifest); point the source at a folder written by stagerun, or {REMAKE}"
        )
    return parse_manifest(path.read_bytes(), f"{shown or folder}/{MANIFEST}")


def parse_manifest(raw: bytes, where: str) -> dict:
    """A manifest's bytes, checked for the fields and types its format (v1 or v2) requires."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc}): {REMAKE}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: expected a JSON object: {REMAKE}")
    if manifest.get("format") not in FORMATS:
        raise DataError(
            f"{where}: format is {manifest.get('format')!r}, expected {FORMAT_V1!r} or {FORMAT!r}: this reader "
            f"knows only these; {REMAKE}"
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
    v2 = manifest["format"] == FORMAT
    for i, shard in enumerate(shards):
        for key in ("tokens", "index"):
            name = shard.get(key)
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise DataError(f"{where}: shards[{i}].{key} must be a file name inside the folder, got {name!r}")
            digest = shard.get(HASH_KEYS[key])
            if v2 and not (isinstance(digest, str) and len(digest) == 64):
                raise DataError(
                    f"{where}: shards[{i}].{HASH_KEYS[key]} must be the sha256 (64 hex digits) of {name} in a "
                    f"{FORMAT} set, got {digest!r}: {REMAKE}"
                )
        for key in ("numTokens", "numDocuments"):
            if not isinstance(shard.get(key), int) or shard[key] < 0:
                raise DataError(f"{where}: shards[{i}].{key} must be a non-negative integer: {REMAKE}")
        if shard["numTokens"] and not shard["numDocuments"]:
            raise DataError(f"{where}: shards[{i}] has {shard['numTokens']} tokens but no documents: {REMAKE}")
    for key in ("numTokens", "numDocuments"):
        total = sum(s[key] for s in shards)
        if total != manifest[key]:
            raise DataError(f"{where}: {key} is {manifest[key]} but its shards add up to {total}: {REMAKE}")
    _check_content(manifest, where)
    return manifest


def _check_content(manifest: dict, where: str) -> None:
    """The keys of chat and preference sets (see the module's docstring)."""
    content = manifest.get("content", "text")
    if content not in CONTENTS:
        raise DataError(f"{where}: content {content!r} is not one of {', '.join(CONTENTS)}: {REMAKE}")
    mask = manifest.get("lossMask")
    if mask is not None and mask not in LOSS_MASKS:
        raise DataError(f"{where}: lossMask {mask!r} is not one of {', '.join(LOSS_MASKS)}: {REMAKE}")
    if content != "text" and mask is None:
        raise DataError(f"{where}: a {content} set needs lossMask (which tokens are trained on): {REMAKE}")
    if mask is None:
        return
    if manifest["dtype"] != "uint32":
        raise DataError(
            f"{where}: a set with lossMask {mask} must have dtype uint32, got {manifest['dtype']}: {REMAKE}"
        )
    if manifest["vocabSize"] > 1 << LOSS_MASK_BIT:
        raise DataError(f"{where}: vocabSize {manifest['vocabSize']} leaves no room for the loss mask bit: {REMAKE}")
    if content != "text":
        template = manifest.get("chatTemplate")
        if not (
            isinstance(template, dict)
            and isinstance(template.get("format"), str)
            and isinstance(template.get("jinjaSha256"), str)
            and len(template["jinjaSha256"]) == 64
        ):
            raise DataError(
                f"{where}: chatTemplate must be {{format, jinjaSha256}} (what the chats were rendered with), got "
                f"{template!r}: {REMAKE}"
            )
    _check_count(manifest, "numLossTokens", where, "numTokens")
    if content == "preference":
        _check_count(manifest, "numPairs", where, None)
        for i, shard in enumerate(manifest["shards"]):
            if shard["numPairs"] * 2 != shard["numDocuments"]:
                raise DataError(
                    f"{where}: shards[{i}] holds {shard['numDocuments']} documents but {shard['numPairs']} pairs "
                    f"(a pair is two documents, never split between shards): {REMAKE}"
                )
    elif "numPairs" in manifest:
        raise DataError(f"{where}: numPairs is only for preference sets, this one's content is {content}: {REMAKE}")


def _check_count(manifest: dict, key: str, where: str, bound: str | None) -> None:
    """``key``: a non-negative integer set-wide and per shard (at most ``bound`` of the same), adding up."""
    for i, part in [(None, manifest), *enumerate(manifest["shards"])]:
        at = f"{where}: {key}" if i is None else f"{where}: shards[{i}].{key}"
        value = part.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{at} must be a non-negative integer, got {value!r}: {REMAKE}")
        if bound is not None and value > part[bound]:
            raise DataError(f"{at} is {value}, more than its {part[bound]} {bound}: {REMAKE}")
    total = sum(s[key] for s in manifest["shards"])
    if total != manifest[key]:
        raise DataError(f"{where}: {key} is {manifest[key]} but its shards add up to {total}: {REMAKE}")


def expected_sizes(manifest: dict, i: int) -> dict[str, tuple[int, str]]:
    """The byte size of shard ``i``'s two files, by manifest key, with what they hold (for messages)."""
    shard = manifest["shards"][i]
    itemsize = DTYPES[manifest["dtype"]].itemsize
    return {
        "tokens": (shard["numTokens"] * itemsize, f"{shard['numTokens']} {manifest['dtype']} tokens"),
        "index": (shard["numDocuments"] * 8, f"{shard['numDocuments']} int64 document ends"),
    }


def size_error(shown: str, name: str, actual: int | None, expected: int, what: str, i: int) -> DataError:
    if actual is None:
        return DataError(f"{shown}/{name}: missing (listed in {MANIFEST} shards[{i}]): {REMAKE}")
    return DataError(
        f"{shown}/{name}: {actual} bytes, expected {expected} ({what}, as {MANIFEST} shards[{i}] says); the file is "
        f"truncated or from another set: {REMAKE}"
    )


def check_ends(ends: np.ndarray, first: int, previous: int, n_tokens: int, shown: str, name: str) -> None:
    """Entries [first, first + len(ends)) of a shard's document ends: they must increase and end at the shard's
    token count. ``previous`` is the entry before ``first`` (0 for the first); checked in chunks, memory bounded."""
    steps = np.diff(ends, prepend=previous)
    bad = np.flatnonzero(steps <= 0)
    if len(bad):
        j = int(bad[0])
        before = int(ends[j - 1]) if j else previous
        raise DataError(
            f"{shown}/{name}: document end offsets must increase, entry {first + j} is {int(ends[j])} after "
            f"{before}: {REMAKE}"
        )
    if len(ends) and int(ends[-1]) > n_tokens:
        raise DataError(
            f"{shown}/{name}: entry {first + len(ends) - 1} ends at {int(ends[-1])}, beyond the shard's {n_tokens} "
            f"tokens: {REMAKE}"
        )
