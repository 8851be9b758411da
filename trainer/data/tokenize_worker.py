"""The work of one unit of ``stagerun tokenize``, in a worker process or in this one (see :mod:`.tokenize`).

A unit is tokenized into its own shard files ``shard-<key16>-NNN.bin/.idx`` in a staging folder; the caller
commits them (:class:`.tokenize_output.OutputFolder`).

A document longer than ``LONG_DOCUMENT_CHARS`` is encoded alone, in pieces of about that size, and its ids joined
into one document: a tokenizer holds tens of bytes per token of its input while it encodes (a 40 MB document took
8.5 GB), so pieces bound the memory. Each cut is just before a space that starts a word, where a byte-level BPE's
pre-tokenizer splits anyway, so the ids are those of the whole document (a tokenizer that normalizes or splits
differently may differ by a token at a cut); a run of text without such a space is cut hard.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue

import numpy as np

from .readers import BadRecords, InputStats, ReadLimits, read_texts
from .shards import DTYPES, ENCODE_BATCH_CHARS, ENCODE_BATCH_DOCS, _ShardWriter, encode_ids, with_eos
from .tokenize_units import Unit

SKIP_HINT = "; or rerun with --skip-bad-records to skip (and count) malformed records"
LONG_DOCUMENT_CHARS = 2**18
LONG_DOCUMENT_GROUP = 4  # pieces of a long document encoded together (spread over the cores)


@dataclass(frozen=True)
class Job:
    """What every unit of one run shares (sent to the workers)."""

    text_field: str
    shard_tokens: int
    dtype: str
    eos: int
    skip_bad_records: bool
    staging: str  # local folder where units write their files before they are committed
    limits: ReadLimits = field(default_factory=ReadLimits)


_WORKER: dict = {}


def init_worker(tokenizer_json: str, counters, threads: int | None) -> None:
    if threads:
        # Before the tokenizer's first batch: its (rayon) thread pool reads this once, when it starts.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # text that contains "<|endoftext|>" stays text
    _WORKER.update(tokenizer=tokenizer, counters=counters)


def pool_unit(unit: Unit, job: Job) -> dict:
    counters = _WORKER["counters"]

    def progress(read: int, tokens: int) -> None:
        with counters[0].get_lock():
            counters[0].value += read
        with counters[1].get_lock():
            counters[1].value += tokens

    return run_unit(unit, job, _WORKER["tokenizer"], progress)


def _unit_batches(
    unit: Unit, job: Job, bad: BadRecords, stats: dict[int, InputStats]
) -> Iterator[tuple[list[str], list[int]]]:
    """The unit's documents in order, in batches bounded in count and characters (encode_batch spreads a batch
    over the cores; bounded batches keep memory flat), each with the input index of every document. A long
    document is a batch of its own (``_encode`` cuts it)."""
    batch: list[str] = []
    owners: list[int] = []
    chars = 0
    for piece in unit.pieces:
        index = piece.file.input_index
        piece_stats = stats.setdefault(index, InputStats())
        for text in read_texts(
            piece.file,
            text_field=job.text_field,
            bad=bad,
            stats=piece_stats,
            start=piece.start,
            end=piece.end,
            row_groups=piece.row_groups,
            limits=job.limits,
        ):
            if len(text) > LONG_DOCUMENT_CHARS:
                if batch:
                    yield batch, owners
                    batch, owners, chars = [], [], 0
                yield [text], [index]
                continue
            batch.append(text)
            owners.append(index)
            chars += len(text)
            if len(batch) == ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                yield batch, owners
                batch, owners, chars = [], [], 0
    if batch:
        yield batch, owners


def cut_document(text: str, size: int = LONG_DOCUMENT_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, each cut just before a space followed by a non-space (in
    the last half of the piece), or hard where there is none."""
    start = 0
    while len(text) - start > size:
        limit = start + size
        low = start + size // 2
        cut = limit  # hard, unless a space that starts a word is found
        space = limit
        while (space := text.rfind(" ", low, space)) > start:
            if not text[space + 1].isspace():
                cut = space
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode(tokenizer, batch: list[str], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The batch's tokens, each document followed by EOS, and each document's length (EOS included)."""
    if len(batch) != 1 or len(batch[0]) <= LONG_DOCUMENT_CHARS:
        return with_eos(encode_ids(tokenizer, batch), eos, dtype)
    parts: list[np.ndarray] = []
    group: list[str] = []
    for piece in cut_document(batch[0]):
        group.append(piece)
        if len(group) == LONG_DOCUMENT_GROUP:
            parts.extend(np.array(ids, dtype=dtype) for ids in encode_ids(tokenizer, group))
            group = []
    if group:
        parts.extend(np.array(ids, dtype=dtype) for ids in encode_ids(tokenizer, group))
    parts.append(np.array([eos], dtype=dtype))
    tokens = np.concatenate(parts)
    return tokens, np.array([len(tokens)], dtype=np.int64)


_DONE = object()


def _prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced by a background thread, up to ``depth`` ahead: reading and parsing the next batch (Python)
    overlaps encoding this one (Rust, without the GIL). An error in the thread is raised here."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        queue.put((item, None), timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="stagerun-tokenize-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let the producer see the stop (it may be blocked on a full queue)
            try:
                queue.get_nowait()
            except Empty:
                pass
            thread.join(timeout=0.05)


def run_unit(unit: Unit, job: Job, tokenizer, progress: Callable[[int, int], None] | None = None) -> dict:
    """Tokenize one unit into shard files in ``job.staging/<key>``; returns its marker (not yet committed)."""
    staged = Path(job.staging) / unit.key
    shutil.rmtree(staged, ignore_errors=True)  # what an interrupted attempt left
    staged.mkdir(parents=True)
    dtype = DTYPES[job.dtype]
    writer = _ShardWriter(staged, dtype, job.eos, job.shard_tokens, prefix=unit.prefix, digits=3)
    bad = BadRecords(skip=job.skip_bad_records, hint=SKIP_HINT)
    stats: dict[int, InputStats] = {}
    reported = 0
    try:
        for batch, owners in _prefetched(_unit_batches(unit, job, bad, stats)):
            tokens, lengths = _encode(tokenizer, batch, job.eos, dtype)
            count = writer.add_batch(tokens, lengths)
            if owners[0] == owners[-1]:
                stats[owners[0]].tokens += count
            else:
                for owner, length in zip(owners, lengths.tolist()):
                    stats[owner].tokens += length
            if progress is not None:
                read = sum(s.bytes for s in list(stats.values()))
                progress(read - reported, count)
                reported = read
        writer.close()
    except BaseException:
        writer.close()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if progress is not None:
        progress(sum(s.bytes for s in stats.values()) - reported, 0)
    return {
        "key": unit.key,
        "shards": writer.shards,
        "inputs": {str(i): s.to_json() for i, s in sorted(stats.items())},
        "skipped": bad.examples,
    }
