"""Data preparation that ``stagerun run`` does once, before starting worker processes.

1. The tokenizer: load ``spec.tokenizer.path``, or train one on the text sources into ``<run dir>/tokenizer.json``
   (a resumed run finds that file and reuses it: retraining would renumber every token).
2. Per source: a pretokenized shard set is used as it is (after checking it was made with this tokenizer); text
   is tokenized into ``<run dir>/data/<source>/`` unless a complete set made from the same source with the same
   tokenizer is already there.

Workers then only open shard sets (``TokenShards.open``): tokenizing is never repeated per rank.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .corpora import BUILTIN_CORPORA, CorpusStats, DataError, corpus_version, iter_documents
from .shards import MANIFEST, TokenShards, has_manifest, read_manifest, write_shards
from .tokenizer import eos_id, interleave_by_bytes, load_tokenizer, tokenizer_sha256, train_tokenizer, vocab_size

TOKENIZER_FILE = "tokenizer.json"
DATA_DIR = "data"


@dataclass
class PreparedData:
    tokenizer_path: str
    shard_dirs: dict[str, str]  # source name -> shard set folder or URL, in spec order
    eos_id: int
    vocab_size: int


def is_shard_source(source) -> bool:
    """Whether a SourceSpec names a pretokenized shard set rather than text."""
    if source.format == "tokens":
        return True
    if source.format != "auto" or source.path in BUILTIN_CORPORA:
        return False
    return has_manifest(source.path)


def prepare_data(
    run, run_dir: str | Path, *, progress: bool = True, max_source_bytes: int | None = None
) -> PreparedData:
    """Make sure the run's tokenizer and every source's shard set exist; returns where they are.

    ``max_source_bytes`` caps each text source (smoke runs and tests); it is part of the cache key.
    """
    run_dir = Path(run_dir)
    log = (lambda message: print(f"data: {message}", flush=True)) if progress else (lambda message: None)
    tokenizer, tokenizer_path = _tokenizer(run, run_dir, log, max_source_bytes)
    size = vocab_size(tokenizer)
    if run.model.vocab_size is not None and size > run.model.vocab_size:
        raise DataError(
            f"{tokenizer_path}: the tokenizer has {size} tokens but spec.model.vocabSize is "
            f"{run.model.vocab_size}: set spec.model.vocabSize to at least {size}, or use a tokenizer "
            f"with at most {run.model.vocab_size} tokens"
        )
    sha = tokenizer_sha256(tokenizer)
    shard_dirs = {}
    for name, source in run.sources.items():
        if is_shard_source(source):
            shard_dirs[name] = _check_shard_source(name, source, sha, log)
        else:
            shard_dirs[name] = _tokenized(name, source, tokenizer, sha, run_dir, log, progress, max_source_bytes)
    return PreparedData(tokenizer_path=tokenizer_path, shard_dirs=shard_dirs, eos_id=eos_id(tokenizer), vocab_size=size)


def _tokenizer(run, run_dir: Path, log, max_source_bytes: int | None):
    spec = run.tokenizer
    if spec.path is not None:
        log(f"tokenizer: {spec.path}")
        return load_tokenizer(spec.path), spec.path
    if spec.train is None:
        raise DataError("spec.tokenizer: set path (a tokenizers JSON file) or train: {vocabSize: N}")
    path = run_dir / TOKENIZER_FILE
    if path.exists():
        tokenizer = load_tokenizer(path)
        note = ""
        if vocab_size(tokenizer) != spec.train.vocab_size:
            note = (
                f" (it has {vocab_size(tokenizer)} tokens, the spec now asks for {spec.train.vocab_size}: "
                f"start a new run directory to train another)"
            )
        log(f"tokenizer: reusing {path}{note}")
        return tokenizer, str(path)
    log(
        f"tokenizer: training a byte-level BPE of {spec.train.vocab_size} tokens on at most "
        f"{spec.train.max_bytes:,} bytes of text"
    )
    stats = CorpusStats()
    texts = _training_texts(run, spec.train.max_bytes, stats, max_source_bytes)
    tokenizer = train_tokenizer(texts, spec.train.vocab_size, path)
    log(f"tokenizer: trained on {stats.documents:,} documents ({stats.bytes:,} bytes), saved to {path}")
    return tokenizer, str(path)


def _training_texts(run, max_bytes: int, stats: CorpusStats, max_source_bytes: int | None) -> Iterator[str]:
    """Documents from every text source, interleaved so each gets an equal share of bytes (a source that runs
    out leaves its share to the others), at most ``max_bytes`` in total (the last document is cut to fit)."""
    sources = [s for s in run.sources.values() if not is_shard_source(s)]
    if not sources:
        raise DataError(
            "spec.tokenizer.train: every source is a pretokenized shard set, so there is no text to "
            "train on: set spec.tokenizer.path to the tokenizer the shard sets were made with"
        )
    streams = [iter_documents(s, max_bytes=max_source_bytes) for s in sources]
    for doc, size in interleave_by_bytes(streams, max_bytes):
        stats.bytes += size
        stats.documents += 1
        yield doc


def _check_shard_source(name: str, source, sha: str, log) -> str:
    shards = TokenShards.open(source.path)  # validates the whole set (remote sets land in the local cache)
    if shards.tokenizer_sha256 != sha:
        raise DataError(
            f"spec.data.sources.{name}.path: the shard set {source.path} was made with another tokenizer "
            f"(tokenizerSha256 {shards.tokenizer_sha256[:12]}..., the run's is {sha[:12]}...): set "
            f"spec.tokenizer.path to the tokenizer it was made with, or point the source at the text to "
            f"tokenize it again"
        )
    log(f"source {name}: {shards.num_tokens:,} tokens in {shards.num_documents:,} documents ({source.path})")
    if shards.order == "permutation":
        log(
            f"source {name}: {source.path} is a stagerun-tokens/v1 set (no hashes; its order holds ~40 bytes per "
            f"document per process): convert it between runs with `stagerun tokenize --upgrade {source.path}`"
        )
    return source.path


def _tokenized(
    name: str, source, tokenizer, sha: str, run_dir: Path, log, progress: bool, max_source_bytes: int | None
) -> str:
    out = run_dir / DATA_DIR / name
    identity = {
        "path": source.path,
        "format": source.format,
        "textField": source.text_field,
        "maxBytes": max_source_bytes,
        "corpusVersion": corpus_version(source.path),
    }
    if (out / MANIFEST).is_file():
        try:
            manifest = read_manifest(out)
            if manifest.get("source") == identity and manifest["tokenizerSha256"] == sha:
                shards = TokenShards.open(out, verify="all")  # every hash: a damaged cache is rebuilt, not trusted
                log(
                    f"source {name}: reusing {shards.num_tokens:,} tokens in {shards.num_documents:,} documents "
                    f"at {out}"
                )
                return str(out)
            log(f"source {name}: {out} was made from another source or tokenizer: tokenizing again")
        except DataError as exc:
            log(f"source {name}: {out} is damaged ({exc}): tokenizing again")
    stats = CorpusStats()
    manifest = write_shards(
        iter_documents(source, max_bytes=max_source_bytes, stats=stats),
        tokenizer,
        out,
        extra={"source": identity},
        progress=progress,
        desc=f"tokenize {name}",
    )
    if manifest["numDocuments"] == 0:
        shutil.rmtree(out, ignore_errors=True)  # an empty set must not be reused as if it were data
        raise DataError(f"spec.data.sources.{name}.path: {source.path} holds no documents: check the path")
    skipped = f"; skipped {stats.skipped_files} unreadable files" if stats.skipped_files else ""
    log(
        f"source {name}: {stats.documents:,} documents ({stats.bytes:,} bytes) -> {manifest['numTokens']:,} tokens "
        f"at {out}{skipped}"
    )
    return str(out)
