"""stagerun architectures <-> Hugging Face ``transformers`` architectures: config.json and tensor names, both ways.

Pure mapping, no I/O: :mod:`.export` and :mod:`.load` read and write the files.

Which architecture a resolved ``ModelSpec`` becomes (docs/huggingface.md has the full table):

- ``norm: rmsnorm``, RoPE on every head dim -> ``LlamaForCausalLM``. ``qkvBias: true`` is written as Llama's
  ``attention_bias: true`` with an all-zero ``o_proj`` bias (Llama's flag also adds that bias; zero is exact).
- ``norm: layernorm``, RoPE on any fraction -> ``StableLmForCausalLM`` (``partial_rotary_factor``,
  ``num_key_value_heads``, ``use_qkv_bias``). Its LayerNorms always have a bias: ``normBias: false`` is written
  as all-zero biases (exact).
- NormHead: the row normalisation is baked into ``lm_head.weight`` (inference-exact); with tied embeddings the
  export is untied (``tie_word_embeddings: false``), since the head is no longer the embedding.
- The embedding and head keep their padded rows: ``vocab_size`` in config.json is ``padded_vocab``.
- Refused (no native transformers class computes the same function): ALiBi (``spec.model.position``), and RMSNorm
  with partial RoPE (``spec.model.rotaryFraction``: ``LlamaForCausalLM`` rotates every head dim).

Both layouts already agree where it matters: RoPE uses the Hugging Face rotate-half layout (no q/k permutation)
and grouped-query heads use ``repeat_kv``'s order (query head h reads kv head h // group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stagerun.core.spec.fields import Problem, SpecError, camel

__all__ = [
    "LLAMA",
    "STABLELM",
    "Entry",
    "HFMismatchError",
    "UnsupportedArchitecture",
    "check_hf_config",
    "export_problems",
    "field",
    "hf_architecture",
    "hf_config",
    "hf_entries",
    "hf_rope_theta",
    "hf_rotary_factor",
    "hf_tied",
    "hf_vocab_size",
]

LLAMA = "LlamaForCausalLM"
STABLELM = "StableLmForCausalLM"
MODEL_TYPES = {LLAMA: "llama", STABLELM: "stablelm"}
ARCHITECTURES = {model_type: arch for arch, model_type in MODEL_TYPES.items()}

# Defaults of the transformers config classes for keys a config.json may omit (the same in 4.x and 5.x).
_DEFAULTS = {
    "llama": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    "stablelm": {
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "use_qkv_bias": False,
        "qk_layernorm": False,
        "use_parallel_residual": False,
        "hidden_act": "silu",
        "partial_rotary_factor": 0.25,
    },
}

INIT_PATH = "spec.model.init.path"


class UnsupportedArchitecture(SpecError):
    """The model cannot be exported to a native transformers architecture; ``problems`` name the fields."""


class HFMismatchError(SpecError):
    """A Hugging Face model does not match ``spec.model``; ``problems`` name each mismatching field."""


def field(name: str) -> str:
    """The manifest path of a ModelSpec attribute: ``kv_heads`` -> ``spec.model.kvHeads``."""
    return f"spec.model.{camel(name)}"


# ---------------------------------------------------------------------------------------------------- export side


def export_problems(spec) -> list[Problem]:
    """Why ``spec`` (a resolved ModelSpec) has no native transformers equivalent; [] when it has one."""
    problems = []
    if spec.position != "rope":
        problems.append(
            Problem(
                field("position"),
                f"{spec.position}: no transformers architecture combines ALiBi with a SwiGLU MLP and "
                f"{'RMSNorm' if spec.norm == 'rmsnorm' else 'LayerNorm'} "
                "(BLOOM's ALiBi model has a GELU MLP with biases; "
                "Baichuan 2 13B needs trust_remote_code), so the export would not compute the same function",
                "export models with position: rope; an ALiBi model can still be trained and evaluated with stagerun",
            )
        )
    elif spec.norm == "rmsnorm" and spec.rotary_dims != spec.head_dim:
        problems.append(
            Problem(
                field("rotary_fraction"),
                f"{spec.rotary_fraction}: LlamaForCausalLM rotates every head dim, and StableLmForCausalLM (the "
                "partial-rotary architecture) uses LayerNorm, not RMSNorm",
                "use rotaryFraction: 1 with rmsnorm, or norm: layernorm for partial rotary",
            )
        )
    return problems


def hf_architecture(spec) -> str:
    """``LlamaForCausalLM`` or ``StableLmForCausalLM``; raises UnsupportedArchitecture naming the field."""
    problems = export_problems(spec)
    if problems:
        raise UnsupportedArchitecture(problems, "Hugging Face export")
    return LLAMA if spec.norm == "rmsnorm" else STABLELM


def _rotary_factor(spec) -> float:
    """``partial_rotary_factor`` such that transformers' ``int(head_dim * factor)`` is exactly ``rotary_dims``."""
    factor = spec.rotary_dims / spec.head_dim
    while int(spec.head_dim * factor) < spec.rotary_dims:  # float rounding: nudge up until the product truncates right
        factor = math.nextafter(factor, 2.0)
    return factor


