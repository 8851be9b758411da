"""Parallel, resumable pretokenization: text / JSONL / Parquet inputs -> a shard set (format v2).

The work is cut into *units* before anything is read: the input files in order, small files packed together and
big ones split (uncompressed JSONL by byte ranges at line starts, Parquet by row groups) into pieces of about
``unit_bytes``. A unit is identified by a key, the hash of what it reads (each file's URL, size and fingerprint,
the range) and of what it makes (the tokenizer's fingerprint, the text field, the shard size), so a unit's output
is only ever reused for exactly the same work.

Each unit is tokenized by a worker process (multiprocessing with spawn) into its own shard files
``shard-<key16>-NNN.bin/.idx`` and committed atomically: its files are moved (local) or uploaded (fsspec URL) into
the output folder, and only then is its marker ``.stagerun-tokenize/units/<key>.json`` written (the unit's shards,
token/document counts and skipped records). A rerun after an interruption skips every unit whose marker is there
and whose files have the sizes the marker states, and tokenizes the rest. The manifest is assembled from the markers
last, after every unit is committed: until then the folder has no ``manifest.json`` and is not a valid shard set.

Documents keep the input order (units in order, each unit's documents in order), so the same inputs give the same
shard set whatever the number of processes.

Hostile input is bounded: a record over ``max_record_bytes`` is a malformed record (its file, line and byte named),
a compressed file that expands more than ``max_expansion`` times stops the run, long documents are encoded in
pieces (:mod:`.tokenize_worker`), and ``--out`` must be a folder that no input lies in.

Chat and preference JSONL (``fmt`` "chat" / "preference") are rendered with a chat format (the tokenizer gains its
special tokens first) into a set with dtype uint32 whose bit 31 marks the training targets, and the manifest keys
of :mod:`.shard_format` (content, lossMask, numLossTokens, numPairs, chatTemplate); the content kind and the template
are part of every unit's key.

The parts: planning the units (:mod:`.tokenize_units`), the work of one unit (:mod:`.tokenize_worker`) and the
output folder units are committed into (:mod:`.tokenize_output`); this module runs them and writes the manifest.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from stagerun.core.chat_template import ChatFormat, chat_format

from . import usable_cpus
from .readers import CHAT_CONTENTS, DataError, InputFile, InputStats, ReadLimits, expand_inputs
from .shard_format import LOSS_MASK_BIT
from .shards import DEFAULT_SHARD_TOKENS, DTYPES, MANIFEST, manifest_head
from .tokenize_output import PROCESS_LOCAL_PROTOCOLS, OutputFolder, committed_units, protocol_of
from .tokenize_units import (
    DEFAULT_MAX_EXPANSION,
    DEFAULT_MAX_RECORD_BYTES,
    Piece,
    Unit,
    auto_unit_bytes,
    plan_sha,
    plan_units,
    template_identity,
)
from .tokenize_worker import SKIP_HINT, Job, init_worker, pool_unit, run_unit
from .tokenizer import add_chat_tokens, load_tokenizer

__all__ = [
    "SKIP_HINT",
    "Piece",
    "TokenizeResult",
    "Unit",
    "auto_unit_bytes",
    "plan_units",
    "run_unit",
    "tokenize",
]

POLL_SECONDS = 0.1


@dataclass
class TokenizeResult:
    """What a run did: the manifest it wrote and the throughput of the work done in this run."""

    manifest: dict
    out: str
    units: int
    reused_units: int
    seconds: float
    bytes: int  # input bytes tokenized in this run (reused units not counted)
    tokens: int  # tokens written in this run
    documents: int
    processes: int
    skipped_examples: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        info = self.manifest["tokenize"]
        lines = [
            f"{self.out}: {self.manifest['numDocuments']:,} documents, {self.manifest['numTokens']:,} tokens "
            f"({self.manifest['dtype']}) in {len(self.manifest['shards'])} shards from {len(info['inputs'])} "
            f"input(s)"
        ]
        if self.reused_units:
            lines.append(f"resumed: {self.reused_units} of {self.units} units were already done")
        if self.units > self.reused_units:
            lines.append(
                f"throughput: {self.tokens_per_second / 1e6:,.2f}M tokens/s, {self.mb_per_second:,.1f} MB/s "
                f"({self.tokens:,} tokens from {self.bytes / 1e6:,.1f} MB in {self.seconds:,.1f} s, "
                f"{self.processes} process{'es' if self.processes != 1 else ''})"
            )
        bad = info["skippedRecords"] + info["skippedFiles"]
        if bad:
            shown = "; ".join(f"{e['where']}: {e['problem']}" for e in info["skipped"][:5])
            more = f" (first {min(5, len(info['skipped']))}: {shown})" if shown else ""
            lines.append(
                f"skipped: {info['skippedRecords']:,} malformed records and {info['skippedFiles']:,} files"
                f"{more}; all listed by count in {MANIFEST} under tokenize.inputs"
            )
        if info["emptyDocuments"]:
            lines.append(f"empty texts (no document made): {info['emptyDocuments']:,}")
        if "lossMask" in self.manifest:
            loss, total = self.manifest["numLossTokens"], self.manifest["numTokens"]
            pairs = f" in {self.manifest['numPairs']:,} preference pairs" if "numPairs" in self.manifest else ""
            lines.append(
                f"loss tokens (responses, trained on): {loss:,} of {total:,} ({loss / max(1, total):.1%}){pairs}; "
                f"chat template {self.manifest['chatTemplate']['format']}"
            )
        return "\n".join(lines)


def _special_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens: what a chat message must not hold (see readers.read_chats)."""
    return tuple(sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special))


