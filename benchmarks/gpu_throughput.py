"""One GPU's training throughput: stagerun's step on two model shapes, and torchtitan's Llama 3 trainer on the same.

    python benchmarks/gpu_throughput.py                   # on one GPU: both shapes, then torchtitan if importable
    python benchmarks/gpu_throughput.py --tiny            # CPU smoke mode (what tests/test_benchmarks.py runs)

Each shape is trained with the product's own building blocks (build_model, build_optimizer, train_step on a real
single-process Topology, CheckpointManager) and the GPU defaults of spec.training (compile, selective activation
checkpointing, bf16, fused AdamW: whatever "auto" means today), on synthetic packed sequences: a warm-up, then a
timed window, then a second window with one checkpoint save in it (the stall is the difference). torchtitan runs in
a subprocess (torchrun with its own CLI) on the same widths, batch and sequence length; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchtitan_compare as titan  # benchmarks/torchtitan_compare.py

from stagerun.core.spec import ResolvedRun, resolve_run
from stagerun.trainer import distributed as D
from stagerun.trainer.batch import StepBatch
from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
from stagerun.trainer.data.loader import MicroBatch
from stagerun.trainer.metrics import mfu, palm_flops_per_token, peak_flops_for, stagerun_flops_per_token
from stagerun.trainer.step import build_optimizer, train_step
from stagerun.trainer.train import build_model

START_SECONDS = 100  # a GPU shape takes this long to build and compile before its first timed step
COLUMNS = (  # the table's header, in order
    "framework|shape|seq|batch tokens|steps|tokens/s|MFU stagerun %|MFU PaLM %|peak mem GiB|final loss|ckpt stall s|"
    "stall % @ interval"
).split("|")


@dataclass(frozen=True)
class Shape:
    name: str
    model: dict  # spec.model of the manifest
    seq_len: int
    micro_batch: int  # sequences per step (one micro-batch: no accumulation, as torchtitan's local_batch_size)


GPU_SHAPES = [
    Shape("stablelm2-1.6b", {"preset": "stablelm2-1.6b"}, 4096, 4),
    # Half of llama3-8b's depth, to fit one GPU: ~100 GB (fp32 master weights, grads, AdamW moments): an H200.
    Shape("llama3-8b-16l", {"preset": "llama3-8b", "layers": 16}, 8192, 1),
]
TINY_SHAPE = Shape("tiny", {"preset": "tiny"}, 64, 4)


@dataclass
class Row:
    values: dict[str, object] = field(default_factory=dict)
    note: str = ""


def too_late(deadline: float, args: argparse.Namespace) -> bool:
    # Building and compiling a model is not interruptible: start one only with time left to finish it.
    return deadline - time.monotonic() < (0 if args.tiny else START_SECONDS)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_run(shape: Shape, *, gpu: bool, training: dict | None = None) -> ResolvedRun:
    """The manifest a user would write for this shape on one device (tokenizer and data are never opened)."""
    batch_tokens = shape.seq_len * shape.micro_batch
    manifest = {
        "apiVersion": "stagerun.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "bench"},
        "spec": {
            "model": dict(shape.model),
            "tokenizer": {"path": "synthetic"},
            "data": {"sources": {"synthetic": {"path": "synthetic", "weight": 1.0}}},
            "phases": [
                {
                    "name": "bench",
                    "tokens": batch_tokens * 1_000_000,
                    "seqLen": shape.seq_len,
                    "microBatchSize": shape.micro_batch,
                    "batch": {"size": batch_tokens},
                    "lr": {"schedule": "constant", "peak": 1e-4},
                }
            ],
            "resources": {"gpusPerNode": 1} if gpu else {"processesPerNode": 1},
            "training": dict(training or {}),
        },
    }
    return resolve_run(manifest)


def synthetic_batch(run: ResolvedRun, rng: np.random.Generator) -> list[MicroBatch]:
    """One step's packed sequences: random tokens, documents of random lengths (mean seqLen / 4) end to end."""
    phase, vocab = run.phases[0], run.model.vocab_size or 1
    m, length = phase.micro_batch_size, phase.seq_len
    tokens = rng.integers(0, vocab, size=(m, length + 1), dtype=np.int64)
    starts = rng.random((m, length)) < 4 / length  # a document starts here
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    return [MicroBatch(tokens[:, :-1].copy(), tokens[:, 1:].copy(), doc_ids, ["synthetic"] * m)]


