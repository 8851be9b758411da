"""Data preparation that ``stagerun run`` does once, before starting worker processes.

1. The tokenizer: load ``spec.tokenizer.path``, or train one on the text sources into ``<run dir>/tokenizer.json``
   (a resumed run finds that file and reuses it: retraining would renumber every token).
   With ``spec.tokenizer.chatTemplate`` a trained tokenizer reserves the chat format's special tokens within its
   vocabSize; a given one (spec.tokenizer.path) that lacks them gets them appended (every id of the base tokenizer
   keeps its meaning); either way the run's tokenizer is saved as ``<run dir>/tokenizer-chat.json``.
2. Per source: a pretokenized shard set is used as it is (after checking it was made with this tokenizer, or for
   a text set with the base tokenizer before the chat tokens, and that a chat set was rendered with the run's
   chat template); text is tokenized into ``<run dir>/data/<source>/`` unless a complete set made from the same
   source with the same tokenizer is already there. Chat and preference sources go through ``stagerun tokenize``'s
   path (:func:`.tokenize.tokenize`, resumable), which reuses the set when nothing changed.

Workers then only open shard sets (``TokenShards.open``): tokenizing is never repeated per rank.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stagerun.core.chat_template import ChatFormat, chat_format

from .chat_corpora import BUILTIN_CHAT_CORPORA, builtin_jsonl
from .corpora import BUILTIN_CORPORA, CorpusStats, DataError, corpus_version, iter_documents, source_content
from .shards import MANIFEST, TokenShards, has_manifest, read_manifest, write_shards
from .tokenize import tokenize
from .tokenize_units import template_identity
from .tokenizer import (
    add_chat_tokens,
    eos_id,
    interleave_by_bytes,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
    vocab_size,
)

TOKENIZER_FILE = "tokenizer.json"
CHAT_TOKENIZER_FILE = "tokenizer-chat.json"
DATA_DIR = "data"
BUILTIN_DIR = ".builtin"  # under DATA_DIR: the JSONL files of the built-in chat corpora


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
    base, tokenizer_path = _tokenizer(run, run_dir, log, max_source_bytes)
    chat = chat_format(run.tokenizer.chat_template) if run.tokenizer.chat_template is not None else None
    tokenizer = base
    if chat is not None:
        tokenizer = add_chat_tokens(base, chat)
        chat_path = run_dir / CHAT_TOKENIZER_FILE
        save_tokenizer(tokenizer, chat_path)  # what export and evaluation load: the tokens trained on
        tokenizer_path = str(chat_path)
        log(f"tokenizer: chat format {chat.name}, its special tokens added ({chat_path})")
    size = vocab_size(tokenizer)
    if run.model.vocab_size is not None and size > run.model.vocab_size:
        added = vocab_size(tokenizer) - vocab_size(base)
        why = f" ({added} of them the {chat.name} chat template's special tokens, appended)" if chat and added else ""
        raise DataError(
            f"{tokenizer_path}: the tokenizer has {size} tokens{why} but spec.model.vocabSize is "
            f"{run.model.vocab_size}: set spec.model.vocabSize to at least {size}, or use a tokenizer "
            f"with at most {run.model.vocab_size} tokens"
            + (" that already holds the template's tokens (stagerun tokenizer add-chat-tokens)" if why else "")
        )
    sha = tokenizer_sha256(tokenizer)
    # A text set made with the tokenizer before the chat tokens were appended holds the same ids.
    text_shas = {sha, tokenizer_sha256(base)}
    shard_dirs = {}
    for name, source in run.sources.items():
        content = source_content(source, f"spec.data.sources.{name}")
        if is_shard_source(source):
            shard_dirs[name] = _check_shard_source(name, source, sha, text_shas, chat, log)
        elif content != "text":
            if chat is None:  # validation refuses this; a caller that skipped it gets the same answer
                raise DataError(
                    f"spec.tokenizer.chatTemplate: unset, but source {name} is {content} data: add chatTemplate: "
                    f"{{format: chatml}} (or zephyr, llama3, custom)"
                )
            shard_dirs[name] = _chat_tokenized(name, source, content, base, chat, run_dir, log, progress)
            if max_source_bytes is not None:
                log(f"source {name}: the {max_source_bytes:,}-byte cap applies to text sources only: kept whole")
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
    # A chat template's special tokens are reserved inside vocabSize (the model's vocabulary stays the one asked
    # for); appending them after training (what a given tokenizer gets) would grow it past spec.model.vocabSize.
    chat = chat_format(spec.chat_template) if spec.chat_template is not None else None
    tokenizer = train_tokenizer(texts, spec.train.vocab_size, path, chat)
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


def _check_shard_source(name: str, source, sha: str, text_shas: set[str], chat: ChatFormat | None, log) -> str:
    shards = TokenShards.open(source.path)  # validates the whole set (remote sets land in the local cache)
    if shards.content != "text":
        _check_chat_set(name, source, shards, chat)
    elif shards.tokenizer_sha256 in text_shas:
        sha = shards.tokenizer_sha256
    if shards.tokenizer_sha256 != sha:
        raise DataError(
            f"spec.data.sources.{name}.path: the shard set {source.path} was made with another tokenizer "
            f"(tokenizerSha256 {shards.tokenizer_sha256[:12]}..., the run's is {sha[:12]}...): set "
            f"spec.tokenizer.path to the tokenizer it was made with, or point the source at the text to "
            f"tokenize it again"
        )
    loss = ""
    if shards.content != "text":
        share = shards.num_loss_tokens / max(1, shards.num_tokens)
        pairs = f", {shards.num_pairs:,} pairs" if shards.content == "preference" else ""
        loss = f"; {shards.content}: {shards.num_loss_tokens:,} loss tokens ({share:.1%}){pairs}"
    log(f"source {name}: {shards.num_tokens:,} tokens in {shards.num_documents:,} documents ({source.path})" + loss)
    if shards.order == "permutation":
        log(
            f"source {name}: {source.path} is a stagerun-tokens/v1 set (no hashes; its order holds ~40 bytes per "
            f"document per process): convert it between runs with `stagerun tokenize --upgrade {source.path}`"
        )
    return source.path


def _check_chat_set(name: str, source, shards: TokenShards, chat: ChatFormat | None) -> None:
    """A chat or preference shard set must have been rendered with the run's chat template."""
    made = shards.chat_template or {}
    if chat is None:
        raise DataError(
            f"spec.tokenizer.chatTemplate: unset, but source {name} ({source.path}) is a {shards.content} set "
            f"rendered with chat format {made.get('format')!r}: set chatTemplate: {{format: {made.get('format')}}} "
            f"(the format it was made with)"
        )
    if made.get("jinjaSha256") != template_identity(chat)["jinjaSha256"]:
        same_name = made.get("format") == chat.name
        raise DataError(
            f"spec.tokenizer.chatTemplate: the run renders chats as {chat.name}, but source {name} ({source.path}) "
            f"was rendered with {made.get('format')!r}"
            + (" of other prefixes or suffixes" if same_name else "")
            + ": set spec.tokenizer.chatTemplate to the format the set was made with, or point the source at its "
            "JSONL to tokenize it again"
        )


