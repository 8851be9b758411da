"""The decoder-only transformer that ``spec.model`` describes (docs/architecture.md).

spec = resolve_model(ModelSpec(preset="tiny"))
with torch.device("meta"):
    model = Transformer(spec)
model.to_empty(device="cpu")
init_weights(model, seed=0)
logits = model(tokens, doc_ids)          # [B, T, spec.padded_vocab]
"""

from .attention import Attention, DocumentMask, document_block_mask, document_causal_mask, flex_document_attention
from .positions import alibi_bias, alibi_slopes, apply_rotary, rope_cos_sin, rotate_half
from .transformer import FeedForward, NormHead, Transformer, TransformerBlock, build_norm, init_weights

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
    "document_block_mask",
    "document_causal_mask",
    "flex_document_attention",
    "init_weights",
    "rope_cos_sin",
    "rotate_half",
]
