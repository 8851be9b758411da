"""Sharding-independent weight initialisation from counter-based blocks.

Every random parameter is split into row blocks of about ``BLOCK_ELEMENTS`` elements (whole rows of the *global*
tensor, so the split never depends on the sharding). Block ``b`` of parameter ``fqn`` is drawn from its own
generator, seeded by (run seed, canonical fqn, b). A rank draws only the blocks that overlap its local shard (the
DTensor's local shape and global offset), directly on the shard's device, and copies the overlap in: no rank
draws or holds a full parameter, and the weights are identical for any FSDP / HSDP / tensor-parallel layout.

Cost per rank: the rows of its shard, rounded out to whole blocks. A shard split along columns (a tensor-parallel
row-wise weight) draws whole rows and keeps its columns, i.e. ``tp`` times its share for those weights; a 2-D
tiling would avoid that, but costs extra index arithmetic for two matrices per block.

The values depend on where they are drawn: CPU (mt19937) and CUDA (Philox) generators give different, identically
distributed numbers, and CUDA's may also change with the GPU model (the kernel's grid, which picks each element's
Philox stream, depends on the SM count). The same seed gives identical weights for every layout on one kind of
device, which is what a run (or its resume, which loads the checkpoint instead) needs.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .transformer import Transformer  # transformer.py imports this module: a runtime import would be a cycle

# The module names that checkpoint_wrapper and torch.compile of a block insert into parameter names (FSDP2 renames
# nothing); stripped so a parameter's init does not depend on how the model was wrapped.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")

# Elements per block (rounded to whole rows). Large enough that per-block overhead (a generator and a kernel launch)
# is negligible, small enough that a rank of an 8-way layout wastes little drawing around its shard's edges.
BLOCK_ELEMENTS = 2**20


def canonical_name(fqn: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def parameter_seed(seed: int, fqn: str, block: int = 0) -> int:
    """A generator seed from (run seed, parameter name, block index), stable across processes and Python versions
    (Python's ``hash()`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{canonical_name(fqn)}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_rule(model: Transformer, fqn: str, module: nn.Module, leaf: str) -> float | None:
    """The std of a random parameter, or None for a constant one (norm weights 1, norm and linear biases 0)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or leaf == "bias":
        return None
    spec = model.spec
    std = spec.init_std
    if fqn.endswith(("attention.wo", "feed_forward.w2")):
        # Residual-branch outputs scaled by 1/sqrt(2 x layers) (GPT-2; torchtitan's depth init) so the residual
        # stream's variance does not grow with depth.
        std = std / math.sqrt(2 * spec.layers)
    return std


def _constant_value(module: nn.Module, leaf: str) -> float:
    """Norms start as the identity (weight 1, bias 0); every bias starts at 0."""
    return 1.0 if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and leaf == "weight" else 0.0


def rows_per_block(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:])
    return max(1, BLOCK_ELEMENTS // max(1, row))


def fill_local_shard(
    local: torch.Tensor,
    global_shape: tuple[int, ...],
    global_offset: tuple[int, ...],
    std: float,
    seed: int,
    fqn: str,
) -> None:
    """Fill ``local`` (the box ``global_offset + local.shape`` of a parameter of ``global_shape``) with its values
    from the blocks it overlaps. Blocks are drawn in float32 (as the full-draw init did) and cast on copy."""
    if local.numel() == 0:
        return
    rows = rows_per_block(global_shape)
    first, last = global_offset[0], global_offset[0] + local.shape[0]  # global rows held locally, [first, last)
    # Trailing dims: the local box inside each drawn row (a column shard keeps only its columns).
    trailing = tuple(slice(o, o + n) for o, n in zip(global_offset[1:], local.shape[1:]))
    # A block wholly inside a float32 CPU shard with whole rows is drawn in place: a contiguous normal_ gives the
    # same values as a fresh tensor of that shape, and skips a temporary and a copy (half the cost on CPU). Elsewhere
    # (edge blocks, column shards, bf16, CUDA where the copy is negligible) the block is drawn, then sliced.
    in_place = (
        local.device.type == "cpu" and local.dtype == torch.float32 and tuple(local.shape[1:]) == global_shape[1:]
    )
    for block in range(first // rows, (last - 1) // rows + 1):
        start, stop = block * rows, min((block + 1) * rows, global_shape[0])
        generator = torch.Generator(device=local.device).manual_seed(parameter_seed(seed, fqn, block))
        lo, hi = max(start, first), min(stop, last)
        target = local[lo - first : hi - first]
        if in_place and (lo, hi) == (start, stop) and target.is_contiguous():
            target.normal_(0.0, std, generator=generator)
            continue
        drawn = torch.empty((stop - start, *global_shape[1:]), device=local.device, dtype=torch.float32)
        drawn.normal_(0.0, std, generator=generator)
        target.copy_(drawn[(slice(lo - start, hi - start), *trailing)])


def _initial_value(model: Transformer, fqn: str, module: nn.Module, leaf: str, shape, seed: int) -> torch.Tensor:
    """The full (unsharded) float32 CPU value of parameter ``fqn.leaf``: the reference every shard agrees with."""
    std = init_rule(model, fqn, module, leaf)
    if std is None:
        return torch.full(shape, _constant_value(module, leaf))
    full = torch.empty(shape)
    fill_local_shard(full, tuple(shape), (0,) * len(shape), std, seed, f"{fqn}.{leaf}")
    return full


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise every parameter from (seed, parameter name) alone, whatever the sharding (see module docstring).

    Works on a model built on the meta device and materialised with ``to_empty()``; a DTensor parameter (FSDP2 /
    tensor parallel) fills only its local shard, with no communication.
    """
    from torch.distributed.tensor import DTensor

    from ..compat import local_shard_offset

    for module_name, module in model.named_modules():
        fqn = canonical_name(module_name)
        for leaf, param in module.named_parameters(recurse=False):
            local, offset = param, (0,) * param.dim()
            if isinstance(param, DTensor):
                local = param.to_local()
                offset = local_shard_offset(param)
            std = init_rule(model, fqn, module, leaf)
            if std is None:
                local.fill_(_constant_value(module, leaf))
            else:
                fill_local_shard(local, tuple(param.shape), offset, std, seed, f"{fqn}.{leaf}")
