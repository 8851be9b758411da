"""Context parallelism: each sequence split over the cp ranks, K and V all-gathered per layer (Llama 3 §3.3.2).

Sharding. A sequence of T tokens is cut into 2·cp chunks of S = T / (2·cp) tokens; cp rank r holds chunks r and
2·cp-1-r, in that order. Under causal attention a late chunk sees many keys and an early one few, so pairing them
gives every rank the same work ((2·cp+1)·S visible keys). The loader is unchanged (CP peers share a data-parallel
rank, so they draw the same micro-batches); ``ContextShard`` keeps this rank's tokens, targets, document ids and
positions on the host, after the per-document positions are computed on the whole sequence.

Attention. Each rank computes q, k, v for its 2·S tokens; per layer k and v (the KV heads only, under GQA) are
all-gathered over the cp group with an autograd-aware functional collective (its backward is a reduce-scatter,
so each rank gets the gradient of its own keys and values from every rank's queries), put back in sequence order,
and the local queries attend to the whole sequence with a mask built from *global* positions: causal, and
document-causal when ``training.docMasking`` is on. Llama 3 chose all-gather over ring attention because the
document mask makes ring's uneven blocks hard to balance; K/V are small next to Q under GQA, so the gather is
cheap. Kernels: SDPA with an explicit boolean mask (or ALiBi float bias) where attention.uses_flex says dense (CPU),
FlexAttention with a BlockMask over (local queries x all keys) on CUDA, which skips fully masked blocks.

Loss and gradients. Each rank's loss sums over its own tokens and is divided by the global token count; the step
reduces token counts and loss sums over the ``loss`` group (dp x cp), so the mean equals CP=1's. CP peers hold the
same parameters: FSDP shards them over dp_shard x cp (torchtitan's ``dp_shard_cp``, distributed.Topology.fsdp_mesh),
so FSDP's reduce-scatter also sums the gradients over cp, and no extra all-reduce is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .compat import all_gather_autograd
from .data.loader import MicroBatch
from .model.attention import Attention, DocumentMask, _compiled_on_cuda
from .model.positions import document_positions, rope_cos_sin


def chunk_indices(seq_len: int, cp: int, rank: int) -> np.ndarray:
    """Global positions of the tokens cp rank ``rank`` holds, in its local order: chunk ``rank`` then chunk
    ``2·cp-1-rank`` of the 2·cp equal chunks of a ``seq_len`` sequence."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"spec.phases[*].seqLen: {seq_len} is not a multiple of 2 x contextParallel ({2 * cp}); context "
            "parallelism cuts every sequence into 2 x contextParallel equal chunks"
        )
    size = seq_len // (2 * cp)
    first, second = rank * size, (2 * cp - 1 - rank) * size
    return np.concatenate([np.arange(first, first + size), np.arange(second, second + size)])


def sequence_order(seq_len: int, cp: int) -> np.ndarray:
    """The permutation that puts a rank-major all-gather (rank 0's tokens, then rank 1's, ...) in sequence order:
    ``natural = gathered[order]``."""
    gathered = np.concatenate([chunk_indices(seq_len, cp, rank) for rank in range(cp)])
    return np.argsort(gathered, kind="stable")


@dataclass(frozen=True)
class ContextShard:
    """Host-side split of a step's micro-batches: keep cp rank ``rank``'s tokens of every sequence."""

    rank: int
    size: int

    def shard(
        self, micro_batches: Sequence[MicroBatch], positions: Sequence[np.ndarray], checksum: float
    ) -> tuple[list[MicroBatch], list[np.ndarray], float]:
        """This rank's part of ``micro_batches`` and of their per-document ``positions`` (computed on the whole
        sequences), and its share of the batch ``checksum``: all of it on cp rank 0, none elsewhere, so the sum
        over the loss group counts every sequence once (the checksum weighs tokens by their global position)."""
        kept, kept_positions = [], []
        for mb, pos in zip(micro_batches, positions):
            index = chunk_indices(mb.inputs.shape[1], self.size, self.rank)
            kept.append(
                replace(mb, inputs=mb.inputs[:, index], targets=mb.targets[:, index], doc_ids=mb.doc_ids[:, index])
            )
            kept_positions.append(pos[:, index])
        return kept, kept_positions, checksum if self.rank == 0 else 0.0


