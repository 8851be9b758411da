"""Process layout: process group, DeviceMesh, its named sub-meshes and reductions, and how the model is split
across it (TP, FSDP2, AC, compile).

The degrees and every rank's coordinates come from stagerun.core.layout.ParallelLayout; here they become a mesh
over (dp_replicate, dp_shard, cp, tp) with the flattened sub-meshes ``batch`` (dp_replicate x dp_shard: ranks that
read different sequences) and ``loss`` (dp x cp: ranks that split the global batch's tokens, where token counts and
loss sums are reduced). FSDP2 shards over dp_shard (HSDP when dp_replicate > 1), tensor parallelism splits heads
and MLP columns over tp; cp is 1 until context parallelism exists. The model is built on the meta device, split,
then materialised and initialised shard by shard (see model.init_weights), so no rank ever holds the whole model.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stagerun.core.layout import MESH_DIMS, LayoutError, ParallelLayout, RankCoordinates
from stagerun.core.spec import ResolvedPhase
from stagerun.core.spec.model import resolved_value

from .compat import flatten_mesh
from .model import Transformer


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the phase's layout: rank, device, the mesh and its named sub-meshes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: ParallelLayout
    mesh: DeviceMesh  # (dp_replicate, dp_shard, cp, tp)
    batch_mesh: DeviceMesh  # dp_replicate x dp_shard, flattened
    loss_mesh: DeviceMesh  # dp_replicate x dp_shard x cp, flattened

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def coordinates(self) -> RankCoordinates:
        return self.layout.coordinates(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coordinates.dp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self.mesh["cp"]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """2-D for HSDP (replicate over dim 0, shard over dim 1), else the dp_shard dim alone. With cp > 1 this
        would become dp_shard x cp: context-parallel peers hold the same parameters."""
        if self.layout.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    def sum_over_loss(self, values: list[float]) -> list[float]:
        """Sum scalars (token counts, loss sums, the batch checksum) over the ``loss`` group, the ranks that split
        the global batch's tokens. TP peers hold identical copies and each sums within its own group, so no copy
        is counted twice."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.layout.loss > 1:
            dist.all_reduce(tensor, group=self.loss_mesh.get_group())
        return tensor.tolist()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank. A stop request is agreed by the whole world, not
        one sub-mesh, or some ranks would leave the step loop while their peers wait in a collective."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())


def global_rank() -> int:
    return int(os.environ.get("RANK", 0))


def build_mesh(layout: ParallelLayout, device_type: str) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh]:
    """The layout's mesh and its flattened ``batch`` and ``loss`` sub-meshes (collective: every rank calls it)."""
    mesh = init_device_mesh(device_type, layout.shape, mesh_dim_names=MESH_DIMS)
    batch = flatten_mesh(mesh["dp_replicate", "dp_shard"], "batch")
    loss = flatten_mesh(mesh["dp_replicate", "dp_shard", "cp"], "loss")
    return mesh, batch, loss


def init_topology(phase: ResolvedPhase, *, timeout_minutes: float = 30.0) -> Topology:
    """Initialise torch.distributed from torchrun's environment and build the phase's device mesh."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != phase.world_size:
        raise RuntimeError(
            f"phase {phase.name!r} is planned for {phase.world_size} processes but {world} were started; "
            "launch with the phase's world size (stagerun run --nproc N overrides it for local runs)"
        )
    # Validation rejects both cases earlier; kept as guards for direct callers.
    try:
        layout = ParallelLayout.of_phase(phase)
    except LayoutError as exc:
        raise RuntimeError(f"phase {phase.name!r}: {exc}") from None
    if layout.cp > 1:
        raise RuntimeError(f"phase {phase.name!r}: context parallelism is not supported yet (contextParallel: 1)")
    use_gpu = phase.resources.gpus_per_node > 0
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("spec.resources.gpusPerNode > 0 but no CUDA device is visible; set gpusPerNode: 0 for CPU")
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if use_gpu else None,
        )
    mesh, batch, loss = build_mesh(layout, device.type)
    coords = layout.coordinates(rank)
    # The loader picks this rank's sequences from the pure arithmetic: it must agree with torch's mesh.
    if tuple(mesh.get_coordinate() or ()) != (coords.dp_replicate, coords.dp_shard, coords.cp, coords.tp):
        raise RuntimeError(f"rank {rank}: DeviceMesh coordinates {mesh.get_coordinate()} disagree with {coords}")
    return Topology(rank, world, local_rank, device, layout, mesh, batch, loss)


def apply_tensor_parallel(model: Transformer, topo: Topology) -> None:
    """Megatron-style split of every block: q/k/v and w1/w3 column-wise, wo and w2 row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = topo.tp_mesh
    tp_rank = tp_mesh.get_local_rank()
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    heads = resolved_value(model.spec.heads, "heads")
    for block in model.blocks():
        parallelize_module(block, tp_mesh, plan)
        block.attention.head_offset = tp_rank * heads // topo.tp_size  # picks this rank's ALiBi slopes


def apply_fsdp(model: Transformer, topo: Topology, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the data-parallel mesh: one unit per block, the rest (embeddings, final norm, head) in the root.

    Gradients are summed, not averaged, across ranks: the loop divides each micro-batch loss by the global token
    count, so the result is the exact mean however the batch is split (torchtitan does the same).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torchtitan.distributed.fsdp import disable_fsdp_gradient_division

    kwargs: dict[str, Any] = {"mesh": topo.fsdp_mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block is needed again at the start of backward: keeping it gathered saves an all-gather.
        fully_shard(block, reshard_after_forward=index < last, **kwargs)
    fully_shard(model, **kwargs)
    disable_fsdp_gradient_division(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # With no division left, a plain SUM: gloo (CPU) has no PREMUL_SUM, which FSDP picks otherwise.
            module.set_force_sum_reduction_for_comms(True)


def apply_activation_checkpointing(model: Transformer) -> None:
    from .compat import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """Compile block by block (as torchtitan does): the blocks are identical, so one compilation is reused."""
    for index, block in enumerate(model.layers):
        model.layers[index] = cast(nn.Module, torch.compile(block, fullgraph=False))


def all_reduce_sum(values: list[float], topo: Topology) -> list[float]:
    return topo.sum_over_loss(values)


def any_rank(flag: bool, topo: Topology) -> bool:
    return topo.any_rank(flag)


def shutdown() -> None:
    """Tear down the process group. Callers drop their model/optimizer first: an FSDP model still alive at
    interpreter exit sometimes aborts gloo's teardown ("terminate called without an active exception")."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