def _chat_tokenized(name: str, source, content: str, base, chat: ChatFormat, run_dir: Path, log, progress: bool) -> str:
    """A chat or preference source tokenized into ``<run dir>/data/<source>/`` (reused when nothing changed)."""
    out = run_dir / DATA_DIR / name
    inputs = [source.path]
    if source.path in BUILTIN_CHAT_CORPORA:
        inputs = [str(builtin_jsonl(source.path, run_dir / DATA_DIR / BUILTIN_DIR))]
    for attempt in range(2):
        result = tokenize(
            inputs,
            base,
            out,
            fmt=content,
            chat_template=chat,
            progress=progress,
            log=lambda message: log(f"source {name}: {message}"),
            replace=True,
        )
        try:
            TokenShards.open(out, verify="all")  # every hash: a damaged cache is made again, not trusted
            break
        except DataError as exc:
            if attempt:
                raise
            log(f"source {name}: {out} is damaged ({exc}): tokenizing again")
            (out / MANIFEST).unlink()
    manifest = result.manifest
    reused = "reusing " if result.reused_units == result.units and result.units else ""
    pairs = f", {manifest['numPairs']:,} pairs" if content == "preference" else ""
    log(
        f"source {name}: {reused}{manifest['numDocuments']:,} {content} documents{pairs} -> "
        f"{manifest['numTokens']:,} tokens, {manifest['numLossTokens']:,} of them trained on "
        f"({manifest['numLossTokens'] / max(1, manifest['numTokens']):.1%}) at {out}"
    )
    return str(out)


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
