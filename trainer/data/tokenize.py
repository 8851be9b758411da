"""Parallel, resumable pretokenization: text / JSONL / Parquet inputs -> a shard set (format v1).

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
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue

import fsspec
from tqdm import tqdm

from .readers import BadRecords, DataError, InputFile, InputStats, expand_inputs, is_url, parquet_row_groups, read_texts
from .shards import DEFAULT_SHARD_TOKENS, DTYPES, MANIFEST, _ShardWriter, batches, encode_ids, manifest_head, with_eos
from .tokenizer import load_tokenizer

WORK_DIR = ".stagerun-tokenize"
UNITS_DIR = f"{WORK_DIR}/units"
STAGING_DIR = f"{WORK_DIR}/staging"
UNIT_KEY_VERSION = 1
MIN_UNIT_BYTES = 2**20
MAX_UNIT_BYTES = 256 * 2**20
UNITS_PER_RUN = 256  # auto unit size: about this many units, a power of two between the bounds
SHARD_NAME = re.compile(r"^shard-[0-9a-f]{16}-\d{3}\.(bin|idx)$")
# Filesystems whose contents live in one process: workers in other processes cannot see them.
PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})
SKIP_HINT = "; or rerun with --skip-bad-records to skip (and count) malformed records"
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Piece:
    """Part of one input file: all of it, a byte range of lines (JSONL) or a range of row groups (Parquet)."""

    file: InputFile
    bytes: int
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, int] | None = None

    def identity(self) -> list:
        f = self.file
        return [
            f.url,
            f.format,
            f.compression,
            f.size,
            f.fingerprint,
            self.start,
            self.end,
            list(self.row_groups) if self.row_groups else None,
        ]


@dataclass(frozen=True)
class Unit:
    key: str
    pieces: tuple[Piece, ...]
    bytes: int

    @property
    def prefix(self) -> str:
        return f"shard-{self.key[:16]}-"


@dataclass(frozen=True)
class _Job:
    """What every unit of one run shares (sent to the workers)."""

    text_field: str
    shard_tokens: int
    dtype: str
    eos: int
    skip_bad_records: bool
    staging: str  # local folder where units write their files before they are committed


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
        return "\n".join(lines)


# --- planning ----------------------------------------------------------------------------------------------------


def auto_unit_bytes(total_bytes: int) -> int:
    """About UNITS_PER_RUN units, rounded down to a power of two (so a small change of the inputs keeps it)."""
    target = max(1, total_bytes // UNITS_PER_RUN)
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, 2 ** int(math.log2(target)))))


def _pieces(file: InputFile, unit_bytes: int) -> list[Piece]:
    size = file.size or 0
    if file.splittable and size >= 2 * unit_bytes:
        count = size // unit_bytes  # pieces of at least unit_bytes: each is a unit of its own
        edges = [size * i // count for i in range(count + 1)]
        return [Piece(file, b - a, start=a, end=b) for a, b in zip(edges, edges[1:])]
    if file.format == "parquet" and size >= 2 * unit_bytes and not file.streaming:
        groups = parquet_row_groups(file)
        pieces, first, run = [], 0, 0
        for i, (_, group_bytes) in enumerate(groups):
            run += group_bytes
            if run >= unit_bytes or i == len(groups) - 1:
                pieces.append(Piece(file, run, row_groups=(first, i + 1)))
                first, run = i + 1, 0
        if pieces:
            scale = size / max(1, sum(p.bytes for p in pieces))
            return [Piece(p.file, int(p.bytes * scale), row_groups=p.row_groups) for p in pieces]
    return [Piece(file, size)]


def plan_units(
    files: Sequence[InputFile], *, unit_bytes: int, tokenizer_sha: str, text_field: str, shard_tokens: int
) -> list[Unit]:
    """The units of work, in document order: small files packed together, big ones split."""
    common = {
        "v": UNIT_KEY_VERSION,
        "tokenizerSha256": tokenizer_sha,
        "textField": text_field,
        "shardTokens": shard_tokens,
    }
    units: list[Unit] = []
    current: list[Piece] = []

    def flush() -> None:
        if current:
            identity = json.dumps({**common, "pieces": [p.identity() for p in current]}, sort_keys=True)
            key = hashlib.sha256(identity.encode()).hexdigest()
            units.append(Unit(key, tuple(current), sum(p.bytes for p in current)))
            current.clear()

    for file in files:
        for piece in _pieces(file, unit_bytes):
            if piece.bytes >= unit_bytes:
                flush()
                current.append(piece)
                flush()
            else:
                current.append(piece)
                if sum(p.bytes for p in current) >= unit_bytes:
                    flush()
    flush()
    return units


def plan_sha(units: Sequence[Unit], inputs: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(map(str, inputs)), [u.key for u in units]]).encode()).hexdigest()


# --- the output folder -------------------------------------------------------------------------------------------


class _Output:
    """The output folder, local or behind fsspec; units are committed into it one by one."""

    def __init__(self, url: str):
        self.url = str(url)
        self.remote = is_url(self.url)
        if self.remote:
            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")
            self.local = None
        else:
            self.fs, self.root = None, None
            self.local = Path(self.url.removeprefix("file://"))

    @property
    def process_local(self) -> bool:
        return self.remote and _protocol(self.url) in PROCESS_LOCAL_PROTOCOLS

    def _refresh(self) -> None:
        if self.remote:
            self.fs.invalidate_cache()  # other processes wrote here: never trust a cached listing

    def read_manifest(self) -> dict | None:
        if self.remote:
            self._refresh()
            try:
                raw = self.fs.cat_file(f"{self.root}/{MANIFEST}")
            except FileNotFoundError:
                return None
        else:
            path = self.local / MANIFEST
            if not path.is_file():
                return None
            raw = path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return manifest if isinstance(manifest, dict) else {}

    def sizes(self) -> dict[str, int]:
        """Size of every file directly in the folder, by name."""
        if self.remote:
            self._refresh()
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return {}
            return {
                e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries
                if e.get("type", "file") == "file"
            }
        if not self.local.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.local.iterdir() if p.is_file()}

    def markers(self) -> dict[str, dict]:
        """The committed units' markers, by unit key."""
        found: dict[str, dict] = {}
        if self.remote:
            self._refresh()
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/{UNITS_DIR}", detail=False)]
            except FileNotFoundError:
                names = []
            read = lambda name: self.fs.cat_file(f"{self.root}/{UNITS_DIR}/{name}")  # noqa: E731
        else:
            folder = self.local / UNITS_DIR
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            read = lambda name: (folder / name).read_bytes()  # noqa: E731
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                marker = json.loads(read(name))
            except (OSError, ValueError):
                continue  # unreadable: the unit is simply done again
            if isinstance(marker, dict) and marker.get("key") == name[:-5]:
                found[marker["key"]] = marker
        return found

    def staging(self) -> str:
        """A local folder for units' files before they are committed (inside the output when it is local, so the
        commit is a rename on one filesystem)."""
        if self.remote:
            return tempfile.mkdtemp(prefix="stagerun-tokenize-")
        folder = self.local / STAGING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def commit(self, staged: Path, marker: dict) -> None:
        """Move a finished unit's files into place, then write its marker (the unit counts as done only now)."""
        data = (json.dumps(marker, indent=1) + "\n").encode()
        names = [name for shard in marker["shards"] for name in (shard["tokens"], shard["index"])]
        if self.remote:
            self.fs.makedirs(f"{self.root}/{UNITS_DIR}", exist_ok=True)
            for name in names:
                self.fs.put_file(str(staged / name), f"{self.root}/{name}")
            self.fs.pipe_file(f"{self.root}/{UNITS_DIR}/{marker['key']}.json", data)
        else:
            (self.local / UNITS_DIR).mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(staged / name, self.local / name)
            _write_atomic(self.local / UNITS_DIR / f"{marker['key']}.json", data)
        shutil.rmtree(staged, ignore_errors=True)

    def finish(self, manifest: dict, keep: set[str]) -> None:
        """Delete shard files no unit of this plan owns, write the manifest (last), drop the work folder."""
        stale = [name for name in self.sizes() if SHARD_NAME.match(name) and name not in keep]
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        if self.remote:
            for name in stale:
                self.fs.rm_file(f"{self.root}/{name}")
            self.fs.pipe_file(f"{self.root}/{MANIFEST}", data)
            try:
                self.fs.rm(f"{self.root}/{WORK_DIR}", recursive=True)
            except FileNotFoundError:
                pass
            self._refresh()
        else:
            for name in stale:
                (self.local / name).unlink(missing_ok=True)
            _write_atomic(self.local / MANIFEST, data)
            shutil.rmtree(self.local / WORK_DIR, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _committed(output: _Output, units: Sequence[Unit], itemsize: int) -> dict[str, dict]:
    """Markers of this plan's units whose files are all there with the sizes the marker states."""
    markers = output.markers()
    if not markers:
        return {}
    sizes = output.sizes()
    done = {}
    for unit in units:
        marker = markers.get(unit.key)
        if marker is None:
            continue
        try:
            intact = all(
                sizes.get(s["tokens"]) == s["numTokens"] * itemsize and sizes.get(s["index"]) == s["numDocuments"] * 8
                for s in marker["shards"]
            )
        except (KeyError, TypeError):
            intact = False
        if intact:
            done[unit.key] = marker
    return done


# --- the work of one unit (in a worker process, or in this one) --------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, counters, threads: int | None) -> None:
    if threads:
        # Before the tokenizer's first batch: its (rayon) thread pool reads this once, when it starts.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # text that contains "<|endoftext|>" stays text
    _WORKER.update(tokenizer=tokenizer, counters=counters)


def _pool_unit(unit: Unit, job: _Job) -> dict:
    counters = _WORKER["counters"]

    def progress(read: int, tokens: int) -> None:
        with counters[0].get_lock():
            counters[0].value += read
        with counters[1].get_lock():
            counters[1].value += tokens

    return run_unit(unit, job, _WORKER["tokenizer"], progress)


def _unit_batches(
    unit: Unit, job: _Job, bad: BadRecords, stats: dict[int, InputStats]
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


def run_unit(unit: Unit, job: _Job, tokenizer, progress: Callable[[int, int], None] | None = None) -> dict:
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


# --- the run -----------------------------------------------------------------------------------------------------


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def tokenize(
    inputs: Sequence[str],
    tokenizer,
    out: str | os.PathLike,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    processes: int = 1,
    threads: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    unit_bytes: int | None = None,
    skip_bad_records: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TokenizeResult:
    """Tokenize ``inputs`` (paths, folders, globs, fsspec URLs) into a shard set at ``out``; resumable.

    ``tokenizer``: a path/URL of a tokenizers JSON file, or a Tokenizer. ``processes``: worker processes (1: this
    process). ``threads``: tokenizer threads per worker (default: the CPUs divided among the workers).
    ``unit_bytes``: the size of a unit of work (default: about 1/256 of the input, 1 MiB to 256 MiB).
    """
    log = log or (lambda message: None)
    if processes < 1:
        raise DataError(f"--processes must be at least 1, got {processes}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer_source = str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    else:
        tokenizer_source = None
    head = manifest_head(tokenizer)
    files = expand_inputs(inputs, fmt, what="--input")
    total_bytes = sum(f.size or 0 for f in files)
    unit_bytes = unit_bytes or auto_unit_bytes(total_bytes)
    units = plan_units(
        files,
        unit_bytes=unit_bytes,
        tokenizer_sha=head["tokenizerSha256"],
        text_field=text_field,
        shard_tokens=shard_tokens,
    )
    sha = plan_sha(units, inputs)
    output = _Output(str(out))

    existing = output.read_manifest()
    if existing is not None:
        if existing.get("tokenize", {}).get("planSha256") == sha:
            log(f"{out} is already complete for these inputs and settings: nothing to do")
            return TokenizeResult(existing, str(out), len(units), len(units), 0.0, 0, 0, 0, 0)
        raise DataError(
            f"{out} already holds a complete shard set made from other inputs or settings: choose "
            f"another --out, or delete it first"
        )

    itemsize = DTYPES[head["dtype"]].itemsize
    done = _committed(output, units, itemsize)
    pending = [u for u in units if u.key not in done]
    local_only = [f.shown for f in files if _protocol(f.url) in PROCESS_LOCAL_PROTOCOLS]
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
    job = _Job(
        text_field=text_field,
        shard_tokens=shard_tokens,
        dtype=head["dtype"],
        eos=head["eosId"],
        skip_bad_records=skip_bad_records,
        staging=staging,
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
            f"--text-field"
        )
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
    threads = threads or max(1, _cpus() // processes)
    pool = ctx.Pool(processes, initializer=_init_worker, initargs=(tokenizer.to_str(), counters, threads))
    try:
        running = {unit.key: (unit, pool.apply_async(_pool_unit, (unit, job))) for unit in pending}
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


__all__ = ["Piece", "TokenizeResult", "Unit", "auto_unit_bytes", "plan_units", "run_unit", "tokenize"]
