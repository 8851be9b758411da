"""Rank 0's progress, fetched beside a run's reconcile instead of inside it.

A reconcile asks for the progress of the gang it observes (run, attempt, rank 0's pod IP). A fetch starts on a
small pool of its own, and the reconcile waits for it only ``wait_s`` (a rank 0 that answers does so in
milliseconds); when it does not answer by then, the reconcile goes on with the last answer it got, and the fetch
finishes in the background for the next one. So a pod that hangs, or an address that drops packets, costs a
reconcile at most ``wait_s``, never the HTTP timeout, and never holds the run's lock for long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from stagerun.core.protocol import Progress

log = logging.getLogger("stagerun.operator")
Fetch = Callable[[str], "Progress | None"]  # pod IP -> rank 0's answer, None when it does not answer


@dataclass
class _Gang:
    target: tuple[int, str]  # (attempt, rank 0's pod IP): a new attempt or pod starts from nothing
    latest: Progress | None = None
    inflight: Future | None = field(default=None, repr=False)


class ProgressPoller:
    def __init__(self, fetch: Fetch, pool: Executor, wait_s: float = 0.25) -> None:
        self._fetch = fetch
        self._pool = pool
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._gangs: dict[tuple[str, str], _Gang] = {}

    def progress(self, namespace: str, name: str, attempt: int, pod_ip: str) -> Progress | None:
        """The newest answer of this gang's rank 0, waiting up to ``wait_s`` for the fetch this call starts (or for
        the one still in flight)."""
        key, target = (namespace, name), (attempt, pod_ip)
        with self._lock:
            gang = self._gangs.get(key)
            if gang is None or gang.target != target:
                gang = self._gangs[key] = _Gang(target)
            if gang.inflight is None:
                gang.inflight = self._pool.submit(self._fetch_into, gang, pod_ip)
            inflight = gang.inflight
        try:
            inflight.result(timeout=self._wait_s)
        except FutureTimeout:
            pass
        with self._lock:
            return gang.latest

    def forget(self, namespace: str, name: str) -> None:
        """The run is gone, or has no running rank 0: drop what was kept for it."""
        with self._lock:
            self._gangs.pop((namespace, name), None)

    def _fetch_into(self, gang: _Gang, pod_ip: str) -> None:
        try:
            answer = self._fetch(pod_ip)
        except Exception as exc:  # a fetch that raises is an answer that did not come; the next reconcile tries again
            log.warning("progress of %s failed: %s", pod_ip, exc)
            answer = None
        finally:
            with self._lock:
                gang.inflight = None
        if answer is not None:  # a rank 0 that stops answering keeps its last answer: the hang clock decides
            with self._lock:
                gang.latest = answer
