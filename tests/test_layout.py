"""The parallel layout's arithmetic: degrees from the spec, rank coordinates in mesh order, the batch split."""

from __future__ import annotations

import itertools

import pytest

from stagerun.core.layout import (
    BatchSplit,
    BatchSplitError,
    LayoutError,
    ParallelLayout,
    RankCoordinates,
    split_batch,
)
from stagerun.core.plan import grad_accumulation
from stagerun.core.spec.run import ParallelismSpec


def par(**fields: int) -> ParallelismSpec:
    return ParallelismSpec(**fields)


def test_fsdp_minus_one_takes_every_remaining_rank() -> None:
    layout = ParallelLayout.from_spec(par(tensor_parallel=2, data_parallel_replicate=2), 8)
    assert layout == ParallelLayout(dp_replicate=2, dp_shard=2, cp=1, tp=2)
    assert layout.shape == (2, 2, 1, 2) and layout.world_size == 8
    assert layout.dp == 4 and layout.loss == 4


def test_loss_group_spans_data_and_context_parallel_ranks() -> None:
    layout = ParallelLayout(dp_replicate=1, dp_shard=2, cp=2, tp=2)
    assert layout.world_size == 8 and layout.dp == 2 and layout.loss == 4


def test_explicit_fsdp_must_fill_the_world() -> None:
    assert ParallelLayout.from_spec(par(fsdp=4), 4).dp_shard == 4
    with pytest.raises(LayoutError) as info:
        ParallelLayout.from_spec(par(fsdp=4), 2)
    assert info.value.field == "fsdp"
    assert info.value.message == "fsdp 4 x tensorParallel 1 x dataParallelReplicate 1 != world size 2"
    assert info.value.fix == "set fsdp: -1 to use every remaining rank"


def test_degrees_must_divide_the_world() -> None:
    with pytest.raises(LayoutError) as info:
        ParallelLayout.from_spec(par(tensor_parallel=3), 4)
    assert info.value.field == "tensorParallel"
    assert "world size 4 is not divisible by tensorParallel x dataParallelReplicate = 3" in info.value.message


def test_degrees_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ParallelLayout(dp_shard=0)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 1, 1), (2, 1, 1, 2), (2, 2, 1, 2), (1, 2, 2, 2), (3, 1, 2, 1)])
def test_coordinates_are_row_major_in_mesh_order(shape: tuple[int, int, int, int]) -> None:
    layout = ParallelLayout(*shape)
    expected = list(itertools.product(*(range(n) for n in shape)))  # what torch's init_device_mesh lays out
    coords = [layout.coordinates(rank) for rank in range(layout.world_size)]
    assert [(c.dp_replicate, c.dp_shard, c.cp, c.tp) for c in coords] == expected
    assert sorted({c.dp for c in coords}) == list(range(layout.dp))
    assert sorted({c.loss for c in coords}) == list(range(layout.loss))
    for c in coords:
        assert c.dp == c.dp_replicate * layout.dp_shard + c.dp_shard
        assert c.loss == c.dp * layout.cp + c.cp


def test_tensor_parallel_peers_share_data_and_loss_indices() -> None:
    layout = ParallelLayout(dp_replicate=2, dp_shard=2, cp=1, tp=2)
    assert layout.coordinates(0) == RankCoordinates(0, 0, 0, 0, dp=0, loss=0)
    assert layout.coordinates(1) == RankCoordinates(0, 0, 0, 1, dp=0, loss=0)
    assert layout.coordinates(6) == RankCoordinates(1, 1, 0, 0, dp=3, loss=3)
    with pytest.raises(ValueError, match=r"rank 8 is not in \[0, 8\)"):
        layout.coordinates(8)


def test_context_parallel_peers_read_the_same_sequences() -> None:
    layout = ParallelLayout(dp_shard=2, cp=2)
    coords = [layout.coordinates(rank) for rank in range(4)]
    assert [c.dp for c in coords] == [0, 0, 1, 1] and [c.loss for c in coords] == [0, 1, 2, 3]


def test_batch_split() -> None:
    assert split_batch(64, 2, 16) == BatchSplit(per_rank=32, grad_accum=2)
    assert split_batch(64, 4, 1) == BatchSplit(per_rank=16, grad_accum=16)
    assert ParallelLayout(dp_shard=2, tp=2).split(12, 2) == BatchSplit(per_rank=6, grad_accum=3)
    assert grad_accumulation(64, 2, 16) == 2


def test_batch_split_error_names_the_multiple() -> None:
    with pytest.raises(BatchSplitError) as info:
        split_batch(8, 3, 2)
    assert str(info.value) == (
        "8 sequences per step do not split into data-parallel ranks (3) x microBatchSize (2) = 6: "
        "make the batch a multiple of 6 sequences, or change microBatchSize"
    )
    assert info.value.reason(16) == (
        "8 sequences of 16 per step do not split into data-parallel ranks (3) x microBatchSize (2) = 6"
    )
    assert info.value.fix(16) == "make the batch a multiple of 96 tokens (6 sequences), or change microBatchSize"
    assert isinstance(info.value, ValueError)  # callers that predate the layout catch ValueError


def test_batch_split_refuses_nonsense_degrees() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        split_batch(8, 0, 2)
