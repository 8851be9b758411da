"""Tie a gang's life to its parent: no orphaned torchrun or workers training on after `stagerun run` died.

Linux's ``PR_SET_PDEATHSIG`` makes the kernel signal a process when its parent thread ends, even after ``kill -9``
of the parent. `stagerun run` starts torchrun with SIGTERM as that signal (torchrun then stops its workers, who
checkpoint after their step, and it still holds the run lock it inherited, see run_lock.py); every worker sets
SIGKILL for itself at start (its parent is torchrun, which forwards signals while it lives: when it is gone,
nothing would stop the worker). Torchrun's own agent does not do this: its workers outlive a killed agent.

Where prctl is unavailable (not Linux) these are no-ops; :func:`stop_tree` still stops what it can find.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

__all__ = ["descendants", "die_with_parent", "stop_tree"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent ends (also a ``preexec_fn``).

    ``parent``: the pid the parent had; when it is already gone (we were reparented before the call), exit now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; [] elsewhere), children first."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                if child not in found:
                    found.append(child)
                    queue.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"  # a zombie has ended: only its exit status is left
    except (OSError, IndexError):
        return False


def stop_tree(pids: list[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL ``pids`` and wait (bounded) until they are gone; returns those still alive after ``timeout``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive
