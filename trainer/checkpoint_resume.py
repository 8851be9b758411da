"""Which checkpoint a gang resumes from: rank 0's choice for every rank, the newest *intact* one, never silence.

- **One choice.** Rank 0 lists the committed checkpoints and broadcasts the list (:func:`agreed_candidates`), so
  ranks never load different "latest" ones while a listing changes under them.
- **Fallback on damage.** :func:`load_newest_intact` loads the newest candidate; when its files fail verification
  (checkpoint_checksums.py) or DCP cannot load it, the checkpoint is *de-committed* (rank 0 writes ``DAMAGED``
  with the reason, then deletes ``COMMITTED``: every later listing, the operator's too, skips it), a loud warning
  names the damaged file, and the previous one is tried. When none is intact the gang stops with
  :class:`NoIntactCheckpoint`, naming the folder and the fix: it never restarts from scratch silently. Storage
  trouble (a file that cannot be read) is not damage: it is raised, and the gang is retried.
- **The last good state.** Once a gang has resumed from a checkpoint and taken a step with a finite loss, rank 0
  records it in ``<root>/RESUMED.json`` (:func:`record_good_resume`); retention keeps that checkpoint whatever
  ``keep`` says, until a later gang resumes and steps from a newer one. A non-finite loss right after a resume
  (before the gang's first commit) falls back once, in the same process, to that recorded checkpoint when it is
  older, else to the previous committed one (trainer.py); what was committed after the fallback target is
  de-committed as a descendant of the suspect state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from stagerun.core import storage

from .checkpoint import MARKER, CheckpointInfo, CheckpointManager
from .checkpoint_checksums import ChecksumError
from .checkpoint_ranks import on_rank0, rank

__all__ = [
    "DAMAGED",
    "RESUMED",
    "NoIntactCheckpoint",
    "agreed_candidates",
    "decommit",
    "load_newest_intact",
    "read_good_resume",
    "record_good_resume",
    "refuse_scratch_after_damage",
]

log = logging.getLogger(__name__)

DAMAGED = "DAMAGED"  # in a de-committed checkpoint folder: why it is no longer a checkpoint
RESUMED = "RESUMED.json"  # in the checkpoint root: the newest checkpoint a gang resumed and stepped from


class NoIntactCheckpoint(RuntimeError):
    """Every committed checkpoint failed to load: the run must not silently restart from scratch."""


class _Refused(Exception):
    """The caller's check_meta refused the checkpoint (another model): the user's error, not damage."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def agreed_candidates(manager: CheckpointManager) -> list[CheckpointInfo]:
    """The committed checkpoints as rank 0 lists them, newest first, on every rank (collective)."""
    return on_rank0(lambda: list(reversed(manager.committed())))


def decommit(manager: CheckpointManager, info: CheckpointInfo, reason: str) -> None:
    """Make ``info`` no checkpoint any more (collective; rank 0 writes): ``DAMAGED`` first, then the marker goes.

    The folder stays for inspection until retention removes it as an uncommitted leftover (or a save of the same
    step replaces it)."""

    def write() -> None:
        folder = storage.join(manager.root, f"step-{info.step:08d}")
        marker_path = storage.join(folder, MARKER)
        try:
            marker = storage.read_json(manager.fs, marker_path)
        except (FileNotFoundError, ValueError):
            marker = None
        record = {"reason": reason, "at": datetime.now(UTC).isoformat(timespec="seconds"), "marker": marker}
        storage.write_bytes_atomic(manager.fs, storage.join(folder, DAMAGED), json.dumps(record, indent=1).encode())
        if manager.fs.exists(marker_path):
            manager.fs.rm_file(marker_path)
        manager.fs.invalidate_cache(folder)

    on_rank0(write)


