"""Schedule arithmetic: pure functions of (resolved run, tokens seen). No torch; the operator uses them too.

A step that starts at ``tokens`` belongs to the phase whose [start, end) contains ``tokens``; its global batch is
the phase's ramp size in force at ``tokens - phase.start``. A phase's last step may run past the phase's nominal
end by less than one batch, so each phase's tokens equal its budget within one step; phase boundaries and ramp
points stay where the manifest puts them (they never drift with overshoot).

The LR of a step is the schedule evaluated at the middle of the step's tokens: the first warmup step does not train
at LR 0, and the last step of a decay to 0 still moves the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import split_batch
from .spec.resolve import ResolvedPhase, ResolvedRun


@dataclass(frozen=True)
class StepPlan:
    """Everything the trainer needs to run one optimizer step."""

    step: int  # 0-based index of this optimizer step
    tokens: int  # tokens seen before this step
    phase: ResolvedPhase
    batch_tokens: int
    lr: float

    @property
    def seq_len(self) -> int:
        return self.phase.seq_len

    @property
    def batch_sequences(self) -> int:
        return self.batch_tokens // self.phase.seq_len

    @property
    def tokens_after(self) -> int:
        return self.tokens + self.batch_tokens

    @property
    def ends_phase(self) -> bool:
        return self.tokens_after >= self.phase.end_tokens


@dataclass(frozen=True)
class Segment:
    """Consecutive steps with one phase, batch size and seq len."""

    phase: ResolvedPhase
    first_step: int
    start_tokens: int
    steps: int
    batch_tokens: int

    @property
    def end_tokens(self) -> int:
        return self.start_tokens + self.steps * self.batch_tokens


def phase_at(run: ResolvedRun, tokens: int) -> ResolvedPhase | None:
    """The phase a step starting at ``tokens`` belongs to; None once every phase's budget is spent."""
    for phase in run.phases:
        if tokens < phase.end_tokens:
            return phase
    return None


def batch_tokens_at(phase: ResolvedPhase, tokens: int) -> int:
    """Global batch (tokens) in force at ``tokens`` (absolute), by the phase's ramp."""
    offset = tokens - phase.start_tokens
    size = phase.ramp[0][1]
    for point_tokens, point_size in phase.ramp:
        if offset >= point_tokens:
            size = point_size
    return size


def lr_at(phase: ResolvedPhase, tokens: float) -> float:
    """The phase's LR schedule at ``tokens`` (absolute), clamped to the phase.

    The schedule's shape is :class:`ResolvedLR`'s: it may start before the phase (``schedule: continue``) and end
    after it (``horizonTokens``). The clamp keeps a phase on its part of the curve; where the next phases continue
    it, a step that straddles the boundary reads the curve on past it, as it would were they one phase."""
    clamped = min(max(tokens, float(phase.start_tokens)), float(_lr_end(phase)))
    return phase.lr.value(clamped - phase.lr.origin_tokens)


def _lr_end(phase: ResolvedPhase) -> int:
    """Where the phase's schedule stops running: its end, or the end of the phases that continue it."""
    return max(phase.end_tokens, phase.lr.running_end_tokens)


def step_plan(run: ResolvedRun, tokens: int, step: int) -> StepPlan | None:
    """The plan of the optimizer step that starts after ``tokens`` tokens; None when the run is complete."""
    phase = phase_at(run, tokens)
    if phase is None:
        return None
    batch = batch_tokens_at(phase, tokens)
    middle = min(tokens + batch / 2, _lr_end(phase))
    return StepPlan(step=step, tokens=tokens, phase=phase, batch_tokens=batch, lr=lr_at(phase, middle))


def grad_accumulation(sequences: int, dp_size: int, micro_batch_size: int) -> int:
    """Micro-batches per rank per step; raises ValueError (a BatchSplitError) when the batch does not split evenly."""
    return split_batch(sequences, dp_size, micro_batch_size).grad_accum


def segments(run: ResolvedRun) -> list[Segment]:
    """The whole run as segments of constant batch and seq len (arithmetic; millions of steps cost nothing)."""
    result: list[Segment] = []
    tokens, step = 0, 0
    for phase in run.phases:
        for j, (_offset, size) in enumerate(phase.ramp):
            seg_end = phase.start_tokens + (phase.ramp[j + 1][0] if j + 1 < len(phase.ramp) else phase.tokens)
            if tokens >= seg_end:
                continue
            steps = -(-(seg_end - tokens) // size)
            result.append(Segment(phase, step, tokens, steps, size))
            tokens += steps * size
            step += steps
    return result


def phase_first_tokens(run: ResolvedRun, phase: ResolvedPhase) -> int | None:
    """Tokens seen before ``phase``'s first step; None when it has none (the phases before it overshot its budget).

    Not ``phase.start_tokens`` in general: steps are whole, so the step that ends the previous phase may run past
    its budget, and the phase's first step then starts there (its end stays where the budgets put it)."""
    return next((seg.start_tokens for seg in segments(run) if seg.phase.index == phase.index), None)


def total_steps(run: ResolvedRun) -> int:
    last = segments(run)[-1]
    return last.first_step + last.steps


def tokens_at_step(run: ResolvedRun, step: int) -> int:
    """Tokens seen before optimizer step ``step`` (the inverse of counting steps)."""
    for seg in segments(run):
        if step < seg.first_step + seg.steps:
            return seg.start_tokens + (step - seg.first_step) * seg.batch_tokens
    last = segments(run)[-1]
    return last.end_tokens


def next_phase_needs_relaunch(run: ResolvedRun, phase: ResolvedPhase) -> bool:
    """True when the phase after ``phase`` needs another process topology (so the gang must restart)."""
    if phase.index + 1 >= len(run.phases):
        return False
    return run.phases[phase.index + 1].topology != phase.topology


def checkpoint_due(every_tokens: int | None, tokens_before: int, tokens_after: int) -> bool:
    """Whether a step from ``tokens_before`` to ``tokens_after`` crossed a multiple of ``every_tokens``."""
    if not every_tokens:
        return False
    return tokens_after // every_tokens > tokens_before // every_tokens
