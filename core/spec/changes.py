"""Which edits a live run can take: later phases yes; anything its checkpoints or data position depend on, no.

Used by the operator (to accept or refuse an edit of a running TrainingRun) and by the trainer (to pick up an
accepted edit of later phases when it reaches them without a relaunch).
"""

from __future__ import annotations

from collections.abc import Callable

from .resolve import ResolvedRun

# Fields that no edit may change once the run has started (its first attempt launched), whatever phase it is in:
# its checkpoints and data position depend on them. The CRD states the same fields as CEL rules, so the apiserver
# refuses such an edit at `kubectl apply` (operator/crd.py); phases are checked here only, as whether an edit of a
# phase (or of a block phases inherit) is allowed depends on the phase the run is in.
IMMUTABLE_ONCE_STARTED: dict[str, Callable[[ResolvedRun], object]] = {
    "spec.model": lambda run: run.model,
    "spec.tokenizer": lambda run: run.tokenizer,
    "spec.data.sources": lambda run: run.sources,
    "spec.data.seed": lambda run: run.data_seed,
    "spec.training": lambda run: run.training,
    "spec.checkpoint.path": lambda run: run.checkpoint.path,
}


def immutable_changes(accepted: ResolvedRun, new: ResolvedRun, current_phase: int) -> list[str]:
    """Field paths whose change a run in ``current_phase`` cannot take."""
    changed = [path for path, value in IMMUTABLE_ONCE_STARTED.items() if value(accepted) != value(new)]
    for index in range(current_phase + 1):
        if index >= len(new.phases):
            changed.append(f"spec.phases[{index}] (removed)")
        elif new.phases[index] != accepted.phases[index]:
            changed.append(f"spec.phases[{index}] ({accepted.phases[index].name})")
    return changed
