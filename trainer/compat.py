"""The private or version-dependent torch APIs stagerun relies on, each behind one small function.

Supported: torch 2.11 (the GPU machines) through 2.14. Every entry says which versions need which path, so a torch
upgrade touches this file only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Activation checkpointing as a module wrapper (it names the wrapped module `_checkpoint_wrapped_module`, which
# model.transformer.canonical_name strips). Private in every supported release (2.11 to 2.14); the public
# torch.utils.checkpoint offers only the function form, which would mean editing the block's forward.
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

# DCP storage through fsspec (s3://, gs://, memory://). torch.distributed.checkpoint does not re-export these in
# 2.11, nor in 2.13 (checked) or main: they live only in the private module, the one path for every supported torch.
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

__all__ = ["FsspecReader", "FsspecWriter", "all_gather_autograd", "checkpoint_wrapper", "flatten_mesh"]

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """``mesh`` (a slice of a root mesh, several dims) as one 1-D dim called ``name``, with its process group.

    DeviceMesh._flatten is private in every supported release (present in 2.11 and 2.13; torchtitan relies on it
    as well). Callers keep the returned mesh: on 2.13, slicing the root by a flattened name warns that it is
    deprecated. Size-1 dims flatten fine (checked on 2.13 with gloo and 1, 2 and 4 processes).
    """
    return mesh._flatten(name)


if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def local_shard_offset(dtensor: DTensor) -> tuple[int, ...]:
    """Where ``dtensor``'s local shard starts in the global tensor (one index per dim).

    torch.distributed.tensor._utils.compute_local_shape_and_global_offset is private in every supported release
    (same signature in 2.11 and 2.13). It describes the shard as one box (offset + local shape); the local shape it
    returns is checked against the real local tensor, so a placement whose shard is not one box fails loudly
    instead of initialising wrong values.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dtensor.shape, dtensor.device_mesh, dtensor.placements)
    if tuple(shape) != tuple(dtensor.to_local().shape):
        raise RuntimeError(f"shard of {tuple(dtensor.shape)} with {dtensor.placements} is not one box: {shape}")
    return tuple(offset)


if TYPE_CHECKING:
    from torch.distributed.checkpoint.staging import DefaultStager


def checkpoint_stager(pinned: bool, cached: DefaultStager | None) -> DefaultStager:
    """The stager of an async DCP save: copies the state to host memory (page-locked when ``pinned``), in the
    calling thread, so the training may change the live tensors as soon as ``dcp.async_save`` returns.

    DefaultStager/StagingOptions are public in 2.11 and 2.13, but they differ in reuse: 2.11's stager clears its
    copy tables after its first ``stage`` (a second one raises ``KeyError: <class 'type'>``), so 2.11 gets a new
    stager (and pins new buffers) per save; 2.13 keeps its buffers, so ``cached`` is reused there and later saves
    copy into the already pinned memory. Reusing buffers is safe only because at most one save is in flight.
    """
    import torch
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    if cached is not None and torch.__version__ >= "2.13":  # a TorchVersion: compares as a version, not text
        return cached
    options = StagingOptions(
        use_pinned_memory=pinned,
        use_shared_memory=False,  # only for a separate checkpoint process; the upload runs in a thread here
        use_async_staging=False,  # the copy finishes before training continues: the next step updates in place
        use_non_blocking_copy=pinned,  # pinned: async D2H copies, then one synchronize
    )
    return DefaultStager(options)


if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup


def all_gather_autograd(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``tensor`` from every rank of ``group`` concatenated along dim 0, differentiable: the backward is a
    reduce-scatter of the gradient (context parallelism's K/V gather). A functional collective, so dynamo traces it
    into a compiled block; checked on gloo (CPU) with torch 2.11 and 2.13 (not yet on NCCL: no GPU was lent).

    torch.distributed._functional_collectives is private in every supported release. 2.13 deprecates
    ``all_gather_tensor_autograd`` for ``all_gather_single_autograd`` (same maths), which 2.11 lacks; the public
    torch.distributed.nn.functional.all_gather is deprecated in 2.13 and not traceable.
    """
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return funcol.wait_tensor(gather(tensor.contiguous(), 0, group))
