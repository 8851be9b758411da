"""A phase's learning-rate schedule: what it inherits from the previous phase, its checks, and ResolvedLR.

lr unset: constant at the LR the previous phase ended with. lr.peak unset: that same LR.

A schedule is a shape over tokens counted from its *origin* (where its warmup starts): usually the phase's own
start, laid over the phase's tokens. Two things stretch it past one phase:
- ``horizonTokens``: the shape is laid over more tokens than the phase has, so the phase ends part-way down it;
- ``schedule: continue`` on the following phases: the shape is laid over the union of their tokens and each of
  them evaluates the same curve (Llama 3 changes its data mix during pretraining without restarting the cosine).
``invSqrt`` starts where the previous phase ends and matches its value and slope there (StableLM 2's hybrid).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .fields import Problem, camel, explicit_fields
from .quantities import format_count
from .run import LRSpec, PhaseSpec

if TYPE_CHECKING:  # resolve.py imports this module: the phase type is for annotations only
    from .resolve import ResolvedPhase

__all__ = ["ResolvedLR", "resolve_lr", "running_tokens"]


@dataclass(frozen=True)
class ResolvedLR:
    """The schedule a phase runs; ``value``/``slope`` take tokens since ``origin_tokens`` (pure arithmetic)."""

    schedule: str  # constant, linear, cosine, wsd or invSqrt (a continued phase names the shape it continues)
    peak: float
    end: float  # the LR at this phase's end: what a next phase without lr, or without lr.peak, starts from
    warmup_tokens: int
    decay_fraction: float
    decay_shape: str
    origin_tokens: int = 0  # absolute tokens at which the schedule (its warmup) starts
    span_tokens: int = 0  # tokens the shape is laid over, from the origin
    to: float = 0.0  # the LR at the end of the span
    half_life_tokens: int = 0  # wsd with decay_shape exponential
    inv_sqrt: tuple[float, float] | None = None  # invSqrt: (alpha, beta) of alpha / sqrt(x + beta)
    continued: bool = False  # this phase continues the previous phase's schedule
    running_end_tokens: int = 0  # absolute end of the phases that run this schedule (this one and its continuations)

    def value(self, x: float) -> float:
        """The LR ``x`` tokens after the origin."""
        if self.warmup_tokens and x < self.warmup_tokens:
            return self.peak * x / self.warmup_tokens
        if self.schedule == "constant":
            return self.peak
        if self.schedule == "invSqrt":
            alpha, beta = self._inv_sqrt()
            return alpha / math.sqrt(x + beta)
        if self.schedule == "wsd":
            return self._wsd_value(x)
        progress = self._progress(x)
        if progress >= 1.0:
            return self.to  # exactly: the next phase inherits it
        if self.schedule == "linear":
            return self.peak + (self.to - self.peak) * progress
        if self.schedule == "cosine":
            return self.to + (self.peak - self.to) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown LR schedule {self.schedule!r}")

    def slope(self, x: float) -> float:
        """d(LR)/d(tokens) just before ``x`` tokens after the origin (what invSqrt matches at its start)."""
        if self.warmup_tokens and x <= self.warmup_tokens:
            return self.peak / self.warmup_tokens
        if self.schedule == "constant":
            return 0.0
        if self.schedule == "invSqrt":
            alpha, beta = self._inv_sqrt()
            return -0.5 * alpha * (x + beta) ** -1.5
        if self.schedule == "wsd":
            return self._wsd_slope(x)
        span = self.span_tokens - self.warmup_tokens
        progress = self._progress(x)
        if progress > 1.0 or not span:
            return 0.0
        if self.schedule == "linear":
            return (self.to - self.peak) / span
        if self.schedule == "cosine":  # 0 at its end exactly (sin(pi) in floating point is not)
            return (
                0.0 if progress >= 1.0 else -(self.peak - self.to) * 0.5 * math.pi * math.sin(math.pi * progress) / span
            )
        raise ValueError(f"unknown LR schedule {self.schedule!r}")

    def _inv_sqrt(self) -> tuple[float, float]:
        assert self.inv_sqrt is not None, "invSqrt resolves alpha and beta"
        return self.inv_sqrt

    def _progress(self, x: float) -> float:
        span = self.span_tokens - self.warmup_tokens
        return (x - self.warmup_tokens) / span if span else 1.0

    def _decay_window(self, x: float) -> tuple[float, int] | None:
        """(tokens into the decay, decay length), or None while stable."""
        decay_start = self.span_tokens - int(self.span_tokens * self.decay_fraction)
        if x < decay_start or decay_start >= self.span_tokens:
            return None
        return min(x, self.span_tokens) - decay_start, self.span_tokens - decay_start

    def _wsd_value(self, x: float) -> float:
        window = self._decay_window(x)
        if window is None:
            return self.peak
        into, length = window
        if self.decay_shape == "exponential":  # MiniCPM: f = 0.5^(into / half-life)
            return self.to + (self.peak - self.to) * 0.5 ** (into / self.half_life_tokens)
        if into >= length:
            return self.to
        if self.decay_shape == "cosine":
            return self.to + (self.peak - self.to) * 0.5 * (1.0 + math.cos(math.pi * into / length))
        return self.peak + (self.to - self.peak) * into / length

    def _wsd_slope(self, x: float) -> float:
        window = self._decay_window(x)
        if window is None or (window[0] == 0 and x < self.span_tokens):
            return 0.0  # stable, or exactly at the decay's start (the slope just before it)
        into, length = window
        if self.decay_shape == "exponential":
            return -(self.peak - self.to) * math.log(2) / self.half_life_tokens * 0.5 ** (into / self.half_life_tokens)
        if x > self.span_tokens or (self.decay_shape == "cosine" and into >= length):
            return 0.0
        if self.decay_shape == "cosine":
            return -(self.peak - self.to) * 0.5 * math.pi * math.sin(math.pi * into / length) / length
        return (self.to - self.peak) / length


def running_tokens(phases: Sequence[PhaseSpec], index: int) -> int:
    """Tokens a schedule starting in phase ``index`` runs over: that phase plus the phases right after it that
    continue it (``lr: {schedule: continue}``)."""
    total = phases[index].tokens
    for later in phases[index + 1 :]:
        if later.lr is None or later.lr.schedule != "continue":
            break
        total += later.tokens
    return total


def resolve_lr(
    phase: PhaseSpec,
    prev: ResolvedPhase | None,
    path: str,
    problems: list[Problem],
    *,
    start: int = 0,
    run_tokens: int | None = None,
) -> ResolvedLR | None:
    """``start``: the phase's first token; ``run_tokens``: :func:`running_tokens` (default: the phase's own)."""
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
        end = prev.lr.end
        run = run_tokens or phase.tokens
        return ResolvedLR("constant", end, end, 0, 0.0, "linear", start, run, end, running_end_tokens=start + run)
    if lr.schedule in ("continue", "invSqrt"):
        return _resolve_following(lr, phase, prev, path, problems, start, run_tokens)
    return _resolve_shape(lr, phase, prev, path, problems, start, run_tokens or phase.tokens)


def _resolve_shape(
    lr: LRSpec, phase: PhaseSpec, prev: ResolvedPhase | None, path: str, problems: list[Problem], start: int, run: int
) -> ResolvedLR | None:
    """constant, linear, cosine, wsd: a shape laid over ``run`` tokens (or horizonTokens) from the phase start."""
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
        if lr.horizon_tokens is not None:
            problems.append(
                Problem(f"{path}.lr.horizonTokens", "a constant schedule has no shape to lay over a horizon", "drop it")
            )
            ok = False
        to = peak
    else:
        to = lr.to if lr.to is not None else 0.0
        if to > peak:
            problems.append(
                Problem(f"{path}.lr.to", f"end LR {to} is above the peak {peak}", "decay schedules go down: lower `to`")
            )
            ok = False
    span = run
    if lr.horizon_tokens is not None and lr.schedule != "constant":
        if lr.horizon_tokens < run:
            continuing = f" and the phases that continue it ({format_count(run)} in all)" if run > phase.tokens else ""
            problems.append(
                Problem(
                    f"{path}.lr.horizonTokens",
                    f"{format_count(lr.horizon_tokens)} tokens is shorter than the schedule runs: this phase "
                    f"({format_count(phase.tokens)} tokens){continuing}",
                    f"raise it to at least {format_count(run)}, or drop it to end the shape with the phase",
                )
            )
            ok = False
        span = lr.horizon_tokens
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
    ok = _check_decay(lr, span, path, problems) and ok
    if not ok:
        return None
    decay_fraction = lr.decay_fraction or 0.0
    if lr.schedule == "wsd" and decay_fraction == 0:
        to = peak  # no decay: the phase stays at peak (and so ends there)
    resolved = ResolvedLR(
        schedule=lr.schedule,
        peak=peak,
        end=peak,
        warmup_tokens=lr.warmup_tokens,
        decay_fraction=decay_fraction,
        decay_shape=lr.decay_shape,
        origin_tokens=start,
        span_tokens=span,
        to=to,
        half_life_tokens=lr.half_life_tokens or 0,
        running_end_tokens=start + run,
    )
    return dataclasses.replace(resolved, end=resolved.value(phase.tokens))


def _check_decay(lr: LRSpec, span: int, path: str, problems: list[Problem]) -> bool:
    """wsd's decayFraction, and the decay shape's own fields."""
    ok = True
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
        elif span - int(span * lr.decay_fraction) < lr.warmup_tokens:
            problems.append(
                Problem(
                    f"{path}.lr.decayFraction",
                    "the decay would start before the warmup ends",
                    "lower decayFraction or warmupTokens",
                )
            )
            ok = False
    else:
        for key, is_set in (
            ("decayFraction", lr.decay_fraction is not None),
            ("decayShape", lr.decay_shape != "linear"),
        ):
            if is_set:
                problems.append(
                    Problem(
                        f"{path}.lr.{key}",
                        f"only applies to schedule wsd, not {lr.schedule}",
                        f"drop {key}, or use schedule: wsd",
                    )
                )
                ok = False
    if lr.decay_shape == "exponential" and lr.schedule == "wsd" and lr.half_life_tokens is None:
        problems.append(
            Problem(
                f"{path}.lr.halfLifeTokens",
                "required with decayShape exponential: the LR's distance to `to` halves every halfLifeTokens",
                "e.g. halfLifeTokens: 5B (MiniCPM: 5000 steps of its batch)",
            )
        )
        ok = False
    elif lr.half_life_tokens is not None and not (lr.schedule == "wsd" and lr.decay_shape == "exponential"):
        problems.append(
            Problem(
                f"{path}.lr.halfLifeTokens",
                "only applies to schedule wsd with decayShape exponential",
                "drop halfLifeTokens, or set decayShape: exponential",
            )
        )
        ok = False
    return ok


def _resolve_following(
    lr: LRSpec,
    phase: PhaseSpec,
    prev: ResolvedPhase | None,
    path: str,
    problems: list[Problem],
    start: int,
    run_tokens: int | None,
) -> ResolvedLR | None:
    """continue and invSqrt: schedules that take everything from where the previous phase's schedule is."""
    if prev is None:
        what = "continue" if lr.schedule == "continue" else "start an inverse square root from (its value and slope)"
        problems.append(
            Problem(
                f"{path}.lr.schedule",
                f"the first phase has no previous schedule to {what}",
                "give the first phase its own schedule, e.g. {schedule: cosine, peak: 3e-4}",
            )
        )
        return None
    extra = sorted(explicit_fields(lr) - {"schedule"})
    if extra:
        keys = ", ".join(camel(name) for name in extra)
        source = (
            "every value from the schedule it continues"
            if lr.schedule == "continue"
            else "its value and slope from where the previous phase ends"
        )
        problems.append(
            Problem(f"{path}.lr", f"schedule {lr.schedule} takes {source}; {keys} cannot be set", f"drop {keys}")
        )
        return None
    before = prev.lr
    if lr.schedule == "continue":
        return dataclasses.replace(
            before, end=before.value(start + phase.tokens - before.origin_tokens), continued=True
        )
    value = before.end
    slope = before.slope(prev.end_tokens - before.origin_tokens)
    if value <= 0 or slope >= 0:
        how = "at LR 0" if value <= 0 else ("flat" if slope == 0 else "rising")
        problems.append(
            Problem(
                f"{path}.lr.schedule",
                f"invSqrt continues a falling LR, but phase {prev.name} ends {how} "
                f"(LR {value:.4g}, slope {slope:.3g} per token)",
                "end the previous phase part-way down its decay, e.g. a cosine with horizonTokens longer than the "
                "phase",
            )
        )
        return None
    # alpha / sqrt(x + beta) through (0, value) with that slope: slope = -value / (2 beta).
    beta = -value / (2.0 * slope)
    alpha = value * math.sqrt(beta)
    resolved = ResolvedLR(
        schedule="invSqrt",
        peak=value,
        end=value,
        warmup_tokens=0,
        decay_fraction=0.0,
        decay_shape="linear",
        origin_tokens=start,
        span_tokens=phase.tokens,
        inv_sqrt=(alpha, beta),
        running_end_tokens=start + (run_tokens or phase.tokens),
    )
    end = resolved.value(phase.tokens)
    return dataclasses.replace(resolved, end=end, to=end)
