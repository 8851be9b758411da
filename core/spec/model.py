"""The model architecture block of a TrainingRun (``spec.model``): every architecture option is a field
(docs/manifest-reference.md lists them).

Pure Python: the operator and ``stagerun plan`` use it (parameter counts, FLOPs per token) without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, TypeVar

from .fields import COUNT, spec_field

_T = TypeVar("_T")


def resolved_value(value: _T | None, name: str) -> _T:
    # Derived quantities need the resolved spec, where the preset and the defaults have filled in every field.
    if value is None:
        raise ValueError(f"spec.model.{name} is unset: resolve the spec first (presets.resolve_model)")
    return value


@dataclass(frozen=True)
class ModelInitSpec:
    from_: Literal["hf"] = spec_field(doc="where the initial weights come from: hf (a Hugging Face model folder)")
    path: str = spec_field(doc="the folder (local path or fsspec URL) with config.json and *.safetensors")


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None = spec_field(
        None,
        doc="a named architecture (tiny, stablelm2-1.6b, index-1.9b, llama3-8b, baichuan2-7b, afm-3b); "
        "fields set beside it override the preset's values",
    )
    vocab_size: int | None = spec_field(None, doc="tokenizer vocabulary size (before padding)", minimum=1)
    pad_vocab_multiple: int | None = spec_field(
        None, doc="pad the embedding rows to a multiple of this (64: StableLM 2 pads 100289 to 100352)", minimum=1
    )
    dim: int | None = spec_field(None, doc="model (residual stream) width", minimum=8)
    layers: int | None = spec_field(None, doc="number of transformer blocks", minimum=1)
    heads: int | None = spec_field(None, doc="attention (query) heads", minimum=1)
    kv_heads: int | None = spec_field(
        None, doc="key/value heads: fewer than heads is grouped-query attention", minimum=1
    )
    ffn_hidden: int | None = spec_field(
        None, doc="SwiGLU hidden width; when unset: ffnMultiplier x 8/3 x dim rounded up to ffnMultipleOf", minimum=1
    )
    ffn_multiplier: float | None = spec_field(
        None, doc="scale on the 8/3 x dim SwiGLU width (Llama 3 8B: 1.3)", minimum=0, exclusive_minimum=True
    )
    ffn_multiple_of: int | None = spec_field(
        None, doc="round the SwiGLU width up to this multiple (Baichuan 2: 128)", minimum=1
    )
    norm: Literal["rmsnorm", "layernorm"] | None = spec_field(None, doc="normalisation layer")
    norm_eps: float | None = spec_field(None, doc="epsilon of the norm layers", minimum=0, exclusive_minimum=True)
    norm_bias: bool | None = spec_field(None, doc="learned bias in LayerNorm (rmsnorm has none)")
    qkv_bias: bool | None = spec_field(None, doc="bias on the query/key/value projections (StableLM 2: true)")
    position: Literal["rope", "alibi"] | None = spec_field(None, doc="position encoding: rotary (RoPE) or ALiBi biases")
    rope_theta: float | None = spec_field(None, doc="RoPE base (Llama 3: 500000)", minimum=0, exclusive_minimum=True)
    rotary_fraction: float | None = spec_field(
        None,
        doc="fraction of each head's dims that RoPE rotates (StableLM 2: 0.25)",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
    )
    norm_head: bool | None = spec_field(None, doc="NormHead: normalise the LM-head rows (Baichuan 2, Index-1.9B)")
    tied_embeddings: bool | None = spec_field(None, doc="share the input embedding with the LM head")
    max_seq_len: int | None = spec_field(None, doc="longest sequence the model is built for", kind=COUNT, minimum=8)
    init_std: float | None = spec_field(None, doc="std of the normal weight init", minimum=0, exclusive_minimum=True)
    init: ModelInitSpec | None = spec_field(
        None, doc="start from released weights instead of a random init (continued pretraining)"
    )

    # -- derived quantities (valid on a resolved spec, see presets.resolve_model) --------------------------------
    @property
    def head_dim(self) -> int:
        return resolved_value(self.dim, "dim") // resolved_value(self.heads, "heads")

    @property
    def padded_vocab(self) -> int:
        multiple = resolved_value(self.pad_vocab_multiple, "padVocabMultiple")
        return -(-resolved_value(self.vocab_size, "vocabSize") // multiple) * multiple

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        multiple = resolved_value(self.ffn_multiple_of, "ffnMultipleOf")
        raw = int(resolved_value(self.ffn_multiplier, "ffnMultiplier") * 8 * resolved_value(self.dim, "dim") / 3)
        return -(-raw // multiple) * multiple

    @property
    def rotary_dims(self) -> int:
        """How many leading dims of each head RoPE rotates (even; 0 with ALiBi)."""
        if self.position != "rope":
            return 0
        return int(round(self.head_dim * resolved_value(self.rotary_fraction, "rotaryFraction")))

    def parameter_count(self, *, include_embedding: bool = True) -> int:
        """Exact number of trainable parameters of the model this spec builds."""
        d, kv_dim, hidden = (
            resolved_value(self.dim, "dim"),
            resolved_value(self.kv_heads, "kvHeads") * self.head_dim,
            self.ffn_width,
        )
        norm_params = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        attention = d * d + 2 * d * kv_dim + d * d + (d + 2 * kv_dim if self.qkv_bias else 0)
        block = attention + 3 * d * hidden + 2 * norm_params
        body = resolved_value(self.layers, "layers") * block + norm_params
        if not include_embedding:
            return body
        embedding = self.padded_vocab * d
        return body + embedding * (1 if self.tied_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward = 3 x forward): 6N plus attention (PaLM appendix B)."""
        d = resolved_value(self.dim, "dim")
        matmul_params = self.parameter_count() - self.padded_vocab * d * (0 if self.tied_embeddings else 1)
        attention = 12 * resolved_value(self.layers, "layers") * d * seq_len // 2  # causal: half the score matrix
        return 6 * matmul_params + attention

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)