def single_process_topology(run: ResolvedRun) -> D.Topology:
    # What torchrun would set for one process: the product's init_topology reads torchrun's environment.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    return D.init_topology(run.phases[0])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS (KiB on Linux)


class StagerunBench:
    """One shape trained through the product's step path; each ``window`` is timed between device syncs."""

    def __init__(self, run: ResolvedRun, topo: D.Topology, seed: int = 0) -> None:
        self.run, self.topo, self.step = run, topo, 0
        self.model = build_model(run.model, run.training, topo)
        self.optimizer = build_optimizer(self.model, run.training, topo.device)
        self.rng = np.random.default_rng(seed)
        self.result = None
        self.gc_every = run.training.gc_every_steps
        self.save_seconds = 0.0

    def train(self, steps: int, deadline: float, *, save_at: int | None = None, manager=None) -> tuple[int, float]:
        """(steps done, seconds): stops early at ``deadline``; ``save_at``: save a checkpoint after that step."""
        # Built before the clock starts: the Trainer's prefetcher builds each StepBatch while the previous step runs.
        batches = [self.step_batch() for _ in range(steps)]
        synchronize(self.topo.device)
        start, done = time.perf_counter(), 0
        for index, batch in enumerate(batches):
            if time.monotonic() > deadline:
                break
            self.result = train_step(
                self.model, self.optimizer, batch, lr=1e-4, topo=self.topo, training=self.run.training
            )
            self.step, done = self.step + 1, done + 1
            if self.gc_every and self.step % self.gc_every == 0:
                gc.collect(1)  # the Trainer's GC schedule (callbacks.GcSchedule): automatic GC is off meanwhile
            if index == save_at and manager is not None:
                self.save(manager)
        synchronize(self.topo.device)
        return done, time.perf_counter() - start

    def step_batch(self) -> StepBatch:
        """What the prefetcher hands the step: device tensors, the global token count known without a collective."""
        phase = self.run.phases[0]
        return StepBatch.from_micro_batches(
            synthetic_batch(self.run, self.rng),
            self.topo.device,
            doc_masking=self.run.training.doc_masking,
            global_tokens=phase.micro_batch_size * phase.seq_len,
        )

    def read_loss(self) -> float:
        return float(self.result.loss) if self.result is not None else math.nan  # the window's one host sync

    def save(self, manager: CheckpointManager) -> None:
        """As the Trainer saves: async (pinned staging) where spec.checkpoint.asyncSave says so, GPUs by default."""
        state, meta = (
            {"train": ModelOptimizerState(self.model, self.optimizer)},
            {"tokens": self.step, "phase_index": 0},
        )
        gpu, start = self.topo.device.type == "cuda", time.perf_counter()
        if self.run.checkpoint.uses_async_save(gpu):
            manager.save_async(self.step, state, meta, phase_boundary=False, pinned=gpu)
        else:
            manager.save(self.step, state, meta, phase_boundary=False)
        self.save_seconds = time.perf_counter() - start  # what the step loop waited in the call (async: staging)


def checkpoint_fits(run: ResolvedRun, folder: Path) -> bool:
    # Parameters plus AdamW's two moments, fp32: a checkpoint that would fill the disk is skipped, not attempted.
    needed = run.model.parameter_count() * 12
    return needed < 0.8 * shutil.disk_usage(folder).free


