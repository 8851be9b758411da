"""Test-only faults, kept out of the trainer: installed in real gangs through the ``STAGERUN_CALLBACKS`` hook.

``env(kill_after_step=13)`` is the environment for a ``stagerun run`` whose workers install them: it names
``faults:install`` as the callback factory and puts this folder on the workers' ``PYTHONPATH`` so they can import
it. The fault parameters travel as environment variables, read by ``install`` in every worker:

- ``STAGERUN_TEST_KILL_AFTER_STEP=N``: the last rank SIGKILLs itself right after step N and its checkpoint (a worker
  lost mid-run).
- ``STAGERUN_TEST_CRASH_BEFORE_COMMIT=N`` (or ``all``): saving step N SIGKILLs every rank after the checkpoint's data
  and meta.json are written, just before the commit marker (a pod dying mid-save). tests/_ckpt_worker.py installs
  the same hook on its own CheckpointManager through ``checkpoint_hooks``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagerun.trainer.callback_api import CALLBACKS_ENV, Callback, StepRecord
from stagerun.trainer.trainer import Trainer

KILL_AFTER_STEP_ENV = "STAGERUN_TEST_KILL_AFTER_STEP"
CRASH_ENV = "STAGERUN_TEST_CRASH_BEFORE_COMMIT"
TESTS = Path(__file__).resolve().parent

log = logging.getLogger("stagerun.tests.faults")


def env(
    base: dict[str, str] | None = None,
    *,
    kill_after_step: int | None = None,
    crash_before_commit: int | str | None = None,
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
    return faults
