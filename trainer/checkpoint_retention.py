"""Checkpoint retention, and what a full disk means for it.

Kept: the newest ``keep`` committed checkpoints, every phase boundary, the *protected* steps (the newest checkpoint
a gang resumed from and then stepped from with a finite loss, recorded by checkpoint_resume.py: the last state
known to train, kept so that a poisoned commit followed by ``keep`` more can never delete the only good one), and
uncommitted folders newer than the newest committed one (possibly a save in flight). Deleted: everything else
committed, and uncommitted leftovers (crashed saves, checkpoints found damaged) older than the newest committed one.

Space: retention runs only after a save has committed, so a run needs room for ``keep + 1`` checkpoints (plus the
protected one); a save that fails for lack of space says so (:func:`disk_full_error`).
"""

from __future__ import annotations

import errno
import logging
import re
from typing import TYPE_CHECKING

from stagerun.core import storage

from .checkpoint_ranks import rank

if TYPE_CHECKING:
    from .checkpoint import CheckpointManager

__all__ = ["apply_retention", "disk_full_error", "is_disk_full"]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def apply_retention(manager: CheckpointManager, protected: set[int]) -> list[str]:
    """Delete what retention no longer needs; returns the deleted folders' URLs. Only rank 0 deletes (concurrent
    deleters would race); elsewhere it returns []."""
    from .checkpoint import MARKER

    if rank() != 0:
        return []
    infos = manager.committed()
    if not infos:
        return []
    newest = infos[-1].step
    keep = {i.step for i in infos[-manager.keep :]} | {i.step for i in infos if i.phase_boundary} | {newest}
    keep |= protected
    doomed = [storage.join(manager.root, f"step-{i.step:08d}") for i in infos if i.step not in keep]
    committed_steps = {i.step for i in infos}
    for name in storage.list_subdirs(manager.fs, manager.root):
        m = _STEP_DIR.match(name)
        if m and int(m.group(1)) not in committed_steps and int(m.group(1)) < newest:
            doomed.append(storage.join(manager.root, name))
    deleted = []
    for folder in sorted(doomed):
        storage.delete_folder_marker_first(manager.fs, folder, MARKER)
        deleted.append(storage.to_url(manager.fs, folder))
    if deleted:
        log.info("checkpoint retention deleted %s", ", ".join(deleted))
    return deleted


def is_disk_full(error: BaseException | None, depth: int = 0) -> bool:
    """ENOSPC anywhere in the error, its causes, or the per-rank failures of DCP's CheckpointException."""
    if error is None or depth > 8:
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(error):  # other ranks' failures arrive as text (on_rank0, DCP)
        return True
    nested = [*getattr(error, "failures", {}).values(), error.__cause__, error.__context__]
    return any(is_disk_full(e, depth + 1) for e in nested if isinstance(e, BaseException))


def disk_full_error(manager: CheckpointManager, step: int | None) -> OSError:
    """The error a save that ran out of space raises: the space needed and the fixes, not "run it again"."""
    size = manager.last_save_bytes or 0
    need = f"about {(manager.keep + 1) * size / 1e9:.2f} GB at the last checkpoint's size" if size else "that room"
    return OSError(
        errno.ENOSPC,
        f"checkpoint step {step} could not be written under {manager.url}: no space left on device. Saving needs "
        f"room for keep + 1 = {manager.keep + 1} checkpoints ({need}), plus the resumed-from one retention "
        "protects: old checkpoints are deleted only after a new one is committed, so running the same command "
        "again fails the same way. Free space there, lower spec.checkpoint.keep, or point spec.checkpoint.path "
        "at a larger volume, then run again",
    )
