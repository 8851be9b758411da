"""Reading a Hugging Face config.json (with the transformers defaults for omitted keys) and every way it differs
from a resolved ``spec.model``, each difference named by the manifest field to change."""

from __future__ import annotations

import math
from typing import Any

from stagerun.core.spec.fields import Problem, camel
from stagerun.core.spec.rope import default_rope

from .architecture import ARCHITECTURES, INIT_PATH, MODEL_TYPES, field
from .rope import SUPPORTED, hf_rope, hf_rope_type, same_scaling, scaling_manifest

__all__ = [
    "check_hf_config",
    "hf_model_type",
    "hf_rope_theta",
    "hf_rotary_factor",
    "hf_tied",
    "hf_vocab_size",
]

# Defaults of the transformers config classes for keys a config.json may omit (the same in 4.x and 5.x).
_DEFAULTS = {
    "llama": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    "qwen3": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "head_dim": 128,
        "use_sliding_window": False,
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
    value: Any = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
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
                "(LlamaForCausalLM), qwen3 (Qwen3ForCausalLM) and stablelm (StableLmForCausalLM) models",
                "point spec.model.init.path at a Llama-, Qwen3- or StableLM-architecture folder",
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

    wanted_norm = "layernorm" if model_type == "stablelm" else "rmsnorm"
    if spec.norm != wanted_norm:
        differ("norm", spec.norm, "model_type", model_type, wanted_norm)
    if bool(spec.qk_norm) != (model_type == "qwen3"):  # only Qwen3 has stagerun's q/k norms (stablelm's: below)
        differ("qk_norm", spec.qk_norm, "model_type", model_type, model_type == "qwen3")
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
    head_dim = _get(config, "head_dim", model_type)
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
    theta = hf_rope_theta(config)
    if not math.isclose(theta, spec.rope_theta, rel_tol=1e-9):
        differ("rope_theta", spec.rope_theta, "rope_theta", theta)
    theirs, unsupported = hf_rope(config, theta)
    ours = default_rope(spec)
    if unsupported:
        problems.append(
            Problem(
                INIT_PATH,
                f"config.json scales RoPE with {unsupported}, so the loaded model would compute another function",
                f"load a model whose RoPE is one of {', '.join(SUPPORTED)}",
            )
        )
    elif theirs is not None and ours is not None and not same_scaling(ours.scaling, theirs.scaling):
        problems.append(
            Problem(
                field("rope_scaling"),
                f"RoPE {ours.describe()} here, but config.json has {theirs.describe()} "
                f"(rope_type {hf_rope_type(config)!r})",
                f"set ropeScaling: {scaling_manifest(theirs.scaling)} to load these weights",
            )
        )
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
            differ("rotary_fraction", spec.rotary_fraction, "model_type", f"{model_type} (rotates every head dim)", 1.0)
        if model_type == "qwen3" and _get(config, "use_sliding_window", model_type):
            problems.append(
                Problem(
                    INIT_PATH,
                    "config.json sets use_sliding_window: true; stagerun attends over the whole context",
                    "load a model without sliding-window attention",
                )
            )
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
