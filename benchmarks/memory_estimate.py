"""The memory estimate of `stagerun plan` (core/memory_estimate.py) against the measured peak of real CPU steps.

    python benchmarks/memory_estimate.py            # a small model at three activation-checkpointing modes
    python benchmarks/memory_estimate.py --tiny     # the tiny preset (tests/test_memory_estimate.py)

Each shape trains two steps through the product's step path (build_model, build_optimizer, train_step on a real
single-process gloo Topology, as the Trainer calls them). CPU has no twin of torch.cuda.max_memory_allocated, so
the peak is counted by a TorchDispatchMode that sees every tensor an op returns and follows each storage until its
last tensor is freed (LiveTensorBytes): the bytes alive at once, at their highest. The parameters exist before the
steps and are added as the estimate counts them (fp32, this rank's share); everything else (activations, the
loss's chunks, gradients, optimizer state created by the first step) is measured. The second step is the one that
matters: it runs with the optimizer state already allocated, as every later step does.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from gpu_throughput import Shape, bench_run, single_process_topology, synthetic_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stagerun.core.memory_estimate import estimate_phase_memory, format_bytes
from stagerun.core.spec import ResolvedRun
from stagerun.trainer.batch import StepBatch
from stagerun.trainer.step import build_optimizer, train_step
from stagerun.trainer.train import build_model

SMALL = Shape("small", {"preset": "tiny", "dim": 256, "layers": 4, "heads": 4, "kvHeads": 2, "ffnHidden": 768,
                        "vocabSize": 4096}, 512, 4)  # fmt: skip
TINY = Shape("tiny", {"preset": "tiny", "dim": 128, "layers": 2, "heads": 4, "kvHeads": 2, "ffnHidden": 384},
             256, 4)  # fmt: skip
MODES = ("none", "selective", "full")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive at once, at their highest, among those created while the mode is on.

    Views share their base's storage: a storage counts once (by its data pointer) and stays counted until the last
    tensor on it is gone (a weakref finalizer per tensor; PyTorch keeps a tensor's Python object alive while C++
    holds the tensor, e.g. saved for backward, so the finalizer runs when the memory is really released)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type not in ("meta",):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, size
            self.current += size
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)


@dataclass(frozen=True)
class Measurement:
    shape: str
    mode: str
    measured: int  # bytes
    estimated: int

    @property
    def ratio(self) -> float:
        return self.measured / self.estimated


def measure(shape: Shape, mode: str, steps: int = 2) -> Measurement:
    run: ResolvedRun = bench_run(shape, gpu=False, training={"activationCheckpointing": mode})
    topo = single_process_topology(run)
    model = build_model(run.model, run.training, topo)
    optimizer = build_optimizer(model, run.training, topo.device)
    rng = np.random.default_rng(0)
    phase = run.phases[0]
    batches = [
        StepBatch.from_micro_batches(
            synthetic_batch(run, rng),
            topo.device,
            doc_masking=False,
            global_tokens=phase.micro_batch_size * phase.seq_len,
        )
        for _ in range(steps)
    ]
    counter = LiveTensorBytes()
    with counter:
        for batch in batches:
            result = train_step(model, optimizer, batch, lr=1e-4, topo=topo, training=run.training)
            float(result.loss)
        del result
    estimate = estimate_phase_memory(run, phase)
    held_parameters = estimate.parameters  # created before the steps: counted as the estimate does
    return Measurement(shape.name, mode, counter.peak + held_parameters, estimate.total)


def markdown(rows: list[Measurement]) -> str:
    lines = [
        "| shape | activation checkpointing | measured peak | estimate | measured / estimate |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.shape} | {row.mode} | {format_bytes(row.measured)} | {format_bytes(row.estimated)} | "
            f"{row.ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape only (fast)")
    args = parser.parse_args(argv)
    shapes = [TINY] if args.tiny else [TINY, SMALL]
    rows = [measure(shape, mode) for shape in shapes for mode in MODES]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
