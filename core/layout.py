"""The parallel layout of a phase: its degrees, what each rank's coordinates are, and how a global batch splits.

Pure arithmetic (no torch), shared by validation, the plan and the trainer, so the rule "a global batch splits into
data-parallel ranks x micro-batch x grad-accumulation steps" and the mesh order are written once. The trainer builds
its DeviceMesh from this object (trainer/distributed.py); torchtitan's ``ParallelDims`` is the model.

Mesh order is (dp_replicate, dp_shard, cp, tp), row-major, so tensor-parallel peers are adjacent ranks (one node's
fast links) and the replicas of HSDP are furthest apart. Three groups matter:

- ``dp`` = dp_replicate x dp_shard ranks read different sequences of the global batch;
- ``loss`` = dp x cp ranks split the global batch's tokens (cp ranks split each sequence, trainer/context_parallel.py):
  token counts and loss sums are reduced over them;
- ``tp`` ranks hold identical copies of the batch and of every reduced scalar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the spec package imports this module: a runtime import would be circular
    from .spec.resolve import ResolvedPhase
    from .spec.run import ParallelismSpec

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


class LayoutError(ValueError):
    """Degrees that do not fit the world size; ``field`` is the camelCase field of spec.parallelism to fix."""

    def __init__(self, field: str, message: str, fix: str) -> None:
        super().__init__(f"parallelism.{field}: {message} ({fix})")
        self.field, self.message, self.fix = field, message, fix


class BatchSplitError(ValueError):
    """A global batch that does not split into data-parallel ranks x micro-batches x accumulation steps."""

    def __init__(self, sequences: int, dp: int, micro_batch_size: int) -> None:
        self.sequences, self.dp, self.micro_batch_size = sequences, dp, micro_batch_size
        self.per_pass = dp * micro_batch_size
        super().__init__(f"{self.reason()}: {self.fix()}")

    def reason(self, seq_len: int | None = None) -> str:
        of = f" of {seq_len}" if seq_len is not None else ""
        return (
            f"{self.sequences} sequences{of} per step do not split into data-parallel ranks ({self.dp}) x "
            f"microBatchSize ({self.micro_batch_size}) = {self.per_pass}"
        )

    def fix(self, seq_len: int | None = None) -> str:
        if seq_len is None:
            return f"make the batch a multiple of {self.per_pass} sequences, or change microBatchSize"
        return (
            f"make the batch a multiple of {self.per_pass * seq_len} tokens ({self.per_pass} sequences), "
            "or change microBatchSize"
        )


@dataclass(frozen=True)
class BatchSplit:
    """One data-parallel rank's share of a global batch."""

    per_rank: int  # sequences each data-parallel rank reads
    grad_accum: int  # micro-batches (forward/backward passes) per rank per step


def split_batch(sequences: int, dp: int, micro_batch_size: int) -> BatchSplit:
    """Split ``sequences`` per step over ``dp`` ranks in micro-batches; raises BatchSplitError when uneven."""
    if sequences < 0 or dp < 1 or micro_batch_size < 1:
        raise ValueError(
            f"data-parallel ranks ({dp}) and microBatchSize ({micro_batch_size}) must be positive, and sequences "
            f"({sequences}) not negative"
        )
    if sequences % (dp * micro_batch_size):
        raise BatchSplitError(sequences, dp, micro_batch_size)
    per_rank = sequences // dp
    return BatchSplit(per_rank, per_rank // micro_batch_size)


@dataclass(frozen=True)
class RankCoordinates:
    """A global rank's index along each mesh dimension, plus its index in the dp and loss groups."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    dp: int  # which slice of the global batch's sequences this rank reads
    loss: int  # index among the dp x cp ranks that split the global batch's tokens


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of each mesh dimension; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        if min(self.shape) < 1:
            raise ValueError(f"every parallel degree must be positive, got {dict(zip(MESH_DIMS, self.shape))}")

    @classmethod
    def from_spec(cls, par: ParallelismSpec, world_size: int) -> ParallelLayout:
        """The layout of ``par`` on ``world_size`` ranks, ``fsdp: -1`` taking every remaining rank.

        Raises LayoutError naming the field to change; the messages are the ones `stagerun validate` prints.
        """
        replicate, tp, cp = par.data_parallel_replicate, par.tensor_parallel, par.context_parallel
        model_parallel = tp * cp * replicate
        # contextParallel is named only where it is set, so the messages of the common case stay short.
        with_cp = " x contextParallel" if cp > 1 else ""
        if world_size % model_parallel:
            raise LayoutError(
                "contextParallel" if cp > 1 and world_size % (tp * replicate) == 0 else "tensorParallel",
                f"world size {world_size} is not divisible by tensorParallel{with_cp} x dataParallelReplicate = "
                f"{model_parallel}",
                "choose degrees that divide the number of processes",
            )
        fsdp = par.fsdp if par.fsdp != -1 else world_size // model_parallel
        if fsdp <= 0 or fsdp * model_parallel != world_size:
            cp_part = f" x contextParallel {cp}" if cp > 1 else ""
            raise LayoutError(
                "fsdp",
                f"fsdp {par.fsdp} x tensorParallel {tp}{cp_part} x dataParallelReplicate {replicate} != world size "
                f"{world_size}",
                "set fsdp: -1 to use every remaining rank",
            )
        return cls(dp_replicate=replicate, dp_shard=fsdp, cp=cp, tp=tp)

    @classmethod
    def of_phase(cls, phase: ResolvedPhase) -> ParallelLayout:
        return cls.from_spec(phase.parallelism, phase.world_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Degrees in mesh order (MESH_DIMS)."""
        return (self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that read different sequences (HSDP replicas x FSDP shards)."""
        return self.dp_replicate * self.dp_shard

    @property
    def loss(self) -> int:
        """Ranks that split the global batch's tokens: the group scalars are summed over."""
        return self.dp * self.cp

    def coordinates(self, rank: int) -> RankCoordinates:
        """Where global ``rank`` sits in the (dp_replicate, dp_shard, cp, tp) mesh (torch's row-major order)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size})")
        rest, tp = divmod(rank, self.tp)
        rest, cp = divmod(rest, self.cp)
        replicate, shard = divmod(rest, self.dp_shard)
        dp = replicate * self.dp_shard + shard
        return RankCoordinates(replicate, shard, cp, tp, dp=dp, loss=dp * self.cp + cp)

    def split(self, sequences: int, micro_batch_size: int) -> BatchSplit:
        """This layout's split of a global batch of ``sequences`` (see split_batch)."""
        return split_batch(sequences, self.dp, micro_batch_size)
