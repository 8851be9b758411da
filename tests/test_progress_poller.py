"""The operator's rank-0 progress fetches (operator/progress_poller.py): a reconcile never waits on a pod for more
than the poller's short wait, keeps the last answer while a fetch hangs, and never mixes up two attempts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stagerun.core.protocol import Progress
from stagerun.operator.progress_poller import ProgressPoller


def progress(step: int) -> Progress:
    return Progress(step=step, tokens=step * 10, phase_index=0, started_at=1000.0, last_step_at=1000.0 + step)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def test_an_answering_rank_zero_is_seen_in_the_same_reconcile(pool):
    poller = ProgressPoller(lambda ip: progress(7) if ip == "127.1.0.5" else None, pool, wait_s=5)
    assert poller.progress("ns", "run", 1, "127.1.0.5") == progress(7)


def test_a_hanging_rank_zero_costs_the_wait_and_keeps_the_last_answer(pool):
    answers = iter([progress(1)])
    release = threading.Event()

    def fetch(ip: str) -> Progress | None:
        try:
            return next(answers)
        except StopIteration:
            release.wait(30)  # rank 0 stopped answering: the HTTP call hangs until its timeout
            return None

    poller = ProgressPoller(fetch, pool, wait_s=0.2)
    assert poller.progress("ns", "run", 1, "127.1.0.5") == progress(1)
    started = time.monotonic()
    assert poller.progress("ns", "run", 1, "127.1.0.5") == progress(1)  # the fetch hangs: the last answer
    assert poller.progress("ns", "run", 1, "127.1.0.5") == progress(1)  # still in flight: no second fetch queued
    assert time.monotonic() - started < 2.0
    release.set()


def test_a_new_attempt_or_pod_never_sees_the_previous_ones_progress(pool):
    poller = ProgressPoller(lambda ip: progress(5) if ip == "127.1.0.5" else None, pool, wait_s=5)
    assert poller.progress("ns", "run", 1, "127.1.0.5") == progress(5)
    assert poller.progress("ns", "run", 2, "127.1.0.9") is None  # attempt 2's rank 0 does not answer yet
    assert poller.progress("ns", "other", 1, "127.1.0.9") is None


def test_a_fetch_that_raises_is_no_answer_and_the_next_one_is_tried(pool):
    calls = []

    def fetch(ip: str) -> Progress | None:
        calls.append(ip)
        if len(calls) == 1:
            raise RuntimeError("connection reset")
        return progress(3)

    poller = ProgressPoller(fetch, pool, wait_s=5)
    assert poller.progress("ns", "run", 1, "127.1.0.5") is None
    assert poller.progress("ns", "run", 1, "127.1.0.5") == progress(3)
    poller.forget("ns", "run")
    assert len(calls) == 2