def exports_tied(spec) -> bool:
    """Whether the export shares embed_tokens with lm_head: tied and no NormHead (a baked head is another matrix)."""
    return bool(spec.tied_embeddings and not spec.norm_head)


def hf_config(
    spec,
    *,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The config.json dict of the export of ``spec``; readable by transformers 4.x (legacy top-level
    ``rope_theta`` / ``partial_rotary_factor``) and 5.x (``rope_parameters``)."""
    arch = hf_architecture(spec)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": spec.padded_vocab,
        "hidden_size": spec.dim,
        "intermediate_size": spec.ffn_width,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_seq_len,
        "initializer_range": spec.init_std,
        "tie_word_embeddings": exports_tied(spec),
        "rope_theta": float(spec.rope_theta),
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key transformers < 4.56 reads
    }
    if arch == LLAMA:
        config.update(
            {
                "rms_norm_eps": spec.norm_eps,
                "attention_bias": bool(spec.qkv_bias),  # + an all-zero o_proj bias, see hf_entries
                "mlp_bias": False,
                "head_dim": spec.head_dim,
                "pretraining_tp": 1,
            }
        )
    else:
        factor = _rotary_factor(spec)
        rope_parameters["partial_rotary_factor"] = factor
        config.update(
            {
                "layer_norm_eps": spec.norm_eps,
                "use_qkv_bias": bool(spec.qkv_bias),
                "qk_layernorm": False,
                "use_parallel_residual": False,
                "hidden_dropout": 0.0,
                "partial_rotary_factor": factor,
            }
        )
    config["rope_parameters"] = rope_parameters
    return config


# ---------------------------------------------------------------------------------------------------- tensors

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
        entries.append(
            Entry(f"{hf}.self_attn.o_proj.weight", f"{st}.attention.wo.weight", (d, spec.heads * hd), unit=unit)
        )
        if arch == LLAMA and spec.qkv_bias:  # Llama's attention_bias covers o_proj too
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


# ---------------------------------------------------------------------------------------------------- import side


def _get(config: dict, key: str, model_type: str) -> Any:
    value = config.get(key)
    return _DEFAULTS[model_type].get(key) if value is None else value


def _rope(config: dict) -> dict:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def hf_rope_theta(config: dict) -> float:
    rope = _rope(config)
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)


def hf_rotary_factor(config: dict, model_type: str) -> float:
    rope = _rope(config)
    value = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if value is None:
        value = _DEFAULTS[model_type].get("partial_rotary_factor", 1.0)
    return float(value)


def hf_tied(config: dict) -> bool:
    model_type = hf_model_type(config) or "llama"
    return bool(_get(config, "tie_word_embeddings", model_type))


def hf_vocab_size(config: dict) -> int:
    return int(config["vocab_size"])


def hf_model_type(config: dict) -> str | None:
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    for arch in config.get("architectures") or ():
        if arch in MODEL_TYPES:
            return MODEL_TYPES[arch]
    return None


def check_hf_config(spec, config: dict) -> list[Problem]:
    """Every way the Hugging Face ``config`` (config.json as a dict) differs from the resolved ``spec``.

    Each Problem names the ``spec.model.<field>`` to change and the value config.json has. Not checked on purpose:
    ``max_position_embeddings`` (continued pretraining may lengthen the context) and the token ids.
    """
    problems: list[Problem] = []
    model_type = hf_model_type(config)
    if model_type is None:
        found = config.get("model_type") or config.get("architectures")
        return [
            Problem(
                INIT_PATH,
                f"config.json is a {found!r} model; stagerun reads Hugging Face llama "
                "(LlamaForCausalLM) and stablelm (StableLmForCausalLM) models",
                "point spec.model.init.path at a Llama- or StableLM-architecture folder",
            )
        ]

    def differ(name: str, ours: Any, key: str, theirs: Any, fix_value: Any = None) -> None:
        fix_value = theirs if fix_value is None else fix_value
        problems.append(
            Problem(
                field(name),
                f"{ours!r} here, but config.json has {key}: {theirs!r}",
                f"set {camel(name)}: {fix_value!r} to load these weights",
            )
        )

    wanted_norm = "rmsnorm" if model_type == "llama" else "layernorm"
    if spec.norm != wanted_norm:
        differ("norm", spec.norm, "model_type", model_type, wanted_norm)
    if spec.position != "rope":
        problems.append(
            Problem(
                field("position"),
                f"{spec.position!r} here, but {model_type} models use RoPE",
                "set position: rope to load these weights",
            )
        )
    for name, key in (("dim", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads")):
        if config.get(key) != getattr(spec, name):
            differ(name, getattr(spec, name), key, config.get(key))
    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    if kv_heads != spec.kv_heads:
        differ("kv_heads", spec.kv_heads, "num_key_value_heads", kv_heads)
    head_dim = config.get("head_dim")
    if head_dim is not None and config.get("hidden_size") == spec.dim and head_dim != spec.head_dim:
        problems.append(
            Problem(
                field("dim"),
                f"head dim dim/heads = {spec.head_dim} here, but config.json has head_dim: {head_dim}",
                "stagerun needs head_dim = hidden_size / num_attention_heads",
            )
        )
    if config.get("intermediate_size") != spec.ffn_width:
        differ("ffn_hidden", spec.ffn_width, "intermediate_size", config.get("intermediate_size"))
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab > spec.padded_vocab:
        problems.append(
            Problem(
                field("vocab_size"),
                f"{spec.vocab_size} (padded to {spec.padded_vocab} rows) here, but config.json has vocab_size: {vocab}",
                f"set vocabSize: {vocab} (and use the model's tokenizer)",
            )
        )
    elif vocab < spec.vocab_size:
        problems.append(
            Problem(
                field("vocab_size"),
                f"{spec.vocab_size} here, but config.json has vocab_size: "
                f"{vocab}: token ids {vocab}..{spec.vocab_size - 1} would have no trained embedding",
                f"set vocabSize: {vocab} (and use the model's tokenizer)",
            )
        )
    rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        problems.append(
            Problem(
                INIT_PATH,
                f"config.json scales RoPE (rope_type {rope_type!r}); stagerun implements "
                "plain RoPE only, so the loaded model would compute another function",
                "load a model without rope scaling",
            )
        )
    theta = hf_rope_theta(config)
    if not math.isclose(theta, spec.rope_theta, rel_tol=1e-9):
        differ("rope_theta", spec.rope_theta, "rope_theta", theta)
    if model_type == "stablelm":
        factor = hf_rotary_factor(config, model_type)
        hf_dims = int(spec.head_dim * factor)
        if hf_dims != spec.rotary_dims:
            differ("rotary_fraction", spec.rotary_fraction, "partial_rotary_factor", factor, hf_dims / spec.head_dim)
        for key in ("qk_layernorm", "use_parallel_residual"):
            if _get(config, key, model_type):
                problems.append(
                    Problem(
                        INIT_PATH,
                        f"config.json sets {key}: true, which stagerun's blocks do not have",
                        "load a model without it",
                    )
                )
        bias = bool(_get(config, "use_qkv_bias", model_type))
        if bias != spec.qkv_bias:
            differ("qkv_bias", spec.qkv_bias, "use_qkv_bias", bias)
        eps_key = "layer_norm_eps"
    else:
        factor = hf_rotary_factor(config, model_type)
        if spec.rotary_dims != spec.head_dim:
            differ("rotary_fraction", spec.rotary_fraction, "model_type", "llama (rotates every head dim)", 1.0)
        if _get(config, "mlp_bias", model_type):
            problems.append(
                Problem(
                    INIT_PATH,
                    "config.json sets mlp_bias: true; stagerun's SwiGLU has no biases",
                    "load a model without MLP biases",
                )
            )
        bias = bool(_get(config, "attention_bias", model_type))
        if bias != spec.qkv_bias:  # attention_bias also adds o_proj.bias, which must then be zero (checked on load)
            differ("qkv_bias", spec.qkv_bias, "attention_bias", bias)
        eps_key = "rms_norm_eps"
    eps = float(_get(config, eps_key, model_type))
    if not math.isclose(eps, spec.norm_eps, rel_tol=1e-6):
        differ("norm_eps", spec.norm_eps, eps_key, eps)
    act = _get(config, "hidden_act", model_type)
    if act != "silu":
        problems.append(
            Problem(
                INIT_PATH,
                f"config.json has hidden_act: {act!r}; stagerun's MLP is SwiGLU (silu)",
                "load a model with hidden_act: silu",
            )
        )
    tied = hf_tied(config)
    # An untied export of a tied NormHead model is accepted: load_hf_weights checks that its head is the
    # normalised embedding.
    if tied != spec.tied_embeddings and not (spec.tied_embeddings and spec.norm_head and not tied):
        differ("tied_embeddings", spec.tied_embeddings, "tie_word_embeddings", tied)
    return problems
