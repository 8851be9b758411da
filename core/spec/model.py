"""The model architecture block of a TrainingRun (``spec.model``): every architecture option is a field
(docs/manifest-reference.md lists them).

Pure Python: the operator and ``stagerun plan`` use it (parameter counts, FLOPs per token) without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, TypeVar

from .fields import COUNT, spec_field, to_manifest
from .rope import RopeScalingSpec

_T = TypeVar("_T")


def resolved_value(value: _T | None, name: str) -> _T:
    # Derived quantities need the resolved spec, where the preset and the defaults have filled in every field.
    if value is None:
        raise ValueError(f"spec.model.{name} is unset: resolve the spec first (presets.resolve_model)")
    return value


@dataclass(frozen=True)
class ModelInitSpec:
    from_: Literal["hf", "checkpoint"] = spec_field(
        doc="where the initial weights come from: hf (a Hugging Face model folder) or checkpoint (a stagerun "
        "checkpoint; weights only, not the optimizer or the data position)"
    )
    path: str = spec_field(
        doc="hf: the folder (local path or fsspec URL) with config.json and *.safetensors; checkpoint: a checkpoint "
        "root (its newest committed checkpoint) or one committed step-XXXXXXXX folder"
    )


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
    qk_norm: bool | None = spec_field(
        None,
        doc="RMSNorm on each query and key head before RoPE, one learned weight per head dim shared by the heads "
        "(Qwen3's placement; AFM does not say which; OLMo 2 normalises the whole q and k projections instead)",
    )
    position: Literal["rope", "alibi"] | None = spec_field(None, doc="position encoding: rotary (RoPE) or ALiBi biases")
    rope_theta: float | None = spec_field(None, doc="RoPE base (Llama 3: 500000)", minimum=0, exclusive_minimum=True)
    rope_scaling: RopeScalingSpec | None = spec_field(
        None,
        doc="RoPE frequency scaling (Llama 3.1: {type: llama3, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, "
        "originalMaxPosition: 8192}); with ropeTheta, the first phase's RoPE, which phases[].rope can change",
    )
    rotary_fraction: float | None = spec_field(
        None,
        doc="fraction of each head's dims that RoPE rotates (StableLM 2: 0.25)",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
    )
    position_ids: Literal["sequence", "perDocument"] | None = spec_field(
        None,
        doc="RoPE positions of a packed sequence: sequence (0..seqLen-1) or perDocument (restart at 0 at each "
        "document start, StableLM 2's reset_position_ids); works with and without training.docMasking",
    )
    norm_head: bool | None = spec_field(None, doc="NormHead: normalise the LM-head rows (Baichuan 2, Index-1.9B)")
    tied_embeddings: bool | None = spec_field(None, doc="share the input embedding with the LM head")
    max_seq_len: int | None = spec_field(None, doc="longest sequence the model is built for", kind=COUNT, minimum=8)
    init_std: float | None = spec_field(None, doc="std of the normal weight init", minimum=0, exclusive_minimum=True)
    init: ModelInitSpec | None = spec_field(
        None,
        doc="start from released weights or another run's checkpoint instead of a random init (continued "
        "pretraining, post-training)",
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
        attention += 2 * self.head_dim if self.qk_norm else 0
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


# Fields added after checkpoints already recorded the model (meta.json "model"), with the value that builds the
# model those checkpoints hold. architecture_fields leaves them out at that value, so a checkpoint written before
# a field existed still matches a spec that leaves it at its default.
_ADDED_LATER = {"qkNorm": False, "positionIds": "sequence"}


def architecture_fields(spec: ModelSpec) -> dict:
    """The manifest form of a resolved model that checkpoints record and compare (``meta.json``'s ``model``):
    without ``init`` (where the weights began is no part of the architecture) and without later-added fields at
    their original behaviour."""
    return comparable_model_fields(to_manifest(spec))


def comparable_model_fields(fields: dict) -> dict:
    """``fields`` (a model's manifest form, as a meta.json records it) as :func:`architecture_fields` gives it."""
    return {k: v for k, v in fields.items() if k != "init" and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
