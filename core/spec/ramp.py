"""A phase's batch-size ramp: what it inherits when unset, and its checks against the phase budget and seqLen.

A ramp is ``((tokens since phase start, global batch in tokens), ...)``; a fixed ``batch.size`` is a one-point ramp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .fields import Problem
from .quantities import format_count
from .run import PhaseSpec

if TYPE_CHECKING:  # resolve.py imports this module: the phase type is for annotations only
    from .resolve import ResolvedPhase

__all__ = ["check_ramp", "resolve_ramp"]


def resolve_ramp(phase: PhaseSpec, prev: ResolvedPhase | None, path: str, problems: list[Problem]):
    batch = phase.batch
    if batch is None or (batch.size is None and batch.ramp is None):
        if prev is None:
            problems.append(
                Problem(
                    f"{path}.batch",
                    "the first phase must set batch.size or batch.ramp",
                    "add e.g. batch: {size: 4Mi} (tokens per optimizer step)",
                )
            )
            return None
        return ((0, prev.ramp[-1][1]),)
    if batch.size is not None and batch.ramp is not None:
        problems.append(Problem(f"{path}.batch", "set either size or ramp, not both", "keep one of them"))
        return None
    if batch.size is not None:
        return ((0, batch.size),)
    if not batch.ramp:
        problems.append(Problem(f"{path}.batch.ramp", "is empty", "list at least one {tokens, size} point"))
        return None
    return tuple((point.tokens, point.size) for point in batch.ramp)


def check_ramp(ramp, phase: PhaseSpec, seq_len: int, path: str, problems: list[Problem]) -> bool:
    ok = True
    is_ramp = phase.batch is not None and phase.batch.ramp is not None
    inherited = phase.batch is None or (phase.batch.size is None and phase.batch.ramp is None)
    if is_ramp:
        where = lambda i, f: f"{path}.batch.ramp[{i}].{f}"  # noqa: E731
    else:
        where = lambda i, f: f"{path}.batch" + ("" if inherited else ".size")  # noqa: E731
    if ramp[0][0] != 0:
        problems.append(
            Problem(
                where(0, "tokens"),
                f"the first ramp point must be at tokens 0, got {ramp[0][0]}",
                "start the ramp with {tokens: 0, size: ...}",
            )
        )
        ok = False
    for i in range(1, len(ramp)):
        if ramp[i][0] <= ramp[i - 1][0]:
            problems.append(
                Problem(
                    where(i, "tokens"),
                    f"ramp points must be in increasing token order, "
                    f"{format_count(ramp[i][0])} follows {format_count(ramp[i - 1][0])}",
                    "sort the ramp by tokens",
                )
            )
            ok = False
        if ramp[i][1] <= ramp[i - 1][1]:
            problems.append(
                Problem(
                    where(i, "size"),
                    f"a batch ramp must increase, {format_count(ramp[i][1])} follows {format_count(ramp[i - 1][1])}",
                    "make each size larger than the one before",
                )
            )
            ok = False
    if ramp[0][0] == 0 and phase.tokens < ramp[0][1]:
        problems.append(
            Problem(
                f"{path}.tokens",
                f"{format_count(phase.tokens)} tokens is less than one batch of {format_count(ramp[0][1])} tokens"
                + (" (inherited from the previous phase)" if inherited else "")
                + ": the phase would take no step",
                "raise tokens to at least one batch, or set a smaller batch for this phase",
            )
        )
        ok = False
    for i, (tokens, size) in enumerate(ramp):
        if tokens >= phase.tokens:
            problems.append(
                Problem(
                    where(i, "tokens"),
                    f"{format_count(tokens)} is not inside the phase's budget of "
                    f"{format_count(phase.tokens)} tokens, so this size would never be used",
                    "ramp tokens count from the phase start; lower it or drop the point",
                )
            )
            ok = False
        if size % seq_len:
            hint, fix = "", ""
            if size % 1000 == 0:
                hint = "; note K/M/B/T are powers of 1000 while Ki/Mi/Gi/Ti are powers of 1024"
                binary = _binary_reading(size)
                if binary and binary[1] % seq_len == 0:
                    fix = f"did you mean {binary[0]} ({binary[1]} tokens)? otherwise "
            lower, upper = size - size % seq_len, size + seq_len - size % seq_len
            origin = " (inherited from the previous phase)" if inherited else ""
            problems.append(
                Problem(
                    where(i, "size"),
                    f"batch of {size} tokens{origin} is not a whole number of sequences of seqLen {seq_len}{hint}",
                    f"{fix}use {lower or upper} or {upper} tokens",
                )
            )
            ok = False
    return ok


def _binary_reading(size: int) -> tuple[str, int] | None:
    """'8K' read as '8Ki': the size a user most likely meant when a decimal size does not fit."""
    for suffix, decimal, binary in (
        ("Ti", 10**12, 2**40),
        ("Gi", 10**9, 2**30),
        ("Mi", 10**6, 2**20),
        ("Ki", 10**3, 2**10),
    ):
        if size % decimal == 0:
            return f"{size // decimal}{suffix}", size // decimal * binary
    return None
