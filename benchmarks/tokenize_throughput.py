"""Pretokenization throughput: `stagerun tokenize` against a plain `tokenizers` batch-encode loop on the same input.

    python benchmarks/tokenize_throughput.py [--mb 32] [--repeats 3] [--max-processes N] [--markdown FILE]

The input is the two builtin corpora (the Python docs and the standard library's source, ~13 MB) written as JSONL
files, repeated to about ``--mb`` megabytes (default 32). A byte-level BPE of ``--vocab`` tokens is trained on them
first.

Every measurement runs in a fresh subprocess (so the tokenizer's thread count, RAYON_NUM_THREADS, applies) and the
best of ``--repeats`` runs is kept, the runs interleaved round by round (the machine may be shared). Timed, inside
the subprocess:

- baseline: read each JSONL file line by line, ``json.loads``, batch (512 documents / 2M characters, as stagerun
  does), ``Tokenizer.encode_batch`` (and ``encode_batch_fast``, the offset-free variant) and take ``.ids``; nothing
  is written;
- stagerun: the whole ``tokenize()`` call (planning, worker start, reading, encoding, writing the shards,
  committing units, the manifest) into a fresh folder.

Tables: (1) one process, the tokenizer on all cores, against the baseline (ratio >= 0.9 expected); (2) processes
1, 2, ... up to the core count with one tokenizer thread each (``--threads 1``), against one process (near-linear
expected); (3) the default (``--threads`` = cores / processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_DOCS = 512
BATCH_CHARS = 2_000_000


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --- inside the measuring subprocess -----------------------------------------------------------------------------


def run_baseline(data: Path, tokenizer_path: Path, fast: bool) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    start = time.perf_counter()
    tokens = size = documents = 0
    batch: list[str] = []
    chars = 0

    def flush() -> int:
        return sum(len(e.ids) for e in encode(batch, add_special_tokens=False))

    for path in sorted(data.glob("*.jsonl")):
        with open(path, "rb") as handle:
            for line in handle:
                size += len(line)
                text = json.loads(line)["text"]
                batch.append(text)
                chars += len(text)
                documents += 1
                if len(batch) == BATCH_DOCS or chars >= BATCH_CHARS:
                    tokens += flush()
                    batch, chars = [], 0
    if batch:
        tokens += flush()
    return {"seconds": time.perf_counter() - start, "tokens": tokens + documents, "bytes": size}


def run_stagerun(data: Path, tokenizer_path: Path, processes: int, threads: int | None, out: Path) -> dict:
    from stagerun.trainer.data.tokenize import tokenize

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = tokenize(
        [str(data / "*.jsonl")], tokenizer_path, out, processes=processes, threads=threads, progress=False
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "tokens": result.manifest["numTokens"], "bytes": result.bytes, "units": result.units}


# --- the driver --------------------------------------------------------------------------------------------------


def prepare(work: Path, megabytes: int, vocab: int, files: int) -> tuple[Path, Path]:
    data, tokenizer_path = work / f"jsonl-{megabytes}mb", work / f"tokenizer-{vocab}.json"
    if not (data / "done").exists():
        from stagerun.core.spec.run import SourceSpec
        from stagerun.trainer.data import iter_documents
        from stagerun.trainer.data.corpora import BUILTIN_CODE, BUILTIN_DOCS

        docs = [d for path in (BUILTIN_DOCS, BUILTIN_CODE) for d in iter_documents(SourceSpec(path=path, weight=1))]
        lines = [json.dumps({"text": d}) + "\n" for d in docs]
        size = sum(len(line.encode()) for line in lines)
        copies = max(1, round(megabytes * 1e6 / size))
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        handles = [open(data / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
        for copy in range(copies):
            for i, line in enumerate(lines):
                handles[(i + copy) % files].write(line)
        for handle in handles:
            handle.close()
        (data / "done").touch()
    if not tokenizer_path.exists():
        from stagerun.core.spec.run import SourceSpec
        from stagerun.trainer.data import iter_documents, train_tokenizer
        from stagerun.trainer.data.corpora import BUILTIN_CODE, BUILTIN_DOCS

        docs = [d for path in (BUILTIN_DOCS, BUILTIN_CODE) for d in iter_documents(SourceSpec(path=path, weight=1))]
        train_tokenizer(docs, vocab, tokenizer_path)
    return data, tokenizer_path


def measure_once(spec: dict, env: dict | None) -> dict:
    """One run of one configuration in a fresh subprocess; adds the CPU seconds of it and its workers."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, __file__, "--measure", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{spec} failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def measure_all(configs: dict[str, tuple[dict, dict | None]], repeats: int) -> dict[str, dict]:
    """Best of ``repeats`` runs of every configuration; the runs are interleaved (round after round) so that a
    busy moment of a shared machine does not land on one configuration only."""
    best: dict[str, dict] = {}
    for round_ in range(repeats):
        for name, (spec, env) in configs.items():
            result = measure_once(spec, env)
            print(
                f"round {round_ + 1}/{repeats} {name}: {result['seconds']:.2f} s wall, "
                f"{result['cpu_seconds']:.2f} s CPU, load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
            )
            if name not in best or result["seconds"] < best[name]["seconds"]:
                best[name] = result
    for result in best.values():
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
        result["mb_per_s"] = result["bytes"] / 1e6 / result["seconds"]
    return best


