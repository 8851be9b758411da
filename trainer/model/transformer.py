"""The decoder-only transformer every preset builds, and its sharding-independent initialisation.

Module names (``tok_embeddings``, ``layers[i].attention.wq/wk/wv/wo``, ``layers[i].feed_forward.w1/w2/w3``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``) follow torchtitan's Llama so the parallelism plans
(tensor parallel, FSDP, activation checkpointing) can address them by name.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, DocumentMask


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


class TransformerBlock(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.attention_norm = build_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = build_norm(spec)
        self.feed_forward = FeedForward(spec.dim, spec.ffn_width)

    def forward(self, x: torch.Tensor, mask: DocumentMask | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only LM built from a *resolved* ModelSpec (``stagerun.core.spec.presets.resolve_model``)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.padded_vocab, spec.dim)
        self.layers: nn.ModuleList = nn.ModuleList(TransformerBlock(spec) for _ in range(spec.layers))
        self.norm = build_norm(spec)
        if spec.tied_embeddings:
            self.output = None  # the head reads tok_embeddings.weight: one parameter, one gradient
        else:
            head = NormHead if spec.norm_head else nn.Linear
            self.output = head(spec.dim, spec.padded_vocab, bias=False)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, padded_vocab]. With ``doc_ids`` [B, T], a token attends only to earlier tokens of its
        own document (packed sequences, Llama 3); without, plain causal attention."""
        h = self.tok_embeddings(tokens)
        mask = DocumentMask(doc_ids) if doc_ids is not None else None
        for layer in self.layers:
            h = layer(h, mask)
        h = self.norm(h)
        if self.output is not None:
            return self.output(h)
        weight = self.tok_embeddings.weight
        if self.spec.norm_head:
            weight = F.normalize(weight, dim=-1)
        return F.linear(h, weight)

    def blocks(self) -> list[TransformerBlock]:
        """The blocks as built, before activation checkpointing or compile wrap them (tensor parallelism's view)."""
        blocks = list(self.layers)
        if not all(isinstance(block, TransformerBlock) for block in blocks):
            raise RuntimeError("the blocks are already wrapped: apply tensor parallelism before AC and compile")
        return blocks  # type: ignore[return-value]  # checked just above; mypy cannot narrow a list by all()

    def init_weights(self, seed: int) -> None:
        init_weights(self, seed)


# The module names that checkpoint_wrapper and torch.compile of a block insert into parameter names (FSDP2 renames
# nothing); stripped so a parameter's init does not depend on how the model was wrapped.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(fqn: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def parameter_seed(seed: int, fqn: str) -> int:
    """A generator seed from (run seed, parameter name), stable across processes and Python versions (Python's
    ``hash()`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{canonical_name(fqn)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _initial_value(model: Transformer, fqn: str, module: nn.Module, leaf: str, shape, seed: int) -> torch.Tensor:
    spec = model.spec
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = spec.init_std
    if fqn.endswith(("attention.wo", "feed_forward.w2")):
        # Residual-branch outputs scaled by 1/sqrt(2 x layers) (GPT-2; torchtitan's depth init) so the residual
        # stream's variance does not grow with depth.
        std = std / math.sqrt(2 * spec.layers)
    generator = torch.Generator().manual_seed(parameter_seed(seed, f"{fqn}.{leaf}"))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise every parameter from (seed, parameter name) alone, whatever the sharding.

    Each parameter's full tensor is drawn on CPU from its own generator; a DTensor (FSDP2 / tensor parallel) then
    keeps only its local shard, cut locally (``src_data_rank=None``: every rank computed the same full tensor, so no
    communication). Works on a model built on the meta device and materialised with ``to_empty()``.
    Cost: every rank draws every full tensor once on CPU, ~15 s per billion parameters on one core (measured:
    1.6 s per 100M normals), and holds the largest full tensor (Llama 3 8B's embedding: 2.1 GB) at a time.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            fqn = canonical_name(module_name)
            full = _initial_value(model, fqn, module, leaf, tuple(param.shape), seed)
            full = full.to(dtype=param.dtype)
            if isinstance(param, DTensor):
                full = full.to(param.device)  # DTensor.device is the local device
                local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(full)
