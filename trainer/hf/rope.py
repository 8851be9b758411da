"""RoPE scaling <-> Hugging Face: ``rope_scaling`` (transformers 4.x, beside a top-level ``rope_theta``) and
``rope_parameters`` (5.x, with ``rope_theta`` inside), of types default, linear, llama3 and yarn.

The model-level ``spec.model.ropeTheta`` / ``ropeScaling`` is what an import must match (the first phase's RoPE);
an export writes the RoPE of the phase its checkpoint was saved in (meta.json's ``rope``), since that is the
function those weights were trained to compute.
"""

from __future__ import annotations

import math
from typing import Any

from stagerun.core.spec.fields import to_manifest
from stagerun.core.spec.rope import ResolvedRope, RopeScaling, rope_from_manifest, yarn_attention_factor

# stagerun field -> transformers key, per scaling type (the keys transformers' _compute_*_parameters read).
_HF_KEYS = {
    "factor": "factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position": "original_max_position_embeddings",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attention_factor": "attention_factor",
    "truncate": "truncate",
}
_READS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position"),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "attention_factor", "truncate"),
}
SUPPORTED = ("default", *_READS)


def _rope_block(config: dict) -> dict:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def hf_rope_type(config: dict) -> str:
    rope = _rope_block(config)
    return rope.get("rope_type") or rope.get("type") or "default"


def hf_rope(config: dict, theta: float) -> tuple[ResolvedRope | None, str | None]:
    """The RoPE config.json describes, or (None, what stagerun cannot compute)."""
    rope, rope_type = _rope_block(config), hf_rope_type(config)
    if rope_type == "default":
        return ResolvedRope(theta), None
    if rope_type not in _READS:
        return None, f"rope_type {rope_type!r} (stagerun computes {', '.join(SUPPORTED)})"
    original = rope.get("original_max_position_embeddings")
    factor = rope.get("factor")
    if rope_type == "yarn" and factor is None and original and config.get("max_position_embeddings"):
        factor = config["max_position_embeddings"] / original  # transformers' fallback (DeepSeek-V3's configs)
    missing = [_HF_KEYS[n] for n in ("factor", "original_max_position") if n in _READS[rope_type]]
    missing = [key for key in missing if (factor if key == "factor" else original) is None]
    if rope_type == "llama3":
        missing += [key for key in ("low_freq_factor", "high_freq_factor") if rope.get(key) is None]
    if missing or factor is None:
        return None, f"rope_type {rope_type!r} without {', '.join(missing or ['factor'])}"
    values: dict[str, Any] = {"factor": float(factor)}
    if original is not None:
        values["original_max_position"] = int(original)
    if rope_type == "llama3":
        values["low_freq_factor"] = float(rope["low_freq_factor"])
        values["high_freq_factor"] = float(rope["high_freq_factor"])
    if rope_type == "yarn":
        values["beta_fast"] = float(rope.get("beta_fast") or 32)
        values["beta_slow"] = float(rope.get("beta_slow") or 1)
        values["truncate"] = bool(rope.get("truncate", True))
        attention = rope.get("attention_factor")
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:  # DeepSeek's form of the same scale
            attention = yarn_attention_factor(factor, mscale) / yarn_attention_factor(factor, mscale_all_dim)
        values["attention_factor"] = float(attention if attention is not None else yarn_attention_factor(factor))
    return ResolvedRope(theta, RopeScaling(type=rope_type, **values)), None


def same_scaling(ours: RopeScaling, theirs: RopeScaling) -> bool:
    if ours.type != theirs.type:
        return False
    for name in _READS.get(ours.type, ()):
        a, b = getattr(ours, name), getattr(theirs, name)
        if not (a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-9))):
            return False
    return True


def scaling_manifest(scaling: RopeScaling) -> str:
    """The ``ropeScaling`` block, flow style, for a fix message: ``{type: llama3, factor: 8, ...}``."""
    if scaling.type == "none":
        return "{type: none} (or drop ropeScaling)"
    fields = to_manifest(scaling.to_spec())

    def text(value: Any) -> str:
        return (
            str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
        )

    return "{" + ", ".join(f"{key}: {text(value)}" for key, value in fields.items()) + "}"


def hf_rope_entries(rope: ResolvedRope, rope_parameters: dict[str, Any]) -> dict[str, Any] | None:
    """Add ``rope``'s scaling to the 5.x ``rope_parameters`` (in place); returns the 4.x ``rope_scaling`` (None
    unscaled). Keys transformers 4.x does not know (``truncate``) are written only away from their default."""
    scaling = rope.scaling
    if scaling.type == "none":
        return None
    keys: dict[str, Any] = {"rope_type": scaling.type}
    for name in _READS[scaling.type]:
        value = getattr(scaling, name)
        if name == "truncate" and value:
            continue
        keys[_HF_KEYS[name]] = float(value) if isinstance(value, float) else value
    rope_parameters.update(keys)
    return dict(keys)


def checkpoint_rope(meta: dict[str, Any], manifest_run=None) -> ResolvedRope | None:
    """The RoPE a checkpoint's weights were trained with: meta.json's ``rope`` (its phase's); for a checkpoint
    saved before meta.json recorded it, the manifest's phase of that index (``manifest_run``: a ResolvedRun), else
    None (the model's own)."""
    recorded = meta.get("rope")
    if isinstance(recorded, dict):
        return rope_from_manifest(recorded)
    if manifest_run is not None and manifest_run.phases:
        index = min(int(meta.get("phase_index", len(manifest_run.phases) - 1)), len(manifest_run.phases) - 1)
        return manifest_run.phases[index].rope
    return None


def spec_with_rope(spec, rope: ResolvedRope | None):
    """``spec`` whose model-level RoPE is ``rope`` (what an export's config.json then states)."""
    if rope is None:
        return spec
    scaling = None if rope.scaling.type == "none" else rope.scaling.to_spec()
    return spec.replace(rope_theta=rope.theta, rope_scaling=scaling)


__all__ = [
    "SUPPORTED",
    "checkpoint_rope",
    "hf_rope",
    "hf_rope_entries",
    "hf_rope_type",
    "same_scaling",
    "scaling_manifest",
    "spec_with_rope",
]