def row(name: str, result: dict, reference: dict | None) -> str:
    ratio = f"{result['tokens_per_s'] / reference['tokens_per_s']:.2f}" if reference else "1.00"
    return (
        f"| {name} | {result['seconds']:.2f} | {result['cpu_seconds']:.2f} | {result['tokens_per_s'] / 1e6:.2f} | "
        f"{result['mb_per_s']:.1f} | {ratio} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=32, help="input size in MB (default 32)")
    parser.add_argument("--files", type=int, default=8, help="JSONL files the input is spread over (default 8)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary of the BPE (default 32768)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, the best is kept")
    parser.add_argument("--max-processes", type=int, default=cpus(), help="up to this many processes (default: CPUs)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "stagerun-bench-tokenize",
        help="where the input, tokenizer and outputs go (reused between runs)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables (Markdown) to this file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # inside a measuring subprocess
        spec = json.loads(args.measure)
        data, tokenizer_path = Path(spec["data"]), Path(spec["tokenizer"])
        if spec["kind"] == "baseline":
            result = run_baseline(data, tokenizer_path, spec["fast"])
        else:
            result = run_stagerun(data, tokenizer_path, spec["processes"], spec.get("threads"), Path(spec["out"]))
        print(json.dumps(result))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    data, tokenizer_path = prepare(args.work, args.mb, args.vocab, args.files)
    size = sum(p.stat().st_size for p in data.glob("*.jsonl"))
    common = {"data": str(data), "tokenizer": str(tokenizer_path), "out": str(args.work / "out")}
    one_thread = {"RAYON_NUM_THREADS": "1"}
    header = "| configuration | wall s | CPU s | M tokens/s | MB/s | {} |\n|---|---:|---:|---:|---:|---:|"
    lines = [
        f"Machine: {platform.machine()}, {cpus()} CPUs ({platform.processor() or platform.platform()}), "
        f"Python {platform.python_version()}; input: {size / 1e6:.1f} MB of JSONL in {args.files} files; "
        f"BPE of {args.vocab} tokens; best of {args.repeats} runs.",
        "",
    ]

    print(f"input {size / 1e6:.1f} MB in {args.files} files, tokenizer {tokenizer_path}", file=sys.stderr)
    counts = sorted({1, *range(2, args.max_processes + 1)})
    configs = {
        "base": ({**common, "kind": "baseline", "fast": False}, None),
        "base_fast": ({**common, "kind": "baseline", "fast": True}, None),
        "base_1t": ({**common, "kind": "baseline", "fast": True}, one_thread),
        **{f"p{p}": ({**common, "kind": "stagerun", "processes": p}, None) for p in counts},
        **{f"p{p}t1": ({**common, "kind": "stagerun", "processes": p, "threads": 1}, one_thread) for p in counts},
    }
    load = os.getloadavg()[0]
    best = measure_all(configs, args.repeats)
    lines[0] += f" Load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}."
    lines += [
        "One process, tokenizer threads on all cores:",
        "",
        header.format("vs `encode_batch`"),
        row("plain loop, `encode_batch`", best["base"], None),
        row("plain loop, `encode_batch_fast`", best["base_fast"], best["base"]),
        row("`stagerun tokenize --processes 1`", best["p1"], best["base"]),
        "",
        f"`stagerun tokenize --processes 1` / plain `encode_batch_fast` loop: "
        f"{best['p1']['tokens_per_s'] / best['base_fast']['tokens_per_s']:.2f} (wall), "
        f"{best['base_fast']['cpu_seconds'] / best['p1']['cpu_seconds']:.2f} (CPU time)",
        "",
        "Processes, one tokenizer thread each (`--threads 1`), against one process:",
        "",
        header.format("speedup"),
        row("plain loop, `encode_batch_fast`, 1 thread", best["base_1t"], best["p1t1"]),
    ]
    lines += [row(f"`--processes {p} --threads 1`", best[f"p{p}t1"], best["p1t1"]) for p in counts]
    lines += ["", "Default threads (CPUs / processes), against one process:", "", header.format("speedup")]
    lines += [row(f"`--processes {p}`", best[f"p{p}"], best["p1"]) for p in counts]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
