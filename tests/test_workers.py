"""The operator's reconcile pools (operator/workers.py): periodic work waits while urgent work is queued or
running, and runs once it is done; Events posted from a worker reach kopf's context (the context is copied)."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from stagerun.operator import workers


def test_periodic_work_waits_for_urgent_work_to_finish():
    release = threading.Event()
    order: list[str] = []

    def urgent() -> str:
        release.wait(10)
        order.append("urgent")
        return "u"

    def periodic() -> str:
        order.append("periodic")
        return "p"

    async def scenario() -> tuple[str, str]:
        first = asyncio.ensure_future(workers.run_in(workers.URGENT, urgent))
        await asyncio.sleep(0.05)
        assert workers.urgent_busy() == 1
        second = asyncio.ensure_future(workers.run_in(workers.PERIODIC, periodic))
        await asyncio.sleep(0.3)
        assert order == []  # the periodic call is held back while the urgent one runs
        release.set()
        return await first, await second

    assert asyncio.run(scenario()) == ("u", "p")
    assert order == ["urgent", "periodic"]
    assert workers.urgent_busy() == 0


def test_a_worker_sees_the_callers_context_variables():
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable")

    async def scenario() -> str:
        variable.set("posted through the running operator")
        return await workers.run_in(workers.URGENT, variable.get)

    assert asyncio.run(scenario()) == "posted through the running operator"
