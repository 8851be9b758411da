"""Where reconciles run: two thread pools, so work that must be quick never queues behind work that can wait.

A new run, an edit, a deletion and a Job's event (a failed pod, an ended or suspended Job) go to the ``urgent`` pool;
every run's periodic tick (progress, deadlines, backoffs) goes to the ``periodic`` one. With kopf's single executor a
burst of creations waited behind hundreds of timer reconciles (apply -> Job p95 70 s at 500 runs). The periodic pool
is small on purpose: when it cannot keep up, ticks stretch (kopf never overlaps two ticks of one run) instead of
taking the interpreter from the urgent ones. The pools outlive reloads of the handlers module (the tests reload it
for every operator they start).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
URGENT, PERIODIC, PROGRESS = "urgent", "periodic", "progress"
# Environment variables and defaults: the urgent pool is mostly idle, so it may be wide; the periodic one is what
# competes with it for the interpreter.
# (progress_poller.py's fetches of rank 0's /progress wait on the network, not the interpreter.)
WORKERS = {
    URGENT: ("STAGERUN_URGENT_WORKERS", 8),
    PERIODIC: ("STAGERUN_PERIODIC_WORKERS", 2),
    PROGRESS: ("STAGERUN_PROGRESS_WORKERS", 4),
}

# Periodic work waits while urgent work is queued or running (at most URGENT_FIRST_MAX_WAIT_S, so a long burst
# delays the ticks without stopping them): the interpreter lock would otherwise share one core among all threads,
# and a burst of creations would go at the pace of the ticks.
URGENT_FIRST_MAX_WAIT_S = 30.0

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_urgent_busy = 0
_urgent_idle = threading.Condition()


def pool(kind: str) -> ThreadPoolExecutor:
    with _lock:
        if kind not in _pools:
            variable, default = WORKERS[kind]
            _pools[kind] = ThreadPoolExecutor(
                int(os.environ.get(variable, default)), thread_name_prefix=f"stagerun-{kind}"
            )
        return _pools[kind]


async def run_in(kind: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the ``kind`` pool, awaited. The context is copied, as kopf does for its sync handlers, so
    kopf.info/kopf.warn in the thread post their Events through the running operator."""
    global _urgent_busy
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    loop = asyncio.get_running_loop()
    if kind != URGENT:
        return await loop.run_in_executor(pool(kind), _after_urgent, call)
    with _urgent_idle:
        _urgent_busy += 1
    try:
        return await loop.run_in_executor(pool(kind), call)
    finally:
        with _urgent_idle:
            _urgent_busy -= 1
            if not _urgent_busy:
                _urgent_idle.notify_all()


def _after_urgent(call: Callable[[], T]) -> T:
    with _urgent_idle:
        _urgent_idle.wait_for(lambda: not _urgent_busy, timeout=URGENT_FIRST_MAX_WAIT_S)
    return call()


def urgent_busy() -> int:
    """Urgent calls queued or running (for tests and metrics)."""
    return _urgent_busy
