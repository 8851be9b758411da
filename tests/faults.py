"""Test-only faults, kept out of the trainer: installed in real gangs through the ``STAGERUN_CALLBACKS`` hook.

``env(kill_after_step=13)`` is the environment for a ``stagerun run`` whose workers install them: it names
``faults:install`` as the callback factory and puts this folder on the workers' ``PYTHONPATH`` so they can import
it. The fault parameters travel as environment variables, read by ``install`` in every worker:

- ``STAGERUN_TEST_KILL_AFTER_STEP=N``: the last rank SIGKILLs itself right after step N and its checkpoint (a worker
  lost mid-run).
- ``STAGERUN_TEST_CRASH_BEFORE_COMMIT=N`` (or ``all``): saving step N SIGKILLs every rank after the checkpoint's data
  and meta.json are written, just before the commit marker (a pod dying mid-save). tests/_ckpt_worker.py installs
  the same hook on its own CheckpointManager through ``checkpoint_hooks``.
- ``STAGERUN_TEST_POISON_AFTER_STEP=N``: after step N every rank fills its shard of the first parameter's AdamW
  ``exp_avg`` with NaN. Step N+1's loss is still finite (so its checkpoint is saved and committed, with intact
  checksums), but its update is not: the checkpoint after it holds NaN parameters (a diverging state saved).
- ``STAGERUN_TEST_POISON_ON_RESUME=1``: every resume (also an in-process fallback) fills the first parameter with
  NaN, so the first step after *any* resume has a non-finite loss.
- ``STAGERUN_TEST_RESUMES_FILE=F``: rank 0 appends one JSON line per resume to F: the step loaded and, at that
  moment, the committed folders and the DAMAGED records under the checkpoint root (a test's observer).
- ``STAGERUN_TEST_HANG_BEFORE_COMMIT=N``: saving step N, every rank writes ``hung-rank<R>.pid`` into
  ``STAGERUN_TEST_HANG_DIR`` and sleeps 10 minutes before the commit marker (a save stuck on slow storage;
  signals do not end the sleep: their handlers only set the stop flag).
- ``STAGERUN_TEST_DISK_FULL_AT=N``: the last rank's DCP write of step N raises OSError(ENOSPC) ("no space left
  on device").
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

import stagerun.trainer.checkpoint as checkpoint_module
from stagerun.trainer.callback_api import CALLBACKS_ENV, Callback, StepRecord
from stagerun.trainer.checkpoint import MARKER, CheckpointInfo
from stagerun.trainer.checkpoint_resume import DAMAGED
from stagerun.trainer.trainer import Trainer

KILL_AFTER_STEP_ENV = "STAGERUN_TEST_KILL_AFTER_STEP"
CRASH_ENV = "STAGERUN_TEST_CRASH_BEFORE_COMMIT"
POISON_AFTER_STEP_ENV = "STAGERUN_TEST_POISON_AFTER_STEP"
POISON_ON_RESUME_ENV = "STAGERUN_TEST_POISON_ON_RESUME"
RESUMES_FILE_ENV = "STAGERUN_TEST_RESUMES_FILE"
HANG_ENV = "STAGERUN_TEST_HANG_BEFORE_COMMIT"
HANG_DIR_ENV = "STAGERUN_TEST_HANG_DIR"
DISK_FULL_ENV = "STAGERUN_TEST_DISK_FULL_AT"
TESTS = Path(__file__).resolve().parent

log = logging.getLogger("stagerun.tests.faults")


def env(
    base: dict[str, str] | None = None,
    *,
    kill_after_step: int | None = None,
    crash_before_commit: int | str | None = None,
    poison_after_step: int | None = None,
    poison_on_resume: bool = False,
    resumes_file: Path | None = None,
    hang_before_commit: int | None = None,
    hang_dir: Path | None = None,
    disk_full_at: int | None = None,
) -> dict[str, str]:
    """``base`` (extra environment for ``run_tiny``/``stagerun``) plus what makes its workers install the faults."""
    out = dict(base or {})
    path = out.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), path) if p)
    out[CALLBACKS_ENV] = "faults:install"
    if kill_after_step is not None:
        out[KILL_AFTER_STEP_ENV] = str(kill_after_step)
    if crash_before_commit is not None:
        out[CRASH_ENV] = str(crash_before_commit)
    optional = {
        POISON_AFTER_STEP_ENV: poison_after_step,
        POISON_ON_RESUME_ENV: 1 if poison_on_resume else None,
        RESUMES_FILE_ENV: resumes_file,
        HANG_ENV: hang_before_commit,
        HANG_DIR_ENV: hang_dir,
        DISK_FULL_ENV: disk_full_at,
    }
    out.update({k: str(v) for k, v in optional.items() if v is not None})
    return out


def _kill(why: str) -> None:
    log.warning("%s: killing rank %s (test-only fault injection)", why, os.environ.get("RANK", "0"))
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(Callback):
    """The last rank dies right after ``step`` (after that step's checkpoint, if one was due)."""

    def __init__(self, step: int, last_rank: bool) -> None:
        self.step, self.last_rank = step, last_rank

    def on_step(self, record: StepRecord) -> None:
        if record.step == self.step and self.last_rank:
            os.kill(os.getpid(), signal.SIGKILL)


def _fill_nan(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        (tensor.to_local() if isinstance(tensor, DTensor) else tensor).fill_(float("nan"))


def _first_param(trainer: Trainer) -> torch.nn.Parameter:
    return trainer.optimizer.param_groups[0]["params"][0]


class PoisonAfterStep(Callback):
    """After ``step``: NaN in the first parameter's AdamW first moment (see the module docstring)."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        self.trainer, self.step = trainer, step

    def on_step(self, record: StepRecord) -> None:
        if record.step == self.step:
            param = _first_param(self.trainer)
            _fill_nan(self.trainer.optimizer.state[param]["exp_avg"])
            log.warning("%s: NaN in exp_avg after step %d (test-only fault)", POISON_AFTER_STEP_ENV, record.step)


class PoisonOnResume(Callback):
    """Every resume leaves NaN in the first parameter: the next step's loss is non-finite."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_resume(self, checkpoint: CheckpointInfo, restarts: int, load_seconds: float) -> None:
        _fill_nan(_first_param(self.trainer))
        log.warning("%s: NaN in a parameter after resuming from %s (test-only fault)", POISON_ON_RESUME_ENV, checkpoint)


class RecordResumes(Callback):
    """Rank 0 appends what each resume loaded, and the checkpoint folders' state at that moment, to ``path``."""

    def __init__(self, trainer: Trainer, path: Path) -> None:
        self.root, self.path = Path(trainer.manager.root), path

    def on_resume(self, checkpoint: CheckpointInfo, restarts: int, load_seconds: float) -> None:
        folders = sorted(self.root.glob("step-*"))
        record = {
            "step": checkpoint.step,
            "committed": [f.name for f in folders if (f / MARKER).exists()],
            "damaged": {
                f.name: json.loads((f / DAMAGED).read_text())["reason"] for f in folders if (f / DAMAGED).exists()
            },
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def hang_before_commit(which: int, folder: Path, rank: int) -> Callable[[int], None]:
    """A before_commit hook: saving step ``which``, announce this rank's pid and hang (a stuck save)."""

    def hook(step: int) -> None:
        if step == which:
            (folder / f"hung-rank{rank}.pid").write_text(str(os.getpid()))
            log.warning("%s: rank %d hangs before step %d's commit (test-only fault)", HANG_ENV, rank, step)
            time.sleep(600)

    return hook


def fill_disk_at(step: int) -> None:
    """Make the CheckpointManager's writer fail with ENOSPC when it writes step ``step`` (this process only)."""
    base = checkpoint_module.ChecksumWriter
    folder = f"step-{step:08d}"

    class FullDiskWriter(base):  # type: ignore[misc,valid-type]
        def __init__(self, path: str, **kwargs: Any) -> None:
            super().__init__(path, **kwargs)
            self.full = os.path.basename(str(path).rstrip("/")) == folder

        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{folder}/(shard of this rank)")
            return super().write_data(plan, planner)

    checkpoint_module.ChecksumWriter = FullDiskWriter


def crash_before_commit(which: str) -> Callable[[int], None]:
    """A CheckpointManager.before_commit hook that kills this rank when saving step ``which`` (or any: ``all``)."""

    def hook(step: int) -> None:
        if which in ("all", str(step)):
            _kill(f"{CRASH_ENV}: before step {step}'s commit marker")

    return hook


def checkpoint_hooks() -> list[Callable[[int], None]]:
    which = os.environ.get(CRASH_ENV)
    return [crash_before_commit(which)] if which else []


def install(trainer: Trainer) -> list[Any]:
    """The ``STAGERUN_CALLBACKS`` factory: the faults this worker's environment asks for."""
    faults: list[Any] = checkpoint_hooks()
    kill = os.environ.get(KILL_AFTER_STEP_ENV)
    if kill:
        faults.append(KillAfterStep(int(kill), trainer.topo.rank == trainer.topo.world_size - 1))
    if poison := os.environ.get(POISON_AFTER_STEP_ENV):
        faults.append(PoisonAfterStep(trainer, int(poison)))
    if os.environ.get(POISON_ON_RESUME_ENV):
        faults.append(PoisonOnResume(trainer))
    if (resumes := os.environ.get(RESUMES_FILE_ENV)) and trainer.topo.is_main:
        faults.append(RecordResumes(trainer, Path(resumes)))
    if hang := os.environ.get(HANG_ENV):
        faults.append(hang_before_commit(int(hang), Path(os.environ[HANG_DIR_ENV]), trainer.topo.rank))
    if (full := os.environ.get(DISK_FULL_ENV)) and trainer.topo.rank == trainer.topo.world_size - 1:
        fill_disk_at(int(full))
    return faults
