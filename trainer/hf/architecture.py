"""Which native ``transformers`` architecture a resolved ``ModelSpec`` exports to, and that export's config.json.

- ``norm: rmsnorm``, RoPE on every head dim -> ``LlamaForCausalLM``. ``qkvBias: true`` is written as Llama's
  ``attention_bias: true`` with an all-zero ``o_proj`` bias (Llama's flag also adds that bias; zero is exact).
- ``norm: rmsnorm`` with ``qkNorm: true`` -> ``Qwen3ForCausalLM``: Llama's block plus ``q_norm``/``k_norm``, an
  RMSNorm over each head's dims shared by the heads, before RoPE, with ``rms_norm_eps`` (stagerun's placement).
- ``norm: layernorm``, RoPE on any fraction -> ``StableLmForCausalLM`` (``partial_rotary_factor``,
  ``num_key_value_heads``, ``use_qkv_bias``).
- Refused (no native transformers class computes the same function): ALiBi (``spec.model.position``), RMSNorm
  with partial RoPE (``spec.model.rotaryFraction``: ``LlamaForCausalLM`` rotates every head dim), and LayerNorm with
  ``qkNorm`` (StableLM's ``qk_layernorm`` is a mean-subtracting LayerNorm with its own weights per head).

Also the names both directions share: the architecture constants, the errors and the manifest path of a field.
"""

from __future__ import annotations

import math
from typing import Any

from stagerun.core.spec.fields import Problem, SpecError, camel
from stagerun.core.spec.rope import default_rope

from .rope import hf_rope_entries

__all__ = [
    "ARCHITECTURES",
    "INIT_PATH",
    "LLAMA",
    "MODEL_TYPES",
    "QWEN3",
    "STABLELM",
    "HFMismatchError",
    "UnsupportedArchitecture",
    "export_problems",
    "exports_tied",
    "field",
    "hf_architecture",
    "hf_config",
]

LLAMA = "LlamaForCausalLM"
STABLELM = "StableLmForCausalLM"
QWEN3 = "Qwen3ForCausalLM"
MODEL_TYPES = {LLAMA: "llama", STABLELM: "stablelm", QWEN3: "qwen3"}
ARCHITECTURES = {model_type: arch for arch, model_type in MODEL_TYPES.items()}

INIT_PATH = "spec.model.init.path"


class UnsupportedArchitecture(SpecError):
    """The model cannot be exported to a native transformers architecture; ``problems`` name the fields."""


class HFMismatchError(SpecError):
    """A Hugging Face model does not match ``spec.model``; ``problems`` name each mismatching field."""


def field(name: str) -> str:
    """The manifest path of a ModelSpec attribute: ``kv_heads`` -> ``spec.model.kvHeads``."""
    return f"spec.model.{camel(name)}"


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
    if spec.norm == "layernorm" and spec.qk_norm:
        problems.append(
            Problem(
                field("qk_norm"),
                "true with norm: layernorm: StableLmForCausalLM's qk_layernorm is a LayerNorm (mean-subtracting) "
                "with separate weights per head, not stagerun's RMSNorm shared by the heads",
                "export qkNorm models with norm: rmsnorm (they become Qwen3ForCausalLM)",
            )
        )
    return problems


def hf_architecture(spec) -> str:
    """``LlamaForCausalLM``, ``Qwen3ForCausalLM`` or ``StableLmForCausalLM``; raises UnsupportedArchitecture naming
    the field."""
    problems = export_problems(spec)
    if problems:
        raise UnsupportedArchitecture(problems, "Hugging Face export")
    if spec.norm == "rmsnorm":
        return QWEN3 if spec.qk_norm else LLAMA
    return STABLELM


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
    rope = default_rope(spec)  # the model-level RoPE; an export of a phase's checkpoint sets it (hf/rope.py)
    rope_scaling = hf_rope_entries(rope, rope_parameters) if rope is not None else None
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
        "rope_scaling": rope_scaling,
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
    elif arch == QWEN3:
        config.update(
            {
                "rms_norm_eps": spec.norm_eps,  # also q_norm's and k_norm's
                "attention_bias": bool(spec.qkv_bias),  # covers o_proj too, as Llama's
                "head_dim": spec.head_dim,  # Qwen3's default is 128, not hidden_size / heads
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": spec.layers,
                "layer_types": ["full_attention"] * spec.layers,
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
