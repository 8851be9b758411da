"""One optimizer step's input as the step consumes it: this rank's micro-batches as device tensors, plus the
host-side numbers the step needs without reading anything back from the device.

The loader yields numpy micro-batches (``data.loader.MicroBatch``); ``StepBatch.from_micro_batches`` counts the
target tokens and the checksum on the host (from numpy, so no device sync), copies the arrays into pinned memory
on CUDA and issues non-blocking copies. The prefetcher (prefetch.py) builds the next step's ``StepBatch`` in a
background thread while the current step runs; the step (step.py) only reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data.loader import IGNORE_INDEX, MicroBatch, StepCounts

if TYPE_CHECKING:
    from .context_parallel import ContextShard


@dataclass(frozen=True)
class DeviceMicroBatch:
    inputs: torch.Tensor  # int64 [m, L] on the training device
    targets: torch.Tensor  # int64 [m, L]; IGNORE_INDEX where no loss is taken
    doc_ids: torch.Tensor | None  # int32 [m, L] when document masking is on, else None
    # int32 [m, L]: each token's position in its document (0 at every document start). Always carried (half the int64
    # inputs' bytes): the model uses it when spec.model.positionIds is perDocument, a teacher by its own spec.
    positions: torch.Tensor | None = None
    # dpo phases: int32 [m, L], the loader's MicroBatch.pair_ids (2k / 2k + 1 at pair k's chosen / rejected trained
    # targets, -1 elsewhere); None in other phases.
    pair_ids: torch.Tensor | None = None


def batch_checksum(micro_batches: Sequence[MicroBatch]) -> float:
    """A fingerprint of this rank's inputs whose sum over ranks identifies the global batch (resume checks)."""
    total = 0
    for mb in micro_batches:
        weights = np.arange(1, mb.inputs.shape[1] + 1, dtype=np.int64)
        total += int((mb.inputs * weights).sum())
    return float(total)


def document_positions(doc_ids: np.ndarray) -> np.ndarray:
    """Each token's position inside its document, int32 [m, L], from the loader's doc ids (0, 1, 2, ... along a
    row); the host twin of ``model.positions.document_positions``, computed in the prefetch thread."""
    index = np.broadcast_to(np.arange(doc_ids.shape[1], dtype=np.int32), doc_ids.shape)
    starts = np.ones(doc_ids.shape, dtype=bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return (index - first).astype(np.int32)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    # Pinned staging makes the copy a true async DMA; from pageable memory the driver copies synchronously.
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class StepBatch:
    micro_batches: list[DeviceMicroBatch]
    local_tokens: int  # non-ignored targets on this rank, counted on the host
    checksum: float  # batch_checksum of this rank's inputs
    # Filled by the prefetcher: the loader's state and per-source counters right after this step's data was drawn,
    # i.e. what a checkpoint taken after this step must store (the loader itself may already be a step ahead).
    loader_state: dict[str, Any] | None = None
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    # The global batch's target-token count when it is known without communication (the pretraining loader never
    # emits ignored targets, so it is the plan's batch_tokens); None: the step all-reduces the count on the device.
    global_tokens: int | None = None
    kind: str = "pretrain"  # the phase's kind (pretrain | sft | dpo)
    # dpo: the global batch's pairs, known on the host (every rank walks every row's packing); None elsewhere.
    global_pairs: int | None = None
    # What the loader packed in the whole global batch (split conversations, truncated pairs: the trainer logs them).
    counts: StepCounts = field(default_factory=StepCounts)

    @classmethod
    def from_micro_batches(
        cls,
        micro_batches: Sequence[MicroBatch],
        device: torch.device,
        *,
        doc_masking: bool,
        loader_state: dict[str, Any] | None = None,
        tokens_per_source: dict[str, int] | None = None,
        global_tokens: int | None = None,
        context: ContextShard | None = None,
        kind: str = "pretrain",
        global_pairs: int | None = None,
        counts: StepCounts | None = None,
    ) -> StepBatch:
        """``doc_masking``: the run's (spec.training.docMasking); sft and dpo rows always mask documents (packed
        conversations and pairs must not see each other: ResolvedPhase.masks_documents), whatever it says.
        ``global_tokens``: the global batch's trained-target count when known on the host; sft and dpo rows hold
        IGNORE_INDEX targets only the rank reading them can count, so leave it None there (the step all-reduces)."""
        doc_masking = doc_masking or kind != "pretrain"
        positions = [document_positions(mb.doc_ids) for mb in micro_batches]
        checksum = batch_checksum(micro_batches)
        if context is not None:  # context parallelism: this rank's part of every sequence (context_parallel.py)
            micro_batches, positions, checksum = context.shard(micro_batches, positions, checksum)
        local_tokens = sum(int(np.count_nonzero(mb.targets != IGNORE_INDEX)) for mb in micro_batches)
        moved = [
            DeviceMicroBatch(
                inputs=_to_device(mb.inputs, device),
                targets=_to_device(mb.targets, device),
                doc_ids=_to_device(mb.doc_ids, device) if doc_masking else None,
                positions=_to_device(pos, device),
                pair_ids=_to_device(mb.pair_ids, device) if mb.pair_ids is not None else None,
            )
            for mb, pos in zip(micro_batches, positions)
        ]
        return cls(
            moved,
            local_tokens,
            checksum,
            loader_state,
            dict(tokens_per_source or {}),
            global_tokens,
            kind,
            global_pairs,
            counts or StepCounts(),
        )
