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

__all__ = ["FsspecReader", "FsspecWriter", "checkpoint_wrapper", "flatten_mesh"]

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """``mesh`` (a slice of a root mesh, several dims) as one 1-D dim called ``name``, with its process group.

    DeviceMesh._flatten is private in every supported release (present in 2.11 and 2.13; torchtitan relies on it
    as well). Callers keep the returned mesh: on 2.13, slicing the root by a flattened name warns that it is
    deprecated. Size-1 dims flatten fine (checked on 2.13 with gloo and 1, 2 and 4 processes).
    """
    return mesh._flatten(name)
