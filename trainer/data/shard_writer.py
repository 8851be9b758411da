"""Writing shard sets: tokenizing documents in bounded batches into shards, then the manifest last.

A local set is assembled in a temporary folder next to the target and renamed into place; a remote one is uploaded
file by file with its manifest removed first and written last, so an incomplete set is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
from tqdm import tqdm

from stagerun.core.storage import is_url

from .shard_format import DTYPES, FORMAT, LOSS_MASK_BIT, MANIFEST, dtype_for_vocab
from .tokenizer import eos_id, tokenizer_sha256, vocab_size

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "ENCODE_BATCH_CHARS",
    "ENCODE_BATCH_DOCS",
    "_ShardWriter",
    "batches",
    "encode_ids",
    "manifest_head",
    "with_eos",
    "write_shards",
]

DEFAULT_SHARD_TOKENS = 64 * 2**20
ENCODE_BATCH_DOCS = 512
ENCODE_BATCH_CHARS = 2_000_000


def encode_ids(tokenizer, batch: list[str]) -> list[list[int]]:
    """Token ids of a batch of documents (no special tokens added); the offset-free fast path when available."""
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    return [e.ids for e in encode(batch, add_special_tokens=False)]


def batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Documents in batches bounded in count and characters.

    encode_batch spreads a batch over the cores, and bounded batches keep memory flat and the progress bar moving
    on corpora of a few huge files.
    """
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def with_eos(ids: list[list[int]], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One array of the documents, each followed by EOS, and each document's length (EOS included)."""
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.concatenate([np.array(x + [eos], dtype=dtype) for x in ids]) if ids else np.zeros(0, dtype)
    return tokens, lengths


class _ShardWriter:
    """Appends documents (each followed by EOS) to numbered shards, closing a shard once it is full.

    ``loss_mask``: the values carry the loss mask in bit 31 (chat and preference sets); each shard's entry then
    counts its loss tokens (``numLossTokens``). ``group``: documents come in groups of this many (2: preference
    pairs) that a shard never splits; each shard's entry counts its groups (``numPairs``) when it is 2."""

    def __init__(
        self,
        folder: Path,
        dtype: np.dtype,
        eos: int,
        shard_tokens: int,
        prefix: str = "shard-",
        digits: int = 5,
        *,
        loss_mask: bool = False,
        group: int = 1,
    ):
        self.folder, self.dtype, self.eos, self.shard_tokens = folder, dtype, eos, shard_tokens
        self.prefix, self.digits = prefix, digits
        self.loss_mask, self.group = loss_mask, group
        self.shards: list[dict] = []
        self._handle: BinaryIO | None = None
        self._digest = hashlib.sha256()  # of the open shard's tokens, as they are written (format v2)
        self._ends: list[np.ndarray] = []
        self._filled = 0
        self._loss = 0  # loss tokens in the open shard
        self._documents = 0  # documents written in all, to keep groups whole

    def add(self, ids: list[int]) -> int:
        return self.add_batch(*with_eos([list(ids)], self.eos, self.dtype))

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        """Documents given as one array (each already followed by EOS) and their lengths; returns tokens added.
        A batch holds whole groups."""
        if len(lengths) % self.group:
            raise ValueError(f"a batch must hold whole groups of {self.group} documents, got {len(lengths)}")
        ends = np.cumsum(lengths, dtype=np.int64)
        before = self._documents  # documents written before this batch
        first = 0
        while first < len(lengths):
            if self._handle is None:
                name = f"{self.prefix}{len(self.shards):0{self.digits}d}"
                self.shards.append({"tokens": f"{name}.bin", "index": f"{name}.idx"})
                self._handle = open(self.folder / self.shards[-1]["tokens"], "wb")
                self._digest = hashlib.sha256()
            base = int(ends[first - 1]) if first else 0
            # The shard takes documents up to and including the one that fills it to shard_tokens.
            last = min(
                int(np.searchsorted(ends, base + self.shard_tokens - self._filled, side="left")), len(lengths) - 1
            )
            last += self.group - 1 - (before + last) % self.group  # to the end of its group
            stop = int(ends[last])
            values = np.ascontiguousarray(tokens[base:stop], dtype=self.dtype)
            data = values.tobytes()
            self._handle.write(data)
            self._digest.update(data)
            if self.loss_mask:
                self._loss += int(np.count_nonzero(values >> LOSS_MASK_BIT))
            self._ends.append(ends[first : last + 1] - base + self._filled)
            self._filled += stop - base
            first = last + 1
            self._documents = before + first
            if self._filled >= self.shard_tokens:
                self.close()
        return int(ends[-1]) if len(ends) else 0

    def close(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        ends = np.concatenate(self._ends).astype("<i8", copy=False)
        index = ends.tobytes()
        (self.folder / self.shards[-1]["index"]).write_bytes(index)
        self.shards[-1].update(
            numTokens=int(ends[-1]),
            numDocuments=len(ends),
            sha256=self._digest.hexdigest(),
            indexSha256=hashlib.sha256(index).hexdigest(),
        )
        if self.loss_mask:
            self.shards[-1]["numLossTokens"] = self._loss
        if self.group == 2:
            self.shards[-1]["numPairs"] = len(ends) // 2
        self._ends, self._filled, self._loss = [], 0, 0


def manifest_head(tokenizer) -> dict:
    """The format fields that follow from the tokenizer alone."""
    size = vocab_size(tokenizer)
    return {
        "format": FORMAT,
        "dtype": dtype_for_vocab(size),
        "eosId": eos_id(tokenizer),
        "vocabSize": size,
        "tokenizerSha256": tokenizer_sha256(tokenizer),
    }


def write_shards(
    docs: Iterable[str],
    tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    extra: dict | None = None,
    progress: bool = True,
    desc: str = "tokenize",
) -> dict:
    """Tokenize ``docs`` into a shard set at ``out_dir`` (local folder or fsspec URL); returns the manifest.

    A shard is closed once it holds at least ``shard_tokens`` tokens (so documents are never split).
    ``extra`` adds keys to the manifest (prepare records the source it was made from).
    An existing set at ``out_dir`` is replaced only once the new one is complete.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    manifest = manifest_head(tokenizer)
    eos = manifest["eosId"]
    clash = sorted(set(extra or {}) & {*manifest, "numTokens", "numDocuments", "shards"})
    if clash:
        raise ValueError(f"extra manifest keys {clash} would replace format fields: rename them")
    remote = is_url(out_dir)
    final = None if remote else Path(str(out_dir).removeprefix("file://"))
    if final is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename is atomic on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent) if final else tempfile.mkdtemp())
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished set should be readable like any folder
    writer = _ShardWriter(tmp, DTYPES[manifest["dtype"]], eos, shard_tokens)
    bar = tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
    # Text that happens to contain "<|endoftext|>" must stay text: only write_shards places document ends.
    previous_special = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        for batch in batches(docs):
            bar.update(writer.add_batch(*with_eos(encode_ids(tokenizer, batch), eos, writer.dtype)))
        writer.close()
        manifest.update(
            numTokens=sum(s["numTokens"] for s in writer.shards),
            numDocuments=sum(s["numDocuments"] for s in writer.shards),
            shards=writer.shards,
            **(extra or {}),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: only now is the set complete
        if final is None:
            _upload(tmp, str(out_dir), manifest)
        else:
            _swap_into_place(tmp, final)
        return manifest
    finally:
        tokenizer.encode_special_tokens = previous_special
        writer.close()
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        # Move the old set aside first: between the two renames there is no folder, never a mixed one.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _upload(tmp: Path, url: str, manifest: dict) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # first, so the set is incomplete while its files are replaced
    fs.makedirs(root, exist_ok=True)
    for shard in manifest["shards"]:
        for key in ("tokens", "index"):
            fs.put_file(str(tmp / shard[key]), f"{root}/{shard[key]}")
    fs.put_file(str(tmp / MANIFEST), f"{root}/{MANIFEST}")
