"""The decoder-only transformer that ``spec.model`` describes (docs/architecture.md).

spec = resolve_model(ModelSpec(preset="tiny"))
with torch.device("meta"):
    model = Transformer(spec)
model.to_empty(device="cpu")
init_weights(model, seed=0)
logits = model(tokens, doc_ids)          # [B, T, spec.padded_vocab]; positions=: per-document RoPE positions
"""

from .attention import (
    Attention,
    DocumentMask,
    dense_attention,
    document_block_mask,
    document_causal_mask,
    flex_document_attention,
    uses_flex,
)
from .init import canonical_name, fill_local_shard, init_weights, parameter_seed
from .positions import alibi_bias, alibi_slopes, apply_rotary, document_positions, rope_at, rope_cos_sin, rotate_half
from .transformer import FeedForward, NormHead, Transformer, TransformerBlock, build_norm

__all__ = [
    "Attention",
    "DocumentMask",
    "FeedForward",
    "NormHead",
    "Transformer",
    "TransformerBlock",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "build_norm",
    "canonical_name",
    "dense_attention",
    "document_positions",
    "document_block_mask",
    "document_causal_mask",
    "fill_local_shard",
    "flex_document_attention",
    "init_weights",
    "parameter_seed",
    "rope_at",
    "rope_cos_sin",
    "rotate_half",
    "uses_flex",
]
