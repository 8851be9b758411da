"""A phase's optimizer settings: spec.training.optimizer for the first phase, then each phase's overrides.

The optimizer's type and kernel are the run's (one optimizer object lives through every phase); the settings a
phase may change (weight decay, betas or momentum, epsilon, gradient clipping) are applied to its param_groups at
the phase's first step, in-process. A phase that sets none keeps the previous phase's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .fields import Problem, explicit_fields
from .run import PhaseOptimizerSpec, TrainingSpec

__all__ = ["ResolvedOptimizer", "first_optimizer", "resolve_optimizer"]

# Fields that belong to one optimizer type only: setting one for the other type would silently do nothing.
_ONLY_FOR = {"beta1": "adamw", "momentum": "rmspropMomentum"}
_INSTEAD = {"beta1": "momentum", "momentum": "beta1"}


@dataclass(frozen=True)
class ResolvedOptimizer:
    type: str  # adamw | rmspropMomentum
    beta1: float  # adamw
    beta2: float  # adamw beta2 / RMSprop alpha
    momentum: float  # rmspropMomentum
    eps: float
    weight_decay: float  # decoupled, on matrices only
    grad_clip: float  # 0: no clipping


def first_optimizer(training: TrainingSpec, problems: list[Problem]) -> ResolvedOptimizer | None:
    """The settings the first phase starts from, with the checks of spec.training.optimizer."""
    opt = training.optimizer
    ok = _check_type_fields(opt.type, explicit_fields(opt), "spec.training.optimizer", problems)
    if opt.type != "adamw" and opt.implementation == "fused":
        problems.append(
            Problem(
                "spec.training.optimizer.implementation",
                "fused applies to AdamW only: torch has no fused RMSprop",
                "use implementation: auto or foreach with type rmspropMomentum",
            )
        )
        ok = False
    if not ok:
        return None
    return ResolvedOptimizer(
        type=opt.type,
        beta1=opt.beta1,
        beta2=opt.beta2,
        momentum=opt.momentum,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        grad_clip=training.grad_clip,
    )


# PhaseOptimizerSpec fields that are not settings carried from phase to phase (ResolvedPhase.reset_optimizer).
PER_PHASE_ONLY = frozenset({"reset"})


def resolve_optimizer(
    override: PhaseOptimizerSpec | None, before: ResolvedOptimizer, path: str, problems: list[Problem]
) -> ResolvedOptimizer | None:
    """``before`` (the previous phase's, or :func:`first_optimizer`) with the fields ``override`` sets."""
    if override is None:
        return before
    fields = frozenset(
        f.name
        for f in dataclasses.fields(override)
        if getattr(override, f.name) is not None and f.name not in PER_PHASE_ONLY
    )
    if not _check_type_fields(before.type, fields, f"{path}.optimizer", problems):
        return None
    return dataclasses.replace(before, **{name: getattr(override, name) for name in fields})


def _check_type_fields(kind: str, fields: frozenset[str], path: str, problems: list[Problem]) -> bool:
    ok = True
    for name, owner in _ONLY_FOR.items():
        if name in fields and kind != owner:
            problems.append(
                Problem(
                    f"{path}.{name}",
                    f"only applies to optimizer type {owner}; this run's is {kind}",
                    f"drop {name} (set {_INSTEAD[name]} instead), or set spec.training.optimizer.type: {owner}",
                )
            )
            ok = False
    return ok
