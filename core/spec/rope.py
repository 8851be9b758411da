"""RoPE's base and frequency scaling: the model's (``spec.model.ropeTheta`` / ``ropeScaling``: the first phase's) and
each phase's (``spec.phases[].rope``), which inherit like other phase fields.

The scaling rules are those of transformers' ``modeling_rope_utils`` (``_compute_linear_scaling_rope_parameters``,
``_compute_llama3_parameters``, ``_compute_yarn_parameters``), so an imported or exported model computes the same
function; trainer/model/positions.py turns a :class:`ResolvedRope` into cos/sin tables. Pure Python: the plan
prints each phase's RoPE without torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from .fields import COUNT, Problem, camel, explicit_fields, spec_field

ScalingType = Literal["none", "linear", "llama3", "yarn"]


@dataclass(frozen=True)
class RopeScalingSpec:
    type: ScalingType = spec_field(
        doc="none; linear (position interpolation: every frequency / factor); llama3 (Llama 3.1: low frequencies / "
        "factor, high ones kept, a smooth blend between); yarn (YaRN: per-dimension blend of interpolation and "
        "extrapolation, cos/sin scaled by attentionFactor)"
    )
    factor: float | None = spec_field(
        None, doc="linear, llama3, yarn (required): how many times the context grows (Llama 3.1: 8)", minimum=1
    )
    low_freq_factor: float | None = spec_field(
        None,
        doc="llama3: wavelengths above originalMaxPosition / lowFreqFactor are divided by factor; default 1",
        minimum=0,
        exclusive_minimum=True,
    )
    high_freq_factor: float | None = spec_field(
        None,
        doc="llama3: wavelengths below originalMaxPosition / highFreqFactor stay as they are; default 4",
        minimum=0,
        exclusive_minimum=True,
    )
    original_max_position: int | None = spec_field(
        None,
        doc="llama3, yarn (required): the context length the base was trained at (Llama 3.1: 8192)",
        kind=COUNT,
        minimum=1,
    )
    beta_fast: float | None = spec_field(
        None,
        doc="yarn: rotations below which dims are only extrapolated; default 32",
        minimum=0,
        exclusive_minimum=True,
    )
    beta_slow: float | None = spec_field(
        None, doc="yarn: rotations above which dims are only interpolated; default 1", minimum=0, exclusive_minimum=True
    )
    attention_factor: float | None = spec_field(
        None,
        doc="yarn: scale on cos and sin (so on attention logits, squared); default 0.1 x ln(factor) + 1",
        minimum=0,
        exclusive_minimum=True,
    )
    truncate: bool | None = spec_field(None, doc="yarn: round the blend's dimension range to whole dims; default true")


@dataclass(frozen=True)
class PhaseRopeSpec:
    theta: float | None = spec_field(
        None,
        doc="RoPE base from this phase on (AFM's 32K phase: 6315089); unset: the previous phase's (first phase: "
        "spec.model.ropeTheta)",
        minimum=0,
        exclusive_minimum=True,
    )
    scaling: RopeScalingSpec | None = spec_field(
        None,
        doc="frequency scaling from this phase on, replacing the previous phase's whole ({type: none} removes it); "
        "unset: the previous phase's (first phase: spec.model.ropeScaling)",
    )


# Which fields each type reads, and which of them it needs; defaults are transformers'.
_APPLIES = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position"),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "attention_factor", "truncate"),
}
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position"),
    "yarn": ("factor", "original_max_position"),
}
_EXAMPLE = {"factor": "factor: 8", "original_max_position": "originalMaxPosition: 8192"}


@dataclass(frozen=True)
class RopeScaling:
    """A scaling rule with every value its type reads filled in (the others at their neutral values)."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    def to_spec(self) -> RopeScalingSpec:
        """The manifest block that resolves to this rule (only the fields its type reads)."""
        return RopeScalingSpec(type=self.type, **{name: getattr(self, name) for name in _APPLIES[self.type]})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResolvedRope:
    """The RoPE a phase trains with; hashable, so the trainer keys its cos/sin tables by it."""

    theta: float
    scaling: RopeScaling = RopeScaling()

    def describe(self) -> str:
        s = self.scaling
        words = {
            "none": "",
            "linear": f", linear x{s.factor:g}",
            "llama3": f", llama3 x{s.factor:g} (low {s.low_freq_factor:g}, high {s.high_freq_factor:g}, "
            f"original {s.original_max_position})",
            "yarn": f", yarn x{s.factor:g} (original {s.original_max_position}, beta {s.beta_fast:g}/"
            f"{s.beta_slow:g}, attention x{s.attention_factor:.4g})",
        }
        base = f"{self.theta:.0f}" if self.theta.is_integer() and self.theta < 1e15 else f"{self.theta:g}"
        return f"base {base}{words[s.type]}"


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """transformers' ``get_mscale``: YaRN's default cos/sin scale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def resolve_scaling(spec: RopeScalingSpec | None, path: str, problems: list[Problem]) -> RopeScaling | None:
    """The filled-in rule of ``spec`` (None: no scaling), or None with problems recorded."""
    if spec is None or spec.type == "none":
        extra = [] if spec is None else [n for n in explicit_fields(spec) if n != "type"]
        for name in extra:
            problems.append(Problem(f"{path}.{camel(name)}", "has no meaning with type: none", "drop it"))
        return None if extra else RopeScaling()
    before = len(problems)
    applies, given = _APPLIES[spec.type], explicit_fields(spec) - {"type"}
    for name in sorted(given - set(applies)):
        users = [t for t, names in _APPLIES.items() if name in names]
        problems.append(
            Problem(f"{path}.{camel(name)}", f"only applies to type {' or '.join(users)}", f"drop it with {spec.type}")
        )
    for name in _REQUIRED[spec.type]:
        if getattr(spec, name) is None:
            problems.append(
                Problem(f"{path}.{camel(name)}", f"required with type {spec.type}", f"e.g. {_EXAMPLE[name]}")
            )
    if len(problems) > before:
        return None
    values = {name: getattr(spec, name) for name in applies if getattr(spec, name) is not None}
    rule = RopeScaling(type=spec.type, **values)
    if spec.type == "llama3" and rule.high_freq_factor <= rule.low_freq_factor:
        problems.append(
            Problem(
                f"{path}.highFreqFactor",
                f"{rule.high_freq_factor:g} is not above lowFreqFactor {rule.low_freq_factor:g}: the blend between "
                "them would divide by zero or run backwards",
                "Llama 3.1 uses lowFreqFactor: 1, highFreqFactor: 4",
            )
        )
        return None
    if spec.type == "yarn" and rule.beta_fast <= rule.beta_slow:
        problems.append(
            Problem(
                f"{path}.betaFast",
                f"{rule.beta_fast:g} is not above betaSlow {rule.beta_slow:g}",
                "YaRN's defaults are betaFast: 32, betaSlow: 1",
            )
        )
        return None
    if spec.type == "yarn" and spec.attention_factor is None:
        rule = dataclasses.replace(rule, attention_factor=yarn_attention_factor(rule.factor))
    return rule


def model_rope(model, problems: list[Problem]) -> ResolvedRope | None:
    """The resolved model's RoPE (the first phase's default), checking ``spec.model.ropeScaling``; None with ALiBi
    or when that block has problems (recorded in ``problems``)."""
    if model.position != "rope":
        if model.rope_scaling is not None:
            problems.append(
                Problem(
                    "spec.model.ropeScaling",
                    "scales RoPE, but the model uses ALiBi (spec.model.position: alibi)",
                    "drop ropeScaling, or use position: rope",
                )
            )
        return None
    scaling = resolve_scaling(model.rope_scaling, "spec.model.ropeScaling", problems)
    return None if scaling is None else ResolvedRope(float(model.rope_theta), scaling)


def default_rope(model) -> ResolvedRope | None:
    """The RoPE a model built from a validated ``model`` starts with (None with ALiBi)."""
    return model_rope(model, [])


def resolve_phase_rope(
    phase_rope: PhaseRopeSpec | None, before: ResolvedRope | None, model, path: str, problems: list[Problem]
) -> tuple[ResolvedRope | None, bool]:
    """(the phase's RoPE, ok): ``phase_rope``'s fields over ``before`` (the previous phase's, or the model's)."""
    if model.position != "rope":
        if phase_rope is not None:
            problems.append(
                Problem(
                    f"{path}.rope",
                    "sets RoPE, but the model uses ALiBi (spec.model.position: alibi), which has no rotary base",
                    "drop rope, or use position: rope",
                )
            )
            return None, False
        return None, True
    if before is None:
        return None, False  # the model's own ropeScaling is broken: reported once, naming spec.model.ropeScaling
    if phase_rope is None:
        return before, True
    theta = before.theta if phase_rope.theta is None else float(phase_rope.theta)
    if phase_rope.scaling is None:
        return ResolvedRope(theta, before.scaling), True
    scaling = resolve_scaling(phase_rope.scaling, f"{path}.rope.scaling", problems)
    return (ResolvedRope(theta, scaling), True) if scaling is not None else (None, False)


def rope_from_manifest(fields: dict) -> ResolvedRope:
    """A ResolvedRope from its manifest form (``to_manifest`` of one, as a checkpoint's meta.json records it)."""
    scaling = {k: v for k, v in (fields.get("scaling") or {}).items()}
    names = {camel(name): name for name in RopeScaling.__dataclass_fields__}
    return ResolvedRope(float(fields["theta"]), RopeScaling(**{names[k]: v for k, v in scaling.items()}))
