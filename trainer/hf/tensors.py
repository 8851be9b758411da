"""The tensors of a Hugging Face export: each one's name, shape and stagerun source, and how its value is made.

Both layouts already agree where it matters: RoPE uses the Hugging Face rotate-half layout (no q/k permutation)
and grouped-query heads use ``repeat_kv``'s order (query head h reads kv head h // group). What differs is
written out here: StableLM's LayerNorms always have a bias (``normBias: false`` becomes all-zero biases), Llama's
``attention_bias`` adds an ``o_proj`` bias (all zero), and NormHead's row normalisation is baked into
``lm_head.weight``. The embedding and head keep their padded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import LLAMA, QWEN3, hf_architecture

__all__ = ["COPY", "NORMHEAD", "UNIT_NORM_TOLERANCE", "ZEROS", "Entry", "export_tensor", "hf_entries"]

COPY = "copy"  # the HF tensor is the stagerun tensor
ZEROS = "zeros"  # the HF tensor has no stagerun counterpart and is all zeros (Llama o_proj bias, LayerNorm bias)
NORMHEAD = "normhead"  # the HF tensor is the stagerun head with its rows L2-normalised (baked NormHead)
UNIT_NORM_TOLERANCE = 1e-6  # |row norm - 1| below which a head row counts as normalised already


@dataclass(frozen=True)
class Entry:
    """One tensor of the Hugging Face checkpoint and where it comes from in the stagerun model."""

    hf: str  # name in the safetensors files
    src: str | None  # stagerun parameter FQN (None for ZEROS)
    shape: tuple[int, ...]
    kind: str = COPY
    unit: str = ""  # the group it is read and written with: "embed", "layers.<i>", "final"
    field: str | None = None  # for ZEROS: the spec field that makes it zero (named when an import finds it non-zero)


def hf_entries(spec) -> list[Entry]:
    """Every tensor of the export of ``spec``, in file order (embedding, blocks, final norm, head)."""
    arch = hf_architecture(spec)
    d, hd, vocab = spec.dim, spec.head_dim, spec.padded_vocab
    kv = spec.kv_heads * hd
    layernorm = spec.norm == "layernorm"
    entries = [Entry("model.embed_tokens.weight", "tok_embeddings.weight", (vocab, d), unit="embed")]

    def norm(hf: str, src: str, unit: str) -> list[Entry]:
        out = [Entry(f"{hf}.weight", f"{src}.weight", (d,), unit=unit)]
        if layernorm:
            if spec.norm_bias:
                out.append(Entry(f"{hf}.bias", f"{src}.bias", (d,), unit=unit))
            else:  # StableLM's LayerNorm always has a bias: zero is the same function
                out.append(Entry(f"{hf}.bias", None, (d,), ZEROS, unit, "norm_bias"))
        return out

    for i in range(spec.layers):
        unit, hf, st = f"layers.{i}", f"model.layers.{i}", f"layers.{i}"
        entries += norm(f"{hf}.input_layernorm", f"{st}.attention_norm", unit)
        for proj, src, rows in (("q_proj", "wq", spec.heads * hd), ("k_proj", "wk", kv), ("v_proj", "wv", kv)):
            entries.append(Entry(f"{hf}.self_attn.{proj}.weight", f"{st}.attention.{src}.weight", (rows, d), unit=unit))
            if spec.qkv_bias:
                entries.append(Entry(f"{hf}.self_attn.{proj}.bias", f"{st}.attention.{src}.bias", (rows,), unit=unit))
        if spec.qk_norm:  # Qwen3: one RMSNorm weight over the head dims each for queries and keys
            for name in ("q_norm", "k_norm"):
                entries.append(
                    Entry(f"{hf}.self_attn.{name}.weight", f"{st}.attention.{name}.weight", (hd,), unit=unit)
                )
        entries.append(
            Entry(f"{hf}.self_attn.o_proj.weight", f"{st}.attention.wo.weight", (d, spec.heads * hd), unit=unit)
        )
        if arch in (LLAMA, QWEN3) and spec.qkv_bias:  # their attention_bias covers o_proj too
            entries.append(Entry(f"{hf}.self_attn.o_proj.bias", None, (d,), ZEROS, unit, "qkv_bias"))
        entries += norm(f"{hf}.post_attention_layernorm", f"{st}.ffn_norm", unit)
        hidden = spec.ffn_width
        entries += [
            Entry(f"{hf}.mlp.gate_proj.weight", f"{st}.feed_forward.w1.weight", (hidden, d), unit=unit),
            Entry(f"{hf}.mlp.up_proj.weight", f"{st}.feed_forward.w3.weight", (hidden, d), unit=unit),
            Entry(f"{hf}.mlp.down_proj.weight", f"{st}.feed_forward.w2.weight", (d, hidden), unit=unit),
        ]
    entries += norm("model.norm", "norm", "final")
    head_src = "tok_embeddings.weight" if spec.tied_embeddings else "output.weight"
    if spec.norm_head:
        entries.append(Entry("lm_head.weight", head_src, (vocab, d), NORMHEAD, "final"))
    elif not spec.tied_embeddings:
        entries.append(Entry("lm_head.weight", head_src, (vocab, d), unit="final"))
    return entries


def export_tensor(entry: Entry, source):
    """The HF tensor of ``entry`` (float32) from ``source`` (the stagerun tensor of ``entry.src``, or None)."""
    import torch
    import torch.nn.functional as F

    if entry.kind == ZEROS:
        return torch.zeros(entry.shape, dtype=torch.float32)
    tensor = source.to(torch.float32)
    if entry.kind == NORMHEAD:
        # What NormHead.forward computes (F.normalize, eps 1e-12), in float32 whatever the export dtype. Rows that
        # are already unit-norm to float32 precision (a head imported from an export) are kept bit for bit:
        # normalising them again would only move their last bits, and HF -> stagerun -> HF must be identical.
        unit = ((tensor.double().norm(dim=-1) - 1.0).abs() <= UNIT_NORM_TOLERANCE)[:, None]
        tensor = torch.where(unit, tensor, F.normalize(tensor, dim=-1))
    return tensor
