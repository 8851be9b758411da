"""Pretokenized shard sets, format ``stagerun-tokens/v1``.

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

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
import numpy as np
from tqdm import tqdm

from .corpora import DataError
from .tokenizer import eos_id, tokenizer_sha256, vocab_size

FORMAT = "stagerun-tokens/v1"
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_SHARD_TOKENS = 64 * 2**20
ENCODE_BATCH_DOCS = 512
ENCODE_BATCH_CHARS = 2_000_000
REMAKE = "re-create the shard set (delete the folder and tokenize the source again)"


def is_url(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def has_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local folder or fsspec URL) holds a complete shard set's manifest."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(f"{root.rstrip('/')}/{MANIFEST}")


def dtype_for_vocab(size: int) -> str:
    return "uint16" if size <= 2**16 else "uint32"


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
    """Appends documents (each followed by EOS) to numbered shards, closing a shard once it is full."""

    def __init__(
        self, folder: Path, dtype: np.dtype, eos: int, shard_tokens: int, prefix: str = "shard-", digits: int = 5
    ):
        self.folder, self.dtype, self.eos, self.shard_tokens = folder, dtype, eos, shard_tokens
        self.prefix, self.digits = prefix, digits
        self.shards: list[dict] = []
        self._handle = None
        self._ends: list[np.ndarray] = []
        self._filled = 0

    def add(self, ids: list[int]) -> int:
        return self.add_batch(*with_eos([list(ids)], self.eos, self.dtype))

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        """Documents given as one array (each already followed by EOS) and their lengths; returns tokens added."""
        ends = np.cumsum(lengths, dtype=np.int64)
        first = 0
        while first < len(lengths):
            if self._handle is None:
                name = f"{self.prefix}{len(self.shards):0{self.digits}d}"
                self.shards.append({"tokens": f"{name}.bin", "index": f"{name}.idx"})
                self._handle = open(self.folder / self.shards[-1]["tokens"], "wb")
            base = int(ends[first - 1]) if first else 0
            # The shard takes documents up to and including the one that fills it to shard_tokens.
            last = min(
                int(np.searchsorted(ends, base + self.shard_tokens - self._filled, side="left")), len(lengths) - 1
            )
            stop = int(ends[last])
            self._handle.write(np.ascontiguousarray(tokens[base:stop], dtype=self.dtype).tobytes())
            self._ends.append(ends[first : last + 1] - base + self._filled)
            self._filled += stop - base
            first = last + 1
            if self._filled >= self.shard_tokens:
                self.close()
        return int(ends[-1]) if len(ends) else 0

    def close(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        ends = np.concatenate(self._ends).astype("<i8", copy=False)
        ends.tofile(self.folder / self.shards[-1]["index"])
        self.shards[-1].update(numTokens=int(ends[-1]), numDocuments=len(ends))
        self._ends, self._filled = [], 0


def manifest_head(tokenizer) -> dict:
    """The format v1 fields that follow from the tokenizer alone."""
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
    out_dir: str | os.PathLike,
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
        raise ValueError(f"extra manifest keys {clash} would replace format v1 fields: rename them")
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
        if remote:
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


class TokenShards:
    """A validated shard set, presented as one virtual token array (``read``) with global document ends."""

    def __init__(self, path: Path, manifest: dict, tokens: list[np.ndarray], doc_ends: np.ndarray, source: str):
        self.path = path
        self.source = source  # what the caller opened (a URL may have been copied to ``path``)
        self.manifest = manifest
        self.dtype = DTYPES[manifest["dtype"]]
        self.eos_id: int = manifest["eosId"]
        self.vocab_size: int = manifest["vocabSize"]
        self.tokenizer_sha256: str = manifest["tokenizerSha256"]
        self.num_tokens: int = manifest["numTokens"]
        self.num_documents: int = manifest["numDocuments"]
        self.doc_ends = doc_ends  # int64 [num_documents], global cumulative end offsets
        self._tokens = tokens
        sizes = [len(t) for t in tokens]
        self._shard_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    @classmethod
    def open(cls, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> TokenShards:
        """Open and validate a shard set; an fsspec URL is first copied to a local cache folder."""
        source = str(path)
        local = _fetch(source, cache_dir) if is_url(source) else Path(source.removeprefix("file://"))
        manifest = read_manifest(local, shown=source)
        tokens, ends = [], []
        offset = 0
        for i, shard in enumerate(manifest["shards"]):
            shard_tokens, shard_ends = _open_shard(local, source, manifest, i, shard)
            tokens.append(shard_tokens)
            ends.append(shard_ends + offset)
            offset += shard["numTokens"]
        doc_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        return cls(local, manifest, tokens, doc_ends.astype(np.int64, copy=False), source)

    @property
    def num_shards(self) -> int:
        return len(self._tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole set as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"read({start}, {stop}) is outside the {self.num_tokens} tokens of {self.source}")
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        parts = []
        while start < stop:
            base = int(self._shard_starts[first])
            end = min(stop, int(self._shard_starts[first + 1]))
            parts.append(self._tokens[first][start - base : end - base])
            start, first = end, first + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Tokens at arbitrary global positions (int64); the loader gathers a packed sequence with one call."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(self._tokens) == 1:
            return self._tokens[0][indices].astype(np.int64)
        out = np.empty(indices.shape, dtype=np.int64)
        shard = np.searchsorted(self._shard_starts, indices, side="right") - 1
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._tokens[s][indices[mask] - self._shard_starts[s]]
        return out


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


def _open_shard(folder: Path, shown: str, manifest: dict, i: int, shard: dict) -> tuple[np.ndarray, np.ndarray]:
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


def _fetch(url: str, cache_dir: str | os.PathLike | None) -> Path:
    """Copy a remote shard set to a local cache folder (once; keyed by URL and manifest) and return it."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        manifest_bytes = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        raise DataError(
            f"{url}/{MANIFEST} not found: {url} is not a complete shard set; point the source at a "
            f"folder written by stagerun, or {REMAKE}"
        ) from None
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{url}/{MANIFEST}: not valid JSON ({exc}): {REMAKE}") from None
    base = Path(cache_dir or os.environ.get("STAGERUN_CACHE", Path.home() / ".cache" / "stagerun")) / "shards"
    key = hashlib.sha256(url.encode() + b"\0" + manifest_bytes).hexdigest()[:24]
    local = base / key
    if (local / MANIFEST).is_file():
        return local
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=base))
    try:
        shards = manifest.get("shards") if isinstance(manifest, dict) else None
        for shard in shards if isinstance(shards, list) else []:
            for name in (shard.get("tokens"), shard.get("index")) if isinstance(shard, dict) else ():
                if isinstance(name, str) and "/" not in name:
                    try:
                        fs.get_file(f"{root}/{name}", str(tmp / name))
                    except FileNotFoundError:
                        pass  # validation names the missing file
        (tmp / MANIFEST).write_bytes(manifest_bytes)  # last: the cache entry is complete only now
        try:
            os.replace(tmp, local)
        except OSError:
            pass  # another process on this node finished the same copy first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local
