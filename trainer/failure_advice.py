"""Which failures a rerun can fix, and what to tell the person who has to act.

"Run the same command again" is honest only for transient failures: a killed worker, a lost node, a storage or
network error. A full disk, a damaged newest checkpoint without an intact fallback, a missing teacher or dpo
reference (dpo.ReferenceUnavailable: a SpecError naming spec.phases[i].dpo.reference), unusable data or a manifest
that does not fit fail again the same way on every rerun (and an operator retrying them would retry forever), so
they are *permanent*: the worker that hits one writes it to ``status.json`` with a ``FailureReason``
(``RunStatus.reason``), `stagerun run` prints what to change, and `stagerun launch` passes it to the operator in
the termination message with ``permanent: true``, which fails the run with that reason instead of restarting it.
Device and path mistakes are caught before any worker starts (preflight.py); this module covers what only shows
while training.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagerun.core.protocol import FailureReason, GangState, RunStatus
from stagerun.core.spec import SpecError

__all__ = ["PermanentFailure", "classify", "failed_status", "rerun_advice", "permanent_advice"]


@dataclass(frozen=True)
class PermanentFailure:
    reason: FailureReason
    message: str


def classify(exc: BaseException) -> PermanentFailure | None:
    """The permanent failure ``exc`` is, or None when a rerun may succeed (or nothing says it cannot)."""
    from .checkpoint_resume import NoIntactCheckpoint
    from .checkpoint_retention import is_disk_full
    from .data import DataError
    from .distill import TeacherError

    if isinstance(exc, NoIntactCheckpoint):
        return PermanentFailure(FailureReason.NO_INTACT_CHECKPOINT, str(exc))
    if is_disk_full(exc):
        return PermanentFailure(FailureReason.CHECKPOINT_DISK_FULL, str(exc))
    if isinstance(exc, TeacherError):
        return PermanentFailure(FailureReason.TEACHER_UNUSABLE, str(exc))
    if isinstance(exc, DataError):
        return PermanentFailure(FailureReason.TRAINING_DATA_ERROR, str(exc))
    if isinstance(exc, SpecError):
        return PermanentFailure(FailureReason.TRAINING_INVALID_SPEC, str(exc))
    return None


def failed_status(failure: PermanentFailure) -> RunStatus:
    """The status a worker writes for a permanent failure (the counters are not known where it failed)."""
    return RunStatus(GangState.FAILED, 0, 0, 0, "", None, failure.message, reason=str(failure.reason))


def permanent_advice(run_name: str, status: RunStatus) -> str:
    reason = f" ({status.reason})" if status.reason else ""
    return (
        f"{run_name}: workers failed: {status.message}\n"
        f"{run_name}: this failure is permanent{reason}: running the same command again would fail the same way; "
        "change what the message names first"
    )


def rerun_advice(run_name: str, exit_code: int, newest_step: int | None) -> str:
    """For a gang that ended without saying why: a killed or lost worker, a storage or network error, or a bug."""
    resume = f"step {newest_step}" if newest_step is not None else "the start (no checkpoint was committed)"
    return (
        f"{run_name}: workers failed (exit code {exit_code}); nothing says the cause is permanent (a killed worker, "
        f"a lost process, a storage or network error): run the same command again to resume from {resume}. If the "
        "same error shows above again, it is not transient: it names what to fix"
    )