def _gather_sequence(tensor: torch.Tensor, group: Any, order: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor``'s dim ``dim`` (this rank's tokens) all-gathered over ``group`` and put in sequence order."""
    moved = tensor.movedim(dim, 0)
    gathered = all_gather_autograd(moved, group).index_select(0, order)
    return gathered.movedim(0, dim)


@dataclass(frozen=True)
class ShardedAttention(DocumentMask):
    """The per-forward attention inputs under context parallelism, shared by every layer (built outside the
    blocks, like DocumentMask, so compiled blocks see a plain input). ``block`` or ``dense`` (inherited) masks
    local queries [T_local] against the whole sequence's keys [T]; ``attend`` is what Attention calls instead of
    its own kernels (trainer/model/attention.py)."""

    group: Any = None  # the cp ProcessGroup
    order: torch.Tensor | None = None  # sequence_order as a device tensor
    query_positions: torch.Tensor | None = None  # int64 [T_local]: global position of each local query

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, T_local, D], k/v [B, H_kv, T_local, D] -> [B, H, T_local, D]; one all-gather of K and V."""
        assert self.order is not None and self.query_positions is not None
        kv = _gather_sequence(torch.stack((k, v)), self.group, self.order, dim=3)  # [2, B, H_kv, T, D]
        k, v = kv[0], kv[1]
        gqa = q.shape[1] != k.shape[1]
        if self.block is not None:
            return _flex(q, k, v, self.block, self.query_positions, slopes, gqa)
        assert self.dense is not None
        mask: torch.Tensor = self.dense
        if slopes is not None:  # ALiBi: -slope x (query - key) at global positions
            keys = torch.arange(k.shape[2], device=q.device)
            distance = (keys[None, :] - self.query_positions[:, None]).to(torch.float32)
            bias = (slopes[:, None, None] * distance)[None]  # [1, H, T_local, T]
            mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flex(q, k, v, block, query_positions, slopes, gqa) -> torch.Tensor:
    score_mod = None
    if slopes is not None:

        def score_mod(score, b, h, q_idx, kv_idx):  # ALiBi at global positions
            return score + slopes[h] * (kv_idx - query_positions[q_idx])

    if torch.compiler.is_compiling():  # inside a compiled block: dynamo lowers the call into the block's graph
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=gqa)
    attend = _compiled_on_cuda()[0] if q.device.type == "cuda" else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=gqa)


def _block_mask(
    query_positions: torch.Tensor, doc_local: torch.Tensor | None, doc_full: torch.Tensor | None, total: int
):
    if doc_local is None or doc_full is None:

        def causal(b, h, q_idx, kv_idx):
            return query_positions[q_idx] >= kv_idx

        mask_mod, batch = causal, None
    else:

        def document_causal(b, h, q_idx, kv_idx):
            return (query_positions[q_idx] >= kv_idx) & (doc_local[b, q_idx] == doc_full[b, kv_idx])

        mask_mod, batch = document_causal, doc_local.shape[0]
    device = query_positions.device
    make = _compiled_on_cuda()[1] if device.type == "cuda" else create_block_mask
    return make(mask_mod, batch, None, query_positions.shape[0], total, device=device)


def _dense_mask(
    query_positions: torch.Tensor, doc_local: torch.Tensor | None, doc_full: torch.Tensor | None, total: int
):
    """Boolean [B or 1, 1, T_local, T]: causal at global positions, within a document when doc ids are given."""
    keys = torch.arange(total, device=query_positions.device)
    allowed = (query_positions[:, None] >= keys[None, :])[None]  # [1, T_local, T]
    if doc_local is not None and doc_full is not None:
        allowed = allowed & (doc_local[:, :, None] == doc_full[:, None, :])
    return allowed[:, None]


@dataclass
class ContextParallel:
    """Attached to a Transformer (``model.context_parallel``) by :func:`apply_context_parallel`: its forward then
    takes this rank's sequence shards and calls :meth:`prepare` for the masks and RoPE tables of all layers."""

    group: Any  # the cp ProcessGroup
    rank: int
    size: int
    _orders: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def query_positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(chunk_indices(local_len * self.size, self.size, self.rank)).to(device)

    def order(self, total: int, device: torch.device) -> torch.Tensor:
        key = (total, str(device))
        if key not in self._orders:
            self._orders[key] = torch.from_numpy(sequence_order(total, self.size)).to(device)
        return self._orders[key]

    def prepare(
        self, model: torch.nn.Module, tokens: torch.Tensor, doc_ids: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[ShardedAttention, tuple[torch.Tensor, torch.Tensor] | None]:
        """The layers' shared attention inputs and RoPE (cos, sin) at each local token's global position, or its
        position in its document when ``spec.model.positionIds`` is perDocument (``positions``: sharded with the
        tokens; without them, derived from the gathered document ids)."""
        spec, device = model.spec, tokens.device
        local = tokens.shape[1]
        total = local * self.size
        query_positions = self.query_positions(local, device)
        order = self.order(total, device)
        doc_full = None
        if doc_ids is not None:
            with torch.no_grad():  # ids: nothing to differentiate
                doc_full = _gather_sequence(doc_ids, self.group, order, dim=1)
        attention = next(m for m in model.modules() if isinstance(m, Attention))
        if attention.wants_flex(device):
            mask = ShardedAttention(
                block=_block_mask(query_positions, doc_ids, doc_full, total),
                group=self.group,
                order=order,
                query_positions=query_positions,
            )
        else:
            mask = ShardedAttention(
                dense=_dense_mask(query_positions, doc_ids, doc_full, total),
                group=self.group,
                order=order,
                query_positions=query_positions,
            )
        return mask, self._rotary(spec, total, query_positions, doc_full, positions, model.rope)

    def _rotary(self, spec, total, query_positions, doc_full, positions, rope):
        if spec.position != "rope":
            return None
        at = query_positions
        if spec.position_ids == "perDocument":
            if positions is not None:
                at = positions.long()
            elif doc_full is not None:
                at = document_positions(doc_full)[:, query_positions]
        # float32, indexed from the whole sequence's table; each layer casts to its compute dtype.
        cos, sin = rope_cos_sin(total, spec.rotary_dims, rope, query_positions.device, torch.float32)  # phase's RoPE
        return cos[at], sin[at]


def apply_context_parallel(model: torch.nn.Module, group: Any) -> None:
    """Make ``model`` (a Transformer, or a teacher) take sequence shards: every forward then gathers K/V over
    ``group`` (the cp mesh's process group)."""
    model.context_parallel = ContextParallel(group, dist.get_rank(group), dist.get_world_size(group))  # type: ignore[assignment]
