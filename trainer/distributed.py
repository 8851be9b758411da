"""Process layout: process group, DeviceMesh, and how the model is split across it (TP, FSDP2, AC, compile).

Mesh axes are (dp_replicate, dp_shard, tp): FSDP2 shards over dp_shard (HSDP when dp_replicate > 1), tensor
parallelism splits heads and MLP columns over tp. The model is built on the meta device, split, then
materialised and initialised shard by shard (see model.init_weights), so no rank ever holds the whole model.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stagerun.core.spec import ResolvedPhase, data_parallel_degree


@dataclass
class Topology:
    """Where this process sits: its rank, device, mesh, and its slice of the data-parallel dimension."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    dp_rank: int
    dp_size: int
    tp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_mesh(self) -> DeviceMesh:
        replicate = self.mesh["dp_replicate"].size()
        return self.mesh["dp_replicate", "dp_shard"] if replicate > 1 else self.mesh["dp_shard"]


def global_rank() -> int:
    return int(os.environ.get("RANK", 0))


def init_topology(phase: ResolvedPhase, *, timeout_minutes: float = 30.0) -> Topology:
    """Initialise torch.distributed from torchrun's environment and build the phase's device mesh."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != phase.world_size:
        raise RuntimeError(
            f"phase {phase.name!r} is planned for {phase.world_size} processes but {world} were started; "
            "launch with the phase's world size (stagerun run --nproc N overrides it for local runs)"
        )
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
    par = phase.parallelism
    dp_size = data_parallel_degree(phase)
    if dp_size is None:  # validation rejects this earlier; kept as a guard for direct callers
        raise RuntimeError(f"phase {phase.name!r}: parallelism does not fit world size {world}")
    replicate = par.data_parallel_replicate
    mesh = init_device_mesh(
        device.type,
        (replicate, dp_size // replicate, par.tensor_parallel),
        mesh_dim_names=("dp_replicate", "dp_shard", "tp"),
    )
    dp_rank = mesh["dp_replicate"].get_local_rank() * (dp_size // replicate) + mesh["dp_shard"].get_local_rank()
    return Topology(rank, world, local_rank, device, mesh, dp_rank, dp_size, par.tensor_parallel)


def apply_tensor_parallel(model: nn.Module, topo: Topology) -> None:
    """Megatron-style split of every block: q/k/v and w1/w3 column-wise, wo and w2 row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = topo.mesh["tp"]
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
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)
        block.attention.head_offset = tp_rank * model.spec.heads // topo.tp_size  # picks this rank's ALiBi slopes


def apply_fsdp(model: nn.Module, topo: Topology, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the data-parallel mesh: one unit per block, the rest (embeddings, final norm, head) in the root.

    Gradients are summed, not averaged, across ranks: the loop divides each micro-batch loss by the global token
    count, so the result is the exact mean however the batch is split (torchtitan does the same).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torchtitan.distributed.fsdp import disable_fsdp_gradient_division

    kwargs = {"mesh": topo.dp_mesh}
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


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile block by block (as torchtitan does): the blocks are identical, so one compilation is reused."""
    for index, block in enumerate(model.layers):
        model.layers[index] = torch.compile(block, fullgraph=False)


def all_reduce_sum(values: list[float], topo: Topology) -> list[float]:
    """Sum scalars over the data-parallel ranks (TP ranks hold identical copies, so divide their multiplicity)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=topo.device)
    if topo.world_size > 1:
        dist.all_reduce(tensor)
    return (tensor / topo.tp_size).tolist()


def any_rank(flag: bool, topo: Topology) -> bool:
    """True on every rank when ``flag`` is true on any rank (a stop request must be agreed by the whole gang)."""
    if topo.world_size == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=topo.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def shutdown() -> None:
    """Tear down the process group. Callers drop their model/optimizer first: an FSDP model still alive at
    interpreter exit sometimes aborts gloo's teardown ("terminate called without an active exception")."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
