"""A phase's learning-rate schedule: what it inherits from the previous phase, its checks, and ResolvedLR.

lr unset: constant at the LR the previous phase ended with. lr.peak unset: that same LR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .fields import Problem
from .quantities import format_count
from .run import PhaseSpec

if TYPE_CHECKING:  # resolve.py imports this module: the phase type is for annotations only
    from .resolve import ResolvedPhase

__all__ = ["ResolvedLR", "resolve_lr"]


@dataclass(frozen=True)
class ResolvedLR:
    schedule: str
    peak: float
    end: float
    warmup_tokens: int
    decay_fraction: float
    decay_shape: str


def resolve_lr(phase: PhaseSpec, prev: ResolvedPhase | None, path: str, problems: list[Problem]):
    lr = phase.lr
    if lr is None:
        if prev is None:
            problems.append(
                Problem(
                    f"{path}.lr",
                    "the first phase must set lr",
                    "add e.g. lr: {peak: 3e-4, warmupTokens: 100M, schedule: cosine}",
                )
            )
            return None
        return ResolvedLR("constant", prev.lr.end, prev.lr.end, 0, 0.0, "linear")
    peak = lr.peak if lr.peak is not None else (prev.lr.end if prev else None)
    ok = True
    if peak is None:
        problems.append(Problem(f"{path}.lr.peak", "the first phase must set lr.peak", "add e.g. peak: 3e-4"))
        return None
    if peak <= 0:
        problems.append(
            Problem(
                f"{path}.lr.peak",
                "the previous phase ended at LR 0, so this phase has no LR to start from",
                "set lr.peak explicitly",
            )
        )
        return None
    if lr.schedule == "constant":
        if lr.to is not None and lr.to != peak:
            problems.append(
                Problem(
                    f"{path}.lr.to",
                    "a constant schedule has no end LR different from peak",
                    "drop `to`, or choose schedule linear, cosine or wsd",
                )
            )
            ok = False
        end = peak
    else:
        end = lr.to if lr.to is not None else 0.0
        if end > peak:
            problems.append(
                Problem(
                    f"{path}.lr.to", f"end LR {end} is above the peak {peak}", "decay schedules go down: lower `to`"
                )
            )
            ok = False
    if lr.warmup_tokens >= phase.tokens:
        problems.append(
            Problem(
                f"{path}.lr.warmupTokens",
                f"warmup of {format_count(lr.warmup_tokens)} tokens does not end "
                f"inside the phase ({format_count(phase.tokens)} tokens)",
                "shorten the warmup",
            )
        )
        ok = False
    decay_fraction = 0.0
    if lr.schedule == "wsd":
        if lr.decay_fraction is None:
            problems.append(
                Problem(
                    f"{path}.lr.decayFraction",
                    "required with schedule wsd",
                    "e.g. decayFraction: 0.1 decays over the last 10 % of the phase; 0 stays at peak",
                )
            )
            ok = False
        else:
            decay_fraction = lr.decay_fraction
            if decay_fraction == 0:
                end = peak
            decay_tokens = int(phase.tokens * decay_fraction)
            if phase.tokens - decay_tokens < lr.warmup_tokens:
                problems.append(
                    Problem(
                        f"{path}.lr.decayFraction",
                        "the decay would start before the warmup ends",
                        "lower decayFraction or warmupTokens",
                    )
                )
                ok = False
    elif lr.decay_fraction is not None:
        problems.append(
            Problem(
                f"{path}.lr.decayFraction",
                f"only applies to schedule wsd, not {lr.schedule}",
                "drop decayFraction, or use schedule: wsd",
            )
        )
        ok = False
    if not ok:
        return None
    return ResolvedLR(lr.schedule, peak, end, lr.warmup_tokens, decay_fraction, lr.decay_shape)