# --- the run -----------------------------------------------------------------------------------------------------


def tokenize(
    inputs: Sequence[str],
    tokenizer,
    out: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    text_field: str = "text",
    chat_template=None,
    processes: int = 1,
    threads: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    unit_bytes: int | None = None,
    skip_bad_records: bool = False,
    max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES,
    max_expansion: float | None = DEFAULT_MAX_EXPANSION,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    replace: bool = False,
) -> TokenizeResult:
    """Tokenize ``inputs`` (paths, folders, globs, fsspec URLs) into a shard set at ``out``; resumable.

    ``tokenizer``: a path/URL of a tokenizers JSON file, or a Tokenizer. ``fmt`` "chat" or "preference": JSONL of
    conversations or preference pairs, rendered with ``chat_template`` (a spec.tokenizer.chatTemplate block, or a
    ChatFormat). ``processes``: worker processes (1: this process). ``threads``: tokenizer threads per worker
    (default: the CPUs divided among the workers).
    ``unit_bytes``: the size of a unit of work (default: about 1/256 of the input, 1 MiB to 256 MiB).
    ``max_record_bytes``: the largest record (JSONL line, text file, Parquet value); ``max_expansion``: how many
    times its size a compressed file may decompress to (None: unbounded). ``replace``: a complete set at ``out``
    made from other inputs or settings is made again (the run-start tokenization's cache), not an error.
    """
    log = log or (lambda message: None)
    if processes < 1:
        raise DataError(f"--processes must be at least 1, got {processes}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    if max_record_bytes is not None and max_record_bytes < 1:
        raise DataError(f"--max-record-bytes must be positive, got {max_record_bytes}")
    if max_expansion is not None and not max_expansion > 0:
        raise DataError(f"--max-expansion must be positive, got {max_expansion}")
    content = fmt if fmt in CHAT_CONTENTS else "text"
    chat: ChatFormat | None = None
    if content != "text":
        if chat_template is None:
            raise DataError(f"--format {fmt} needs --chat-template (chatml, zephyr, llama3, or a file): how to render")
        chat = chat_template if isinstance(chat_template, ChatFormat) else chat_format(chat_template)
    elif chat_template is not None:
        raise DataError(
            f"a chat template applies to --format chat or preference, not {fmt}: drop it, or set the format"
        )
    output = OutputFolder(str(out))
    output.check()  # before any work: a file in the way would only fail at the first commit
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer_source = str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    else:
        tokenizer_source = None
    if chat is not None:
        tokenizer = add_chat_tokens(tokenizer, chat)  # the format's markup: special tokens, never split
    head = manifest_head(tokenizer)
    if chat is not None:
        if head["vocabSize"] > 1 << LOSS_MASK_BIT:
            raise DataError(
                f"the tokenizer has {head['vocabSize']:,} tokens: a chat set keeps its loss mask in bit 31, so it "
                f"holds ids below {1 << LOSS_MASK_BIT:,} only"
            )
        head["dtype"] = "uint32"  # always: bit 31 is the loss mask
    files = expand_inputs(inputs, "jsonl" if chat is not None else fmt, what="--input")
    output.check_apart([str(i) for i in inputs], files)
    total_bytes = sum(f.size or 0 for f in files)
    unit_bytes = unit_bytes or auto_unit_bytes(total_bytes)
    units = plan_units(
        files,
        unit_bytes=unit_bytes,
        tokenizer_sha=head["tokenizerSha256"],
        text_field=text_field,
        shard_tokens=shard_tokens,
        max_record_bytes=max_record_bytes,
        content=content,
        chat_template=template_identity(chat) if chat is not None else None,
    )
    sha = plan_sha(units, inputs)

    existing = output.read_manifest()
    if existing is not None:
        if existing.get("tokenize", {}).get("planSha256") == sha:
            log(f"{out} is already complete for these inputs and settings: nothing to do")
            return TokenizeResult(existing, str(out), len(units), len(units), 0.0, 0, 0, 0, 0)
        if replace:
            log(f"{out} was made from other inputs or settings: tokenizing again")
            output.drop_manifest()  # its shard files go once the new set is complete (finish)
        else:
            raise DataError(
                f"{out} already holds a complete shard set made from other inputs or settings: choose "
                f"another --out, or delete it first"
            )

    itemsize = DTYPES[head["dtype"]].itemsize
    done = committed_units(output, units, itemsize)
    pending = [u for u in units if u.key not in done]
    local_only = [f.shown for f in files if protocol_of(f.url) in PROCESS_LOCAL_PROTOCOLS]
    if processes > 1 and (local_only or output.process_local):
        log(f"{(local_only or [output.url])[0]} lives in this process's memory: tokenizing in 1 process")
        processes = 1
    processes = max(1, min(processes, len(pending)))
    log(
        f"{len(files)} files, {total_bytes / 1e6:,.1f} MB in {len(units)} units of about {unit_bytes / 2**20:g} MiB"
        + (f" ({len(done)} already done)" if done else "")
        + f"; {processes} process{'es' if processes > 1 else ''}"
    )
    staging = output.staging()
    job = Job(
        text_field=text_field,
        shard_tokens=shard_tokens,
        dtype=head["dtype"],
        eos=head["eosId"],
        skip_bad_records=skip_bad_records,
        staging=staging,
        limits=ReadLimits(max_record_bytes=max_record_bytes, max_expansion=max_expansion),
        content=content,
        chat=chat,
        special_tokens=_special_tokens(tokenizer) if chat is not None else (),
    )
    work_bytes = sum(u.bytes for u in pending)
    bar = tqdm(
        total=work_bytes,
        desc="tokenize",
        unit="B",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
        smoothing=0.1,
    )
    start_work = time.perf_counter()
    try:
        if processes == 1:
            _run_here(pending, job, tokenizer, output, done, bar, threads)
        else:
            _run_pool(pending, job, tokenizer, output, done, bar, processes, threads)
    finally:
        bar.close()
        if output.remote:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start_work

    manifest = _assemble(
        head, units, done, files, inputs, fmt, text_field, unit_bytes, shard_tokens, sha, tokenizer_source
    )
    if manifest["numDocuments"] == 0:
        raise DataError(
            f"the inputs hold no documents ({manifest['tokenize']['skippedRecords']:,} malformed records "
            f"and {manifest['tokenize']['skippedFiles']:,} files skipped, "
            f"{manifest['tokenize']['emptyDocuments']:,} empty texts): check --input, --format and "
            + ("--text-field" if chat is None else "the records' fields")
        )
    if chat is not None:
        manifest.update(_chat_keys(manifest, content, chat))
    keep = {name for s in manifest["shards"] for name in (s["tokens"], s["index"])}
    output.finish(manifest, keep)
    work = [done[u.key] for u in pending]
    return TokenizeResult(
        manifest=manifest,
        out=str(out),
        units=len(units),
        reused_units=len(units) - len(pending),
        seconds=seconds,
        bytes=sum(u.bytes for u in pending),
        tokens=sum(s["numTokens"] for m in work for s in m["shards"]),
        documents=sum(s["numDocuments"] for m in work for s in m["shards"]),
        processes=processes,
        skipped_examples=manifest["tokenize"]["skipped"],
    )


def _run_here(pending, job, tokenizer, output, done, bar, threads) -> None:
    if threads:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # effective if nothing was tokenized yet

    tokens_done = 0

    def progress(read: int, tokens: int) -> None:
        nonlocal tokens_done
        tokens_done += tokens
        bar.set_postfix_str(f"{tokens_done / 1e6:,.1f}M tokens", refresh=False)
        bar.update(read)

    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # text that contains "<|endoftext|>" stays text
    try:
        for unit in pending:
            marker = run_unit(unit, job, tokenizer, progress)
            output.commit(Path(job.staging) / unit.key, marker)
            done[unit.key] = marker
    finally:
        tokenizer.encode_special_tokens = previous


def _run_pool(pending, job, tokenizer, output, done, bar, processes, threads) -> None:
    ctx = mp.get_context("spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    threads = threads or max(1, usable_cpus() // processes)
    pool = ctx.Pool(processes, initializer=init_worker, initargs=(tokenizer.to_str(), counters, threads))
    try:
        running = {unit.key: (unit, pool.apply_async(pool_unit, (unit, job))) for unit in pending}
        shown = 0
        while running:
            failure = None
            for key, (unit, result) in list(running.items()):
                if result.ready():
                    del running[key]
                    try:
                        marker = result.get()
                    except Exception as exc:  # a worker's error (e.g. a malformed record)
                        failure = failure or exc
                        continue
                    output.commit(Path(job.staging) / unit.key, marker)
                    done[key] = marker
            if failure is not None:
                raise failure  # after committing every unit that finished: a rerun keeps them
            read = counters[0].value
            bar.set_postfix_str(f"{counters[1].value / 1e6:,.1f}M tokens", refresh=False)
            bar.update(read - shown)
            shown = read
            if running:
                time.sleep(POLL_SECONDS)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _chat_keys(manifest: dict, content: str, chat: ChatFormat) -> dict:
    """The manifest keys of a chat or preference set (shard_format)."""
    keys = {
        "content": content,
        "lossMask": "bit31",
        "numLossTokens": sum(s["numLossTokens"] for s in manifest["shards"]),
        "chatTemplate": {"format": chat.name, "jinjaSha256": template_identity(chat)["jinjaSha256"]},
    }
    if content == "preference":
        keys["numPairs"] = sum(s["numPairs"] for s in manifest["shards"])
    return keys


def _assemble(
    head: dict,
    units: Sequence[Unit],
    done: dict[str, dict],
    files: Sequence[InputFile],
    inputs: Sequence[str],
    fmt: str,
    text_field: str,
    unit_bytes: int,
    shard_tokens: int,
    sha: str,
    tokenizer_source: str | None,
) -> dict:
    per_input = [InputStats() for _ in inputs]
    shards: list[dict] = []
    skipped: list[dict] = []
    for unit in units:
        marker = done[unit.key]
        shards.extend(marker["shards"])
        for index, data in marker["inputs"].items():
            per_input[int(index)].add(InputStats.from_json(data))
        skipped.extend(marker.get("skipped", [])[: 100 - len(skipped)])
    total = InputStats()
    for stats in per_input:
        total.add(stats)
    file_counts = [0] * len(inputs)
    for f in files:
        file_counts[f.input_index] += 1
    info = {
        "inputs": [
            {"input": str(pattern), "files": file_counts[i], **per_input[i].to_json()}
            for i, pattern in enumerate(inputs)
        ],
        "format": fmt,
        "textField": text_field,
        "tokenizer": tokenizer_source,
        "unitBytes": unit_bytes,
        "shardTokens": shard_tokens,
        "units": len(units),
        "planSha256": sha,
        "bytes": total.bytes,
        "emptyDocuments": total.empty,
        "skippedRecords": total.skipped_records,
        "skippedFiles": total.skipped_files,
        "skipped": skipped,
    }
    return {
        **head,
        "numTokens": sum(s["numTokens"] for s in shards),
        "numDocuments": sum(s["numDocuments"] for s in shards),
        "shards": shards,
        "tokenize": info,
    }