@contextlib.contextmanager
def gc_schedule(every: int):
    """Automatic GC off while training when spec.training.gcEverySteps > 0, as the Trainer does (GcSchedule)."""
    was_enabled = gc.isenabled()
    if every:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def bench_stagerun(shape: Shape, args: argparse.Namespace, deadline: float) -> Row:
    training = {"precision": "fp32", "compile": False, "activationCheckpointing": "none"} if args.tiny else {}
    run = bench_run(shape, gpu=not args.tiny, training=training)
    topo = single_process_topology(run)
    log(f"stagerun {shape.name}: building the model on {topo.device}")
    if topo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(topo.device)
    folder = Path(tempfile.mkdtemp(prefix="stagerun-bench-ckpt-", dir=args.checkpoint_dir))
    bench = None
    try:
        bench = StagerunBench(run, topo)
        with gc_schedule(bench.gc_every):
            return measure_stagerun(bench, shape, args, deadline, folder)
    finally:
        del bench  # before empty_cache: the next shape (or torchtitan) needs this one's memory back
        gc.collect()
        if topo.device.type == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(folder, ignore_errors=True)


def measure_stagerun(bench: StagerunBench, shape: Shape, args, deadline: float, folder: Path) -> Row:
    log(f"stagerun {shape.name}: {args.warmup} warm-up steps (compiles on GPU)")
    bench.train(args.warmup, deadline)
    log(f"stagerun {shape.name}: {args.steps} timed steps")
    steps, seconds = bench.train(args.steps, deadline)
    row = measured_row("stagerun", shape, bench.run, steps, seconds, bench.topo.device, args)
    row.values["final loss"] = bench.read_loss()
    if not checkpoint_fits(bench.run, folder) or steps < args.steps:
        row.note = "checkpoint stall not measured (time limit, or the checkpoint would not fit on the disk)"
        return row
    log(f"stagerun {shape.name}: {args.steps} timed steps with one checkpoint save")
    manager = CheckpointManager(str(folder), keep=1)
    steps_with_save, with_save = bench.train(args.steps, deadline, save_at=1, manager=manager)
    if steps_with_save == args.steps:
        # The call's blocking time, plus whatever else the window lost (an async write competing with the steps);
        # the second part is clamped at 0, so timing noise can only overstate the stall.
        stall = bench.save_seconds + max(0.0, with_save - bench.save_seconds - seconds)
        row.values["ckpt stall s"] = stall
        row.values["stall % @ interval"] = 100 * stall / (args.checkpoint_every_steps * seconds / steps)
    try:  # an async save commits in the background: let it finish before the next shape needs the memory
        manager.wait(timeout=max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        row.note = "the checkpoint did not commit before the time limit (abandoned)"
    return row


def measured_row(framework: str, shape: Shape, run: ResolvedRun, steps: int, seconds: float, device, args) -> Row:
    batch_tokens = shape.seq_len * shape.micro_batch
    tokens_per_second = steps * batch_tokens / seconds if seconds > 0 else 0.0
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for(device_name(device))
    values: dict[str, object] = {
        "framework": framework,
        "shape": shape.name,
        "seq": shape.seq_len,
        "batch tokens": batch_tokens,
        "steps": steps,
        "tokens/s": tokens_per_second,
        "peak mem GiB": peak_memory_gib(device),
    }
    for column, flops in (
        ("MFU stagerun %", stagerun_flops_per_token(run.model, shape.seq_len)),
        ("MFU PaLM %", palm_flops_per_token(run.model, shape.seq_len)),
    ):
        ratio = mfu(tokens_per_second, flops, peak)
        values[column] = 100 * ratio if ratio is not None else None
    return Row(values)


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_value(r.values.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny preset, seq 64, fp32, gloo")
    parser.add_argument("--shapes", nargs="*", help="run only these shapes (default: all of the mode)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on GPU, 2 with --tiny)")
    parser.add_argument("--steps", type=int, help="steps per timed window (default: 20 on GPU, 4 with --tiny)")
    parser.add_argument("--max-seconds", type=float, default=450.0, help="stop starting work after this long")
    parser.add_argument("--checkpoint-every-steps", type=int, default=500, help="interval the stall %% refers to")
    parser.add_argument("--checkpoint-dir", help="where the measured checkpoint is written (default: $TMPDIR)")
    parser.add_argument("--peak-tflops", type=float, help="peak of the device (default: from its name; 1 on CPU)")
    parser.add_argument("--torchtitan", choices=["auto", "off"], default="auto", help="auto: run it when importable")
    parser.add_argument("--markdown", type=Path, help="also write the table (and notes) to this file")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else (4 if args.tiny else 20)
    if args.tiny and args.peak_tflops is None:
        args.peak_tflops = 1.0  # nominal: a CPU has no data-sheet peak, the smoke test only checks the arithmetic
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --tiny for the CPU smoke mode", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.max_seconds
    shapes = [TINY_SHAPE] if args.tiny else [s for s in GPU_SHAPES if not args.shapes or s.name in args.shapes]
    rows, notes = [], []
    for shape in shapes:
        if too_late(deadline, args):
            notes.append(f"{shape.name}: skipped, too little of --max-seconds {args.max_seconds:.0f} left")
            continue
        try:
            row = bench_stagerun(shape, args, deadline)
        except torch.cuda.OutOfMemoryError:
            notes.append(f"stagerun {shape.name}: out of GPU memory (try a GPU with more memory, or --shapes)")
            continue
        rows.append(row)
        notes += [f"stagerun {shape.name}: {row.note}"] if row.note else []
        notes.append(compare_with_torchtitan(shape, row, rows, args, deadline))
    D.shutdown()
    header = (
        f"device: {device_name(torch.device('cuda')) if not args.tiny else 'CPU (--tiny)'}, torch {torch.__version__}"
    )
    report = "\n".join([header, "", markdown_table(rows), "", *[f"- {n}" for n in notes]])
    print(report, flush=True)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    return 0


def compare_with_torchtitan(shape: Shape, row: Row, rows: list[Row], args, deadline: float) -> str:
    """torchtitan on the same shape and batch (torchtitan_compare.py): its row, and the ratio as a note."""
    if args.torchtitan == "off" or args.tiny:
        reason = "--torchtitan off" if args.torchtitan == "off" else "its trainer needs a CUDA device; --tiny is CPU"
    else:
        reason = titan.skip_reason() or ("too little of --max-seconds left" if too_late(deadline, args) else None)
    if reason:
        return f"torchtitan {shape.name}: skipped ({reason})"
    log(f"torchtitan {shape.name}: training in a subprocess")
    run = bench_run(shape, gpu=True)
    with tempfile.TemporaryDirectory(prefix="stagerun-bench-torchtitan-") as dump:
        flags = titan.cli(shape.seq_len, shape.micro_batch, args.warmup, args.steps, dump)
        result = titan.run_torchtitan(run, flags, deadline, log)
    if isinstance(result, str):
        return f"torchtitan {shape.name}: no result ({result})"
    seconds = args.steps * shape.seq_len * shape.micro_batch / result.tokens_per_second  # its last logged window
    theirs = measured_row("torchtitan", shape, run, args.steps, seconds, torch.device("cuda"), args)
    theirs.values["peak mem GiB"] = result.reserved_gib
    rows.append(theirs)
    ratio = row.values["tokens/s"] / result.tokens_per_second  # type: ignore[operator]
    return (
        f"{shape.name}: stagerun / torchtitan tokens/s = {ratio:.3f} (torchtitan: step {result.step}, its own mfu "
        f"{result.mfu_percent:.1f} %, peak mem is its max reserved)"
    )


if __name__ == "__main__":
    sys.exit(main())
