"""The decoder-only transformer every preset builds (its sharding-independent initialisation is in init.py).

Module names (``tok_embeddings``, ``layers[i].attention.wq/wk/wv/wo``, ``layers[i].feed_forward.w1/w2/w3``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``) follow torchtitan's Llama so the parallelism plans
(tensor parallel, FSDP, activation checkpointing) can address them by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from stagerun.core.spec.rope import ResolvedRope, default_rope

from ..losses import LossConfig, LossTerms, VocabShard, lm_losses, target_logprobs
from .attention import Attention, DocumentMask

# Re-exported: callers import the init from here (trainer/hf, tests) as before it moved to init.py.
from .init import _initial_value, canonical_name, init_weights, parameter_seed  # noqa: F401
from .positions import document_positions, rope_at, rope_cos_sin


def build_norm(spec) -> nn.Module:
    if spec.norm == "layernorm":
        return nn.LayerNorm(spec.dim, eps=spec.norm_eps, bias=spec.norm_bias)
    return nn.RMSNorm(spec.dim, eps=spec.norm_eps)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class NormHead(nn.Linear):
    """Baichuan 2's NormHead: each vocabulary row of the head is L2-normalised in forward.

    The stored weight stays unnormalised (the optimiser sees the raw rows); normalising in forward keeps the logit
    scale independent of the rows' norms, which Baichuan 2 found stabilises training with a large vocabulary.
    A subclass of nn.Linear, so tensor-parallel plans that shard ``output`` column-wise (by vocab row) still apply:
    the normalisation is per row, hence local to each shard.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=-1), self.bias)


def _replicated(hidden: torch.Tensor) -> torch.Tensor:
    """The full sequence on every TP rank from sequence-parallel (Shard(1)) hidden states. Each rank's gradient
    covers only its vocabulary rows, so it is a partial sum (reduce-scattered back to the sequence shards)."""
    if not isinstance(hidden, DTensor):
        return hidden
    return hidden.redistribute(hidden.device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])


class TransformerBlock(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.attention_norm = build_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = build_norm(spec)
        self.feed_forward = FeedForward(spec.dim, spec.ffn_width)

    def forward(
        self,
        x: torch.Tensor,
        mask: DocumentMask | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), mask, rotary=rotary)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only LM built from a *resolved* ModelSpec (``stagerun.core.spec.presets.resolve_model``)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.context_parallel: Any = None  # trainer/context_parallel.py: set when the sequences are sharded over cp
        # The RoPE the tables are built from: the model's (the first phase's) until the trainer sets a phase's.
        self.rope: ResolvedRope | None = default_rope(spec)
        self.tok_embeddings = nn.Embedding(spec.padded_vocab, spec.dim)
        self.layers: nn.ModuleList = nn.ModuleList(TransformerBlock(spec) for _ in range(spec.layers))
        self.norm = build_norm(spec)
        if spec.tied_embeddings:
            self.output = None  # the head reads tok_embeddings.weight: one parameter, one gradient
        else:
            head = NormHead if spec.norm_head else nn.Linear
            self.output = head(spec.dim, spec.padded_vocab, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        loss: LossConfig | None = None,
        teacher_tokens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        logprobs: bool = False,
    ) -> torch.Tensor | LossTerms:
        """Logits [B, T, padded_vocab], or with ``targets`` [B, T] the loss terms (``losses.lm_losses`` with
        ``loss``, default LossConfig(), and ``teacher_tokens``). With ``doc_ids`` [B, T], a token attends only to
        earlier tokens of its own document (packed sequences, Llama 3); without, plain causal attention.

        The loss runs here, inside forward, because FSDP2 gathers the root's parameters (embedding, final norm,
        head) for the root's forward only: outside it the head is sharded. It is fused with the head, so the
        logits are never materialised whole (see losses.py).

        ``positions`` [B, T]: each token's position in its document (StableLM 2's reset position ids), used when
        ``spec.positionIds`` is perDocument (else ignored); without them a perDocument model derives them from
        ``doc_ids``, and with neither a sequence is one document.

        ``logprobs=True`` (with ``targets``): instead of the loss sums, each target's float32 log-probability [B, T]
        (0 at ignored targets; ``losses.target_logprobs``), what the preference losses (dpo.py) sum per response."""
        h = self.tok_embeddings(tokens)
        if self.context_parallel is not None:  # sequence shards: masks and RoPE at global positions
            mask, rotary = self.context_parallel.prepare(self, tokens, doc_ids, positions)
        else:
            mask = DocumentMask.for_model(self, doc_ids) if doc_ids is not None else None
            rotary = self._rotary(tokens, positions, doc_ids)
        for layer in self.layers:
            h = layer(h, mask, rotary)
        hidden = _replicated(self.norm(h))
        weight, shard = self._head_weight()
        if targets is None:
            return shard.gather(F.linear(hidden, weight))
        config = loss or LossConfig()
        if logprobs:
            return target_logprobs(hidden, weight, targets, config.chunk_tokens, shard)
        return lm_losses(hidden, weight, targets, config, teacher_tokens=teacher_tokens, shard=shard)

    def set_rope(self, rope: ResolvedRope | None) -> bool:
        """Build the rotary tables from ``rope`` from the next forward on (a phase's RoPE, in-process); True when it
        changed. The tables are keyed by the RoPE, so nothing is rebuilt for a phase that keeps its predecessor's."""
        if rope is None or rope == self.rope:
            return False
        self.rope = rope
        return True

    def _rotary(
        self, tokens: torch.Tensor, positions: torch.Tensor | None, doc_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's cos/sin, built once per forward for all layers: [T, r] at positions 0..T-1, or [B, T, r] at
        per-document positions. float32; each layer casts them to its compute dtype (bf16 under mixed precision)."""
        if self.spec.position != "rope" or self.rope is None:
            return None
        if self.spec.position_ids == "perDocument":
            if positions is None and doc_ids is not None:
                positions = document_positions(doc_ids)
            if positions is not None:
                return rope_at(positions, self.spec.rotary_dims, self.rope, torch.float32)
        # One document per row (or positionIds: sequence): the sequence's own positions.
        return rope_cos_sin(tokens.shape[1], self.spec.rotary_dims, self.rope, tokens.device, torch.float32)

    def _head_weight(self) -> tuple[torch.Tensor, VocabShard]:
        """The head's rows this rank holds (all without tensor parallelism; NormHead applied) and where they sit."""
        weight = self.output.weight if self.output is not None else self.tok_embeddings.weight
        shard = VocabShard()
        if isinstance(weight, DTensor):  # tensor parallel: split by vocabulary rows (distributed.py)
            if tuple(weight.placements) != (Shard(0),):
                raise RuntimeError(f"the LM head must be split by vocabulary rows, found {weight.placements}")
            mesh = weight.device_mesh
            weight = weight.to_local()
            shard = VocabShard(mesh, mesh.get_local_rank() * weight.shape[0])
        if self.spec.norm_head:
            weight = F.normalize(weight, dim=-1)  # per row, so the same on a shard of rows
        return weight, shard

    def blocks(self) -> list[TransformerBlock]:
        """The blocks as built, before activation checkpointing or compile wrap them (tensor parallelism's view)."""
        blocks = list(self.layers)
        if not all(isinstance(block, TransformerBlock) for block in blocks):
            raise RuntimeError("the blocks are already wrapped: apply tensor parallelism before AC and compile")
        return blocks  # type: ignore[return-value]  # checked just above; mypy cannot narrow a list by all()

    def init_weights(self, seed: int) -> None:
        init_weights(self, seed)
