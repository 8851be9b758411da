"""The work of one unit of ``stagerun tokenize``, in a worker process or in this one (see :mod:`.tokenize`).

A unit is tokenized into its own shard files ``shard-<key16>-NNN.bin/.idx`` in a staging folder; the caller
commits them (:class:`.tokenize_output.OutputFolder`).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Full, Queue

from .readers import BadRecords, InputStats, read_texts
from .shards import DTYPES, _ShardWriter, batches, encode_ids, with_eos
from .tokenize_units import Unit

SKIP_HINT = "; or rerun with --skip-bad-records to skip (and count) malformed records"


@dataclass(frozen=True)
class Job:
    """What every unit of one run shares (sent to the workers)."""

    text_field: str
    shard_tokens: int
    dtype: str
    eos: int
    skip_bad_records: bool
    staging: str  # local folder where units write their files before they are committed


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
    """The unit's documents in order, in batches, each with the input index of every document."""
    owners: list[int] = []

    def documents() -> Iterator[str]:
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
            ):
                owners.append(index)
                yield text

    for batch in batches(documents()):
        # batches() hands a batch over as soon as it holds its last document: owners are exactly this batch's.
        mine = owners[:]
        owners.clear()
        yield batch, mine


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
            tokens, lengths = with_eos(encode_ids(tokenizer, batch), job.eos, dtype)
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
