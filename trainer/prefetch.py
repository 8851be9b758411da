"""The next step's batch, drawn from the loader and copied to the device in a background thread while this step runs.

The step plan is a pure function of (run, tokens seen, step), so after step k's plan is known, step k + 1's plan
can be guessed and its data drawn early. The guess can be wrong: a manifest reload at a phase's end changes the
run, a stop ends the loop, the next phase needs another gang. The batch is therefore keyed by everything the
loader's draw depends on, and a batch drawn for another key is dropped and the loader put back where it was before
that draw (a snapshot of its state), so no sequence is ever skipped or drawn twice.

The loader is only ever touched by one thread at a time: the main thread hands it to the background thread for
one draw and waits for that draw before touching it again (one batch ahead, never more). Each batch carries the
loader's state right after its own draw: that is what a checkpoint after the step must store, even though the
loader itself may already be a step further.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from stagerun.core.plan import StepPlan

from .batch import StepBatch
from .context_parallel import ContextShard
from .data.loader import PackedMixLoader


@dataclass(frozen=True)
class DrawKey:
    """What one step's draw depends on: the loader's ``next_step`` arguments and the batch's token count."""

    phase_index: int
    weights: tuple[tuple[str, float], ...]
    seq_len: int
    global_sequences: int
    micro_batch_size: int
    kind: str  # pretrain | sft | dpo: how rows are packed

    @classmethod
    def of(cls, plan: StepPlan) -> DrawKey:
        phase = plan.phase
        return cls(
            phase.index,
            tuple(sorted(phase.weights.items())),
            plan.seq_len,
            plan.batch_sequences,
            phase.micro_batch_size,
            phase.kind,
        )


@dataclass
class _Pending:
    key: DrawKey
    before: dict[str, Any]  # the loader's state before this draw: restored when the batch is dropped
    future: Future[tuple[StepBatch, torch.cuda.Event | None]]


class Prefetcher:
    """Hands out each step's :class:`StepBatch`, drawn one step ahead in a background thread when ``enabled``."""

    def __init__(
        self,
        loader: PackedMixLoader,
        *,
        device: torch.device,
        dp_rank: int,
        dp_size: int,
        doc_masking: bool,
        enabled: bool = True,
        context: ContextShard | None = None,
    ) -> None:
        self.loader, self.device, self.enabled = loader, device, enabled
        self.context = context  # context parallelism: each batch keeps this cp rank's part of every sequence
        # doc_masking: the run's spec.training.docMasking, for pretrain phases; sft and dpo phases always mask.
        self.dp_rank, self.dp_size, self.doc_masking = dp_rank, dp_size, doc_masking
        self.discarded = 0  # batches drawn ahead for a plan that did not happen (tests read it)
        self._pending: _Pending | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        # Copies of a prefetched batch go on their own stream so they overlap with the step's kernels.
        self._stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None

    def take(self, plan: StepPlan) -> StepBatch:
        """The batch of ``plan``: the prefetched one when it was drawn for the same key, else drawn now.

        An error of the background draw (a corrupted shard, a read error) is raised here, unchanged."""
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending.key == DrawKey.of(plan):
                return self._consume(pending)
            self._drop(pending)
        batch, _ = self._draw(plan, None)
        return batch

    def prefetch(self, plan: StepPlan | None) -> None:
        """Start drawing ``plan``'s batch in the background (nothing when disabled, or for no plan)."""
        if self._executor is None or plan is None:
            return
        assert self._pending is None, "prefetch() twice without take(): the loader would be two steps ahead"
        before = self.loader.state_dict()
        self._pending = _Pending(DrawKey.of(plan), before, self._executor.submit(self._draw, plan, self._stream))

    def discard(self) -> None:
        """Drop the prefetched batch, if any (the loop ends): the loader goes back to the last taken batch's state."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._drop(pending)

    def close(self) -> None:
        self.discard()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _draw(self, plan: StepPlan, stream: torch.cuda.Stream | None) -> tuple[StepBatch, torch.cuda.Event | None]:
        phase = plan.phase
        micro_batches = self.loader.next_step(
            phase_index=phase.index,
            weights=phase.weights,
            seq_len=plan.seq_len,
            global_sequences=plan.batch_sequences,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            micro_batch_size=phase.micro_batch_size,
            kind=phase.kind,
        )
        # Snapshots right after the draw: what a checkpoint after this step stores (the loader may move on).
        state, per_source = self.loader.state_dict(), dict(self.loader.tokens_per_source)
        counts = self.loader.last_step
        # A pretrain phase's rows never hold ignored targets (data/loader.py: the targets are the inputs shifted by
        # one token of the same stream, no padding), so the global count of loss tokens is the plan's, exactly. sft
        # and dpo rows do (prompts, padding), and only the rank reading a row knows its count: the step sums them.
        global_tokens = plan.batch_sequences * plan.seq_len if phase.kind == "pretrain" else None
        global_pairs = counts.pairs if phase.kind == "dpo" else None

        def build() -> StepBatch:
            return StepBatch.from_micro_batches(
                micro_batches,
                self.device,
                doc_masking=self.doc_masking or phase.masks_documents,
                loader_state=state,
                tokens_per_source=per_source,
                global_tokens=global_tokens,
                context=self.context,
                kind=phase.kind,
                global_pairs=global_pairs,
                counts=counts,
            )

        if stream is None:
            return build(), None
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            batch = build()
            copied = torch.cuda.Event()
            copied.record(stream)
        return batch, copied

    def _consume(self, pending: _Pending) -> StepBatch:
        try:
            batch, copied = pending.future.result()
        except BaseException:
            self.loader.load_state_dict(pending.before)  # a failed draw may have moved some cursors already
            raise
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)  # the step's kernels read the tensors only once their copies are done
            for mb in batch.micro_batches:
                for tensor in (mb.inputs, mb.targets, mb.doc_ids, mb.positions, mb.pair_ids):
                    if tensor is not None:
                        # Allocated on the side stream: without this the allocator could hand their memory to the
                        # next prefetch while the compute stream still reads them.
                        tensor.record_stream(compute)
        return batch

    def _drop(self, pending: _Pending) -> None:
        self.discarded += 1
        pending.future.exception()  # wait for the draw to end; its error, if any, belongs to a step never taken
        self.loader.load_state_dict(pending.before)
