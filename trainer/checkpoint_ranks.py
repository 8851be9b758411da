"""Which rank this is, and rank 0's work shared with every rank: the collectives of the checkpoint code.

Checkpoints run with or without an initialised process group (a single process, a test, ``stagerun export``);
these helpers make the no-group case rank 0 of 1, where barriers vanish. They live apart from checkpoint.py
because both the manager and its async saves (checkpoint_async.py) need them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["dist_on", "on_rank0", "rank", "single_process_ok", "world"]

_T = TypeVar("_T")


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world() -> int:
    return dist.get_world_size() if dist_on() else 1


def on_rank0(fn: Callable[[], _T], group: dist.ProcessGroup | None = None) -> _T:
    """Run ``fn`` on rank 0 and hand its result (or its failure) to every rank.

    The broadcast doubles as the barrier; shipping the error too means a failure on rank 0 (bad permissions, a
    committed folder in the way) makes every rank raise instead of leaving the others stuck in a collective.
    ``group``: the process group to broadcast over (an async save's commit runs on its own gloo group).
    """
    if not dist_on():
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below after telling the other ranks
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=group)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """Silence DCP's warning, on every call without a process group, that it assumes a single process: here that
    is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*(unavailable|uninitialized)")
        yield
