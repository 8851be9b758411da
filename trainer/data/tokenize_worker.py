"""The work of one unit of ``stagerun tokenize``, in a worker process or in this one (see :mod:`.tokenize`).

A unit is tokenized into its own shard files ``shard-<key16>-NNN.bin/.idx`` in a staging folder; the caller
commits them (:class:`.tokenize_output.OutputFolder`).

A document longer than ``LONG_DOCUMENT_CHARS`` is encoded alone, in pieces of about that size, and its ids joined
into one document: a tokenizer holds tens of bytes per token of its input while it encodes (a 40 MB document took
8.5 GB), so pieces bound the memory. Each cut is just before a space that starts a word, where a byte-level BPE's
pre-tokenizer splits anyway, so the ids are those of the whole document (a tokenizer that normalizes or splits
differently may differ by a token at a cut); a run of text without such a space is cut hard.

Chat and preference units (``Job.content``) render each conversation with the chat format
(:meth:`ChatFormat.render`) and encode the whole rendered text at once, special tokens recognised, so the ids are
those of transformers' ``apply_chat_template(tokenize=True)`` with the same tokenizer; a token is a training target
(bit 31 of its stored value set) iff its first character lies in one of the render's loss spans. A preference pair
becomes two documents, the prompt with the chosen response and with the rejected one, of which only the responses'
spans count (a shard never splits a pair).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue

import numpy as np

from stagerun.core.chat_template import ChatFormat, RenderedChat

from .readers import BadRecords, ChatRecord, InputStats, ReadLimits, read_chats, read_texts
from .shard_format import LOSS_MASK_BIT
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
    content: str = "text"  # text | chat | preference
    chat: ChatFormat | None = None  # how chat and preference records are rendered
    special_tokens: tuple[str, ...] = ()  # the tokenizer's: a message holding one is a malformed record


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


# --- chat and preference units ------------------------------------------------------------------------------------


def special_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    """A regex matching any of the special tokens (longest first), None for none."""
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True)))


def render_record(fmt: ChatFormat, record: ChatRecord, content: str) -> list[RenderedChat]:
    """A chat record's one document, or a preference pair's two: the prompt with each response, whose loss spans
    are the response's alone (an assistant turn inside the prompt is context, not a target)."""
    if content == "chat":
        return [fmt.render(record.messages)]
    prompt_chars = len(fmt.render(record.messages).text)
    out = []
    for response in (record.chosen, record.rejected):
        rendered = fmt.render((*record.messages, *response))
        out.append(RenderedChat(rendered.text, tuple(s for s in rendered.loss_spans if s[0] >= prompt_chars)))
    return out


def _chat_batches(
    unit: Unit, job: Job, bad: BadRecords, stats: dict[int, InputStats]
) -> Iterator[tuple[list[RenderedChat], list[int]]]:
    """Like ``_unit_batches``, for chat and preference units: rendered documents (a pair's two together)."""
    assert job.chat is not None
    forbidden = special_pattern(job.special_tokens)
    batch: list[RenderedChat] = []
    owners: list[int] = []
    chars = 0
    for piece in unit.pieces:
        index = piece.file.input_index
        piece_stats = stats.setdefault(index, InputStats())
        for record in read_chats(
            piece.file,
            content=job.content,
            bad=bad,
            stats=piece_stats,
            start=piece.start,
            end=piece.end,
            limits=job.limits,
            forbidden=forbidden,
        ):
            documents = render_record(job.chat, record, job.content)
            batch.extend(documents)
            owners.extend([index] * len(documents))
            chars += sum(len(d.text) for d in documents)
            if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                yield batch, owners
                batch, owners, chars = [], [], 0
    if batch:
        yield batch, owners


def _starts(encoding, shift: int = 0) -> np.ndarray:
    return np.fromiter((start + shift for start, _ in encoding.offsets), dtype=np.int64, count=len(encoding.ids))


def encode_chats(tokenizer, batch: list[RenderedChat], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's stored values (uint32: id, plus bit 31 on training targets), each document followed by EOS (not a
    target), and each document's length (EOS included). A long document is encoded in pieces (see the module)."""
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(batch), dtype=np.int64)
    short = [i for i, d in enumerate(batch) if len(d.text) <= LONG_DOCUMENT_CHARS]
    encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if short:
        for i, e in zip(short, tokenizer.encode_batch([batch[i].text for i in short], add_special_tokens=False)):
            encoded[i] = (np.array(e.ids, dtype=np.uint32), _starts(e))
    for i, document in enumerate(batch):
        if i not in encoded:
            id_parts, start_parts, at = [], [], 0
            for piece in cut_document(document.text):
                e = tokenizer.encode(piece, add_special_tokens=False)
                id_parts.append(np.array(e.ids, dtype=np.uint32))
                start_parts.append(_starts(e, at))
                at += len(piece)
            encoded[i] = (np.concatenate(id_parts), np.concatenate(start_parts))
        ids, starts = encoded.pop(i)
        targets = np.zeros(len(document.text) + 1, dtype=bool)  # per character: inside a loss span
        for start, stop in document.loss_spans:
            targets[start:stop] = True
        values = ids | (targets[np.minimum(starts, len(document.text))].astype(np.uint32) << LOSS_MASK_BIT)
        parts.extend((values, np.array([eos], dtype=np.uint32)))
        lengths[i] = len(values) + 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    return tokens, lengths


def run_unit(unit: Unit, job: Job, tokenizer, progress: Callable[[int, int], None] | None = None) -> dict:
    """Tokenize one unit into shard files in ``job.staging/<key>``; returns its marker (not yet committed)."""
    staged = Path(job.staging) / unit.key
    shutil.rmtree(staged, ignore_errors=True)  # what an interrupted attempt left
    staged.mkdir(parents=True)
    dtype = DTYPES[job.dtype]
    chat = job.content != "text"
    writer = _ShardWriter(
        staged,
        dtype,
        job.eos,
        job.shard_tokens,
        prefix=unit.prefix,
        digits=3,
        loss_mask=chat,
        group=2 if job.content == "preference" else 1,
    )
    bad = BadRecords(skip=job.skip_bad_records, hint=SKIP_HINT)
    stats: dict[int, InputStats] = {}
    reported = 0
    # Text that contains "<|endoftext|>" stays text; a rendered chat's markup must become its special tokens (the
    # readers refuse messages that hold one).
    previous_special = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = not chat
    batches = _chat_batches(unit, job, bad, stats) if chat else _unit_batches(unit, job, bad, stats)
    try:
        for batch, owners in _prefetched(batches):
            if chat:
                tokens, lengths = encode_chats(tokenizer, batch, job.eos)
            else:
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
    finally:
        tokenizer.encode_special_tokens = previous_special
    if progress is not None:
        progress(sum(s.bytes for s in stats.values()) - reported, 0)
    return {
        "key": unit.key,
        "shards": writer.shards,
        "inputs": {str(i): s.to_json() for i, s in sorted(stats.items())},
        "skipped": bad.examples,
    }