def load_newest_intact(
    manager: CheckpointManager,
    app_state: dict[str, Any],
    candidates: list[CheckpointInfo],
    check_meta: Callable[[CheckpointInfo], Callable[[dict[str, Any]], None]] | None = None,
) -> tuple[CheckpointInfo, dict[str, Any]]:
    """Load the newest of ``candidates`` (newest first) that is intact, de-committing each damaged one on the way
    (collective). Raises NoIntactCheckpoint when none is."""
    damaged: list[str] = []
    for info in candidates:
        check = check_meta(info) if check_meta else None

        def guarded(meta: dict[str, Any], check: Callable[[dict[str, Any]], None] | None = check) -> None:
            if check is not None:
                try:
                    check(meta)
                except Exception as e:
                    raise _Refused(e) from e

        try:
            return info, manager.load(info, app_state, check_meta=guarded)
        except _Refused as e:
            raise e.error from None
        except ChecksumError as e:
            if e.transient:
                raise
            reason = str(e)
        except (CheckpointException, ValueError, EOFError, RuntimeError, FileNotFoundError) as e:
            reason = f"checkpoint {info.path} could not be loaded: {type(e).__name__}: {e}"
        except OSError:
            raise  # storage or network trouble: the checkpoint may be fine, the gang is retried
        damaged.append(reason)
        if rank() == 0:
            log.error(
                "CHECKPOINT DAMAGED: %s. It is de-committed (see its %s file) and the run falls back to the "
                "previous checkpoint",
                reason,
                DAMAGED,
            )
        decommit(manager, info, reason)
    raise NoIntactCheckpoint(
        f"no intact checkpoint under {manager.url}: {'; '.join(damaged)}. Each was de-committed (its folder "
        f"holds a {DAMAGED} file with the reason). Restore the damaged files from a backup and rename {DAMAGED} "
        f"back to {MARKER}, or delete those folders (or point spec.checkpoint.path elsewhere) to start from step 0"
    )


def refuse_scratch_after_damage(manager: CheckpointManager) -> None:
    """Raise NoIntactCheckpoint when nothing is committed but de-committed checkpoints exist (collective): a rerun
    after every checkpoint was found damaged must not start from step 0 as if the run were new."""

    def damaged() -> list[str]:
        names = storage.list_subdirs(manager.fs, manager.root)
        folders = [storage.join(manager.root, n) for n in names if n.startswith("step-")]
        return [storage.to_url(manager.fs, f) for f in folders if manager.fs.exists(storage.join(f, DAMAGED))]

    found = on_rank0(damaged)
    if found:
        raise NoIntactCheckpoint(
            f"no committed checkpoint under {manager.url}, but {', '.join(found)} were de-committed as damaged "
            f"(see the {DAMAGED} file in each). Restore the damaged files and rename {DAMAGED} back to {MARKER}, or "
            "delete those folders to really start from step 0"
        )


def read_good_resume(manager: CheckpointManager) -> int | None:
    """The step recorded in ``RESUMED.json`` (None when there is none or it is unreadable)."""
    path = storage.join(manager.root, RESUMED)
    try:
        return int(storage.read_json(manager.fs, path)["step"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def record_good_resume(manager: CheckpointManager, info: CheckpointInfo) -> None:
    """Rank 0: ``info`` was resumed from and stepped from with a finite loss; retention keeps it from now on."""
    manager.protected_steps = {info.step}
    if rank() != 0:
        return
    record = {"step": info.step, "path": info.path, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    manager.fs.makedirs(manager.root, exist_ok=True)
    storage.write_bytes_atomic(manager.fs, storage.join(manager.root, RESUMED), json.dumps(record).encode())


class Resumption:
    """What a gang knows about the checkpoint it resumed from: for the good-resume record and the one fallback
    after a non-finite loss right after the resume (see the module docstring)."""

    def __init__(self, manager: CheckpointManager, candidates: list[CheckpointInfo], loaded: CheckpointInfo) -> None:
        self.manager, self.candidates, self.loaded = manager, candidates, loaded
        self.recorded = False  # RESUMED.json names ``loaded``
        self.committed = False  # this gang committed a checkpoint since: the loaded state is superseded
        self.fell_back = False
        good = read_good_resume(manager)
        manager.protected_steps = {good} if good is not None else set()

    def stepped_finite(self) -> None:
        if not self.recorded:
            record_good_resume(self.manager, self.loaded)
            self.recorded = True

    def fallback_target(self) -> CheckpointInfo | None:
        """Where a non-finite loss now falls back to, or None when it must fail (no resume, a commit since, already
        fell back once, nothing older)."""
        if self.committed or self.fell_back:
            return None
        older = [c for c in self.candidates if c.step < self.loaded.step]
        good = read_good_resume(self.manager)
        proven = [c for c in older if c.step == good]
        chosen = proven or older
        return chosen[0] if chosen else None

    def decommit_after(self, target: CheckpointInfo, reason: str) -> list[int]:
        """De-commit every committed checkpoint newer than ``target`` (collective): descendants of a suspect state."""
        newer = [c for c in agreed_candidates(self.manager) if c.step > target.step]
        for info in newer:
            decommit(self.manager, info, reason)
        return [c.step for c in newer]
