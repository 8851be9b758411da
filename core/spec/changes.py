"""Which edits a live run can take: later phases yes; anything its checkpoints or data position depend on, no.

Used by the operator (to accept or refuse an edit of a running TrainingRun) and by the trainer (to pick up an
accepted edit of later phases when it reaches them without a relaunch).
"""

from __future__ import annotations

from .resolve import ResolvedRun


def immutable_changes(accepted: ResolvedRun, new: ResolvedRun, current_phase: int) -> list[str]:
    """Field paths whose change a run in ``current_phase`` cannot take."""
    changed = [
        path
        for path, a, b in (
            ("spec.model", accepted.model, new.model),
            ("spec.tokenizer", accepted.tokenizer, new.tokenizer),
            ("spec.data.sources", accepted.sources, new.sources),
            ("spec.data.seed", accepted.data_seed, new.data_seed),
            ("spec.training", accepted.training, new.training),
            ("spec.checkpoint.path", accepted.checkpoint.path, new.checkpoint.path),
        )
        if a != b
    ]
    for index in range(current_phase + 1):
        if index >= len(new.phases):
            changed.append(f"spec.phases[{index}] (removed)")
        elif new.phases[index] != accepted.phases[index]:
            changed.append(f"spec.phases[{index}] ({accepted.phases[index].name})")
    return changed
