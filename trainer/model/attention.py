"""Self-attention: multi-head / grouped-query, RoPE or ALiBi, causal or intra-document causal masking.

Kernel choice, per call:
- no ``doc_ids``, RoPE: SDPA with ``is_causal=True`` (flash / memory-efficient kernels).
- no ``doc_ids``, ALiBi: SDPA with a float bias (causal -inf plus -slope * distance).
- ``doc_ids`` on CUDA: FlexAttention with a document-causal BlockMask (Llama 3's intra-document masking) and
  ALiBi as a score_mod; fully masked blocks are skipped, so packed short documents cost less than a full causal
  pass. Inside a compiled block dynamo lowers flex into the block's graph; from eager code a process-wide compiled
  flex runs.
- ``doc_ids`` on CPU: SDPA with an explicit boolean block-diagonal causal mask. CPU FlexAttention has no backward,
  compiled or not (torch 2.11-2.13), and eager it is slow: measured on a 2-core CPU (torch 2.13, B=16, 4 heads,
  head_dim 64), 46 ms at T=128 and 136 ms at T=256 against 2.5 ms and 11.5 ms for SDPA with the explicit mask
  (without torch.compile flex materialises the scores and evaluates the mask_mod elementwise). Both agree within
  1e-6.

The choice is made once per forward (``uses_flex``), when the model builds its ``DocumentMask`` outside the blocks.
Grouped-query attention never copies K/V: SDPA and flex both take ``enable_gqa``.

Tensor parallel: heads are counted from the projections' output width at forward time, so a column-wise split of
wq/wk/wv and a row-wise split of wo needs no change here; ``head_offset`` says which global head is this rank's
first, so ALiBi picks the right slopes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from stagerun.core.spec.rope import default_rope

from .positions import alibi_bias, alibi_slopes, apply_rotary, rope_cos_sin

_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"


def uses_flex(device: torch.device) -> bool:
    """The one rule for document masks: FlexAttention on CUDA (its kernel is compiled even in an eager model), the
    dense SDPA mask on CPU. CPU flex cannot train, compiled or not: torch 2.11 to 2.13 raise "FlexAttention does
    not support backward on CPU" in flex_attention's input checks, before dynamo or inductor see the call (eager
    it is also 12-18x slower, module docstring). Tests force CPU flex (``Attention.use_flex``) without grad."""
    return device.type == "cuda"


@dataclass(frozen=True)
class DocumentMask:
    """The per-forward document mask shared by all layers: exactly one of a BlockMask (FlexAttention) or a dense
    boolean mask (SDPA). Built once per forward outside the blocks and never mutated, so compiled and checkpointed
    blocks see a plain input (no graph break, one compilation for every layer)."""

    block: BlockMask | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def build(cls, doc_ids: torch.Tensor, flex: bool) -> DocumentMask:
        if flex:
            return cls(block=document_block_mask(doc_ids))
        return cls(dense=document_causal_mask(doc_ids))

    @classmethod
    def for_model(cls, model: nn.Module, doc_ids: torch.Tensor) -> DocumentMask:
        """The mask kind ``model``'s attention layers were set up for (they all share one setting)."""
        attention = next(m for m in model.modules() if isinstance(m, Attention))
        return cls.build(doc_ids, attention.wants_flex(doc_ids.device))


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] block-diagonal causal mask from document ids [B, T]."""
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    causal = positions[:, None] >= positions[None, :]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


_compiled: dict[str, object] = {}


def _compiled_on_cuda() -> tuple:
    """flex_attention and create_block_mask compiled once per process (as torchtitan does: every compiled
    instance re-traces), for calls from eager code on CUDA."""
    if not _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
        _compiled["mask"] = torch.compile(create_block_mask)
    return _compiled["flex"], _compiled["mask"]


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    batch, seq_len = doc_ids.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    # Built in the (uncompiled) model forward: compiled on CUDA, eager on CPU, where it is a vmap over T x T.
    make_mask = _compiled_on_cuda()[1] if doc_ids.device.type == "cuda" else create_block_mask
    return make_mask(document_causal, batch, None, seq_len, seq_len, device=doc_ids.device)


def flex_document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Intra-document causal attention with FlexAttention. q [B, H, T, D], k/v [B, H_kv, T, D] -> [B, H, T, D]."""
    score_mod = None
    if slopes is not None:

        def score_mod(score, b, h, q_idx, kv_idx):  # ALiBi: -slope * (query - key)
            return score + slopes[h] * (kv_idx - q_idx)

    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():  # inside a compiled block: dynamo lowers the call into the block's graph
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
    if q.device.type == "cuda":
        attend = _compiled_on_cuda()[0]
        return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager CPU flex: only tests and explicit calls get here; the warning is expected
        warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, slopes: torch.Tensor | None
) -> torch.Tensor:
    """SDPA: causal kernels without mask or ALiBi, else an explicit boolean mask or float bias. Grouped-query
    through ``enable_gqa``: query head h reads kv head h // group (the Hugging Face repeat_kv layout) without
    copying K/V."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None and slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    bias: torch.Tensor | None = None if slopes is None else alibi_bias(slopes, q.shape[2])[None]  # [1, H, T, T]
    if mask is not None:
        bias = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
    assert bias is not None  # this branch has a mask, slopes, or both
    if bias.dtype != torch.bool:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.head_dim = spec.head_dim
        self.n_heads = spec.heads  # global count: ALiBi slopes depend on it, not on the local (TP) head count
        self.wq = nn.Linear(spec.dim, spec.heads * spec.head_dim, bias=spec.qkv_bias)
        self.wk = nn.Linear(spec.dim, spec.kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.wv = nn.Linear(spec.dim, spec.kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.heads * spec.head_dim, spec.dim, bias=False)
        # Query/key normalisation (Qwen3's placement, so it exports as Qwen3ForCausalLM): one RMSNorm over each
        # head's dims, its weight shared by the heads, before RoPE. Per head, so tensor parallelism (a split by head)
        # leaves it local; OLMo 2's norm over the whole projection would need the full width on every rank.
        self.q_norm = nn.RMSNorm(spec.head_dim, eps=spec.norm_eps) if spec.qk_norm else None
        self.k_norm = nn.RMSNorm(spec.head_dim, eps=spec.norm_eps) if spec.qk_norm else None
        self.position = spec.position
        self.rotary_dims = spec.rotary_dims
        self.rope = default_rope(spec)  # only for a call without ``rotary``: the Transformer passes its phase's tables
        self.head_offset = 0  # first global head held by this rank under tensor parallelism
        self.use_flex: bool | None = None  # forces the document-mask kernel (tests); None: the uses_flex rule

    def wants_flex(self, device: torch.device) -> bool:
        return uses_flex(device) if self.use_flex is None else self.use_flex

    def local_alibi_slopes(self, local_heads: int, device: torch.device) -> torch.Tensor:
        slopes = alibi_slopes(self.n_heads)[self.head_offset : self.head_offset + local_heads]
        return torch.tensor(slopes, dtype=torch.float32, device=device)

    def forward(
        self,
        x: torch.Tensor,
        mask: DocumentMask | None = None,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``rotary``: (cos, sin) [T, r] or [B, T, r] (per-document positions), from the phase's RoPE (the
        Transformer builds them once per forward); None: the model's RoPE at positions 0..T-1. A keyword, so tensor
        parallelism's input hook (two positional inputs) passes it through untouched."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x).view(batch, seq_len, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.position == "rope":
            if rotary is not None:
                cos, sin = (t.to(q.dtype) for t in rotary)
            else:
                assert self.rope is not None  # set whenever position is rope
                cos, sin = rope_cos_sin(seq_len, self.rotary_dims, self.rope, x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        slopes = self.local_alibi_slopes(q.shape[1], x.device) if self.position == "alibi" else None

        attend = getattr(mask, "attend", None)  # context parallelism (trainer/context_parallel.py)
        if attend is not None:
            out = attend(q, k, v, slopes)
        elif mask is not None and mask.block is not None:
            out = flex_document_attention(q, k, v, mask.block, slopes)
        else:
            out = dense_attention(q, k, v, None if mask is None else mask.dense, slopes)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))
